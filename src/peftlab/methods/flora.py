"""FLoRA: low-rank core space for N-dimensional weights (Si et al., 2024, https://arxiv.org/abs/2405.14739).

A weight with ``N`` modes (``d_out x d_in`` for a linear layer, ``out x in x kh x kw`` for a 2-D
convolution) gets a Tucker-structured update::

    delta W = s * (G x_1 U_1 x_2 U_2 ... x_N U_N),    G: r_1 x ... x r_N,   U_k: d_k x r_k

one factor matrix per mode and a small core ``G``. Unlike LoRA on a convolution (which flattens
the kernel into a matrix), the spatial modes keep their own low-rank factors, so a 3x3 kernel
costs ``3 r_k`` per spatial mode instead of multiplying the input side by 9. A fixed scale ``s``
replaces LoRA's ``alpha / r``. The core starts at zero (the model equals the base at
initialisation) and the factors start with orthonormal columns, so gradients reach the core
first, as they reach LoRA's ``B``.

Ranks follow the order of the module's weight dimensions: ``nn.Linear`` (out, in), GPT-2
``Conv1D`` (in, out), ``nn.Embedding`` (num_embeddings, dim), ``nn.Conv1d/2d/3d``
(out, in, *kernel). ``r`` is the rank of the two channel/feature modes, ``kernel_r`` of each
spatial mode (default: the kernel size, i.e. no reduction there), ``rank_pattern`` gives a whole
rank tuple per module. peft has no FLoRA, so the files are peftlab's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import Method, register
from peftlab.core.targets import ALL_LINEAR, is_linear, select
from peftlab.methods._lowrank import adapter_dtype, check_patterns, pattern_value

__all__ = ["FLoRA", "tucker"]

SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def tucker(core: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``core x_1 U_1 ... x_N U_N``: mode ``k`` of ``core`` (size ``r_k``) becomes size ``d_k``
    through ``U_k`` (``d_k x r_k``); a ``None`` factor leaves that mode as it is."""
    if len(factors) != core.ndim:
        raise ValueError(f"tucker: {len(factors)} factors for a core with {core.ndim} modes")
    out = core
    for u in factors:  # contract the leading mode and append the new one: modes come back in order
        out = out.movedim(0, -1) if u is None else torch.tensordot(out, u, dims=([0], [1]))
    return out


