"""Bottleneck adapters: Houlsby and Pfeiffer, plus the machinery the adapter family shares.

A bottleneck adapter (Houlsby et al., 2019, https://arxiv.org/abs/1902.00751) is a small
network added to a transformer sublayer::

    h' = h + s * up(f(down(LN(src))))     down: d -> d / reduction_factor, up: back to d

where ``h`` is the sublayer's output (attention or feed-forward, before its residual connection)
and ``src`` is ``h`` (sequential form) or the sublayer's *input* (parallel form, He et al., 2022,
https://arxiv.org/abs/2110.04366). ``up`` starts at zero, so the adapted model equals the base
model at initialisation. ``LN`` (optional) is a trainable layer norm on the adapter input.

* **Houlsby**: an adapter after the attention output and after the feed-forward output of every
  block (AdapterHub's ``houlsby`` config: reduction factor 16, swish).
* **Pfeiffer** (Pfeiffer et al., 2021, https://arxiv.org/abs/2005.00247): after the feed-forward
  output only (AdapterHub's ``pfeiffer``: reduction factor 16, ReLU); half the adapters of Houlsby
  for about the same score in that paper.

Where the sublayers are is found from the model's structure (:func:`discover_sites`): the
blocks are the module lists whose blocks each hold an attention module (an encoder's and a
decoder's, in forward order); in each block the attention output is the last hidden-size linear
layer inside its (self-)attention module and the feed-forward output the last one outside every
attention module (a mixture-of-experts block with fused expert tensors is itself the site).
:data:`ARCHITECTURES` (via :func:`register_architecture`) and the ``architecture`` option of a
single adapter are overrides for a model whose structure says otherwise.

**AdapterDrop** (Rücklé et al., 2021, https://arxiv.org/abs/2010.11918): ``drop_first=k`` puts no
adapter in the first ``k`` blocks (training and inference); ``robust_drop=True`` drops the
adapters of a random number of lower blocks at each training step, so that the trained adapter
works with any number dropped at inference (:func:`adapter_drop`). Dropped lower blocks make the
shared part of parallel multi-task inference longer (``peftlab.methods.fusion.parallel_forward``).

Adapters are not mergeable: the non-linearity keeps them out of the base weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.config import HIDDEN, first_int, text_config
from peftlab.core.errors import ConfigError, TargetError
from peftlab.core.layer import AdapterLayer, adapter_layers
from peftlab.core.method import Method, register

OWNER = "bottleneck"
"""Tag of every layer the adapter family adapts (Houlsby, Pfeiffer, Compacter, fusion share it)."""
PLACES = ("attn", "ffn")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU,
                                           "tanh": nn.Tanh}


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Architecture:
    """Where the sublayers of one model family are (module paths; ``out``/``in`` are relative to a block).

    Attributes:
        blocks: Path (or path suffix) of the ``nn.ModuleList`` of transformer blocks.
        attn_out: Module whose output is the attention sublayer's output (before the residual).
        ffn_out: Module whose output is the feed-forward sublayer's output (before the residual).
        attn_in: Module whose first input is the attention sublayer's input (parallel form).
        ffn_in: Module whose first input is the feed-forward sublayer's input (parallel form).
    """

    blocks: str
    attn_out: str
    ffn_out: str
    attn_in: str
    ffn_in: str

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Architecture:
        keys = ("blocks", "attn_out", "ffn_out", "attn_in", "ffn_in")
        bad = sorted(set(d) - set(keys))
        lacking = [k for k in keys if k not in d]
        if bad or lacking:
            raise ConfigError(f"architecture option needs exactly the keys {list(keys)} "
                              f"(unknown: {bad}, missing: {lacking}); e.g. {_EXAMPLE}")
        return cls(**{k: str(d[k]) for k in keys})


ARCHITECTURES: dict[str, Architecture] = {}
"""``config.model_type`` -> :class:`Architecture`: overrides for a model whose structure
:func:`discover_sites` reads wrongly. Empty by default: every architecture tested is found."""
_EXAMPLE = ('{"blocks": "model.layers", "attn_out": "self_attn.o_proj", "ffn_out": "mlp.down_proj", '
            '"attn_in": "self_attn", "ffn_in": "mlp"}')


def register_architecture(model_type: str, arch: Architecture) -> None:
    """Teach the adapter family a new ``config.model_type``."""
    ARCHITECTURES[model_type] = arch


def architecture(model: nn.Module, override: dict[str, str] | None = None) -> Architecture | None:
    """The override for ``model`` (``override``, given as a dict, wins over the map), or None:
    its sites are then found from its structure (:func:`discover_sites`)."""
    if override:
        return Architecture.from_dict(override)
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return ARCHITECTURES.get(model_type)


# ----------------------------------------------------------------------------- structure
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or "Conv1D" in {c.__name__ for c in type(module).__mro__}


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def hidden_size(model: nn.Module) -> int | None:
    """The model's hidden size from its (text) config."""
    return first_int(text_config(model), *HIDDEN)


