#!/usr/bin/env python
"""peftlab OFT vs peft OFT: training-step time (one process, turn by turn) and peak memory (one
subprocess per implementation and repetition), same model, same config, same adapter tensors.

A step is forward + backward + AdamW step + zero_grad, fp32 on the CPU, OFT with peft's defaults
(blocks of 32, the Cayley-Neumann series with 5 terms) on every linear layer of the model
("all-linear": q/k/v/o/gate/up/down of each block). Both models start from the same base weights
and the same non-zero adapter tensors (peft's, perturbed, copied into peftlab's); their outputs
are compared before timing. Steps run in rotating order so slow drifts of a shared machine hit
both alike; medians and min/max are reported. Peak memory is the rise of the process's peak
resident set over the steps (``VmHWM`` reset through ``/proc/self/clear_refs`` once the model is
built and adapted, minus the resident set then; Linux), measured in a fresh interpreter per
implementation and repetition, alternating, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors go back to the system at once and the high-water mark is the live peak rather than the
heap's fragmentation (with glibc's default the same runs scatter by +-10 MiB and more). Also
reported: the bytes autograd keeps for the backward pass of one forward (deterministic).

    PYTHONPATH=src python benchmarks/oft_vs_peft.py [--model smollm2-135m] [--layers 0] [--steps 6] [--batch 4]

Measured (SmolLM2-135M, first 10 blocks, batch 4 x 64; results/oft_vs_peft*.json), with the
closed-form backward of the series: default (``recompute=True``), 1 thread on a 2-core machine
shared with other jobs (load average 4-5), two runs: step time 0.979 and 0.994 of peft's (medians
1.976 vs 2.018 s and 1.914 vs 1.925 s), peak RSS rise 0.965 and 0.968 (495-497 vs 513 MiB), kept
for backward 0.89. At the default 2 threads on that oversubscribed machine single steps took 1.1 to
23 s (*_threads2*.json): 0.81 and 0.96 of peft's step time, too scattered to rank; peak 0.965 and
0.968. Before it (autograd through the recomputed series) the default was 1.01-1.03
of peft's step time at 2 threads; ``--no-recompute`` then gave 0.99 (median 0.508 vs 0.512 s), peak
0.9997. Outputs agree to 8e-5 on logits (the series' summation order differs).

Where peftlab differs (src/peftlab/methods/oft.py): the series is evaluated by Horner's rule in
``Q^2`` (2 batched ``b x b`` products per layer instead of 3); with ``recompute=True`` (default) in a function
that keeps only the parameter and whose backward is the series' closed-form gradient (reverse
Horner: 4 batched products, recomputing ``Q^2``; peft's autograd runs 6 and keeps ``Q``, ``Q^2``,
``Q^3`` per layer through the forward pass); the input rotation keeps a view of the input, as
peft's einsum does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "oft_vs_peft.json"


def build(kind: str, model_name: str, block_size: int, layers: int = 0, recompute: bool = True):
    """The base model (its first ``layers`` blocks if non-zero) with OFT attached by ``kind``
    ('peftlab' or 'peft'), adapter tensors set from one seeded perturbation (identical in both)."""
    import peft

    import peftlab
    from peftlab import models

    model, _ = models.load(model_name, seed=0)
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    model.train()
    g = torch.Generator().manual_seed(3)
    if kind == "peft":
        model = peft.get_peft_model(model, peft.OFTConfig(oft_block_size=block_size, r=0, target_modules="all-linear"))
        params = {k.replace("base_model.model.", "").replace(".default", ""): p
                  for k, p in model.named_parameters() if p.requires_grad}
    else:
        peftlab.attach(model, "oft", block_size=block_size, recompute=recompute)
        params = {k.replace(".default", ""): p for k, p in peftlab.adapter_parameters(model, "default").items()}
    with torch.no_grad():
        for k in sorted(params):
            params[k].copy_(torch.randn(params[k].shape, generator=g) * 0.01)
    return model, params


def step(model, opt, x) -> None:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def saved_mib(model, x) -> float:
    """MiB of the distinct non-parameter storages autograd keeps for the backward pass of one
    training forward (deterministic, unlike the resident set: the activation memory each
    implementation holds at the start of the backward pass)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    del loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


def batch(args) -> torch.Tensor:
    return torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))


def memory_child(args) -> None:
    """In a fresh interpreter: build, adapt, then peak RSS rise over ``--mem-steps`` steps."""
    torch.set_num_threads(args.threads)
    model, params = build(args.child, args.model, args.block_size, args.layers, args.recompute)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4)
    x = batch(args)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    before = _status_kib("VmRSS")
    for _ in range(args.mem_steps):
        step(model, opt, x)
    after = _status_kib("VmHWM")
    print(json.dumps({"peak_rise_mib": (after - before) / 1024, "trainable": sum(p.numel() for p in params.values())}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=0, help="keep the first N blocks of the model (0: all)")
    p.add_argument("--no-recompute", dest="recompute", action="store_false", help="peftlab's recompute=False")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mem-reps", type=int, default=2, help="memory subprocesses per implementation")
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", choices=["peftlab", "peft"], help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)

    variants = {kind: build(kind, args.model, args.block_size, args.layers, args.recompute) for kind in ("peft", "peftlab")}
    assert set(variants["peft"][1]) == set(variants["peftlab"][1]), "the two attach different layers"
    x = batch(args)
    with torch.no_grad():
        outs = {k: m(input_ids=x).logits for k, (m, _) in variants.items()}
    diff = (outs["peft"] - outs["peftlab"]).abs().max().item()
    saved = {k: saved_mib(m, x) for k, (m, _) in variants.items()}
    opts = {k: torch.optim.AdamW(list(ps.values()), lr=1e-4) for k, (_, ps) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(args.warmup + args.steps):
        for k in names[i % 2:] + names[:i % 2]:
            t0 = time.perf_counter()
            step(variants[k][0], opts[k], x)
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    del variants, opts, outs

    mem: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(args.mem_reps):
        for k in names:
            cmd = [sys.executable, __file__, "--child", k, "--model", args.model, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--block-size", str(args.block_size), "--threads", str(args.threads),
                   "--layers", str(args.layers), *([] if args.recompute else ["--no-recompute"]),
                   "--mem-steps", str(args.mem_steps)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
            mem[k].append(json.loads(out)["peak_rise_mib"])

    med = {k: statistics.median(v) for k, v in times.items()}
    mem_med = {k: statistics.median(v) for k, v in mem.items()}
    result = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "block_size": args.block_size,
        "targets": "all-linear", "threads": args.threads, "steps": args.steps,
        "max_abs_output_difference": diff,
        "layers": args.layers or "all", "recompute": args.recompute,
        "saved_for_backward_mib": saved,
        "saved_for_backward_peftlab_over_peft": saved["peftlab"] / saved["peft"],
        "median_step_s": med, "min_max_step_s": {k: (min(v), max(v)) for k, v in times.items()},
        "step_time_peftlab_over_peft": med["peftlab"] / med["peft"],
        "peak_rss_rise_mib": mem, "median_peak_rss_rise_mib": mem_med,
        "peak_memory_peftlab_over_peft": mem_med["peftlab"] / mem_med["peft"],
        "load": list(os.getloadavg()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
