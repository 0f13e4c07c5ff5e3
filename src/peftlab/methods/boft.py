"""BOFT: orthogonal butterfly finetuning (Liu et al. 2024, https://arxiv.org/abs/2311.06243).

OFT's block-diagonal rotation (:mod:`peftlab.methods.oft`) mixes features only within a block.
BOFT composes ``m`` block-diagonal rotations, each conjugated by a butterfly permutation that
interleaves the blocks, so that after ``m`` factors every input feature reaches ``b * 2^(m-1)``
others for the parameters of ``m`` OFT layers. With ``d`` the input width split into ``D`` blocks
of ``b``, for a frozen ``W`` (peft's form, reproduced exactly so that files load both ways)::

    h = s * (W B^T x) + bias,     B = M_(m-1) ... M_1 M_0,     M_i = P_i diag(R_i1, ..., R_iD) P_i^T

``R_ij = (I - S)(I + S)^-1`` is the exact Cayley transform of the skew part ``S = (A - A^T) / 2``
of a trained ``b x b`` matrix ``A`` (all ``b^2`` entries stored, ``boft_R`` of shape
``(m, D, b, b)``, zero at init: ``B = I``), ``P_i`` is the butterfly permutation of factor ``i``
(the identity for ``m = 1``, which is OFT with the exact transform) and ``s`` a trained
per-output scale (``boft_s``, ones at init). The merged weight is ``W' = s * (W B^T)``.

peftlab applies each ``M_i`` as two index gathers around one batched ``b x b`` product over
an ``(D, N, b)`` view (:func:`peftlab.methods.oft.rotate`): ``m N d b`` work for ``N`` tokens and
nothing ``d x d``. peft builds the dense ``d x d`` permutations (a buffer of ``m d^2`` per layer),
the dense block-diagonal matrix and their products, and multiplies the input by the ``d x d``
result (``N d^2``).

``dropout`` is BOFT's multiplicative dropout, as peft does it: in a training forward one of the
``m`` factors is picked at random and ``int(p * D)`` of its blocks are replaced by the identity.

Layers: ``nn.Linear`` and ``nn.Conv2d`` with a square kernel, groups 1, dilation 1, equal strides
and paddings (the rotated side is the flattened ``in x k x k`` filter; the layer convolves with
the rotated, scaled kernel, which is peft's forward). GPT-2's ``Conv1D`` and embeddings are
refused: peft's BOFT does not adapt them, so such a file could not load there.

peft without its CUDA extension (any CPU, or a GPU without ``ninja``) replaces
``boft_n_butterfly_factor`` by 1 whatever its config says, so on such a machine peft trains (and
saves) OFT-with-scale layers under a config that still says ``m > 1``, and cannot load a file
with ``m > 1``. peftlab computes every ``m`` on every device, and reads such a file as the one
factor its tensors hold, with a warning (:meth:`BOFT.for_file`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.method import Method, register, wrapped_base_key
from peftlab.core.targets import ALL_LINEAR, peft_targets, select
from peftlab.methods.oft import RotationMerge, rotate

__all__ = ["BOFT", "butterfly_permutation", "cayley_exact"]

PEFT_FORMAT_VERSION = "0.21.2"
"""The peft release whose BOFT file format and maths this module follows (the config's ``peft_version``)."""
BIAS_MODES = ("none", "all", "boft_only")
SUPPORTED = (nn.Linear, nn.Conv2d)


# ----------------------------------------------------------------------------- the maths
def butterfly_permutation(d: int, blocks: int, half: int) -> torch.Tensor:
    """peft's block butterfly permutation of ``d`` features (``perm``: ``P[j, perm[j]] = 1``).

    The features fall into ``blocks`` groups of ``d / blocks``; inside each group the chunks of
    ``half`` features are reordered even-numbered chunks first, then odd-numbered ones."""
    if blocks * half * 2 > d:
        raise ConfigError(f"boft: no butterfly permutation of {d} features into {blocks} blocks of chunks of {half}")
    group = d // blocks
    chunks = group // half
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    inside = torch.cat([torch.arange(c * half, c * half + half) for c in order])
    return (torch.arange(d).view(blocks, group)[:, inside]).reshape(-1)


def cayley_exact(a: torch.Tensor) -> torch.Tensor:
    """``(I - S)(I + S)^-1`` for ``S = (A - A^T) / 2`` of each ``b x b`` matrix of ``a`` (``(n, b, b)``), in fp32."""
    a = a.float()
    skew = 0.5 * (a - a.transpose(-1, -2))
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(a)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


class _Cayley(torch.autograd.Function):
    """:func:`cayley_exact` keeping only its input for backward, where the transform is recomputed
    (``m D b^3`` flops per layer) instead of holding the solve's factors through the forward pass."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return cayley_exact(a)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            (out,) = torch.autograd.grad(cayley_exact(leaf), leaf, grad)
        return out.to(a.dtype)


class Butterfly(NamedTuple):
    """The per-adapter settings of one adapted layer (``AdapterLayer.adapter_state``)."""

    factors: int
    blocks: int
    block_size: int
    dropout: float


_PERMS: dict[tuple[int, int, int, int, str], tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}


def permutations(d: int, st: Butterfly, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per factor ``i``: the index that gathers ``x P_i`` from ``x`` and the one that gathers
    ``y P_i^T`` from ``y`` (``None`` for the identity of one factor)."""
    key = (d, st.factors, st.blocks, st.block_size, str(device))
    if key not in _PERMS:
        out = []
        with torch.inference_mode(False):
            for i in range(st.factors):
                if st.factors == 1:
                    perm = torch.arange(d)
                else:
                    perm = butterfly_permutation(d, st.blocks // 2**i, st.block_size // 2)
                inverse = torch.empty_like(perm)
                inverse[perm] = torch.arange(d)
                out.append((inverse.to(device), perm.to(device)))
        _PERMS[key] = tuple(out)
    return _PERMS[key]


def apply_butterfly(x: torch.Tensor, rot: torch.Tensor, perms: tuple[tuple[torch.Tensor, torch.Tensor], ...],
                    transpose: bool = False) -> torch.Tensor:
    """``x B`` (or ``x B^T`` with ``transpose``) for ``x`` (``..., d``) and blocks ``rot``
    (``(m, D, b, b)``): factor ``m-1`` first (``B = M_(m-1) ... M_0``); each ``M_i`` is a gather by
    ``P_i``, one batched block product and a gather by ``P_i^T``."""
    m = rot.shape[0]
    order = range(m) if transpose else range(m - 1, -1, -1)
    for i in order:
        inverse, perm = perms[i]
        blocks = rot[i].transpose(-1, -2) if transpose else rot[i]
        identity = m == 1
        y = x if identity else x.index_select(-1, inverse)
        y = rotate(y, blocks)
        x = y if identity else y.index_select(-1, perm)
    return x


# ----------------------------------------------------------------------------- layers
class BOFTLayer(RotationMerge):
    """State shared by the BOFT layer kinds: the blocks and the output scale of each adapter."""

    owner_method = "boft"
    class_prefix = "BOFT"
    adapter_containers = ("boft_R", "boft_s")
    parameter_containers = ("boft_R", "boft_s")

    def input_width(self) -> int:
        return self.in_features  # type: ignore[return-value]

    def output_width(self) -> int:
        return self.out_features  # type: ignore[return-value]

    def scale_shape(self) -> tuple[int, int]:
        """peft's layout of ``boft_s``: ``(out, 1)`` on Linear."""
        return (self.output_width(), 1)

    def add_adapter(self, name: str, state: Butterfly, init_weights: bool) -> None:
        w = self.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point() else w.dtype
        b = state.block_size
        a = torch.empty(state.factors, state.blocks, b, b, device=w.device, dtype=dtype)
        s = torch.empty(self.scale_shape(), device=w.device, dtype=dtype)
        with torch.no_grad():
            if init_weights:
                nn.init.zeros_(a)
                nn.init.ones_(s)
            else:  # peft's init_weights=False: random rotations and scales (not the base at init; for tests)
                nn.init.normal_(a, mean=0.0, std=0.1)
                nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[name] = nn.Parameter(a)
        self.boft_s[name] = nn.Parameter(s)
        self.set_adapter_state(name, state)
        self.keep_deltas()

    def rotations(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s blocks (``(m, D, b, b)``, fp32), with multiplicative dropout in training.
        Only the parameter is kept for backward (the transform is recomputed there)."""
        st: Butterfly = self.adapter_state(name)
        a = self.boft_R[name]
        m, n, b, _ = a.shape
        kind = a.device.type
        if kind != "meta" and torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                rot = _Cayley.apply(a.reshape(m * n, b, b)).view(m, n, b, b)
        else:
            rot = _Cayley.apply(a.reshape(m * n, b, b)).view(m, n, b, b)
        if self.training and st.dropout > 0:
            drop = int(st.dropout * n)
            if drop:
                mask = torch.zeros(m, n, 1, 1, device=rot.device, dtype=torch.bool)
                pick = int(torch.randint(0, m, (1,)).item())
                mask[pick, torch.randperm(n, device=rot.device)[:drop]] = True
                rot = torch.where(mask, torch.eye(b, device=rot.device, dtype=rot.dtype), rot)
        return rot

    def scale(self, name: str) -> torch.Tensor:
        """``boft_s`` as a vector over the outputs."""
        return self.boft_s[name].reshape(-1)

    def _perms(self, name: str, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return permutations(self.input_width(), self.adapter_state(name), device)

    def rotated_weight(self, name: str) -> torch.Tensor:
        """``s * (W B^T)`` in fp32, shaped like the weight (evaluation form: no dropout)."""
        w = self.weight.float()
        flat = w.reshape(w.shape[0], -1)
        with torch.no_grad():
            rot = cayley_exact(self.boft_R[name].detach().flatten(0, 1)).view(self.boft_R[name].shape)
            flat = apply_butterfly(flat, rot, self._perms(name, w.device), transpose=True)
            return (flat * self.scale(name).detach().float()[:, None]).reshape(w.shape)


class BOFTLinearLayer(BOFTLayer):
    """BOFT on ``nn.Linear``: the input is rotated, the base layer runs, its output (less the
    bias) is scaled."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        live = self.live_adapters()
        if not live:
            return super().forward(x, *args, **kwargs)
        dtype = x.dtype
        scale = None
        for name in reversed(live):  # the adapter merged last touches the input first
            rot = self.rotations(name)
            x = apply_butterfly(x.to(rot.dtype), rot, self._perms(name, x.device))
            s = self.scale(name)
            scale = s if scale is None else scale * s
        out = super().forward(x.to(dtype), *args, **kwargs)
        assert scale is not None
        bias = self.bias
        if bias is None:
            return (out * scale).to(out.dtype)
        return ((out - bias) * scale + bias).to(out.dtype)  # autograd keeps out - bias for the scale's gradient


class BOFTConvLayer(BOFTLayer):
    """BOFT on ``nn.Conv2d``: the flattened ``in x k x k`` filter side is rotated, the kernel's
    output channels scaled, and the layer convolves with that kernel (peft's forward)."""

    def input_width(self) -> int:
        return self.in_channels * math.prod(self.kernel_size)  # type: ignore[attr-defined]

    def output_width(self) -> int:
        return self.out_channels  # type: ignore[attr-defined]

    def scale_shape(self) -> tuple[int, int]:
        return (1, self.output_width())  # peft's layout on Conv2d

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        live = self.live_adapters()
        if not live:
            return super().forward(x, *args, **kwargs)
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        for name in live:
            rot = self.rotations(name)
            flat = apply_butterfly(flat.to(rot.dtype), rot, self._perms(name, w.device), transpose=True)
            flat = flat * self.scale(name)[:, None]
        return self._conv_forward(x, flat.to(w.dtype).reshape(w.shape), self.bias)  # type: ignore[attr-defined]


def layer_kind(module: nn.Module) -> type[BOFTLayer] | None:
    """Which BOFT layer adapts ``module`` (None: unsupported, as in peft)."""
    if isinstance(module, nn.Linear):
        return BOFTLinearLayer
    if isinstance(module, nn.Conv2d):
        return BOFTConvLayer
    return None


# ----------------------------------------------------------------------------- the method
@register("boft")
@dataclass(frozen=True)
class BOFT(Method):
    """Orthogonal butterfly finetuning: products of permuted block-diagonal rotations and an
    output scale. Mergeable; identity at init."""

    block_size: int = 4
    """Block size ``b`` (peft's ``boft_block_size``, default 4; 0 to give ``block_num`` instead)."""
    block_num: int = 0
    """Blocks per layer ``D`` instead of their size (peft's ``boft_block_num``); exactly one of
    ``block_size`` and ``block_num`` is non-zero (``D b`` is the layer's input width)."""
    n_butterfly_factor: int = 1
    """Butterfly factors ``m`` (peft's ``boft_n_butterfly_factor``); 1 is OFT with the exact
    Cayley transform and an output scale. Trainable parameters per layer: ``m D b^2 + d_out``."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules get BOFT (see peftlab.core.targets): every linear layer by default."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    layers_pattern: tuple[str, ...] = ()
    """How ``layers`` finds a block index: the module-list name(s) (peft's ``layers_pattern``)."""
    dropout: float = 0.0
    """Multiplicative dropout (peft's ``boft_dropout``): the share of one random factor's blocks
    that are the identity in a training step."""
    bias: str = "none"
    """'none', 'all' (every bias of the model trains) or 'boft_only' (biases of adapted layers)."""
    init_weights: bool = True
    """True: the identity (zero ``boft_R``, unit ``boft_s``); False: random (std 0.1; for tests)."""

    peft_type: ClassVar[str | None] = "BOFT"
    mergeable: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 1e-3

    def __post_init__(self) -> None:
        for field_name in ("block_size", "block_num"):
            if getattr(self, field_name) < 0:
                raise ConfigError(f"boft: {field_name} must be >= 0 (got {getattr(self, field_name)})")
        if (self.block_num == 0) == (self.block_size == 0):
            raise ConfigError(f"boft: give exactly one of block_size and block_num (got block_size={self.block_size}, "
                              f"block_num={self.block_num}): block_size * block_num is the layer's width, so set the "
                              "other to 0 (e.g. block_size=4, block_num=0)")
        if self.n_butterfly_factor < 1:
            raise ConfigError(f"boft: n_butterfly_factor must be >= 1 (got {self.n_butterfly_factor}); 1 is OFT")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"boft: dropout must be in [0, 1) (got {self.dropout})")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"boft: bias must be one of {BIAS_MODES} (got {self.bias!r})")
        for p in self.layers_pattern:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"boft: layers_pattern entry {p!r} is not a regular expression ({e})") from None

    def butterfly(self, path: str, module: nn.Module) -> Butterfly:
        """The layout of ``module``, with peft's checks of block size, block count and factors."""
        if isinstance(module, nn.Conv2d):
            k = tuple(module.kernel_size)
            same = (len(set(k)) == 1 and module.groups == 1 and tuple(module.dilation) == (1, 1)
                    and len(set(module.stride)) == 1 and not isinstance(module.padding, str)
                    and len(set(module.padding)) == 1 and module.padding_mode == "zeros")
            if not same:
                raise ConfigError(f"boft: {path} is a Conv2d with kernel {list(k)}, groups={module.groups}, dilation="
                                  f"{list(module.dilation)}, stride={list(module.stride)}, padding={module.padding!r}, "
                                  f"padding_mode={module.padding_mode!r}; peft's BOFT (whose files peftlab writes) "
                                  "convolves square kernels with groups=1, dilation 1, one stride and one zero "
                                  "padding only; exclude it with exclude_modules")
        kind = layer_kind(module)
        assert kind is not None
        d = kind.input_width(module)  # type: ignore[arg-type]
        f = self.n_butterfly_factor - 1  # the paper's count of permuted factors
        if self.block_size == 0:
            n = self.block_num
            if d % n:
                raise ConfigError(f"boft: {path}'s input width {d} is not divisible by block_num {n}; choose a divisor "
                                  f"or exclude the module")
            if f and (f > int(math.log2(n)) or n % 2**f):
                raise ConfigError(f"boft: block_num {n} must be a multiple of 2^{f} for n_butterfly_factor "
                                  f"{self.n_butterfly_factor} ({path}); lower n_butterfly_factor or raise block_num")
            b = d // n
        else:
            b = self.block_size
            if d % b:
                raise ConfigError(f"boft: {path}'s input width {d} is not divisible by block_size {b}; choose a divisor "
                                  f"or exclude the module")
            if f and (d < b * 2**f or d % (b * 2**f)):
                raise ConfigError(f"boft: {path}'s input width {d} is not a multiple of block_size x 2^{f} = "
                                  f"{b * 2**f} (n_butterfly_factor {self.n_butterfly_factor}); lower "
                                  "n_butterfly_factor or block_size")
            n = d // b
        if f and (n % 2 or b % 2):
            raise ConfigError(f"boft: with n_butterfly_factor > 1 the block count ({n}) and size ({b}) of {path} must "
                              "both be even; change block_size / block_num")
        return Butterfly(self.n_butterfly_factor, n, b, float(self.dropout))

    def attach(self, model: nn.Module, name: str) -> None:
        paths = select(model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
                       supported=SUPPORTED, supported_names=("Conv1D",), skip=self.modules_to_save, what="boft",
                       layers_pattern=self.layers_pattern)
        modules = {p: model.get_submodule(p) for p in paths}
        conv1d = [p for p, m in modules.items() if layer_kind(m) is None]
        if conv1d:
            raise ConfigError(f"boft: {conv1d[0]} is a GPT-2 Conv1D layer ({len(conv1d)} selected); peft's BOFT adapts "
                              "nn.Linear and nn.Conv2d only, so such an adapter file could not load in peft. Exclude "
                              "these modules (exclude_modules), or use a method that adapts Conv1D (lora, flora)")
        states = {p: self.butterfly(p, m) for p, m in modules.items()}  # every check before any change
        bias_keys = slots.bias_mode_keys(model, paths, self.bias, "boft", BOFTLayer.adapter_containers)
        for path, module in modules.items():
            layer = layer_kind(module).adopt(module)  # type: ignore[union-attr]
            layer.add_adapter(name, states[path], self.init_weights)
        if bias_keys:
            slots.train_base_tensors(model, name, bias_keys)

    def for_file(self, shapes: Mapping[str, tuple[int, ...]], source: str) -> BOFT:
        """peft without its CUDA extension trains and saves one butterfly factor whatever
        ``boft_n_butterfly_factor`` says (see the module's docstring): a file whose every rotation
        tensor ``(m, N, b, b)`` has ``m = 1`` under a config with more factors is read as what its
        tensors hold, one factor, with a warning; any other disagreement is left to the shape check."""
        factors = [s[0] for k, s in shapes.items() if k.rpartition(".")[2] == "boft_R" and len(s) == 4]
        if self.n_butterfly_factor == 1 or not factors or any(m != 1 for m in factors):
            return self
        warnings.warn(f"{source}: its config says boft_n_butterfly_factor {self.n_butterfly_factor}, but every "
                      "rotation it holds has one factor: it was written by peft without its CUDA extension, which "
                      "trains one factor whatever the config says; loading it as n_butterfly_factor=1, which "
                      "computes what that peft computed", UserWarning, stacklevel=4)
        return dataclasses.replace(self, n_butterfly_factor=1)

    def base_file_key(self, model: nn.Module, key: str, name: str) -> str:
        return wrapped_base_key(model, key, name, BOFTLayer)  # peft wraps adapted layers

    # ------------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        plain = all(not any(ch in t for ch in "*?[:") and t != ALL_LINEAR for t in self.target_modules)
        simple = plain and not self.exclude_modules and self.layers is None
        if simple or model is None:
            targets = list(self.target_modules)
        else:  # peft cannot express globs, types or layer ranges: write the exact module list
            targets = [p for p, _ in self.adapted_layers(model, name)]
        return {
            "peft_type": "BOFT",
            "task_type": None,
            "peft_version": PEFT_FORMAT_VERSION,
            "boft_block_size": self.block_size,
            "boft_block_num": self.block_num,
            "boft_n_butterfly_factor": self.n_butterfly_factor,
            "target_modules": targets,
            "exclude_modules": None,
            "boft_dropout": self.dropout,
            "fan_in_fan_out": False,
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) or None,
            "init_weights": self.init_weights,
            "layers_to_transform": list(self.layers) if self.layers is not None and simple else None,
            "layers_pattern": None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            "auto_mapping": None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BOFT:
        unsupported = {k: v for k, v in config.items() if k not in PEFT_HANDLED and k not in PEFT_METADATA
                       and not k.startswith("peftlab") and v not in (None, False, {}, [], "")}
        if unsupported:
            raise ConfigError(f"this peft BOFT config uses options peftlab's BOFT does not implement: {unsupported}; "
                              "it was not loaded (its outputs would differ from peft's)")
        layers = config.get("layers_to_transform")
        pattern = config.get("layers_pattern")
        return cls(
            block_size=config.get("boft_block_size", 4),
            block_num=config.get("boft_block_num", 0),
            n_butterfly_factor=config.get("boft_n_butterfly_factor", 1),
            target_modules=peft_targets(config.get("target_modules")) or (ALL_LINEAR,),
            exclude_modules=peft_targets(config.get("exclude_modules")),
            layers=tuple(layers) if isinstance(layers, list) else (layers,) if layers is not None else None,
            layers_pattern=(pattern,) if isinstance(pattern, str) else tuple(pattern or ()),
            dropout=float(config.get("boft_dropout", 0.0)),
            bias=config.get("bias", "none"),
            init_weights=config.get("init_weights", True),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
        )


PEFT_HANDLED = frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules",
                          "exclude_modules", "boft_dropout", "fan_in_fan_out", "bias", "modules_to_save",
                          "init_weights", "layers_to_transform", "layers_pattern"})
"""Fields of peft's BOFTConfig that peftlab's BOFT reads (fan_in_fan_out has no effect in peft's
BOFT: it adapts no layer with a transposed weight)."""
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping"})
"""Fields that describe the file, not the adapter's maths."""
