"""Full fine-tuning as a method: the baseline every PEFT method is measured against.

Attaching makes every base parameter trainable in place (the modules in ``modules_to_save``
train as copies, as with any method) and the lab trainer's AdamW trains them. Like GaLore, it
trains the base weights without a copy of the originals (``trains_base_weights``): keeping a
second copy of the model is exactly the cost PEFT avoids, so ``peftlab.disabled`` and
``peftlab.detach`` refuse, and ``peftlab.save`` writes the full trained model (every trainable
tensor, peft's key layout), which ``peftlab.load`` puts back into a fresh base model. Merging is
a no-op (the update already lives in the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.method import Method, register


@register("full")
@dataclass(frozen=True)
class Full(Method):
    """Every parameter of the base model trains (the reference for scores and costs)."""

    mergeable: ClassVar[bool] = True  # the update already lives in the base weights
    multi_adapter: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 5e-5
    """The usual full fine-tuning rate for pretrained transformers (BERT paper: 2e-5 to 5e-5)."""
    typical_score: ClassVar[float | None] = 1.0
    typical_score_source: ClassVar[str] = "the reference: scores are relative to full fine-tuning"

    def attach(self, model: nn.Module, name: str) -> None:
        copied = [path for path, _ in slots.copy_layers(model, name)]
        keys = [k for k, _ in model.named_parameters()  # tied tensors once
                if not any(k.startswith(f"{c}.") for c in copied)]
        if not keys:
            raise ConfigError(f"full: {type(model).__name__} has no parameters outside modules_to_save")
        slots.train_base_tensors(model, name, keys, keep_original=False)
