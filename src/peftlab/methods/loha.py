"""LoHa: low-rank Hadamard product update (LyCORIS; FedPara, Hyeon-Woo et al. 2022,
https://arxiv.org/abs/2108.06098).

A frozen weight ``W`` (``d_out x d_in``; a convolution's kernel flattened to ``d_out x c_in k``)
gets the update::

    delta W = s * (W1a W1b) ∘ (W2a W2b),    W1a, W2a: d_out x r,   W1b, W2b: r x d_in,   s = alpha / r

The Hadamard product of two rank-``r`` matrices has rank up to ``r^2`` for the parameters of a
rank-``2r`` LoRA. ``W2b`` starts at zero (the adapted model equals the base at initialisation),
the other factors Kaiming-uniform, as peft (``init_weights=True``).

With ``use_effective_conv2d`` a convolution with a kernel larger than 1 gets FedPara's Tucker form
(Proposition 3) instead: ``W1[o, i, u, v] = sum_pq T1[p, q, u, v] W1a[p, o] W1b[q, i]`` (and ``W2``
alike), ``T1``: ``r x r x kh x kw``, ``W1a``: ``r x d_out``, ``W1b``: ``r x c_in``.

Forward. peft forms ``delta W`` (``d_out x d_in``) on every call. Since
``(A1 B1) ∘ (A2 B2) = (A1 • A2)(B1 • B2)^T`` with ``•`` the row-wise Kronecker (Khatri-Rao)
product, ``delta W x = U (V x)`` with ``U = A1 • A2`` (``d_out x r^2``) and ``V`` (``r^2 x d_in``):
``r^2 (d_in + d_out)`` multiply-adds per token instead of ``d_in d_out``, and no ``d_out x d_in``
tensor kept for the backward pass. The layer takes whichever form costs fewer multiply-adds for the
call (the factored one unless ``r^2`` approaches ``d_in d_out / (d_in + d_out)``, or the call's
positions times ``r^2`` would exceed ``d_in d_out``, what the formed update keeps); the materialised
form recomputes ``delta W`` in the backward pass instead of keeping the two products (what peft's
custom autograd function does). Tensor names and the config follow peft's, so files load both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftlab.core.method import register
from peftlab.methods._lycoris import CONV, LycorisLayer, LycorisMethod, Settings, kaiming_, mm, row_scaled
from peftlab.methods.lora import check_rank

__all__ = ["LoHa", "LoHaLayer"]


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``sum_pq t[p, q, u, v] wa[p, o] wb[q, i]`` -> ``(d_out, c_in, kh, kw)``."""
    return torch.einsum("pquv,po,qi->oiuv", t, wa, wb)