def _holds_attention(module: nn.Module) -> bool:
    return any(_is_attention(m) for m in module.modules())


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The lists of transformer blocks, in forward order (an encoder's before a decoder's): module
    lists whose every element holds an attention module, and that sit in no other such list."""
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue
        if all(_holds_attention(b) for b in module) and len({type(b) for b in module}) == 1 \
                and not _is_attention(module[0]):
            found.append((path, module))
    return found


def _base_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` of the base model only: what adapters added inside an adapted layer is skipped."""
    out: list[tuple[str, nn.Module]] = []
    adapted: list[str] = []
    for p, m in module.named_modules():
        if any(p == q or p.startswith(q + ".") for q in adapted):
            continue
        out.append((p, m))
        if isinstance(m, AdapterLayer):
            adapted += [f"{p}.{c}" if p else c for c in m.adapter_containers]
    return out


def _block_sites(model: nn.Module, path: str, block: nn.Module, index: int, d: int) -> dict[str, Site]:
    """The attention and feed-forward sites of one block (self-attention only; cross-attention and
    the layers around them are left alone)."""
    named = _base_modules(block)
    attn = [(p, m) for p, m in named if p and _is_attention(m)]
    if not attn:
        return {}
    top_attn = [(p, m) for p, m in attn if not any(p.startswith(q + ".") for q, _ in attn if q != p)]
    a_path, a_mod = top_attn[0]
    in_attention = [q for q, _ in top_attn]
    sites: dict[str, Site] = {}
    a_linears = [f"{a_path}.{p}" for p, m in _base_modules(a_mod) if p and _is_linear(m) and width(m) == d]
    if a_linears:
        sites["attn"] = Site(index, "attn", f"{path}.{a_linears[-1]}", f"{path}.{a_path}")

    def outside(p: str) -> bool:
        return not any(p == q or p.startswith(q + ".") for q in in_attention)

    ffn = [(p, m) for p, m in named if p and outside(p) and _is_linear(m)]
    outs = [p for p, m in ffn if width(m) == d]

    def top(p: str) -> str:  # the outermost module under the block that holds p and no attention
        parts = p.split(".")
        for k in range(1, len(parts) + 1):
            cand = ".".join(parts[:k])
            if not _holds_attention(block.get_submodule(cand)):
                return cand
        return p

    if outs:
        sites["ffn"] = Site(index, "ffn", f"{path}.{outs[-1]}", f"{path}.{top(ffn[0][0])}")
    else:  # mixture of experts with fused expert tensors: the expert block itself is the site
        moe = [p for p, m in block.named_children() if outside(p) and not _holds_attention(m)
               and any(q.dim() >= 3 for q in m.parameters())]
        if moe:
            sites["ffn"] = Site(index, "ffn", f"{path}.{moe[0]}", f"{path}.{moe[0]}")
    return sites


def discover_sites(model: nn.Module) -> list[dict[str, Site]]:
    """Every block's sites, in forward order, found from the model's structure: the blocks are the
    module lists of :func:`block_lists`; in each, the attention output is the last linear layer of
    hidden-size output inside the first attention module, the feed-forward output the last such
    layer outside every attention module, and the parallel form's inputs are the attention module
    and the outermost module holding the first feed-forward layer."""
    d = hidden_size(model)
    lists = block_lists(model)
    if d is None or not lists:
        raise TargetError(
            f"adapters found no transformer blocks in {type(model).__name__} (module lists whose blocks hold an "
            f"attention module, with a config stating the hidden size). Pass architecture={_EXAMPLE} (module "
            "paths for your model), or add an entry with peftlab.methods.bottleneck.register_architecture(...)")
    out: list[dict[str, Site]] = []
    for path, layers in lists:
        for i, block in enumerate(layers):
            out.append(_block_sites(model, f"{path}.{i}", block, len(out), d))
    return out


