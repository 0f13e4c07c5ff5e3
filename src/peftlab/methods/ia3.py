"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022,
T-Few, https://arxiv.org/abs/2205.05638).

Three learned vectors per transformer block rescale the keys, the values and the feed-forward's
inner activation element-wise::

    k' = l_k * (W_k x),   v' = l_v * (W_v x),   h' = W_2 (l_ff * act(W_1 x))

A targeted layer either scales its *output* (``l``: ``d_out``, keys and values; a bias is scaled
with it) or, if it is one of ``feedforward_modules``, its *input* (``l``: ``d_in``, the
feed-forward's second layer, so that the inner activation is what gets rescaled). The vectors
start at one, so the adapted model equals the base model at initialisation. peft's layout is
kept so files load both ways: one parameter ``ia3_l`` per layer, ``(d_out, 1)`` for an output
scale and ``(1, d_in)`` for an input scale on ``nn.Linear`` and GPT-2's ``Conv1D``, and
``(1, C, 1, 1[, 1])`` on ``nn.Conv2d``/``nn.Conv3d``. Several active adapters on one layer
multiply (peft's rule).

Merging multiplies the weight's rows (output scale, and the bias) or columns (input scale) by
``l``: ``W' = W * l`` in fp32, rounded once to the weight's dtype. Division would not undo that
exactly (and ``l`` may hold zeros), so the layer keeps the weight as it was before the merge
(its own dtype) while merged and puts it back on unmerge: merge/unmerge cycles are bit-exact.

Default targets are found from the model's module names, with no hub download: in every block
the key and value projections (or the fused query/key/value projection, which is then scaled as a
whole, as peft does) and the feed-forward's output layer, the only feed-forward module.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError, TargetError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import Method, register
from peftlab.core.targets import candidate_modules, check_entry, is_linear, matches, select
from peftlab.core.transaction import before_write, on_undo

__all__ = ["IA3", "IA3Layer", "default_targets"]

SUPPORTED = (nn.Linear, nn.Conv2d, nn.Conv3d)
"""Module types (IA)^3 adapts, peft's set (plus transformers' GPT-2 ``Conv1D``, found by name)."""

KEY_VALUE_NAMES = frozenset({"k_proj", "v_proj", "key", "value", "k", "v", "k_lin", "v_lin", "key_proj",
                             "value_proj"})
"""Leaf names of separate key and value projections across transformers' architectures."""
FUSED_QKV_NAMES = frozenset({"c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv", "in_proj"})
"""Leaf names of fused query/key/value projections (scaled as a whole, as peft does)."""
FFN_OUTPUT_NAMES = frozenset({"down_proj", "fc2", "dense_4h_to_h", "wo", "lin2", "fc_out", "w2"})
"""Leaf names of a feed-forward's second (output) layer; ``c_proj`` and ``output.dense`` also
count where they sit outside every attention module (GPT-2's MLP, BERT-style outputs)."""


def _in_attention(model: nn.Module, path: str) -> bool:
    """Whether a module at ``path`` sits inside a module whose class is an attention module."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        owner = model.get_submodule(".".join(parts[:i]))
        if "attention" in type(owner).__name__.lower() or parts[i - 1] in ("attention", "attn", "self_attn"):
            return True
    return False


def _is_ffn_output(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    leaf = parts[-1]
    if leaf in FFN_OUTPUT_NAMES:
        return not _in_attention(model, path)
    if leaf == "c_proj" or (leaf == "dense" and len(parts) > 1 and parts[-2] == "output"):
        return not _in_attention(model, path)
    return False


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(targets, feedforward)``: the paths (IA)^3 adapts by default on ``model``: the key and value
    projections (or fused q/k/v) inside attention and the feed-forward output layers (those are
    also the feedforward ones). Linear layers (and ``Conv1D``) only; the output head never."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    targets, ff = [], []
    for path, module in candidate_modules(model):
        if not is_linear(module) or module is head:
            continue
        leaf = path.rsplit(".", 1)[-1]
        if leaf in KEY_VALUE_NAMES or leaf in FUSED_QKV_NAMES:
            if _in_attention(model, path):
                targets.append(path)
        elif _is_ffn_output(model, path):
            targets.append(path)
            ff.append(path)
    return targets, ff


def _scale_dtype(weight: torch.Tensor) -> torch.dtype:
    """Vectors of a half-precision base train in fp32 (stable Adam updates, as peft's autocast)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() \
        else weight.dtype


class IA3Layer(MergeableLayer):
    """(IA)^3 on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d/3d``: one scaling vector per adapter."""

    owner_method = "ia3"
    class_prefix = "IA3"
    adapter_containers = ("ia3_l",)
    parameter_containers = ("ia3_l",)
    # adapter_state(name): True where the adapter scales the layer's input (a feed-forward module)

    # ------------------------------------------------------------------------ shapes
    def _is_conv(self) -> bool:
        return isinstance(self, (nn.Conv2d, nn.Conv3d))

    def _features(self) -> tuple[int, int]:
        """``(d_in, d_out)`` (channels for a convolution)."""
        if isinstance(self, nn.Linear):
            return self.in_features, self.out_features
        if self._is_conv():
            return self.in_channels, self.out_channels  # type: ignore[return-value]
        w = self.weight  # GPT-2 Conv1D stores (d_in, d_out)
        return int(w.shape[0]), int(w.shape[1])

    def add_adapter(self, name: str, feedforward: bool, init: bool) -> None:
        d_in, d_out = self._features()
        if self._is_conv():
            n = d_in if feedforward else d_out
            shape: tuple[int, ...] = (1, n) + (1,) * (self.weight.dim() - 2)
        else:
            shape = (1, d_in) if feedforward else (d_out, 1)
        w = self.weight
        kw = {"device": w.device, "dtype": _scale_dtype(w)}
        value = torch.ones(shape, **kw) if init or w.device.type == "meta" else torch.randn(shape, **kw)
        self.ia3_l[name] = nn.Parameter(value)
        self.set_adapter_state(name, feedforward)

    def scales_input(self, name: str) -> bool:
        """Whether adapter ``name`` scales the layer's input (a feed-forward module) or its output."""
        return bool(self.adapter_state(name))

    def restore(self) -> nn.Module:
        self.__dict__.pop("peftlab_ia3_pre", None)
        self.__dict__.pop("peftlab_ia3_bias_version", None)
        return super().restore()

    # ------------------------------------------------------------------------ forward
    def _product(self, names: list[str]) -> torch.Tensor | None:
        out = None
        for n in names:
            v = self.ia3_l[n] if self._is_conv() else self.ia3_l[n].flatten()
            out = v if out is None else out * v
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        live = self.live_adapters()
        if not live:
            return super().forward(x, *args, **kwargs)
        s_in = self._product([n for n in live if self.scales_input(n)])
        s_out = self._product([n for n in live if not self.scales_input(n)])
        if s_in is not None:  # the feed-forward's inner activation, rescaled before the layer
            x = (x.to(s_in.dtype) * s_in).to(self.weight.dtype if self._is_conv() else x.dtype)
        out = super().forward(x, *args, **kwargs)
        if s_out is not None:
            out = (out * s_out).to(out.dtype)
        return out

    # ------------------------------------------------------------------------ merge
    def _weight_scale(self, name: str) -> torch.Tensor:
        """``l`` of adapter ``name`` shaped to broadcast over the weight (fp32)."""
        v = self.ia3_l[name].detach().float()
        ff = self.scales_input(name)
        if isinstance(self, nn.Linear):
            return v  # (d_out, 1) scales rows, (1, d_in) columns
        if not self._is_conv():
            return v.T  # Conv1D's weight is (d_in, d_out)
        if not ff:
            return v.transpose(0, 1)  # (d_out, 1, ...) scales output channels
        groups = self.groups  # type: ignore[attr-defined]
        if groups == 1:
            return v
        d_in, d_out = self._features()  # a grouped kernel (d_out, d_in / groups, ...): input channels per group
        per_in, per_out = d_in // groups, d_out // groups
        v = v.reshape(groups, 1, per_in, *v.shape[2:]).expand(groups, per_out, per_in, *v.shape[2:])
        return v.reshape(d_out, per_in, *v.shape[3:])

    def _bias_scale(self, name: str) -> torch.Tensor | None:
        if self.scales_input(name) or getattr(self, "bias", None) is None:
            return None
        return self.ia3_l[name].detach().float().reshape(self.bias.shape)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``W * (l - 1)``: the additive form of the rescaling (fp32)."""
        return self.weight.float() * (self._weight_scale(name) - 1)

    def merge_is_finite(self, names: str | list[str]) -> bool:
        w = self.weight
        if w.device.type == "meta":
            return True
        with torch.no_grad():
            total, bias = w.float(), None if getattr(self, "bias", None) is None else self.bias.float()
            for n in [names] if isinstance(names, str) else names:
                total = total * self._weight_scale(n)
                s = self._bias_scale(n)
                bias = bias if s is None or bias is None else bias * s
            ok = bool(torch.isfinite(total.to(w.dtype)).all())
            return ok and (bias is None or bool(torch.isfinite(bias.to(self.bias.dtype)).all()))

    @torch.no_grad()
    def merge_adapter(self, name: str) -> None:
        """``W <- W * l`` (and ``b <- b * l`` for an output scale), keeping the weight as it was."""
        merged = self.__dict__.setdefault("peftlab_merged", [])
        if name in merged:
            return
        w, b = self.weight, self._parameters.get("bias")
        pre_w = w.detach().clone()
        w.copy_((w.float() * self._weight_scale(name)).to(w.dtype))
        on_undo(lambda: w.copy_(pre_w), w)
        s_b = self._bias_scale(name)
        pre_b = None
        if s_b is not None and b is not None:
            pre_b = b.detach().clone()
            b.copy_((b.float() * s_b).to(b.dtype))
            on_undo(lambda: b.copy_(pre_b), b)
        merged.append(name)
        self.__dict__.setdefault("peftlab_ia3_pre", {})[name] = (pre_w, pre_b, self._adapter_versions(name))
        self._note_versions()

    @torch.no_grad()
    def _unmerge_last(self) -> None:
        """Put back the weight (and bias) from before the last merge; if the weight or the vector
        changed since, divide instead (approximate, as peft's unmerge always is)."""
        name = self.peftlab_merged.pop()
        pre_w, pre_b, versions = self.peftlab_ia3_pre.pop(name)
        w, b = self.weight, self._parameters.get("bias")
        written = self.__dict__.get("peftlab_weight_version"), self.__dict__.get("peftlab_ia3_bias_version")
        exact = versions == self._adapter_versions(name) and written[0] == w._version
        s_w = self._weight_scale(name)
        if exact:
            w.copy_(pre_w)
            on_undo(lambda: w.copy_((w.float() * s_w).to(w.dtype)), w)  # the same rounding as the merge
        else:
            before_write(w)
            w.copy_(torch.where(s_w != 0, w.float() / torch.where(s_w != 0, s_w, 1), pre_w.float()).to(w.dtype))
        if pre_b is not None and b is not None:
            s_b = self._bias_scale(name)
            assert s_b is not None
            if exact and written[1] == b._version:
                b.copy_(pre_b)
                on_undo(lambda: b.copy_((b.float() * s_b).to(b.dtype)), b)
            else:
                before_write(b)
                b.copy_(torch.where(s_b != 0, b.float() / torch.where(s_b != 0, s_b, 1), pre_b.float()).to(b.dtype))
        self._note_versions()

    def _note_versions(self) -> None:
        """Version counters of the weight and bias after this layer's own last write: a later
        change by anyone else makes the kept pre-merge values stale."""
        b = self._parameters.get("bias")
        self.__dict__["peftlab_weight_version"] = self.weight._version
        self.__dict__["peftlab_ia3_bias_version"] = None if b is None else b._version


def layer_kind(module: nn.Module) -> type[IA3Layer] | None:
    """The layer class that adapts ``module`` (None: unsupported)."""
    return IA3Layer if is_linear(module) or isinstance(module, (nn.Conv2d, nn.Conv3d)) else None


@register("ia3")
@dataclass(frozen=True)
class IA3(Method):
    """(IA)^3 rescaling vectors. Mergeable; identity at init; several adapters per model."""

    target_modules: tuple[str, ...] | None = None
    """Which modules get a vector (see peftlab.core.targets). None: found from the module names,
    the paper's choice: key and value projections (fused q/k/v as a whole) and the feed-forward's
    output layer in every block."""
    feedforward_modules: tuple[str, ...] | None = None
    """Which of the targets scale their *input* (the feed-forward's inner activation); the others
    scale their output. None: the feed-forward output layers among the targets (found by name).
    Must select only targeted modules (peft's rule: a subset of target_modules)."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    init_ia3_weights: bool = True
    """Vectors start at one (the base model exactly). False: random normal (tests, research)."""

    peft_type: ClassVar[str | None] = "IA3"
    mergeable: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 3e-3
    """T-Few's learning rate for (IA)^3 (Liu et al. 2022, Sec. 3.3 / App. D: 3e-3 with Adafactor)."""
    typical_score: ClassVar[float | None] = 1.0
    typical_score_source: ClassVar[str] = (
        "Liu et al. 2022 (T-Few), Sec. 3.3 and Fig. 2: on T0-3B's held-out tasks (few-shot), (IA)^3 is the one "
        "PEFT method whose accuracy reaches full fine-tuning's (recorded as 1.0 of it)")

    def __post_init__(self) -> None:
        for label, group in (("target_modules", self.target_modules), ("feedforward_modules",
                             self.feedforward_modules), ("exclude_modules", self.exclude_modules)):
            for entry in group or ():
                check_entry(entry, label, "ia3")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("ia3: target_modules is empty; name modules (e.g. ['k_proj', 'v_proj', 'down_proj']) "
                              "or leave it unset (None) for the default keys, values and feed-forward outputs")

    # ------------------------------------------------------------------------- selection
    def plan(self, model: nn.Module) -> dict[str, bool]:
        """``{path: scales its input}`` for every module this adapter adapts; raises before any change."""
        if self.target_modules is None:
            auto, auto_ff = default_targets(model)
            auto = [p for p in auto if not any(matches(s, p, model.get_submodule(p))
                                               for s in self.modules_to_save)]
            if not auto:
                raise TargetError(
                    f"ia3: found no key/value projection or feed-forward output layer in {type(model).__name__} by "
                    "name (k_proj, v_proj, key, value, query_key_value, c_attn, down_proj, fc2, ...); name the "
                    "modules in target_modules (and the feed-forward ones in feedforward_modules)")
            entries: tuple[str, ...] = tuple(auto)
        else:
            entries, auto_ff = self.target_modules, default_targets(model)[1]
        paths = select(model, entries, exclude=self.exclude_modules, layers=self.layers, supported=SUPPORTED,
                       supported_names=("Conv1D",), skip=self.modules_to_save, what="ia3")
        if self.feedforward_modules is None:
            ff = set(auto_ff)
        else:
            ff = set()
            for entry in self.feedforward_modules:
                hits = {p for p in paths if matches(entry, p, model.get_submodule(p))}
                if not hits:
                    raise ConfigError(f"ia3: feedforward_modules entry {entry!r} matches none of the {len(paths)} "
                                      f"targeted modules (e.g. {paths[:3]}); feedforward_modules must name "
                                      "modules that target_modules also selects")
                ff |= hits
        if self.target_modules is None and not ff & set(paths) and _has_fused_experts(model):
            warnings.warn("ia3: the feed-forward of this model is a fused mixture-of-experts tensor, not a layer "
                          "(IA)^3 can scale; only the keys and values are adapted", stacklevel=4)
        return {p: p in ff for p in paths}

    def attach(self, model: nn.Module, name: str) -> None:
        plan = self.plan(model)
        modules = {p: model.get_submodule(p) for p in plan}  # every check before any change
        for path, module in modules.items():
            kind = layer_kind(module)
            assert kind is not None, path
            layer = kind.adopt(module)
            layer.add_adapter(name, plan[path], self.init_ia3_weights)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        if model is not None:  # peft reads exact module paths: what was adapted, as adapted
            layers = list(self.adapted_layers(model, name))
            targets: list[str] | None = [p for p, _ in layers]
            ff: list[str] | None = [p for p, layer in layers if layer.scales_input(name)]  # type: ignore[attr-defined]
            conv1d = any(isinstance(layer, IA3Layer) and not isinstance(layer, nn.Linear) and not layer._is_conv()
                         for _, layer in layers)
        else:
            targets = None if self.target_modules is None else list(self.target_modules)
            ff = None if self.feedforward_modules is None else list(self.feedforward_modules)
            conv1d = False
        return {
            "peft_type": "IA3",
            "task_type": None,
            "inference_mode": True,
            "target_modules": targets,
            "exclude_modules": None if model is not None else list(self.exclude_modules) or None,
            "feedforward_modules": ff,
            "fan_in_fan_out": conv1d,
            "modules_to_save": list(self.modules_to_save) or None,
            "init_ia3_weights": self.init_ia3_weights,
            "revision": None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> IA3:
        unknown = {k: v for k, v in config.items() if k not in PEFT_HANDLED and k not in PEFT_METADATA
                   and not k.startswith("peftlab") and v not in (None, False, {}, [], "")}
        if unknown:
            raise ConfigError(f"this peft IA3 config uses options peftlab's IA3 does not implement: {unknown}; "
                              "it was not loaded (its outputs would differ from peft's)")

        def names(v: Any, what: str) -> tuple[str, ...] | None:
            if v is None:
                return None
            if isinstance(v, str):  # peft: a string is a regular expression, full-matched
                return ("all-linear",) if v == "all-linear" and what == "target" else (f"re:{v}",)
            if not isinstance(v, (list, tuple)) or not all(isinstance(e, str) for e in v):
                raise ConfigError(f"ia3: {what}_modules must be a string or a list of strings (got {v!r})")
            if what == "feedforward":  # peft: any(path.endswith(entry)), no dot boundary
                return tuple(f"re:.*{re.escape(e)}" for e in v)
            return tuple(v)

        targets = names(config.get("target_modules"), "target")
        return cls(
            target_modules=targets,
            feedforward_modules=names(config.get("feedforward_modules"), "feedforward"),
            exclude_modules=names(config.get("exclude_modules"), "exclude") or (),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
            init_ia3_weights=config.get("init_ia3_weights", True),
        )


def _has_fused_experts(model: nn.Module) -> bool:
    return any(t is not None and t.dim() >= 3 and not isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Conv1d))
               for _, m in model.named_modules() for t in m._parameters.values())


PEFT_HANDLED = frozenset({"target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out",
                          "modules_to_save", "init_ia3_weights"})
"""Fields of peft's IA3Config that peftlab's IA3 reads (fan_in_fan_out: GPT-2's Conv1D is found by type)."""
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping"})
"""Fields that describe the file, not the adapter's maths."""
