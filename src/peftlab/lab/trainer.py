"""The lab trainer's loop: a small, exact trainer for one model, one task and one method.

The settings and results are in :mod:`peftlab.lab.train_config`, checkpoints, resume and the
run directory's lock in :mod:`peftlab.lab.checkpoints`; their public names are importable from
here too. What :func:`train` does, in order, for each optimizer step:

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
   evaluation), and the overfitting rule (:func:`overfitting`). Evaluation never changes the
   random state, so it never changes training.
4. Every ``save_every`` steps and at the end: a checkpoint (:mod:`peftlab.lab.checkpoints`) of
   the trainable tensors, the optimizer and every active adapter's ``Method.training_state``;
   ``resume=True`` continues from the newest intact one and, on CPU, ends with bit-identical
   parameters and the same loss history as an uninterrupted run.

What trains is what has ``requires_grad``: an attached method decides (``peftlab.attach(model,
"full")`` for full fine-tuning); the loop has no case of its own for any method.

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
import hashlib
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.lab import distributed
from peftlab.lab.checkpoints import (
    CHECKPOINT_DIR,
    KEEP_CHECKPOINTS,
    LOCK_FILE,
    OPTIMIZER_FILE,
    PARAMS_FILE,
    RNG_FILE,
    STATE_FILE,
    TrainState,
    checkpoints,
    clean_leftovers,
    data_fingerprint,
    hold_run_dir,
    intact,
    latest_checkpoint,
    restore,
    resume_point,
    run_lock,
    save_checkpoint,
)
from peftlab.lab.distributed import Dist
from peftlab.lab.train_config import PRECISIONS, SCHEDULES, TrainConfig, TrainingDiverged, TrainResult

__all__ = ["CHECKPOINT_DIR", "KEEP_CHECKPOINTS", "LOCK_FILE", "OPTIMIZER_FILE", "PARAMS_FILE", "PRECISIONS",
           "RNG_FILE", "SCHEDULES", "STATE_FILE", "TrainConfig", "TrainResult", "TrainingDiverged", "checkpoints",
           "data_fingerprint", "hold_run_dir", "intact", "latest_checkpoint", "loss_noise", "overfitting", "run_lock",
           "score", "subset", "train"]

OVERFIT_TOLERANCE = 0.01
"""The validation loss must exceed its best by more than this fraction (1 %) to count as rising."""
OVERFIT_NOISE = 2.0
"""A single rise must also exceed this many standard errors of the validation loss (:func:`loss_noise`)."""
OVERFIT_RISES = 3
"""... or the validation loss must have risen at this many evaluations in a row."""
NOISE_WINDOW = 50
"""The training steps (the newest ones) whose losses measure the step-to-step noise."""


# --------------------------------------------------------------------------- data order


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- optimizer and schedule


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


# --------------------------------------------------------------------------- method hooks


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


def _training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every active adapter's ``Method.training_state`` (tensors that training changes besides
    the trainable ones, by ``state_dict`` key): what a checkpoint must keep for an exact resume."""
    from peftlab.api import active, adapters

    out: dict[str, torch.Tensor] = {}
    for name, method in adapters(model).items():
        if name in active(model):
            out.update(method.training_state(model, name))
    return out


