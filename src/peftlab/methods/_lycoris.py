"""What LoHa and LoKr share (the LyCORIS family, https://github.com/KohakuBlueleaf/LyCORIS).

Both put a weight update ``delta W`` (shaped like the base weight, built from small factors) on
``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers, scaled by ``alpha / r``, with peft's two
training-time regularisers:

* ``module_dropout``: in training, each adapter of each layer is skipped for the whole step with
  this probability;
* ``rank_dropout``: in training, each output row of ``delta W`` is zeroed with this probability
  (the kept rows are rescaled by ``1 / mean(mask)`` where the method does so).

The random draws follow peft's order (``torch.rand(1)`` for the module, then ``torch.rand(d_out)``
for the rows, both from the CPU generator), so a seeded training step equals peft's.

This module holds the per-layer state and forward loop (:class:`LycorisLayer`), the method fields
and their peft config mapping (:class:`LycorisMethod`); each method's file holds its maths (the
factor shapes, initialisation, ``delta W`` and a forward that avoids forming it where cheaper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import Method
from peftlab.core.targets import ALL_LINEAR, select, peft_targets
from peftlab.methods.lora import check_patterns, pattern_value

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""The layer types peft's LoHa and LoKr adapt (transformers' GPT-2 ``Conv1D`` is not one of them)."""
CONV = {3: F.conv1d, 4: F.conv2d}

PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping"})
"""Fields of peft's LyCORIS configs that describe the file, not the update."""


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters of a half-precision base train in fp32 (peft's ``autocast_adapter_dtype``)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() \
        else weight.dtype


def kaiming_(t: torch.Tensor) -> None:
    """PyTorch's default layer init (peft's choice for every LyCORIS factor that starts random)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product of two factor matrices (no activation involved). Written as an einsum so that the
    memory estimator's probe, which reads ``x @ W`` with a trainable ``W`` as an activation kept
    per token, does not count a product of two weights as one."""
    return torch.einsum("ij,jk->ik", a, b)


@dataclass(frozen=True)
class Settings:
    """Per-adapter, per-layer scalars."""

    r: int
    alpha: float
    rank_dropout: float
    module_dropout: float
    rescale_rank_dropout: bool
    """Divide the kept rows by the mask's mean (LoHa always; LoKr with ``rank_dropout_scale``)."""
    effective_conv: bool
    """The Tucker (CP) form of the kernel (``use_effective_conv2d``) is used on this layer."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LycorisLayer(MergeableLayer):
    """An adapted ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` whose update is ``delta W`` of a LyCORIS
    method. Subclasses set the containers and write ``add_adapter``, ``delta_weight`` (fp32) and
    ``update(name, x)``: ``delta W`` applied to ``x`` (in the adapter's dtype, unscaled rows)."""

    peftlab_lycoris: dict[str, Settings]

    # ----------------------------------------------------------------------- state
    def adapter_names(self) -> list[str]:
        # no container holds every adapter (LoKr keeps w1 whole or factored): the union, in order
        seen: dict[str, None] = {}
        for c in self.adapter_containers:
            seen.update(dict.fromkeys(getattr(self, c).keys()))
        return list(seen)

    def settings(self, name: str) -> Settings:
        return self.__dict__["peftlab_lycoris"][name]

    def _set_settings(self, name: str, settings: Settings) -> None:
        self.__dict__.setdefault("peftlab_lycoris", {})[name] = settings

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)  # first: unmerging a merged adapter needs its scale
        self.__dict__.get("peftlab_lycoris", {}).pop(name, None)

    def restore(self) -> nn.Module:
        self.__dict__.pop("peftlab_lycoris", None)
        return super().restore()

    # ----------------------------------------------------------------------- shapes
    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[0])

    def factory(self) -> dict[str, Any]:
        """Where and in which dtype the adapter's tensors live."""
        return {"device": self.weight.device, "dtype": adapter_dtype(self.weight)}

    def conv_update(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """``x`` convolved with ``kernel`` (shaped like the base weight) as the base convolves;
        zero padding (other padding modes are refused at attach)."""
        return CONV[self.weight.ndim](x, kernel, None, self.stride, self.padding, self.dilation, self.groups)

    def apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` (shaped like the base weight) applied to ``x`` as the base layer applies its weight."""
        if isinstance(self, nn.Linear):
            return F.linear(x, delta)
        return self.conv_update(x, delta)

    # ----------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        for name in self.live_adapters():
            s = self.settings(name)
            if self.training and not bool(torch.rand(1) > s.module_dropout):  # peft's draw, made in training
                continue
            rows: float | torch.Tensor = s.scaling
            if self.training and s.rank_dropout:
                rows = self._rank_mask(s) * s.scaling
            # in place: the base layer's output is fresh and its backward does not need it (one
            # output-sized temporary less per layer)
            out = out.add_(self.update(name, x, rows).to(out.dtype))
        return out

    def _rank_mask(self, s: Settings) -> torch.Tensor:
        """peft's rank dropout: each output row kept with probability ``1 - rank_dropout`` (drawn on
        the CPU generator, as peft draws it), rescaled by ``1 / mean`` where the method does so."""
        keep = (torch.rand(self.out_dim) > s.rank_dropout).float()
        if s.rescale_rank_dropout:
            mean = keep.mean()
            keep = keep / mean if mean > 0 else keep  # peft divides by zero (NaN) when every row drops
        return keep.to(self.weight.device)

    def update(self, name: str, x: torch.Tensor, rows: float | torch.Tensor) -> torch.Tensor:
        """``delta W`` applied to ``x``, its output rows scaled by ``rows`` (the adapter's scale, or
        the scale times the rank-dropout mask: a vector of ``d_out``), in the adapter's dtype."""
        raise NotImplementedError


