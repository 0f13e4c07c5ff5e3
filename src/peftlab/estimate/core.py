"""``estimate`` and ``fit``: memory per device to fine-tune or serve a model with a method.

What is counted and what is modelled:

* **Counted** (exact for the code at hand): parameter tensors, their dtypes and which train, from
  the real :func:`peftlab.attach` on the meta device (:mod:`peftlab.estimate.count`); hence
  weights, gradients and the per-tensor optimizer states.
* **Modelled** (closed forms with citations, :mod:`peftlab.estimate.formulas`): activations
  (Korthikanti et al. 2022), KV cache, optimizer-step temporaries, sharding (Rajbhandari et al.
  2020, ZeRO, https://arxiv.org/abs/1910.02054), framework overhead.

The terms (weights, gradients, optimizer states, activations, KV cache, overhead) are each the
largest that term gets. They do not all live at the same moment: the peak of a training step is
modelled phase by phase (:mod:`peftlab.estimate.phases`: forward, backward while activations are
freed and gradients appear, optimizer step with its temporaries) and ``Estimate.total`` is the
largest phase, the CUDA context included as a separate constant (:data:`CUDA_CONTEXT`).
``Estimate.sum_of_terms`` is the old upper bound, every term at its maximum at once.
Gradients exist from their block's backward until the next ``zero_grad`` (PyTorch's default
``set_to_none=True``); ``set_to_none=False``, gradient accumulation and DDP keep them for the
whole step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from peftlab.core.errors import ConfigError
from peftlab.estimate import formulas, phases
from peftlab.estimate.arch import ModelSource, resolve
from peftlab.estimate.count import Counts, TensorInfo, count

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
OPTIMIZERS = {
    "adamw": "AdamW: two moments per trainable element (fp32 under mixed precision)",
    "adamw8bit": "8-bit AdamW (bitsandbytes, Dettmers et al. 2022): two 1-byte moments + block constants",
    "sgd": "SGD without momentum: no state",
    "sgd-momentum": "SGD with momentum: one buffer per trainable element",
    "adafactor": "Adafactor (Shazeer & Stern 2018): factored second moment, no first moment",
    "galore": "AdamW with GaLore gradient projection (Zhao et al. 2024), modelled: moments of rank r",
}
QUANTIZE = ("nf4",)
"""Weight storage the estimator models: ``nf4`` is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314, Sec. 3) for the frozen linear weights."""
NF4_CONSTANT_BITS = 32 / 64
"""One fp32 absmax constant per block of 64 weights (QLoRA, Sec. 3)."""
NF4_DOUBLE_QUANT_BITS = 8 / 64 + 32 / (64 * 256)
"""Double quantization: 8-bit constants per 64 weights, one fp32 constant per 256 of those (0.127 bit)."""
MODES = ("train", "inference")
DEVICES = ("cuda", "cpu")
TERMS = ("weights", "quant_constants", "gradients", "optimizer", "activations", "kv_cache", "transients", "overhead")
TERM_LABELS = {"weights": "weights", "quant_constants": "quantization constants", "gradients": "gradients",
               "optimizer": "optimizer states (+fp32 master)", "activations": "activations",
               "kv_cache": "KV cache", "transients": "transients (largest of any phase)",
               "overhead": "overhead (runtime, sharding)"}
COMPONENT_LABELS = {**TERM_LABELS, "transients": "transients (logits, grads of activations, step temps)"}
"""Labels of the components of a phase (:data:`peftlab.estimate.phases.COMPONENTS`)."""

CUDA_CONTEXT = 512 * 2**20
"""CUDA context, kernels and library handles: about 0.5 GiB per process on recent GPUs. It is
outside PyTorch's allocator, so ``torch.cuda.max_memory_allocated`` does not include it: it is
the one constant term of every CUDA phase, and ``Estimate.allocated_peak`` leaves it out (what
``max_memory_allocated`` and published "peak memory allocated/active" figures measure). The
caching allocator's reserve above the allocated bytes (fragmentation) is not modelled."""
CPU_RUNTIME = 16 * 2**20
"""CPU training above the loaded model, independent of its size: autograd engine and OpenMP
worker threads (stacks), oneDNN/MKL scratch and the allocator's arenas. A measured constant:
peak RSS over the loaded model minus the modelled tensors when training the 2-layer, width-32
``tiny-bert`` (activations of a few MiB) with full fine-tuning, BitFit and LoRA, on a two-core
Linux machine with torch 2.13 (``benchmarks/estimate_vs_measured.py --models tiny-bert``); it
was 16 MiB in all three."""
BNB_BLOCK = 256
"""Values per fp32 quantization constant of bitsandbytes' 8-bit optimizer states (its optimizers
quantize moments in blocks of 256; peftlab's AdamW8bit uses the same by default)."""
BNB_MIN_SIZE = 4096
"""bitsandbytes keeps the states of tensors with fewer elements in fp32 (``min_8bit_size``)."""


