"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, https://arxiv.org/abs/2310.11454).

One pair of *frozen random* low-rank matrices is shared by every adapted layer; each layer trains
only two scaling vectors::

    h = W x + Lambda_b B Lambda_d A x,    A: r x d_in,  B: d_out x r   (shared, frozen)
                                          Lambda_d = diag(lambda_d) (r),  Lambda_b = diag(lambda_b) (d_out)

``A`` and ``B`` are drawn once per adapter at the largest input and output sizes among the
targeted layers (``vera_A``: ``r x max d_in``, ``vera_B``: ``max d_out x r``) and each layer uses
their leading ``d_in`` columns and ``d_out`` rows. ``lambda_b`` starts at zero, so the adapted
model equals the base model at initialisation, and ``lambda_d`` at ``d_initial`` (the paper's
Table 6c: small values train best). Trainable parameters per layer: ``d_out + r``.

The shared matrices are regenerated from ``projection_prng_key`` exactly as peft draws them
(a CPU ``torch.Generator`` seeded with the key; Kaiming-uniform with gain sqrt(2) on fan-in, ``A``
first, then ``B``), so a peft file saved with ``save_projection=False`` loads with the same
outputs. With ``save_projection=True`` (peft's default) the file also holds them, under peft's
keys ``base_model.vera_A`` and ``base_model.vera_B``. They are buffers of one module per adapter
that every adapted layer holds (one tensor, not one per layer), kept out of ``state_dict`` (they
are not trained, and the file carries them only when ``save_projection`` says so).

The forward never forms a ``d_out x d_in`` matrix: ``h = x A^T`` (``r`` wide), then
``out + lambda_b * ((lambda_d h) B^T)``. Autograd keeps ``h`` and the ``d_out``-wide product for
the vectors' gradients, as peft's does; ``recompute=True`` keeps only ``h`` and recomputes what
``lambda_b``'s gradient needs in backward (:class:`_ScaledUp`: one more ``r x d_out`` matmul).
Linear layers and GPT-2's ``Conv1D``
(peft's set); mergeable (``W + Lambda_b B Lambda_d A``, exact unmerge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError, TargetError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import Method, register, wrapped_base_key
from peftlab.core.targets import ALL_LINEAR, select, peft_targets
from peftlab.methods._lowrank import LowRankForm

__all__ = ["VeRA", "VeRALayer", "VeRAProjection", "projection_matrices"]

BIAS_MODES = ("none", "all", "vera_only")
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")
"""peft's file keys of the shared matrices (the model-level buffers, adapter name dropped)."""


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform on fan-in (``shape[1]``), gain sqrt(2), drawn from ``generator``: peft's
    draw, the same arithmetic so the bound (and hence every value) is bit-identical."""
    t = torch.empty(shape, dtype=torch.float32)
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def projection_matrices(r: int, d_in: int, d_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``(vera_A, vera_B)`` for ``projection_prng_key`` ``key``: ``r x d_in`` then
    ``d_out x r`` from one CPU generator seeded with ``key`` (fp32, on the CPU)."""
    g = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming_uniform((r, d_in), g)
    b = _kaiming_uniform((d_out, r), g)
    return a, b


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Vectors of a half-precision base train in fp32 (stable Adam updates, as peft's autocast)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() \
        else weight.dtype


class VeRAProjection(nn.Module):
    """The frozen pair one adapter's layers share: ``vera_A`` (``r x max d_in``), ``vera_B``
    (``max d_out x r``). Non-persistent buffers: never trained, saved only through the method's
    own file table (``save_projection``)."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, r: int, d_in: int, d_out: int, key: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        if device.type == "meta":
            a = torch.empty(r, d_in, device=device, dtype=dtype)
            b = torch.empty(d_out, r, device=device, dtype=dtype)
        else:
            a, b = projection_matrices(r, d_in, d_out, key)
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)


class _ScaledUp(torch.autograd.Function):
    """``out + lambda_b * ((lambda_d * h) B^T)`` keeping only ``h`` (``r`` wide) for backward.

    Autograd's own graph keeps the ``d_out``-wide product ``(lambda_d h) B^T`` for ``lambda_b``'s
    gradient. Here that gradient is ``rowsum(B * (g^T (lambda_d h)))`` instead: one more
    ``d_out x r`` matmul per layer in backward, in exchange for ``d_out`` numbers per token."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, h: torch.Tensor, lam_d: torch.Tensor, b: torch.Tensor,
                lam_b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, lam_d, b, lam_b)
        flat = out.reshape(-1, out.shape[-1])
        return torch.addmm(flat, (h * lam_d).reshape(-1, h.shape[-1]), (b * lam_b[:, None]).T).view(out.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, lam_d, b, lam_b = ctx.saved_tensors
        g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
        hd = h2 * lam_d
        grad_hd = (g2 * lam_b) @ b  # (tokens, r)
        grad_lam_b = ((g2.T @ hd) * b).sum(1) if ctx.needs_input_grad[4] else None
        grad_lam_d = (grad_hd * h2).sum(0) if ctx.needs_input_grad[2] else None
        grad_h = (grad_hd * lam_d).view(h.shape) if ctx.needs_input_grad[1] else None
        return g, grad_h, grad_lam_d, None, grad_lam_b


class VeRALayer(MergeableLayer):
    """VeRA on ``nn.Linear`` and GPT-2's ``Conv1D`` (same maths, the merged delta transposed)."""

    owner_method = "vera"
    class_prefix = "VeRA"
    adapter_containers = ("vera_lambda_b", "vera_lambda_d", "vera_dropout", "vera_projection")
    parameter_containers = ("vera_lambda_b", "vera_lambda_d")

    def _features(self) -> tuple[int, int]:
        """``(d_in, d_out)``; GPT-2's Conv1D stores its weight ``(d_in, d_out)``."""
        if isinstance(self, nn.Linear):
            return self.in_features, self.out_features
        return int(self.weight.shape[0]), int(self.weight.shape[1])

    def add_adapter(self, name: str, projection: VeRAProjection, dropout: float, d_initial: float,
                    init: bool, recompute: bool = False) -> None:
        d_in, d_out = self._features()
        r = projection.vera_A.shape[0]
        w = self.weight
        kw = {"device": w.device, "dtype": _adapter_dtype(w)}
        if init or w.device.type == "meta":  # lambda_b = 0: the identity at init
            lam_b, lam_d = torch.zeros(d_out, **kw), torch.full((r,), float(d_initial), **kw)
        else:  # peft's init_weights=False: lambda_b ones, lambda_d standard normal
            lam_b, lam_d = torch.ones(d_out, **kw), torch.randn(r, **kw)
        self.vera_lambda_b[name] = nn.Parameter(lam_b)
        self.vera_lambda_d[name] = nn.Parameter(lam_d)
        self.vera_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_projection[name] = projection  # the one shared module, not a copy
        self.set_adapter_state(name, recompute)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared matrices: ``A[:, :d_in]`` and ``B[:d_out]`` (views)."""
        d_in, d_out = self._features()
        proj = self.vera_projection[name]
        return proj.vera_A[:, :d_in], proj.vera_B[:d_out]

    def route_refusal(self, name: str) -> str | None:
        return None

    @torch.no_grad()
    def routed_form(self, name: str) -> LowRankForm:
        """``(Lambda_b B) diag(lambda_d) A``: a low-rank form with a per-rank scale."""
        lam_b, lam_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        a, b = self._factors(name)
        return LowRankForm(a.to(lam_d.dtype), lam_b[:, None] * b.to(lam_b.dtype), lam_d)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        routing = self.__dict__.get("peftlab_routing")
        if routing is not None:
            return routing.apply(self, out, x=x)
        for name in self.live_adapters():
            lam_b, lam_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            a, b = self._factors(name)
            xd = self.vera_dropout[name](x.to(lam_d.dtype))
            h = F.linear(xd, a.to(lam_d.dtype))  # (..., r)
            b = b.to(lam_b.dtype)
            if self.adapter_state(name):  # recompute: keep only h for backward
                out = _ScaledUp.apply(out.to(lam_b.dtype), h, lam_d, b, lam_b).to(out.dtype)
            elif out.dtype == lam_b.dtype:  # out += lambda_b * (B (lambda_d h)), in place: the base output is
                # fresh and its backward does not need it; autograd keeps h and the d_out-wide product
                out = out.addcmul_(F.linear(h * lam_d, b), lam_b)
            else:
                out = out + (lam_b * F.linear(h * lam_d, b)).to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """``Lambda_b B Lambda_d A`` (fp32), transposed for ``Conv1D``."""
        a, b = self._factors(name)
        lam_b, lam_d = self.vera_lambda_b[name].float(), self.vera_lambda_d[name].float()
        delta = (lam_b[:, None] * b.float()) @ (lam_d[:, None] * a.float())
        return delta if isinstance(self, nn.Linear) else delta.T


@register("vera")
@dataclass(frozen=True)
class VeRA(Method):
    """Shared frozen random low-rank matrices with trained per-layer scaling vectors. Mergeable;
    identity at init; several adapters per model (each with its own shared pair)."""

    r: int = 256
    """Rank of the shared matrices. Higher than LoRA's: only ``r`` numbers per layer train for it
    (the paper uses 256-1024; peft's default 256)."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules get VeRA (see peftlab.core.targets): every linear layer by default, the
    paper's instruction-tuning setting (the sizes of the shared pair follow the largest layer)."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    layers_pattern: tuple[str, ...] = ()
    """How ``layers`` finds a module's block index (peft's option: the module list's name)."""
    projection_prng_key: int = 0
    """Seed of the shared matrices (peft's default 0); files saved without them regenerate them from it."""
    save_projection: bool = True
    """Write the shared matrices into the file (peft's default): reproducible on any platform at
    the cost of ``r * (max d_in + max d_out)`` numbers. False: the key alone regenerates them."""
    dropout: float = 0.0
    """Dropout on the VeRA input only (peft's vera_dropout)."""
    d_initial: float = 0.1
    """Initial value of every lambda_d (the paper's Table 6c: <= 0.1 trains best)."""
    bias: str = "none"
    """'none', 'all' (every bias of the model trains) or 'vera_only' (biases of adapted layers)."""
    init_weights: bool = True
    """lambda_b = 0, lambda_d = d_initial (the identity). False: lambda_b = 1, lambda_d ~ N(0, 1)."""
    recompute: bool = False
    """Keep only the r-wide ``A x`` of each layer for backward and recompute what lambda_b's gradient
    needs (one more r x d_out matmul per layer in backward): saves ``d_out`` numbers per token per
    layer, about 3/4 of VeRA's activations at r=256 on Llama. peftlab-only (not in peft's config)."""

    peft_type: ClassVar[str | None] = "VERA"
    mergeable: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 1e-2
    """VeRA's vectors take far larger steps than LoRA's factors (the paper uses 4e-3 to 1e-2)."""
    typical_score: ClassVar[float | None] = 0.99
    typical_score_source: ClassVar[str] = (
        "Kopiczko et al. 2024 (VeRA), Table 2: RoBERTa-base/large on GLUE, VeRA's averages on par with LoRA's "
        "(which match full fine-tuning's 86.4 for base) with ~10x fewer trainable parameters; recorded as 0.99, "
        "an approximate reading")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"vera: r must be a positive integer (got {self.r!r}); 256 is peft's default")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vera: dropout must be in [0, 1) (got {self.dropout})")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"vera: bias must be one of {BIAS_MODES} (got {self.bias!r})")
        if not 0 <= self.projection_prng_key < 2**63:
            raise ConfigError(f"vera: projection_prng_key must be in [0, 2**63) (got {self.projection_prng_key}); "
                              "it seeds a torch.Generator")
        if self.layers_pattern and self.layers is None:
            raise ConfigError("vera: layers_pattern only says how to read layer indices; give layers too")

    # ------------------------------------------------------------------------- attach
    def _paths(self, model: nn.Module) -> list[str]:
        return select(model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
                      supported=(nn.Linear,), supported_names=("Conv1D",), skip=self.modules_to_save,
                      what="vera", layers_pattern=self.layers_pattern)

    def attach(self, model: nn.Module, name: str) -> None:
        paths = self._paths(model)
        modules = {p: model.get_submodule(p) for p in paths}
        if not modules:
            raise TargetError("vera: no linear layer selected; name Linear or Conv1D modules in target_modules")
        dims = {p: VeRALayer._features(m) for p, m in modules.items()}  # type: ignore[arg-type]
        d_in, d_out = max(d for d, _ in dims.values()), max(d for _, d in dims.values())
        bias_keys = self._bias_keys(model, paths)  # every check before any change
        ref = next(iter(modules.values())).weight
        projection = VeRAProjection(self.r, d_in, d_out, self.projection_prng_key, ref.device, _adapter_dtype(ref))
        for module in modules.values():
            layer = VeRALayer.adopt(module)
            assert isinstance(layer, VeRALayer)
            layer.add_adapter(name, projection, self.dropout, self.d_initial, self.init_weights, self.recompute)
        if bias_keys:
            slots.train_base_tensors(model, name, bias_keys)

    def _bias_keys(self, model: nn.Module, paths: list[str]) -> list[str]:
        return slots.bias_mode_keys(model, paths, self.bias, "vera", VeRALayer.adapter_containers)

    def projection(self, model: nn.Module, name: str) -> tuple[str, VeRAProjection]:
        """``(state path, module)`` of adapter ``name``'s shared matrices."""
        for path, layer in self.adapted_layers(model, name):
            return f"{path}.vera_projection.{name}", layer.vera_projection[name]  # type: ignore[return-value]
        raise TargetError(f"vera: adapter {name!r} adapts no layer of this model")

    # ------------------------------------------------------------------------- files
    def file_tensors(self, model: nn.Module, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        out = super().file_tensors(model, name)  # the per-layer vectors (the projection is no state)
        if self.save_projection:
            path, proj = self.projection(model, name)
            out[PROJECTION_KEYS[0]] = (f"{path}.vera_A", proj.vera_A)
            out[PROJECTION_KEYS[1]] = (f"{path}.vera_B", proj.vera_B)
        return out

    def base_file_key(self, model: nn.Module, key: str, name: str) -> str:
        return wrapped_base_key(model, key, name, VeRALayer)  # peft wraps adapted layers

    # ------------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        plain = all(not any(ch in t for ch in "*?[:") and t != ALL_LINEAR for t in self.target_modules)
        simple = plain and not self.exclude_modules and self.layers is None
        layers = [] if model is None else list(self.adapted_layers(model, name))
        targets = list(self.target_modules) if simple or model is None else [p for p, _ in layers]
        return {
            "peft_type": "VERA",
            "task_type": None,
            "inference_mode": True,
            "r": self.r,
            "target_modules": targets,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": any(not isinstance(layer, nn.Linear) for _, layer in layers),
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) or None,
            "init_weights": self.init_weights,
            "layers_to_transform": None,
            "layers_pattern": None,
            "revision": None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VeRA:
        unknown = {k: v for k, v in config.items() if k not in PEFT_HANDLED and k not in PEFT_METADATA
                   and not k.startswith("peftlab") and v not in (None, False, {}, [], "")}
        if unknown:
            raise ConfigError(f"this peft VeRA config uses options peftlab's VeRA does not implement: {unknown}; "
                              "it was not loaded (its outputs would differ from peft's)")

        layers = config.get("layers_to_transform")
        pattern = config.get("layers_pattern")
        return cls(
            r=config.get("r", 256),
            target_modules=peft_targets(config.get("target_modules")) or (ALL_LINEAR,),
            layers=None if layers is None else tuple(layers) if isinstance(layers, list) else (layers,),
            layers_pattern=() if not pattern else (pattern,) if isinstance(pattern, str) else tuple(pattern),
            projection_prng_key=config.get("projection_prng_key", 0),
            save_projection=config.get("save_projection", True),
            dropout=config.get("vera_dropout", 0.0),
            d_initial=config.get("d_initial", 0.1),
            bias=config.get("bias", "none"),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
            init_weights=config.get("init_weights", True),
        )


PEFT_HANDLED = frozenset({"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout",
                          "d_initial", "fan_in_fan_out", "bias", "modules_to_save", "init_weights",
                          "layers_to_transform", "layers_pattern"})
"""Fields of peft's VeraConfig that peftlab's VeRA reads (fan_in_fan_out: GPT-2's Conv1D is found by type)."""
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping"})
"""Fields that describe the file, not the adapter's maths."""
