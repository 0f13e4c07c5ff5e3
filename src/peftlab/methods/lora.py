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

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.method import FILE_PREFIX, Method, register, wrapped_base_key
from peftlab.core.targets import ALL_LINEAR, peft_targets
from peftlab.methods._lowrank import (LoRAConvLayer, LoRAEmbeddingLayer, LoRALayer, LoRALinearLayer, LowRank,
                                      adapter_dtype, attach_layers, check_patterns, check_rank, dims, init_factors,
                                      layer_kind, pattern_value, select_layers)

BIAS_MODES = ("none", "all", "lora_only")
INITS = ("default", "gaussian", "random", "pissa", "olora")
"""Initialisations; also ``pissa_niter_<n>`` (PiSSA by a randomized SVD with n subspace iterations)."""
FROM_WEIGHT = ("pissa", "olora")
"""Initialisations computed from the base weight, which keeps the residual (PiSSA, OLoRA)."""


def from_weight(init: str) -> bool:
    """Whether ``init`` takes its factors out of the base weight (PiSSA, fast PiSSA, OLoRA)."""
    return init in FROM_WEIGHT or re.fullmatch(r"pissa_niter_\d+", init) is not None

__all__ = ["LoRA", "LoRALayer", "LoRALinearLayer", "LoRAEmbeddingLayer", "LoRAConvLayer", "LoRAParamLayer",
           "check_patterns", "check_rank", "dims", "layer_kind", "pattern_value"]


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
            kw = {"device": w.device, "dtype": adapter_dtype(w)}
            unit = nn.Module()
            unit.lora_A = nn.Linear(d_in, r * experts, bias=False, **kw)
            unit.lora_B = nn.Linear(r * experts, d_out, bias=False, **kw)
            init_factors(unit.lora_A.weight, unit.lora_B.weight, init, r)
            per[pname] = unit
        self.lora_params[name] = per
        self.lora_dropout[name] = nn.Identity()
        self.set_adapter_state(name, {pname: LowRank(r, alpha, rslora) for pname, r, alpha in params})

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
        scale = self.adapter_state(name)[pname].scale
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
                          "use_dora", "layers_pattern"})
