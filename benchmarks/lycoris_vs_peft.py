#!/usr/bin/env python
"""peftlab LoHa / LoKr vs peft's LoHa / LoKr: training-step time (one process, turn by turn) and
peak memory (each implementation in its own process).

Time: both implementations start from the same base weights and the same adapter tensors (peftlab's,
perturbed away from the identity init, copied into peft's), their outputs are compared, then they
take steps in rotating order (forward + backward + AdamW step + zero_grad), so slow drifts of a
shared machine hit both alike; medians and ratios are reported.

Memory: a fresh process per (method, implementation, allocator setting, repetition; ``--mem-reps``,
alternating) builds the same model, takes the same steps and reports (a) the growth of its peak
resident set over the steps (``VmHWM``, CPU) and (b) the bytes autograd keeps for the backward
pass in one training forward (distinct storages, parameters excluded): the deterministic part of
that peak. (The peak is reset to the resident set after the model is built:
``/proc/self/clear_refs``; Linux only.) Each is run under glibc's default allocator (what a user
gets: the peak includes the heap's fragmentation, which scatters by tens of MiB from run to run)
and with ``MALLOC_MMAP_THRESHOLD_=65536`` (the live peak, as in oft_vs_peft.py).

Model: by default a Llama with SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads, 3 KV heads)
and 4 of its 30 layers, random weights, fp32 on the CPU; ``--model smollm2-135m`` takes the
embedded model. Adapters on every linear layer of the blocks (q, k, v, o, gate, up, down), r=8,
alpha=8 (peft's defaults).

    PYTHONPATH=src python benchmarks/lycoris_vs_peft.py [--methods loha lokr] [--steps 8] [--batch 4] [--seq 128]

Measured (benchmarks/results/loha_vs_peft.json, lokr_vs_peft.json): batch 4 x 128, 8 timed steps,
1 thread, on a 2-core machine shared with other jobs (load average ~5), outputs equal to 2e-6:

    method  step time peftlab/peft (medians)   peak RSS growth          kept for backward
    loha    0.744 s / 1.345 s = 0.55           200 / 279 MiB = 0.72     99 / 138 MiB = 0.72

At batch 4 x 512 (*_vs_peft_seq512.json, 4 timed steps): loha 0.65 of peft's step time, 0.92 of
its peak and of what it keeps.

LoKr with the chunked factored form (``_KronLinear``, 256 positions a chunk), two runs each
(lokr_vs_peft*.json, 1 thread, load average 3.5-6), peak RSS growth: median of 2 workers per run,
glibc's default allocator / ``MALLOC_MMAP_THRESHOLD_=65536``:

    tokens  step time           peak, glibc default               live peak                kept
    512     0.566, 0.538        0.797, 0.749 (187-197 / 233-252)  0.696, 0.696 (118 / 170)  0.625
    2048    0.604, 0.616        0.983, 1.044 (666-695 / 636-707)  0.891, 0.892 (424 / 476)  0.869

(Before: 0.60 / 0.90 at 512 tokens and 0.65 / 1.09-1.2 at 2048, where the unchunked backward's
odd-sized per-position transients fragmented the heap; the live peak was 0.89 at 2048 already.)
At 2048 tokens under glibc's default allocator the two are level within the scatter of peft's
own runs (636-707 MiB); the live peak is 0.89 of peft's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CONFIG = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}


def build_base(model: str) -> torch.nn.Module:
    if model == "medium-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    from peftlab import models

    return models.load(model, seed=0)[0]


def build(method: str, impl: str, model: str, r: int) -> torch.nn.Module:
    """The adapted model. Both implementations draw the same initial factors from the same seed
    (peftlab follows peft's draws) and get the same perturbation (away from the identity init)."""
    import peft

    import peftlab

    base = build_base(model)
    torch.manual_seed(1)
    if impl == "peftlab":
        peftlab.attach(base, method, r=r, alpha=r, target_modules=TARGETS)
        adapter = {k.replace(".default", ""): t for k, t in peftlab.adapter_parameters(base, "default").items()}
    else:
        base = peft.get_peft_model(base, getattr(peft, PEFT_CONFIG[method])(r=r, alpha=r, target_modules=TARGETS))
        adapter = {k.removeprefix("base_model.model.").replace(".default", ""): t
                   for k, t in base.named_parameters() if t.requires_grad}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for k in sorted(adapter):
            adapter[k].add_(torch.randn(adapter[k].shape, generator=g) * 0.02)
    return base


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def inputs(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0))


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward (distinct storages, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    del loss
    return sum(seen.values())


def worker(args: argparse.Namespace) -> None:
    """One implementation in a process of its own: peak RSS growth over the steps, saved bytes."""
    torch.set_num_threads(args.threads)
    model = build(args.method, args.impl, args.model, args.r)
    model.train()
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-4)
    x = inputs(args.batch, args.seq)
    import gc

    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    for _ in range(args.memory_steps):
        step(model, opt, x)
    print(json.dumps({"peak_rss_growth_mib": (_status("VmHWM") - before) / 1024,
                      "saved_for_backward_mib": saved_bytes(model, x) / 2**20}))


