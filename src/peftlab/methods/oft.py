"""OFT: orthogonal finetuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280), in the
input-centric form of OFTv2 (Qiu et al. 2025, https://arxiv.org/abs/2506.19847) that peft 0.21 uses.

A frozen weight ``W`` is multiplied by a trained block-diagonal orthogonal matrix ``R`` on its
input side. With ``d`` the layer's input width split into ``r`` blocks of ``b`` (``r * b = d``)::

    h = W R^T x + bias,     R = diag(R_1, ..., R_r),   R_i = cayley(Q_i),   Q_i = -Q_i^T  (b x b)

so the merged weight is ``W' = W R^T``. Only the strictly upper-triangular entries of each ``Q_i``
train (``b (b - 1) / 2`` per block, one row per block of the ``(r, b(b-1)/2)`` tensor
``oft_R.weight``, peft's layout), and they start at zero: ``R = I``, the base model exactly.

The forward rotates the input block by block (one batched ``b x b`` product per block, no
``d x d`` matrix) and then calls the base layer; with an ``(r, b, b)`` batch of rotations the
work is ``N d b`` for ``N`` tokens instead of ``N d^2``. The backward pass keeps a view of the
input itself (not a copy) and the blocks; with ``recompute=True`` (the default) the series behind
the blocks is recomputed there from the parameter (:func:`blocks_from`) instead of keeping its powers of ``Q``.

peft's two parametrisations, reproduced exactly (so that files load both ways):

* ``cayley_neumann=True`` (peft's default, ``use_cayley_neumann``): the series of OFTv2's
  ``(I + Q)(I - Q)^-1 ~ (I + Q)(I + Q + ... + Q^k)``, in peft's form
  ``I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m`` with ``m = max(3, terms - 1)`` (``terms = 2``:
  ``I + 2Q``). Only approximately orthogonal; the error grows like ``||Q||^m``.
* ``cayley_neumann=False``: the exact Cayley transform peft computes, ``(I - Q)(I + Q)^-1``
  (orthogonal to rounding; it is the transpose of the series' target, as in peft).

Options: ``coft`` (constrained OFT: each block's ``Q`` is projected back into the Frobenius ball
of radius ``eps / sqrt(stored blocks)`` on every training forward, written into the parameter as
peft does), ``block_share`` (one ``Q`` for every block), ``module_dropout`` (during training, the
rotations of ``int(p * r)`` random blocks are replaced by the identity: the paper's
multiplicative dropout; peft 0.21 builds this layer but never calls it, so only there peftlab's
training differs from peft's; evaluation and files are the same).

Layers: ``nn.Linear``; ``nn.Embedding`` (the embedding's output is rotated, ``W' = W R``, peft's
``oft_embedding_R``); ``nn.Conv2d`` with a square kernel, dilation 1 and no groups (the input
side is the flattened ``in x k x k`` filter, ``W'_flat = W_flat R^T``; peft's limits). On a
convolution peftlab convolves with the rotated kernel: that is peft's merged model, and peft's
unmerged forward for 1x1 kernels; for larger kernels peft 0.21's unmerged forward folds
overlapping patches back by summation and is not even the identity at initialisation, which
peftlab does not copy. GPT-2's ``Conv1D`` is refused: peft's OFT does not adapt it, so such a
file could not load there.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import Method, register, wrapped_base_key
from peftlab.core.targets import ALL_LINEAR, select, peft_targets
from peftlab.core.transaction import on_undo

__all__ = ["OFT", "RotationMerge", "adjust_blocks", "cayley", "rotate", "skew"]

PEFT_FORMAT_VERSION = "0.21.2"
"""The peft release whose OFT file format and maths this module follows (written as the config's
``peft_version``: peft reads it to tell the Cayley-Neumann series of 0.18+ from the older one)."""
BIAS_MODES = ("none", "all", "oft_only")
SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv2d)


# ----------------------------------------------------------------------------- the maths
def adjust_blocks(d: int, wanted: int) -> int:
    """peft's rule for a block size (or block count) that does not divide ``d``: the nearest
    divisor of ``d``, the lower one on a tie; ``d`` itself when ``wanted >= d``."""
    if wanted >= d:
        return d
    higher = wanted
    while higher <= d and d % higher:
        higher += 1
    lower = wanted
    while lower > 1 and d % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


_TRIU: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _triangles(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions ``i * b + j`` (``i < j``, row-major: peft's ``triu_indices`` order) of a
    ``b x b`` block's upper triangle, and their mirrors ``j * b + i``."""
    key = (b, str(device))
    if key not in _TRIU:
        with torch.inference_mode(False):  # a cached tensor made under inference_mode could not enter autograd later
            rows, cols = torch.triu_indices(b, b, 1, device=device)
            _TRIU[key] = (rows * b + cols, cols * b + rows)
    return _TRIU[key]


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """``(n, b(b-1)/2)`` upper-triangle entries -> ``(n, b, b)`` skew-symmetric ``Q = U - U^T``
    (written by two scatters into zeros: no elementwise pass over a transposed block)."""
    upper, lower = _triangles(b, vec.device)
    flat = vec.new_zeros(vec.shape[0], b * b).index_copy_(1, upper, vec).index_copy_(1, lower, -vec)
    return flat.view(-1, b, b)


