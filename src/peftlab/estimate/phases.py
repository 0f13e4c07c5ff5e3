"""The peak of one training step, phase by phase, instead of every term at its maximum.

Gradients, activations and the optimizer's temporaries never all live at the same moment of a
step. What is allocated at each moment of a steady-state step (the optimizer states exist from the
first step on) is, with ``W`` weights (and quantization constants), ``O`` optimizer states (and
fp32 master weights), ``R`` the constant overheads (CUDA context, sharding buffers, one dequantized
weight) and ``G`` gradients:

* **forward**: ``W + O + R`` + the gradients still held (none with PyTorch's default
  ``zero_grad(set_to_none=True)``; all of them with ``set_to_none=False`` or while micro-batches
  accumulate) + the activations kept for backward, grown to their maximum at the end of the
  forward, + the transient there: the LM head's logits in the activation dtype and the loss' fp32
  copy of them, alive together with the kept fp32 log-softmax. Under full recomputation the
  forward keeps only the block inputs, and the largest block's tensors are live while it runs.
* **backward**: the activations are freed block by block, last block first, while the gradients
  of the trainable tensors appear in the same order (``TensorInfo.stage``: the head's first, then
  each block's, then the embeddings' side). The peak is the maximum over the points of the
  sweep:

  - the loss' backward: every kept activation + the two fp32 gradient buffers of the logits;
  - the head: the log-softmax is freed, the logits' gradient (activation dtype) and the head's
    weight gradients exist;
  - block ``i``: the activations of blocks ``<= i`` and of the embeddings' side (block ``i``
    recomputed under full recomputation, with only the inputs kept for the others; its attention
    scores recomputed under selective recomputation) + the gradients of the head and of blocks
    ``>= i`` + one block's backward transient (:func:`formulas.backward_transient`);
  - the end: the embeddings' side and every gradient.

* **optimizer step**: ``W + O + R + G`` + the optimizer's temporaries (PyTorch's foreach AdamW,
  the CUDA default, makes one temporary the size of the second moments of all trainable tensors
  at once; the CPU single-tensor loop two of the largest tensor; GaLore adds one SVD); the
  activations are gone.

The peak per device is the largest phase total. Each phase is a dict of components (weights,
quant_constants, optimizer, gradients, activations, transients, kv_cache, overhead) that sums to
the phase total, so a report can show what the memory is made of at the peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.estimate.formulas import Activations

PHASES = ("forward", "backward", "optimizer step")
"""Training phases, in step order."""
COMPONENTS = ("weights", "quant_constants", "optimizer", "gradients", "activations", "transients", "kv_cache",
              "overhead")
"""What a phase total is made of (each phase's dict has exactly these keys)."""


@dataclass(frozen=True)
class Gradients:
    """Gradient bytes by when they appear in the backward (see ``TensorInfo.stage``)."""

    head: float
    blocks: dict[int, float]
    early: float
    resident: bool
    """Held for the whole step (``zero_grad(set_to_none=False)``, gradient accumulation, DDP)."""

    @property
    def total(self) -> float:
        return self.head + sum(self.blocks.values()) + self.early


@dataclass(frozen=True)
class Point:
    """One moment of the backward sweep: ``(label, activations, gradients, transients)``."""

    label: str
    activations: float
    gradients: float
    transients: float

    @property
    def total(self) -> float:
        return self.activations + self.gradients + self.transients


def _phase(weights: float, constants: float, optimizer: float, gradients: float, activations: float,
           transients: float, overhead: float, kv_cache: float = 0.0) -> dict[str, float]:
    return {"weights": weights, "quant_constants": constants, "optimizer": optimizer, "gradients": gradients,
            "activations": activations, "transients": transients, "kv_cache": kv_cache, "overhead": overhead}


def backward_sweep(act: Activations, grads: Gradients, checkpointing: str, block_transient: float) -> list[Point]:
    """The moments of the backward pass, in order (see the module docstring)."""
    full = checkpointing == "full"
    kept = dict(act.per_block)
    inputs = dict(act.inputs_per_block)
    rescored = dict(act.scores_per_block)
    order = [b for b, _ in act.per_block]
    before = act.outside - act.outside_after
    held = grads.total if grads.resident else 0.0

    def stored(b: int) -> float:
        return inputs.get(b, 0.0) if full else kept[b]

    body = sum(stored(b) for b in order)  # what the blocks keep at the end of the forward
    forward_kept = body + act.outside + act.loss
    points = [Point("loss backward", forward_kept, held, act.loss_transient)]
    so_far = grads.head
    points.append(Point("LM head backward" if act.loss else "head backward",
                        forward_kept - act.loss - act.outside_after, max(held, so_far), act.logits))
    remaining = body
    for b in reversed(order):
        remaining -= stored(b)
        so_far += grads.blocks.get(b, 0.0)
        live = before + remaining + (inputs.get(b, 0.0) + kept[b] if full else kept[b])
        points.append(Point(f"block {b} backward", live, max(held, so_far), block_transient + rescored.get(b, 0.0)))
    for b, g in grads.blocks.items():  # trainable tensors of blocks outside the graph (none in practice)
        if b not in kept:
            so_far += g
    points.append(Point("embeddings backward", before, max(held, so_far + grads.early), 0.0))
    return points


def training(weights: float, constants: float, optimizer: float, overhead: float, act: Activations,
             grads: Gradients, checkpointing: str, block_transient: float,
             step_temporaries: float) -> tuple[dict[str, dict[str, float]], str]:
    """``({phase: components}, label of the backward's peak moment)`` of one training step."""
    held = grads.total if grads.resident else 0.0
    full = checkpointing == "full"
    body = sum(v for _, v in act.inputs_per_block) if full else sum(v for _, v in act.per_block)
    forward_kept = body + act.outside + act.loss
    running = max(act.logits + act.logits_upcast, act.recomputed_layer if full else 0.0)
    forward = _phase(weights, constants, optimizer, held, forward_kept, running, overhead)
    points = backward_sweep(act, grads, checkpointing, block_transient)
    peak = max(points, key=lambda p: p.total)
    backward = _phase(weights, constants, optimizer, peak.gradients, peak.activations, peak.transients, overhead)
    step = _phase(weights, constants, optimizer, grads.total, 0.0, step_temporaries, overhead)
    return {"forward": forward, "backward": backward, "optimizer step": step}, peak.label


def inference(weights: float, constants: float, activations: float, kv_cache: float,
              overhead: float) -> dict[str, dict[str, float]]:
    """Serving has one phase: weights, KV cache and one prefill's live tensors."""
    return {"inference": _phase(weights, constants, 0.0, 0.0, activations, 0.0, overhead, kv_cache)}
