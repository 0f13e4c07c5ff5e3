"""Inference latency of the soft-prompt family against the base model, at sequence length 256.

    PYTHONPATH=src python benchmarks/prompt_latency.py                      # minilm + smollm2-135m, CPU
    PYTHONPATH=src python benchmarks/prompt_latency.py --device cuda --random-init

Each method gets ``num_virtual_tokens`` (default 20) virtual tokens, is attached, saved and loaded
into a fresh copy of the base (so P-tuning runs as it is served: from its saved encoder output,
with no prompt encoder), and timed on the same ``batch x 256`` input as the base. Variants are timed
in rotating order within every repeat, and the figure is the median over repeats of the per-repeat
ratio method/base, with its range.

On CPU the timer is the process's CPU time with one thread (``time.process_time``), so other work
on a shared machine disturbs the ratio little; on CUDA it is wall time around synchronised calls.
``--random-init`` builds each model from its config numbers with random weights (latency does not
depend on the values), for machines without the embedded model packages. The results go to
``benchmarks/results/prompt_latency[_cuda].json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import peftlab

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
OUT = Path(__file__).resolve().parent / "results"


def build(name: str, random_init: bool, config_dir: Path | None) -> torch.nn.Module:
    """The embedded model with its real weights, or the same architecture with random weights."""
    if not random_init:
        from peftlab import models

        model, _ = models.load(name, with_tokenizer=False)
        return model.eval()
    import transformers

    from peftlab.estimate.arch import resolve

    src = resolve(str(config_dir / name) if config_dir and (config_dir / name).exists() else name)
    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "classifier": transformers.AutoModelForSequenceClassification}[src.head]
    torch.manual_seed(0)
    model = auto.from_config(src.config())
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model.eval()


def timer(device: str):
    if device == "cuda":
        def run(fn) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - start
    else:
        def run(fn) -> float:
            start = time.process_time()
            fn()
            return time.process_time() - start
    return run


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    base = build(name, args.random_init, args.config_dir).to(args.device)
    variants: dict[str, torch.nn.Module] = {"base": base}
    params: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            trained = build(name, args.random_init, args.config_dir)
            peftlab.attach(trained, method, num_virtual_tokens=args.tokens)
            params[method] = peftlab.summary(trained).trainable
            peftlab.save(trained, Path(tmp) / method)
            served = build(name, args.random_init, args.config_dir)
            peftlab.load(served, Path(tmp) / method)
            variants[method] = served.to(args.device).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)}
    run = timer(args.device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    with torch.inference_mode():
        for model in variants.values():
            model(**batch)  # warm-up
        for rep in range(args.repeats):
            k = rep % len(order)
            for label in order[k:] + order[:k]:
                model = variants[label]
                times[label].append(statistics.median(run(lambda: model(**batch)) for _ in range(args.calls)))
    ratios = {m: [t / b for t, b in zip(times[m], times["base"])] for m in METHODS}
    return {
        "model": name, "batch": args.batch, "seq": args.seq, "virtual_tokens": args.tokens,
        "base_ms": 1000 * statistics.median(times["base"]),
        "methods": {m: {"trainable": params[m], "ms": 1000 * statistics.median(times[m]),
                        "ratio": statistics.median(ratios[m]), "ratio_min": min(ratios[m]),
                        "ratio_max": max(ratios[m])} for m in METHODS},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", nargs="*", default=["minilm", "smollm2-135m"])
    p.add_argument("--tokens", type=int, default=20, help="virtual tokens per method")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=5, help="timed calls per variant and repeat (median)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--config-dir", type=Path, help="folder of <model>/config.json for --random-init")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows = []
    print(f"device {args.device}, batch {args.batch} x {args.seq} tokens, {args.tokens} virtual tokens; "
          f"ratio = method / base latency (median over {args.repeats} interleaved repeats, range)")
    print("| model | base ms | method | trainable | ms | ratio | range |\n|---|---:|---|---:|---:|---:|---|")
    for name in args.models:
        row = measure(name, args)
        rows.append(row)
        for m, r in row["methods"].items():
            print(f"| {name} | {row['base_ms']:.1f} | {m} | {r['trainable']:,} | {r['ms']:.1f} | {r['ratio']:.3f} | "
                  f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} |", flush=True)
    out = args.json or OUT / ("prompt_latency_cuda.json" if args.device == "cuda" else "prompt_latency.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
