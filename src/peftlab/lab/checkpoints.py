"""Checkpoints, exact resume and the run directory's lock of the lab trainer.

A checkpoint is ``run_dir/checkpoints/step-<N>/``:

* ``trainable.safetensors``: every trainable tensor (whole tensors, gathered from FSDP shards);
* ``optimizer.pt``: optimizer, learning-rate scheduler and grad-scaler state, and the methods'
  training state (``Method.training_state``: tensors besides the trainable ones that training
  changes, such as AdaLoRA's importance scores and rank mask);
* ``rng.pt``: the RNG states of torch (and CUDA), Python and NumPy (every rank's, when
  distributed), so dropout after a resume draws what it would have drawn;
* ``trainer_state.json``, written last: the :class:`TrainState` (step, data-order position,
  history, evaluations), the :class:`~peftlab.lab.train_config.TrainConfig`, the world size,
  the fingerprint of the training data (:func:`data_fingerprint`) and each other file's size and
  sha256.

The folder is built aside and swapped in whole (:func:`peftlab.core.files.replace_folder`), so a
crash never leaves half a checkpoint; the newest :data:`KEEP_CHECKPOINTS` are kept. Resuming
(:func:`resume_point`) takes the newest intact one, skipping damaged newer ones with a warning,
and refuses a checkpoint whose data-order settings (:data:`DATA_FIELDS`), training data or
world size differ from this run's; settings that only change the trajectory
(:data:`SOFT_FIELDS`) may change, with a warning (:func:`reconcile`).

The run directory is locked for a whole run (:func:`run_lock`, ``flock``): a second writer fails
at once, and the kernel drops the lock of a killed holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.core import files
from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.lab import distributed
from peftlab.lab.distributed import Dist
from peftlab.lab.train_config import TrainConfig

__all__ = ["CHECKPOINT_DIR", "DATA_FIELDS", "KEEP_CHECKPOINTS", "LOCK_FILE", "OPTIMIZER_FILE", "PARAMS_FILE",
           "RNG_FILE", "SOFT_FIELDS", "STATE_FILE", "TrainState", "check_data", "check_world", "checkpoints",
           "clean_leftovers", "data_fingerprint", "hold_run_dir", "intact", "latest_checkpoint", "load_checkpoint",
           "read_record", "reconcile", "restore", "resume_point", "rng_state", "run_lock", "save_checkpoint", "set_rng_state"]

KEEP_CHECKPOINTS = 2
"""How many checkpoints a run keeps (the newest ones): one to resume from, one in case it is damaged."""
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
DATA_FIELDS = ("seed", "batch_size", "grad_accum", "train_examples")
# Settings that change the trajectory but may be changed on resume (with a warning).
SOFT_FIELDS = ("lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm", "max_length", "precision")


# --------------------------------------------------------------------------- RNG state


def rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states of torch (and CUDA on a CUDA device), Python and NumPy as tensors and
    plain values, so that ``torch.load(weights_only=True)`` reads them back."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))


# --------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
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


def read_record(path: Path) -> dict[str, Any]:
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
        record = read_record(path)
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


def resume_point(run_dir: Path) -> Path | None:
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


def check_data(record: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    before = record.get("data")
    if before is None:
        warnings.warn(f"checkpoint {path} records no data fingerprint (an older peftlab wrote it): resuming without "
                      "checking that the training data is the same", stacklevel=5)
        return
    changed = [k for k in now if before.get(k) != now[k]]
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume from {path}: the training data changed since it was written ({details}); "
                          "resume with the data the run started with, or start a new run_dir")


def clean_leftovers(run_dir: Path) -> None:
    """Remove what a killed writer left in ``run_dir/checkpoints`` (the run's lock is held, so
    no writer is alive): temporary and stale folders, which :func:`checkpoints` never lists."""
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, named: dict[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any,
                     state: TrainState, config: TrainConfig, device: torch.device, dist: Dist = Dist(),
                     data: dict[str, Any] | None = None, method_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-<N>`` atomically and keep the newest two.

    ``method_state`` holds the attached methods' training state by ``state_dict`` key
    (``Method.training_state``), saved with the optimizer. In a distributed job every rank takes
    part (whole tensors are gathered from FSDP shards, and every rank's RNG state is kept), and
    rank 0 alone writes.
    """
    tensors = {n: distributed.full_tensor(p.detach()).to("cpu", copy=True).contiguous() for n, p in named.items()}
    extra = {k: distributed.full_tensor(t.detach()).to("cpu", copy=True).contiguous()
             for k, t in (method_state or {}).items()}
    optim = distributed.optimizer_state(optimizer)
    rng = rng_state(device)
    if dist.active:
        rng = {**rng, "ranks": dist.gather(rng)}
    target = Path(run_dir) / CHECKPOINT_DIR / f"step-{state.step}"
    error: BaseException | None = None
    if dist.is_main:
        try:
            write_checkpoint(Path(run_dir), tensors, optim, scheduler, scaler, rng, state, config, dist, data, extra)
        except BaseException as e:  # the other ranks must hear of it, or they would wait forever
            error = e
    if dist.any(error is not None):
        if error is not None:
            raise error
        raise PeftlabError(f"rank 0 could not write checkpoint {target}; see its error")
    return target