@dataclass(frozen=True)
class Estimate:
    """Memory per device for one model, method and setting. All sizes are bytes.

    Attributes:
        details: Named sub-terms behind each term (e.g. ``"activations: checkpointed layer
            inputs"``), including terms that do not apply under the chosen setting.
        notes: What the numbers assume and which activation term applies.
    """

    model: str
    method: str
    options: dict[str, Any]
    settings: dict[str, Any]
    params: dict[str, int]
    arch: dict[str, Any]
    weights: int
    quant_constants: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int
    overhead: int
    details: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{phase: {component: bytes}}``: what is allocated at the peak of each phase of a training
    step (``forward``, ``backward``, ``optimizer step``) or of serving (``inference``); the
    components are :data:`peftlab.estimate.phases.COMPONENTS` and sum to the phase total."""
    peak_moment: str = ""
    """The moment of the backward sweep at which the backward phase peaks (``block 0 backward``...)."""
    runtime: int = 0
    """The constant runtime term inside ``overhead`` (CUDA context, or the CPU runtime)."""
    transients: int = 0
    """The largest transient of any phase (logits and their fp32 copy, loss-gradient buffers, one
    block's backward, the optimizer's temporaries), as a term: with it ``sum_of_terms`` bounds
    every phase."""

    @property
    def total(self) -> int:
        """Peak memory per device: the largest phase (the sum of the terms when no phase is known)."""
        totals = self.phase_totals()
        return max(totals.values()) if totals else self.sum_of_terms

    @property
    def sum_of_terms(self) -> int:
        """Every term at its maximum at once (the transients included): an upper bound of the peak."""
        return sum(self.terms().values())

    @property
    def peak_phase(self) -> str:
        """The phase holding the peak (``""`` when no phase is known)."""
        totals = self.phase_totals()
        return max(totals, key=lambda k: totals[k]) if totals else ""

    @property
    def allocated_peak(self) -> int:
        """The peak without the runtime constant: what ``torch.cuda.max_memory_allocated`` measures."""
        return self.total - self.runtime

    def phase_totals(self) -> dict[str, int]:
        """``{phase: bytes}`` in step order."""
        return {k: sum(v.values()) for k, v in self.phases.items()}

    def terms(self) -> dict[str, int]:
        """The terms in display order: weights ... overhead, each at its own maximum."""
        return {t: getattr(self, t) for t in TERMS}

    def table(self, units: str = "GB") -> str:
        """A terminal table of the terms, the total and the notes."""
        from peftlab.estimate.report import table

        return table([self], units=units)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        out["peak_phase"] = self.peak_phase
        out["phase_totals"] = self.phase_totals()
        out["sum_of_terms"] = self.sum_of_terms
        out["allocated_peak"] = self.allocated_peak
        out["notes"] = list(self.notes)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


@dataclass(frozen=True)
class Fit:
    """Whether a method fits a budget, and the largest batch and sequence that do.

    Attributes:
        estimate: The estimate at the requested batch and sequence (None when the method does
            not apply to the model; ``error`` says why).
        max_batch: Largest batch at the requested sequence length within the budget (0: none).
        max_seq: Largest sequence length at the requested batch within the budget (0: none).
        seq_capped: ``max_seq`` stopped at the model's ``max_position_embeddings``.
    """

    method: str
    budget: int
    estimate: Estimate | None
    fits: bool
    max_batch: int
    max_seq: int
    seq_capped: bool
    error: str | None = None


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """``"24GB"`` -> 24e9 bytes, ``"24GiB"`` -> 24 * 2^30; a bare number is bytes.

    Raises:
        ConfigError: An unreadable or non-positive size (the message shows both spellings).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ConfigError(f"cannot read the size {text!r}; write e.g. 24GB (24 x 10^9 bytes) or 24GiB "
                              "(24 x 2^30 bytes; what a '24 GB' GPU actually has)")
        value = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if value <= 0:
        raise ConfigError(f"a memory budget must be positive (got {text!r})")
    return int(value)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer (got {value!r})")
    return value


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ConfigError(f"dtype must be fp32, fp16 or bf16 (got {value})")
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {value!r}; use one of fp32, fp16, bf16") from None


