"""Baselines in peftlab.lab.metrics against naive counts and a simulated random predictor."""

from __future__ import annotations

import random

import pytest

from peftlab.lab import metrics


def _naive_f1(pred: list[int], ref: list[int], classes: list[int]) -> float:
    out = []
    for c in classes:
        tp = sum(p == c == r for p, r in zip(pred, ref))
        fp = sum(p == c != r for p, r in zip(pred, ref))
        fn = sum(r == c != p for p, r in zip(pred, ref))
        out.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(out) / len(out)


def test_majority_baseline_is_the_constant_predictor() -> None:
    labels = [1] * 66 + [0] * 34
    base = metrics.majority_baseline(labels, num_classes=2)
    assert base.predicted_class == 1
    assert base.accuracy == pytest.approx(0.66, abs=1e-12)
    assert base.macro_f1 == pytest.approx(_naive_f1([1] * 100, labels, [0, 1]), abs=1e-12)
    # closed form (2p / (1 + p)) / k
    assert base.macro_f1 == pytest.approx(2 * 0.66 / 1.66 / 2, abs=1e-12)


def test_majority_from_training_labels_and_ties() -> None:
    train = [0] * 10 + [1] * 3
    test = [1] * 7 + [0] * 3
    base = metrics.majority_baseline(test, train_labels=train, num_classes=2)
    assert base.predicted_class == 0
    assert base.accuracy == pytest.approx(0.3, abs=1e-12)
    assert metrics.majority_class([2, 1, 2, 1]) == 1  # smallest id among ties
    with pytest.raises(ValueError, match="no labels"):
        metrics.majority_class([])


def test_chance_baseline_matches_simulation() -> None:
    rng = random.Random(0)
    labels = [0] * 6000 + [1] * 3000 + [2] * 1000
    pred = [rng.randrange(3) for _ in labels]
    base = metrics.chance_baseline(3, labels)
    assert base.accuracy == pytest.approx(1 / 3, abs=1e-12)
    assert base.macro_f1 == pytest.approx(_naive_f1(pred, labels, [0, 1, 2]), abs=0.01)
    assert metrics.chance_baseline(4).macro_f1 == pytest.approx(0.25, abs=1e-12)
    with pytest.raises(ValueError, match="number of classes"):
        metrics.chance_baseline(0)


def test_label_counts_and_epoch_fraction() -> None:
    assert metrics.label_counts([2, 0, 2, 2]) == {0: 1, 2: 3}
    assert metrics.epoch_fraction(30, 16, 4000) == pytest.approx(0.12, abs=1e-12)
    with pytest.raises(ValueError, match="no examples"):
        metrics.epoch_fraction(1, 1, 0)


def test_binomial_margin_matches_simulated_spread() -> None:
    rng = random.Random(0)
    p, n = 0.66, 1000
    accuracies = [sum(rng.random() < p for _ in range(n)) / n for _ in range(400)]
    mean = sum(accuracies) / len(accuracies)
    std = (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5
    assert metrics.binomial_margin(p, n, z=1.0) == pytest.approx(std, rel=0.15)
    assert metrics.binomial_margin(0.66, 1000) == pytest.approx(2 * (0.66 * 0.34 / 1000) ** 0.5, abs=1e-12)
    with pytest.raises(ValueError, match="at least one example"):
        metrics.binomial_margin(0.5, 0)