def _extra_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of every active adapter's ``Method.extra_loss`` (None when none adds one)."""
    from peftlab.api import active, adapters

    terms = [t for name, method in adapters(model).items() if name in active(model)
             for t in [method.extra_loss(model, name)] if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


# --------------------------------------------------------------------------- device and precision


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


# --------------------------------------------------------------------------- overfitting


def loss_noise(losses: list[float], examples_per_step: int, examples: int) -> float | None:
    """The standard error of a mean loss over ``examples`` examples, measured from the training
    loss's own step-to-step noise; ``None`` with fewer than four steps.

    A step's loss is a mean over ``examples_per_step`` examples, so its spread around the trend
    is ``sigma / sqrt(examples_per_step)``, with ``sigma`` the spread of one example's loss.
    Differences of consecutive steps cancel the slow trend and have twice the variance; their
    median absolute deviation (times 1.4826, the normal consistency constant) is robust to the
    occasional outlier batch. So ``sigma_step = 1.4826 * MAD(diff) / sqrt(2)`` over the newest
    :data:`NOISE_WINDOW` steps, and a validation loss over ``examples`` examples has the
    standard error ``sigma_step * sqrt(examples_per_step / examples)``. Two evaluations on the
    same fixed examples differ by less than that (their errors are correlated), so a rise
    beyond it is conservative evidence of a real change.

    Args:
        losses: The training loss of each step, oldest first.
        examples_per_step: Examples per optimizer step (``batch_size * grad_accum``).
        examples: Examples the validation loss averages over.
    """
    window = [x for x in losses[-NOISE_WINDOW:] if math.isfinite(x)]
    diffs = [b - a for a, b in zip(window, window[1:])]
    if len(diffs) < 3 or examples < 1:
        return None
    centre = statistics.median(diffs)
    sigma_step = 1.4826 * statistics.median(abs(d - centre) for d in diffs) / math.sqrt(2)
    return sigma_step * math.sqrt(examples_per_step / examples)


def _usable(evals: list[dict]) -> list[dict]:
    return [e for e in evals if math.isfinite(e.get("val_loss", math.nan)) and math.isfinite(e.get("train_loss", math.nan))]


def overfitting(evals: list[dict]) -> bool:
    """Whether the evaluations so far show overfitting.

    The rule: from the evaluation with the lowest validation loss (the best) to the last one,
    the training loss fell while the validation loss rose above its best by more than
    :data:`OVERFIT_TOLERANCE` (1 %), and that rise is material:

    * it exceeds :data:`OVERFIT_NOISE` (2) standard errors of the validation loss (the last
      evaluation's ``val_loss_noise``, see :func:`loss_noise`): a one-sided test at about the
      2.5 % level, so measurement noise alone rarely fires it; or
    * the validation loss rose at each of the last :data:`OVERFIT_RISES` (3) evaluations: a
      trend rather than a blip (in a flat, noisy series three rises in a row happen once in
      4! = 24 windows, and the 1 % rise over the best must hold too).

    A 1 % threshold alone fired on 0.412 -> 0.418, a rise of a tenth of the noise of a mean over
    160 examples.
    """
    usable = _usable(evals)
    if len(usable) < 2:
        return False
    best = min(usable, key=lambda e: e["val_loss"])
    last = usable[-1]
    if last is best or last["train_loss"] >= best["train_loss"]:
        return False
    rise = last["val_loss"] - best["val_loss"]
    if rise <= OVERFIT_TOLERANCE * abs(best["val_loss"]):
        return False
    noise = last.get("val_loss_noise")
    if noise is not None and math.isfinite(noise) and rise > OVERFIT_NOISE * noise:
        return True
    recent = [e["val_loss"] for e in usable[-(OVERFIT_RISES + 1):]]
    return len(recent) == OVERFIT_RISES + 1 and all(b > a for a, b in zip(recent, recent[1:]))


def overfit_line(evals: list[dict]) -> str:
    """The message printed when :func:`overfitting` fires: how far above its best the
    validation loss is, against its noise."""
    usable = _usable(evals)
    best, last = min(usable, key=lambda e: e["val_loss"]), usable[-1]
    noise = last.get("val_loss_noise")
    against = f", {(last['val_loss'] - best['val_loss']) / noise:.1f}x its noise (+-{noise:.4f})" \
        if noise is not None and math.isfinite(noise) and noise > 0 else ""
    return (f"overfitting: validation loss {last['val_loss']:.4f} is above its best {best['val_loss']:.4f} "
            f"(step {best['step']}){against} while training loss fell {best['train_loss']:.4f} -> "
            f"{last['train_loss']:.4f}; consider fewer steps, a lower lr, more data or more weight decay")


def _describe(record: dict, steps: int) -> str:
    scores = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "overfitting", "val_loss_noise"))
    return f"step {record['step']}/{steps}: {scores}"


# --------------------------------------------------------------------------- divergence


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


# --------------------------------------------------------------------------- training


