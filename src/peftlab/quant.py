"""Block-wise weight quantization for frozen bases: 4-bit NormalFloat (QLoRA) and 8-bit absmax.

Storage (Dettmers et al. 2023, QLoRA, https://arxiv.org/abs/2305.14314, Sec. 3):

* the weight is flattened and cut into blocks of ``blocksize`` (64) values; each block is scaled
  by its absolute maximum onto [-1, 1] and every value is rounded to the nearest level of a
  codebook: the 16 NormalFloat-4 levels (``nf4``, two codes packed per byte, the even index in
  the high nibble) or 255 evenly spaced levels (``int8``, one code per byte);
* double quantization: the fp32 absmax constants, minus their mean (an fp32 offset), are
  quantized again in blocks of 256 to 8 bits on the signed dynamic-exponent map of Dettmers
  (2015, https://arxiv.org/abs/1511.04561), with one fp32 scale per 256 constants. Cost:
  8/64 + 32/(64*256) = 0.127 bit per weight instead of 0.5;
* a last block shorter than ``blocksize`` gets its own absmax (the weight is zero-padded for
  the computation only, and the padding codes are dropped on dequantization).

This layout is bitsandbytes' (``quantize_4bit(..., quant_type="nf4", compress_statistics=True)``):
for the same weight the codes and constants are identical (``tests/test_qlora.py`` compares them
when bitsandbytes is installed). Codes are always computed here in PyTorch; with
``backend="bitsandbytes"`` (or ``"auto"`` where it imports) the forward pass dequantizes with
bitsandbytes' kernels (CPU or CUDA) where a one-time probe finds them exact
(:func:`bitsandbytes_dequantizes_exactly`, which also says why it is needed); ``"torch"`` is the
pure-PyTorch path, which needs nothing beyond torch.

A quantized layer is the user's own module with its class swapped (``NF4Linear`` is a subclass
of ``nn.Linear``): its ``weight`` becomes a uint8 buffer of codes next to the constant buffers
``weight_absmax`` (and ``weight_absmax_scale``, ``weight_absmax_offset`` with double
quantization), so the state-dict key ``<layer>.weight`` stays. The forward pass dequantizes to
the compute dtype and never keeps the dequantized weight for backward: a custom autograd
function dequantizes again for the input gradient. Quantized weights never train.

Every quantized module answers :meth:`QuantizedModule.quant_info` (logical size, stored bytes,
relative quantization error): ``peftlab.summary`` and the memory estimator read it.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layer import AdapterLayer

NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
"""The 16 NormalFloat-4 levels of the QLoRA paper (App. E): quantiles of N(0, 1) scaled to
[-1, 1], with an exact zero (8 levels for the positive half, 7 for the negative half)."""

KINDS = ("nf4", "int8")
BACKENDS = ("auto", "torch", "bitsandbytes")
DQ_BLOCKSIZE = 256
"""Block size of the double quantization of the absmax constants (QLoRA, Sec. 3)."""
COMPUTE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic-exponent map (256 sorted values) of Dettmers (2015,
    https://arxiv.org/abs/1511.04561): the second quantization of the absmax constants (signed)
    and the 8-bit optimizer states (signed for the first moment, unsigned for the second).

    For exponent ``e`` in 0..6 the fraction takes the midpoints of ``2**e + 1`` (unsigned:
    ``2**(e+1) + 1``) points evenly spaced on [0.1, 1], scaled by ``10**(e - 6)`` (both signs when
    signed); then 0 and 1, and zeros up to 256 entries.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (e if signed else e + 1) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist()  # fp32 products
        if signed:
            values += (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def codebook(kind: str) -> torch.Tensor:
    """The sorted levels of a quantization ``kind`` (``nf4``: 16, ``int8``: 255)."""
    if kind == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    if kind == "int8":
        return torch.arange(-127, 128, dtype=torch.float32) / 127.0
    raise ConfigError(f"quantization kind must be one of {KINDS} (got {kind!r})")


_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    key = (kind, str(device))
    if key not in _CACHE:
        _CACHE[key] = (dynamic_map() if kind == "dynamic" else dynamic_map(signed=False) if kind == "udynamic"
                       else codebook(kind)).to(device)
    return _CACHE[key]


def _prefix_ends(bits: int) -> torch.Tensor:
    """(2**bits, 2) fp32: the smallest and largest float whose top ``bits`` bits are each prefix,
    as a [low, high] pair; NaN and infinite patterns become +-inf by their sign bit."""
    shift = 32 - bits
    first = torch.arange(2**bits, dtype=torch.int64) << shift
    ends = torch.stack((first, first | ((1 << shift) - 1)), dim=1)
    negative = ends >= 2**31
    ends = torch.where(negative, ends - 2**32, ends).to(torch.int32).view(torch.float32)
    ends = torch.where(ends.isnan(), torch.where(negative, -math.inf, math.inf), ends)
    return ends.sort(dim=1).values


@dataclass(frozen=True)
class NearestLevel:
    """Rounding to the nearest of a sorted table of levels by two lookups instead of a search.

    The top ``32 - shift`` bits of an fp32 value (sign, exponent, leading mantissa bits) cut the
    floats into intervals; ``start[prefix]`` is the code of the interval's lowest value, and the
    number of bits is chosen so that no interval holds more than one midpoint between levels. The
    code of ``x`` is then ``start[prefix] + (x > bounds[start[prefix]])``: exactly
    ``torch.bucketize(x, midpoints)`` (a value on a midpoint takes the lower level), in a few
    elementwise passes instead of a binary search per value (the dynamic 8-bit map: 2^16 entries,
    about 20x faster than ``bucketize`` on one CPU thread).
    """

    shift: int
    start: torch.Tensor
    """int32, one code per prefix."""
    bounds: torch.Tensor
    """fp32 midpoints between consecutive levels, then +inf."""

    @classmethod
    def build(cls, levels: torch.Tensor, max_bits: int = 20) -> NearestLevel:
        levels = levels.detach().float().cpu()
        mids = (levels[:-1] + levels[1:]) / 2
        for bits in range(8, max_bits + 1):
            ends = _prefix_ends(bits).clamp(float(levels[0]), float(levels[-1]))
            low, high = (torch.bucketize(e.contiguous(), mids) for e in ends.unbind(1))
            if int((high - low).max()) <= 1:
                return cls(32 - bits, low.to(torch.int32), torch.cat((mids, torch.tensor([math.inf]))))
        raise ConfigError(f"these levels lie too close together for a 2**{max_bits}-entry lookup; round with "
                          "torch.bucketize on their midpoints instead")

    def to(self, device: torch.device) -> NearestLevel:
        return NearestLevel(self.shift, self.start.to(device), self.bounds.to(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of the fp32 tensor ``x`` (flattened)."""
        flat = x.reshape(-1)
        prefix = flat.view(torch.int32).bitwise_right_shift(self.shift).bitwise_and_((1 << (32 - self.shift)) - 1)
        code = self.start.index_select(0, prefix)
        code += flat > self.bounds.index_select(0, code)
        return code.to(torch.uint8)


