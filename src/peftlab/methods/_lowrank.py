"""The layers of the low-rank family (LoRA, DoRA, DyLoRA, QLoRA) and their one attach path.

Every layer kind computes ``s * B A x`` from *factors*: ``A`` (rank along dim 0), ``B`` (rank
along dim 1) and the scale ``s``. :meth:`LoRALayer.factors` (the training/evaluation forward)
and :meth:`LoRALayer.merge_factors` (merging) give them; a method changes what a forward uses by
overriding those two only (DyLoRA uses nested leading slices), never the maths of a layer kind.
The per-adapter state (rank, alpha, rsLoRA; DyLoRA's rank schedule) is the layer's
``adapter_state(name)`` record (:class:`peftlab.core.layer.AdapterLayer`).

Layer kinds: ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored ``d_in x d_out``),
``nn.Embedding`` (``A`` looked up per token: ``r x num_embeddings``) and ``nn.Conv1d/2d/3d``
(``A`` a convolution with the base kernel to ``r`` channels, ``B`` a 1x1 convolution back).
Tensor names follow peft's (``lora_A.<name>.weight``, ``lora_embedding_A.<name>``), so the files
load in peft and vice versa.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layer import MergeableLayer
from peftlab.core.targets import select
from peftlab.core.transaction import on_undo

SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_NAMES = ("Conv1D",)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters of a half-precision base train in fp32 (stable Adam updates, as peft does)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() \
        else weight.dtype


@dataclass(frozen=True)
class Residual:
    """What a PiSSA/OLoRA initialisation took out of the base weight: ``W_res = round(W - s B0 A0)``.

    ``a0``/``b0`` (fp32) are the initial factors; ``wrong``/``originals`` the few elements (flat
    indices into the stored weight) where ``round(W_res + s B0 A0)`` is not ``W``, so detaching
    gives back the exact base (the same record a merge keeps, see ``MergeableLayer``)."""

    a0: torch.Tensor
    b0: torch.Tensor
    wrong: torch.Tensor
    originals: torch.Tensor


@dataclass(frozen=True)
class LowRank:
    """Per-adapter state of a LoRA layer: ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), and
    for a PiSSA/OLoRA initialisation what it took out of the base weight."""

    r: int
    alpha: float
    rslora: bool = False
    residual: Residual | None = None
    scale_tensor: torch.Tensor | None = None
    """Prepared for hot-swapping (``peftlab.prepare_hotswap``): the scale as a 0-d fp32 tensor,
    which a hot-swap overwrites in place (so a compiled forward never sees a new number). ``r``
    is then the padded rank and ``alpha`` the padded form's at preparation; the tensor rules."""

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass(frozen=True, eq=False)
class LowRankForm:
    """An update ``B diag(s) A x`` for a mixed-adapter batch (``peftlab.core.routing``), optionally
    DoRA's rescaled output ``m/||W + sBA|| (out - bias + s B A x) + bias``.

    ``scale`` is a number or an ``r``-vector multiplying the r-wide intermediate (AdaLoRA's
    ``E`` times its scale, VeRA's ``lambda_d``); every adapter whose update is such a map
    (LoRA, DyLoRA, QLoRA, AdaLoRA, VeRA, LoHa's Khatri-Rao form) serves mixed batches through it.
    Stacked, ranks are padded with zeros to the largest (exact: a zero column adds nothing)."""

    a: torch.Tensor
    """``(r, d_in)``"""
    b: torch.Tensor
    """``(d_out, r)``"""
    scale: float | torch.Tensor
    magnitude: torch.Tensor | None = None
    """DoRA: ``m / ||W + s B A||`` per output row (None: plain)."""
    bias: torch.Tensor | None = None
    """DoRA: the base bias, which the rescale leaves out."""

    @property
    def key(self) -> Hashable:
        return self.a.dtype, self.a.device

    @classmethod
    def stack(cls, forms: Sequence[LowRankForm]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        f0 = forms[0]
        g, rank = len(forms), max(f.a.shape[0] for f in forms)
        kw = {"dtype": f0.a.dtype, "device": f0.a.device}
        a = torch.zeros(g, f0.a.shape[1], rank, **kw)
        b = torch.zeros(g, rank, f0.b.shape[0], **kw)
        s = torch.zeros(g, 1, rank, **kw)
        for i, f in enumerate(forms):
            r = f.a.shape[0]
            a[i, :, :r] = f.a.T
            b[i, :r] = f.b.T
            s[i, 0, :r] = f.scale if isinstance(f.scale, float) else f.scale.reshape(-1)
        per_tile = {"a": a, "b": b, "s": s}
        static: dict[str, Any] = {}
        if any(f.magnitude is not None for f in forms):
            per_tile["m"] = torch.stack([f.magnitude.to(a.dtype) if f.magnitude is not None
                                         else torch.ones(f0.b.shape[0], **kw) for f in forms])[:, None]
            bias = next((f.bias for f in forms if f.bias is not None), None)
            static["bias"] = bias.to(a.dtype) if bias is not None else torch.zeros((), **kw)
        return per_tile, static

    @classmethod
    def apply(cls, per_tile: dict[str, torch.Tensor], static: dict[str, Any],
              gather: Callable[[torch.Tensor], torch.Tensor], inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        a, b, s = per_tile["a"], per_tile["b"], per_tile["s"]
        x = inputs["x"]
        assert x is not None
        y = torch.bmm(torch.bmm(gather(x).to(a.dtype), a) * s, b)
        if "m" not in per_tile:
            return y
        m, out = per_tile["m"], inputs["out"]
        assert out is not None
        return (m - 1) * (gather(out).to(y.dtype) - static["bias"]) + m * y


class LoRALayer(MergeableLayer):
    """The forward pass and the state shared by the LoRA layer kinds."""

    owner_method = "lora"
    class_prefix = "LoRA"
    adapter_containers = ("lora_A", "lora_B", "lora_dropout")

    # ------------------------------------------------------------------------- factors
    def factor_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of adapter ``name`` as stored (A: rank along dim 0, B: along dim 1)."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def scaling(self, name: str) -> float:
        st = self.adapter_state(name)
        return st.scale if st.scale_tensor is None else st.scale_tensor  # type: ignore[return-value]

    # ------------------------------------------------------------------------- hot-swap
    def pad_rank(self, name: str, rank: int) -> None:
        """Pad adapter ``name`` with zeros to ``rank`` (the same update: zero terms, which change only
        the order of summation of a product, by an ulp)
        and hold its scale as a tensor, so that adapters of any rank up to ``rank`` can be
        written into it in place (:meth:`swap_values`)."""
        st: LowRank = self.adapter_state(name)
        a, b = self.factor_tensors(name)
        r = a.shape[0]
        if rank < r:
            raise ConfigError(f"hot-swap rank {rank} is below this adapter's rank {r}; use rank >= {r}")
        if st.residual is not None:
            raise ConfigError("an adapter initialised from the base weight (PiSSA/OLoRA) cannot be padded for "
                              "hot-swapping (its residual is in the base); convert it by saving and loading it")
        with torch.no_grad():
            new_a = torch.cat([a, a.new_zeros((rank - r, *a.shape[1:]))], 0)
            new_b = torch.cat([b, b.new_zeros((b.shape[0], rank - r, *b.shape[2:]))], 1)
        self._set_factors(name, new_a, new_b)
        scale = torch.tensor(float(self.scaling(name)), dtype=torch.float32, device=a.device)
        self.set_adapter_state(name, LowRank(rank, float(scale) * rank, False, None, scale))

    def _set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Replace the factor tensors of adapter ``name`` (new parameters, same requires_grad)."""
        old_a, old_b = self.factor_tensors(name)
        for container, new, old in (("lora_A", a, old_a), ("lora_B", b, old_b)):
            entry = getattr(self, container)[name]
            param = nn.Parameter(new, requires_grad=old.requires_grad)
            entry.weight = param
            for attr, dim in (("out_features", 0), ("in_features", 1), ("out_channels", 0), ("in_channels", 1)):
                if hasattr(entry, attr):
                    setattr(entry, attr, new.shape[dim])

    def swap_values(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The in-place writes that make adapter ``name`` compute ``scale * b a`` (``a``: rank
        along dim 0, ``b``: along dim 1, a rank up to the stored one): ``[(target, value)]``.
        Raises ``ConfigError`` when it does not fit without a new shape or a new number."""
        st: LowRank = self.adapter_state(name)
        old_a, old_b = self.factor_tensors(name)
        r, stored = a.shape[0], old_a.shape[0]
        if a.shape[1:] != old_a.shape[1:] or b.shape[0] != old_b.shape[0] or b.shape[2:] != old_b.shape[2:] \
                or b.shape[1] != r:
            raise ConfigError(f"factors of shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit "
                              f"{tuple(old_a.shape)} / {tuple(old_b.shape)}")
        if st.scale_tensor is None and (r != stored or scale != st.scale):
            raise ConfigError(f"rank {r} and scale {scale:g} differ from this adapter's ({stored}, {st.scale:g}), which "
                              "is not prepared for that: call peftlab.prepare_hotswap(model, rank=...) first (before "
                              "torch.compile)")
        if r > stored:
            raise ConfigError(f"rank {r} exceeds the prepared rank {stored}; prepare with rank >= {r}")
        new_a, new_b = torch.zeros_like(old_a), torch.zeros_like(old_b)
        new_a[:r] = a.to(old_a.dtype)
        new_b[:, :r] = b.to(old_b.dtype)
        writes = [(old_a, new_a), (old_b, new_b)]
        if st.scale_tensor is not None:
            writes.append((st.scale_tensor, torch.tensor(scale, dtype=torch.float32)))
        return writes

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` this forward pass uses (the default: all of them)."""
        a, b = self.factor_tensors(name)
        return a, b, self.scaling(name)

    def merge_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` that merging folds into the weight (the default: those of evaluation)."""
        a, b = self.factor_tensors(name)
        return a, b, self.scaling(name)

    # ------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        routing = self.__dict__.get("peftlab_routing")
        if routing is not None:
            return routing.apply(self, out, x=x)
        for name in self.live_adapters():
            out = self.apply_adapter(name, x, out)
        return out

    # ------------------------------------------------------------------------- mixed batches
    def route_refusal(self, name: str) -> str | None:
        """Why adapter ``name`` cannot serve a mixed-adapter batch here (None: it can)."""
        return f"LoRA on {self.base_class.__name__} has no per-row form (only linear layers have)"

    def routed_form(self, name: str) -> LowRankForm | None:
        raise NotImplementedError

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The output with adapter ``name`` applied to ``out`` (the output so far)."""
        return out + self.adapter_output(name, x, out).to(out.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to ``out`` (the output so far, as peft accumulates it)."""
        a, b, s = self.factors(name)
        return self.lora_output(name, x, a, b, s)

    def lora_output(self, name: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        """``s * B A dropout(x)`` in this layer kind's form (the scale multiplies the r-wide
        intermediate, not the d_out-wide output: r/d_out of the work)."""
        raise NotImplementedError

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: str) -> None:
        check_rank(self, r, type(self).__name__)
        self.new_factors(name, r, dropout, init)
        self.set_adapter_state(name, LowRank(r, alpha, rslora))

    def new_factors(self, name: str, r: int, dropout: float, init: str) -> None:
        raise NotImplementedError


class LoRALinearLayer(LoRALayer):
    """LoRA on ``nn.Linear`` and on GPT-2's ``Conv1D`` (same maths, transposed weight), optionally
    weight-decomposed (DoRA, Liu et al. 2024, https://arxiv.org/abs/2402.09353)::

        h = b + m / ||W + s B A||_row * (W x + s B A x)      (the norm detached, the paper's Sec. 4.3)

    ``m`` (``lora_magnitude_vector``, d_out) starts at ``||W||_row``, so DoRA is the identity at
    init. The row norms come without the ``d_out x d_in`` matrix ``W + s B A``:
    ``||W||^2 + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B)``, with ``||W||^2`` cached.
    """

    adapter_containers = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")
    parameter_containers = ("lora_magnitude_vector",)

    def _shape(self) -> tuple[int, int]:
        w = self.weight
        fan_in_fan_out = not isinstance(self, nn.Linear)  # Conv1D stores (d_in, d_out)
        return (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])

    def new_factors(self, name: str, r: int, dropout: float, init: str) -> None:
        d_in, d_out = self._shape()
        kw = {"device": self.weight.device, "dtype": adapter_dtype(self.weight)}
        a, b = nn.Linear(d_in, r, bias=False, **kw), nn.Linear(r, d_out, bias=False, **kw)
        init_factors(a.weight, b.weight, init, r)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_output(self, name: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout[name](x.to(a.dtype)), a) * s, b)

    def route_refusal(self, name: str) -> str | None:
        return None

    @torch.no_grad()
    def routed_form(self, name: str) -> LowRankForm:
        a, b, s = self.factors(name)
        if name not in self.lora_magnitude_vector:
            return LowRankForm(a, b, float(s))
        lora_dtype = a.dtype
        magnitude = (self.lora_magnitude_vector[name] / self.dora_norm(name).to(lora_dtype)).to(lora_dtype)
        return LowRankForm(a, b, float(s), magnitude, self.bias)

    def delta_weight(self, name: str) -> torch.Tensor:
        merged = self.__dict__.get("peftlab_dora_merged", {})
        if name in merged:  # a merged DoRA update depends on the weight before the merge: use it as merged
            return merged[name]
        a, b, s = self.merge_factors(name)
        delta = (b.float() @ a.float()) * s
        if name in self.lora_magnitude_vector:  # DoRA: the merged weight is m / ||W + dW|| * (W + dW)
            w = self._matrix().float()
            scale = self.lora_magnitude_vector[name].float() / self.dora_norm(name).float()
            delta = scale[:, None] * (w + delta) - w
        return delta if isinstance(self, nn.Linear) else delta.T

    # ------------------------------------------------------------------------- PiSSA / OLoRA
    @torch.no_grad()
    def init_from_weight(self, name: str, init: str) -> None:
        """Initialise adapter ``name`` from the base weight and keep the residual in the weight,
        so the adapted layer still computes ``W x`` (up to rounding):

        * ``pissa`` (Meng et al. 2024, https://arxiv.org/abs/2404.02948): ``B0 = U_r sqrt(S_r / s)``,
          ``A0 = sqrt(S_r / s) V_r^T`` from the top ``r`` singular triplets of ``W``;
          ``pissa_niter_<n>``: the same from a randomized SVD (Halko et al., ``n`` subspace
          iterations; ``torch.svd_lowrank``): a few matrix products instead of a full SVD.
        * ``olora`` (Buyukakyuz 2024, https://arxiv.org/abs/2406.01775): ``W = Q R``,
          ``B0 = Q[:, :r]``, ``A0 = R[:r]``.

        ``W`` becomes ``round(W - s B0 A0)``; the record of where rounding lost the original
        (:class:`Residual`) lets :meth:`remove_adapter` restore the exact base. On the meta device
        only the factors' shapes exist and nothing is computed."""
        st: LowRank = self.adapter_state(name)
        w = self.weight
        if w.device.type == "meta":
            return
        m = self._matrix().float()
        r, s = st.r, st.scale
        if init == "olora":
            q, upper = torch.linalg.qr(m)
            b0, a0 = q[:, :r].contiguous(), upper[:r].contiguous()
        else:
            if init == "pissa":
                u, sv, vh = torch.linalg.svd(m, full_matrices=False)
                u, sv, vh = u[:, :r], sv[:r], vh[:r]
            else:
                u, sv, v = torch.svd_lowrank(m, q=r, niter=int(init.rsplit("_", 1)[1]))
                vh = v.T
            root = (sv / s).sqrt()
            a0, b0 = (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()
        a, b = self.factor_tensors(name)
        a.copy_(a0.to(a.dtype))
        b.copy_(b0.to(b.dtype))
        delta = (b0 @ a0) * s
        delta = delta if isinstance(self, nn.Linear) else delta.T  # the stored weight's layout
        new = (w.float() - delta).to(w.dtype)
        wrong = ((new.float() + delta).to(w.dtype) != w).flatten().nonzero().flatten()
        originals = w.detach().flatten()[wrong].clone()
        w.copy_(new)
        residual = Residual(a0, b0, wrong, originals)
        on_undo(lambda: _give_back(w, delta, residual), w)
        self.set_adapter_state(name, dataclasses.replace(st, residual=residual))

    def remove_adapter(self, name: str) -> None:
        st = self.__dict__.get("peftlab_state", {}).get(name)
        if isinstance(st, LowRank) and st.residual is not None and self.weight.device.type != "meta":
            self.unmerge_adapter(name)  # the merged update first, then the residual goes back
            w, residual = self.weight, st.residual
            delta = (residual.b0 @ residual.a0) * st.scale
            delta = delta if isinstance(self, nn.Linear) else delta.T
            _give_back(w, delta, residual)
            on_undo(lambda: w.copy_((w.float() - delta).to(w.dtype)), w)
        super().remove_adapter(name)

    # ------------------------------------------------------------------------- DoRA
    def restore(self) -> nn.Module:
        for attr in ("peftlab_row_norms", "peftlab_dora_merged"):
            self.__dict__.pop(attr, None)
        return super().restore()

    def merge_adapter(self, name: str) -> None:
        """A DoRA update is kept (fp32, the weight's size) while merged: it is a function of the
        weight it was merged into, so unmerging needs it as it was."""
        dora = name in self.lora_magnitude_vector and name not in self.__dict__.get("peftlab_merged", [])
        delta = self.delta_weight(name) if dora else None
        super().merge_adapter(name)
        if delta is not None:
            self.__dict__.setdefault("peftlab_dora_merged", {})[name] = delta

    def _unmerge_last(self) -> None:
        name = self.peftlab_merged[-1]
        super()._unmerge_last()
        self.__dict__.get("peftlab_dora_merged", {}).pop(name, None)

    def _matrix(self) -> torch.Tensor:
        """The base weight as ``(d_out, d_in)``."""
        return self.weight if isinstance(self, nn.Linear) else self.weight.T

    def add_dora(self, name: str) -> None:
        """Make adapter ``name`` weight-decomposed: ``m`` starts at the base rows' norms."""
        with torch.no_grad():
            m = self._matrix().float().norm(dim=1).to(adapter_dtype(self.weight))
        self.lora_magnitude_vector[name] = nn.Parameter(m)

    @torch.no_grad()
    def dora_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row (no gradient, as in the paper and peft), in fp32."""
        w = self._matrix()
        cache = self.__dict__.setdefault("peftlab_row_norms", {})
        key = (w._version, w.data_ptr())
        if cache.get("key") != key:
            cache["key"], cache["sq"] = key, w.float().pow(2).sum(1)
        a_t, b_t, s = self.merge_factors(name)
        a, b = a_t.float(), b_t.float()
        wa = (w @ a_t.to(w.dtype).T).float()  # (d_out, r)
        sq = cache["sq"] + 2 * s * (b * wa).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
        return sq.clamp_min(0).sqrt()

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """DoRA without dropout (or in eval mode) as one scaled sum, ``m/||.|| * (W x + s B A x) + b``:
        one multiply and one add over the output instead of two of each (the base output is
        the ``W x`` already computed)."""
        dropout = self.lora_dropout[name] if name in self.lora_magnitude_vector else None
        if dropout is None or not (isinstance(dropout, nn.Identity) or not self.training):
            return super().apply_adapter(name, x, out)
        a, b, s = self.factors(name)
        lora = F.linear(F.linear(x.to(a.dtype), a) * s, b)
        scale = (self.lora_magnitude_vector[name] / self.dora_norm(name).to(lora.dtype)).to(lora.dtype)
        if self.bias is None:
            return (scale * (out.to(lora.dtype) + lora)).to(out.dtype)
        return (scale * (out.to(lora.dtype) - self.bias + lora) + self.bias).to(out.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, s = self.factors(name)
        if name not in self.lora_magnitude_vector:
            return self.lora_output(name, x, a, b, s)
        dropout = self.lora_dropout[name]
        xd = dropout(x.to(a.dtype))
        lora = F.linear(F.linear(xd, a) * s, b)
        scale = (self.lora_magnitude_vector[name] / self.dora_norm(name).to(lora.dtype)).to(lora.dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            base = out if self.bias is None else out - self.bias
        else:  # the base output of the dropped input, as peft computes it
            base = F.linear(xd.to(self.weight.dtype), self._matrix())
        return (scale - 1) * base.to(lora.dtype) + scale * lora


class LoRAEmbeddingLayer(LoRALayer):
    """LoRA on ``nn.Embedding``: ``A`` (``r x num_embeddings``) is indexed by token id."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")
    parameter_containers = ("lora_embedding_A", "lora_embedding_B")

    def factor_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        old_a, old_b = self.factor_tensors(name)
        self.lora_embedding_A[name] = nn.Parameter(a, requires_grad=old_a.requires_grad)
        self.lora_embedding_B[name] = nn.Parameter(b, requires_grad=old_b.requires_grad)

    def new_factors(self, name: str, r: int, dropout: float, init: str) -> None:
        num, dim = self.weight.shape
        kw = {"device": self.weight.device, "dtype": adapter_dtype(self.weight)}
        a, b = nn.Parameter(torch.empty(r, num, **kw)), nn.Parameter(torch.empty(dim, r, **kw))
        init_factors(a, b, "gaussian" if init == "default" else init, r, embedding=True)
        self.lora_embedding_A[name], self.lora_embedding_B[name] = a, b

    def lora_output(self, name: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        after_a = F.embedding(x, a.T, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)
        return (after_a * s) @ b.T

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b, s = self.merge_factors(name)
        return (b.float() @ a.float()).T * s


class LoRAConvLayer(LoRALayer):
    """LoRA on ``nn.Conv1d/2d/3d``: ``A`` convolves with the base kernel to ``r`` channels,
    ``B`` is a 1x1 convolution, so ``delta W[o, i, ...] = s * sum_r B[o, r] A[r, i, ...]``."""

    def new_factors(self, name: str, r: int, dropout: float, init: str) -> None:
        conv = type(self).base_class
        kw = {"device": self.weight.device, "dtype": adapter_dtype(self.weight)}
        a = conv(self.in_channels, r, self.kernel_size, self.stride, self.padding, self.dilation,
                 bias=False, padding_mode=self.padding_mode, **kw)
        b = conv(r, self.out_channels, 1, bias=False, **kw)
        init_factors(a.weight, b.weight, init, r)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_output(self, name: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        a_conv, b_conv = self.lora_A[name], self.lora_B[name]
        h = a_conv._conv_forward(self.lora_dropout[name](x.to(a.dtype)), a, None)
        return b_conv._conv_forward(h * s, b, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b, s = self.merge_factors(name)
        return torch.tensordot(b.float().flatten(1), a.float(), dims=([1], [0])) * s


@torch.no_grad()
def _give_back(w: torch.Tensor, delta: torch.Tensor, residual: Residual) -> None:
    """``W_res -> W`` exactly: the inverse of a PiSSA/OLoRA initialisation's write (``delta``
    in the stored weight's layout)."""
    w.copy_((w.float() + delta).to(w.dtype))
    w.view(-1)[residual.wrong] = residual.originals.to(w.dtype)


KINDS: tuple[type[LoRALayer], ...] = (LoRALinearLayer, LoRAEmbeddingLayer, LoRAConvLayer)


def layer_kind(module: nn.Module) -> type[LoRALayer] | None:
    """Which LoRA layer kind adapts ``module`` (None: unsupported)."""
    from peftlab.core.targets import is_linear

    if is_linear(module):
        return LoRALinearLayer
    if isinstance(module, nn.Embedding):
        return LoRAEmbeddingLayer
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoRAConvLayer
    return None


def init_factors(a: torch.Tensor, b: torch.Tensor, init: str, r: int, embedding: bool = False) -> None:
    """peft's initialisations: ``default`` (A Kaiming-uniform, B zero), ``gaussian`` (A ~ N(0, 1/r);
    N(0, 1) for embeddings), ``random`` (B ~ N(0, 0.02) too: not identity at init)."""
    if a.device.type == "meta":
        return
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 if embedding else 1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(b, std=0.02)
        else:
            nn.init.zeros_(b)


def dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of the map a LoRA update of ``module`` has (a convolution's input side
    is its input channels times its kernel)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    w = module.weight  # GPT-2 Conv1D: (d_in, d_out)
    return int(w.shape[0]), int(w.shape[1])


def check_rank(module: nn.Module, r: int, where: str) -> None:
    """Refuse a rank above the layer's larger dimension: the update's rank cannot exceed the
    smaller one, so such factors only add parameters (and an absurd rank would exhaust memory)."""
    d_in, d_out = dims(module)
    if r > max(d_in, d_out):
        raise ConfigError(f"rank {r} for {where} is larger than both of its dimensions (d_in={d_in}, d_out={d_out}); "
                          f"an update of this layer has rank at most {min(d_in, d_out)}. Lower r (or give this "
                          "module its own rank with rank_pattern), or exclude it")


def check_patterns(method: str, field_name: str, patterns: Mapping[str, Any]) -> None:
    """Each key of a rank/alpha pattern must be a regular expression (matched on module paths)."""
    for key in patterns:
        try:
            re.compile(key)
        except re.error as e:
            raise ConfigError(f"{method}: {field_name} key {key!r} is not a regular expression ({e}); "
                              "escape special characters, e.g. 'layers\\.0\\.q_proj'") from None


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """peft's rank/alpha pattern rule: the first key ``k`` with ``(.*\\.)?(k)$`` matching the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def select_layers(model: nn.Module, what: str, *, target_modules: tuple[str, ...], exclude_modules: tuple[str, ...],
                  layers: tuple[int | str, ...] | None, skip: tuple[str, ...],
                  layers_pattern: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The modules a low-rank method adapts, by path, with the checks every member makes."""
    paths = select(model, target_modules, exclude=exclude_modules, layers=layers, supported=SUPPORTED,
                   supported_names=SUPPORTED_NAMES, skip=skip, what=what, layers_pattern=layers_pattern)
    modules = {p: model.get_submodule(p) for p in paths}
    grouped = [p for p, m in modules.items() if getattr(m, "groups", 1) != 1]
    if grouped:
        raise ConfigError(f"{what}: grouped convolutions are not supported ({grouped[:3]}); exclude them "
                          "with exclude_modules")
    return modules


def attach_layers(modules: Mapping[str, nn.Module], rank: Callable[[str], int],
                  kind: Callable[[type[LoRALayer]], type[LoRALayer]],
                  add: Callable[[LoRALayer, str], None],
                  check: Callable[[str, nn.Module], None] = lambda path, module: None) -> None:
    """The one attach path of the family: every check (rank, then the method's own ``check``)
    before any change, then per module adopt the layer kind (``kind`` maps LoRA's kind to the
    method's own) and ``add`` the adapter."""
    kinds = {}
    for path, module in modules.items():
        base = layer_kind(module)
        if base is None:
            raise ConfigError(f"{path}: {type(module).__name__} is not a layer the low-rank methods adapt")
        check_rank(module, rank(path), path)
        check(path, module)
        kinds[path] = kind(base)
    for path, module in modules.items():
        add(kinds[path].adopt(module), path)