def train(model: nn.Module, tokenizer: Any, task: Any, config: TrainConfig, *, run_dir: str | Path | None = None,
          resume: bool = False) -> TrainResult:
    """Fine-tune ``model`` on ``task`` in place: every parameter with ``requires_grad`` trains.

    Args:
        model: A model from :func:`peftlab.models.load` (or any transformers model whose forward
            takes ``input_ids``, ``attention_mask`` and ``labels`` and returns ``.loss``) with a
            method attached (``"full"`` trains every parameter), or with parameters unfrozen by
            hand.
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


@dataclass
class _Run:
    """The moving parts of one run, shared by the step, the evaluation and the checkpoint."""

    model: nn.Module
    runner: nn.Module  # the model, or its DDP wrapper
    tokenizer: Any
    task: Any
    config: TrainConfig
    dist: Dist
    device: torch.device
    run_path: Path | None
    named: dict[str, nn.Parameter]  # the trainable tensors (FSDP2: the shards)
    train_set: list
    val_set: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    data: dict[str, Any]  # the training data's fingerprint
    state: TrainState
    order: _DataOrder
    bar: Any  # tqdm
    show: bool


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
                          "(peftlab.attach; 'full' trains every parameter)")
    runner = distributed.wrap(model, config.strategy, dist) if dist.active else model
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
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
    data = data_fingerprint(task)
    if run_path is not None and dist.is_main:
        clean_leftovers(run_path)
    start = resume_point(run_path) if resume and run_path is not None else None
    if start is not None:
        state = restore(start, named, optimizer, scheduler, scaler, factor, config, data, device, dist,
                        _training_state(model))
    else:
        state = TrainState()
        if resume and config.progress and dist.is_main:
            print(f"peftlab: no checkpoint in {run_path}; starting from step 0", file=sys.stderr)

    from tqdm.auto import tqdm

    show = config.progress and dist.is_main
    bar = tqdm(total=config.steps, initial=state.step, disable=not show, desc=f"{task.name}", unit="step",
               dynamic_ncols=True)
    run = _Run(model, runner, tokenizer, task, config, dist, device, run_path, named, train_set, val_set, optimizer,
               scheduler, scaler, data, state, _DataOrder(len(train_set), config.seed, state.epoch, state.position),
               bar, show)
    was_training = model.training
    try:
        model.train()
        with _gradient_checkpointing(model, config.gradient_checkpointing):
            while state.step < config.steps:
                lr = _step(run)
                last = state.step == config.steps
                save = run_path is not None and config.save_every and (last or state.step % config.save_every == 0)
                if last or save:  # never evaluate or checkpoint parameters that hold NaN/inf
                    _check_finite(run, lr)
                if val_set and (last or (config.eval_every and state.step % config.eval_every == 0)):
                    _evaluate(run)
                if save:
                    save_checkpoint(run_path, named, optimizer, scheduler, scaler, state, config, device, dist, data,
                                    _training_state(model))
            if val_set and (not state.evals or state.evals[-1]["step"] != state.step):
                _evaluate(run)  # a resumed run that had already reached `steps`
    finally:
        bar.close()
        model.train(was_training)

    final = {k[4:]: v for k, v in state.evals[-1].items() if k.startswith("val_") and k != "val_loss_noise"} \
        if state.evals else {}
    return TrainResult(steps=state.step, seconds=state.seconds, tokens=state.tokens,
                       tokens_per_second=state.tokens / state.seconds if state.seconds else 0.0,
                       seconds_per_step=state.seconds / state.step if state.step else 0.0,
                       history=state.history, evals=state.evals, final=final, overfitting=overfitting(state.evals),
                       train_size=len(train_set),
                       epochs=state.step * config.batch_size * config.grad_accum / len(train_set))


def _step(run: _Run) -> float:
    """One optimizer step (``grad_accum`` micro-batches, clipping, the update, the schedule and
    the method hooks); records it in ``run.state`` and returns the learning rate it used."""
    config, dist, state, model = run.config, run.dist, run.state, run.model
    began = time.perf_counter()
    step_loss, step_tokens = 0.0, 0
    lr = float(run.optimizer.param_groups[0]["lr"])
    share = config.batch_size // dist.world  # this rank's examples of every micro-batch
    _begin_step(model, state.step, config.seed)
    for micro in range(config.grad_accum):
        indices = run.order.take(config.batch_size)[dist.rank * share:(dist.rank + 1) * share]
        batch = run.task.collate(run.tokenizer, [run.train_set[i] for i in indices], config.max_length)
        step_tokens += int(batch["attention_mask"].sum())
        batch = {k: v.to(run.device) for k, v in batch.items()}
        # DDP/FSDP: gradients are reduced over the ranks on the last micro-batch only
        with distributed.gradient_sync(run.runner, micro == config.grad_accum - 1):
            with _autocast(config.precision, run.device):
                loss = run.runner(**batch).loss
            if loss is None:
                raise ConfigError(f"{type(model).__name__} returned no loss for a batch with labels; use "
                                  "a model with a task head (...ForSequenceClassification, ...ForCausalLM)")
            extra = _extra_loss(model)
            if extra is not None:
                loss = loss + extra.to(loss.dtype)
            value = float(loss.detach())
            if dist.any(not math.isfinite(value)):  # every rank stops, none waits in backward
                value = value if not math.isfinite(value) else math.nan
                raise _diverged(f"the loss is {value}", value, state.step + 1, config, run.run_path, lr)
            loss = loss.float() / config.grad_accum
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        step_loss += value / config.grad_accum
    if dist.active:  # the global batch's mean loss (equal slices) and its tokens
        total_loss, total_tokens = dist.sum([step_loss, float(step_tokens)])
        step_loss, step_tokens = total_loss / dist.world, int(total_tokens)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    clip = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(list(run.named.values()), clip)))
    if run.scaler is None and not math.isfinite(norm):
        raise _diverged(f"the gradient norm is {norm}", norm, state.step + 1, config, run.run_path, lr)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    _end_step(model, state.step, config.seed)
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - began
    state.step += 1
    state.epoch, state.position = run.order.epoch, run.order.position
    state.tokens += step_tokens
    state.seconds += seconds
    state.history.append({"step": state.step, "loss": step_loss, "lr": lr, "tokens": step_tokens, "seconds": seconds})
    state.since_eval.append(step_loss)
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}", refresh=False)
    return lr


def _check_finite(run: _Run, lr: float) -> None:
    """Stop (every rank together) when a trainable tensor holds NaN/inf after the step."""
    bad = [n for n, p in run.named.items() if not bool(torch.isfinite(distributed.local(p)).all())]
    if run.dist.any(bool(bad)):
        bad = bad or ["a tensor on another rank"]
        raise _diverged(f"{len(bad)} trainable tensor(s) hold NaN/inf after it (e.g. {bad[0]})", math.nan,
                        run.state.step, run.config, run.run_path, lr)


def score(model: nn.Module, tokenizer: Any, task: Any, examples: list, config: TrainConfig) -> dict[str, float]:
    """``task.evaluate`` on ``examples`` as the trainer evaluates: under the run's autocast, with
    its batch size and length, and without touching the random state (so scoring never changes
    what training does next). The model is left in the mode it came in."""
    device = _device(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _autocast(config.precision, device):
        return task.evaluate(model, tokenizer, examples, batch_size=config.batch_size, max_length=config.max_length)


def _evaluate(run: _Run) -> None:
    """Score the validation examples (:func:`score`), record the evaluation with the validation
    loss's noise, and apply the overfitting rule."""
    config, state = run.config, run.state
    scores = score(run.model, run.tokenizer, run.task, run.val_set, config)
    run.model.train()
    train_loss = sum(state.since_eval) / len(state.since_eval) if state.since_eval else math.nan
    noise = loss_noise([h["loss"] for h in state.history], config.batch_size * config.grad_accum, len(run.val_set))
    record = {"step": state.step, "train_loss": train_loss, **{f"val_{k}": float(v) for k, v in scores.items()},
              "val_loss_noise": noise}
    state.evals.append(record)
    record["overfitting"] = overfitting(state.evals)
    state.since_eval = []
    if run.show:
        run.bar.write(_describe(record, config.steps))
        if record["overfitting"]:
            run.bar.write(overfit_line(state.evals))