_ROUNDERS: dict[tuple[str, str], NearestLevel] = {}


def _rounder(levels: torch.Tensor | str, device: torch.device) -> NearestLevel:
    """The :class:`NearestLevel` of a table kind (``nf4``, ``int8``, ``dynamic``, ``udynamic``) or of
    an explicit table, cached per device."""
    key = (levels if isinstance(levels, str) else levels.detach().float().cpu().numpy().tobytes().hex(), str(device))
    if key not in _ROUNDERS:
        table = _table(levels, torch.device("cpu")) if isinstance(levels, str) else levels
        _ROUNDERS[key] = NearestLevel.build(table).to(device)
    return _ROUNDERS[key]


def quantize_blockwise(x: torch.Tensor, levels: torch.Tensor | str,
                       blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round each block of ``blocksize`` values of ``x`` (flattened), scaled by its absmax, to the
    nearest of ``levels`` (a sorted table, or the name of one: ``nf4``, ``int8``, ``dynamic``,
    ``udynamic``). Returns (uint8 code per value, fp32 absmax per block)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = max(1, math.ceil(n / blocksize))
    padded = (flat if n == blocks * blocksize else F.pad(flat, (0, blocks * blocksize - n))).view(blocks, blocksize)
    low, high = torch.aminmax(padded, dim=1)
    absmax = torch.maximum(high, low.neg())
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)[:n]
    return _rounder(levels, flat.device)(scaled), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, blocksize: int,
                         n: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` (fp32, ``n`` values)."""
    values = levels.to(codes.device).index_select(0, codes.reshape(-1).int())
    blocks = absmax.numel()
    if n != blocks * blocksize:
        values = F.pad(values, (0, blocks * blocksize - n))
    values = values.view(blocks, blocksize) * absmax.float().unsqueeze(1)
    return values.reshape(-1)[:n]


def pack_nibbles(codes: torch.Tensor, pad_code: int = 7) -> torch.Tensor:
    """Two 4-bit codes per byte, the even index in the high nibble (bitsandbytes' order); an odd
    count is padded with ``pad_code`` (NF4's exact zero)."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=pad_code)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n]


@dataclass(frozen=True)
class QuantConfig:
    """How a weight is stored. See the module docstring."""

    kind: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"
    """Dtype of the dequantized weight and the matmul: ``auto`` (the input's dtype), ``fp32``,
    ``bf16``, ``fp16``."""
    backend: str = "auto"
    """``auto`` (bitsandbytes where it imports, else ``torch``), ``torch`` or ``bitsandbytes``."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"quantization kind must be one of {KINDS} (got {self.kind!r})")
        if not isinstance(self.blocksize, int) or self.blocksize < 2 or self.blocksize & (self.blocksize - 1):
            raise ConfigError(f"blocksize must be a power of two >= 2 (got {self.blocksize!r}); QLoRA uses 64")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)} (got {self.compute_dtype!r})")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS} (got {self.backend!r})")
        if self.backend == "bitsandbytes" and not bitsandbytes_available():
            raise ConfigError("backend='bitsandbytes' but bitsandbytes does not import here; "
                              "`pip install bitsandbytes` or use backend='torch' (pure PyTorch, same codes)")

    def resolved_backend(self) -> str:
        """The backend asked for, as far as the settings decide it: bitsandbytes serves NF4 (with
        ``auto``, where it imports); everything else runs on the pure-PyTorch path. Per layer,
        ``auto`` also needs whole blocks and an exact bitsandbytes kernel on the layer's device
        (:func:`bitsandbytes_dequantizes_exactly`), else that layer dequantizes in PyTorch."""
        if self.backend == "torch" or self.kind != "nf4":
            return "torch"
        if self.backend == "auto" and not bitsandbytes_available():
            return "torch"
        return "bitsandbytes"


_KERNELS_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""What bitsandbytes (0.49+) logs at import on AVX512-BF16 CPUs when the optional ``kernels``
package is missing. That kernel serves only bitsandbytes' fused 4-bit CPU matmul, which peftlab
never calls, so the note is dropped (that record only) while peftlab imports bitsandbytes."""


class _DropKernelsNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_KERNELS_NOTE)
                    and "No module named 'kernels'" in record.getMessage())


_BNB: dict[str, Any] = {}


def import_bitsandbytes() -> Any:
    """``bitsandbytes``, imported once, or None where it does not import. The one place peftlab
    imports it: the note about the missing optional ``kernels`` package is filtered here."""
    if "module" not in _BNB:
        note = _DropKernelsNote()
        logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        logger.addFilter(note)
        try:
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
        except Exception:  # noqa: BLE001 (a broken install raises anything; fall back to torch)
            bitsandbytes = None
        finally:
            logger.removeFilter(note)
        _BNB["module"] = bitsandbytes
    return _BNB["module"]


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports (it runs NF4 on CPU and CUDA since 0.46)."""
    return import_bitsandbytes() is not None


_EXACT: dict[tuple[str, int, torch.dtype], bool] = {}


def bitsandbytes_dequantizes_exactly(device: torch.device, blocksize: int,
                                     dtype: torch.dtype = torch.float32) -> bool:
    """Whether bitsandbytes' NF4 dequantization on ``device`` gives exactly the pure-PyTorch
    ``level[code] * absmax`` (rounded once to ``dtype``) on a 3-block probe, called the way peftlab
    calls it. Checked once per device type, block size and dtype (a few microseconds).

    Why: bitsandbytes 0.50's CPU kernel, on its vectorized path (row length a multiple of 32),
    reads the absmax of row ``r``, column ``c`` at block ``r * (cols // blocksize) + c //
    blocksize``: the flattened weight's block only when the row length is a multiple of
    ``blocksize`` (a 64 x 96 weight: 88% of the values scaled by another block's absmax).
    The codes are blocked over the flattened weight, so peftlab hands the kernel rows of exactly
    one block; this probe checks that the installed kernel is then exact.
    """
    key = (torch.device(device).type, blocksize, dtype)
    if key not in _EXACT:
        g = torch.Generator().manual_seed(0)
        n = 3 * blocksize
        codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        absmax = torch.rand(3, generator=g) + 0.5
        want = dequantize_blockwise(codes, absmax, codebook("nf4"), blocksize, n).to(dtype)
        try:
            got = _bnb_dequantize_4bit(pack_nibbles(codes).to(device), absmax.to(device), blocksize, n, dtype)
            _EXACT[key] = bool(torch.equal(got.cpu(), want))
        except Exception:  # noqa: BLE001 (no kernel for this device or dtype: not usable)
            _EXACT[key] = False
    return _EXACT[key]


@dataclass(frozen=True)
class QuantInfo:
    """What a quantized module stores (read by ``peftlab.summary`` and the memory estimator)."""

    kind: str
    numel: int
    """Logical number of weights."""
    code_bytes: int
    constant_bytes: int
    rel_error: float
    """||W - dequant(quant(W))|| / ||W|| measured when quantizing (nan on the meta device)."""

    @property
    def bytes_per_param(self) -> float:
        return (self.code_bytes + self.constant_bytes) / self.numel


class QuantizedModule(nn.Module):
    """Mixin of quantized layers (class swap, like adapted layers): the weight as codes and
    constants in buffers, dequantized on the fly."""

    class_prefix: ClassVar[str] = "Quant"
    """Prefix of the swapped class's name: ``Quant`` + ``Linear`` -> ``QuantLinear``."""
    unquantized_class: ClassVar[type[nn.Module]]
    """The module's class before quantization (set on the swapped class)."""
    peftlab_quant: QuantConfig
    peftlab_quant_shape: tuple[int, ...]
    peftlab_quant_dtype: torch.dtype
    peftlab_quant_error: float

    # ---------------------------------------------------------------------- construction
    @classmethod
    def convert(cls, module: nn.Module, config: QuantConfig) -> QuantizedModule:
        """Quantize ``module``'s weight in place (works on the meta device: shapes only)."""
        w = module.weight
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise ConfigError(f"{type(module).__name__} has no floating-point weight to quantize")
        if w.requires_grad and w.grad is not None:
            raise ConfigError("a quantized weight cannot train; freeze it (requires_grad_(False)) first")
        new_cls = _swapped(cls, type(module))
        shape, dtype = tuple(w.shape), w.dtype
        codes, absmax, extra, err = _quantize(w.detach(), config)
        del module.weight
        module.__class__ = new_cls
        q: QuantizedModule = module  # type: ignore[assignment]
        q.peftlab_quant, q.peftlab_quant_shape, q.peftlab_quant_dtype, q.peftlab_quant_error = config, shape, dtype, err
        q.register_buffer("weight", codes)
        q.register_buffer("weight_absmax", absmax)
        for k, v in extra.items():
            q.register_buffer(k, v)
        return q

    # ---------------------------------------------------------------------- reading
    def quant_info(self) -> QuantInfo:
        const = sum(b.numel() * b.element_size() for n, b in self.storage_tensors().items()
                    if n.startswith("weight_absmax"))
        return QuantInfo(self.peftlab_quant.kind, math.prod(self.peftlab_quant_shape),
                         self.weight.numel() * self.weight.element_size(), const, self.peftlab_quant_error)

    def storage_tensors(self) -> dict[str, torch.Tensor]:
        """The codes and constants (``weight``, ``weight_absmax*``): buffers, or frozen parameters
        after :func:`shardable`."""
        tensors = dict(self.named_buffers(recurse=False)) | dict(self.named_parameters(recurse=False))
        return {k: v for k, v in tensors.items() if k == "weight" or k.startswith("weight_absmax")}

    def stored_parameters(self) -> int:
        """Weights held as codes (``peftlab.summary`` counts them as base parameters)."""
        return math.prod(self.peftlab_quant_shape)

    def summary_columns(self) -> dict[str, float | str]:
        """``peftlab.summary`` columns: storage kind, bytes per weight, relative quantization error."""
        info = self.quant_info()
        return {"quant": info.kind, "bytes/param": info.bytes_per_param, "quant_rel_err": info.rel_error}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the dtype it had before quantization)."""
        return _dequantize(self, dtype or self.peftlab_quant_dtype)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        fixed = COMPUTE_DTYPES[self.peftlab_quant.compute_dtype]
        return fixed if fixed is not None else x.dtype if x.is_floating_point() else self.peftlab_quant_dtype

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A full-precision checkpoint of the unquantized layer loads too: its weight is quantized here.
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.is_floating_point() and prefix + "weight_absmax" not in state_dict:
            codes, absmax, extra, err = _quantize(w.to(self.weight.device), self.peftlab_quant)
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"], state_dict[prefix + "weight_absmax"] = codes, absmax
            state_dict.update({prefix + k: v for k, v in extra.items()})
            self.peftlab_quant_error = err
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        c = self.peftlab_quant
        return (f"{super().extra_repr()}, quant={c.kind}, blocksize={c.blocksize}, double_quant={c.double_quant}, "
                f"backend={c.resolved_backend()}")


class QuantizedLinear(QuantizedModule):
    """``nn.Linear`` with a quantized frozen weight."""


    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = self.compute_dtype(x)
        out = _DequantMatmul.apply(x.to(dtype), self, dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype) if x.is_floating_point() else out


class QuantizedEmbedding(QuantizedModule):
    """``nn.Embedding`` with a quantized frozen table (only on request: embeddings are usually
    left in full precision)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        fixed = COMPUTE_DTYPES[self.peftlab_quant.compute_dtype]
        w = self.dequantized_weight(fixed or self.peftlab_quant_dtype)
        return F.embedding(ids, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


class _DequantMatmul(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantized in forward and again in backward: the dequantized weight
    is never kept between the two (what makes QLoRA's memory low)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedModule, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, dtype
        return x @ _dequantize(layer, dtype).T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ _dequantize(ctx.layer, ctx.dtype), None, None


_SWAPPED: dict[tuple[type, type], type] = {}


def _swapped(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _SWAPPED:
        name = f"{mixin.class_prefix}{base.__name__}"  # type: ignore[attr-defined]
        cls = type(name, (mixin, base), {"unquantized_class": base, "__module__": __name__})
        cls.__qualname__ = name
        setattr(sys.modules[__name__], name, cls)  # importable, so torch.save(model) pickles it
        _SWAPPED[key] = cls
    return _SWAPPED[key]


# ------------------------------------------------------------------------------ kernels
def _quantize(w: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]:
    """(codes, absmax or its 8-bit codes, double-quantization buffers, relative error)."""
    n = w.numel()
    blocks = max(1, math.ceil(n / config.blocksize))
    if w.device.type == "meta":
        codes = torch.empty((n + 1) // 2 if config.kind == "nf4" else n, dtype=torch.uint8, device="meta")
        extra = {}
        if config.double_quant:
            absmax = torch.empty(blocks, dtype=torch.uint8, device="meta")
            extra = {"weight_absmax_scale": torch.empty(math.ceil(blocks / DQ_BLOCKSIZE), device="meta"),
                     "weight_absmax_offset": torch.empty(1, device="meta")}
        else:
            absmax = torch.empty(blocks, device="meta")
        return codes, absmax, extra, float("nan")
    codes, absmax = quantize_blockwise(w, config.kind, config.blocksize)  # bitsandbytes' codes, byte for byte
    extra: dict[str, torch.Tensor] = {}
    if config.double_quant:
        offset = absmax.mean()
        absmax, scale = quantize_blockwise(absmax - offset, "dynamic", DQ_BLOCKSIZE)
        extra = {"weight_absmax_scale": scale, "weight_absmax_offset": offset.reshape(1)}
    if config.kind == "nf4":
        codes = pack_nibbles(codes)
    absmax_f = _absmax(absmax, extra, blocks)
    levels = _table(config.kind, w.device)
    raw = unpack_nibbles(codes, n) if config.kind == "nf4" else codes
    back = dequantize_blockwise(raw, absmax_f, levels, config.blocksize, n)
    ref = w.detach().float().reshape(-1)
    err = float((back - ref).norm() / ref.norm().clamp(min=1e-30))
    return codes, absmax, extra, err


def roundtrip(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """``dequantize(quantize(w))`` in fp32, shaped like ``w``: what a layer quantized with
    ``config`` from ``w`` computes with (LoftQ fits its low-rank factors to ``w`` minus this)."""
    codes, absmax, extra, _ = _quantize(w, config)
    n = w.numel()
    absmax_f = _absmax(absmax, extra, max(1, math.ceil(n / config.blocksize)))
    raw = unpack_nibbles(codes, n) if config.kind == "nf4" else codes
    return dequantize_blockwise(raw, absmax_f, _table(config.kind, w.device), config.blocksize, n).view(w.shape)


def _absmax(absmax: torch.Tensor, extra: dict[str, torch.Tensor], blocks: int) -> torch.Tensor:
    if "weight_absmax_offset" not in extra:
        return absmax.float()
    dyn = _table("dynamic", absmax.device)
    return dequantize_blockwise(absmax, extra["weight_absmax_scale"].float(), dyn, DQ_BLOCKSIZE, blocks) \
        + extra["weight_absmax_offset"].float()


def _dequantize(layer: QuantizedModule, dtype: torch.dtype) -> torch.Tensor:
    c = layer.peftlab_quant
    shape = layer.peftlab_quant_shape
    n = math.prod(shape)
    blocks = max(1, math.ceil(n / c.blocksize))
    extra = {k: getattr(layer, k) for k in ("weight_absmax_scale", "weight_absmax_offset") if hasattr(layer, k)}
    absmax = _absmax(layer.weight_absmax, extra, blocks)
    if _dequantizes_with_bitsandbytes(c, layer.weight.device, n, dtype):
        return _bnb_dequantize_4bit(layer.weight, absmax, c.blocksize, n, dtype).view(shape)
    raw = unpack_nibbles(layer.weight, n) if c.kind == "nf4" else layer.weight
    return dequantize_blockwise(raw, absmax, _table(c.kind, raw.device), c.blocksize, n).view(shape).to(dtype)


def _dequantizes_with_bitsandbytes(c: QuantConfig, device: torch.device, n: int, dtype: torch.dtype) -> bool:
    """bitsandbytes serves whole NF4 blocks on devices where its kernel is exact; a weight with a
    short last block dequantizes in PyTorch. ``backend='bitsandbytes'`` on an inexact kernel is an
    error rather than a silently wrong weight."""
    if c.resolved_backend() != "bitsandbytes" or device.type == "meta" or n % c.blocksize:
        return False
    if bitsandbytes_dequantizes_exactly(device, c.blocksize, dtype):
        return True
    if c.backend == "bitsandbytes":
        raise ConfigError(f"bitsandbytes {getattr(import_bitsandbytes(), '__version__', '?')} does not dequantize "
                          f"NF4 exactly on {device.type} with blocksize={c.blocksize} in {dtype} (probe in "
                          "peftlab.quant.bitsandbytes_dequantizes_exactly); use backend='auto' or 'torch' (same "
                          "codes, exact)")
    return False


def _bnb_dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' NF4 dequantization of ``n`` values (``n`` a multiple of ``blocksize``), given
    as rows of one block each: its CPU kernel blocks each row on its own, and a row of exactly one
    block is the same block as in the flattened layout. Returns ``n`` values, flat."""
    bnbf = import_bitsandbytes().functional
    state = bnbf.QuantState(absmax=absmax.float().contiguous(), shape=torch.Size((n // blocksize, blocksize)),
                            dtype=dtype, blocksize=blocksize, code=bnbf.get_4bit_type("nf4", device=packed.device),
                            quant_type="nf4")
    return bnbf.dequantize_4bit(packed.reshape(-1, 1), state).reshape(-1)


# ------------------------------------------------------------------------------ model level
def quantize(model: nn.Module, targets: Iterable[str] = ("all-linear",), *, kind: str = "nf4", blocksize: int = 64,
             double_quant: bool = True, compute_dtype: str = "auto", backend: str = "auto",
             exclude: Iterable[str] = (), embeddings: bool = False, head: bool = False,
             device: str | None = None) -> list[str]:
    """Quantize the frozen weights of ``model``'s linear layers in place; return their paths.

    Args:
        targets: Target spec (``peftlab.core.targets``); default every linear layer but the head.
        kind: ``nf4`` (4-bit NormalFloat) or ``int8`` (8-bit absmax).
        blocksize, double_quant, compute_dtype, backend: see :class:`QuantConfig`.
        embeddings: Also quantize ``nn.Embedding`` tables (not tied to the head).
        head: Also quantize the output head (when it is an untied ``nn.Linear``).
        device: ``"cuda"`` moves the model to the GPU first (bitsandbytes' CUDA kernels then serve
            it); an error without a GPU.

    Layers already quantized with the same settings are kept; with other settings it is an error.
    """
    from peftlab.core.targets import _output_head_paths, select

    config = QuantConfig(kind, blocksize, double_quant, compute_dtype, backend)
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA kernels were requested (device='cuda') but no GPU is available here; quantize on "
                          "the CPU instead (device=None: bitsandbytes' CPU kernels or the pure-PyTorch path)")
    if device is not None:
        model.to(device)
    paths = list(select(model, tuple(targets), exclude=tuple(exclude), supported=(nn.Linear,),
                        skip=(), what="quantize"))
    heads = _output_head_paths(model)
    if head:
        paths += [p for p in heads if isinstance(model.get_submodule(p), nn.Linear) and p not in paths]
    if embeddings:
        paths += [p for p, m in model.named_modules() if isinstance(m, nn.Embedding) and p not in paths]
    tied = _tied(model)
    out = []
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, QuantizedModule):
            if module.peftlab_quant != config:
                raise ConfigError(f"{path} is already quantized with {module.peftlab_quant}, not {config}; "
                                  "quantize a fresh copy of the base model instead")
            out.append(path)
            continue
        if id(module.weight) in tied:
            if path in heads or isinstance(module, nn.Embedding):
                warnings.warn(f"{path} shares its weight with another module (tied embeddings); left unquantized",
                              stacklevel=2)
                continue
        kind_cls = QuantizedEmbedding if isinstance(module, nn.Embedding) else QuantizedLinear
        module.weight.requires_grad_(False)
        kind_cls.convert(module, config)
        out.append(path)
    return out


def _tied(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def shardable(model: nn.Module) -> int:
    """Make the quantized storage of every quantized layer frozen ``nn.Parameter``s (uint8 codes,
    constants), in place, so that FSDP2's ``fully_shard`` splits them over the ranks: it shards
    parameters, each on its own along dim 0, and gathers mixed dtypes as bytes, so the codes keep
    their uint8 dtype (FSDP1's flat parameters needed one float dtype; FSDP2 does not). One-element
    constants stay buffers. State-dict keys do not change. Returns the number of tensors moved."""
    moved = 0
    for _, q in quantized_modules(model):
        for key, t in list(q.named_buffers(recurse=False)):
            if (key == "weight" or key.startswith("weight_absmax")) and t.numel() > 1:
                del q._buffers[key]
                q.register_parameter(key, nn.Parameter(t, requires_grad=False))
                moved += 1
    return moved


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedModule]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, QuantizedModule)]


def storage(model: nn.Module) -> dict[str, float]:
    """Totals over the quantized modules: weights, code bytes, constant bytes, bytes per weight."""
    infos = [m.quant_info() for _, m in quantized_modules(model)]
    numel = sum(i.numel for i in infos)
    codes = sum(i.code_bytes for i in infos)
    const = sum(i.constant_bytes for i in infos)
    return {"weights": numel, "code_bytes": codes, "constant_bytes": const,
            "bytes_per_param": (codes + const) / numel if numel else 0.0}


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give every quantized module of ``model`` a plain ``weight`` parameter again (in ``dtype``,
    default the dtype it had before quantization) and its original class, in place."""
    for _, m in quantized_modules(model):
        if isinstance(m, AdapterLayer):
            raise ConfigError("detach the adapters (or merge them with qlora.merge_dequantized) before dequantizing")
        w = m.dequantized_weight(dtype)
        for k in ("weight", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset"):
            m._buffers.pop(k, None)
            m._parameters.pop(k, None)
        for k in ("peftlab_quant", "peftlab_quant_shape", "peftlab_quant_dtype", "peftlab_quant_error"):
            m.__dict__.pop(k, None)
        m.__class__ = type(m).unquantized_class
        m.weight = nn.Parameter(w, requires_grad=False)
    return model
