"""Task metrics, implemented here so the lab needs no scikit-learn or rouge package.

* :func:`accuracy` and :func:`macro_f1` for classification (``macro_f1`` follows scikit-learn's
  ``f1_score(average="macro")``: the unweighted mean of per-class F1 over the classes that occur
  in the references or the predictions, unless the classes are given).
* :func:`rouge_l` for generated text: ROUGE-L F1 (Lin, 2004) from the longest common
  subsequence of lower-cased word tokens (:func:`word_tokens`). It equals the ``rouge_score``
  package's ``rougeL`` F-measure (no stemmer) on ASCII text without ``_``; elsewhere the tokens
  differ by design: ``rouge_score`` keeps only ``[a-z0-9]`` (``"café"`` -> ``"caf"``, Japanese
  text -> no tokens), peftlab keeps every unicode letter and digit and ``_``
  (``tests/test_metrics.py`` checks both).
* :func:`perplexity`: ``exp(loss)`` that saturates to ``inf`` instead of overflowing.
* Baselines, the scores of predictors that use no input: :func:`majority_baseline`,
  :func:`chance_baseline`, with :func:`label_counts` and :func:`epoch_fraction` (the budget
  as a fraction of an epoch) for reports.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"\w+", re.UNICODE)


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to their reference.

    Args:
        predictions: Predicted class ids.
        references: True class ids, same length.

    Returns:
        A value in [0, 1].

    Raises:
        ValueError: The sequences differ in length or are empty.
    """
    _check_pair(predictions, references)
    return sum(int(p == r) for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: Sequence[int], references: Sequence[int], labels: Sequence[int] | None = None) -> float:
    """Unweighted mean of the per-class F1 scores.

    Args:
        predictions: Predicted class ids.
        references: True class ids, same length.
        labels: The classes to average over; by default those occurring in ``references`` or
            ``predictions`` (scikit-learn's default). A class with no true and no predicted
            example scores 0.

    Returns:
        A value in [0, 1].

    Raises:
        ValueError: The sequences differ in length or are empty.
    """
    _check_pair(predictions, references)
    classes = sorted(set(references) | set(predictions)) if labels is None else list(labels)
    scores = []
    for c in classes:
        tp = sum(1 for p, r in zip(predictions, references) if p == c and r == c)
        fp = sum(1 for p, r in zip(predictions, references) if p == c and r != c)
        fn = sum(1 for p, r in zip(predictions, references) if p != c and r == c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and ``_``; punctuation is dropped)."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of a generated text against one reference.

    Both texts are split with :func:`word_tokens`. Precision is ``LCS / len(candidate)``,
    recall ``LCS / len(reference)``, and the score their harmonic mean. A text without word
    tokens on either side scores 0 (the ``rouge_score`` package's convention).

    Args:
        candidate: The generated text.
        reference: The expected text.

    Returns:
        A value in [0, 1].
    """
    cand, ref = word_tokens(candidate), word_tokens(reference)
    if not cand or not ref:
        return 0.0
    common = lcs_length(cand, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy (natural log); ``inf`` when it overflows."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf


def _check_pair(predictions: Sequence[int], references: Sequence[int]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; "
                         "pass one prediction per reference")
    if not references:
        raise ValueError("no examples to score; pass at least one prediction and reference")


# --- Baselines -------------------------------------------------------------------------------
# A score means little without the score of a model that learned nothing. Two references:
# * the majority-class baseline: always predict the most frequent class. On an imbalanced split
#   (66% of rows in one class) it scores 0.66 accuracy with no learning at all; a fine-tuned
#   model that does not beat it has learned only the label prior, if that.
# * the chance baseline: predict a class uniformly at random. Its expected accuracy is 1/k
#   whatever the class balance.


@dataclass(frozen=True)
class Baseline:
    """The scores of a predictor that uses no input.

    Attributes:
        name: ``"majority"`` or ``"chance"``.
        accuracy: Its accuracy (exact for majority, expected value for chance).
        macro_f1: Its macro-F1 (exact for majority; for chance the expected-count value below).
        predicted_class: The class the majority predictor always answers (``None`` for chance).
    """

    name: str
    accuracy: float
    macro_f1: float
    predicted_class: int | None = None


def label_counts(labels: Sequence[int]) -> dict[int, int]:
    """How many examples carry each class id, sorted by class id."""
    return dict(sorted(Counter(labels).items()))


def majority_class(labels: Sequence[int]) -> int:
    """The most frequent class id (the smallest id among ties, so the answer is deterministic)."""
    if not labels:
        raise ValueError("no labels to count; pass at least one label")
    counts = Counter(labels)
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def majority_baseline(labels: Sequence[int], train_labels: Sequence[int] | None = None,
                      num_classes: int | None = None) -> Baseline:
    """Scores of always predicting one class on the split whose true labels are ``labels``.

    By default the class is the most frequent one *in ``labels``*: the best any constant
    predictor can do on that split, hence the strictest "learned nothing" bar. Pass
    ``train_labels`` to predict the training split's majority class instead (what a model that
    learned only the training prior would answer).

    Macro-F1 averages over the classes in ``range(num_classes)`` when given (a constant predictor
    scores 0 on every class but its own), else over the classes occurring in ``labels`` or the
    prediction, as :func:`macro_f1` does. With k classes and majority share p the value is
    ``(2p / (1 + p)) / k``; for two classes at 66% that is 0.398.

    Args:
        labels: True class ids of the split being scored.
        train_labels: Optional training labels whose majority class is predicted.
        num_classes: Optional number of classes of the task.

    Returns:
        A :class:`Baseline` named ``"majority"``.
    """
    cls = majority_class(train_labels if train_labels is not None else labels)
    predictions = [cls] * len(labels)
    classes = list(range(num_classes)) if num_classes is not None else None
    return Baseline("majority", accuracy(predictions, labels), macro_f1(predictions, labels, classes), cls)


def chance_baseline(num_classes: int, labels: Sequence[int] | None = None) -> Baseline:
    """Expected scores of predicting one of ``num_classes`` classes uniformly at random.

    Accuracy is exactly ``1 / k`` in expectation, whatever the class balance. For macro-F1 the
    expected counts are used: a class of share ``p`` gets ``TP = n p / k``, ``FP = n (1 - p) / k``,
    ``FN = n p (k - 1) / k``, so its F1 is ``2 p / (1 + k p)`` (``1 / k`` when balanced); the
    baseline is the mean over the k classes, with shares from ``labels`` (balanced when
    ``labels`` is not given).

    Args:
        num_classes: k, the number of classes (at least 1).
        labels: Optional true class ids giving the class shares.

    Returns:
        A :class:`Baseline` named ``"chance"``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes is {num_classes}; pass the number of classes (at least 1)")
    k = num_classes
    if labels:
        counts = Counter(labels)
        shares = [counts.get(c, 0) / len(labels) for c in range(k)]
    else:
        shares = [1.0 / k] * k
    f1 = sum(2 * p / (1 + k * p) for p in shares) / k
    return Baseline("chance", 1.0 / k, f1, None)


def epoch_fraction(steps: int, examples_per_step: int, num_train: int) -> float:
    """The training budget as a fraction of one pass over the training split.

    ``steps * examples_per_step / num_train``, where ``examples_per_step`` is the batch size
    times the gradient-accumulation steps (times the data-parallel ranks). 30 steps of 16 on
    4,000 rows is 0.12 of an epoch: most rows were never seen once.
    """
    if num_train <= 0:
        raise ValueError(f"num_train is {num_train}; the training split has no examples")
    return steps * examples_per_step / num_train


def binomial_margin(p: float, n: int, z: float = 2.0) -> float:
    """``z`` standard errors of an accuracy ``p`` measured on ``n`` examples: ``z sqrt(p (1 - p) / n)``.

    An accuracy within this margin of a baseline's is not distinguishable from it (z = 2: about
    a 2.5 % one-sided level). 0.66 on 1,000 examples: +-0.030.
    """
    if n <= 0:
        raise ValueError(f"n is {n}; a margin needs at least one example")
    return z * math.sqrt(max(p * (1.0 - p), 0.0) / n)