def _choice(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
    return value


def estimate(model: Any, method: Any = "lora", options: dict[str, Any] | None = None, *, batch: int = 1,
             seq: int = 512, dtype: str | torch.dtype = "bf16", mixed_precision: bool = True,
             optimizer: str = "adamw", checkpointing: str = "none", zero: int = 0, fsdp: bool = False,
             devices: int = 1, mode: str = "train", context: int | None = None, attention: str = "auto",
             device: str = "cuda", quantize: str | None = None, double_quant: bool = True, galore_rank: int = 128,
             head: str | None = None, set_to_none: bool = True, grad_accumulation: int = 1) -> Estimate:
    """Estimate the memory per device to train (or serve) ``model`` with ``method``.

    Args:
        model: Preset name, embedded model name, ``config.json`` path, config dict or
            ``PretrainedConfig`` (see :func:`peftlab.estimate.arch.resolve`).
        method: A registered method name (``"full"``: every parameter trains) or a ``Method``.
        options: The method's options (``{"r": 16}``), as for :func:`peftlab.attach`.
        batch: Sequences per device (micro-batch).
        seq: Tokens per sequence (training), or tokens of the prompt (inference prefill).
        dtype: Storage dtype of the weights: ``fp32``, ``fp16``, ``bf16``.
        mixed_precision: 16-bit compute with fp32 master weights and optimizer states (the usual
            recipe). With fp32 weights this is autocast (AMP): fp32 weights, 16-bit activations.
            False: everything, states included, in ``dtype``.
        optimizer: One of :data:`OPTIMIZERS`.
        checkpointing: ``none``, ``selective`` (recompute attention scores) or ``full``
            (recompute every layer from its input) activation recomputation.
        zero: ZeRO stage 0-3: 1 shards optimizer states, 2 also gradients, 3 also weights.
        fsdp: PyTorch FSDP full sharding (ZeRO-3 semantics).
        devices: Data-parallel devices the state is sharded across.
        mode: ``train`` or ``inference`` (weights + KV cache + one forward's activations).
        context: Inference only: positions held in the KV cache (default ``seq``).
        attention: ``auto`` (what PyTorch's SDPA picks on ``device``), ``flash``, ``math`` or
            ``eager`` (transformers' eager attention, which keeps the scores).
        device: ``cuda`` or ``cpu``: dropout-mask size, optimizer kernels, runtime overhead.
        quantize: ``"nf4"``: the frozen linear weights stored as in QLoRA (modelled), computed in
            ``dtype``; None: every weight in ``dtype``.
        double_quant: With ``quantize``: QLoRA's double quantization of the block constants.
        galore_rank: Rank of the projection with ``optimizer="galore"``.
        head: Override the model head (``causal-lm``, ``classifier``, ``base``).
        set_to_none: The training loop's ``zero_grad(set_to_none=...)``: True (PyTorch's default)
            frees the gradients between steps, so the forward holds none; False keeps them.
        grad_accumulation: Micro-batches per optimizer step; above 1 the gradients of earlier
            micro-batches are held through the forward and backward of the later ones.

    Returns:
        An :class:`Estimate` whose ``total`` is the peak per device, the largest of its
        ``phases``.

    Raises:
        ConfigError: Impossible settings (non-positive sizes, unknown names, a method that
            does not apply to the model); every message says what to change.

    Example:
        >>> e = estimate("llama-2-7b", "lora", {"r": 16}, batch=4, seq=2048)
        >>> print(e.table())
    """
    settings = _settings(batch, seq, dtype, mixed_precision, optimizer, checkpointing, zero, fsdp, devices, mode,
                         context, attention, device, quantize, double_quant, galore_rank, set_to_none,
                         grad_accumulation)
    source = model if isinstance(model, ModelSource) else resolve(model, head)
    torch_dtype = DTYPES[settings["dtype"]]
    counts = count(source, method, options, torch_dtype)
    return _assemble(source, counts, settings, torch_dtype)


def _settings(batch: int, seq: int, dtype: str | torch.dtype, mixed_precision: bool, optimizer: str,
              checkpointing: str, zero: int, fsdp: bool, devices: int, mode: str, context: int | None,
              attention: str, device: str, quantize: str | None = None, double_quant: bool = True,
              galore_rank: int = 128, set_to_none: bool = True, grad_accumulation: int = 1) -> dict[str, Any]:
    """Check every setting (each error names the fix) and return them as a JSON-ready dict."""
    batch, seq, devices = _positive("batch", batch), _positive("seq", seq), _positive("devices", devices)
    torch_dtype = _dtype(dtype)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _choice("checkpointing", checkpointing, formulas.CHECKPOINTING)
    _choice("mode", mode, MODES)
    _choice("attention", attention, formulas.ATTENTION)
    _choice("device", device, DEVICES)
    if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero must be a ZeRO stage 0, 1, 2 or 3 (got {zero!r})")
    if fsdp and zero not in (0, 3):
        raise ConfigError(f"fsdp shards like ZeRO-3; drop zero={zero} or pass zero=3")
    if mode == "inference" and (zero or fsdp):
        raise ConfigError("ZeRO and FSDP shard training state; estimate inference with zero=0 and fsdp=False")
    if quantize is not None:
        _choice("quantize", quantize, QUANTIZE)
    _positive("galore_rank", galore_rank)
    _positive("grad_accumulation", grad_accumulation)
    if context is not None:
        _positive("context", context)
        if mode != "inference":
            raise ConfigError("context is the KV-cache length of inference; pass mode='inference' or drop it")
    return {"batch": batch, "seq": seq, "dtype": _name(torch_dtype), "mixed_precision": bool(mixed_precision),
            "optimizer": optimizer, "checkpointing": checkpointing, "zero": 3 if fsdp else zero, "fsdp": bool(fsdp),
            "devices": devices, "mode": mode, "context": context if mode == "inference" else None,
            "attention": attention, "device": device, "quantize": quantize, "double_quant": bool(double_quant),
            "galore_rank": galore_rank, "set_to_none": bool(set_to_none), "grad_accumulation": grad_accumulation}


def check_settings(batch: int, seq: int, **settings: Any) -> dict[str, Any]:
    """Validate :func:`estimate`'s settings without a model (each error names the fix)."""
    unknown = set(settings) - set(_SETTING_NAMES)
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(_SETTING_NAMES)}")
    return _settings(batch, seq, **{**_DEFAULTS, **settings})


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _assemble(source: ModelSource, c: Counts, st: dict[str, Any], torch_dtype: torch.dtype) -> Estimate:
    m = c.method_obj
    notes: list[str] = []
    details: dict[str, float] = {}
    train = st["mode"] == "train"
    mixed = st["mixed_precision"]
    wbytes = torch.empty((), dtype=torch_dtype).element_size()
    e = 2 if (wbytes == 2 or mixed) else 4
    batch, seq = st["batch"], st["seq"]

    # ------------------------------------------------------------------ weights (counted)
    quantized: list[TensorInfo] = []
    constants = 0.0
    if st["quantize"]:
        # QLoRA (modelled): frozen linear weights in 4-bit NF4, blocks of 64 with an absmax constant each
        # (fp32: 32/64 = 0.5 bit per weight; double quantization: 8/64 + 32/(64*256) = 0.127 bit).
        quantized = [t for t in c.tensors if t.linear and not (t.trainable and train)]
        if not quantized:
            raise ConfigError(f"quantize={st['quantize']!r} stores frozen linear weights in 4 bits, and {c.method} "
                              f"on {source.name} leaves none frozen (4-bit weights cannot train); use a method such as "
                              "lora on the quantized model, or drop quantize")
        const_bits = NF4_DOUBLE_QUANT_BITS if st["double_quant"] else NF4_CONSTANT_BITS
        constants = sum(t.numel for t in quantized) * const_bits / 8
    if c.quantized:  # the method quantized the base itself (QLoRA): counted from its modules
        if st["quantize"]:
            raise ConfigError(f"{c.method} already stores its base weights quantized (counted from the real attach); "
                              "drop quantize")
        kinds = sorted({q[0] for q in c.quantized})
        const_counted = sum(q[3] for q in c.quantized)
        constants = float(const_counted)
        details[f"weights: {len(c.quantized)} quantized weights ({', '.join(kinds)}, counted)"] = sum(
            q[2] for q in c.quantized)
        details["quantization constants: counted (absmax codes, scales, offsets)"] = constants
        notes.append(f"{c.method} stores {sum(q[1] for q in c.quantized):,} base weights quantized "
                     f"({(sum(q[2] for q in c.quantized) + const_counted) / sum(q[1] for q in c.quantized):.4f} "
                     "bytes per weight, counted from the real attach on meta)")
    qset = {t.key for t in quantized}
    base_w = sum(t.bytes for t in c.tensors if not t.adapter and t.key not in qset)
    adapter_w = sum(t.bytes for t in c.tensors if t.adapter)
    quant_w = sum(t.numel for t in quantized) * 4 / 8
    details["weights: base model" + (" (not quantized: embeddings, norms, head)" if quantized else "")] = base_w
    if quantized:
        details[f"weights: {len(quantized)} linear weights in NF4 (4 bits)"] = quant_w
        details["quantization constants: " + ("double-quantized (0.127 bit/weight)" if st["double_quant"]
                                               else "fp32 absmax per 64 weights (0.5 bit/weight)")] = constants
        notes.append("modelled QLoRA storage (Dettmers et al. 2023): frozen linear weights in NF4 blocks of 64, "
                     "computed in 16 bits one layer at a time; peftlab does not quantize models itself")
    details["weights: adapter tensors"] = adapter_w
    details["weights: buffers"] = c.buffers_bytes
    weights = base_w + adapter_w + quant_w + c.buffers_bytes + sum(q[2] for q in c.quantized)

    trainable = [t for t in c.tensors if t.trainable] if train else []
    # ------------------------------------------------------------------ gradients (counted)
    gradients = float(sum(t.bytes for t in trainable))
    # ------------------------------------------------------------------ optimizer (counted per tensor)
    if c.optimizer_state is not None:  # the method brings its own optimizer (Method.optimizer_state_elements)
        master, moments, step_temp = _method_optimizer(trainable, c.optimizer_state, mixed, st["device"])
        notes.append(f"{c.method} brings its own optimizer; its state is counted from the method's layout and the "
                     f"optimizer setting ({st['optimizer']}) does not apply")
    else:
        master, moments, step_temp = _optimizer(trainable, st["optimizer"], mixed, st["device"], st["galore_rank"])
    if st["optimizer"] == "galore" and c.optimizer_state is None:
        projected = sum(1 for t in trainable if _galore_projects(t, st["galore_rank"]))
        notes.append(f"modelled GaLore (Zhao et al. 2024), rank {st['galore_rank']}: AdamW moments of {projected} "
                     "linear weight(s) live in the projected space (2 r n) with an m x r projection each; gradients "
                     "stay full size (no per-layer updates); the step adds one SVD of the largest weight")
    details["optimizer: fp32 master weights"] = master
    details["optimizer: states"] = moments
    optimizer = master + moments

    # ------------------------------------------------------------------ activations (closed form)
    # Declared by the method (Method.extra_sequence_tokens / extra_key_tokens), or seen in the probe forward.
    virtual = max(int(m.extra_sequence_tokens()) if m is not None else 0, c.structure.extra_tokens)
    prefix = max(int(m.extra_key_tokens()) if m is not None else 0,
                 max((a.extra_keys for a in c.structure.attention), default=0))
    kv_cache = 0.0
    act = None
    arch = c.arch
    if train:
        act = formulas.activations(c.structure, batch, seq, e, st["device"], st["attention"], st["checkpointing"],
                                   virtual, prefix, autocast=mixed)
        details["activations: layers, no recomputation (Korthikanti sum)"] = act.layers
        details["activations: checkpointed layer inputs (L x b x s x h x bytes)"] = act.checkpointed_inputs
        details["activations: one layer recomputed in backward"] = act.recomputed_layer
        details["activations: attention scores s^2 (in layers)"] = act.scores
        details["activations: embeddings, final norm, head"] = act.outside
        details["activations: loss log-softmax (fp32)"] = act.loss
        activations = act.total
        if mixed and wbytes == 4:
            copies = e * sum(c.structure.graph_linears)
            details["activations: autocast 16-bit weight copies kept for backward"] = copies
            activations += copies
            notes.append("fp32 weights with mixed precision is autocast: activations are 16-bit, and every linear "
                         "weight used inside the graph keeps a 16-bit copy until backward")
        notes.append(f"activations: {act.applies}; without recomputation the layers keep "
                     f"{_fmt(act.layers)}, the block inputs alone (layers x batch x seq x hidden x bytes) are "
                     f"{_fmt(act.checkpointed_inputs)}")
        if c.structure.first_block is None and trainable:
            notes.append("no transformer block is in the autograd graph (only tensors after the last block train)")
        if virtual or prefix:
            notes.append(f"the method adds {virtual} prompt token(s) to every sequence and {prefix} prefix key(s) "
                         "to every attention")
    else:
        context = (st["context"] or seq) + virtual + prefix
        kv_cache = formulas.kv_cache_bytes(arch.layers, arch.sliding_layers, arch.sliding_window, arch.kv_heads,
                                           arch.head_dim, batch, context, e)
        impl = "flash" if st["attention"] in ("auto", "flash") else st["attention"]
        activations = formulas.prefill_bytes(arch.hidden, arch.heads, arch.kv_heads, arch.head_dim,
                                             arch.intermediate, c.structure.gated, c.structure.loss_vocab, batch,
                                             seq + virtual, e, impl)
        details["kv cache: positions held"] = context
        notes.append(f"inference: KV cache of {context} positions x {arch.layers} layers x {arch.kv_heads} KV heads; "
                     f"activations are one layer's tensors during a {seq}-token prefill")
        if arch.sliding_window and arch.sliding_layers:
            notes.append(f"{arch.sliding_layers} layers keep at most {arch.sliding_window} positions (sliding window)")

    # ------------------------------------------------------------------ sharding (ZeRO paper, Sec. 5)
    stage, n = st["zero"], st["devices"]
    gather = 0.0
    grad_share = 1.0 / n if stage >= 2 else 1.0
    if stage >= 1:
        optimizer /= n
    if stage >= 2:
        gradients /= n
    if stage >= 3:
        weights /= n
        constants /= n
        if n > 1:
            gather = 2 * max(c.block_params, default=0)
            details["overhead: gathered parameters of the current and the prefetched layer"] = gather
    if stage and n == 1:
        notes.append(f"ZeRO-{stage} on one device shards nothing")
    if train and n > 1 and stage == 0:
        details["overhead: DDP gradient buckets"] = gradients
        gather += gradients
        notes.append("DDP keeps a second copy of the gradients in its buckets (gradient_as_bucket_view=False)")

    # ------------------------------------------------------------------ overhead (modelled)
    runtime = CUDA_CONTEXT if st["device"] == "cuda" else CPU_RUNTIME
    details["overhead: runtime (CUDA context)" if st["device"] == "cuda" else "overhead: runtime (CPU threads, arenas)"] \
        = runtime
    dequant = 0.0
    if quantized or c.quantized:
        dequant = e * (max(q[1] for q in c.quantized) if c.quantized else c.structure.max_linear)
        details["overhead: one dequantized weight"] = dequant
    overhead = runtime + dequant + gather
    terms = {"weights": weights, "quant_constants": constants, "gradients": gradients, "optimizer": optimizer,
             "activations": activations, "kv_cache": kv_cache, "overhead": overhead}

    # ------------------------------------------------------------------ the step, phase by phase
    peak_moment = ""
    if train and act is not None:
        resident = (not st["set_to_none"]) or st["grad_accumulation"] > 1 or (n > 1 and stage == 0)
        grads = _gradients(trainable, grad_share, resident)
        s_q = seq + virtual
        impls = {formulas.attention_impl(a, st["attention"], st["device"], e) for a in c.structure.attention}
        impl = "flash" if impls <= {"flash"} else "math"
        block_transient = formulas.backward_transient(arch.hidden, arch.heads, arch.kv_heads, arch.head_dim,
                                                      arch.intermediate, c.structure.gated, batch * s_q, s_q,
                                                      s_q + prefix, batch, e, impl) if act.per_block else 0.0
        details["transients: logits and their fp32 copy at the end of the forward"] = act.logits + act.logits_upcast
        details["transients: loss-gradient buffers at the start of backward (fp32)"] = act.loss_transient
        details["transients: one block's backward (gradients of its activations)"] = block_transient
        details["transients: optimizer-step temporaries"] = step_temp
        phase_parts, peak_moment = phases.training(weights, constants, optimizer, overhead, act, grads,
                                                   st["checkpointing"], block_transient, step_temp)
        if resident:
            why = ("zero_grad(set_to_none=False)" if not st["set_to_none"] else
                   f"{st['grad_accumulation']} accumulated micro-batches" if st["grad_accumulation"] > 1 else
                   "DDP's gradient buckets")
            notes.append(f"gradients are held for the whole step ({why}), the forward included")
        else:
            notes.append("gradients appear during the backward and are freed by zero_grad(set_to_none=True) "
                         "before the next forward")
    else:
        phase_parts = phases.inference(weights, constants, activations, kv_cache, overhead)
    if mixed and train and master:
        notes.append("optimizer states include an fp32 master copy of every 16-bit trainable tensor")
    if arch.max_positions and seq > arch.max_positions:
        notes.append(f"seq {seq} exceeds the model's max_position_embeddings ({arch.max_positions})")
    params = {"total": c.total, "base": c.base, "trainable": c.trainable if train else 0}
    arch_info = {"hidden": arch.hidden, "layers": arch.layers, "heads": arch.heads, "kv_heads": arch.kv_heads,
                 "head_dim": arch.head_dim, "intermediate": arch.intermediate, "vocab": arch.vocab,
                 "max_positions": arch.max_positions, "head": source.head}
    rounded = {name: {k: int(round(v)) for k, v in part.items()} for name, part in phase_parts.items()}
    terms["transients"] = max(part["transients"] for part in rounded.values())
    est = Estimate(source.name, c.method, dict(c.options), st, params, arch_info,
                   **{k: int(round(v)) for k, v in terms.items()},
                   details={k: int(round(v)) for k, v in details.items()}, notes=tuple(notes), phases=rounded,
                   peak_moment=peak_moment, runtime=int(runtime))
    if train:
        totals = est.phase_totals()
        where = est.peak_phase + (f" ({peak_moment})" if est.peak_phase == "backward" else "")
        est = replace(est, notes=est.notes + (
            f"peak in the {where}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in totals.items())
            + f"; every term at its maximum at once would be {_fmt(est.sum_of_terms)}",))
    return est


