"""GaLore as a lab method: full-parameter training with the GaLore optimizer (Zhao et al. 2024,
https://arxiv.org/abs/2403.03507).

GaLore is an optimizer, not an adapter (:class:`peftlab.optim.GaLoreAdamW`). As a method it
"attaches" by making every base parameter trainable, as full fine-tuning does (the modules in
``modules_to_save`` train as copies, like with any method), and offers its optimizer through
``make_optimizer``, which the lab trainer uses. It trains the base weights in place without a
copy of the originals (``trains_base_weights``): a second copy of the model is what it avoids,
so ``peftlab.disabled`` and ``peftlab.detach`` refuse, and ``peftlab.save`` writes the full
trained model (every trainable tensor, peft's key layout), which ``peftlab.load`` puts back
into a fresh base model. Merging is a no-op (the update already lives in the weights), so
``merge_and_unload`` gives a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.method import Method, register
from peftlab.optim.galore import DEFAULT_TARGETS, QUANTIZERS, GaLoreAdamW, _check_hyper, check_layerwise, \
    galore_param_groups, galore_weights, state_layout


@register("galore")
@dataclass(frozen=True)
class GaLore(Method):
    """Full-parameter training with gradient low-rank projection on the targeted linear weights."""

    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Regular expressions full-matched against module paths; the matching ``nn.Linear`` weights
    get projected gradients, every other trainable tensor plain AdamW."""
    rank: int = 128
    """Projection rank: 128-1024 for 7B models in the paper, about a quarter of the hidden size
    for smaller ones (clamped, with a warning, to min(m, n) of a smaller weight)."""
    update_proj_gap: int = 200
    """Optimizer steps between projector refreshes (SVD of the gradient); 50-1000 in practice."""
    scale: float = 0.25
    """Multiplier of the back-projected update (the paper's alpha; 0.25-2)."""
    eight_bit: bool = False
    """8-bit moments (block-wise absmax; bitsandbytes on CUDA, peftlab's own code elsewhere)."""
    quantizer: str = "auto"
    """With ``eight_bit``: ``auto``, ``blockwise`` (any device) or ``bitsandbytes`` (CUDA)."""
    layerwise: bool = False
    """Step each parameter during backward and free its gradient at once (no gradient
    accumulation, no data parallelism, no global gradient clipping)."""

    mergeable: ClassVar[bool] = True  # the update already lives in the base weights
    multi_adapter: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = True
    fsdp_compatible: ClassVar[bool] = False
    fsdp_reason: ClassVar[str] = ("GaLore projects each weight's whole gradient matrix (an SVD per matrix); "
                                  "FSDP2 gives every rank a row shard of it")
    fsdp_alternative: ClassVar[str] = "--strategy ddp (torchrun; non-layer-wise GaLore)"
    suggested_lr: ClassVar[float] = 2e-4  # x scale 0.25 = 5e-5 on the projected weights, the lab's full-FT lr
    typical_score: ClassVar[float | None] = 0.995
    typical_score_source: ClassVar[str] = ("Zhao et al. 2024 (GaLore), Table 4: RoBERTa-base on GLUE, rank 4, average "
                                           "85.89 vs 86.28 for full fine-tuning")

    def __post_init__(self) -> None:
        _check_hyper(lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=self.rank,
                     update_proj_gap=self.update_proj_gap, scale=self.scale)
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"galore: quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")

    def attach(self, model: nn.Module, name: str) -> None:
        galore_weights(model, self.target_modules)  # the targets must match a linear weight
        copied = [path for path, _ in slots.copy_layers(model, name)]
        keys = [k for k, _ in model.named_parameters()  # tied tensors once
                if not any(k.startswith(f"{c}.") for c in copied)]
        if not keys:
            raise ConfigError(f"galore: {type(model).__name__} has no parameters outside modules_to_save")
        slots.train_base_tensors(model, name, keys, keep_original=False)

    def make_optimizer(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                       grad_accum: int = 1) -> GaLoreAdamW:
        """The lab trainer's optimizer hook: GaLoreAdamW over the trainable parameters.

        Raises:
            ConfigError: ``layerwise`` with ``grad_accum > 1`` or a multi-process run.
        """
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        check_layerwise(self.layerwise, grad_accum=grad_accum, distributed=distributed)
        return GaLoreAdamW(galore_param_groups(model, self.target_modules, weight_decay=weight_decay), lr=lr,
                           weight_decay=weight_decay, rank=self.rank, update_proj_gap=self.update_proj_gap,
                           scale=self.scale, eight_bit=self.eight_bit, quantizer=self.quantizer,
                           layerwise=self.layerwise)

    def optimizer_state_elements(self, model: nn.Module, name: str) -> dict[str, tuple[int, int]]:
        """GaLoreAdamW's state per trainable tensor, ``{key: (elements in the state dtype, fixed
        bytes of 8-bit codes)}``, for the memory estimator (the optimizer's own layout)."""
        targeted = {id(p) for p in galore_weights(model, self.target_modules).values()}
        return {key: state_layout(tuple(p.shape), rank=self.rank if id(p) in targeted else None,
                                  eight_bit=self.eight_bit)
                for key, p in model.named_parameters() if p.requires_grad}
