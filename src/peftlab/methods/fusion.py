"""AdapterFusion (Pfeiffer et al., 2021, https://arxiv.org/abs/2005.00247), AdapterFusion-Drop and
parallel multi-task inference (Rücklé et al., 2021, https://arxiv.org/abs/2010.11918).

Stage 1 trains N task adapters (Houlsby, Pfeiffer or Compacter), each alone (ST-A) or several
at once (MT-A: ``peftlab.use(model, "a", "b")`` stacks them). Stage 2, :func:`fuse`, builds a
fusion adapter that holds copies of the N adapters, frozen, and trains one fusion layer per
adapter site::

    a_i = adapter_i(h)                  (the N adapters' outputs at this site)
    w   = softmax_i(Q(h) . K(a_i))      (query: the sublayer's output; keys: the adapters' outputs)
    h'  = sum_i w_i V(a_i)              (computed as h + sum_i w_i (V(a_i) - h): the same because
                                         sum_i w_i = 1, and exactly h while the adapters are zero)

``V`` starts as the identity (so h' starts as the weighted mean of the adapters' outputs), ``Q``
and ``K`` start small and random (near-uniform weights). :func:`fusion_weights` gives each site's
mean weights from the last forward pass; :func:`prune_fusion` (AdapterFusion-Drop) removes the
adapters the fusion uses least. The fusion is one adapter: ``peftlab.save`` writes the N adapters
and the fusion layers into one folder, and ``peftlab.load`` brings them back.

:func:`parallel_forward` runs N task adapters (and task heads) on one batch: the shared base
runs once up to the first block with an adapter, then the batch is repeated N times and row
chunk i uses task i's adapter. AdapterDrop (``drop_first``, :func:`~peftlab.methods.bottleneck.adapter_drop`)
moves that block up, so more of the model is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import AdapterStateError, ConfigError
from peftlab.core.method import Method, _jsonable, method_class, register
from peftlab.core.transaction import transaction
from peftlab.methods.bottleneck import (OWNER, AdapterMethod, BottleneckLayer, adapter_dtype, all_blocks, architecture,
                                        bottleneck_layers, install, reference_tensor, width)


class FusionUnit(nn.Module):
    """The N member adapters of one site and the fusion layer over them."""

    def __init__(self, d: int, members: dict[str, nn.Module], **kw: Any) -> None:
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.query = nn.Linear(d, d, **kw)
        self.key = nn.Linear(d, d, **kw)
        self.value = nn.Linear(d, d, bias=False, **kw)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(d, **kw))
        self.last_weights: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, x_in: torch.Tensor | None) -> torch.Tensor:
        dt = self.query.weight.dtype
        outs = torch.stack([m(h, x_in) for m in self.members.values()], dim=-2).to(dt)  # (..., N, d)
        hq = h.to(dt)
        scores = torch.einsum("...d,...nd->...n", self.query(hq), self.key(outs))
        w = torch.softmax(scores, dim=-1)
        self.last_weights = w.detach().reshape(-1, w.shape[-1]).float().mean(0)
        fused = (w.unsqueeze(-1) * (self.value(outs) - hq.unsqueeze(-2))).sum(-2)
        return h + fused.to(h.dtype)


def member_method(name: str, config: dict[str, Any]) -> AdapterMethod:
    """The adapter method a member config describes (``{"method": "houlsby", ...options}``)."""
    opts = dict(config)
    kind = opts.pop("method", None)
    if not isinstance(kind, str):
        raise ConfigError(f"fusion: member {name!r} needs a 'method' key naming its method, e.g. "
                          f"{{'method': 'houlsby'}} (got {kind!r})")
    cls = method_class(kind)
    if not issubclass(cls, AdapterMethod):
        raise ConfigError(f"fusion: member {name!r} is a {kind!r} adapter; fusion fuses bottleneck adapters "
                          "(houlsby, pfeiffer, compacter)")
    opts.pop("modules_to_save", None)  # a member's head is not part of the fusion
    return cls.from_options(opts)


@register("fusion")
@dataclass(frozen=True)
class Fusion(Method):
    """A fusion layer per adapter site over N bottleneck adapters (their copies live inside it).

    Build it from trained adapters with :func:`fuse`; ``peftlab.attach(model, "fusion",
    adapters={...})`` builds it with fresh (zero, i.e. identity) members.
    """

    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Member name -> its method config: ``{"method": "houlsby", "reduction_factor": 16, ...}``."""
    train_adapters: bool = False
    """Also train the members (AdapterHub's unfrozen fusion); False is the paper's stage 2."""

    layer_owner: ClassVar[str] = OWNER
    mergeable: ClassVar[bool] = False
    suggested_lr: ClassVar[float] = 1e-3

    def __post_init__(self) -> None:
        canonical = {}
        for n, cfg in dict(self.adapters).items():
            slots.check_name(n)
            if not isinstance(cfg, dict):
                raise ConfigError(f"fusion: adapters[{n!r}] must be a method config dict (got {cfg!r})")
            m = member_method(n, cfg)
            canonical[n] = {"method": m.method_name, **_jsonable(m.options())}
        object.__setattr__(self, "adapters", canonical)

    def members(self) -> dict[str, AdapterMethod]:
        return {n: member_method(n, cfg) for n, cfg in self.adapters.items()}

    @property
    def fsdp_compatible(self) -> bool:  # type: ignore[override]
        """A fusion shards under FSDP2 when every member does (``Method.fsdp_compatible``)."""
        return all(m.fsdp_compatible for m in self.members().values())

    @property
    def fsdp_reason(self) -> str:  # type: ignore[override]
        return "; ".join(f"member {n!r} ({m.method_name}): {m.fsdp_reason}"
                         for n, m in self.members().items() if not m.fsdp_compatible)

    def attach(self, model: nn.Module, name: str) -> None:
        members = self.members()
        if not members:
            raise ConfigError("fusion: no adapters to fuse; train adapters first and call "
                              "peftlab.methods.fusion.fuse(model, ['task_a', 'task_b'])")
        per = {n: m.sites(model) for n, m in members.items()}
        first = next(iter(per))
        where = {n: [(s.block, s.kind) for s in ss] for n, ss in per.items()}
        differ = [n for n in per if where[n] != where[first]]
        if differ:
            raise ConfigError(f"fusion: adapters {[first, *differ]} sit at different places "
                              f"({', '.join(f'{n}: {len(where[n])} sites from block {where[n][0][0]}' for n in [first, *differ])}); "
                              "fused adapters need the same placement and drop_first")
        sites = per[first]
        shared: dict[str, dict[str, Any]] = {n: {} for n in members}
        units = []
        for site in sites:
            out = model.get_submodule(site.out)
            d = width(out, model)
            ref = reference_tensor(out)
            unit = FusionUnit(d, {n: m.build(d, ref, shared[n]) for n, m in members.items()},
                              device=ref.device, dtype=adapter_dtype(ref))
            unit.members.requires_grad_(self.train_adapters)
            units.append(unit)
        install(model, name, sites, units, any(m.parallel for m in members.values()))

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """The fusion layers (and the members when ``train_adapters``); frozen members are saved
        with the fusion but are not its parameters."""
        out = super().parameters(model, name)
        return out if self.train_adapters else {k: p for k, p in out.items() if ".members." not in k}


