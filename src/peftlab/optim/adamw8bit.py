"""8-bit AdamW for memory-constrained training.

AdamW's two moments in 8 bits (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization", https://arxiv.org/abs/2110.02861): each moment is cut into blocks of
``blocksize`` values, scaled by the block's absmax and stored as one byte per value on the
dynamic 8-bit map (signed for the first moment, unsigned for the second), so the state costs
about 2 bytes per parameter instead of 8. Tensors with fewer than ``min_8bit_size`` elements keep
fp32 moments, as bitsandbytes does.

* :func:`make_adamw8bit` gives bitsandbytes' ``AdamW8bit`` where bitsandbytes imports and steps
  correctly on the parameters' device (its CPU kernels included, bitsandbytes >= 0.49; checked
  once per device by one probe step), else peftlab's :class:`AdamW8bit`.
* :class:`AdamW8bit` is the same algorithm in plain PyTorch (any device): same map, same block
  size by default (256), same update order (moments in fp32, the step from the fp32 moments, then
  re-quantization to the nearest level). Its state is plain tensors, so ``state_dict()``
  checkpoints it.
* :func:`paged_adamw8bit` is bitsandbytes' paged 8-bit AdamW (CUDA only: its states page to host
  memory under pressure).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from peftlab.core.errors import ConfigError
from peftlab.quant import _table, dequantize_blockwise, import_bitsandbytes, quantize_blockwise

STATE_BLOCKSIZE = 256
"""Moment values per fp32 absmax: bitsandbytes' block size for 8-bit optimizer states (its CPU
and CUDA kernels). Smaller blocks track fp32 AdamW more closely at 4 bytes per block and moment:
256 adds 0.031 byte per parameter, 2048 0.004 (measured, 50 steps on a 1M-parameter layer:
relative distance to fp32 AdamW 0.019 at 256 against 0.022 at 2048; see docs/qlora.md)."""
BACKENDS = ("auto", "torch", "bitsandbytes")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with block-wise 8-bit moments, in plain PyTorch.

    Args:
        params: Parameters or parameter groups.
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW``.
        min_8bit_size: Tensors smaller than this keep fp32 moments (bitsandbytes: 4096).
        blocksize: Moment values per absmax (:data:`STATE_BLOCKSIZE`, bitsandbytes' 256); a power
            of two >= 2.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096,
                 blocksize: int = STATE_BLOCKSIZE) -> None:
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ConfigError(f"AdamW8bit: need lr > 0, eps > 0, 0 <= betas < 1, weight_decay >= 0 "
                              f"(got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay})")
        if not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
            raise ConfigError(f"AdamW8bit: blocksize must be a power of two >= 2 (got {blocksize!r}); "
                              f"bitsandbytes uses {STATE_BLOCKSIZE}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "min_8bit_size": min_8bit_size, "blocksize": blocksize})

    @staticmethod
    def _decode(codes: torch.Tensor, absmax: torch.Tensor, kind: str, blocksize: int,
                like: torch.Tensor) -> torch.Tensor:
        return dequantize_blockwise(codes, absmax, _table(kind, codes.device), blocksize,
                                    like.numel()).view(like.shape)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, bs = group["lr"], group["blocksize"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                eight = p.numel() >= group["min_8bit_size"]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if eight:
                        state["m_codes"], state["m_absmax"] = quantize_blockwise(torch.zeros_like(g), "dynamic", bs)
                        state["v_codes"], state["v_absmax"] = quantize_blockwise(torch.zeros_like(g), "udynamic", bs)
                    else:
                        state["m"], state["v"] = torch.zeros_like(g), torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])
                if eight:
                    m = self._decode(state["m_codes"], state["m_absmax"], "dynamic", bs, g)
                    v = self._decode(state["v_codes"], state["v_absmax"], "udynamic", bs, g)
                else:
                    m, v = state["m"], state["v"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                # torch.optim.AdamW's (and bitsandbytes') order: the step from the fp32 moments
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
                w = p if p.dtype == torch.float32 else p.float()
                if group["weight_decay"]:
                    w.mul_(1 - lr * group["weight_decay"])
                w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                if w is not p:
                    p.copy_(w)
                if eight:
                    state["m_codes"], state["m_absmax"] = quantize_blockwise(m, "dynamic", bs)
                    state["v_codes"], state["v_absmax"] = quantize_blockwise(v, "udynamic", bs)
        return loss

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (moments, their constants, step counters)."""
        return state_bytes(self)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by any optimizer's state tensors, each storage counted once (bitsandbytes shares
    its two 256-entry maps between parameters)."""
    seen: dict[tuple[str, int], int] = {}
    for s in optimizer.state.values():
        for t in s.values():
            if isinstance(t, torch.Tensor):
                seen[(str(t.device), t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(seen.values())


_WORKS: dict[str, bool] = {}


def bitsandbytes_adamw8bit_works(device: torch.device | str) -> bool:
    """Whether bitsandbytes' ``AdamW8bit`` imports and takes a correct 8-bit step on ``device``:
    one step on 4096 values from a zero state must move each weight by ``lr * g / (|g| + eps)``
    (plus weight decay), AdamW's first step, and keep uint8 moments. Checked once per device type
    (about a millisecond)."""
    kind = torch.device(device).type
    if kind not in _WORKS:
        bnb = import_bitsandbytes()
        ok = False
        if bnb is not None:
            try:
                g = torch.Generator().manual_seed(0)
                w0 = torch.randn(64, 64, generator=g)
                grad = torch.randn(64, 64, generator=g)
                p = torch.nn.Parameter(w0.clone().to(device))
                opt = bnb.optim.AdamW8bit([p], lr=1e-2, weight_decay=0.1)
                p.grad = grad.clone().to(device)
                opt.step()
                want = w0 * (1 - 1e-2 * 0.1) - 1e-2 * grad / (grad.abs() + 1e-8)
                ok = (opt.state[p]["state1"].dtype == torch.uint8
                      and bool(torch.allclose(p.detach().cpu(), want, rtol=0, atol=1e-5)))
            except Exception:  # noqa: BLE001 (no kernel for this device: not usable)
                ok = False
        _WORKS[kind] = ok
    return _WORKS[kind]


def make_adamw8bit(params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096,
              backend: str = "auto") -> torch.optim.Optimizer:
    """8-bit AdamW: ``backend="auto"`` gives bitsandbytes' ``AdamW8bit`` where it works on every
    parameter's device (:func:`bitsandbytes_adamw8bit_works`), else peftlab's :class:`AdamW8bit`
    (same map and block size); ``"torch"`` always peftlab's, ``"bitsandbytes"`` always
    bitsandbytes' (an error where it does not work)."""
    if backend not in BACKENDS:
        raise ConfigError(f"make_adamw8bit: backend must be one of {BACKENDS} (got {backend!r})")
    params = list(params)
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    devices = {t.device.type for t in tensors}
    works = backend != "torch" and bool(devices) and all(bitsandbytes_adamw8bit_works(d) for d in devices)
    if backend == "bitsandbytes" and not works:
        raise ConfigError(f"make_adamw8bit: bitsandbytes' AdamW8bit does not import or step correctly on "
                          f"{sorted(devices)} here (`pip install bitsandbytes>=0.49` for CPU); use backend='auto' "
                          "or 'torch' (peftlab's AdamW8bit, same algorithm)")
    kw = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "min_8bit_size": min_8bit_size}
    if works:
        return import_bitsandbytes().optim.AdamW8bit(params, **kw)
    return AdamW8bit(params, **kw)


def paged_adamw8bit(params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW (CUDA only)."""
    params = list(params)
    if not torch.cuda.is_available() or not any(
            (p["params"][0] if isinstance(p, dict) else p).is_cuda for p in params):
        raise ConfigError("paged_adamw8bit pages optimizer state between GPU and host and needs the model on a "
                          "CUDA GPU; on CPU use optimizer='adamw8bit' (peftlab.optim.make_adamw8bit)")
    bnb = import_bitsandbytes()
    if bnb is None:
        raise ConfigError("paged_adamw8bit needs bitsandbytes (`pip install bitsandbytes`); or use "
                          "optimizer='adamw8bit'")
    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
