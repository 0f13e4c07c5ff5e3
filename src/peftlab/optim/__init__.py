"""Optimizers usable with any training loop (the lab trainer, ``transformers.Trainer``, your own).

* :class:`GaLoreAdamW` (``peftlab.optim.galore``): full-parameter training with gradient
  low-rank projection (Zhao et al. 2024), optional 8-bit moments and layer-wise updates.
* :func:`make_adamw8bit` (``peftlab.optim.adamw8bit``): 8-bit AdamW, bitsandbytes' where it works on
  the parameters' device (CPU included), else :class:`AdamW8bit` (block-wise 8-bit moments in
  plain PyTorch, any device); :func:`paged_adamw8bit`: bitsandbytes' paged 8-bit AdamW on CUDA.
"""

from peftlab.optim.adamw8bit import AdamW8bit, make_adamw8bit, paged_adamw8bit, state_bytes
from peftlab.optim.galore import DEFAULT_TARGETS, GaLoreAdamW, galore_param_groups, galore_weights

__all__ = ["DEFAULT_TARGETS", "AdamW8bit", "GaLoreAdamW", "galore_param_groups", "galore_weights", "make_adamw8bit",
           "paged_adamw8bit", "state_bytes"]
