"""LoRA: low-rank adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

A frozen weight ``W`` (``d_out x d_in``) gets a trainable low-rank update::

    h = W x + s * B A dropout(x),     A: r x d_in,  B: d_out x r,  s = alpha / r

(``s = alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023, https://arxiv.org/abs/2312.03732,
which keeps the update's scale stable as ``r`` grows). ``B`` starts at zero, so the adapted model
equals the base model at initialisation; ``A`` starts random so that gradients reach ``B``.

Supported layers: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored ``d_in x d_out``),
``nn.Embedding`` (``A`` is looked up per token: ``r x num_embeddings``) and ``nn.Conv1d/2d/3d``
(``A`` is a convolution with the base kernel to ``r`` channels, ``B`` a 1x1 convolution back).
Tensor names and the config follow peft's, so the files load in peft and vice versa.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import FILE_PREFIX, Method, register
from peftlab.core.targets import ALL_LINEAR, is_linear, select

BIAS_MODES = ("none", "all", "lora_only")
INITS = ("default", "gaussian", "random")


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters of a half-precision base train in fp32 (stable Adam updates, as peft does)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() \
        else weight.dtype


class LoRALayer(MergeableLayer):
    """State shared by the LoRA layer kinds: per-adapter scale and the forward pass."""

    owner_method = "lora"
    class_prefix = "LoRA"
    adapter_containers = ("lora_A", "lora_B", "lora_dropout")
    peftlab_scaling: dict[str, float]

    def _set_scaling(self, name: str, r: int, alpha: float, rslora: bool) -> None:
        self.__dict__.setdefault("peftlab_scaling", {})[name] = alpha / (math.sqrt(r) if rslora else r)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)  # first: a merged adapter's unmerge needs its scale
        self.__dict__.get("peftlab_scaling", {}).pop(name, None)

    def restore(self) -> nn.Module:
        for attr in ("peftlab_scaling", "peftlab_row_norms", "peftlab_dora_merged"):
            self.__dict__.pop(attr, None)
        return super().restore()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        for name in self.live_adapters():
            out = out + self.adapter_output(name, x, out).to(out.dtype)
        return out

    def adapter_output(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to ``out`` (the output so far, as peft accumulates it)."""
        return self.lora_output(name, x)

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
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

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: str) -> None:
        check_rank(self, r, type(self).__name__)
        d_in, d_out = self._shape()
        kw = {"device": self.weight.device, "dtype": _adapter_dtype(self.weight)}
        a, b = nn.Linear(d_in, r, bias=False, **kw), nn.Linear(r, d_out, bias=False, **kw)
        _init(a.weight, b.weight, init, r)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._set_scaling(name, r, alpha, rslora)

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[name]
        # the scale multiplies the r-wide intermediate, not the d_out-wide output: r/d_out of the work
        return self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype))) * self.peftlab_scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        merged = self.__dict__.get("peftlab_dora_merged", {})
        if name in merged:  # a merged DoRA update depends on the weight before the merge: use it as merged
            return merged[name]
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.peftlab_scaling[name]
        if name in self.lora_magnitude_vector:  # DoRA: the merged weight is m / ||W + dW|| * (W + dW)
            w = self._matrix().float()
            scale = self.lora_magnitude_vector[name].float() / self.dora_norm(name).float()
            delta = scale[:, None] * (w + delta) - w
        return delta if isinstance(self, nn.Linear) else delta.T

    # ------------------------------------------------------------------------- DoRA
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
            m = self._matrix().float().norm(dim=1).to(_adapter_dtype(self.weight))
        self.lora_magnitude_vector[name] = nn.Parameter(m)

    @torch.no_grad()
    def dora_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row (no gradient, as in the paper and peft), in fp32."""
        w = self._matrix()
        cache = self.__dict__.setdefault("peftlab_row_norms", {})
        key = (w._version, w.data_ptr())
        if cache.get("key") != key:
            cache["key"], cache["sq"] = key, w.float().pow(2).sum(1)
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        s = self.peftlab_scaling[name]
        wa = (w @ self.lora_A[name].weight.to(w.dtype).T).float()  # (d_out, r)
        sq = cache["sq"] + 2 * s * (b * wa).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
        return sq.clamp_min(0).sqrt()

    def adapter_output(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return self.lora_output(name, x)
        a, dropout = self.lora_A[name], self.lora_dropout[name]
        xd = dropout(x.to(a.weight.dtype))
        lora = self.lora_B[name](a(xd) * self.peftlab_scaling[name])
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

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: str) -> None:
        check_rank(self, r, type(self).__name__)
        num, dim = self.weight.shape
        kw = {"device": self.weight.device, "dtype": _adapter_dtype(self.weight)}
        a, b = nn.Parameter(torch.empty(r, num, **kw)), nn.Parameter(torch.empty(dim, r, **kw))
        _init(a, b, "gaussian" if init == "default" else init, r, embedding=True)
        self.lora_embedding_A[name], self.lora_embedding_B[name] = a, b
        self._set_scaling(name, r, alpha, rslora)

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        after_a = F.embedding(x, a.T, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)
        return (after_a * self.peftlab_scaling[name]) @ b.T

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (b @ a).T * self.peftlab_scaling[name]


class LoRAConvLayer(LoRALayer):
    """LoRA on ``nn.Conv1d/2d/3d``: ``A`` convolves with the base kernel to ``r`` channels,
    ``B`` is a 1x1 convolution, so ``delta W[o, i, ...] = s * sum_r B[o, r] A[r, i, ...]``."""

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: str) -> None:
        check_rank(self, r, type(self).__name__)
        conv = type(self).base_class
        kw = {"device": self.weight.device, "dtype": _adapter_dtype(self.weight)}
        a = conv(self.in_channels, r, self.kernel_size, self.stride, self.padding, self.dilation,
                 bias=False, padding_mode=self.padding_mode, **kw)
        b = conv(r, self.out_channels, 1, bias=False, **kw)
        _init(a.weight, b.weight, init, r)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._set_scaling(name, r, alpha, rslora)

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[name]
        # the scale multiplies the r-wide intermediate, not the d_out-wide output: r/d_out of the work
        return self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype))) * self.peftlab_scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        b = self.lora_B[name].weight.float().flatten(1)  # (out, r)
        a = self.lora_A[name].weight.float()  # (r, in, *kernel)
        return torch.tensordot(b, a, dims=([1], [0])) * self.peftlab_scaling[name]


class LoRAParamLayer(LoRALayer):
    """LoRA on parameters of a module that is no layer LoRA knows, chiefly fused mixture-of-experts
    tensors ``(experts, d1, d2)`` (peft's ``target_parameters``): one rank-``r`` update per expert.

    peft's layout, kept so files load both ways: ``lora_A`` is ``(r * experts, d_in)`` (expert-major
    rows), ``lora_B`` is ``(d_out, r * experts)`` (expert-minor columns); a parameter stored
    ``(experts, d_out, d_in)`` (``is_transposed`` false, transformers' default) or ``(experts, d_in,
    d_out)`` gets a delta of its own shape. The forward runs the module with ``W + delta`` in place
    of each adapted parameter. Several parameters of one module nest in peft's files as
    ``base_layer.`` prefixes, the first registered on the module innermost (peft keeps the
    targets as a set).
    """

    adapter_containers = ("lora_params", "lora_dropout")

    def add_parameter_adapter(self, name: str, params: list[tuple[str, int, float]], rslora: bool,
                              init: str) -> None:
        """Adapter ``name`` on the parameters ``[(parameter name, r, alpha), ...]`` (in file order)."""
        per = nn.ModuleDict()
        for pname, r, alpha in params:
            w = getattr(self, pname)
            experts, d_in, d_out = self._param_dims(pname)
            kw = {"device": w.device, "dtype": _adapter_dtype(w)}
            unit = nn.Module()
            unit.lora_A = nn.Linear(d_in, r * experts, bias=False, **kw)
            unit.lora_B = nn.Linear(r * experts, d_out, bias=False, **kw)
            _init(unit.lora_A.weight, unit.lora_B.weight, init, r)
            per[pname] = unit
            self.__dict__.setdefault("peftlab_param_scaling", {})[(name, pname)] = \
                alpha / (math.sqrt(r) if rslora else r)
        self.lora_params[name] = per
        self.lora_dropout[name] = nn.Identity()
        self.__dict__.setdefault("peftlab_scaling", {})[name] = 1.0

    def _param_dims(self, pname: str) -> tuple[int, int, int]:
        shape = getattr(self, pname).shape
        if len(shape) == 2:
            return 1, shape[1], shape[0]
        if len(shape) != 3:
            raise ConfigError(f"lora: target parameter {pname!r} has {len(shape)} dimensions; only 2-D and 3-D "
                              "(experts x d1 x d2) parameters are supported")
        experts, d1, d2 = shape
        return (experts, d1, d2) if getattr(self, "is_transposed", False) else (experts, d2, d1)

    def param_delta(self, name: str, pname: str) -> torch.Tensor:
        unit = self.lora_params[name][pname]
        experts, d_in, d_out = self._param_dims(pname)
        a = unit.lora_A.weight.reshape(experts, -1, d_in)  # (experts, r, d_in)
        b = unit.lora_B.weight.reshape(d_out, -1, experts)  # (d_out, r, experts)
        scale = self.__dict__["peftlab_param_scaling"][(name, pname)]
        if getattr(self, pname).dim() == 2:
            return (b[..., 0] @ a[0]) * scale
        pattern = "ore,eri->eio" if getattr(self, "is_transposed", False) else "ore,eri->eoi"
        return torch.einsum(pattern, b, a) * scale

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        deltas: dict[str, torch.Tensor] = {}
        for name in self.live_adapters():
            for pname in self.lora_params[name]:
                d = self.param_delta(name, pname)
                deltas[pname] = deltas[pname] + d if pname in deltas else d
        saved = {pname: self._parameters[pname] for pname in deltas}
        try:
            for pname, d in deltas.items():
                base = saved[pname]
                self._parameters[pname] = base + d.to(base.dtype)  # type: ignore[assignment]
            return super(LoRALayer, self).forward(*args, **kwargs)  # the original module's forward
        finally:
            self._parameters.update(saved)

    def adapter_file_tensors(self, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        order = list(self.lora_params[name])
        out = {}
        for i, pname in enumerate(order):
            nest = "base_layer." * (len(order) - 1 - i)
            for part in ("lora_A", "lora_B"):
                t = getattr(self.lora_params[name][pname], part).weight
                out[f"lora_params.{name}.{pname}.{part}.weight"] = (f"{nest}{part}.weight", t)
        return out

    def _weight(self) -> torch.Tensor:
        return self.merge_is_finite([])  # type: ignore[return-value]

    def merge_is_finite(self, names: str | list[str]) -> bool:
        raise ConfigError("lora: merging updates of expert parameters (target_parameters) is not implemented; "
                          "run the model unmerged, or adapt linear layers only")

    def merge_adapter(self, name: str) -> None:
        self.merge_is_finite(name)

    def restore(self) -> nn.Module:
        self.__dict__.pop("peftlab_param_scaling", None)
        return super().restore()


def parameter_targets(model: nn.Module, entries: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """``{module path: [parameter names in entry order]}`` for peft-style ``target_parameters``
    entries (an entry matches ``<module path>.<parameter>`` exactly or as a dotted suffix)."""
    from peftlab.core.targets import candidate_modules

    found: dict[str, list[str]] = {}
    for entry in entries:
        hits = 0
        for path, module in candidate_modules(model):
            if any(path == s or path.startswith(s + ".") or path.endswith("." + s) for s in skip):
                continue
            for pname in module._parameters:
                full = f"{path}.{pname}"
                if full == entry or full.endswith("." + entry):
                    if pname not in found.setdefault(path, []):
                        found[path].append(pname)
                        order = list(module._parameters)  # peft nests them in registration order
                        found[path].sort(key=order.index)
                    hits += 1
        if not hits:
            raise ConfigError(f"lora: target_parameters entry {entry!r} matches no parameter of "
                              f"{type(model).__name__}; name it as '<module path>.<parameter>' (e.g. "
                              "'mlp.experts.gate_up_proj')")
    return found


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Parameters of 3 or more dimensions outside linear/embedding/conv layers (fused experts)."""
    return [f"{p}.{n}" for p, m in model.named_modules() if layer_kind(m) is None
            for n, t in m._parameters.items() if t is not None and t.dim() >= 3]


