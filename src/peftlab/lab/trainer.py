"""A small, exact trainer for one model, one task and one PEFT method (or full fine-tuning).

What it does, in order, for each optimizer step:

1. ``grad_accum`` micro-batches of ``batch_size`` examples, drawn from a seeded permutation of
   the training examples per epoch (a batch may run on into the next epoch, so every batch is
   full); forward under autocast (``bf16``/``fp16`` on CUDA, ``bf16`` on CPU), loss divided by
   ``grad_accum``, backward. A loss that is NaN or inf stops the run before any parameter
   changes (:class:`TrainingDiverged`).
   Before the first micro-batch, every active adapter's ``Method.begin_step`` hook runs with
   the step number and the seed (DyLoRA samples its rank there); each adapter's
   ``Method.extra_loss`` (a regulariser, e.g. AdaLoRA's) is added to every micro-batch's loss.
2. Gradient clipping to ``max_grad_norm``, then the optimizer step: AdamW with weight decay on
   every trainable tensor but biases and norm weights (or the optimizer an attached method
   offers through ``make_optimizer(model, lr=, weight_decay=, grad_accum=)``, e.g. GaLore,
   which refuses settings it cannot follow), and the learning-rate schedule: linear warm-up over
   ``warmup_ratio`` of the steps, then cosine or linear decay to zero, or constant. After the
   step, before the gradients are cleared, every active adapter's ``Method.end_step`` runs
   (AdaLoRA's importance scores and rank allocation).
3. Every ``eval_every`` steps and at the end: ``task.evaluate`` on the validation examples
   (validation loss and the task's metrics, next to the mean training loss since the previous
   evaluation). Training loss falling while validation loss rises above its best is flagged
   as overfitting. Evaluation never changes the random state, so it never changes training.
4. Every ``save_every`` steps and at the end: a checkpoint under
   ``run_dir/checkpoints/step-<N>/`` (trainable tensors as safetensors, optimizer, scheduler
   and grad-scaler state, the RNG states of torch, Python and NumPy, the data position and the
   history, each file's size and sha256, and the fingerprint of the training data), built aside
   and swapped in whole (:func:`peftlab.core.files.replace_folder`), so a crash never leaves a
   half checkpoint; the newest two are kept. ``resume=True`` continues from the newest intact
   one (a damaged newer one is skipped with a warning), refuses data that changed since, and on
   CPU ends with bit-identical parameters and the same loss history as an uninterrupted run.
5. The run directory is locked for the whole run (:func:`run_lock`): a second writer fails at once.

Example:
    >>> from peftlab import models
    >>> from peftlab.lab.tasks import get_task
    >>> from peftlab.lab.trainer import TrainConfig, train
    >>> model, tok = models.load("minilm", num_labels=3)
    >>> peftlab.attach(model, "lora", r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    >>> result = train(model, tok, get_task("tweets"), TrainConfig(steps=100, lr=1e-3), run_dir="runs/x")
    >>> result.final["accuracy"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.core import files
from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.lab import distributed
from peftlab.lab.distributed import STRATEGIES, Dist

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "checkpoints", "data_fingerprint", "hold_run_dir", "intact",
           "latest_checkpoint", "run_lock", "subset", "train"]

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
KEEP_CHECKPOINTS = 2
OVERFIT_TOLERANCE = 0.01
"""Validation loss must exceed its best by this fraction (1 %) to count as rising."""

CHECKPOINT_DIR = "checkpoints"
PARAMS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
_FORMAT = 2
"""2: the state file lists every other file's size and sha256, and the data fingerprint."""
_READS = (1, 2)
LOCK_FILE = ".peftlab-lock"
"""The run directory's lock file (``flock``, held by the one process that writes the run)."""

# Settings that define the stream of training batches: a checkpoint only resumes under the same ones.
_DATA_FIELDS = ("seed", "batch_size", "grad_accum", "train_examples")
# Settings that change the trajectory but may be changed on resume (with a warning).
_SOFT_FIELDS = ("lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm", "max_length", "precision")