class FLoRALayer(MergeableLayer):
    """State shared by the FLoRA layer kinds: a core and one factor per weight mode per adapter."""

    owner_method = "flora"
    class_prefix = "FLoRA"
    adapter_containers = ("flora_core", "flora_factors")
    parameter_containers = ("flora_core",)

    def add_adapter(self, name: str, ranks: tuple[int, ...], scale: float) -> None:
        w = self.weight
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        core = nn.Parameter(torch.zeros(ranks, **kw))
        factors = nn.ParameterList([nn.Parameter(torch.empty(d, r, **kw)) for d, r in zip(w.shape, ranks)])
        if w.device.type != "meta":
            with torch.no_grad():
                for u in factors:  # orthonormal columns (QR in fp32: no low-precision kernel)
                    u.copy_(nn.init.orthogonal_(torch.empty(u.shape, device=u.device)))
        self.flora_core[name] = core
        self.flora_factors[name] = factors
        self.set_adapter_state(name, scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        for name in self.live_adapters():
            out = out + self.flora_output(name, x).to(out.dtype)
        return out

    def flora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``delta W`` applied to ``x`` without forming ``delta W``."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        core = self.flora_core[name].float()
        return tucker(core, [u.float() for u in self.flora_factors[name]]) * self.adapter_state(name)


class FLoRALinearLayer(FLoRALayer):
    """FLoRA on ``nn.Linear`` (weight out x in) and GPT-2 ``Conv1D`` (weight in x out)."""

    def flora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        core = self.flora_core[name]
        u0, u1 = self.flora_factors[name]
        x = x.to(core.dtype)
        if isinstance(self, nn.Linear):  # y = x dW^T = x U_in G^T U_out^T
            return ((x @ u1) @ core.T) @ u0.T * self.adapter_state(name)
        return ((x @ u0) @ core) @ u1.T * self.adapter_state(name)  # y = x dW = x U_in G U_out^T


class FLoRAEmbeddingLayer(FLoRALayer):
    """FLoRA on ``nn.Embedding``: the token factor (num_embeddings x r_1) is looked up per token."""

    def flora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        u_tok, u_dim = self.flora_factors[name]
        return (F.embedding(x, u_tok, self.padding_idx) @ self.flora_core[name]) @ u_dim.T * self.adapter_state(name)


class FLoRAConvLayer(FLoRALayer):
    """FLoRA on ``nn.Conv1d/2d/3d``: a 1x1 convolution to ``r_in`` channels, the small kernel
    ``G x_3 U_3 ...`` (``r_out x r_in x k...``) with the layer's stride, padding and dilation,
    then a 1x1 convolution to the output channels. Point-wise channel maps commute with padding
    and striding, so this equals convolving with ``delta W``."""

    def flora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        core = self.flora_core[name]
        u_out, u_in, *spatial = self.flora_factors[name]
        conv = _CONV[self.weight.ndim]
        ones = (1,) * len(spatial)
        h = conv(x.to(core.dtype), u_in.T.reshape(*u_in.T.shape, *ones))
        h = self._conv_forward(h, tucker(core, [None, None, *spatial]), None)  # type: ignore[attr-defined]
        return conv(h, u_out.reshape(*u_out.shape, *ones)) * self.adapter_state(name)


def layer_kind(module: nn.Module) -> type[FLoRALayer] | None:
    """Which FLoRA layer adapts ``module`` (None: unsupported)."""
    if is_linear(module):
        return FLoRALinearLayer
    if isinstance(module, nn.Embedding):
        return FLoRAEmbeddingLayer
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return FLoRAConvLayer
    return None


def flora_parameter_count(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of one FLoRA adapter on a weight of ``shape``: the core plus the factors."""
    core = 1
    for r in ranks:
        core *= r
    return core + sum(d * r for d, r in zip(shape, ranks))


@register("flora")
@dataclass(frozen=True)
class FLoRA(Method):
    """Tucker-structured low-rank update for 2-D to 5-D weights. Mergeable; identity at init."""

    r: int = 8
    """Rank of the two channel/feature modes (out and in)."""
    kernel_r: int | None = None
    """Rank of each spatial mode of a convolution kernel; None: the kernel size (full)."""
    scale: float = 8.0
    """The fixed scale s of the update (FLoRA's replacement for alpha / r). With Adam, the output
    change of the first steps grows like s * r^1.5 / sqrt(d) against LoRA's alpha (zero core,
    orthonormal factors): s = 8 at r = 8 matches LoRA(r=8, alpha=16) on 384-wide layers."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules get FLoRA (see peftlab.core.targets); convolutions need explicit targets."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    rank_pattern: dict[str, Sequence[int]] = field(default_factory=dict)  # checked below: one rank per mode
    """Per-module ranks, one per weight mode in the weight's dimension order: {regex: ranks},
    peft's rule (the first key matching the end of the module path)."""

    mergeable: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 1e-3

    def __post_init__(self) -> None:
        if not _positive_int(self.r):
            raise ConfigError(f"flora: r must be a positive integer (got {self.r!r}); 8 is a good start")
        if self.kernel_r is not None and not _positive_int(self.kernel_r):
            raise ConfigError(f"flora: kernel_r must be None (the kernel size) or a positive integer "
                              f"(got {self.kernel_r!r})")
        if not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ConfigError(f"flora: scale must be a positive number (got {self.scale!r})")
        pattern = {}
        for k, v in self.rank_pattern.items():
            if isinstance(v, int) or not isinstance(v, (list, tuple)) or not all(_positive_int(x) for x in v):
                raise ConfigError(f"flora: rank_pattern[{k!r}] must be a list of positive ranks, one per weight "
                                  f"mode, e.g. [32, 32, 2, 2] for a Conv2d (got {v!r})")
            pattern[k] = tuple(v)
        check_patterns("flora", "rank_pattern", pattern)
        object.__setattr__(self, "rank_pattern", pattern)  # JSON lists -> tuples: equal after a round trip

    def ranks(self, path: str, module: nn.Module) -> tuple[int, ...]:
        """The Tucker ranks for ``module`` (at ``path``), checked against its weight's modes."""
        shape = tuple(module.weight.shape)
        explicit = pattern_value(self.rank_pattern, path, None)
        if explicit is not None:
            ranks = tuple(explicit)
            if len(ranks) != len(shape):
                raise ConfigError(f"flora: rank_pattern gives {len(ranks)} ranks {list(ranks)} for {path}, whose "
                                  f"weight has {len(shape)} modes {list(shape)}; give one rank per mode")
        else:
            spatial = [self.kernel_r if self.kernel_r is not None else d for d in shape[2:]]
            ranks = (self.r, self.r, *spatial)
        too_big = [(i, r, d) for i, (r, d) in enumerate(zip(ranks, shape)) if r > d]
        if too_big:
            i, r, d = too_big[0]
            what = "r" if i < 2 and explicit is None else "kernel_r" if explicit is None else "rank_pattern"
            raise ConfigError(f"flora: Tucker rank {r} of mode {i} is larger than that mode of {path} "
                              f"(weight shape {list(shape)}: mode {i} has size {d}); lower {what} to at most {d}, "
                              "give this module its own ranks with rank_pattern, or exclude it")
        return ranks

    def attach(self, model: nn.Module, name: str) -> None:
        paths = select(model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
                       supported=SUPPORTED, supported_names=("Conv1D",), skip=self.modules_to_save, what="flora")
        modules = {p: model.get_submodule(p) for p in paths}
        grouped = [p for p, m in modules.items() if getattr(m, "groups", 1) != 1]
        if grouped:
            raise ConfigError(f"flora: grouped convolutions are not supported ({grouped[:3]}); exclude them "
                              "with exclude_modules")
        ranks = {p: self.ranks(p, m) for p, m in modules.items()}  # every check before any change
        for path, module in modules.items():
            layer = layer_kind(module).adopt(module)  # type: ignore[union-attr]
            layer.add_adapter(name, ranks[path], float(self.scale))


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1