def _gradients(trainable: list[TensorInfo], share: float, resident: bool) -> phases.Gradients:
    """Gradient bytes by the moment of the backward they appear in (``TensorInfo.stage``)."""
    blocks: dict[int, float] = {}
    head = early = 0.0
    for t in trainable:
        size = t.bytes * share
        if t.stage == "block" and t.block is not None:
            blocks[t.block] = blocks.get(t.block, 0.0) + size
        elif t.stage == "early":
            early += size
        else:
            head += size
    return phases.Gradients(head, blocks, early, resident)


def _galore_projects(t: TensorInfo, rank: int) -> bool:
    """GaLore projects the gradients of linear weights whose smaller side exceeds the rank."""
    return t.linear and len(t.shape) == 2 and min(t.shape) > rank


def _method_optimizer(trainable: list[TensorInfo], layout: dict[str, tuple[int, int]], mixed: bool,
                      device: str) -> tuple[float, float, float]:
    """``(fp32 master bytes, state bytes, step temporaries)`` for a method's own optimizer, whose
    state per tensor is ``(elements in the state dtype, fixed bytes)``; the step makes one
    full-size update per tensor, as AdamW does."""
    master = states = 0.0
    temps: list[float] = []
    for t in trainable:
        if mixed and t.elem < 4:
            master += 4 * t.numel
        sb = 4 if mixed else t.elem
        elements, fixed = layout.get(t.key, (2 * t.numel, 0))
        states += elements * sb + fixed
        temps.append(t.numel * sb)
    step = sum(temps) if device == "cuda" else 2 * max(temps, default=0.0)
    return master, states, step


