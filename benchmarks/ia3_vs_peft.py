#!/usr/bin/env python
"""peftlab IA3 vs peft IA3: training-step time and peak memory, same model, same config, same run.

The model is SmolLM2-135M's block (hidden 576, SwiGLU 1536, 9 heads, 3 key/value heads) stacked
``--layers`` deep with a 2,048-token vocabulary and seeded random weights (the shapes are what
costs, not the values; 30 blocks and a 49k vocabulary make a step take minutes on a shared CPU).
A step is forward + backward + AdamW step + zero_grad, fp32, CPU.

* Time: both implementations live in this process and take steps in rotating order (peft,
  peftlab, then peftlab, peft, ...), so a shared machine's drifts hit both alike; the median of
  ``--steps`` timed steps each, after ``--warmup``, in wall-clock and in this process's CPU time
  (less disturbed by other processes on a loaded machine).
* Peak memory: one fresh worker process per measurement (both libraries imported in each, so
  import footprints are equal), alternating implementations for ``--rounds`` rounds. After the
  set-up the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), so the peak
  (``VmHWM``) is that of two training steps alone; median over rounds, and its increase over the
  resident size before the first step.
* Saved activations: the bytes autograd keeps for backward in one forward (saved-tensor hooks;
  exact, no allocator noise).
* Check: equal adapters at init, so the first steps' losses of the two must agree.

IA3's config: peftlab's defaults found by name (k_proj, v_proj, down_proj; down_proj scales its
input), peft given the same modules.

    PYTHONPATH=src python benchmarks/ia3_vs_peft.py [--steps 20] [--rounds 3] [--batch 4] [--seq 128]

``benchmarks/vera_vs_peft.py`` and ``benchmarks/boft_vs_peft.py`` run the same harness for VeRA and BOFT.

Measured (benchmarks/results/ia3_vs_peft.json; 4 layers, batch 4 x 128, 2 threads, 16 steps, 5
memory rounds; a quiet 2-core machine, load average 0.9-1.0):

* peak RSS of two training steps: 603 MiB vs peft's 608 (0.992); increase over the set-up model
  146 vs 149 MiB (0.979); activations autograd keeps: 76.15 vs 76.18 MiB (0.9996);
* step: 0.152 s vs 0.154 s wall (0.985), 0.304 vs 0.309 s CPU (0.983). The two run the same
  kernels (a torch.profiler count of one step: 27 matmuls each, 1,549 ops vs peft's 1,621): read
  it as "not slower" (an earlier run on a machine at load 5.6-7.8 gave 0.58, which was noise);
* first-step losses identical (difference 0.0), 7,680 trainable parameters each;
* the same on a quiet moment with 1 thread (ia3_vs_peft_1thread.json, load average 1.1, 20 steps,
  1 memory round): step 0.3636 vs 0.3618 s (1.005 wall, 1.003 CPU), peak RSS 603.9 vs 603.5 MiB
  (1.0007): equal within the noise, not below.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

METHOD = "ia3"


def build_model(layers: int, seed: int = 0) -> torch.nn.Module:
    """SmolLM2-135M's block shapes, ``layers`` deep, 2,048-token vocabulary, seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg)


def attach(model: torch.nn.Module, impl: str, method: str, recompute: bool = False) -> torch.nn.Module:
    if method == "ia3":
        targets, ff = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
        if impl == "peft":
            import peft

            return peft.get_peft_model(model, peft.IA3Config(target_modules=targets, feedforward_modules=ff))
        import peftlab

        peftlab.attach(model, "ia3")  # the defaults find exactly these modules
        return model
    if method == "vera":
        if impl == "peft":
            import peft

            return peft.get_peft_model(model, peft.VeraConfig(r=256, target_modules="all-linear"))
        import peftlab

        peftlab.attach(model, "vera", recompute=recompute)  # r=256 on all linear layers
        return model
    if method == "boft":  # one butterfly factor: what peft computes without its CUDA extension (any CPU)
        if impl == "peft":
            import peft

            return peft.get_peft_model(model, peft.BOFTConfig(boft_block_size=32, boft_n_butterfly_factor=1,
                                                              target_modules="all-linear"))
        import peftlab

        peftlab.attach(model, "boft", block_size=32, n_butterfly_factor=1)  # all linear layers
        return model
    raise ValueError(method)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _setup(impl: str, method: str, layers: int, batch: int, seq: int,
           recompute: bool = False) -> tuple[Any, Any, torch.Tensor]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = attach(build_model(layers), impl, method, recompute).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, opt, x


