"""Optimizers usable with any training loop (the lab trainer, ``transformers.Trainer``, your own).

* :class:`GaLoreAdamW` (``peftlab.optim.galore``): full-parameter training with gradient
  low-rank projection (Zhao et al. 2024), optional 8-bit moments and layer-wise updates.
"""

from peftlab.optim.galore import DEFAULT_TARGETS, GaLoreAdamW, galore_param_groups, galore_weights

__all__ = ["DEFAULT_TARGETS", "GaLoreAdamW", "galore_param_groups", "galore_weights"]
