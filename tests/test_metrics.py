"""The lab's metrics against independent oracles: rouge-score's ROUGE-L and naive per-class counts.

ROUGE-L: peftlab's tokens are lower-cased runs of ``\\w`` (unicode letters, digits, ``_``);
rouge-score's (no stemmer) are lower-cased runs of ``[a-z0-9]``. On ASCII text without ``_`` the
two token lists are the same, so there the scores must agree to rounding; where they differ by
design (non-ASCII letters, ``_``) the difference is pinned below.
"""

from __future__ import annotations

import math
import string

import pytest

from peftlab.lab import metrics

hypothesis = pytest.importorskip("hypothesis")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rouge_score import tokenize as rouge_tokenize  # noqa: E402

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = ["the", "The", "CAT", "cat", "sat", "on", "a", "mat", "2024", "x1", "dog's", "run", "ran"]
JOINERS = [" ", "  ", ", ", ". ", "-", "!\n", "\t", " (", ") ", "...", "/"]
ASCII_NO_UNDERSCORE = "".join(c for c in string.printable if c != "_")


@st.composite
def sentences(draw) -> str:
    """ASCII sentences from a small vocabulary (long common subsequences are likely), joined by
    punctuation and whitespace, or any printable ASCII without ``_``."""
    if draw(st.booleans()):
        return draw(st.text(alphabet=ASCII_NO_UNDERSCORE, max_size=40))
    words = draw(st.lists(st.sampled_from(WORDS), max_size=12))
    out = ""
    for w in words:
        out += w + draw(st.sampled_from(JOINERS))
    return out


@settings(max_examples=400, deadline=None)
@given(sentences(), sentences())
def test_rouge_l_equals_rouge_score_on_ascii(candidate, reference):
    assert metrics.word_tokens(candidate) == rouge_tokenize.tokenize(candidate, None)
    expected = SCORER.score(reference, candidate)["rougeL"]  # score(target, prediction)
    assert metrics.rouge_l(candidate, reference) == pytest.approx(expected.fmeasure, rel=1e-12, abs=1e-15)


def test_rouge_l_known_values_from_rouge_score():
    pairs = [("the cat sat on the mat", "the cat was on the mat"), ("a b c d e", "e d c b a"),
             ("The quick brown fox.", "quick fox"), ("", "anything"), ("same words", "same words")]
    for candidate, reference in pairs:
        assert metrics.rouge_l(candidate, reference) == pytest.approx(
            SCORER.score(reference, candidate)["rougeL"].fmeasure, rel=1e-12, abs=1e-15)


def test_rouge_l_where_the_tokenisers_differ_by_design():
    # peftlab keeps non-ASCII letters in words; rouge-score drops them ("café" -> "caf")
    assert metrics.word_tokens("Café naïve") == ["café", "naïve"]
    assert rouge_tokenize.tokenize("Café naïve", None) == ["caf", "na", "ve"]
    assert metrics.rouge_l("café", "cafe") == 0.0 and SCORER.score("cafe", "café")["rougeL"].fmeasure == 0.0
    assert metrics.rouge_l("日本 語", "日本") == pytest.approx(2 * 0.5 * 1 / 1.5)  # rouge-score: no tokens, 0
    assert SCORER.score("日本", "日本 語")["rougeL"].fmeasure == 0.0
    # and "_" joins a word: one token for peftlab, two for rouge-score
    assert metrics.word_tokens("snake_case") == ["snake_case"]
    assert rouge_tokenize.tokenize("snake_case", None) == ["snake", "case"]


# --------------------------------------------------------------------------- classification


def naive_macro_f1(predictions: list[int], references: list[int], labels: list[int] | None = None) -> float:
    """Textbook per-class precision and recall from counts, F1 their harmonic mean (0 where
    both are 0), averaged over the classes present in either list (or ``labels``)."""
    classes = sorted(set(predictions) | set(references)) if labels is None else labels
    f1s = []
    for c in classes:
        tp = fp = fn = 0
        for p, r in zip(predictions, references):
            if p == c and r == c:
                tp += 1
            elif p == c:
                fp += 1
            elif r == c:
                fn += 1
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


def naive_accuracy(predictions: list[int], references: list[int]) -> float:
    right = 0
    for p, r in zip(predictions, references):
        if p == r:
            right += 1
    return right / len(references)


@st.composite
def prediction_pairs(draw) -> tuple[list[int], list[int]]:
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 5))
    labels = st.integers(0, k - 1)
    return draw(st.lists(labels, min_size=n, max_size=n)), draw(st.lists(labels, min_size=n, max_size=n))


@settings(max_examples=400, deadline=None)
@given(prediction_pairs())
def test_macro_f1_and_accuracy_equal_naive_counts(pair):
    predictions, references = pair
    assert metrics.macro_f1(predictions, references) == pytest.approx(naive_macro_f1(predictions, references),
                                                                      rel=1e-12, abs=1e-15)
    assert metrics.accuracy(predictions, references) == pytest.approx(naive_accuracy(predictions, references),
                                                                      rel=1e-12, abs=0)
    every = list(range(6))  # with classes given, absent ones count as 0
    assert metrics.macro_f1(predictions, references, labels=every) == pytest.approx(
        naive_macro_f1(predictions, references, every), rel=1e-12, abs=1e-15)


def test_perplexity_is_exp_of_the_loss():
    for loss in (0.0, 0.5, 2.302585092994046, 699.0):
        assert metrics.perplexity(loss) == pytest.approx(math.exp(loss), rel=1e-15)
    assert metrics.perplexity(701.0) == math.inf and math.isnan(metrics.perplexity(math.nan))