def all_blocks(model: nn.Module, arch: Architecture | None) -> list[nn.Module]:
    """The transformer blocks in forward order (from the override, or found from the structure)."""
    if arch is not None:
        return list(blocks(model, arch)[1])
    return [b for _, layers in block_lists(model) for b in layers]


def blocks(model: nn.Module, arch: Architecture) -> tuple[str, nn.ModuleList]:
    """Path and module of the list of transformer blocks."""
    hits = [(p, m) for p, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and (p == arch.blocks or p.endswith("." + arch.blocks))]
    if len(hits) != 1:
        lists = [p for p, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise TargetError(f"architecture blocks={arch.blocks!r} matches {len(hits)} module lists of "
                          f"{type(model).__name__} (need exactly one); its module lists: {lists[:8]}")
    return hits[0]


@dataclass(frozen=True)
class Site:
    """One place that carries an adapter: block ``block``'s ``kind`` sublayer."""

    block: int
    kind: str
    out: str
    inp: str


def find_sites(model: nn.Module, arch: Architecture | None, placement: tuple[str, ...],
               drop_first: int) -> list[Site]:
    """Every adapter site of ``model`` in forward order; raises before anything changes."""
    if arch is None:
        found = discover_sites(model)
        if not 0 <= drop_first < len(found):
            raise ConfigError(f"drop_first={drop_first} but {type(model).__name__} has {len(found)} blocks; "
                              f"use 0..{len(found) - 1}")
        sites = [b[kind] for b in found[drop_first:] for kind in PLACES if kind in placement and kind in b]
        lacking = sorted({kind for b in found for kind in placement if kind not in b})
        if lacking:
            raise TargetError(f"adapters found no {' or '.join(lacking)} output projection in some blocks of "
                              f"{type(model).__name__}; pass architecture={_EXAMPLE} or a placement without it")
        return sites
    path, layers = blocks(model, arch)
    if not 0 <= drop_first < len(layers):
        raise ConfigError(f"drop_first={drop_first} but {type(model).__name__} has {len(layers)} blocks; "
                          f"use 0..{len(layers) - 1}")
    sites = []
    for i in range(drop_first, len(layers)):
        for kind in PLACES:
            if kind in placement:
                out = f"{path}.{i}.{getattr(arch, kind + '_out')}"
                inp = f"{path}.{i}.{getattr(arch, kind + '_in')}"
                for p in (out, inp):
                    try:
                        model.get_submodule(p)
                    except AttributeError:
                        raise TargetError(f"the architecture map names {p!r}, which {type(model).__name__} does "
                                          "not have; fix the entry (or pass architecture=...)") from None
                sites.append(Site(i, kind, out, inp))
    return sites


def width(module: nn.Module, model: nn.Module | None = None) -> int:
    """Output width of a sublayer's output module (``nn.Linear``, GPT-2 ``Conv1D``, or a
    mixture-of-experts block, whose output has the model's hidden size)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if "Conv1D" in {c.__name__ for c in type(module).__mro__}:
        return int(module.weight.shape[1])
    d = hidden_size(model) if model is not None else None
    if d is not None:
        return d
    raise TargetError(f"adapter sites must be linear output projections, got {type(module).__name__}")


def reference_tensor(module: nn.Module) -> torch.Tensor:
    """A tensor whose device and dtype the site's adapter takes."""
    return next(t for t in module.parameters()) if not hasattr(module, "weight") else module.weight


def adapter_dtype(ref: torch.Tensor) -> torch.dtype:
    """Adapters of a half-precision base train in fp32."""
    return torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype


# ----------------------------------------------------------------------------- adapter modules
class RobustDrop:
    """Shared by the sites of one robustly dropped adapter: the lower blocks skipped this step."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.k = 0

    def draw(self) -> None:
        self.k = int(torch.randint(0, self.n_blocks, ()).item())


@dataclass(frozen=True, eq=False)
class MLPForm:
    """A bottleneck adapter's update ``s * (up(f(down(LN(src)))))`` for a mixed-adapter batch
    (``peftlab.core.routing``): ``src`` is the sublayer output, or its input for the parallel
    form. Stacked, widths are padded with zeros to the largest (exact: ``f(0) = 0`` for every
    activation offered, and the padded columns of ``up`` are zero)."""

    down_w: torch.Tensor
    """``(m, d)``"""
    down_b: torch.Tensor
    up_w: torch.Tensor
    """``(d, m)``"""
    up_b: torch.Tensor
    act: nn.Module
    scaling: float
    parallel: bool
    norm: nn.LayerNorm | None = None

    @property
    def key(self) -> Hashable:
        norm = None if self.norm is None else (self.norm.eps, self.norm.weight is not None)
        return repr(self.act), self.parallel, norm, self.down_w.dtype

    @classmethod
    def stack(cls, forms: Sequence[MLPForm]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        f0 = forms[0]
        g, m, d = len(forms), max(f.down_w.shape[0] for f in forms), f0.down_w.shape[1]
        kw = {"dtype": f0.down_w.dtype, "device": f0.down_w.device}
        t = {"down": torch.zeros(g, d, m, **kw), "down_b": torch.zeros(g, 1, m, **kw),
             "up": torch.zeros(g, m, d, **kw), "up_b": torch.zeros(g, 1, d, **kw),
             "s": torch.tensor([f.scaling for f in forms], **kw).view(g, 1, 1)}
        for i, f in enumerate(forms):
            w = f.down_w.shape[0]
            t["down"][i, :, :w] = f.down_w.T
            t["down_b"][i, 0, :w] = f.down_b
            t["up"][i, :w] = f.up_w.T
            t["up_b"][i, 0] = f.up_b
        static: dict[str, Any] = {"act": f0.act, "parallel": f0.parallel, "norm": None}
        if f0.norm is not None:
            static["norm"] = (f0.norm.normalized_shape, f0.norm.eps)
            if f0.norm.weight is not None:
                t["norm_w"] = torch.stack([f.norm.weight for f in forms])[:, None]  # type: ignore[union-attr]
            if f0.norm.bias is not None:
                t["norm_b"] = torch.stack([f.norm.bias for f in forms])[:, None]  # type: ignore[union-attr]
        return t, static

    @classmethod
    def apply(cls, t: dict[str, torch.Tensor], static: dict[str, Any], gather: Callable[[torch.Tensor], torch.Tensor],
              inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        src = inputs["x_in"] if static["parallel"] else inputs["out"]
        assert src is not None
        z = gather(src).to(t["down"].dtype)
        if static["norm"] is not None:
            shape, eps = static["norm"]
            z = nn.functional.layer_norm(z, shape, None, None, eps)
            z = z * t["norm_w"] if "norm_w" in t else z
            z = z + t["norm_b"] if "norm_b" in t else z
        h = static["act"](torch.baddbmm(t["down_b"], z, t["down"]))
        return torch.baddbmm(t["up_b"], h, t["up"]) * t["s"]


class SiteAdapter(nn.Module):
    """One adapter at one site: ``forward(h, x_in)`` returns the new sublayer output."""

    parallel: bool = False
    drop_state: RobustDrop | None = None
    draws: bool = False
    """The first site of a robust adapter draws the step's number of dropped blocks."""

    def delta(self, src: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def routed_form(self) -> MLPForm | None:
        """This adapter as an :class:`MLPForm` (mixed-adapter batches); None: it has no such form."""
        return None

    def forward(self, h: torch.Tensor, x_in: torch.Tensor | None) -> torch.Tensor:
        src = x_in if self.parallel else h
        if src is None:
            raise RuntimeError("a parallel adapter ran without its sublayer input; was the block's input module "
                               "called?")
        return h + self.delta(src).to(h.dtype)


class Bottleneck(SiteAdapter):
    """``s * up(f(down(LN(src))))``; ``up`` starts at zero."""

    def __init__(self, d: int, m: int, non_linearity: str, layer_norm: bool, parallel: bool, scaling: float,
                 **kw: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, **kw) if layer_norm else None
        self.down = nn.Linear(d, m, **kw)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(m, d, **kw)
        self.parallel, self.scaling = parallel, scaling
        with torch.no_grad():
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def delta(self, src: torch.Tensor) -> torch.Tensor:
        z = src.to(self.down.weight.dtype)
        if self.norm is not None:
            z = self.norm(z)
        return self.up(self.act(self.down(z))) * self.scaling

    def routed_form(self) -> MLPForm:
        return MLPForm(self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.act, float(self.scaling),
                       self.parallel, self.norm)


# ----------------------------------------------------------------------------- layers
class BottleneckLayer(AdapterLayer):
    """A sublayer output projection carrying adapters (``adapters[name]``: a :class:`SiteAdapter`
    or a fusion). Live adapters apply in order of activation (stacking)."""

    owner_method = OWNER
    class_prefix = "Bottleneck"
    adapter_containers = ("adapters",)
    _state = ("peftlab_block", "peftlab_tap", "peftlab_drop", "peftlab_rows")

    def restore(self) -> nn.Module:
        for attr in self._state:
            self.__dict__.pop(attr, None)
        return super().restore()

    def live_adapters(self) -> list[str]:
        """Active adapters minus those AdapterDrop removes from this block now."""
        block = self.__dict__.get("peftlab_block", 0)
        k = self.__dict__.get("peftlab_drop", 0)
        out = []
        for n in super().live_adapters():
            state = getattr(self.adapters[n], "drop_state", None)
            drop = k
            if state is not None and self.training:
                if self.adapters[n].draws:
                    state.draw()
                drop = max(drop, state.k)
            if block >= drop:
                out.append(n)
        return out

    def route_refusal(self, name: str) -> str | None:
        form = getattr(self.adapters[name], "routed_form", None)
        if form is None or form() is None:
            return f"{type(self.adapters[name]).__name__} has no per-row form"
        return None

    def routed_form(self, name: str) -> MLPForm | None:
        """Adapter ``name``'s form here, or None where AdapterDrop removes it from this block."""
        if self.__dict__.get("peftlab_block", 0) < self.__dict__.get("peftlab_drop", 0):
            return None
        return self.adapters[name].routed_form()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        tap = self.__dict__.get("peftlab_tap")
        x_in = tap.take() if tap is not None else None
        routing = self.__dict__.get("peftlab_routing")
        if routing is not None:
            return routing.apply(self, out, x_in=x_in)
        live = self.live_adapters()
        rows = self.__dict__.get("peftlab_rows")
        if rows is not None and live:  # parallel multi-task inference: row chunk i belongs to task rows[i]
            chunks = out.chunk(len(rows))
            x_chunks = x_in.chunk(len(rows)) if x_in is not None else [None] * len(rows)
            return torch.cat([self.adapters[n](c, xc) if n in live else c for n, c, xc in zip(rows, chunks, x_chunks)])
        for n in live:
            out = self.adapters[n](out, x_in)
        return out


class InputTap(AdapterLayer):
    """Keeps a sublayer's input for the parallel adapters at its output (read once per pass)."""

    owner_method = OWNER
    class_prefix = "Tapped"
    adapter_containers = ("adapter_taps",)

    def restore(self) -> nn.Module:
        self.__dict__.pop("peftlab_x", None)
        return super().restore()

    def take(self) -> torch.Tensor | None:
        return self.__dict__.pop("peftlab_x", None)

    def route_refusal(self, name: str) -> str | None:
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.live_adapters() or "peftlab_routing" in self.__dict__:
            self.__dict__["peftlab_x"] = args[0] if args else kwargs["hidden_states"]
        return super().forward(*args, **kwargs)


def install(model: nn.Module, name: str, sites: list[Site], modules: list[nn.Module], needs_input: bool) -> None:
    """Put ``modules[i]`` at ``sites[i]`` under adapter ``name`` (class swap in place)."""
    for site, module in zip(sites, modules):
        layer = BottleneckLayer.adopt(model.get_submodule(site.out))
        assert isinstance(layer, BottleneckLayer)
        layer.__dict__["peftlab_block"] = site.block
        layer.adapters[name] = module
        if needs_input:
            tap = InputTap.adopt(model.get_submodule(site.inp))
            tap.adapter_taps[name] = nn.Identity()
            layer.__dict__["peftlab_tap"] = tap


def bottleneck_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckLayer]]:
    for path, layer in adapter_layers(model):
        if isinstance(layer, BottleneckLayer):
            yield path, layer


