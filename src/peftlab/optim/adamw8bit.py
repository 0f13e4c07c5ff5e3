"""Optimizers for memory-constrained training.

:class:`AdamW8bit` keeps AdamW's two moments in 8 bits (Dettmers et al. 2022, "8-bit Optimizers
via Block-wise Quantization", https://arxiv.org/abs/2110.02861): each moment is cut into blocks
of 2048 values, scaled by the block's absmax and stored as one byte per value on the dynamic
8-bit map (signed for the first moment, unsigned for the second), so the state costs about
2 bytes per parameter instead of 8. It runs anywhere PyTorch runs (CPU included); its state is
plain tensors, so ``optimizer.state_dict()`` checkpoints it. Tensors with fewer than
``min_8bit_size`` elements keep fp32 moments, as bitsandbytes does.

:func:`paged_adamw8bit` is bitsandbytes' paged 8-bit AdamW (CUDA only: its states page to host
memory under pressure).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from peftlab.core.errors import ConfigError
from peftlab.quant import _table, dequantize_blockwise, quantize_blockwise

STATE_BLOCKSIZE = 2048


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with block-wise 8-bit moments.

    Args:
        params: Parameters or parameter groups.
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW``.
        min_8bit_size: Tensors smaller than this keep fp32 moments.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096) -> None:
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ConfigError(f"AdamW8bit: need lr > 0, eps > 0, 0 <= betas < 1, weight_decay >= 0 "
                              f"(got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay})")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "min_8bit_size": min_8bit_size})

    @staticmethod
    def _encode(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_blockwise(x, _table(kind, x.device), STATE_BLOCKSIZE)

    @staticmethod
    def _decode(codes: torch.Tensor, absmax: torch.Tensor, kind: str, like: torch.Tensor) -> torch.Tensor:
        return dequantize_blockwise(codes, absmax, _table(kind, codes.device), STATE_BLOCKSIZE,
                                    like.numel()).view(like.shape)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                eight = p.numel() >= group["min_8bit_size"]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if eight:
                        zeros = torch.zeros_like(g)
                        state["m_codes"], state["m_absmax"] = self._encode(zeros, "dynamic")
                        state["v_codes"], state["v_absmax"] = self._encode(zeros, "udynamic")
                    else:
                        state["m"], state["v"] = torch.zeros_like(g), torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])
                if eight:
                    m = self._decode(state["m_codes"], state["m_absmax"], "dynamic", g)
                    v = self._decode(state["v_codes"], state["v_absmax"], "udynamic", g)
                else:
                    m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if eight:
                    state["m_codes"], state["m_absmax"] = self._encode(m, "dynamic")
                    state["v_codes"], state["v_absmax"] = self._encode(v, "udynamic")
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                update = (m / (1 - b1 ** t)) / denom
                w = p.float()
                if group["weight_decay"]:
                    w.mul_(1 - group["lr"] * group["weight_decay"])
                w.add_(update, alpha=-group["lr"])
                p.copy_(w.to(p.dtype))
        return loss

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (moments, their constants, step counters)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))


def paged_adamw8bit(params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW (CUDA only)."""
    params = list(params)
    if not torch.cuda.is_available() or not any(
            (p["params"][0] if isinstance(p, dict) else p).is_cuda for p in params):
        raise ConfigError("paged_adamw8bit pages optimizer state between GPU and host and needs the model on a "
                          "CUDA GPU; on CPU use optimizer='adamw8bit' (peftlab.optim.AdamW8bit)")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError("paged_adamw8bit needs bitsandbytes (`pip install bitsandbytes`); or use "
                          "optimizer='adamw8bit'") from e
    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
