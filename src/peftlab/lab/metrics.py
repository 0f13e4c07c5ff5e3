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
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

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