def write_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], optim: dict[str, Any],
                      scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any, rng: dict[str, Any],
                      state: TrainState, config: TrainConfig, dist: Dist, data: dict[str, Any] | None = None,
                      method_state: dict[str, torch.Tensor] | None = None) -> Path:
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
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "method_state": method_state or {}}, tmp / OPTIMIZER_FILE)
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


def load_checkpoint(path: Path, record: dict[str, Any], named: dict[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any,
                     device: torch.device, dist: Dist = Dist(),
                     method_state: dict[str, torch.Tensor] | None = None) -> TrainState:
    """Restore tensors, optimizer, scheduler, scaler, the methods' training state (copied into
    the live ``method_state`` tensors) and RNG from ``path`` (whose state file is ``record``,
    already checked against this run); return the training state."""
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
    live = method_state or {}
    kept = saved.get("method_state")
    if kept is None:  # written before checkpoints kept it
        kept = {}
        if live:
            warnings.warn(f"checkpoint {path} holds no method training state ({len(live)} tensors, e.g. "
                          f"{next(iter(live))}): they restart from their current values, so the resumed run is not "
                          "identical to an uninterrupted one", stacklevel=5)
            live = {}
    odd = sorted(set(live) ^ set(kept)) + sorted(k for k in set(live) & set(kept) if live[k].shape != kept[k].shape)
    if odd:
        raise ConfigError(f"checkpoint {path} does not fit the methods' training state (differing: {odd[:5]}); resume "
                          "with the same model and method, or start a new run_dir")
    rng = torch.load(path / RNG_FILE, weights_only=True)
    for n, p in named.items():
        distributed.copy_full(p, tensors[n])
    with torch.no_grad():
        for k, t in live.items():
            distributed.copy_full(t, kept[k])
    distributed.load_optimizer_state(optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(rng["ranks"][dist.rank] if dist.active else rng, device)
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in record.items() if k in fields})


def check_world(record: dict[str, Any], path: Path, dist: Dist) -> None:
    written_by = int(record.get("world_size", 1))
    if written_by != dist.world:
        raise ConfigError(f"checkpoint {path} was written by a job of {written_by} process(es), this job has "
                          f"{dist.world}: each process's random state (dropout) is kept per rank, so resume with "
                          f"{written_by} process(es) in total (torchrun --nnodes x --nproc_per_node = {written_by})"
                          " or start a new run_dir")


def reconcile(old: TrainConfig, new: TrainConfig, path: Path) -> list[str]:
    """Fields that differ between a checkpoint's config and this run's: an error for those that
    define the data stream, the names of the others that change the trajectory."""
    hard = [f for f in DATA_FIELDS if getattr(old, f) != getattr(new, f)]
    if hard:
        diff = ", ".join(f"{f}: {getattr(old, f)!r} -> {getattr(new, f)!r}" for f in hard)
        raise ConfigError(f"cannot resume from {path}: {diff} changes the order of the training data; "
                          "resume with the checkpoint's values or start a new run_dir")
    soft = [f for f in SOFT_FIELDS if getattr(old, f) != getattr(new, f)]
    schedule_moves = new.schedule != "constant" or new.warmup_ratio > 0
    if old.steps != new.steps and schedule_moves:
        soft.append("steps")
    return soft


def restore(path: Path, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: Any, factor: Any, config: TrainConfig,
            data: dict[str, Any], device: torch.device, dist: Dist,
            method_state: dict[str, torch.Tensor] | None = None) -> TrainState:
    """Resume from the checkpoint folder ``path``: every check first (world size, the data-order
    settings, the training data), then tensors, optimizer, scheduler, scaler, the methods'
    training state (``method_state``, the live tensors by key) and RNG states.

    Settings in :data:`SOFT_FIELDS` (and ``steps``, where the schedule depends on it) may differ
    from the checkpoint's: a warning names them, and the learning rates and weight decay of every
    optimizer group are set to this run's values at the resumed step (``factor`` is the
    schedule's factor per step), so training goes on under the new settings.
    """
    record = read_record(path)
    check_world(record, path, dist)
    old = TrainConfig.from_dict(record["config"])
    changed = reconcile(old, config, path)
    check_data(record, data, path)
    state = load_checkpoint(path, record, named, optimizer, scheduler, scaler, device, dist, method_state)
    if changed:
        warnings.warn(f"resuming from {path} with changed {', '.join(changed)}: training goes on from step "
                      f"{state.step} with the new values, so it is not identical to an uninterrupted run",
                      stacklevel=4)
        if old.lr != config.lr:
            scheduler.base_lrs = [b * config.lr / old.lr for b in scheduler.base_lrs]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * factor(state.step)
            if group.get("weight_decay"):
                group["weight_decay"] = config.weight_decay
    return state


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