def project(vec: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT's constraint: each block's ``Q`` scaled into the Frobenius ball of radius
    ``eps / sqrt(n)`` (``n`` stored blocks); ``||Q||_F = sqrt(2) ||upper entries||``."""
    limit = eps / math.sqrt(vec.shape[0])
    norm = vec.float().pow(2).sum(1, keepdim=True).mul(2).sqrt()
    return torch.where(norm <= limit, vec.float(), vec.float() * (limit / norm.clamp_min(1e-30))).to(vec.dtype)


def _coefficients(terms: int) -> list[int]:
    """peft's series ``I + 2Q + ... + 2Q^(m-1) + Q^m`` (``m = max(3, terms - 1)``): ``c_0 .. c_m``, then a 0."""
    m = max(3, terms - 1)
    return [1] + [2] * (m - 1) + [1, 0]


def _horner(q: torch.Tensor, q2: torch.Tensor, c: list[int], last: bool = True) -> list[torch.Tensor]:
    """The Horner accumulators of ``sum_k c_k Q^k`` in ``Q^2`` with coefficients linear in ``Q``
    (``A_j = c_2j I + c_2j+1 Q``), the innermost first and the series itself last (left out with
    ``last=False``, for the backward pass): ``acc <- A_j + Q^2 acc`` for ``j`` downwards (one
    ``baddbmm`` and a diagonal add each)."""
    m = len(c) - 2  # (c_m = 1)
    if m % 2 == 0:  # A_(m/2) = c_m I: its product with Q^2 is Q^2
        acc, j, diag = torch.add(q2, q, alpha=c[m - 1]), m // 2 - 2, c[m - 2]
    else:
        acc, j, diag = q.clone(), m // 2 - 1, c[m - 1]
    acc.diagonal(dim1=1, dim2=2).add_(diag)
    accs = [acc]
    while j >= (0 if last else 1):
        acc = torch.baddbmm(q, q2, acc, beta=c[2 * j + 1])  # c_2j+1 Q + Q^2 acc ...
        acc.diagonal(dim1=1, dim2=2).add_(c[2 * j])  # ... + c_2j I
        accs.append(acc)
        j -= 1
    return accs


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """The orthogonal blocks from skew-symmetric ``q`` (``(n, b, b)``), as peft computes them
    (see the module docstring for the two forms).

    The series ``sum_k c_k Q^k`` (``c = 1, 2, ..., 2, 1``) is evaluated by Horner's rule in ``Q^2``
    (:func:`_horner`): ``1 + floor(m / 2)`` batched products instead of peft's ``m - 1`` (2 instead
    of 3 for the default), and fewer kept for backward.
    """
    if neumann and terms >= 3:
        return _horner(q, torch.bmm(q, q), _coefficients(terms))[-1]
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q)  # (I + Q)^-1 (I - Q) = (I - Q)(I + Q)^-1
    if terms <= 1:
        return eye.expand_as(q).clone()
    return torch.add(eye, q, alpha=2)


