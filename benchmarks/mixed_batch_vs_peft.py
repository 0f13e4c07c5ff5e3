#!/usr/bin/env python
"""Mixed-adapter batches: peftlab.per_row vs peft's ``adapter_names`` batch, same run, same adapters.

n distinct LoRA adapters (ranks cycling through --ranks, alpha = 2r, on --targets) are attached
with peftlab, given non-zero weights, saved, and loaded into peft from those files (so both hold
the same adapters). A batch of --batch short prompts (the embedded chat data, left-padded) gives
row j to adapter j mod n. Per n:

* the outputs of the two are compared (max |logit difference|), then
* one forward of the batch is timed per implementation and round, in an order rotated each round
  (peftlab, peft, the base model without any adapter code), and the medians are compared. peftlab's time includes opening a new
  ``per_row`` block for every batch (its tile plan); the stacked weights are built on the first
  batch of a set of adapters and reused after (``stack_ms``: the first batch's time minus the
  median);
* with --new-tokens k, ``generate`` of k tokens (greedy) is timed the same way.

The cost of n adapters per token is ``(time - base time) / (batch x prompt tokens)``.

Usage:
    python benchmarks/mixed_batch_vs_peft.py                        # 2, 4, 16, 64 adapters
    python benchmarks/mixed_batch_vs_peft.py --quick                # tiny-llama smoke run
    python benchmarks/mixed_batch_vs_peft.py --device cuda --dtype bfloat16 --adapters 16 64
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent


def prompts(tokenizer: Any, n: int, max_tokens: int) -> dict[str, torch.Tensor]:
    from peftlab.lab.tasks import get_task

    texts = [p.prompt for p in get_task("chat").examples("train")[:n]]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens))


def build(base: torch.nn.Module, n: int, ranks: list[int], targets: list[str], folder: Path,
          device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """The same n adapters on two copies of ``base``: peftlab's, and peft's loaded from its files."""
    import peft

    import peftlab

    ours = copy.deepcopy(base)
    names = [f"task{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        r = ranks[i % len(ranks)]
        peftlab.attach(ours, "lora", name=name, r=r, alpha=2 * r, target_modules=targets)
        with torch.no_grad():
            for key, p in peftlab.adapter_parameters(ours, name).items():
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peftlab.save(ours, folder, names)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder / names[0]), adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(str(folder / name), adapter_name=name)
    ours.to(device=device, dtype=dtype).eval()
    theirs.to(device=device, dtype=dtype).eval()
    return ours, theirs, names


def timed(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(n: int, args: argparse.Namespace, base: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    import peftlab

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, names = build(base, n, args.ranks, args.targets, Path(tmp), args.device, dtype)
    rows = [names[j % n] for j in range(args.batch)]
    batch = {k: v.to(args.device) for k, v in batch.items()}

    def peftlab_forward() -> torch.Tensor:
        with peftlab.per_row(ours, rows):
            return ours(**batch).logits

    def peft_forward() -> torch.Tensor:
        return theirs(**batch, adapter_names=rows).logits

    plain = copy.deepcopy(base).to(device=args.device, dtype=dtype).eval()  # the base model, no adapter code at all

    def base_forward() -> torch.Tensor:
        return plain(**batch).logits

    gen_kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=batch["input_ids"][0, 0].item())

    def peftlab_generate() -> torch.Tensor:
        with peftlab.per_row(ours, rows):
            return ours.generate(**batch, **gen_kw)

    def peft_generate() -> torch.Tensor:
        return theirs.generate(**batch, adapter_names=rows, **gen_kw)

    def base_generate() -> torch.Tensor:
        return plain.generate(**batch, **gen_kw)

    with torch.inference_mode():
        stack_ms = 1000 * timed(peftlab_forward, args.device)  # first batch of this set: stacks the weights
        a, b = peftlab_forward().float(), peft_forward().float()
        diff = (a - b).abs().max().item()
        jobs = {"peftlab": peftlab_forward, "peft": peft_forward, "base": base_forward}
        times: dict[str, list[float]] = {k: [] for k in jobs}
        order = list(jobs)
        for rnd in range(args.rounds):
            for k in order[rnd % 3:] + order[:rnd % 3]:
                times[k].append(timed(jobs[k], args.device))
        gen_times: dict[str, list[float]] = {}
        same_tokens = None
        if args.new_tokens:
            gjobs = {"peftlab": peftlab_generate, "peft": peft_generate, "base": base_generate}
            same_tokens = bool(torch.equal(peftlab_generate(), peft_generate()))
            gen_times = {k: [] for k in gjobs}
            for rnd in range(max(1, args.rounds // 2)):
                for k in order[rnd % 3:] + order[:rnd % 3]:
                    gen_times[k].append(timed(gjobs[k], args.device))
    tokens = batch["input_ids"].numel()
    med = {k: statistics.median(v) for k, v in times.items()}
    row: dict[str, Any] = {
        "adapters": n, "batch": args.batch, "prompt_tokens": batch["input_ids"].shape[1], "tokens": tokens,
        "max_abs_logit_diff": diff, "first_batch_ms": stack_ms,
        "stack_ms": stack_ms - 1000 * statistics.median(times["peftlab"]),
        "forward_ms": {k: 1000 * v for k, v in med.items()},
        "forward_ms_all": {k: [1000 * t for t in v] for k, v in times.items()},
        "forward_ratio_peftlab_over_peft": med["peftlab"] / med["peft"],
        "us_per_token_over_base": {k: 1e6 * (med[k] - med["base"]) / tokens for k in ("peftlab", "peft")},
    }
    if gen_times:
        gmed = {k: statistics.median(v) for k, v in gen_times.items()}
        row.update(generate_ms={k: 1000 * v for k, v in gmed.items()},
                   generate_ratio_peftlab_over_peft=gmed["peftlab"] / gmed["peft"],
                   generate_same_tokens=same_tokens)
    del ours, theirs, plain
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", type=int, nargs="+", default=[2, 4, 16, 64])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 12, 16])
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16, help="prompt tokens at most (short prompts)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=0, help="also time generate() of this many tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="tiny-llama, 2 and 4 adapters, 2 rounds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.model, args.adapters, args.rounds, args.batch = "tiny-llama", [2, 4], 2, 8

    from peftlab import models

    base, tokenizer = models.load(args.model)
    base.eval()
    batch = prompts(tokenizer, args.batch, args.max_tokens)
    results = []
    for n in args.adapters:
        row = measure(n, args, base, batch)
        results.append(row)
        f = row["forward_ms"]
        print(f"{n:>3} adapters: peftlab {f['peftlab']:8.1f} ms  peft {f['peft']:8.1f} ms  "
              f"ratio {row['forward_ratio_peftlab_over_peft']:.3f}  base {f['base']:8.1f} ms  "
              f"us/token over base: peftlab {row['us_per_token_over_base']['peftlab']:7.2f} "
              f"peft {row['us_per_token_over_base']['peft']:7.2f}  stack {row['stack_ms']:.0f} ms  "
              f"max|diff| {row['max_abs_logit_diff']:.2e}"
              + (f"  generate ratio {row['generate_ratio_peftlab_over_peft']:.3f}"
                 f" same tokens {row['generate_same_tokens']}" if "generate_ms" in row else ""), flush=True)
    out = {
        "benchmark": "mixed_batch_vs_peft", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": args.device, "dtype": args.dtype, "loadavg_end": os.getloadavg()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    path = args.out or HERE / "results" / f"mixed_batch_vs_peft_{args.device}_{args.dtype}.json"
    if not args.quick or args.out:
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