def _optimizer(trainable: list[TensorInfo], name: str, mixed: bool, device: str,
               galore_rank: int) -> tuple[float, float, float]:
    """``(fp32 master bytes, state bytes, step temporaries)`` for the trainable tensors.

    States are kept in fp32 under mixed precision, else in each tensor's own dtype.
    """
    master = states = 0.0
    temps: list[float] = []
    svd = 0.0
    for t in trainable:
        if mixed and t.elem < 4:
            master += 4 * t.numel
        sb = 4 if mixed else t.elem
        n = t.numel
        if name == "adamw":
            states += 2 * n * sb
            temps.append(n * sb)
        elif name == "galore":
            if _galore_projects(t, galore_rank):
                small, big = sorted(t.shape)
                states += (small * galore_rank + 2 * galore_rank * big) * sb  # P (m x r) + moments (r x n)
                temps.append(2 * galore_rank * big * sb)  # projected gradient and the update before back-projection
                svd = max(svd, 4.0 * (2 * small * big + small * small))  # fp32 gradient copy, U, V^T of its SVD
            else:
                states += 2 * n * sb
                temps.append(n * sb)
        elif name == "adamw8bit":
            # bitsandbytes: 1-byte moments with an fp32 absmax per block; small tensors keep fp32 states
            states += 2 * n + 2 * formulas.ceil_div(n, BNB_BLOCK) * 4 if n >= BNB_MIN_SIZE else 2 * n * 4
        elif name == "sgd-momentum":
            states += n * sb
        elif name == "adafactor":
            states += formulas.adafactor_elements(t.shape) * sb
            temps.append(n * sb)
    # PyTorch's foreach kernels (the CUDA default) make one temporary list over all tensors;
    # the CPU single-tensor loop makes two temporaries of the largest tensor at a time.
    if device == "cuda":
        step = sum(temps)
    else:
        step = 2 * max(temps, default=0.0)
    return master, states, step + svd