@dataclass
class TrainConfig:
    """How to train. Every field has a working default.

    Attributes:
        steps: Optimizer steps in total (a resumed run continues up to this step).
        batch_size: Examples per micro-batch over all processes (also the evaluation batch
            size). It is global: under ``torchrun`` with N processes each rank takes its
            ``batch_size / N`` examples of every micro-batch, so a run trains on the same
            batches whatever N is (``batch_size`` must be a multiple of N).
        grad_accum: Micro-batches per optimizer step (effective batch: ``batch_size * grad_accum``).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        warmup_ratio: Fraction of ``steps`` of linear warm-up (rounded up to whole steps).
        schedule: ``"cosine"`` or ``"linear"`` decay to zero after warm-up, or ``"constant"``.
        max_grad_norm: Clip the global gradient norm to this; 0 disables clipping.
        eval_every: Evaluate every this many steps (and always at the end); 0: only at the end.
        eval_examples: Validation examples per evaluation (a fixed subset, the same for every
            seed and method); ``None``: all.
        save_every: Checkpoint every this many steps and at the end (needs ``run_dir``); 0: never.
        max_length: Maximum tokens per sequence.
        seed: Seeds the data order, the training subset, dropout and the global RNGs.
        precision: ``"fp32"``, or autocast in ``"bf16"`` (CUDA or CPU) or ``"fp16"`` (CUDA only,
            with gradient scaling).
        gradient_checkpointing: Recompute activations in the backward pass (less memory, slower).
        train_examples: Use a seeded subset of this many training examples; ``None``: all.
        progress: Show a progress bar (loss, tokens/s) and the evaluation lines (rank 0 only).
        strategy: How the model is wrapped when several processes run (``torchrun``):
            ``"ddp"`` (DistributedDataParallel) or ``"fsdp"`` (FSDP2 ``fully_shard``). Ignored
            in a single process.
    """

    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_examples: int | None = 500
    save_every: int = 0
    max_length: int = 128
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    train_examples: int | None = None
    progress: bool = True
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; the error names the field and what it accepts.

        Raises:
            ConfigError: A field is out of range.
        """
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"TrainConfig: {what}")

        for name in ("steps", "batch_size", "grad_accum"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "save_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0 (0 turns it off), got {getattr(self, name)!r}")
        for name in ("eval_examples", "train_examples"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1),
                 f"{name} must be None (all) or an integer >= 1, got {value!r}")
        need(isinstance(self.max_length, int) and self.max_length >= 2,
             f"max_length must be an integer >= 2, got {self.max_length!r}")
        need(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a checkpoint's); unknown keys are an error naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


@dataclass
class TrainResult:
    """What a training run measured.

    Attributes:
        steps: Optimizer steps done (including those before a resume).
        seconds: Training time (forward, backward, optimizer), without evaluation and checkpoints.
        tokens: Non-padding input tokens seen in training.
        tokens_per_second: ``tokens / seconds``.
        seconds_per_step: ``seconds / steps``.
        history: One dict per optimizer step: ``step``, ``loss`` (mean over its micro-batches),
            ``lr`` (used by that step), ``tokens`` and ``seconds`` (of that step alone).
        evals: One dict per evaluation: ``step``, ``train_loss`` (mean since the previous
            evaluation), the ``task.evaluate`` keys prefixed ``val_`` and ``overfitting``.
        final: ``task.evaluate`` on the validation examples at the end (unprefixed keys).
        overfitting: Training loss fell while validation loss rose above its best (see
            :data:`OVERFIT_TOLERANCE`) between the best evaluation and the last one.
    """

    steps: int
    seconds: float
    tokens: int
    tokens_per_second: float
    seconds_per_step: float
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    overfitting: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingDiverged(PeftlabError):
    """The loss (or the gradient norm) became NaN or infinite; training stopped before the
    optimizer step, and the checkpoints on disk are untouched.

    Attributes:
        step: The optimizer step that failed (1-based).
        loss: The offending value.
        checkpoint: The newest (good) checkpoint folder, or ``None`` when none was written.
    """

    def __init__(self, message: str, *, step: int, loss: float, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- helpers


def _derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (independent streams per purpose)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).hexdigest()
    return int(digest[:15], 16)


def subset(examples: list, k: int | None, seed: int) -> list:
    """``k`` examples chosen by ``seed``, in their original order (all when ``k`` is None).

    The built-in splits are sorted by text, so their first ``k`` examples are not a fair
    sample; this is. :func:`train` evaluates on ``subset(validation, eval_examples, 0)``
    (seed 0 whatever the run's seed, so every run is scored on the same examples).
    """
    if k is None or k >= len(examples):
        return list(examples)
    g = torch.Generator().manual_seed(_derived_seed(seed, "subset"))
    chosen = sorted(torch.randperm(len(examples), generator=g)[:k].tolist())
    return [examples[i] for i in chosen]


class _DataOrder:
    """A seeded permutation of ``range(n)`` per epoch, read in batches that may cross epochs.

    ``(epoch, position)`` is the whole state: a checkpoint stores it, and a new instance at the
    same state yields the same indices.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(_derived_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            chunk = self._order[self.position:self.position + k - len(out)]
            out += chunk
            self.position += len(chunk)
        return out


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor of optimizer step ``s`` (0-based): linear warm-up from
    ``1 / (W + 1)`` to 1 over ``W`` steps, then the decay."""
    warmup = math.ceil(config.warmup_ratio * config.steps)
    total, kind = config.steps, config.schedule

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm weights (and any other vector) train without weight decay."""
    return param.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def _make_optimizer(model: nn.Module, named: dict[str, nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer an attached method offers (``make_optimizer``), else AdamW."""
    from peftlab.api import adapters

    offered = {n: m.make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                   grad_accum=config.grad_accum) for n, m in adapters(model).items()}
    offered = {n: o for n, o in offered.items() if o is not None}
    if len(offered) > 1:
        raise ConfigError(f"adapters {sorted(offered)} each bring their own optimizer; train one of them "
                          "at a time (detach or freeze the others)")
    for name, optimizer in offered.items():
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"adapter {name!r}.make_optimizer returned {type(optimizer).__name__}, "
                              "not a torch.optim.Optimizer")
        return optimizer
    decay = [p for n, p in named.items() if not _no_decay(n, p)]
    no_decay = [p for n, p in named.items() if _no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr)


def _begin_step(model: nn.Module, step: int, seed: int) -> None:
    """Tell every active adapter that optimizer step ``step`` (0-based) begins (``Method.begin_step``)."""
    from peftlab.api import active, adapters

    for name, method in adapters(model).items():
        if name in active(model):
            method.begin_step(model, name, step, seed)


def _end_step(model: nn.Module, step: int, seed: int) -> None:
    """Tell every active adapter that optimizer step ``step`` (0-based) ended (``Method.end_step``)."""
    from peftlab.api import active, adapters

    for name, method in adapters(model).items():
        if name in active(model):
            method.end_step(model, name, step, seed)


def _extra_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of every active adapter's ``Method.extra_loss`` (None when none adds one)."""
    from peftlab.api import active, adapters

    terms = [t for name, method in adapters(model).items() if name in active(model)
             for t in [method.extra_loss(model, name)] if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision 'fp16' needs a CUDA model (this one is on {device.type}); "
                          "use 'bf16' or 'fp32'")
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU has no bf16 support; use precision 'fp16' or 'fp32'")
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"precision 'bf16' works on CUDA or CPU, not {device.type}; use 'fp32'")


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _gradient_checkpointing(model: nn.Module, on: bool) -> Iterator[None]:
    """Turn on activation checkpointing for the block (non-reentrant), and input gradients
    when the input embeddings are frozen; both are turned off again afterwards."""
    if not on:
        yield
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} has no gradient checkpointing; "
                          "set gradient_checkpointing=False")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs_hooked = False
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
        model.enable_input_require_grads()
        inputs_hooked = True
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()
        if inputs_hooked:
            model.disable_input_require_grads()


# --------------------------------------------------------------------------- RNG state


def _rng_state(device: torch.device) -> dict[str, Any]:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class _State:
    """Everything besides tensors that a checkpoint must carry to resume exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    since_eval: list[float] = field(default_factory=list)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``run_dir/checkpoints``, oldest first (complete: their
    state file, written last, is there; :func:`intact` checks the rest)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("step-") and name[5:].isdigit() and (path / STATE_FILE).is_file():
            found.append((int(name[5:]), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint under ``run_dir`` (see :func:`intact`), or ``None``."""
    for path in reversed(checkpoints(run_dir)):
        if intact(path) is None:
            return path
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_record(path: Path) -> dict[str, Any]:
    """The checkpoint's state file (a ConfigError naming the problem if it is unreadable)."""
    file = path / STATE_FILE
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{file} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{file} holds a JSON {type(record).__name__}, not an object")
    if record.get("format") not in _READS:
        raise ConfigError(f"checkpoint {path} has format {record.get('format')!r}, this peftlab reads "
                          f"{', '.join(map(str, _READS))}; start a new run_dir")
    return record


def intact(path: Path) -> str | None:
    """What is wrong with the checkpoint folder ``path`` (None: nothing). Its state file must
    parse, and every other file must have the size and sha256 the state file records."""
    try:
        record = _read_record(path)
    except ConfigError as e:
        return str(e)
    listed = record.get("files")
    if record["format"] == 1:  # written before checksums: the files must at least be there
        listed = {name: None for name in (PARAMS_FILE, OPTIMIZER_FILE, RNG_FILE)}
    if not isinstance(listed, dict) or set(listed) != {PARAMS_FILE, OPTIMIZER_FILE, RNG_FILE}:
        return f"{path / STATE_FILE} does not list the checkpoint's files"
    for name, want in listed.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError as e:
            return f"{file} is missing ({e.strerror})"
        if want is None:
            continue
        if not isinstance(want, dict) or size != want.get("size"):
            return f"{file} has {size:,} bytes, the state file records {want.get('size') if isinstance(want, dict) else want!r}"
        if _sha256(file) != want.get("sha256"):
            return f"{file} does not match the sha256 its state file records (damaged)"
    return None


def _resume_point(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are named in a warning. Checkpoints
    that are all damaged are an error (never a silent fresh start)."""
    damaged = []
    for path in reversed(checkpoints(run_dir)):
        problem = intact(path)
        if problem is None:
            if damaged:
                warnings.warn(f"skipping damaged checkpoint(s): {'; '.join(damaged)}. Resuming from {path}, the newest "
                              "intact one", stacklevel=4)
            return path
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise ConfigError(f"no intact checkpoint in {run_dir / CHECKPOINT_DIR} ({'; '.join(damaged)}); start a new "
                          "run_dir (or start over in this one: peftlab train --overwrite)")
    return None


def data_fingerprint(task: Any) -> dict[str, Any]:
    """What identifies the training data of ``task``: its name, kind, number of training
    examples and the sha256 of their contents (a resumed run must train on the same data)."""
    examples = task.examples("train")
    h = hashlib.sha256()
    for e in examples:
        h.update(repr(e).encode() + b"\n")
    return {"task": task.name, "kind": task.kind, "examples": len(examples), "sha256": h.hexdigest()}


def _check_data(record: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    before = record.get("data")
    if before is None:
        warnings.warn(f"checkpoint {path} records no data fingerprint (an older peftlab wrote it): resuming without "
                      "checking that the training data is the same", stacklevel=4)
        return
    changed = [k for k in now if before.get(k) != now[k]]
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume from {path}: the training data changed since it was written ({details}); "
                          "resume with the data the run started with, or start a new run_dir")


def _clean_leftovers(run_dir: Path) -> None:
    """Remove what a killed writer left in ``run_dir/checkpoints`` (the run's lock is held, so
    no writer is alive): temporary and stale folders, which :func:`checkpoints` never lists."""
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _save_checkpoint(run_dir: Path, named: dict[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any,
                     state: _State, config: TrainConfig, device: torch.device, dist: Dist = Dist(),
                     data: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-<N>`` atomically and keep the newest two.

    In a distributed job every rank takes part (whole tensors are gathered from FSDP shards,
    and every rank's RNG state is kept), and rank 0 alone writes.
    """
    tensors = {n: distributed.full_tensor(p.detach()).to("cpu", copy=True).contiguous() for n, p in named.items()}
    optim = distributed.optimizer_state(optimizer)
    rng = _rng_state(device)
    if dist.active:
        rng = {**rng, "ranks": dist.gather(rng)}
    target = Path(run_dir) / CHECKPOINT_DIR / f"step-{state.step}"
    error: BaseException | None = None
    if dist.is_main:
        try:
            _write_checkpoint(Path(run_dir), tensors, optim, scheduler, scaler, rng, state, config, dist, data)
        except BaseException as e:  # the other ranks must hear of it, or they would wait forever
            error = e
    if dist.any(error is not None):
        if error is not None:
            raise error
        raise PeftlabError(f"rank 0 could not write checkpoint {target}; see its error")
    return target


def _write_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], optim: dict[str, Any],
                      scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any, rng: dict[str, Any],
                      state: _State, config: TrainConfig, dist: Dist, data: dict[str, Any] | None = None) -> Path:
    """The checkpoint folder is built aside and swapped in whole (``files.replace_folder``); its
    state file, written last, records each other file's size and sha256."""
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{state.step}"
    try:
        with files.replace_folder(target, f"checkpoint step {state.step}") as tmp:
            save_file(tensors, str(tmp / PARAMS_FILE))
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None}, tmp / OPTIMIZER_FILE)
            torch.save(rng, tmp / RNG_FILE)
            listed = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                      for name in (PARAMS_FILE, OPTIMIZER_FILE, RNG_FILE)}
            record = {"format": _FORMAT, "config": config.to_dict(), "world_size": dist.world, "files": listed,
                      "data": data, **dataclasses.asdict(state)}
            files.write_bytes(tmp / STATE_FILE, (json.dumps(record, indent=1) + "\n").encode())
    except PeftlabError as e:
        raise PeftlabError(f"{e} The previous checkpoints are intact.") from e
    for old in checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_checkpoint(path: Path, record: dict[str, Any], named: dict[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any,
                     device: torch.device, dist: Dist = Dist()) -> _State:
    """Restore tensors, optimizer, scheduler, scaler and RNG from ``path`` (whose state file is
    ``record``, already checked against this run); return the training state."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / PARAMS_FILE))
    missing = sorted(set(named) - set(tensors))
    unexpected = sorted(set(tensors) - set(named))
    wrong = sorted(n for n in set(named) & set(tensors) if tensors[n].shape != named[n].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"checkpoint {path} does not fit the model's trainable tensors (missing: {missing[:5]}, "
                          f"unexpected: {unexpected[:5]}, wrong shape: {wrong[:5]}); resume with the same model "
                          "and method, or start a new run_dir")
    saved = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location=device)
    rng = torch.load(path / RNG_FILE, weights_only=True)
    for n, p in named.items():
        distributed.copy_full(p, tensors[n])
    distributed.load_optimizer_state(optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    _set_rng_state(rng["ranks"][dist.rank] if dist.active else rng, device)
    fields = {f.name for f in dataclasses.fields(_State)}
    return _State(**{k: v for k, v in record.items() if k in fields})


def _check_world(record: dict[str, Any], path: Path, dist: Dist) -> None:
    written_by = int(record.get("world_size", 1))
    if written_by != dist.world:
        raise ConfigError(f"checkpoint {path} was written by a job of {written_by} process(es), this job has "
                          f"{dist.world}: each process's random state (dropout) is kept per rank, so resume with "
                          f"{written_by} process(es) in total (torchrun --nnodes x --nproc_per_node = {written_by})"
                          " or start a new run_dir")


def _reconcile(old: TrainConfig, new: TrainConfig, path: Path) -> list[str]:
    """Fields that differ between a checkpoint's config and this run's: an error for those that
    define the data stream, the names of the others that change the trajectory."""
    hard = [f for f in _DATA_FIELDS if getattr(old, f) != getattr(new, f)]
    if hard:
        diff = ", ".join(f"{f}: {getattr(old, f)!r} -> {getattr(new, f)!r}" for f in hard)
        raise ConfigError(f"cannot resume from {path}: {diff} changes the order of the training data; "
                          "resume with the checkpoint's values or start a new run_dir")
    soft = [f for f in _SOFT_FIELDS if getattr(old, f) != getattr(new, f)]
    schedule_moves = new.schedule != "constant" or new.warmup_ratio > 0
    if old.steps != new.steps and schedule_moves:
        soft.append("steps")
    return soft


# --------------------------------------------------------------------------- evaluation


def _overfitting(evals: list[dict]) -> bool:
    """Whether, from the evaluation with the lowest validation loss to the last one, training
    loss fell while validation loss rose by more than :data:`OVERFIT_TOLERANCE`."""
    usable = [e for e in evals
              if math.isfinite(e.get("val_loss", math.nan)) and math.isfinite(e.get("train_loss", math.nan))]
    if len(usable) < 2:
        return False
    best = min(usable, key=lambda e: e["val_loss"])
    last = usable[-1]
    return (last is not best and last["val_loss"] > best["val_loss"] * (1 + OVERFIT_TOLERANCE)
            and last["train_loss"] < best["train_loss"])


def _describe(record: dict, steps: int) -> str:
    scores = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "overfitting"))
    return f"step {record['step']}/{steps}: {scores}"


def _overfit_line(evals: list[dict]) -> str:
    usable = [e for e in evals if math.isfinite(e.get("val_loss", math.nan))]
    best, last = min(usable, key=lambda e: e["val_loss"]), evals[-1]
    return (f"overfitting: validation loss {last['val_loss']:.4f} is above its best {best['val_loss']:.4f} "
            f"(step {best['step']}) while training loss fell {best['train_loss']:.4f} -> {last['train_loss']:.4f}; "
            "consider fewer steps, a lower lr, more data or more weight decay")


# --------------------------------------------------------------------------- the run directory's lock

_HELD: dict[str, list[Any]] = {}  # realpath -> [FileLock, depth]: this process's locks (re-entrant)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock (``flock`` on ``run_dir/.peftlab-lock``, created with the folder)
    for the block. Re-entrant within a process; a second process fails at once. The kernel
    drops the lock when its holder dies, so a killed run never leaves the folder locked.

    Raises:
        ConfigError: Another process holds the lock.
    """
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    held = _HELD.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    lock = files.FileLock(path / LOCK_FILE)
    if not lock.acquire():
        raise ConfigError(f"run directory {path} is in use by another peftlab process (pid {lock.holder()}); "
                          "wait for it to finish, or pass another run_dir")
    _HELD[key] = [lock, 1]
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


@contextlib.contextmanager
def hold_run_dir(run_dir: Path | None, dist: Dist) -> Iterator[None]:
    """:func:`run_lock` on rank 0 (the one writer of a distributed job); every rank fails
    together when rank 0 cannot take it. Nothing happens without a ``run_dir``."""
    if run_dir is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        error: ConfigError | None = None
        if dist.is_main:
            try:
                stack.enter_context(run_lock(run_dir))
            except ConfigError as e:
                error = e
        if dist.any(error is not None):
            raise error or ConfigError(f"rank 0 could not lock the run directory {run_dir}; see its error")
        yield


# --------------------------------------------------------------------------- training


def _diverged(problem: str, value: float, step: int, config: TrainConfig, run_dir: Path | None,
              lr: float) -> TrainingDiverged:
    """The error for step ``step`` (1-based), naming the last good checkpoint and what to try."""
    checkpoint = latest_checkpoint(run_dir) if run_dir is not None else None
    if checkpoint is not None:
        where = (f"The last good checkpoint, {checkpoint}, is intact: resume from it (resume=True, --resume) "
                 "after changing the settings.")
    elif config.save_every:
        where = f"No checkpoint had been written yet (save_every={config.save_every})."
    else:
        where = "No checkpoint was written (set save_every to keep some)."
    tips = [f"a lower learning rate (lr={config.lr:g}, this step used {lr:g})",
            f"a longer warm-up (warmup_ratio={config.warmup_ratio:g})"]
    tips.append(f"stronger gradient clipping (max_grad_norm={config.max_grad_norm:g})" if config.max_grad_norm
                else "gradient clipping (max_grad_norm=1.0)")
    if config.precision == "fp16":
        tips.append("precision bf16 or fp32 instead of fp16")
    message = (f"training diverged at step {step} of {config.steps}: {problem}. {where} "
               f"Try {', '.join(tips[:-1])} or {tips[-1]}.")
    return TrainingDiverged(message, step=step, loss=value, checkpoint=checkpoint)


def train(model: nn.Module, tokenizer: Any, task: Any, config: TrainConfig, *, run_dir: str | Path | None = None,
          resume: bool = False) -> TrainResult:
    """Fine-tune ``model`` on ``task`` in place: every parameter with ``requires_grad`` trains.

    Args:
        model: A model from :func:`peftlab.models.load` (or any transformers model whose forward
            takes ``input_ids``, ``attention_mask`` and ``labels`` and returns ``.loss``), with
            an adapter attached or not (full fine-tuning).
        tokenizer: Its tokenizer.
        task: A :class:`peftlab.lab.tasks.Task`.
        config: The settings.
        run_dir: Folder for checkpoints (``run_dir/checkpoints/step-<N>``); needed for
            ``save_every`` and ``resume``.
        resume: Continue from the newest intact checkpoint in ``run_dir`` (from scratch when
            there is none; an error when every one is damaged). The data-order settings (seed,
            batch_size, grad_accum, train_examples) and the training data itself (its
            fingerprint: task, number of examples, sha256) must match; other changes apply
            from the resumed step on, with a warning.

    Distributed: when ``torch.distributed`` is initialised (``torchrun``; see
    :mod:`peftlab.lab.distributed`) every rank calls this with the same arguments. The model is
    wrapped per ``config.strategy`` (DDP, or sharded in place with FSDP2 and left sharded:
    save it inside :func:`peftlab.lab.distributed.full_parameters`), each rank trains on its
    slice of every global micro-batch, the history holds the global loss and tokens, all ranks
    stop together on a NaN, and rank 0 alone writes checkpoints and shows progress.

    Returns:
        The :class:`TrainResult`; the model is left trained, in the train/eval mode it came in.

    Raises:
        TrainingDiverged: The loss or gradient norm became NaN/inf.
        ConfigError: Bad settings, nothing to train, a checkpoint that does not fit, or a
            ``run_dir`` that another process is training into.
    """
    config.validate()
    dist = distributed.current()
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is None and (config.save_every or resume):
        raise ConfigError("save_every and resume need a run_dir to keep checkpoints in; pass run_dir=...")
    with hold_run_dir(run_path, dist):
        return _train(model, tokenizer, task, config, run_path, resume, dist)


def _train(model: nn.Module, tokenizer: Any, task: Any, config: TrainConfig, run_path: Path | None, resume: bool,
           dist: Dist) -> TrainResult:
    if config.batch_size % dist.world:
        raise ConfigError(f"batch_size {config.batch_size} is the global micro-batch and must be a multiple of the "
                          f"{dist.world} processes; use batch_size {dist.world * max(1, config.batch_size // dist.world)}"
                          " or another number of processes")
    device = _device(model)
    _check_precision(config.precision, device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing to train: every parameter of the model is frozen; attach a method "
                          "(peftlab.attach) or unfreeze the model for full fine-tuning")
    runner = distributed.wrap(model, config.strategy, dist) if dist.active else model
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}  # FSDP2: the shards
    # Rank 0 keeps the run's seed (one process trains as before); the other ranks get their own
    # streams for dropout. Parameters are equal on every rank (DDP broadcasts rank 0's).
    _seed_everything(config.seed if dist.rank == 0 else _derived_seed(config.seed, "rank", dist.rank) % 2**63)
    train_set = subset(task.examples("train"), config.train_examples, config.seed)
    if not train_set:
        raise ConfigError(f"task {task.name!r} has no training examples")
    val_set = subset(task.examples("validation"), config.eval_examples, 0)

    optimizer = _make_optimizer(model, named, config)
    factor = _schedule(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    state = _State()
    data = data_fingerprint(task)
    if run_path is not None and dist.is_main:
        _clean_leftovers(run_path)
    start = _resume_point(run_path) if resume and run_path is not None else None
    if start is not None:  # every check before anything is restored
        record = _read_record(start)
        _check_world(record, start, dist)
        old = TrainConfig.from_dict(record["config"])
        changed = _reconcile(old, config, start)
        _check_data(record, data, start)
        state = _load_checkpoint(start, record, named, optimizer, scheduler, scaler, device, dist)
        if changed:
            warnings.warn(f"resuming from {start} with changed {', '.join(changed)}: training goes on from step "
                          f"{state.step} with the new values, so it is not identical to an uninterrupted run",
                          stacklevel=3)
            if old.lr != config.lr:
                scheduler.base_lrs = [b * config.lr / old.lr for b in scheduler.base_lrs]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["initial_lr"] = base
                group["lr"] = base * factor(state.step)
                if group.get("weight_decay"):
                    group["weight_decay"] = config.weight_decay
    elif resume and config.progress and dist.is_main:
        print(f"peftlab: no checkpoint in {run_path}; starting from step 0", file=sys.stderr)
    order = _DataOrder(len(train_set), config.seed, state.epoch, state.position)
    params = list(named.values())
    clip = config.max_grad_norm if config.max_grad_norm > 0 else math.inf

    from tqdm.auto import tqdm

    was_training = model.training
    show = config.progress and dist.is_main
    share = config.batch_size // dist.world  # this rank's examples of every micro-batch
    bar = tqdm(total=config.steps, initial=state.step, disable=not show, desc=f"{task.name}",
               unit="step", dynamic_ncols=True)

    def evaluate_now() -> None:
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _autocast(config.precision, device):
            scores = task.evaluate(model, tokenizer, val_set, batch_size=config.batch_size,
                                   max_length=config.max_length)
        model.train()
        train_loss = sum(state.since_eval) / len(state.since_eval) if state.since_eval else math.nan
        record = {"step": state.step, "train_loss": train_loss, **{f"val_{k}": float(v) for k, v in scores.items()}}
        state.evals.append(record)
        record["overfitting"] = _overfitting(state.evals)
        state.since_eval = []
        if show:
            bar.write(_describe(record, config.steps))
            if record["overfitting"]:
                bar.write(_overfit_line(state.evals))

    try:
        model.train()
        with _gradient_checkpointing(model, config.gradient_checkpointing):
            while state.step < config.steps:
                began = time.perf_counter()
                step_loss, step_tokens = 0.0, 0
                lr = float(optimizer.param_groups[0]["lr"])
                _begin_step(model, state.step, config.seed)
                for micro in range(config.grad_accum):
                    indices = order.take(config.batch_size)[dist.rank * share:(dist.rank + 1) * share]
                    batch = task.collate(tokenizer, [train_set[i] for i in indices], config.max_length)
                    step_tokens += int(batch["attention_mask"].sum())
                    batch = {k: v.to(device) for k, v in batch.items()}
                    # DDP/FSDP: gradients are reduced over the ranks on the last micro-batch only
                    with distributed.gradient_sync(runner, micro == config.grad_accum - 1):
                        with _autocast(config.precision, device):
                            loss = runner(**batch).loss
                        if loss is None:
                            raise ConfigError(f"{type(model).__name__} returned no loss for a batch with labels; use "
                                              "a model with a task head (...ForSequenceClassification, ...ForCausalLM)")
                        extra = _extra_loss(model)
                        if extra is not None:
                            loss = loss + extra.to(loss.dtype)
                        value = float(loss.detach())
                        if dist.any(not math.isfinite(value)):  # every rank stops, none waits in backward
                            value = value if not math.isfinite(value) else math.nan
                            raise _diverged(f"the loss is {value}", value, state.step + 1, config, run_path, lr)
                        loss = loss.float() / config.grad_accum
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    step_loss += value / config.grad_accum
                if dist.active:  # the global batch's mean loss (equal slices) and its tokens
                    total_loss, total_tokens = dist.sum([step_loss, float(step_tokens)])
                    step_loss, step_tokens = total_loss / dist.world, int(total_tokens)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))
                if scaler is None and not math.isfinite(norm):
                    raise _diverged(f"the gradient norm is {norm}", norm, state.step + 1, config, run_path, lr)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                _end_step(model, state.step, config.seed)
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - began
                state.step += 1
                state.epoch, state.position = order.epoch, order.position
                state.tokens += step_tokens
                state.seconds += seconds
                state.history.append({"step": state.step, "loss": step_loss, "lr": lr, "tokens": step_tokens,
                                      "seconds": seconds})
                state.since_eval.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}",
                                refresh=False)
                last = state.step == config.steps
                save = run_path is not None and config.save_every and (last or state.step % config.save_every == 0)
                if last or save:  # never evaluate or checkpoint parameters that hold NaN/inf
                    bad = [n for n, p in named.items() if not bool(torch.isfinite(distributed.local(p)).all())]
                    if dist.any(bool(bad)):
                        bad = bad or ["a tensor on another rank"]
                        raise _diverged(f"{len(bad)} trainable tensor(s) hold NaN/inf after it (e.g. {bad[0]})",
                                        math.nan, state.step, config, run_path, lr)
                if val_set and (last or (config.eval_every and state.step % config.eval_every == 0)):
                    evaluate_now()
                if save:
                    _save_checkpoint(run_path, named, optimizer, scheduler, scaler, state, config, device,
                                     dist, data)
            if val_set and (not state.evals or state.evals[-1]["step"] != state.step):
                evaluate_now()  # a resumed run that had already reached `steps`
    finally:
        bar.close()
        model.train(was_training)

    final = {k[4:]: v for k, v in state.evals[-1].items() if k.startswith("val_")} if state.evals else {}
    overfitting = _overfitting(state.evals)
    return TrainResult(steps=state.step, seconds=state.seconds, tokens=state.tokens,
                       tokens_per_second=state.tokens / state.seconds if state.seconds else 0.0,
                       seconds_per_step=state.seconds / state.step if state.step else 0.0,
                       history=state.history, evals=state.evals, final=final, overfitting=overfitting)