def _status(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def timing(method: str, args: argparse.Namespace) -> dict[str, Any]:
    variants = {impl: build(method, impl, args.model, args.r) for impl in ("peft", "peftlab")}
    x = inputs(args.batch, args.seq)
    with torch.no_grad():
        diff = (variants["peftlab"](input_ids=x).logits - variants["peft"](input_ids=x).logits).abs().max().item()
    opts = {n: torch.optim.AdamW([t for t in m.parameters() if t.requires_grad], lr=1e-4) for n, m in variants.items()}
    for m in variants.values():
        m.train()
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for i in range(args.warmup + args.steps):
        for n in names[i % 2:] + names[:i % 2]:
            t = step(variants[n], opts[n], x)
            if i >= args.warmup:
                times[n].append(t)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"max_abs_output_difference": diff, "median_step_s": med,
            "min_max_step_s": {n: (min(v), max(v)) for n, v in times.items()},
            "step_time_ratio_peftlab_over_peft": med["peftlab"] / med["peft"]}


ALLOCATORS = {"glibc_default": {}, "mmap_64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
"""Each memory worker runs under glibc's default allocator (what a user gets: freed blocks stay in the
heap, so the peak resident set includes its fragmentation) and with ``MALLOC_MMAP_THRESHOLD_=65536``
(tensors above 64 KiB are mapped and unmapped one by one: the peak is the live peak, as in
oft_vs_peft.py)."""


def memory(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """``--mem-reps`` workers per implementation and allocator, alternating; medians and all values."""
    out: dict[str, Any] = {}
    base_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for alloc, extra in ALLOCATORS.items():
        runs: dict[str, list[dict[str, float]]] = {"peft": [], "peftlab": []}
        for _ in range(args.mem_reps):
            for impl in runs:
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--method", method, "--model", args.model,
                       "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
                       "--r", str(args.r), "--memory-steps", str(args.memory_steps)]
                res = subprocess.run(cmd, capture_output=True, text=True, env={**base_env, **extra}, check=True)
                runs[impl].append(json.loads(res.stdout.strip().splitlines()[-1]))
        block: dict[str, Any] = {}
        for impl, rows in runs.items():
            peaks = [r["peak_rss_growth_mib"] for r in rows]
            block[impl] = {"peak_rss_growth_mib": statistics.median(peaks), "peak_rss_growth_mib_runs": peaks,
                           "saved_for_backward_mib": rows[0]["saved_for_backward_mib"]}
        for key in ("peak_rss_growth_mib", "saved_for_backward_mib"):
            block[f"{key}_ratio_peftlab_over_peft"] = block["peftlab"][key] / block["peft"][key]
        out[alloc] = block
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["loha", "lokr"], choices=sorted(PEFT_CONFIG))
    p.add_argument("--model", default="medium-llama", help="medium-llama (SmolLM2's widths, 4 layers) or smollm2-135m")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--mem-reps", type=int, default=3, help="memory workers per implementation and allocator")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<method>_vs_peft.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="peftlab", help=argparse.SUPPRESS)
    p.add_argument("--method", default="loha", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    for method in args.methods:
        result = {"method": method, "model": args.model, "r": args.r, "alpha": args.r, "targets": TARGETS,
                  "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
                  "load_average": os.getloadavg(), "time": timing(method, args), "memory": memory(method, args)}
        out = Path(args.out or Path(__file__).parent / "results" / f"{method}_vs_peft.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
