"""What a training run is told and what it reports: :class:`TrainConfig`, :class:`TrainResult`,
:class:`TrainingDiverged`.

The configuration is plain data: every field has a working default, :meth:`TrainConfig.validate`
names the field and what it accepts, and the dict form (:meth:`TrainConfig.to_dict`) is what a
checkpoint records, so that a resumed run can be checked against the run that wrote it
(:mod:`peftlab.lab.checkpoints`). The loop that uses them is :mod:`peftlab.lab.trainer`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.lab.distributed import STRATEGIES

__all__ = ["PRECISIONS", "SCHEDULES", "TrainConfig", "TrainResult", "TrainingDiverged"]

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


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
            evaluation), the ``task.evaluate`` keys prefixed ``val_``, ``val_loss_noise`` (the
            standard error of the validation loss implied by the training loss's step-to-step
            noise, ``None`` before there are enough steps) and ``overfitting``.
        final: ``task.evaluate`` on the validation examples at the end (unprefixed keys).
        overfitting: The validation loss rose materially above its best while the training loss
            fell (the rule: :func:`peftlab.lab.trainer.overfitting`).
        train_size: Training examples the run drew from (after ``train_examples``).
        epochs: The budget as a fraction of an epoch: ``steps * batch_size * grad_accum /
            train_size`` (0.12: most training examples were never seen).
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
    train_size: int = 0
    epochs: float = 0.0

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