"""Fields of peft's LoraConfig that peftlab's LoRA reads (fan_in_fan_out: GPT-2's Conv1D is found by type)."""
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping", "megatron_core", "qalora_group_size"})
"""Fields that describe the file, not the adapter's maths (qalora_group_size only acts with use_qalora)."""


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
    layers_pattern: tuple[str, ...] = ()
    """How ``layers`` finds a module's block index (peft's ``layers_pattern``): the name of the
    block list, e.g. 'layers', 'h' or 'block' (regular expressions); empty: the first number in
    the module path."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilised LoRA), for large ranks."""
    bias: str = "none"
    """'none', 'all' (every bias of the model trains) or 'lora_only' (biases of adapted layers)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: {regex: r}, peft's rule (first key matching the end of the module path)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: str = "default"
    """'default' (A Kaiming-uniform, B zero), 'gaussian' (A ~ N(0, 1/r)), 'random' (B random too:
    not identity at init; for tests and research), or from the base weight, which keeps the
    residual: 'pissa' (principal singular directions; 'pissa_niter_4': by a fast randomized
    SVD) and 'olora' (QR). Those train the principal directions and converge faster (PiSSA
    paper, Fig. 2); saving converts them to a plain LoRA of the original base (rank 2r), as
    peft does, and detaching gives the exact base back."""
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
        self.check_init()
        if from_weight(self.init) and self.dora:
            raise ConfigError(f"lora: init={self.init!r} with dora=True is not implemented; use one of them")
        if from_weight(self.init) and self.rslora and (self.rank_pattern or self.alpha_pattern):
            raise ConfigError(f"lora: init={self.init!r} with rslora and rank/alpha patterns cannot be converted to "
                              "a plain LoRA at save (peft refuses it too); drop the patterns or rslora")
        for p in self.layers_pattern:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"lora: layers_pattern entry {p!r} is not a regular expression ({e})") from None
        if self.layers_pattern and self.layers is None:
            raise ConfigError("lora: layers_pattern only says how to find the layer index for layers=...; "
                              "set layers (peft: layers_to_transform) or drop layers_pattern")

    def check_init(self) -> None:
        """Refuse an initialisation this method does not implement (QLoRA's differ)."""
        if self.init not in INITS and not from_weight(self.init):
            hint = " (LoftQ initialises a quantized base: use qlora with init='loftq')" if self.init == "loftq" else ""
            raise ConfigError(f"lora: init must be one of {INITS} or 'pissa_niter_<n>' (got {self.init!r}){hint}")

    def attach(self, model: nn.Module, name: str) -> None:
        if self.target_parameters and self.dropout:
            raise ConfigError("lora: dropout cannot apply to target_parameters (the input of a fused expert "
                              "tensor is not separable); use dropout=0")
        params = parameter_targets(model, tuple(self.target_parameters), tuple(self.modules_to_save))
        if self.layers is not None:
            from peftlab.core.targets import layer_index, parse_layers

            keep = parse_layers(self.layers)
            params = {p: v for p, v in params.items() if layer_index(p, self.layers_pattern) in (keep or ())}
        modules = {} if not self.target_modules and params else select_layers(
            model, "lora", target_modules=self.target_modules, exclude_modules=self.exclude_modules,
            layers=self.layers, skip=self.modules_to_save, layers_pattern=self.layers_pattern)
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
        bias_keys = self._bias_keys(model, list(modules))

        weight_init = from_weight(self.init)

        def check(path: str, module: nn.Module) -> None:
            if (self.dora or weight_init) and layer_kind(module) is not LoRALinearLayer:
                what = "dora=True" if self.dora else f"init={self.init!r}"
                raise ConfigError(f"lora: {what} is implemented for Linear and Conv1D layers; {path} is a "
                                  f"{type(module).__name__} (exclude it with exclude_modules, or use another init)")
            if weight_init and isinstance(module, LoRALayer):
                raise ConfigError(f"lora: init={self.init!r} changes {path}'s base weight, which already carries "
                                  f"adapters {module.adapter_names()}; give it a module of its own (exclude_modules) "
                                  "or use the default init")

        def add(layer: LoRALayer, path: str) -> None:
            layer.add_adapter(name, pattern_value(self.rank_pattern, path, self.r),
                              pattern_value(self.alpha_pattern, path, self.alpha), self.dropout, self.rslora,
                              "default" if weight_init else self.init)
            if self.dora:
                layer.add_dora(name)  # type: ignore[attr-defined]
            if weight_init:
                layer.init_from_weight(name, self.init)  # type: ignore[attr-defined]

        attach_layers(modules, lambda path: pattern_value(self.rank_pattern, path, self.r), lambda kind: kind, add,
                      check)
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
        return slots.bias_mode_keys(model, paths, self.bias, "lora", ("lora_A", "lora_B"))

    def base_file_key(self, model: nn.Module, key: str, name: str) -> str:
        return wrapped_base_key(model, key, name, LoRALayer)  # peft wraps adapted layers

    # ----------------------------------------------------------------------------- hot-swap
    def prepare_hotswap(self, model: nn.Module, name: str, rank: int) -> LoRA:
        """Pad every layer of adapter ``name`` to ``rank`` with zeros and hold its scale as a
        tensor; the recorded config is the padded form (rank ``rank``, each module's alpha in
        ``alpha_pattern``), which computes the same outputs and loads in peft."""
        if self.target_parameters:
            raise ConfigError("lora: adapters on target_parameters (expert tensors) are not padded for hot-swapping")
        alphas: dict[str, float] = {}
        for path, layer in self.adapted_layers(model, name):
            assert isinstance(layer, LoRALayer)
            try:
                layer.pad_rank(name, rank)
            except ConfigError as e:
                raise ConfigError(f"lora: {path}: {e}") from None
            alphas[re.escape(path)] = layer.adapter_state(name).alpha
        return dataclasses.replace(self, r=rank, rslora=False, rank_pattern={}, alpha_pattern=alphas, init="default")

    def hotswap_writes(self, model: nn.Module, name: str, new: Method,
                       values: dict[str, tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Method]:
        """A LoRA of the same modules, DoRA setting and module copies, of any ranks and alphas
        that fit: equal to this adapter's, or (after :meth:`prepare_hotswap`) up to its padded
        rank, the new scales written into the scale tensors."""
        assert isinstance(new, LoRA)
        differ = [k for k in ("dora", "bias", "modules_to_save", "target_parameters")
                  if getattr(new, k) != getattr(self, k)]
        if differ:
            raise ConfigError(f"lora: the new adapter differs in {differ}, which a hot-swap cannot change")
        if from_weight(new.init):
            raise ConfigError(f"lora: the file holds an unconverted init={new.init!r} adapter, whose factors depend on "
                              "the base weight; save it converted (peftlab.save does) and hot-swap that")
        key_of = {id(t): key for key, (t, _) in values.items()}
        writes: list[tuple[torch.Tensor, torch.Tensor]] = []
        done: set[str] = set()
        alphas: dict[str, float] = {}
        for path, layer in self.adapted_layers(model, name):
            assert isinstance(layer, LoRALayer)
            ka, kb = (key_of[id(t)] for t in layer.factor_tensors(name))
            r = pattern_value(new.rank_pattern, path, new.r)
            alpha = pattern_value(new.alpha_pattern, path, new.alpha)
            scale = alpha / (math.sqrt(r) if new.rslora else r)
            a, b = values[ka][1], values[kb][1]
            if a.shape[0] != r:
                raise ConfigError(f"{ka}: rank {a.shape[0]} in the file, {r} in its config")
            try:
                writes += layer.swap_values(name, a, b, scale)
            except ConfigError as e:
                raise ConfigError(f"lora: {path}: {e}") from None
            done |= {ka, kb}
            st = layer.adapter_state(name)
            alphas[re.escape(path)] = scale * st.r
        for key, (target, value) in values.items():
            if key in done:
                continue
            if tuple(value.shape) != tuple(target.shape):
                raise ConfigError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model")
            writes.append((target, value))
        prepared = all(layer.adapter_state(name).scale_tensor is not None
                       for _, layer in self.adapted_layers(model, name))
        if prepared:  # the padded form, with the new scales
            return writes, dataclasses.replace(self, alpha_pattern=alphas)
        return writes, dataclasses.replace(new, dropout=self.dropout)

    def saved_form(self, model: nn.Module, name: str,
                   tensors: dict[str, torch.Tensor]) -> tuple[Method, dict[str, torch.Tensor]]:
        """PiSSA/OLoRA adapters are saved as the plain LoRA of the *original* base (peft's
        conversion): ``W_res + s B A = W + s [B | -B0] [A ; A0]``, rank ``2r``, alpha doubled
        (times sqrt 2 with rsLoRA) so the scale stays. Every other adapter is saved as it is."""
        if not from_weight(self.init):
            return self, tensors
        out = dict(tensors)
        for path, layer in self.adapted_layers(model, name):
            st = layer.adapter_state(name)
            residual = getattr(st, "residual", None)
            if residual is None:
                continue
            for part, initial, dim in (("lora_A", residual.a0, 0), ("lora_B", -residual.b0, 1)):
                key = f"{FILE_PREFIX}{path}.{part}.weight"
                out[key] = torch.cat([out[key], initial.to(out[key].dtype)], dim=dim).contiguous()
        factor = math.sqrt(2) if self.rslora else 2
        plain = dataclasses.replace(self, init="default", r=2 * self.r, alpha=self.alpha * factor,
                                    rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
                                    alpha_pattern={k: v * factor for k, v in self.alpha_pattern.items()})
        return plain, out

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
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}.get(self.init, self.init),
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
        if isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init):
            raise ConfigError(f"this peft LoRA config has init_lora_weights={init!r}: an unconverted PiSSA adapter "
                              "initialised by a randomized SVD. Loading it means subtracting that random SVD from the "
                              "base again, which gives other base weights than the ones it was trained on (peft too), "
                              "so it was not loaded. Save it from peft with path_initial_model_for_weight_conversion="
                              "... to get a plain LoRA adapter for the original base, or use init 'pissa' (full SVD: "
                              "reproducible)")
        if init == "loftq":
            raise ConfigError("this peft LoRA config has init_lora_weights='loftq': peft's LoftQ replaces the base "
                              "weights by its own quantization, saved with the base model, not in the adapter, so it "
                              "was not loaded. Load it onto that saved base after setting init_lora_weights to true, "
                              "or train with peftlab's qlora and init='loftq' (reproduced from the original weights)")
        if init not in (True, False, "gaussian", "pissa", "olora"):
            reason = (" An unconverted adapter of this kind assumes base weights that its initialisation changed; "
                      "save it from peft with path_initial_model_for_weight_conversion=... to get a plain LoRA "
                      "adapter for the original base." if isinstance(init, str) and
                      init.lower().startswith(("corda", "lora_ga")) else "")
            raise ConfigError(f"this peft LoRA config has init_lora_weights={init!r}, which peftlab does not "
                              f"implement; it was not loaded.{reason}")

        targets = config.get("target_modules")
        layers = config.get("layers_to_transform")
        if isinstance(targets, str) and layers not in (None, []):
            raise ConfigError("this peft LoRA config has layers_to_transform with a regular-expression target_modules "
                              f"({targets!r}); peft refuses that combination, so it was not loaded. Put the layer "
                              "indices into the expression, or list the module names")
        if layers == []:
            layers = None
        pattern = config.get("layers_pattern") or ()
        return cls(
            r=int(config.get("r", 8)),
            alpha=config.get("lora_alpha", 8),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=peft_targets(config.get("target_modules")) or (() if config.get("target_parameters")
                                                                     else (ALL_LINEAR,)),
            exclude_modules=peft_targets(config.get("exclude_modules")),
            layers=tuple(layers) if isinstance(layers, list) else (layers,) if layers is not None else None,
            layers_pattern=(pattern,) if isinstance(pattern, str) else tuple(pattern) if layers is not None else (),
            rslora=bool(config.get("use_rslora", False)),
            bias=config.get("bias", "none"),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
            init=init if isinstance(init, str) else "random" if init is False else "default",
            target_parameters=tuple(config.get("target_parameters") or ()),
            dora=bool(config.get("use_dora", False)),
        )