def _fmt(n: float) -> str:
    return f"{n / 1e9:.2f} GB ({n / 2**30:.2f} GiB)"


def fit(budget: str | int, model: Any, methods: Iterable[Any] | None = None,
        options: dict[str, dict[str, Any]] | None = None, *, batch: int = 1, seq: int = 512,
        **settings: Any) -> list[Fit]:
    """Which methods fit ``budget`` per device, and the largest batch and sequence that fit each.

    Args:
        budget: Bytes per device, or a size such as ``"24GB"`` / ``"24GiB"``.
        methods: Methods to try (default: every registered method, ``full`` included).
        options: Per-method options: ``{"lora": {"r": 16}}``.
        batch, seq: The setting checked for ``fits``; ``max_seq`` is searched at ``batch`` and
            ``max_batch`` at ``seq``.
        settings: Any other :func:`estimate` keyword (dtype, optimizer, checkpointing, ...).

    Returns:
        One :class:`Fit` per method; a method that does not apply to the model has ``error``.
    """
    import peftlab

    limit = parse_size(budget)
    head = settings.pop("head", None)
    keywords = set(settings) - set(_SETTING_NAMES)
    if keywords:
        raise ConfigError(f"fit got unknown setting(s) {sorted(keywords)}; known: {sorted(_SETTING_NAMES)}")
    _settings(batch, seq, **{**_DEFAULTS, **settings})  # bad settings are errors, not "does not fit"
    source = model if isinstance(model, ModelSource) else resolve(model, head)
    names = list(methods) if methods is not None else list(peftlab.methods())
    options = options or {}
    out = []
    for meth in names:
        key = meth if isinstance(meth, str) else getattr(meth, "method_name", str(meth))

        def run(b: int, s: int, meth: Any = meth, opts: Any = options.get(key)) -> Estimate:
            return estimate(source, meth, opts, batch=b, seq=s, **settings)

        try:
            here = run(batch, seq)
        except ConfigError as e:  # the method does not apply to this model (e.g. BitFit without biases)
            out.append(Fit(key, limit, None, False, 0, 0, False, error=str(e)))
            continue
        cap = int(here.arch.get("max_positions") or 0) or 1 << 20
        max_b = _largest(lambda b: run(b, seq).total <= limit, 1 << 20)
        max_s = _largest(lambda s: run(batch, s).total <= limit, cap)
        out.append(Fit(key, limit, here, here.total <= limit, max_b, max_s, max_s == cap))
    return out


_DEFAULTS: dict[str, Any] = {"dtype": "bf16", "mixed_precision": True, "optimizer": "adamw", "checkpointing": "none",
                             "zero": 0, "fsdp": False, "devices": 1, "mode": "train", "context": None,
                             "attention": "auto", "device": "cuda", "quantize": None, "double_quant": True,
                             "galore_rank": 128, "set_to_none": True, "grad_accumulation": 1}
_SETTING_NAMES = tuple(_DEFAULTS)


def _largest(ok: Any, cap: int) -> int:
    """Largest ``n`` in ``[1, cap]`` with ``ok(n)`` (``ok`` is monotone); 0 when ``ok(1)`` fails."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


__all__ = ["Estimate", "Fit", "OPTIMIZERS", "TERMS", "estimate", "fit", "parse_size"]
