"""QLoRA: LoRA on a frozen base stored in 4-bit NormalFloat (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314).

``attach`` quantizes the linear layers it targets (``peftlab.quant``: NF4 in blocks of 64 with
double-quantized constants, or 8-bit absmax) and puts LoRA adapters on them; the adapters are
peftlab's LoRA layers (this layer kind extends them), computed in the compute dtype. Heads and
embeddings stay in full precision (the default targets are every linear layer but the head).

The quantization is a property of the *base*: it stays after ``detach`` (the full-precision
weights are gone; that is the memory saving). The adapter file is a plain peft LoRA adapter
(``peft_type: LORA``; peft loads it onto a bitsandbytes-quantized base), and the quantization
settings travel in ``adapter_config.json`` (``peftlab_quantization``, which peft ignores with a
warning) and in the file header. Loading onto an unquantized base quantizes it, with a note;
onto a model of another architecture or shape it is an error.

A QLoRA adapter never merges into 4-bit weights (``peftlab.merge`` refuses):
:func:`merge_dequantized` returns a copy whose weights are dequantized, merged in fp32 and stored
in bf16/fp16/fp32, optionally re-quantized, and reports the output difference.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layer import adapter_layers
from peftlab.core.transaction import before_write
from peftlab.core.method import register
from peftlab.core.targets import select
from peftlab.methods.lora import LoRA, LoRALinearLayer, pattern_value
from peftlab.quant import (
    BACKENDS,
    COMPUTE_DTYPES,
    KINDS,
    QuantConfig,
    QuantizedModule,
    QuantizedLinear,
    dequantize,
    quantize,
    roundtrip,
    shardable,
)

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


class QLoRALinearLayer(LoRALinearLayer):
    """LoRA on a quantized ``nn.Linear`` (:class:`peftlab.quant.QuantizedLinear`)."""

    owner_method = "qlora"
    class_prefix = "QLoRA"

    def _shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: str) -> None:
        super().add_adapter(name, r, alpha, dropout, rslora, init)
        dtype = COMPUTE_DTYPES[self.peftlab_quant.compute_dtype] or self.peftlab_quant_dtype  # type: ignore[attr-defined]
        self.lora_A[name].to(dtype)
        self.lora_B[name].to(dtype)


@register("qlora")
@dataclass(frozen=True)
class QLoRA(LoRA):
    """LoRA on a 4-bit NF4 (or 8-bit) quantized frozen base. Not mergeable in place (see
    :func:`merge_dequantized`); identity at init relative to the quantized base."""

    quant_type: str = "nf4"
    """``nf4`` (4-bit NormalFloat, QLoRA) or ``int8`` (8-bit absmax)."""
    blocksize: int = 64
    double_quant: bool = True
    """Quantize the absmax constants to 8 bits (0.127 instead of 0.5 bit per weight)."""
    compute_dtype: str = "auto"
    """Dtype of the dequantized weights, the matmuls and the adapters: ``auto`` (the base
    weights' dtype), ``bf16`` (the paper's), ``fp16``, ``fp32``."""
    backend: str = "auto"
    """``auto``: bitsandbytes' dequantization where it imports and is exact on the device (checked
    once, ``peftlab.quant.bitsandbytes_dequantizes_exactly``), else pure PyTorch (same codes)."""
    quantize_also: tuple[str, ...] = ()
    """More modules to quantize without adapters (target entries), e.g. ``("all-linear",)``."""
    loftq_iter: int = 1
    """With ``init='loftq'``: alternating steps of LoftQ (quantize ``W - s B A``, refit ``B A`` to
    the quantization error); 1-5 in the paper."""
    optimizer: str = "adamw"
    """What the lab trains with: ``adamw``, ``adamw8bit`` (``peftlab.optim.make_adamw8bit``:
    bitsandbytes' where it works on the device, CPU included, else peftlab's, any device) or
    ``paged_adamw8bit`` (bitsandbytes, CUDA only)."""

    mergeable: ClassVar[bool] = False
    merge_hint: ClassVar[str] = ("QLoRA never merges into 4-bit weights; use peftlab.methods.qlora.merge_dequantized("
                                 "model, dtype=torch.bfloat16) for a dequantized merged copy")
    suggested_lr: ClassVar[float] = 1e-3
    typical_score: ClassVar[float | None] = 0.994
    typical_score_source: ClassVar[str] = ("Dettmers et al. 2023 (QLoRA), Table 3: RoBERTa-large GLUE 88.6 with NF4 + "
                                           "double quantization vs 88.6 for 16-bit LoRA; Table 4 MMLU 5-shot: LLaMA-7B "
                                           "NF4+DQ 38.6 vs bf16 38.4; full fine-tuning on GLUE 89.1 -> 88.6/89.1")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_type not in KINDS:
            raise ConfigError(f"qlora: quant_type must be one of {KINDS} (got {self.quant_type!r})")
        if self.backend not in BACKENDS:
            raise ConfigError(f"qlora: backend must be one of {BACKENDS} (got {self.backend!r})")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"qlora: optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        self.quant_config()  # validates blocksize, compute_dtype, backend availability

    def check_init(self) -> None:
        """QLoRA's initialisations: LoRA's random ones and LoftQ (Li et al. 2023,
        https://arxiv.org/abs/2310.08659), which picks the quantized base and the factors together
        so that ``dequant(Q) + s B A`` is closer to the full-precision ``W`` than ``dequant(Q)``."""
        if self.init in ("pissa", "olora") or self.init.startswith("pissa_niter_"):
            raise ConfigError(f"qlora: init={self.init!r} is not implemented for a quantized base (it would quantize "
                              "the residual); use init='loftq', or lora with that init")
        if self.init not in ("default", "gaussian", "random", "loftq"):
            raise ConfigError(f"qlora: init must be 'default', 'gaussian', 'random' or 'loftq' (got {self.init!r})")
        if self.loftq_iter < 1:
            raise ConfigError(f"qlora: loftq_iter must be >= 1 (got {self.loftq_iter})")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.quant_type, self.blocksize, self.double_quant, self.compute_dtype, self.backend)

    # ------------------------------------------------------------------------------- base
    def _targets(self, model: nn.Module) -> list[str]:
        return select(model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
                      supported=(nn.Linear,), skip=self.modules_to_save, what="qlora")

    def prepare_base(self, model: nn.Module) -> nn.Module:
        """Quantize the targeted linear layers (and ``quantize_also``) that are not yet quantized."""
        paths = self._targets(model)
        before = {p for p, m in model.named_modules() if isinstance(m, QuantizedModule)}
        c = self.quant_config()
        kw = {"kind": c.kind, "blocksize": c.blocksize, "double_quant": c.double_quant,
              "compute_dtype": c.compute_dtype, "backend": c.backend}
        quantize(model, paths, **kw)
        if self.quantize_also:
            quantize(model, self.quantize_also, exclude=self.modules_to_save, **kw)
        for p, m in model.named_modules():
            if isinstance(m, QuantizedModule) and p not in before:
                m.peftlab_quantized_here = True  # type: ignore[attr-defined]
        return model

    def attach(self, model: nn.Module, name: str) -> None:
        paths = self._targets(model)
        for p in paths:  # check before changing anything
            m = model.get_submodule(p)
            if isinstance(m, QuantizedModule) and m.peftlab_quant != self.quant_config():
                raise ConfigError(f"qlora: {p} is already quantized with {m.peftlab_quant}, not with this adapter's "
                                  f"{self.quant_config()}; use the same quantization settings or a fresh base")
        bias_keys = self._bias_keys(model, paths)
        factors = self._loftq(model, paths) if self.init == "loftq" else {}
        self.prepare_base(model)
        for path in paths:
            layer = QLoRALinearLayer.adopt(model.get_submodule(path))
            r = pattern_value(self.rank_pattern, path, self.r)
            alpha = pattern_value(self.alpha_pattern, path, self.alpha)
            layer.add_adapter(name, r, alpha, self.dropout, self.rslora,  # type: ignore[attr-defined]
                              "default" if self.init == "loftq" else self.init)
            if path in factors:
                with torch.no_grad():
                    a, b = layer.factor_tensors(name)  # type: ignore[attr-defined]
                    a.copy_(factors[path][0].to(a.dtype))
                    b.copy_(factors[path][1].to(b.dtype))
        if bias_keys:
            from peftlab.core import slots

            slots.train_base_tensors(model, name, bias_keys)

    @torch.no_grad()
    def _loftq(self, model: nn.Module, paths: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """LoftQ: ``Q_t = quant(W - s B_{t-1} A_{t-1})`` and ``s B_t A_t`` the best rank-r fit (SVD) of
        ``W - dequant(Q_t)``, from ``B_0 A_0 = 0``. Writes the last ``W - s B A`` that was quantized
        into each weight (``prepare_base`` then quantizes exactly it) and returns ``{path: (A, B)}``.
        Needs the full-precision weights: an already quantized layer is an error."""
        from peftlab.methods._lowrank import LowRank

        config = self.quant_config()
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path in paths:
            if isinstance(model.get_submodule(path), QuantizedModule):
                raise ConfigError(f"qlora: init='loftq' fits the quantization to the full-precision weights, but {path} "
                                  "is already quantized; attach to a fresh, unquantized copy of the base model")
        for path in paths:
            w = model.get_submodule(path).weight
            if w.device.type == "meta":
                continue
            r = pattern_value(self.rank_pattern, path, self.r)
            s = LowRank(r, pattern_value(self.alpha_pattern, path, self.alpha), self.rslora).scale
            full = w.float()
            update = torch.zeros_like(full)
            for _ in range(self.loftq_iter):
                quantized = (full - update).to(w.dtype)
                u, sv, vh = torch.linalg.svd(full - roundtrip(quantized, config), full_matrices=False)
                root = (sv[:r] / s).sqrt()
                a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
                update = (b @ a) * s
            before_write(w)
            w.copy_(quantized)
            out[path] = (a, b)
        return out

    def load_file_tensors(self, model: nn.Module, name: str,
                          values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        fresh = [p for p, m in model.named_modules() if getattr(m, "peftlab_quantized_here", False)]
        if fresh:
            warnings.warn(f"the base model was not quantized: peftlab quantized {len(fresh)} layer(s) to "
                          f"{self.quant_type} now (the adapter was trained on a quantized base; outputs match it "
                          "when the base weights are the same)", stacklevel=3)
        for p in fresh:
            model.get_submodule(p).__dict__.pop("peftlab_quantized_here", None)
        super().load_file_tensors(model, name, values)

    def prepare_sharding(self, model: nn.Module) -> None:
        """Under FSDP2 the codes and constants become frozen parameters, so each rank keeps only
        its share of the 4-bit base (gathered per block for its forward and backward)."""
        shardable(model)

    # ------------------------------------------------------------------------------- optimizer
    def make_optimizer(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                       grad_accum: int = 1) -> torch.optim.Optimizer | None:
        """None for plain AdamW (the trainer's default), else the chosen 8-bit AdamW."""
        if self.optimizer == "adamw":
            return None
        from peftlab.optim import make_adamw8bit, paged_adamw8bit

        from torch.distributed.tensor import DTensor

        params = [p for p in model.parameters() if p.requires_grad]
        if any(isinstance(p, DTensor) for p in params):
            raise ConfigError(f"qlora: optimizer={self.optimizer!r} does not step FSDP-sharded parameters; use "
                              "optimizer='adamw' with --strategy fsdp, or --strategy ddp")
        if self.optimizer == "paged_adamw8bit":
            return paged_adamw8bit(params, lr=lr, weight_decay=weight_decay)
        return make_adamw8bit(params, lr=lr, weight_decay=weight_decay)

    # ------------------------------------------------------------------------------- config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        lora_options = {f.name for f in dataclasses.fields(LoRA)}
        return {**super().to_config(model, name), "peftlab_method": self.method_name,
                "peftlab_quantization": {k: v for k, v in self.options().items() if k not in lora_options}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QLoRA:
        init = config.get("init_lora_weights")
        plain = {k: v for k, v in config.items() if not k.startswith("peftlab_") and k != "loftq_config"}
        if init == "loftq":
            plain["init_lora_weights"] = True
        base = LoRA.from_config(plain)
        options = {f.name: getattr(base, f.name) for f in dataclasses.fields(LoRA)}
        if init == "loftq":
            options["init"] = "loftq"
        return cls.from_options({**options, **dict(config.get("peftlab_quantization") or {})})


def merge_dequantized(model: nn.Module, *, dtype: torch.dtype = torch.bfloat16, requantize: bool = False,
                      inputs: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` with the active QLoRA adapters merged into dequantized weights.

    Each adapted weight is dequantized, ``W + s B A`` is computed in fp32 and stored in ``dtype``
    (the whole copy is cast to ``dtype``); ``requantize=True`` then quantizes the merged weights
    again with the adapter's settings. ``model`` is not changed.

    Returns:
        (merged model without adapters, report). The report gives the number of merged layers and,
        when ``inputs`` (model keyword arguments) are given, the largest absolute and the relative
        difference between the adapted model's output and the merged copy's.
    """
    from peftlab import api
    from peftlab.core import slots

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"merge_dequantized: dtype must be torch.float32, bfloat16 or float16 (got {dtype})")
    adapters = api.adapters(model)
    others = sorted(n for n, m in adapters.items() if not isinstance(m, QLoRA))
    if others:
        raise ConfigError(f"merge_dequantized merges QLoRA adapters only; detach {others} first")
    active = api.active(model)
    if not active:
        raise ConfigError("no active QLoRA adapter to merge; peftlab.use(model, name) first")
    merged = copy.deepcopy(model)
    layers = [(p, layer) for p, layer in adapter_layers(merged) if isinstance(layer, QLoRALinearLayer)]
    weights = {}
    with torch.no_grad():
        for path, layer in layers:
            w = layer.dequantized_weight(torch.float32)
            for n in layer.live_adapters():
                w = w + layer.delta_weight(n)
            weights[path] = w
        for _, layer in slots.copy_layers(merged):
            live = [n for n in active if n in layer.adapter_names()]
            if live:
                state = layer.peftlab_copy[live[0]].state_dict()
                layer.restore().load_state_dict(state)
        for _, layer in list(adapter_layers(merged)):
            layer.restore()
        merged.__dict__.pop("peftlab", None)
        config = adapters[active[0]].quant_config()
        was_quantized = [p for p, m in merged.named_modules() if isinstance(m, QuantizedModule)]
        dequantize(merged, torch.float32)
        for path, w in weights.items():
            merged.get_submodule(path).weight.copy_(w)
        merged.to(dtype)
        if requantize:
            for path in was_quantized:
                QuantizedLinear.convert(merged.get_submodule(path), config)
    for p in merged.parameters():
        p.requires_grad_(False)
    report: dict[str, Any] = {"layers": len(weights), "dtype": str(dtype).removeprefix("torch."),
                              "requantized": requantize}
    if inputs is not None:
        with torch.no_grad():
            a = _logits(model(**inputs)).float()
            b = _logits(merged(**inputs)).float()
        report["max_abs_diff"] = float((a - b).abs().max())
        report["rel_diff"] = float((a - b).norm() / a.norm().clamp(min=1e-30))
    return merged, report


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]
