"""LoKr: low-rank Kronecker product update (LyCORIS; Yeh et al. 2024, https://arxiv.org/abs/2309.14859).

A frozen weight ``W`` (``d_out x d_in``) gets the update::

    delta W = s * W1 ⊗ W2,    W1: a x c,   W2: b x d,   d_out = a b,   d_in = c d,   s = alpha / r

``(a, b)`` and ``(c, d)`` come from peft's ``factorization`` rule (:func:`factorization`: the
divisor pair nearest the square root, or ``decompose_factor`` and its cofactor, the smaller first).
``W2`` is itself low rank, ``W2 = W2a W2b`` (``b x r``, ``r x d``), unless ``r >= max(b, d) / 2``;
``W1`` likewise with ``decompose_both`` (else full: it is the small factor). For a convolution
``W2`` carries the kernel: ``b x d x kh x kw``, factored as ``b x r`` times ``r x (d kh kw)`` or, with
``use_effective_conv2d``, in the Tucker form ``sum_pq T2[p, q, u, v] W2a[p, :] W2b[q, :]``.

Initialisation (peft's ``init_weights``): 'default' zeroes ``W1`` (or ``W1a``), the rest
Kaiming-uniform, so the adapted model equals the base; 'lycoris' (the LyCORIS repository's) zeroes
``W2`` (or ``W2b``) instead; 'random' zeroes nothing.

Forward without ``delta W``: for ``x`` of ``d_in = c d`` features viewed as a ``c x d`` matrix
``X``, ``(W1 ⊗ W2) vec(X) = vec(W1 X W2^T)``. Two small products, ``x d_in b + d_out c``
multiply-adds per token (or the mirror order, ``d_in a + d_out d``) instead of ``d_in d_out``; on a
convolution, ``W2``'s convolution runs on the ``c`` channel groups as a batch and ``W1`` mixes the
groups (channel mixing commutes with zero padding, stride and dilation). The layer takes the
cheapest of the two orders and forming ``delta W`` (which it does for grouped convolutions and
``nn.Conv1d``, as peft always does). On a linear layer the form is one autograd function
(``_KronLinear``) that keeps the layer's input only (peft keeps ``delta W`` and the input),
recomputes the per-position intermediate in its backward pass and works ``CHUNK`` positions at a
time in buffers reused by every chunk, so that no per-position transient outlives a chunk.
Tensor names and the config follow peft's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.method import register
from peftlab.methods._lycoris import LycorisLayer, LycorisMethod, Settings, kaiming_, mm, row_scaled

__all__ = ["LoKr", "LoKrLayer", "factorization"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (and LyCORIS') split of ``dimension`` into ``(m, n)``, ``m * n = dimension``, ``m <= n``.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)`` (either
    order is then possible). Otherwise divisors ``m`` are tried upwards from 1, each taken while it
    is at most ``factor`` (``-1``: no limit), until ``m >= n``; the pair is returned smaller first.
    So -1 gives the divisor pair nearest the square root (576 -> (24, 24), 1536 -> (32, 48)), a prime
    gives (1, p), and a factor below 2 other than -1 gives (1, dimension).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        d = m + 1
        while dimension % d:
            d += 1
        if d > limit:  # (peft also stops when d + dimension / d exceeds 1 + dimension: never true)
            break
        m, n = d, dimension // d
    return (n, m) if m > n else (m, n)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``W1 ⊗ W2`` reshaped to the base weight's ``shape``, exactly as peft forms it: ``W1`` gets two
    trailing axes when ``W2`` is a 4-D kernel; for ``nn.Conv1d`` with a full 3-D ``W2`` that is
    ``torch.kron`` of a 2-D and a 3-D tensor (``W1`` gains a leading axis), peft's layout."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    w2 = w2.reshape(-1).view(w2.shape)  # plain strides: torch.kron fails on an einsum's odd size-1 strides
    return torch.kron(w1, w2).reshape(shape)


CHUNK = 256
"""Positions per chunk of the factored linear form. The per-position intermediates (``X W2^T`` or
``W1 X``, and their gradients) exist for one chunk at a time and have the same size in every
chunk, so the allocator reuses one block for them: measured with glibc's default allocator at
2048 tokens a step, unchunked transients of odd sizes raised the peak resident set to 1.1-1.2 of
peft's although the live tensors were 0.9 of peft's (benchmarks/lycoris_vs_peft.py)."""


def _kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, order: str) -> torch.Tensor:
    """``(W1 ⊗ W2) x`` per position as ``vec(W1 X W2^T)``, ``X``: the ``c x d`` view of ``x``'s
    features (``W1``: ``a x c``, ``W2``: ``b x d``), ``CHUNK`` positions at a time into one output,
    the intermediate in one buffer reused by every chunk.

    ``w2_first``: ``T = X W2^T`` (one product over the chunk's ``c`` rows), then ``W1 T`` (a batched
    product); ``w1_first``: ``S = W1 X``, then ``S W2^T``. The first product of each chunk is
    written ``W @ X`` with a weight on the left of a matrix per position: that is how the memory
    estimator's probe reads LoKr's kept input (``estimate/count.py``; in training this runs in
    :class:`_KronLinear`'s forward, which keeps ``x`` itself)."""
    (a, c), (b, d) = w1.shape, w2.shape
    xs = x.reshape(-1, c, d)
    n = xs.shape[0]
    y = xs.new_empty(n, a, b)
    k = min(n, CHUNK)
    buf = xs.new_empty(k, b, c) if order == "w2_first" else xs.new_empty(k, a, d)
    for i in range(0, n, CHUNK):
        j = min(n, i + CHUNK)
        if order == "w2_first":
            t = torch.matmul(w2, xs[i:j].mT, out=buf[:j - i])  # T^T per position
            torch.bmm(w1.detach().expand(j - i, a, c), t.mT, out=y[i:j])
        else:
            s = torch.matmul(w1, xs[i:j], out=buf[:j - i])
            torch.mm(s.view(-1, d), w2.detach().t(), out=y[i:j].view(-1, b))
    return y.view(*x.shape[:-1], a * b)


class _KronLinear(torch.autograd.Function):
    """:func:`_kron_linear` with a hand-written backward: keeps ``x``, ``W1`` and ``W2`` only (the
    intermediate is recomputed, a chunk at a time) and forms every gradient chunk by chunk in
    buffers reused by every chunk, so training holds no per-position tensor beyond the layer's
    input, its output and ``dL/dx``, and allocates a handful of tensors per layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, order: str) -> torch.Tensor:
        ctx.save_for_backward(x, w1, w2)
        ctx.order = order
        return _kron_linear(x, w1, w2, order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, w2 = ctx.saved_tensors
        (a, c), (b, d) = w1.shape, w2.shape
        xs = x.reshape(-1, c, d)
        n = xs.shape[0]
        g = grad.reshape(n, a, b)
        need_x, need_w1, need_w2, _ = ctx.needs_input_grad
        gx = xs.new_empty(n, c, d) if need_x else None
        gw1 = w1.new_zeros(a, c) if need_w1 else None
        gw2 = w2.new_zeros(b, d) if need_w2 else None
        k = min(n, CHUNK)
        mid = xs.new_empty(k, c, b) if ctx.order == "w2_first" else xs.new_empty(k, a, d)  # T or S, then its gradient
        prod = xs.new_empty(k, a, c) if need_w1 else None  # per-position terms of dL/dW1
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            m, xc, gc = j - i, xs[i:j], g[i:j]
            h = mid[:m]
            if ctx.order == "w2_first":  # T = X W2^T, Y = W1 T
                if gw1 is not None:
                    torch.mm(xc.reshape(-1, d), w2.t(), out=h.view(-1, b))
                    gw1 += torch.bmm(gc, h.mT, out=prod[:m]).sum(0)
                if gx is not None or gw2 is not None:
                    torch.bmm(w1.t().expand(m, c, a), gc, out=h)  # dL/dT
                    if gw2 is not None:
                        gw2.addmm_(h.view(-1, b).t(), xc.reshape(-1, d))
                    if gx is not None:
                        torch.mm(h.view(-1, b), w2, out=gx[i:j].view(-1, d))
            else:  # S = W1 X, Y = S W2^T
                g2 = gc.reshape(-1, b)
                if gw2 is not None:
                    gw2.addmm_(g2.t(), torch.bmm(w1.expand(m, a, c), xc, out=h).view(-1, d))
                if gx is not None or gw1 is not None:
                    torch.mm(g2, w2, out=h.view(-1, d))  # dL/dS
                    if gw1 is not None:
                        gw1 += torch.bmm(h, xc.mT, out=prod[:m]).sum(0)
                    if gx is not None:
                        torch.bmm(w1.t().expand(m, c, a), h, out=gx[i:j])
        return (gx.view(x.shape) if gx is not None else None), gw1, gw2, None


class LoKrLayer(LycorisLayer):
    """LoKr on ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` (peft's tensor names and shapes)."""

    owner_method = "lokr"
    class_prefix = "LoKr"
    adapter_containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    parameter_containers = adapter_containers
    peftlab_lokr_shape: dict[str, tuple[int, int, int, int]]

    def add_adapter(self, name: str, r: int, alpha: float, method: LoKr) -> None:
        w = self.weight
        kernel = tuple(int(k) for k in w.shape[2:])
        out_l, out_k = factorization(int(w.shape[0]), method.decompose_factor)
        in_m, in_n = factorization(int(w.shape[1]), method.decompose_factor)  # channels / groups
        whole_w1 = not (method.decompose_both and r < max(out_l, in_m) / 2)
        whole_w2 = r >= max(out_k, in_n) / 2
        effective = method.use_effective_conv2d and math.prod(kernel) > 1 and not whole_w2
        shapes: dict[str, tuple[int, ...]] = {}
        if whole_w1:
            shapes["lokr_w1"] = (out_l, in_m)
        else:
            shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, r), (r, in_m)
        if whole_w2:
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif effective:  # a Conv1d kernel k is stored (k, 1), as peft stores it
            spatial = kernel if len(kernel) == 2 else (kernel[0], 1)
            shapes["lokr_w2_a"], shapes["lokr_w2_b"], shapes["lokr_t2"] = (r, out_k), (r, in_n), (r, r, *spatial)
        else:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (out_k, r), (r, in_n * math.prod(kernel))
        kw = self.factory()
        params = {c: nn.Parameter(torch.empty(shape, **kw)) for c, shape in shapes.items()}
        zero = {"default": ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), "random": ()}[method.init]
        with torch.no_grad():  # peft's order, so that a seeded CPU init draws what peft draws
            for c in self.adapter_containers:
                if c in params:
                    nn.init.zeros_(params[c]) if c in zero else kaiming_(params[c])
        for c, p in params.items():
            getattr(self, c)[name] = p
        self._set_settings(name, Settings(r, alpha, method.rank_dropout, method.module_dropout,
                                          method.rank_dropout_scale, effective))
        self.__dict__.setdefault("peftlab_lokr_shape", {})[name] = (out_l, out_k, in_m, in_n)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.__dict__.get("peftlab_lokr_shape", {}).pop(name, None)

    def restore(self) -> nn.Module:
        self.__dict__.pop("peftlab_lokr_shape", None)
        return super().restore()

    # ----------------------------------------------------------------------- maths
    def w1(self, name: str) -> torch.Tensor:
        if name in self.lokr_w1:
            return self.lokr_w1[name]
        return mm(self.lokr_w1_a[name], self.lokr_w1_b[name])

    def w2(self, name: str) -> torch.Tensor:
        """``W2`` as peft forms it: the full tensor, the Tucker kernel (4-D) or ``W2a W2b`` (2-D)."""
        if name in self.lokr_w2:
            return self.lokr_w2[name]
        if name in self.lokr_t2:
            return torch.einsum("pquv,pb,qd->bduv", self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        return mm(self.lokr_w2_a[name], self.lokr_w2_b[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        w1, w2 = self.w1(name).float(), self.w2(name).float()
        return kron_delta(w1, w2, self.weight.shape) * self.settings(name).scaling

    def dense_update(self, name: str, x: torch.Tensor, rows: float | torch.Tensor) -> torch.Tensor:
        """peft's form: ``delta W`` formed (autograd keeps only the two factors), then applied."""
        w1, w2 = self.w1(name), self.w2(name)
        return self.apply_delta(x.to(w1.dtype), row_scaled(kron_delta(w1, w2, self.weight.shape), rows))

    def _plans(self, name: str, x: torch.Tensor) -> dict[str, float]:
        """Multiply-adds per input position of each way to apply ``delta W``."""
        out_l, out_k, in_m, in_n = self.peftlab_lokr_shape[name]
        k = math.prod(self.weight.shape[2:])
        d_out, d_in = out_l * out_k, in_m * in_n
        plans = {"dense": float(d_out * d_in * k)}
        if isinstance(self, nn.Linear) or (self.weight.dim() == 4 and self.groups == 1):
            plans["w2_first"] = float(in_m * out_k * in_n * k + d_out * in_m)
            plans["w1_first"] = float(out_l * in_m * in_n + out_l * out_k * in_n * k)
        return plans

    def factored_update(self, name: str, x: torch.Tensor, rows: float | torch.Tensor,
                        order: str = "w2_first") -> torch.Tensor:
        """``vec(W1 X W2^T)``: ``x``'s features (or channels) viewed as ``c x d``, never ``delta W``."""
        out_l, out_k, in_m, in_n = self.peftlab_lokr_shape[name]
        w1, w2 = self.w1(name), self.w2(name)
        if not torch.is_grad_enabled():  # torch.matmul picks its kernel by requires_grad: frozen or
            w1, w2 = w1.detach(), w2.detach()  # trainable, an adapter gives the same bits without grad
        scalar = not isinstance(rows, torch.Tensor)
        if scalar:
            w1 = w1 * rows  # the scale on the smallest tensor
        x = x.to(w1.dtype)
        if isinstance(self, nn.Linear):
            if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
                # keeps only the layer's input (as the dense form does, but never delta W); the
                # intermediate is recomputed, a chunk of positions at a time, in the backward pass
                y = _KronLinear.apply(x, w1, w2, order)
            else:
                y = _kron_linear(x, w1, w2, order)
        else:  # Conv2d, groups 1: W2's convolution on the c channel groups as a batch, W1 mixes them
            kernel = w2.reshape(out_k, in_n, *self.weight.shape[2:])
            n, hw = x.shape[0], x.shape[2:]
            if order == "w2_first":
                h = self.conv_update(x.reshape(n * in_m, in_n, *hw), kernel)
                y = (w1 @ h.reshape(n, in_m, -1)).reshape(n, out_l * out_k, *h.shape[2:])
            else:
                z = (w1 @ x.reshape(n, in_m, -1)).reshape(n * out_l, in_n, *hw)
                h = self.conv_update(z, kernel)
                y = h.reshape(n, out_l * out_k, *h.shape[2:])
        return y if scalar else row_scaled(y, rows, -1 if isinstance(self, nn.Linear) else 1)

    def update(self, name: str, x: torch.Tensor, rows: float | torch.Tensor) -> torch.Tensor:
        plans = self._plans(name, x)
        best = min(plans, key=plans.__getitem__)
        if best == "dense":
            return self.dense_update(name, x, rows)
        return self.factored_update(name, x, rows, best)


@register("lokr")
@dataclass(frozen=True)
class LoKr(LycorisMethod):
    """Low-rank Kronecker product (peft's ``LOKR``). Mergeable; identity at init; several adapters
    per model. Fields: those of LoHa plus decompose_both, decompose_factor, rank_dropout_scale, and
    ``init``: 'default' (peft's ``init_weights=True``), 'lycoris' (``init_weights="lycoris"``) or
    'random' (``init_weights=False``, not the identity at init)."""

    decompose_both: bool = False
    """Factor W1 too (``W1a W1b``) when ``r < max(a, c) / 2`` (peft's option)."""
    decompose_factor: int = -1
    """Split each dimension as (factor, dimension / factor); -1: the divisor pair nearest the
    square root (peft's default)."""
    rank_dropout_scale: bool = False
    """Rescale the rows kept by rank dropout by 1 / (their share), as dropout does (peft's option)."""

    peft_type: ClassVar[str | None] = "LOKR"
    suggested_lr: ClassVar[float] = 1e-3
    typical_score: ClassVar[float | None] = None
    typical_score_source: ClassVar[str] = (
        "none published: Yeh et al. 2024 (LyCORIS) compare LoKr with full fine-tuning on Stable Diffusion by several "
        "metrics and rankings (fidelity: full > LoKr with a low factor > LoRA), with no single score relative to "
        "full fine-tuning; the recommender uses measured bench rows")
    inits: ClassVar[dict[str, Any]] = {"default": True, "random": False, "lycoris": "lycoris"}
    extra_peft_fields: ClassVar[tuple[str, ...]] = ("decompose_both", "decompose_factor", "rank_dropout_scale")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError(f"lokr: decompose_factor must be -1 (the divisor pair nearest the square root) or a "
                              f"positive factor (got {self.decompose_factor})")

    def attach(self, model: nn.Module, name: str) -> None:
        modules = self.targets(model)
        plan = {path: self.rank_alpha(path) for path in modules}
        for path, module in modules.items():
            layer = LoKrLayer.adopt(module)
            assert isinstance(layer, LoKrLayer)
            layer.add_adapter(name, *plan[path], self)