def row_scaled(t: torch.Tensor, rows: float | torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` with its slices along ``dim`` scaled by ``rows`` (a scalar, or one value per slice)."""
    if not isinstance(rows, torch.Tensor):
        return t * rows
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * rows.to(t.dtype).view(shape)


# ----------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class LycorisMethod(Method):
    """Fields and the peft config mapping shared by LoHa and LoKr (not registered itself)."""

    r: int = 8
    """Rank of each factorised factor. peft's default."""
    alpha: float = 8
    """The update is scaled by alpha / r (peft's default alpha = r: scale 1)."""
    rank_dropout: float = 0.0
    """In training, drop each output row of the update with this probability (peft's option)."""
    module_dropout: float = 0.0
    """In training, skip a layer's update for the whole step with this probability."""
    use_effective_conv2d: bool = False
    """Convolutions with a kernel larger than 1 get the Tucker (CP) form of FedPara's Proposition 3:
    an ``r x r x k x k`` core instead of factoring the flattened kernel."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules are adapted (see peftlab.core.targets): all linear layers by default, as
    peftlab's LoRA (peft has no default of its own for these methods on most models)."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: {regex: r}, peft's rule (first key matching the end of the module path)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: str = "default"

    mergeable: ClassVar[bool] = True
    inits: ClassVar[dict[str, Any]] = {"default": True, "random": False}
    """peftlab's ``init`` -> peft's ``init_weights``."""
    extra_peft_fields: ClassVar[tuple[str, ...]] = ()
    """peft config fields that have a peftlab field of the same name and meaning (beyond the shared ones)."""

    def __post_init__(self) -> None:
        name = self.method_name
        if self.r < 1:
            raise ConfigError(f"{name}: r must be a positive integer (got {self.r!r}); 8 is a good start")
        for k, v in self.rank_pattern.items():
            if v < 1:
                raise ConfigError(f"{name}: rank_pattern[{k!r}] must be a positive integer (got {v!r})")
        if self.alpha <= 0:
            raise ConfigError(f"{name}: alpha must be > 0 (got {self.alpha}); alpha = r gives scale 1")
        for k, v in self.alpha_pattern.items():
            if v <= 0:
                raise ConfigError(f"{name}: alpha_pattern[{k!r}] must be > 0 (got {v!r})")
        check_patterns(name, "rank_pattern", self.rank_pattern)
        check_patterns(name, "alpha_pattern", self.alpha_pattern)
        for f in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"{name}: {f} must be in [0, 1) (got {getattr(self, f)})")
        if self.init not in self.inits:
            raise ConfigError(f"{name}: init must be one of {tuple(self.inits)} (got {self.init!r})")

    # ----------------------------------------------------------------------- attach
    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules to adapt, after every check (nothing is changed here)."""
        name = self.method_name
        paths = select(model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
                       supported=SUPPORTED, supported_names=("Conv1D",), skip=self.modules_to_save, what=name)
        modules = {p: model.get_submodule(p) for p in paths}
        conv1d = [p for p, m in modules.items() if not isinstance(m, SUPPORTED)]
        if conv1d:
            raise ConfigError(
                f"{name}: {', '.join(conv1d[:3])}{', ...' if len(conv1d) > 3 else ''} are transformers Conv1D layers "
                f"(GPT-2's linear layers, weight stored in x out), which peft's {self.peft_type} does not adapt, so "
                f"neither does peftlab (a file could not load in peft). Use lora, which adapts Conv1D, or exclude "
                "them with exclude_modules")
        odd = [p for p, m in modules.items() if getattr(m, "padding_mode", "zeros") != "zeros"]
        if odd:
            raise ConfigError(f"{name}: convolutions with padding_mode other than 'zeros' are not supported "
                              f"({', '.join(odd[:3])}): peft pads the update with zeros there, so its merged and "
                              "unmerged outputs differ. Exclude them with exclude_modules")
        return modules

    def rank_alpha(self, path: str) -> tuple[int, float]:
        return pattern_value(self.rank_pattern, path, self.r), pattern_value(self.alpha_pattern, path, self.alpha)

    # ----------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        plain = all(not any(ch in t for ch in "*?[:") and t != ALL_LINEAR for t in self.target_modules)
        targets: Any
        if plain and not self.exclude_modules and self.layers is None:
            targets = list(self.target_modules)
        elif model is not None:  # peft cannot express globs, types or layer ranges: the exact module list
            targets = [p for p, _ in self.adapted_layers(model, name)]
        elif tuple(self.target_modules) == (ALL_LINEAR,) and not self.exclude_modules and self.layers is None:
            targets = ALL_LINEAR  # peft reads 'all-linear' as a string only
        else:
            targets = list(self.target_modules)
        config = {
            "peft_type": self.peft_type,
            "task_type": None,
            "r": self.r,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "use_effective_conv2d": self.use_effective_conv2d,
            "target_modules": targets,
            "exclude_modules": None,
            "init_weights": self.inits[self.init],
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
        }
        config.update({f: getattr(self, f) for f in self.extra_peft_fields})
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LycorisMethod:
        if "peftlab_method" in config:  # peftlab's own config (not written for these methods, but accepted)
            return super().from_config(config)  # type: ignore[return-value]
        name = cls.method_name
        handled = {"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "target_modules",
                   "exclude_modules", "init_weights", "layers_to_transform", "rank_pattern", "alpha_pattern",
                   "modules_to_save", *cls.extra_peft_fields}
        unsupported = {k: v for k, v in config.items() if k not in handled and k not in PEFT_METADATA
                       and not k.startswith("peftlab") and v not in (None, False, {}, [], "")}
        if unsupported:
            raise ConfigError(f"this peft {cls.peft_type} config uses options peftlab's {name} does not implement: "
                              f"{unsupported}; it was not loaded (its outputs would differ from peft's)")
        init = config.get("init_weights", True)
        by_peft = {repr(v): k for k, v in cls.inits.items()}
        if not isinstance(init, (bool, str)) or repr(init) not in by_peft:
            raise ConfigError(f"this peft {cls.peft_type} config has init_weights={init!r}; peftlab's {name} reads "
                              f"{sorted(cls.inits.values(), key=repr)}; it was not loaded")
        targets = config.get("target_modules")
        if targets is None or targets == []:
            raise ConfigError(f"this peft {cls.peft_type} config names no target_modules (peft writes the modules "
                              "it adapted when it saves); add them to the config")

        layers = config.get("layers_to_transform")
        options: dict[str, Any] = {
            "r": config.get("r", 8),
            "alpha": config.get("alpha", 8),
            "rank_dropout": config.get("rank_dropout", 0.0),
            "module_dropout": config.get("module_dropout", 0.0),
            "use_effective_conv2d": config.get("use_effective_conv2d", False),
            "target_modules": peft_targets(targets),
            "exclude_modules": peft_targets(config.get("exclude_modules")),
            "layers": tuple(layers) if isinstance(layers, list) else (layers,) if layers is not None else None,
            "rank_pattern": dict(config.get("rank_pattern") or {}),
            "alpha_pattern": dict(config.get("alpha_pattern") or {}),
            "modules_to_save": tuple(config.get("modules_to_save") or ()),
            "init": by_peft[repr(init)],
        }
        options.update({f: config[f] for f in cls.extra_peft_fields if f in config})
        return cls(**options)