def _series_backward(q: torch.Tensor, grad: torch.Tensor, terms: int) -> torch.Tensor:
    """The series' backward in closed form: for ``grad = dL/dR``, ``R = sum_k c_k Q^k``, a ``Z`` whose
    skew part is that of ``dL/dQ`` (all that reaches the parameter: ``Q = U - U^T``).

    Reverse Horner: each step ``acc' = A_j + Q^2 acc`` adds ``c_2j+1 g`` to ``dL/dQ`` and
    ``g acc^T`` to ``G2 = dL/dQ^2``, and passes ``(Q^2)^T g`` on. The product ``Q^2 = Q Q`` then adds
    ``G2 Q^T + Q^T G2``; with ``Q^T = -Q`` its skew part is that of ``-(G2 + G2^T) Q``: one batched
    product instead of two. 4 batched products in all for the default 5 terms (with recomputing
    ``Q^2``; the inner accumulators need none), where autograd through the recomputed series took 6."""
    c = _coefficients(terms)
    m = len(c) - 2
    q2 = torch.bmm(q, q)
    accs = _horner(q, q2, c, last=False)
    g = grad
    gq = torch.zeros_like(q)
    gq2 = torch.zeros_like(q)
    j = 0
    for k in range(len(accs), 0, -1):  # acc_k = A_j + Q^2 acc_(k-1) (acc_len(accs): the series)
        gq.add_(g, alpha=c[2 * j + 1])
        gq2.baddbmm_(g, accs[k - 1].mT)
        g = torch.bmm(q2.mT, g)
        j += 1
    if m % 2 == 0:  # accs[0] = c_(m-1) Q + c_m Q^2 + c_(m-2) I
        gq.add_(g, alpha=c[m - 1])
        gq2.add_(g, alpha=c[m])
    else:  # accs[0] = c_m Q + c_(m-1) I
        gq.add_(g, alpha=c[m])
    return gq.baddbmm_(gq2 + gq2.mT, q, alpha=-1)