def _step(model: Any, opt: Any, x: torch.Tensor) -> float:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def memory_worker(impl: str, method: str, layers: int, batch: int, seq: int, steps: int,
                  recompute: bool = False) -> dict[str, Any]:
    """Peak resident-memory increase of ``steps`` training steps over the set-up model (own process)."""
    import gc

    import peft  # noqa: F401  (both libraries in every worker: equal import footprints)

    import peftlab  # noqa: F401

    model, opt, x = _setup(impl, method, layers, batch, seq, recompute)
    gc.collect()
    before = _rss_kib()
    reset = _reset_peak()  # the training loop's own peak, not the set-up's (imports, weight init)
    for _ in range(steps):
        _step(model, opt, x)
    peak = _peak_kib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    return {"impl": impl, "rss_before_kib": before, "peak_kib": peak, "peak_increase_kib": peak - before,
            "peak_reset": reset}


def _reset_peak() -> bool:
    """Reset the process's peak resident size (Linux >= 4.0: ``5`` into ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def saved_activation_bytes(model: Any, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward (parameters and buffers excluded):
    exact and free of allocator noise."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def run(method: str, argv: list[str] | None = None, doc: str = __doc__, script: str = __file__) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="memory workers per implementation")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recompute", action="store_true", help="VeRA: peftlab's recompute=True (less memory)")
    p.add_argument("--memory-worker", choices=["peft", "peftlab"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / f"{method}_vs_peft.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        result = memory_worker(args.memory_worker, method, args.layers, args.batch, args.seq, 2, args.recompute)
        print("RESULT " + json.dumps(result))
        return result

    # ---- time: both in this process, rotating order
    impls = ("peft", "peftlab")
    setups = {impl: _setup(impl, method, args.layers, args.batch, args.seq, args.recompute) for impl in impls}
    trainable = {impl: sum(p.numel() for p in m.parameters() if p.requires_grad) for impl, (m, _, _) in setups.items()}
    saved = {impl: saved_activation_bytes(m, x) / 2**20 for impl, (m, _, x) in setups.items()}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl: [] for impl in impls}
    losses: dict[str, list[float]] = {impl: [] for impl in impls}
    for i in range(args.warmup + args.steps):
        for impl in (impls if i % 2 == 0 else impls[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            losses[impl].append(_step(*setups[impl]))
            if i >= args.warmup:
                times[impl].append(time.perf_counter() - t0)
                cpu[impl].append(time.process_time() - c0)
    del setups
    loss_diff = max(abs(a - b) for a, b in zip(losses["peft"][:3], losses["peftlab"][:3]))
    step = {impl: statistics.median(v) for impl, v in times.items()}
    cpu_step = {impl: statistics.median(v) for impl, v in cpu.items()}
    iqr = {impl: statistics.quantiles(v, n=4)[::2] for impl, v in times.items()}
    print(f"median step: peft {step['peft']:.4f} s, peftlab {step['peftlab']:.4f} s", flush=True)

    # ---- memory: fresh processes, alternating
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            cmd = [sys.executable, script, "--memory-worker", impl, "--layers", str(args.layers),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
            cmd += ["--recompute"] if args.recompute else []
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
            rows.append({**row, "round": r})
            print(f"round {r} {impl}: peak +{row['peak_increase_kib'] / 1024:.1f} MiB", flush=True)
    mem = {impl: statistics.median([row["peak_increase_kib"] for row in rows if row["impl"] == impl]) / 1024
           for impl in impls}
    peak = {impl: statistics.median([row["peak_kib"] for row in rows if row["impl"] == impl]) / 1024
            for impl in impls}
    result = {
        "method": method, "peftlab_options": {"recompute": True} if args.recompute else {},
        "model": f"Llama, SmolLM2-135M block shapes x {args.layers} layers, vocab 2048, random",
        "dtype": "fp32", "device": "cpu", "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads,
        "load_average_1_5_15": os.getloadavg(), "trainable": trainable,
        "median_step_s": step, "step_quartiles_s": iqr, "median_step_cpu_s": cpu_step,
        "saved_activations_mib": saved,
        "median_peak_rss_mib": peak,
        "median_peak_increase_mib": mem,
        "step_time_ratio_peftlab_over_peft": step["peftlab"] / step["peft"],
        "step_cpu_time_ratio_peftlab_over_peft": cpu_step["peftlab"] / cpu_step["peft"],
        "peak_memory_ratio_peftlab_over_peft": peak["peftlab"] / peak["peft"],
        "saved_activations_ratio_peftlab_over_peft": saved["peftlab"] / saved["peft"],
        "peak_increase_ratio_peftlab_over_peft": mem["peftlab"] / mem["peft"],
        "max_abs_loss_difference_first_steps": loss_diff,
        "memory_rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "memory_rows"}, indent=2))
    return result


if __name__ == "__main__":
    run(METHOD)
