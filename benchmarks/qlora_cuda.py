#!/usr/bin/env python
"""QLoRA vs LoRA on CUDA: training step time and peak GPU memory, in one process.

The model is smollm2-135m's architecture (LlamaConfig below) with random weights: timing and
memory do not depend on the values, and the GPU machine has no model cache. Base weights bf16;
LoRA r=8, alpha=16 on every linear layer but the head; QLoRA: NF4 + double quantization, bf16
compute, pure-PyTorch kernels (bitsandbytes is not installed there). Variants alternate
(ABBA over ``--repeats``); each variant is built fresh, its peak is
``torch.cuda.max_memory_allocated`` after a reset, over warm-up + timed steps (forward, backward,
AdamW step, zero_grad; ``torch.cuda.synchronize`` around each step).

Usage: python benchmarks/qlora_cuda.py --out benchmarks/results/qlora_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab

CONFIG = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=1536, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)


def run(variant: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16).train()
    if variant == "lora":
        peftlab.attach(model, "lora", r=8, alpha=16)
    else:
        peftlab.attach(model, "qlora", r=8, alpha=16, compute_dtype="bf16", backend="torch")
    gc.collect()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return {"step_s": statistics.median(times), "peak_bytes": peak, "after_build_bytes": weights}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/qlora_cuda.json")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"lora": [], "qlora": []}
    for rep in range(args.repeats):
        order = ["lora", "qlora"] if rep % 2 == 0 else ["qlora", "lora"]
        for v in order:
            runs[v].append(run(v, args))
    summary = {v: {"step_s_median": statistics.median(r["step_s"] for r in rs),
                   "step_s_per_repeat": [r["step_s"] for r in rs],
                   "peak_mb_median": statistics.median(r["peak_bytes"] for r in rs) / 2**20,
                   "after_build_mb": rs[0]["after_build_bytes"] / 2**20} for v, rs in runs.items()}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": vars(args),
              "training": summary,
              "ratios": {"qlora/lora": {
                  "step_time": summary["qlora"]["step_s_median"] / summary["lora"]["step_s_median"],
                  "peak_memory": summary["qlora"]["peak_mb_median"] / summary["lora"]["peak_mb_median"],
                  "memory_after_build": summary["qlora"]["after_build_mb"] / summary["lora"]["after_build_mb"]}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
