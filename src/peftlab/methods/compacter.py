"""Compacter: bottleneck adapters with PHM projections (Mahabadi et al., 2021, https://arxiv.org/abs/2106.04647).

Each projection ``W`` (``d_out x d_in``) of a bottleneck adapter is a parameterised hypercomplex
multiplication (PHM) layer, a sum of ``n`` Kronecker products::

    W = sum_i A_i (x) B_i,    A_i: n x n ("slow" rule, shared by every adapter site of the model),
                              B_i = s_i t_i,  s_i: (d_out/n) x r,  t_i: r x (d_in/n)  ("fast", per site)

so a projection costs ``r * (d_in + d_out)`` parameters plus its bias, and the whole adapter adds
``n^3`` shared parameters once. ``up``'s ``t`` starts at zero (the adapted model equals the base
model at initialisation). Defaults follow AdapterHub's ``compacter`` config (reduction factor 32,
n = 4, rank 1, GELU, after attention and feed-forward); ``placement=("ffn",)`` is Compacter++
(feed-forward only), which the paper finds as good with half the adapters.

The bottleneck width is rounded down to a multiple of ``n`` (at least ``n``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.method import register
from peftlab.methods.bottleneck import ACTIVATIONS, AdapterMethod, MLPForm, SiteAdapter, adapter_dtype


class PHMLinear(nn.Module):
    """The fast half of one PHM projection ``d_in -> d_out`` (the rule ``A`` is passed in)."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, zero: bool, **kw: Any) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.empty(n, d_out // n, rank, **kw))
        self.t = nn.Parameter(torch.empty(n, rank, d_in // n, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))
        std = (d_in * rank) ** -0.25  # entries of W then have variance about 1 / d_in
        with torch.no_grad():
            nn.init.normal_(self.s, std=std)
            if zero:
                nn.init.zeros_(self.t)
            else:
                nn.init.normal_(self.t, std=std)

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        n, a, _ = self.s.shape
        b = self.t.shape[2]
        fast = self.s @ self.t  # (n, d_out/n, d_in/n)
        return torch.einsum("ipq,iab->paqb", rule, fast).reshape(n * a, n * b)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(rule), self.bias)


class CompacterAdapter(SiteAdapter):
    """``s * up(f(down(LN(src))))`` with PHM ``down``/``up``. The first site of an adapter owns the
    shared rule (a parameter); the other sites hold a plain reference to that site."""

    def __init__(self, d: int, m: int, n: int, rank: int, non_linearity: str, layer_norm: bool, parallel: bool,
                 scaling: float, owner: CompacterAdapter | None, **kw: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, **kw) if layer_norm else None
        if owner is None:
            self.rule = nn.Parameter(torch.empty(n, n, n, **kw))
            with torch.no_grad():
                nn.init.normal_(self.rule, std=1.0 / math.sqrt(n))
        else:
            object.__setattr__(self, "rule_owner", owner)  # not a submodule: the rule is stored once
        self.down = PHMLinear(d, m, n, rank, zero=False, **kw)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = PHMLinear(m, d, n, rank, zero=True, **kw)
        self.parallel, self.scaling = parallel, scaling

    def shared_rule(self) -> torch.Tensor:
        return self.rule if "rule" in self._parameters else self.__dict__["rule_owner"].rule

    def routed_form(self) -> MLPForm:
        """The PHM projections as the dense matrices they compute (the rule is shared, so they
        are formed once per mixed-adapter batch)."""
        rule = self.shared_rule()
        return MLPForm(self.down.weight(rule), self.down.bias, self.up.weight(rule), self.up.bias, self.act,
                       float(self.scaling), self.parallel, self.norm)

    def delta(self, src: torch.Tensor) -> torch.Tensor:
        rule = self.shared_rule()
        z = src.to(self.down.s.dtype)
        if self.norm is not None:
            z = self.norm(z)
        return self.up(self.act(self.down(z, rule)), rule) * self.scaling


@register("compacter")
@dataclass(frozen=True)
class Compacter(AdapterMethod):
    """Bottleneck adapters with Kronecker-factored (PHM) projections; ``placement=("ffn",)`` is Compacter++."""

    reduction_factor: float = 32
    non_linearity: str = "gelu"
    phm_dim: int = 4
    """n: number of Kronecker terms and size of the shared rule matrices."""
    phm_rank: int = 1
    """Rank r of the per-site fast matrices."""

    suggested_lr: ClassVar[float] = 3e-3  # the Compacter paper's learning rate
    fsdp_compatible: ClassVar[bool] = False
    fsdp_reason: ClassVar[str] = ("its PHM rule matrices are one parameter shared by the adapter sites of every "
                                  "block, and FSDP2 shards a parameter with one block's group only")

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("phm_dim", "phm_rank"):
            v = getattr(self, key)
            if v < 1:
                raise ConfigError(f"compacter: {key} must be a positive integer (got {v!r})")

    def bottleneck(self, d: int) -> int:
        n = self.phm_dim
        return max(n, int(d // self.reduction_factor) // n * n)

    def build(self, d: int, ref: torch.Tensor, shared: dict[str, Any]) -> SiteAdapter:
        if d % self.phm_dim:
            raise ConfigError(f"compacter: hidden size {d} is not divisible by phm_dim={self.phm_dim}; "
                              f"choose a phm_dim that divides {d} (e.g. 2, 4 or 8)")
        m = self.bottleneck(d)
        if self.phm_rank > max(d, m) // self.phm_dim:
            raise ConfigError(f"compacter: phm_rank={self.phm_rank} is larger than the PHM blocks it factors "
                              f"((d/n, m/n) = ({d // self.phm_dim}, {m // self.phm_dim}) for hidden size {d}, bottleneck "
                              f"{m}, phm_dim {self.phm_dim}); use phm_rank <= {max(d, m) // self.phm_dim} (1 is usual)")
        adapter = CompacterAdapter(d, self.bottleneck(d), self.phm_dim, self.phm_rank, self.non_linearity,
                                   self.layer_norm, self.parallel, self.scaling, shared.get("owner"),
                                   device=ref.device, dtype=adapter_dtype(ref))
        shared.setdefault("owner", adapter)
        return adapter