class LoHaLayer(LycorisLayer):
    """LoHa on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (peft's tensor names and shapes)."""

    owner_method = "loha"
    class_prefix = "LoHa"
    adapter_containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    parameter_containers = adapter_containers

    def _flat(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight as a matrix (a kernel flattened: ``c_in / groups * k``)."""
        w = self.weight
        return int(w.shape[0]), math.prod(w.shape[1:])

    def add_adapter(self, name: str, r: int, alpha: float, method: LoHa) -> None:
        w = self.weight
        kernel = tuple(w.shape[2:])
        effective = method.use_effective_conv2d and math.prod(kernel) > 1  # peft: not for 1x1 kernels
        kw = self.factory()
        if effective:  # Tucker form; a Conv1d kernel k is stored (k, 1), as peft stores it
            spatial = kernel if len(kernel) == 2 else (kernel[0], 1)
            shapes = {"hada_w1_a": (r, w.shape[0]), "hada_w1_b": (r, w.shape[1]),
                      "hada_w2_a": (r, w.shape[0]), "hada_w2_b": (r, w.shape[1]),
                      "hada_t1": (r, r, *spatial), "hada_t2": (r, r, *spatial)}
        else:
            d_out, d_in = self._flat()
            shapes = {"hada_w1_a": (d_out, r), "hada_w1_b": (r, d_in), "hada_w2_a": (d_out, r),
                      "hada_w2_b": (r, d_in)}
        params = {c: nn.Parameter(torch.empty(shape, **kw)) for c, shape in shapes.items()}
        with torch.no_grad():  # peft's order, so that a seeded CPU init draws what peft draws
            for c in self.adapter_containers:
                if c in params:
                    if c == "hada_w2_b" and method.init == "default":
                        nn.init.zeros_(params[c])
                    else:
                        kaiming_(params[c])
        for c, p in params.items():
            getattr(self, c)[name] = p
        self._set_settings(name, Settings(r, alpha, method.rank_dropout, method.module_dropout, True, effective))

    # ----------------------------------------------------------------------- maths
    def _factors(self, name: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, c)[name] for c in self.adapter_containers if name in getattr(self, c))

    def _dense(self, rows: float | torch.Tensor, *f: torch.Tensor) -> torch.Tensor:
        """``delta W`` (the base weight's shape) from the factors, output rows scaled by ``rows``."""
        if len(f) == 6:
            w1a, w1b, w2a, w2b, t1, t2 = f
            delta = _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b)
        else:
            w1a, w1b, w2a, w2b = f
            delta = mm(w1a, w1b) * mm(w2a, w2b)
        return row_scaled(delta, rows).reshape(self.weight.shape)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self._dense(self.settings(name).scaling, *(t.float() for t in self._factors(name)))

    def dense_update(self, name: str, x: torch.Tensor, rows: float | torch.Tensor) -> torch.Tensor:
        """peft's form: ``delta W`` formed, then applied. In training the two products are
        recomputed in the backward pass rather than kept (``d_out x d_in`` each)."""
        f = self._factors(name)
        if torch.is_grad_enabled() and any(t.requires_grad for t in f):
            delta = checkpoint(self._dense, rows, *f, use_reentrant=False, preserve_rng_state=False)
        else:
            delta = self._dense(rows, *f)
        return self.apply_delta(x.to(f[0].dtype), delta)

    def factored_update(self, name: str, x: torch.Tensor, rows: float | torch.Tensor) -> torch.Tensor:
        """``U (V x)`` with ``U = W1a • W2a`` (``d_out x r^2``) and ``V = W1b • W2b`` (``r^2 x d_in``)."""
        w1a, w1b, w2a, w2b = self._factors(name)
        r = w1a.shape[1]
        v = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, -1)
        u = row_scaled((w1a[:, :, None] * w2a[:, None, :]).reshape(-1, r * r), rows)
        x = x.to(w1a.dtype)
        if isinstance(self, nn.Linear):
            return (x @ v.T) @ u.T
        h = self.conv_update(x, v.reshape(r * r, *self.weight.shape[1:]))
        ones = (1,) * (self.weight.dim() - 2)
        return CONV[self.weight.dim()](h, u.reshape(*u.shape, *ones))

    def factored_is_cheaper(self, name: str, x: torch.Tensor) -> bool:
        """Whether the factored form costs fewer multiply-adds in one training step (forward and
        backward) and keeps no more for the backward pass (``r^2`` per position) than the formed
        ``delta W`` (``d_out x d_in``) does."""
        s = self.settings(name)
        if s.effective_conv or getattr(self, "groups", 1) != 1:
            return False
        d_out, d_in = self._flat()
        channels = x.shape[-1] if isinstance(self, nn.Linear) else x.shape[1]
        tokens = x.numel() // max(1, channels)  # a convolution: input positions, about its output's
        rr = s.r * s.r
        fewer = 3 * tokens * rr * (d_in + d_out) + 2 * rr * (d_in + d_out) < 3 * tokens * d_in * d_out + 8 * s.r * d_in * d_out
        return fewer and tokens * rr <= d_in * d_out

    def update(self, name: str, x: torch.Tensor, rows: float | torch.Tensor) -> torch.Tensor:
        if self.factored_is_cheaper(name, x):
            return self.factored_update(name, x, rows)
        return self.dense_update(name, x, rows)


@register("loha")
@dataclass(frozen=True)
class LoHa(LycorisMethod):
    """Low-rank Hadamard product (peft's ``LOHA``). Mergeable; identity at init; several adapters
    per model. Fields: r, alpha, rank_dropout, module_dropout, use_effective_conv2d, targets,
    rank/alpha patterns, and ``init``: 'default' (peft's ``init_weights=True``: ``hada_w2_b`` zero,
    the rest Kaiming-uniform) or 'random' (``init_weights=False``: every factor random, not the
    identity at init)."""

    peft_type: ClassVar[str | None] = "LOHA"
    suggested_lr: ClassVar[float] = 1e-3
    typical_score: ClassVar[float | None] = None
    typical_score_source: ClassVar[str] = (
        "none published: FedPara (Hyeon-Woo et al. 2022) trains from scratch in federated learning, and Yeh et al. "
        "2024 (LyCORIS) rank LoHa below full fine-tuning and LoRA on concept fidelity for Stable Diffusion without a "
        "score relative to full fine-tuning; the recommender uses measured bench rows")
    """LoRA's: with alpha = r the update's scale is 1, as LoRA's default alpha / r = 2 is close to."""

    def attach(self, model: nn.Module, name: str) -> None:
        modules = self.targets(model)
        plan = {path: self.rank_alpha(path) for path in modules}
        for path, module in modules.items():  # every check before any change
            check_rank(module, plan[path][0], path)
        for path, module in modules.items():
            layer = LoHaLayer.adopt(module)
            assert isinstance(layer, LoHaLayer)
            layer.add_adapter(name, *plan[path], self)
