"""Independently published, measured GPU peaks of real fine-tuning runs, and the estimator's figure
for each (the validation table of ``docs/estimate.md``; ``tests/test_estimate.py`` recomputes it).

Every row is a run someone else measured and published with its setting: model, batch, sequence
length, precision, optimizer, recomputation, method. The estimator is given that setting and
nothing else; no constant is fitted to any row. What each source measures:

* torchtune's "Peak Memory Active" is ``torch.cuda.memory_stats()["active_bytes.all.peak"]``,
  PyTorch's allocated bytes (no CUDA context): compared with ``Estimate.allocated_peak``.
* peft's MetaMathQA benchmark logs ``torch.cuda.max_memory_reserved()`` minus the reserve at
  start, over the whole run (``method_comparison/MetaMathQA/utils.py``, ``log_results``): the
  caching allocator's reserve, which is at least the allocated peak (fragmentation included), so
  the allocated estimate is expected at or a little below it. Its batches are padded to their
  longest sequence and the sequences truncated at 768 tokens; the length of the longest batch is
  not published, so the estimate is taken at that cap (an upper bound of the length).

Rows that were looked at and not reproduced (too under-specified) are listed in
:data:`NOT_REPRODUCED` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Published:
    """One published measurement and the setting it was measured in.

    Attributes:
        name: Short label of the row.
        source: Where the figure is published (document, table, row).
        url: The document's address.
        measured: The published figure in bytes.
        metric: What the source measured (see the module docstring).
        model: An estimator preset.
        method: A registered method name.
        options: The method's options, as the source configured it.
        settings: :func:`peftlab.estimate.estimate` keywords for the source's setting.
        tolerance: Largest ``|estimate / measured - 1|`` accepted.
        setting: The setting in words, as the source states it.
    """

    name: str
    source: str
    url: str
    measured: int
    metric: str
    model: str
    method: str
    options: dict[str, Any] | None
    settings: dict[str, Any]
    tolerance: float
    setting: str
    caveats: tuple[str, ...] = field(default=())


_TORCHTUNE = "https://github.com/pytorch/torchtune/blob/v0.6.1/README.md"
_METAMATH = "https://github.com/huggingface/peft/tree/main/method_comparison/MetaMathQA/results"
_METAMATH_SETTING = ("Llama-3.2-3B in bf16 (weights, gradients and AdamW states; no AMP), batch 4, sequences padded "
                     "per batch and truncated at 768 tokens, no gradient checkpointing, no compile, SDPA attention, "
                     "torch AdamW (foreach), grad-norm clipping, zero_grad(set_to_none=True), one NVIDIA L40S, "
                     "torch 2.7.1, transformers 4.52.4, peft 0.15.2.dev0")
_METAMATH_CAVEATS = ("metric is max_memory_reserved over the whole run (caching-allocator reserve >= allocated)",
                     "length of the longest padded batch not published: estimated at the 768-token cap")
_BF16_PURE = {"dtype": "bf16", "mixed_precision": False, "optimizer": "adamw", "checkpointing": "none",
              "attention": "flash", "device": "cuda", "set_to_none": True}
"""Pure bf16 training as both sources run it: weights, gradients and AdamW's moments in bf16
(``mixed_precision=False``); memory-efficient SDPA / flex attention keeps no ``s^2`` scores."""


def _metamath(what: str, file: str, measured: int, method: str, options: dict[str, Any] | None) -> Published:
    """A row of peft's MetaMathQA benchmark: ``results/<file>``, ``train_info.cuda_memory_max``
    (``accelerator_memory_max`` in the newer files); the method's options as its
    ``adapter_config`` in that file sets them (LoRA r=32, alpha 64 on q_proj, v_proj, dropout 0,
    fp32 adapters; prompt tuning 200 random virtual tokens; prefix tuning 200 prefixes without
    projection; P-tuning 20 tokens from a 2-layer MLP encoder of width 3072)."""
    return Published(name=f"peft MetaMathQA {what}, Llama-3.2-3B", source=f"peft MetaMathQA results/{file}",
                     url=_METAMATH, measured=measured, metric="max_memory_reserved, bytes", model="llama-3.2-3b",
                     method=method, options=options, settings={**_BF16_PURE, "batch": 4, "seq": 768}, tolerance=0.10,
                     setting=_METAMATH_SETTING, caveats=_METAMATH_CAVEATS)


PUBLISHED: tuple[Published, ...] = (
    Published(
        name="torchtune full fine-tuning, Llama-3.2-3B, 2 x 4096 packed",
        source="torchtune 0.6.1 README, 'Optimization flags' table, row '+ Packed Dataset'",
        url=_TORCHTUNE, measured=int(60.0 * GIB), metric="peak memory active (allocated), GiB",
        model="llama-3.2-3b", method="full", options=None, settings={**_BF16_PURE, "batch": 2, "seq": 4096},
        tolerance=0.10,
        setting="full fine-tuning, Llama-3.2-3B, batch 2, dataset packed to 4096 tokens, bf16, A100; the later rows' "
                "techniques off (no compile, no chunked cross-entropy, no activation checkpointing, optimizer step "
                "not fused into backward, no 8-bit AdamW)",
        caveats=("the non-8-bit AdamW of the baseline is assumed to be torch's (bf16 states)",
                 "torchtune's own Llama implementation and flex attention, not transformers'"),
    ),
    _metamath("full fine-tuning", "full-finetuning--llama-3.2-3B-lr_0.00001.json", 37241225216, "full", None),
    _metamath("LoRA r=32 on q,v", "lora--llama-3.2-3B-rank32.json", 22273851392, "lora",
              {"r": 32, "alpha": 64, "target_modules": ["q_proj", "v_proj"]}),
    _metamath("prompt tuning, 200 virtual tokens", "prompt_tuning--llama-3.2-3B-default.json", 24379392000,
              "prompt_tuning", {"num_virtual_tokens": 200, "init": "random"}),
    _metamath("prefix tuning, 200 virtual tokens", "prefixtuning--llama-3.2-3B-lr_0.001.json", 20912799744,
              "prefix_tuning", {"num_virtual_tokens": 200, "init": "random"}),
    _metamath("P-tuning, 20 virtual tokens, MLP encoder", "ptuning--llama-3.2-3B-default.json", 20937965568,
              "p_tuning", {"num_virtual_tokens": 20, "encoder": "mlp", "encoder_hidden_size": 3072,
                           "encoder_num_layers": 2, "init": "random"}),
)
"""The validation rows (sources checked on the published files; figures copied exactly)."""

PUBLISHED_TRAINABLE = {"full": 3212749824, "lora": 9175040, "prompt_tuning": 614400, "prefix_tuning": 11468800,
                       "p_tuning": 28382208}
"""``num_trainable_params`` the MetaMathQA result files record for the rows above: the estimator's
counts (from the real attach on the meta device) must equal them."""

NOT_REPRODUCED: tuple[tuple[str, str], ...] = (
    ("torchtune 0.6.1 README, 'Memory and training speed' (Llama 3.1 8B/70B/405B: full 18.9/37.4 GiB, LoRA "
     "16.2/30.3 GiB, QLoRA 7.4 GiB, ...)",
     "torch.compile on, and the per-GPU configs (8-bit paged AdamW, optimizer in backward, activation checkpointing, "
     "CPU offload) are not stated per row; compiled kernels keep fewer activations than the eager code the "
     "estimator probes"),
    ("torchtune 0.6.1 README, 'Optimization flags', rows '+ Compile' to 'QLoRA' (51.0 ... 4.6 GiB) and "
     "'Baseline' (25.5 GiB)",
     "compile, chunked cross-entropy, activation offloading and 8-bit AdamW are not modelled; the baseline is "
     "unpacked Alpaca padded per batch, whose longest batch is not published"),
    ("torchtune docs, 'Finetuning Llama2 with LoRA', memory table (Llama2-7B LoRA: 15.57 / 15.87 / 15.86 / "
     "17.04 GB) and 'Finetuning Llama2 with QLoRA' (LoRA 15.57 GB, QLoRA 9.29 GB reserved)",
     "unpacked Alpaca at batch 2: the length of the longest batch, which sets the peak, is not published"),
    ("peft README, GPU memory table (ought/raft/twitter_complaints on an A100 80GB: T0_3B, mt0-xxl, bloomz-7b1)",
     "T0 and mT0 are encoder-decoder models (not modelled); for bloomz-7b1 the batch size, sequence length and "
     "dtype are not stated"),
)
"""Published figures examined and left out, with the reason."""


def compare(row: Published) -> tuple[Any, float]:
    """``(estimate, estimate / measured - 1)`` for one row; the estimate is the allocated peak
    (``Estimate.allocated_peak``: PyTorch's allocator, the CUDA context left out, as both
    sources measure)."""
    from peftlab.estimate import estimate

    e = estimate(row.model, row.method, row.options, **row.settings)
    return e, e.allocated_peak / row.measured - 1


def markdown() -> str:
    """The validation table of ``docs/estimate.md``, recomputed from the estimator."""
    lines = ["| setting | published peak | metric | source | peftlab estimate (peak phase) | error | tolerance "
             "| every term at once (old) |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for row in PUBLISHED:
        e, err = compare(row)
        where = e.peak_phase + (f", {e.peak_moment}" if e.peak_phase == "backward" else "")
        old = (e.sum_of_terms - e.runtime) / row.measured - 1
        lines.append(f"| {row.name} | {row.measured / GIB:.2f} GiB | {row.metric.split(',')[0]} | [{row.source}]"
                     f"({row.url}) | {e.allocated_peak / GIB:.2f} GiB ({where}) | {100 * err:+.1f}% | "
                     f"±{100 * row.tolerance:.0f}% | {100 * old:+.1f}% |")
    return "\n".join(lines)