PEFT_HANDLED = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                          "layers_to_transform", "use_rslora", "bias", "rank_pattern", "alpha_pattern",
                          "modules_to_save", "init_lora_weights", "target_parameters", "fan_in_fan_out",
                          "use_dora"})
"""Fields of peft's LoraConfig that peftlab's LoRA reads (fan_in_fan_out: GPT-2's Conv1D is found by type)."""
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping", "megatron_core", "qalora_group_size"})
"""Fields that describe the file, not the adapter's maths (qalora_group_size only acts with use_qalora)."""


def _init(a: torch.Tensor, b: torch.Tensor, init: str, r: int, embedding: bool = False) -> None:
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 if embedding else 1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(b, std=0.02)
        else:
            nn.init.zeros_(b)


def layer_kind(module: nn.Module) -> type[LoRALayer] | None:
    """Which LoRA layer adapts ``module`` (None: unsupported)."""
    if is_linear(module):
        return LoRALinearLayer
    if isinstance(module, nn.Embedding):
        return LoRAEmbeddingLayer
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoRAConvLayer
    return None


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


def check_patterns(method: str, field_name: str, patterns: dict[str, Any]) -> None:
    """Each key of a rank/alpha pattern must be a regular expression (matched on module paths)."""
    for key in patterns:
        try:
            re.compile(key)
        except re.error as e:
            raise ConfigError(f"{method}: {field_name} key {key!r} is not a regular expression ({e}); "
                              "escape special characters, e.g. 'layers\\.0\\.q_proj'") from None


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """peft's rank/alpha pattern rule: the first key ``k`` with ``(.*\\.)?(k)$`` matching the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@register("lora")
@dataclass(frozen=True)
class LoRA(Method):
    """Low-rank adaptation. Mergeable; identity at init; several adapters per model."""

    r: int = 8
    """Rank. 4-16 covers most tasks; the LoRA paper (Sec. 7) finds even r=1-4 competitive on GPT-3."""
    alpha: float = 16
    """Update scale is alpha / r: doubling r at fixed alpha halves the per-direction step, so a
    tuned learning rate stays usable across ranks."""
    dropout: float = 0.0
    """Dropout on the LoRA input only; 0.05-0.1 helps small data sets (QLoRA paper, App. B)."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules get LoRA (see peftlab.core.targets). All linear layers is the QLoRA paper's
    finding: adapting every layer matters more than the rank."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilised LoRA), for large ranks."""
    bias: str = "none"
    """'none', 'all' (every bias of the model trains) or 'lora_only' (biases of adapted layers)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: {regex: r}, peft's rule (first key matching the end of the module path)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: str = "default"
    """'default' (A Kaiming-uniform, B zero), 'gaussian' (A ~ N(0, 1/r)), 'random' (B random too:
    not identity at init; for tests and research)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA; peft's ``use_dora``): a trained magnitude per output row on top
    of the low-rank direction update. Linear and Conv1D layers; mergeable."""
    target_parameters: tuple[str, ...] = ()
    """Parameters (not modules) to adapt, peft's option of that name: fused mixture-of-experts
    tensors such as 'mlp.experts.gate_up_proj' get one low-rank update per expert."""

    peft_type: ClassVar[str | None] = "LORA"
    mergeable: ClassVar[bool] = True
    typical_score: ClassVar[float | None] = 1.009
    typical_score_source: ClassVar[str] = ("Hu et al. 2021 (LoRA), Table 2: RoBERTa-base GLUE average 87.2 "
                                           "vs 86.4 for full fine-tuning")

    def __post_init__(self) -> None:
        # field types (r an int and not a bool, alpha finite, bools real bools) are checked by Method
        if self.r < 1:
            raise ConfigError(f"lora: r must be a positive integer (got {self.r!r}); 8 is a good start")
        for k, v in self.rank_pattern.items():
            if v < 1:
                raise ConfigError(f"lora: rank_pattern[{k!r}] must be a positive integer (got {v!r})")
        if self.alpha <= 0:
            raise ConfigError(f"lora: alpha must be > 0 (got {self.alpha}); a common choice is 2 * r")
        for k, v in self.alpha_pattern.items():
            if v <= 0:
                raise ConfigError(f"lora: alpha_pattern[{k!r}] must be > 0 (got {v!r})")
        check_patterns("lora", "rank_pattern", self.rank_pattern)
        check_patterns("lora", "alpha_pattern", self.alpha_pattern)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1) (got {self.dropout})")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"lora: bias must be one of {BIAS_MODES} (got {self.bias!r})")
        if self.init not in INITS:
            raise ConfigError(f"lora: init must be one of {INITS} (got {self.init!r})")

    def attach(self, model: nn.Module, name: str) -> None:
        if self.target_parameters and self.dropout:
            raise ConfigError("lora: dropout cannot apply to target_parameters (the input of a fused expert "
                              "tensor is not separable); use dropout=0")
        params = parameter_targets(model, tuple(self.target_parameters), tuple(self.modules_to_save))
        if self.layers is not None:
            from peftlab.core.targets import layer_index, parse_layers

            keep = parse_layers(self.layers)
            params = {p: v for p, v in params.items() if layer_index(p) in (keep or ())}
        paths = [] if not self.target_modules and params else select(
            model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
            supported=(nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d),
            supported_names=("Conv1D",), skip=self.modules_to_save, what="lora")
        left_out = [f for f in fused_expert_parameters(model)
                    if f.rpartition(".")[0] not in params or f.rpartition(".")[2] not in params[f.rpartition(".")[0]]]
        if ALL_LINEAR in self.target_modules and left_out:
            import warnings

            warnings.warn(f"lora: 'all-linear' adapts linear layers only and leaves out {len(left_out)} fused expert "
                          f"parameter(s) ({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}); add "
                          f"target_parameters={sorted({f.split('.', 1)[-1].split('.', 1)[-1] for f in left_out})[:2]}"
                          " (the part after the layer index) to adapt the experts", stacklevel=3)
        for path, names in params.items():  # every check before any change
            for pname in names:
                experts, d_in, d_out = LoRAParamLayer._param_dims(model.get_submodule(path), pname)  # type: ignore
                r = pattern_value(self.rank_pattern, f"{path}.{pname}", self.r)
                if r > min(d_in, d_out):
                    raise ConfigError(f"lora: rank {r} exceeds {path}.{pname}'s dimensions ({d_in} x {d_out} per "
                                      "expert); lower r")
        modules = {p: model.get_submodule(p) for p in paths}
        grouped = [p for p, m in modules.items() if getattr(m, "groups", 1) != 1]
        if grouped:
            raise ConfigError(f"lora: grouped convolutions are not supported ({grouped[:3]}); exclude them "
                              "with exclude_modules")
        bias_keys = self._bias_keys(model, paths)
        ranks = {p: pattern_value(self.rank_pattern, p, self.r) for p in paths}
        for path, module in modules.items():  # every check before any change
            check_rank(module, ranks[path], path)
            if self.dora and layer_kind(module) is not LoRALinearLayer:
                raise ConfigError(f"lora: dora=True is implemented for Linear and Conv1D layers; {path} is a "
                                  f"{type(module).__name__} (exclude it with exclude_modules, or use dora=False)")
        for path, module in modules.items():
            layer = layer_kind(module).adopt(module)  # type: ignore[union-attr]
            alpha = pattern_value(self.alpha_pattern, path, self.alpha)
            layer.add_adapter(name, ranks[path], alpha, self.dropout, self.rslora, self.init)  # type: ignore[attr-defined]
            if self.dora:
                layer.add_dora(name)  # type: ignore[attr-defined]
        for path, names in params.items():
            player = LoRAParamLayer.adopt(model.get_submodule(path))
            assert isinstance(player, LoRAParamLayer)
            player.add_parameter_adapter(
                name, [(n, pattern_value(self.rank_pattern, f"{path}.{n}", self.r),
                        pattern_value(self.alpha_pattern, f"{path}.{n}", self.alpha)) for n in names],
                self.rslora, self.init)
        if bias_keys:
            slots.train_base_tensors(model, name, bias_keys)

    def _bias_keys(self, model: nn.Module, paths: list[str]) -> list[str]:
        if self.bias == "none":
            return []
        if self.bias == "lora_only":
            keys = [f"{p}.bias" for p in paths if getattr(model.get_submodule(p), "bias", None) is not None]
        else:
            keys = [k for k, _ in model.named_parameters() if k.rsplit(".", 1)[-1] == "bias"
                    and not any(c in k.split(".") for c in ("lora_A", "lora_B", "peftlab_copy"))]
        if not keys:
            raise ConfigError(f"lora: bias={self.bias!r} but the {'adapted layers' if self.bias == 'lora_only' else 'model'}"
                              " have no bias; use bias='none'")
        return keys

    def base_file_key(self, model: nn.Module, key: str, name: str) -> str:
        path = key.rpartition(".")[0]
        module = model.get_submodule(path) if path else model
        if isinstance(module, LoRALayer) and name in module.adapter_names():
            return f"{FILE_PREFIX}{path}.base_layer.{key.rpartition('.')[2]}"  # peft wraps adapted layers
        return FILE_PREFIX + key

    # ------------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        plain = all(not any(ch in t for ch in "*?[:") and t != ALL_LINEAR for t in self.target_modules)
        simple = plain and not self.exclude_modules and self.layers is None
        if simple or model is None:
            targets = list(self.target_modules)
        else:  # peft cannot express globs, types or layer ranges: write the exact module list
            targets = [p for p, _ in self.adapted_layers(model, name)]
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": None,
            "bias": self.bias,
            "use_rslora": self.rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save) or None,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}[self.init],
            "fan_in_fan_out": model is not None and any(  # GPT-2 Conv1D stores (d_in, d_out)
                not isinstance(layer, nn.Linear) and isinstance(layer, LoRALinearLayer)
                for _, layer in self.adapted_layers(model, name)),
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
            "use_dora": self.dora,
            "lora_bias": False,
            "target_parameters": list(self.target_parameters) or None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LoRA:
        unsupported = {k: v for k, v in config.items() if k not in PEFT_HANDLED and k not in PEFT_METADATA
                       and not k.startswith("peftlab") and v not in (None, False, {}, [], "")}
        if unsupported:
            raise ConfigError(f"this peft LoRA config uses options peftlab's LoRA does not implement: {unsupported}; "
                              "it was not loaded (its outputs would differ from peft's)")
        init = config.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            reason = (" An unconverted PiSSA/OLoRA adapter assumes base weights that its initialisation changed; "
                      "save it from peft with path_initial_model_for_weight_conversion=... to get a plain LoRA "
                      "adapter for the original base." if isinstance(init, str) and
                      init.lower().startswith(("pissa", "olora", "corda")) else "")
            raise ConfigError(f"this peft LoRA config has init_lora_weights={init!r}, which peftlab does not "
                              f"implement; it was not loaded.{reason}")

        def entries(v: Any) -> tuple[str, ...]:
            if v is None:
                return ()
            if isinstance(v, str):  # peft: a string is a regex, full-matched; 'all-linear' is special
                return (v,) if v == ALL_LINEAR else (f"re:{v}",)
            return tuple(v)

        return cls(
            r=int(config.get("r", 8)),
            alpha=config.get("lora_alpha", 8),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=entries(config.get("target_modules")) or (() if config.get("target_parameters")
                                                                     else (ALL_LINEAR,)),
            exclude_modules=entries(config.get("exclude_modules")),
            layers=tuple(config["layers_to_transform"]) if isinstance(config.get("layers_to_transform"), list)
            else (config["layers_to_transform"],) if config.get("layers_to_transform") is not None else None,
            rslora=bool(config.get("use_rslora", False)),
            bias=config.get("bias", "none"),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
            init="gaussian" if init == "gaussian" else "random" if init is False else "default",
            target_parameters=tuple(config.get("target_parameters") or ()),
            dora=bool(config.get("use_dora", False)),
        )