def blocks_from(vec: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
    """``cayley(skew(vec))`` in fp32 (never under autocast), differentiable in ``vec``, keeping only
    ``vec`` for the backward pass: the powers of ``Q`` (or the exact form's factorisation) are
    recomputed there, which costs ``r b^3`` flops per layer instead of holding several
    ``(r, b, b)`` tensors per layer through the whole forward pass. The series (3 terms or more)
    has a closed-form backward (:func:`_series_backward`); the other forms go through autograd."""
    return _Blocks.apply(vec, b, neumann, terms)


def _blocks(vec: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
    kind = vec.device.type
    if kind == "meta" or not torch.is_autocast_enabled(kind):  # (the meta device has no autocast)
        return cayley(skew(vec.float(), b), neumann, terms)
    with torch.autocast(kind, enabled=False):
        return cayley(skew(vec.float(), b), neumann, terms)


class _Blocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, vec: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
        ctx.save_for_backward(vec)
        ctx.settings = (b, neumann, terms)
        return _blocks(vec, b, neumann, terms)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (vec,) = ctx.saved_tensors
        b, neumann, terms = ctx.settings
        if neumann and terms >= 3:  # dL/dvec: the upper triangle of Z - Z^T
            z = _series_backward(skew(vec.detach().float(), b), grad.float(), terms)
            upper, lower = _triangles(b, vec.device)
            flat = z.reshape(z.shape[0], b * b)
            return (flat.index_select(1, upper) - flat.index_select(1, lower)).to(vec.dtype), None, None, None
        with torch.enable_grad():
            v = vec.detach().requires_grad_(True)
            (out,) = torch.autograd.grad(_blocks(v, *ctx.settings), v, grad)
        return out, None, None, None


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``x`` (``..., r * b``) with each length-``b`` block ``x_i`` replaced by ``x_i R_i``.

    One ``bmm`` over the ``r`` blocks of an ``(r, N, b)`` *view* of ``x``: autograd keeps that view
    (no copy of the input) and ``rot`` for the backward pass. A shared rotation (``(1, b, b)``)
    is broadcast to every block.
    """
    b = rot.shape[-1]
    shape = x.shape
    blocks = x.reshape(-1, shape[-1] // b, b).transpose(0, 1)
    if rot.shape[0] != blocks.shape[0]:
        rot = rot.expand(blocks.shape[0], b, b)
    return torch.bmm(blocks, rot.to(x.dtype)).transpose(0, 1).reshape(shape)


class Rotation(NamedTuple):
    """The per-adapter settings of one adapted layer (``AdapterLayer.adapter_state``)."""

    blocks: int
    block_size: int
    shared: bool
    neumann: bool
    terms: int
    coft: bool
    eps: float
    dropout: float
    recompute: bool = True


# ----------------------------------------------------------------------------- layers
class RotationMerge(MergeableLayer):
    """Merging of an update that multiplies the weight (``W' = f(W)``, a rotation and/or a scale):
    the layer gives :meth:`rotated_weight`; its delta ``f(W) - W`` depends on the weight it was
    merged into, so the delta is kept while merged and the exact unmerge subtracts that one.
    Layers call :meth:`keep_deltas` when they add an adapter (the dict then exists before any
    transaction snapshots the layer)."""

    def keep_deltas(self) -> None:
        self.__dict__.setdefault("peftlab_kept_delta", {})

    def rotated_weight(self, name: str) -> torch.Tensor:
        """The merged weight of adapter ``name`` in fp32, shaped like the weight."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        merged = self.__dict__.get("peftlab_kept_delta", {})
        if name in merged:  # a merged rotation's delta depends on the weight it was merged into
            return merged[name]
        return self.rotated_weight(name) - self.weight.float()

    def merge_adapter(self, name: str) -> None:
        """The delta ``f(W) - W`` is kept (fp32, the weight's size) while merged: it is a function
        of the weight before the merge, so the exact unmerge needs it as it was.

        A rollback restores the layer's dicts first and then replays the undo log in reverse; the
        two ``on_undo`` entries around the merge's own put the kept delta back for the merge's
        inverse (which subtracts it) and take it away after."""
        if name in self.__dict__.get("peftlab_merged", []):
            return
        delta = self.delta_weight(name)
        self.__dict__.setdefault("peftlab_kept_delta", {})
        on_undo(lambda: self.__dict__["peftlab_kept_delta"].pop(name, None))
        self.__dict__["peftlab_kept_delta"][name] = delta
        super().merge_adapter(name)
        on_undo(lambda: self.__dict__["peftlab_kept_delta"].__setitem__(name, delta))

    def _unmerge_last(self) -> None:
        name = self.peftlab_merged[-1]
        super()._unmerge_last()
        self.__dict__.get("peftlab_kept_delta", {}).pop(name, None)

    def restore(self) -> nn.Module:
        self.__dict__.pop("peftlab_kept_delta", None)
        return super().restore()


class OFTLayer(RotationMerge):
    """State shared by the OFT layer kinds: the rotation parameter of each adapter and its maths."""

    owner_method = "oft"
    class_prefix = "OFT"
    adapter_containers = ("oft_R",)

    def input_width(self) -> int:
        """The width ``d`` the rotation acts on."""
        return self.in_features  # type: ignore[return-value]

    def add_adapter(self, name: str, state: Rotation, init_weights: bool) -> None:
        w = self.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point() else w.dtype
        b = state.block_size
        unit = nn.Module()
        unit.weight = nn.Parameter(torch.empty(1 if state.shared else state.blocks, b * (b - 1) // 2,
                                               device=w.device, dtype=dtype))
        with torch.no_grad():
            if init_weights:
                nn.init.zeros_(unit.weight)
            else:  # peft's init_weights=False: random rotations (not the identity; for tests)
                nn.init.normal_(unit.weight, mean=0.0, std=0.1)
        getattr(self, self.adapter_containers[0])[name] = unit
        self.set_adapter_state(name, state)
        self.keep_deltas()

    def _param(self, name: str) -> nn.Parameter:
        return getattr(self, self.adapter_containers[0])[name].weight

    def rotations(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s blocks ``R_i`` (``(stored blocks, b, b)``, the parameter's dtype).

        In training mode, COFT writes its projection into the parameter first (the optimizer then
        steps from the projected point, as in peft) and module dropout replaces some blocks by
        the identity."""
        st: Rotation = self.adapter_state(name)
        vec = self._param(name)
        if st.coft:
            if self.training:
                with torch.no_grad():
                    vec.copy_(project(vec, st.eps))
            else:
                vec = vec + (project(vec.detach(), st.eps) - vec.detach())  # same values, no write
        if st.recompute:
            rot = blocks_from(vec, st.block_size, st.neumann, st.terms)
        else:
            rot = _blocks(vec, st.block_size, st.neumann, st.terms)
        if self.training and st.dropout > 0 and rot.shape[0] > 1:
            n = rot.shape[0]
            keep = torch.ones(n, device=rot.device, dtype=torch.bool)
            keep[torch.randperm(n, device=rot.device)[:int(st.dropout * n)]] = False
            rot = torch.where(keep[:, None, None], rot, torch.eye(st.block_size, device=rot.device))
        return rot.to(vec.dtype)

    def full_rotations(self, name: str) -> torch.Tensor:
        """``(blocks, b, b)`` in fp32, a shared block repeated; evaluation form (no dropout)."""
        st: Rotation = self.adapter_state(name)
        vec = self._param(name).detach().float()
        if st.coft:
            vec = project(vec, st.eps)
        rot = cayley(skew(vec, st.block_size), st.neumann, st.terms)
        return rot.expand(st.blocks, -1, -1) if rot.shape[0] != st.blocks else rot

    # ------------------------------------------------------------------------- merging
    def rotated_weight(self, name: str) -> torch.Tensor:
        """The merged weight ``W R^T`` (input side) in fp32, shaped like the weight."""
        w = self.weight.float()
        return rotate(w.reshape(w.shape[0], -1), self.full_rotations(name).transpose(1, 2)).reshape(w.shape)


class OFTLinearLayer(OFTLayer):
    """OFT on ``nn.Linear``: the input is rotated, then the base layer runs (``W' = W R^T``)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        live = self.live_adapters()
        if live:
            dtype = x.dtype
            for name in reversed(live):  # the adapter merged last touches the input first
                rot = self.rotations(name)
                x = rotate(x.to(rot.dtype), rot)
            x = x.to(dtype)
        return super().forward(x, *args, **kwargs)


class OFTEmbeddingLayer(OFTLayer):
    """OFT on ``nn.Embedding``: the looked-up vectors are rotated (``W' = W R``), peft's
    ``oft_embedding_R``."""

    adapter_containers = ("oft_embedding_R",)

    def input_width(self) -> int:
        return self.embedding_dim  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        live = self.live_adapters()
        if live:
            dtype = out.dtype
            for name in live:
                rot = self.rotations(name)
                out = rotate(out.to(rot.dtype), rot)
            out = out.to(dtype)
        return out

    def rotated_weight(self, name: str) -> torch.Tensor:
        return rotate(self.weight.float(), self.full_rotations(name))


class OFTConvLayer(OFTLayer):
    """OFT on ``nn.Conv2d``: the flattened ``in x k x k`` filter side is rotated and the layer
    convolves with the rotated kernel (``W'_flat = W_flat R^T``): exactly the merged model."""

    def input_width(self) -> int:
        return self.in_channels * math.prod(self.kernel_size)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        live = self.live_adapters()
        if not live:
            return super().forward(x, *args, **kwargs)
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        for name in live:
            rot = self.rotations(name)
            flat = rotate(flat.to(rot.dtype), rot.transpose(1, 2))
        return self._conv_forward(x, flat.to(w.dtype).reshape(w.shape), self.bias)  # type: ignore[attr-defined]


def layer_kind(module: nn.Module) -> type[OFTLayer] | None:
    """Which OFT layer adapts ``module`` (None: unsupported, as in peft)."""
    if isinstance(module, nn.Linear):
        return OFTLinearLayer
    if isinstance(module, nn.Embedding):
        return OFTEmbeddingLayer
    if isinstance(module, nn.Conv2d):
        return OFTConvLayer
    return None


# ----------------------------------------------------------------------------- the method
@register("oft")
@dataclass(frozen=True)
class OFT(Method):
    """Orthogonal finetuning with block-diagonal rotations. Mergeable; identity at init."""

    block_size: int = 32
    """Block size ``b`` (peft's ``oft_block_size``; 0 to give ``r`` instead). Parameters per layer
    are ``d (b - 1) / 2``; OFTv2 uses b = 32 for Llama-2 and Qwen2.5 (its Sec. 7.2)."""
    r: int = 0
    """Number of blocks per layer instead of their size (peft's ``r``); exactly one of ``r`` and
    ``block_size`` is non-zero. A value that does not divide a layer's width is moved to the
    nearest divisor, with a warning, as peft does."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules get OFT (see peftlab.core.targets): every linear layer by default."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    layers_pattern: tuple[str, ...] = ()
    """How ``layers`` finds a block index: the module-list name(s) (peft's ``layers_pattern``)."""
    module_dropout: float = 0.0
    """Probability that a block's rotation is the identity in a training step (multiplicative dropout)."""
    cayley_neumann: bool = True
    """The Cayley-Neumann series (peft's default; no matrix inverse) instead of the exact transform."""
    neumann_terms: int = 5
    """Terms of the series (peft's ``num_cayley_neumann_terms``)."""
    coft: bool = False
    """Constrained OFT: keep each block's ``Q`` within ``eps`` of zero."""
    eps: float = 6e-5
    """COFT's radius (peft's default), divided by the square root of the stored block count."""
    block_share: bool = False
    """One rotation shared by every block of a layer (``b (b - 1) / 2`` parameters per layer)."""
    bias: str = "none"
    """'none', 'all' (every bias of the model trains) or 'oft_only' (biases of adapted layers)."""
    init_weights: bool = True
    """True: ``Q = 0`` (the identity); False: random ``Q`` (std 0.1; not the base at init)."""
    recompute: bool = True
    """peftlab only (kept out of peft's config): keep only the parameter for backward, where the
    series' gradient is computed in closed form (:func:`blocks_from`): 0.97 of peft's peak memory on
    SmolLM2 (10 blocks, 4 x 64 tokens) at 0.98-0.99 of its step time (benchmarks/oft_vs_peft.py);
    False keeps ``Q``, ``Q^2`` and the Horner term (as much as peft keeps) and backpropagates
    through them with autograd."""

    peft_type: ClassVar[str | None] = "OFT"
    mergeable: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 1e-3
    # typical_score stays None (the recommender then relies on measured rows and the estimator):
    # no score relative to full fine-tuning from the OFT/BOFT papers' tables is recorded here yet.

    def __post_init__(self) -> None:
        for field_name in ("block_size", "r"):
            if getattr(self, field_name) < 0:
                raise ConfigError(f"oft: {field_name} must be >= 0 (got {getattr(self, field_name)})")
        if (self.r == 0) == (self.block_size == 0):
            raise ConfigError(f"oft: give exactly one of r (blocks per layer) and block_size (got r={self.r}, "
                              f"block_size={self.block_size}): r * block_size is the layer's width, so set the "
                              "other to 0 (e.g. block_size=32, r=0)")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"oft: module_dropout must be in [0, 1) (got {self.module_dropout})")
        if self.neumann_terms < 1:
            raise ConfigError(f"oft: neumann_terms must be >= 1 (got {self.neumann_terms}); 5 is peft's default")
        if self.eps <= 0:
            raise ConfigError(f"oft: eps must be > 0 (got {self.eps}); peft's default is 6e-5")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"oft: bias must be one of {BIAS_MODES} (got {self.bias!r})")
        for p in self.layers_pattern:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"oft: layers_pattern entry {p!r} is not a regular expression ({e})") from None

    def rotation(self, path: str, module: nn.Module) -> Rotation:
        """The block layout of ``module`` (peft's rule, including its adjustment of sizes that do
        not divide the width), checked against what peft's OFT can adapt."""
        kind = layer_kind(module)
        if isinstance(module, nn.Conv2d):
            k = tuple(module.kernel_size)
            if module.groups != 1 or k[0] != k[1] or tuple(module.dilation) != (1, 1):
                raise ConfigError(f"oft: {path} is a Conv2d with kernel {list(k)}, groups={module.groups}, "
                                  f"dilation={list(module.dilation)}; peft's OFT (whose files peftlab writes) "
                                  "adapts square kernels with groups=1 and dilation 1 only; exclude it with "
                                  "exclude_modules")
        assert kind is not None
        d = kind.input_width(module)  # type: ignore[arg-type]
        if self.r == 0:
            b = self.block_size
            if d % b or b > d:
                b = adjust_blocks(d, b)
                warnings.warn(f"oft: block_size {self.block_size} does not divide {path}'s width {d}; it gets "
                              f"blocks of {b} (peft's adjustment)", stacklevel=4)
            r = d // b
        else:
            r = self.r
            if d % r or r > d:
                r = adjust_blocks(d, r)
                warnings.warn(f"oft: r {self.r} does not divide {path}'s width {d}; it gets {r} blocks "
                              "(peft's adjustment)", stacklevel=4)
            b = d // r
        return Rotation(r, b, self.block_share, self.cayley_neumann, self.neumann_terms, self.coft,
                        float(self.eps), float(self.module_dropout), self.recompute)

    def attach(self, model: nn.Module, name: str) -> None:
        paths = select(model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
                       supported=SUPPORTED, supported_names=("Conv1D",), skip=self.modules_to_save, what="oft",
                       layers_pattern=self.layers_pattern)
        modules = {p: model.get_submodule(p) for p in paths}
        conv1d = [p for p, m in modules.items() if layer_kind(m) is None]
        if conv1d:
            raise ConfigError(f"oft: {conv1d[0]} is a GPT-2 Conv1D layer ({len(conv1d)} selected); peft's OFT adapts "
                              "nn.Linear, nn.Conv2d and nn.Embedding only, so such an adapter file could not load in "
                              "peft. Exclude these modules (exclude_modules), or use a method that adapts Conv1D "
                              "(lora, flora)")
        states = {p: self.rotation(p, m) for p, m in modules.items()}  # every check before any change
        bias_keys = self._bias_keys(model, paths)
        for path, module in modules.items():
            layer = layer_kind(module).adopt(module)  # type: ignore[union-attr]
            layer.add_adapter(name, states[path], self.init_weights)
        if bias_keys:
            slots.train_base_tensors(model, name, bias_keys)

    def _bias_keys(self, model: nn.Module, paths: list[str]) -> list[str]:
        return slots.bias_mode_keys(model, paths, self.bias, "oft", ("oft_R", "oft_embedding_R"))

    def base_file_key(self, model: nn.Module, key: str, name: str) -> str:
        return wrapped_base_key(model, key, name, OFTLayer)  # peft wraps adapted layers

    # ------------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        plain = all(not any(ch in t for ch in "*?[:") and t != ALL_LINEAR for t in self.target_modules)
        simple = plain and not self.exclude_modules and self.layers is None
        if simple or model is None:
            targets = list(self.target_modules)
        else:  # peft cannot express globs, types or layer ranges: write the exact module list
            targets = [p for p, _ in self.adapted_layers(model, name)]
        return {
            "peft_type": "OFT",
            "task_type": None,
            "peft_version": PEFT_FORMAT_VERSION,
            "r": self.r,
            "oft_block_size": self.block_size,
            "module_dropout": self.module_dropout,
            "target_modules": targets,
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "bias": self.bias,
            "init_weights": self.init_weights,
            "layers_to_transform": list(self.layers) if self.layers is not None and simple else None,
            "layers_pattern": None,
            "modules_to_save": list(self.modules_to_save) or None,
            "coft": self.coft,
            "eps": self.eps,
            "block_share": self.block_share,
            "use_cayley_neumann": self.cayley_neumann,
            "num_cayley_neumann_terms": self.neumann_terms,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            "auto_mapping": None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OFT:
        unsupported = {k: v for k, v in config.items() if k not in PEFT_HANDLED and k not in PEFT_METADATA
                       and not k.startswith("peftlab") and v not in (None, False, {}, [], "")}
        if unsupported:
            raise ConfigError(f"this peft OFT config uses options peftlab's OFT does not implement: {unsupported}; "
                              "it was not loaded (its outputs would differ from peft's)")
        if "oft_block_size" not in config:
            raise ConfigError("this OFT config has no oft_block_size: it was written by peft before 0.14, whose OFT "
                              "layout and maths peftlab (like peft >= 0.14) does not read; retrain the adapter")
        neumann = config.get("use_cayley_neumann", False)
        if neumann and _version(config.get("peft_version")) < (0, 18):
            raise ConfigError(f"this OFT config uses the Cayley-Neumann series and was written by peft "
                              f"{config.get('peft_version') or 'before 0.18 (no peft_version)'}; peft 0.18 changed "
                              "that series, and peftlab implements the new one only, so it was not loaded (its "
                              "outputs would differ); retrain with peft >= 0.18 or peftlab")

        layers = config.get("layers_to_transform")
        pattern = config.get("layers_pattern")
        return cls(
            block_size=config.get("oft_block_size", 32),
            r=config.get("r", 0),
            target_modules=peft_targets(config.get("target_modules")) or (ALL_LINEAR,),
            exclude_modules=peft_targets(config.get("exclude_modules")),
            layers=tuple(layers) if isinstance(layers, list) else (layers,) if layers is not None else None,
            layers_pattern=(pattern,) if isinstance(pattern, str) else tuple(pattern or ()),
            module_dropout=float(config.get("module_dropout", 0.0)),
            cayley_neumann=bool(neumann),
            neumann_terms=config.get("num_cayley_neumann_terms", 5),
            coft=bool(config.get("coft", False)),
            eps=config.get("eps", 6e-5),
            block_share=bool(config.get("block_share", False)),
            bias=config.get("bias", "none"),
            init_weights=config.get("init_weights", True),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
        )


def _version(text: Any) -> tuple[int, ...]:
    """``"0.18.0"`` (or ``"0.18.0@abc"``, ``"0.18.0.dev0"``) -> ``(0, 18, 0)``; missing -> ``(0,)``."""
    if not isinstance(text, str):
        return (0,)
    return tuple(int(p) for p in re.findall(r"\d+", text.partition("@")[0])[:3]) or (0,)


PEFT_HANDLED = frozenset({"r", "oft_block_size", "module_dropout", "target_modules", "exclude_modules",
                          "fan_in_fan_out", "bias", "init_weights", "layers_to_transform", "layers_pattern",
                          "modules_to_save", "coft", "eps", "block_share", "use_cayley_neumann",
                          "num_cayley_neumann_terms"})
"""Fields of peft's OFTConfig that peftlab's OFT reads (fan_in_fan_out has no effect in peft's OFT:
it adapts no layer with a transposed weight)."""
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping"})
"""Fields that describe the file, not the adapter's maths (peft_version is read for the check above)."""