# ----------------------------------------------------------------------------- helpers
def fuse(model: nn.Module, adapters: Sequence[str], name: str = "fusion", *, train_adapters: bool = False,
         modules_to_save: Sequence[str] = (), activate: bool = True) -> Fusion:
    """Stage 2 of AdapterFusion: a fusion adapter ``name`` over copies of the trained ``adapters``.

    The base and the members are frozen; the fusion layers (and ``modules_to_save``) train.
    """
    from peftlab import api

    present = api.adapters(model)
    missing = [n for n in adapters if n not in present]
    if missing:
        raise AdapterStateError(f"fusion: no adapter named {missing} on the model (adapters: {sorted(present)})")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"fusion: adapters {list(adapters)} name one adapter twice")
    wrong = [n for n in adapters if not isinstance(present[n], AdapterMethod)]
    if wrong:
        raise ConfigError(f"fusion: {wrong} are not bottleneck adapters "
                          f"({', '.join(present[n].method_name for n in wrong)}); fuse houlsby, pfeiffer or compacter adapters")
    method = Fusion(adapters={n: {"method": present[n].method_name, **present[n].options()} for n in adapters},
                    train_adapters=train_adapters, modules_to_save=tuple(modules_to_save))
    with transaction(model):
        api.attach(model, method, name, activate=activate)
        for n in adapters:  # stage 2: the trained adapters stay as they are
            for p in api.adapter_parameters(model, n).values():
                p.requires_grad_(False)
        with torch.no_grad():
            for _, layer in bottleneck_layers(model):
                if name in layer.adapters:
                    for n in adapters:
                        layer.adapters[name].members[n].load_state_dict(layer.adapters[n].state_dict())
    return method


