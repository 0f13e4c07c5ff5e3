#!/usr/bin/env python
"""QLoRA on smollm2-135m: weight memory, training step time and peak memory, chat-task score.

Everything is measured in ONE invocation and reported as ratios (absolute seconds and bytes are
listed too, but depend on the machine):

* Weight memory: bytes of the model's weights stored as fp32, bf16, NF4 (fp32 block constants)
  and NF4 + double quantization (every linear layer but the head quantized, everything else in
  bf16, as QLoRA stores a model), and the measured bytes per quantized weight.
* Training: every (variant, repeat) runs in its own subprocess; the variants are interleaved
  with the order rotated each repeat, and medians over repeats are compared. Variants:
  ``lora`` (peftlab LoRA, fp32 base), ``qlora`` (peftlab QLoRA, bitsandbytes kernels where
  installed), ``qlora-torch`` (peftlab QLoRA, pure-PyTorch path), ``peft-qlora`` (peft LoRA on
  bitsandbytes ``Linear4bit`` layers: NF4, double quantization, fp32 compute). Same LoRA
  (r=8, alpha=16, every linear layer but the head), batch, sequence and seed; fp32 compute
  everywhere (CPU). A step is forward + backward + AdamW step + zero_grad. Peak memory is the
  process's resident high-water mark, reset with ``/proc/self/clear_refs`` after the model is
  built and quantized (and glibc's free memory trimmed), so it is the training peak.
* 8-bit AdamW: optimizer state bytes of AdamW vs peftlab's AdamW8bit after one step on the QLoRA
  adapters, in the qlora subprocess.
* Chat-task score: ``peftlab bench --task chat --model smollm2-135m --methods lora qlora``
  (``--bench-profile``, default ``smoke``), its metrics copied into the result.

Usage:
    python benchmarks/qlora.py                       # writes benchmarks/results/qlora.json
    python benchmarks/qlora.py --quick               # tiny-llama, seconds
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULT_MARK = "@@QLORA_RESULT@@ "
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("lora", "qlora", "qlora-torch", "peft-qlora")
TARGETS = {"step_time_ratio_vs_peft": 1.0, "peak_rss_ratio_vs_peft": 1.0, "bytes_per_quantized_param": 0.53}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _load(model_name: str):
    import torch

    from peftlab import models

    model, _ = models.load(model_name, with_tokenizer=False)
    return model.to(torch.float32).train()


def _peft_qlora(model: Any, r: int) -> Any:
    """peft + bitsandbytes QLoRA: Linear4bit (NF4, double quant, fp32 compute) in place of every
    linear layer but the head, then peft's LoRA on them."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                if child.bias is not None:
                    q.bias = child.bias
                setattr(module, child_name, q.to("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config)


def worker(args: argparse.Namespace) -> None:
    import torch

    import peftlab

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _load(args.model)
    r = args.r
    extra: dict[str, Any] = {}
    if args.variant == "lora":
        peftlab.attach(model, "lora", r=r, alpha=2 * r)
    elif args.variant in ("qlora", "qlora-torch"):
        backend = "torch" if args.variant == "qlora-torch" else "auto"
        peftlab.attach(model, "qlora", r=r, alpha=2 * r, backend=backend)
        from peftlab import quant

        extra["storage"] = quant.storage(model)
        extra["backend"] = next(m for _, m in quant.quantized_modules(model)).peftlab_quant.resolved_backend()
    else:
        model = _peft_qlora(model, r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    after_load = _rss_kb()
    _reset_peak()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = _peak_kb()
    if args.variant == "qlora":  # 8-bit AdamW state vs AdamW's, on the same adapters
        from peftlab.optim import AdamW8bit

        o8 = AdamW8bit(params, lr=1e-4)
        model(input_ids=ids, labels=ids).loss.backward()
        o8.step()
        fp32_state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                         if isinstance(t, torch.Tensor))
        extra["optimizer_state_bytes"] = {"adamw": fp32_state, "adamw8bit": o8.state_bytes(),
                                          "ratio": o8.state_bytes() / fp32_state}
    print(RESULT_MARK + json.dumps({"variant": args.variant, "step_s": times, "peak_kb": peak,
                                    "after_load_kb": after_load, **extra}), flush=True)


def weight_memory(model_name: str) -> dict[str, Any]:
    """Weight bytes of the whole model in each storage, measured from the tensors built."""
    import torch

    import peftlab.quant as quant

    out: dict[str, Any] = {}
    model = _load(model_name)

    def size(m: Any) -> int:
        seen = {}
        for t in list(m.parameters()) + list(m.buffers()):
            seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    out["fp32_bytes"] = size(model)
    out["bf16_bytes"] = size(model.to(torch.bfloat16))
    bf16 = model  # cast in place above
    for label, dq in (("nf4", False), ("nf4_dq", True)):
        m = copy.deepcopy(bf16)
        t0 = time.perf_counter()
        quant.quantize(m, double_quant=dq, backend="torch")
        out[f"{label}_quantize_s"] = time.perf_counter() - t0
        out[f"{label}_bytes"] = size(m)
        s = quant.storage(m)
        out[f"{label}_bytes_per_quantized_param"] = s["bytes_per_param"]
        errs = [mod.quant_info().rel_error for _, mod in quant.quantized_modules(m)]
        out[f"{label}_rel_error_median"] = statistics.median(errs)
        out[f"{label}_quantized_params"] = s["weights"]
    out["ratios_vs_fp32"] = {k: out[f"{k}_bytes"] / out["fp32_bytes"] for k in ("bf16", "nf4", "nf4_dq")}
    return out


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--r", str(args.r),
           "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")


def chat_score(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = ROOT / "runs" / f"qlora-chat-{args.bench_profile}"
    cmd = [sys.executable, "-m", "peftlab.cli", "bench", "--task", "chat", "--model", args.model, "--methods",
           "lora", "qlora", "--profile", args.bench_profile, "--run-dir", str(run_dir), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    rows = []
    results = run_dir / "results.jsonl"
    if results.is_file():
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "rows": rows, "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bench-profile", default="smoke")
    p.add_argument("--no-chat", action="store_true", help="skip the chat-task score")
    p.add_argument("--quick", action="store_true", help="tiny-llama, 1 repeat, no chat score")
    p.add_argument("--out", default=str(HERE / "results" / "qlora.json"))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    if args.quick:
        args.model, args.repeats, args.no_chat, args.seq = "tiny-llama", 1, True, 32
    variants = list(VARIANTS)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        variants = [v for v in variants if v != "peft-qlora"]
    result: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in ("model", "batch", "seq", "steps", "warmup", "repeats", "r",
                                                     "threads")},
        "targets": TARGETS,
    }
    print("weight memory ...", flush=True)
    result["weight_memory"] = weight_memory(args.model)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            print(f"repeat {rep}: {v} ...", flush=True)
            runs[v].append(run_variant(v, args))
    summary: dict[str, Any] = {}
    for v, rs in runs.items():
        med = [statistics.median(r["step_s"]) for r in rs]
        summary[v] = {"step_s_median": statistics.median(med), "step_s_per_repeat": med,
                      "peak_mb_median": statistics.median(r["peak_kb"] for r in rs) / 1024,
                      "peak_mb_per_repeat": [r["peak_kb"] / 1024 for r in rs],
                      "after_load_mb_median": statistics.median(r["after_load_kb"] for r in rs) / 1024}
        for key in ("storage", "backend", "optimizer_state_bytes"):
            if key in rs[0]:
                summary[v][key] = rs[0][key]
    ratios: dict[str, Any] = {}
    for v in variants:
        if v == "lora":
            continue
        ratios[f"{v}/lora"] = {"step_time": summary[v]["step_s_median"] / summary["lora"]["step_s_median"],
                               "peak_rss": summary[v]["peak_mb_median"] / summary["lora"]["peak_mb_median"]}
    if "peft-qlora" in summary:
        for v in ("qlora", "qlora-torch"):
            ratios[f"{v}/peft-qlora"] = {
                "step_time": summary[v]["step_s_median"] / summary["peft-qlora"]["step_s_median"],
                "peak_rss": summary[v]["peak_mb_median"] / summary["peft-qlora"]["peak_mb_median"]}
    result["training"] = summary
    result["ratios"] = ratios
    if not args.no_chat:
        print("chat-task score ...", flush=True)
        result["chat"] = chat_score(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"weight_memory": result["weight_memory"], "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