def set_adapter_drop(model: nn.Module, k: int) -> None:
    """AdapterDrop at inference: no adapter runs in the first ``k`` blocks (0 restores them)."""
    layers = list(bottleneck_layers(model))
    if not layers:
        raise ConfigError("the model carries no bottleneck adapters; attach one (e.g. 'houlsby') first")
    n = 1 + max(layer.__dict__.get("peftlab_block", 0) for _, layer in layers)
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ConfigError(f"adapter_drop k={k!r}: the adapters span {n} blocks; use 0..{n}")
    for _, layer in layers:
        layer.__dict__["peftlab_drop"] = k


@contextlib.contextmanager
def adapter_drop(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """Within the block, adapters of the first ``k`` transformer blocks are skipped."""
    before = {path: layer.__dict__.get("peftlab_drop", 0) for path, layer in bottleneck_layers(model)}
    set_adapter_drop(model, k)
    try:
        yield model
    finally:
        for path, layer in bottleneck_layers(model):
            layer.__dict__["peftlab_drop"] = before.get(path, 0)


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class AdapterMethod(Method):
    """Options every member of the adapter family shares (not registered itself)."""

    reduction_factor: float = 16
    """Bottleneck width = hidden size // reduction_factor (AdapterHub's convention); at least 1,
    so that the adapter is no wider than the hidden size."""
    placement: tuple[str, ...] = ("attn", "ffn")
    """Sublayers that get an adapter: 'attn' (attention output) and/or 'ffn' (feed-forward output)."""
    non_linearity: str = "swish"
    """One of relu, gelu, swish (= silu), tanh."""
    layer_norm: bool = False
    """A trainable layer norm on the adapter input."""
    parallel: bool = False
    """Parallel form: the adapter reads the sublayer's input and adds to its output (He et al.)."""
    scaling: float = 1.0
    """Multiplies the adapter's output."""
    drop_first: int = 0
    """AdapterDrop: no adapter in the first k transformer blocks."""
    robust_drop: bool = False
    """AdapterDrop, robust: each training step skips the adapters of a random number of lower blocks."""
    architecture: dict[str, str] = field(default_factory=dict)
    """Module paths of an architecture the map does not know (keys of :class:`Architecture`)."""

    layer_owner: ClassVar[str] = OWNER
    mergeable: ClassVar[bool] = False
    suggested_lr: ClassVar[float] = 2e-3

    def __post_init__(self) -> None:
        name = self.method_name
        if self.reduction_factor < 1:
            raise ConfigError(f"{name}: reduction_factor must be >= 1 (got {self.reduction_factor!r}): the bottleneck "
                              "is hidden size // reduction_factor wide and no wider than the hidden size; 16 is usual")
        if not self.placement or any(p not in PLACES for p in self.placement):
            raise ConfigError(f"{name}: placement must be a non-empty subset of {PLACES} (got {self.placement!r})")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"{name}: non_linearity must be one of {sorted(ACTIVATIONS)} (got {self.non_linearity!r})")
        if self.drop_first < 0:
            raise ConfigError(f"{name}: drop_first must be an integer >= 0 (got {self.drop_first!r})")
        if self.architecture:
            Architecture.from_dict(self.architecture)

    def bottleneck(self, d: int) -> int:
        """The bottleneck width for hidden size ``d``."""
        return max(1, int(d // self.reduction_factor))

    def build(self, d: int, ref: torch.Tensor, shared: dict[str, Any]) -> SiteAdapter:
        """A fresh adapter for one site of hidden size ``d``. ``shared`` is one dict per adapter,
        passed to every site, for tensors its sites share."""
        return Bottleneck(d, self.bottleneck(d), self.non_linearity, self.layer_norm, self.parallel, self.scaling,
                          device=ref.device, dtype=adapter_dtype(ref))

    def sites(self, model: nn.Module) -> list[Site]:
        return find_sites(model, architecture(model, self.architecture), tuple(self.placement), self.drop_first)

    def attach(self, model: nn.Module, name: str) -> None:
        sites = self.sites(model)
        shared: dict[str, Any] = {}
        modules = []
        for site in sites:
            out = model.get_submodule(site.out)
            modules.append(self.build(width(out, model), reference_tensor(out), shared))
        if self.robust_drop:
            state = RobustDrop(len(all_blocks(model, architecture(model, self.architecture))))
            for m in modules:
                m.drop_state = state
            modules[0].draws = True
        install(model, name, sites, modules, self.parallel)


@register("houlsby")
@dataclass(frozen=True)
class Houlsby(AdapterMethod):
    """Bottleneck adapters after the attention and the feed-forward output of every block."""

    typical_score: ClassVar[float | None] = 0.995
    typical_score_source: ClassVar[str] = ("Houlsby et al. 2019, abstract and Table 1: BERT-large on the GLUE test "
                                           "sets, adapters 80.0 vs full fine-tuning 80.4 (3.6% parameters per task)")


@register("pfeiffer")
@dataclass(frozen=True)
class Pfeiffer(AdapterMethod):
    """Bottleneck adapters after the feed-forward output of every block."""

    placement: tuple[str, ...] = ("ffn",)
    non_linearity: str = "relu"
