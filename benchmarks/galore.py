"""GaLore on smollm2-135m (CPU): optimizer state, peak training memory, SVD-refresh time, chat loss.

    python benchmarks/galore.py                      # memory (+ state, refresh time) and chat
    python benchmarks/galore.py --parts memory       # some parts only (merged into the JSON)
    python benchmarks/galore.py --parts time         # a longer refresh/normal timing run

Results go to ``benchmarks/results/galore.json``. Every measurement runs in its own fresh process
with one torch thread (on a shared two-core machine two threads oversubscribe the cores and an
SVD slows down ten-fold). GaLore is rank 128 on the attention and MLP linears (the paper's
``[".*attn.*", ".*mlp.*"]``), ``update_proj_gap=200``.

* ``memory``: AdamW (full fine-tuning), GaLore, GaLore with 8-bit moments and layer-wise GaLore,
  two training steps each: the model is loaded and copied into anonymous memory, the baseline
  RSS read and the kernel's peak counter reset (``/proc/self/clear_refs``); measured = peak RSS
  (``VmHWM``) minus the baseline (the weights are in the baseline), with glibc's mmap threshold
  at 64 KiB so freed tensors leave RSS. Gradients are freed between steps (``set_to_none``).
  The same runs give the optimizer's real state bytes on the targeted weights against AdamW's
  two fp32 moments (``state``), and, since step 1 refreshes the projectors (an SVD of every
  targeted gradient) and step 2 does not, the refresh/normal step-time ratio (``refresh_time``;
  one pair per variant, not interleaved: see ``time`` for that).
* ``time`` (optional, slow on a CPU): ``update_proj_gap=2`` so refresh and normal steps alternate
  in one run; medians and min-max of the refresh/normal ratios.
* ``chat``: full fine-tuning, LoRA (r 16 on q/k/v/o) and GaLore trained with the lab trainer on
  the ``chat`` task with the same tiny budget (``CHAT``); validation loss before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "galore.json"
MODEL = "smollm2-135m"
TARGETS = [r".*attn.*", r".*mlp.*"]
RANK = 128
MEMORY_VARIANTS = ("adamw", "galore", "galore-8bit", "galore-layerwise")
CHAT = {"steps": 6, "batch_size": 4, "max_length": 40, "eval_examples": 32, "train_examples": 400,
        "warmup_ratio": 0.1}
CHAT_METHODS = {"full": (None, 5e-5), "lora": ({"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                                               None),
                "galore": ({"rank": RANK, "target_modules": TARGETS, "update_proj_gap": 200}, None)}


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load(threads: int = 1) -> Any:
    import torch

    from peftlab import models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = models.load(MODEL, with_tokenizer=False)
    with torch.no_grad():  # into anonymous memory: no memory-mapped checkpoint pages
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    _trim()
    return model.train()


def _optimizer(model: Any, variant: str) -> Any:
    import torch

    from peftlab.optim import GaLoreAdamW

    model.requires_grad_(True)
    if variant == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-5)
    return GaLoreAdamW.for_model(model, TARGETS, lr=1e-5, rank=RANK, update_proj_gap=200,
                                 eight_bit=variant == "galore-8bit", layerwise=variant == "galore-layerwise")


def _batch(model: Any, batch: int, seq: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


def _timed_step(model: Any, ids: Any, opt: Any) -> dict[str, float]:
    """One training step (forward + backward, optimizer step, zero_grad) and its timings."""
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    return {"forward_backward_s": t1 - t0, "optimizer_s": t2 - t1, "total_s": t2 - t0}


def work_memory(variant: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    from peftlab.optim import galore_weights

    model = _load()
    ids = _batch(model, batch, seq)
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    opt = _optimizer(model, variant)
    times = [_timed_step(model, ids, opt) for _ in range(steps)]
    peak = _rss_kib("VmHWM")
    targeted = {id(p) for p in galore_weights(model, TARGETS).values()}

    def size(keep: Any) -> int:
        return sum(t.numel() * t.element_size() for p, s in opt.state.items() if keep(p)
                   for t in s.values() if hasattr(t, "numel"))

    return {"variant": variant, "baseline_bytes": base * 1024, "peak_bytes": peak * 1024,
            "peak_over_baseline_bytes": (peak - base) * 1024, "optimizer_state_bytes": size(lambda p: True),
            "optimizer_state_bytes_targeted": size(lambda p: id(p) in targeted),
            "adamw_moment_bytes_targeted": sum(2 * p.numel() * p.element_size() for p in model.parameters()
                                               if id(p) in targeted),
            "step_times": times}


def work_time(batch: int, seq: int, steps: int) -> dict[str, Any]:
    import torch

    from peftlab.optim import GaLoreAdamW, galore_weights

    model = _load()
    ids = _batch(model, batch, seq)
    model.requires_grad_(True)
    opt = GaLoreAdamW.for_model(model, TARGETS, lr=1e-5, rank=RANK, update_proj_gap=2)
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "refresh": (step - 1) % 2 == 0, **_timed_step(model, ids, opt)})
        if step == 1:
            targeted = list(galore_weights(model, TARGETS).values())
            state = {"targeted_weights": len(targeted),
                     "targeted_params": sum(p.numel() for p in targeted),
                     "galore_state_bytes_targeted": opt.state_bytes(targeted),
                     "adamw_state_bytes_targeted": sum(2 * p.numel() * p.element_size() for p in targeted),
                     "galore_state_bytes_model": opt.state_bytes(),
                     "adamw_state_bytes_model": sum(2 * p.numel() * p.element_size() for p in model.parameters())}
            state["ratio_targeted"] = state["galore_state_bytes_targeted"] / state["adamw_state_bytes_targeted"]
            state["ratio_model"] = state["galore_state_bytes_model"] / state["adamw_state_bytes_model"]
    measured = rows[1:]  # step 1 also allocates the state: a warm-up
    out: dict[str, Any] = {"steps": rows, "state": state, "threads": torch.get_num_threads()}
    for key in ("optimizer_s", "total_s"):
        refresh = [r[key] for r in measured if r["refresh"]]
        normal = [r[key] for r in measured if not r["refresh"]]
        ratios = [a / b for a, b in zip(refresh, normal)]
        out[f"{key}_refresh_median"] = statistics.median(refresh)
        out[f"{key}_normal_median"] = statistics.median(normal)
        out[f"{key}_ratio_median"] = statistics.median(ratios)
        out[f"{key}_ratio_min"], out[f"{key}_ratio_max"] = min(ratios), max(ratios)
    extra = out["total_s_refresh_median"] - out["total_s_normal_median"]
    out["amortized_overhead_at_gap"] = {g: extra / (g * out["total_s_normal_median"]) for g in (50, 200, 500)}
    return out


def work_chat(method: str) -> dict[str, Any]:
    import warnings

    import torch

    import peftlab
    from peftlab import models
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import TrainConfig, train

    torch.set_num_threads(1)
    options, lr = CHAT_METHODS[method]
    model, tok = models.load(MODEL, seed=0)
    if options is None:
        model.requires_grad_(True)
    else:
        peftlab.attach(model, method, **options)
        lr = peftlab.method_class(method).suggested_lr
    task = get_task("chat")
    config = TrainConfig(lr=lr, eval_every=0, progress=False, seed=0, **CHAT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = task.evaluate(model, tok, __import__("peftlab.lab.trainer", fromlist=["subset"]).subset(
            task.examples("validation"), CHAT["eval_examples"], 0), batch_size=CHAT["batch_size"],
            max_length=CHAT["max_length"])
        result = train(model, tok, task, config)
    return {"method": method, "lr": lr, "options": options, "budget": CHAT, "val_loss_before": before["loss"],
            "val_loss": result.final["loss"], "seconds_per_step": result.seconds_per_step,
            "train_loss_last": result.history[-1]["loss"]}


def _spawn(*args: str) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "PYTHONPATH": str(ROOT / "src"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["memory", "chat"], choices=["time", "memory", "chat"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--time-steps", type=int, default=7)
    ap.add_argument("--variants", nargs="*", default=list(MEMORY_VARIANTS), choices=MEMORY_VARIANTS,
                    help="memory variants to (re)measure; the others keep their stored rows")
    ap.add_argument("--worker", nargs="*")
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "memory":
            result = work_memory(rest[0], args.batch, args.seq, args.memory_steps)
        elif kind == "time":
            result = work_time(args.batch, args.seq, args.time_steps)
        else:
            result = work_chat(rest[0])
        print(json.dumps(result))
        return
    results: dict[str, Any] = {}
    results["setting"] = {"model": MODEL, "device": "cpu", "rank": RANK, "targets": TARGETS, "batch": args.batch,
                          "seq": args.seq, "memory_steps": args.memory_steps, "time_steps": args.time_steps,
                          "chat": CHAT, "cpus": os.cpu_count(), "torch_threads": 1,
                          "load_average_at_start": os.getloadavg()}

    def save() -> None:  # merge: parts may run in concurrent drivers
        OUT.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(OUT.read_text()) if OUT.exists() else {}
        merged.update(results)
        OUT.write_text(json.dumps(merged, indent=1) + "\n")

    if "time" in args.parts:
        t = _spawn("time", "--batch", str(args.batch), "--seq", str(args.seq), "--time-steps", str(args.time_steps))
        results["state"], results["time"] = t.pop("state"), t
        save()
        print(f"state on targeted weights: {results['state']['ratio_targeted']:.3f}x AdamW; "
              f"refresh/normal step: {t['total_s_ratio_median']:.2f}x (optimizer alone {t['optimizer_s_ratio_median']:.1f}x)")
    if "memory" in args.parts:
        stored = (json.loads(OUT.read_text()) if OUT.exists() else {}).get("memory", {})
        runs: dict[str, list[dict[str, Any]]] = {v: [stored[v]] for v in MEMORY_VARIANTS
                                                 if v in stored and v not in args.variants}
        for variant in args.variants:
            runs[variant] = []
            runs[variant].append(_spawn("memory", variant, "--batch", str(args.batch), "--seq", str(args.seq),
                                        "--memory-steps", str(args.memory_steps)))
            print(f"{variant}: peak over loaded model {runs[variant][-1]['peak_over_baseline_bytes'] / 2**20:.0f} MiB")
        adamw = runs["adamw"][0]["peak_over_baseline_bytes"]
        results["memory"] = {v: {**r[0], "vs_adamw": r[0]["peak_over_baseline_bytes"] / adamw} for v, r in runs.items()}
        g = runs["galore"][0]
        results["state"] = {"galore_state_bytes_targeted": g["optimizer_state_bytes_targeted"],
                            "adamw_state_bytes_targeted": g["adamw_moment_bytes_targeted"],
                            "ratio_targeted": g["optimizer_state_bytes_targeted"] / g["adamw_moment_bytes_targeted"],
                            "ratio_model": g["optimizer_state_bytes"] / runs["adamw"][0]["optimizer_state_bytes"],
                            "ratio_model_8bit": runs["galore-8bit"][0]["optimizer_state_bytes"]
                            / runs["adamw"][0]["optimizer_state_bytes"]}
        if args.memory_steps >= 2:  # step 1 refreshes the projectors (SVDs), step 2 does not (gap 200)
            results["refresh_time"] = {
                v: {"refresh_step_s": r[0]["step_times"][0]["total_s"], "normal_step_s": r[0]["step_times"][1]["total_s"],
                    "ratio": r[0]["step_times"][0]["total_s"] / r[0]["step_times"][1]["total_s"],
                    "optimizer_ratio": r[0]["step_times"][0]["optimizer_s"] / r[0]["step_times"][1]["optimizer_s"]}
                for v, r in runs.items()}
        print(json.dumps(results["state"]), json.dumps(results.get("refresh_time")))
        save()
    if "chat" in args.parts:
        results["chat"] = {}
        for method in CHAT_METHODS:
            results["chat"][method] = _spawn("chat", method)
            print(f"chat {method}: val loss {results['chat'][method]['val_loss_before']:.3f} -> "
                  f"{results['chat'][method]['val_loss']:.3f}")
            save()
    save()
    print(f"results: {OUT}")


if __name__ == "__main__":
    main()