def _units(model: nn.Module, name: str) -> dict[str, FusionUnit]:
    s = slots.slot(model, name)
    if not isinstance(s.method, Fusion):
        raise ConfigError(f"adapter {name!r} is a {s.method.method_name} adapter, not a fusion")
    return {p: layer.adapters[name] for p, layer in bottleneck_layers(model) if name in layer.adapters}


def fusion_weights(model: nn.Module, name: str = "fusion") -> dict[str, dict[str, float]]:
    """Per site: each member's mean softmax weight over the tokens of the last forward pass."""
    out = {}
    for path, unit in _units(model, name).items():
        if unit.last_weights is None:
            raise AdapterStateError(f"fusion {name!r} has not run yet; run the model on some inputs first")
        out[path] = dict(zip(unit.members.keys(), unit.last_weights.tolist()))
    return out


def prune_fusion(model: nn.Module, name: str = "fusion", keep: int = 1) -> list[str]:
    """AdapterFusion-Drop: keep the ``keep`` members with the largest mean weight (over sites, from
    the last forward pass, which should be on representative inputs); returns the removed names."""
    units = _units(model, name)
    weights = fusion_weights(model, name)
    members = list(next(iter(units.values())).members.keys())
    if not 1 <= keep <= len(members):
        raise ConfigError(f"prune_fusion: keep must be in 1..{len(members)} (got {keep})")
    mean = {n: sum(w[n] for w in weights.values()) / len(weights) for n in members}
    drop = sorted(members, key=lambda n: mean[n])[: len(members) - keep]
    for unit in units.values():
        for n in drop:
            del unit.members[n]
        unit.last_weights = None
    s = slots.slot(model, name)
    method = s.method
    assert isinstance(method, Fusion)
    s.method = dataclasses.replace(method, adapters={n: c for n, c in method.adapters.items() if n not in drop})
    return drop


# ----------------------------------------------------------------------------- multi-task inference
def _repeat(value: Any, batch: int, n: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value.repeat(n, *([1] * (value.ndim - 1))) if value.ndim >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_repeat(v, batch, n) for v in value)
    return value


def parallel_forward(model: nn.Module, inputs: dict[str, torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    """Run the tasks ``names`` (adapters, each with its ``modules_to_save`` head) on one batch and
    return each task's logits, equal to running each adapter alone.

    The base runs once on the batch up to the first block that carries an adapter of these tasks
    (after AdapterDrop); from there the batch is repeated once per task and row chunk i runs
    task i's adapter and head.
    """
    from peftlab import api

    names = list(names)
    reg = slots.registry(model)
    missing = [n for n in names if n not in reg.adapters]
    if missing or not names:
        raise AdapterStateError(f"parallel_forward: no adapter named {missing or names} (adapters: {sorted(reg.adapters)})")
    method = reg.adapters[names[0]].method
    arch = architecture(model, getattr(method, "architecture", None))
    block_list = all_blocks(model, arch)
    layers = [layer for _, layer in bottleneck_layers(model)]
    prev_active = list(reg.active)
    api.use(model, *names)
    first = min((layer.__dict__.get("peftlab_block", 0) for layer in layers if set(layer.live_adapters()) & set(names)),
                default=len(block_list))
    batch = next(iter(inputs.values())).shape[0]
    n = len(names)

    def expand(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _repeat(args, batch, n), {k: _repeat(v, batch, n) for k, v in kwargs.items()}

    def per_task_head(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        chunks = x.chunk(n) if x.shape[0] == n * batch else [x] * n  # [x] * n: every block was shared
        parts = []
        for task, chunk in zip(names, chunks):
            copy = module.peftlab_copy[task] if task in module.peftlab_copy else None
            parts.append(copy(chunk) if copy is not None else type(module).base_class.forward(module, chunk))
        return torch.cat(parts)

    hooks = [b.register_forward_pre_hook(expand, with_kwargs=True) for b in list(block_list)[first:]]
    hooks += [m.register_forward_hook(per_task_head) for _, m in slots.copy_layers(model)]
    for layer in layers:
        layer.__dict__["peftlab_rows"] = names
    try:
        logits = model(**inputs, use_cache=False).logits if _takes_cache(model) else model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
        for layer in layers:
            layer.__dict__.pop("peftlab_rows", None)
        api.use(model, *prev_active)
    if logits.shape[0] != n * batch:  # no adapter and no head of these tasks ran: all give the base output
        return [logits] * n
    return list(logits.chunk(n))


def _takes_cache(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "use_cache", False))
