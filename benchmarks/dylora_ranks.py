#!/usr/bin/env python
"""One DyLoRA run versus separate LoRA runs at ranks 1, 2, 4, 8 (tweets, minilm, the lab trainer).

DyLoRA's claim (Valipour et al., 2023): one training run gives an adapter usable at every rank
up to r_max, so searching the rank costs one run instead of one per rank. This script trains

* one LoRA per rank in ``--ranks`` (alpha fixed, so the update scale is alpha / r), and
* one DyLoRA with ``r_max = max(ranks)``, ``r_min = 1`` and the same alpha (scale alpha / b),

all with the same data, steps, learning rate and seed through :func:`peftlab.lab.trainer.train`,
then scores every LoRA and the DyLoRA at each rank (:func:`peftlab.methods.dylora.set_rank`) on
the same test examples. It prints the score by rank for both and the training time of the two
approaches (the sum over the LoRA runs versus the one DyLoRA run; evaluation excluded).

Usage:
    python benchmarks/dylora_ranks.py                       # 4 x 50 + 50 steps: about 4 minutes on 2 idle cores
    python benchmarks/dylora_ranks.py --steps 150 --update-all   # and DyLoRA updating all of the first b ranks
    python benchmarks/dylora_ranks.py --steps 20 --test-examples 128   # quicker
    python benchmarks/dylora_ranks.py --out benchmarks/results/dylora_ranks.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _model(seed: int):
    from peftlab import models
    from peftlab.lab.tasks import get_task

    task = get_task("tweets")
    model, tok = models.load("minilm", num_labels=task.num_labels, seed=seed)
    torch.manual_seed(seed)  # the adapter's initialisation
    return task, model, tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--test-examples", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--update-all", action="store_true",
                   help="also train a DyLoRA that updates all of the first b ranks each step (update_all=True)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import peftlab
    from peftlab.lab.bench import head_modules
    from peftlab.lab.trainer import TrainConfig, subset, train
    from peftlab.methods import dylora

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                         eval_every=0, eval_examples=64, seed=args.seed, progress=False)

    def score(task, model, tok) -> float:
        test = subset(task.examples("test"), args.test_examples, 0)
        return task.evaluate(model, tok, test, batch_size=32, max_length=args.max_length)[task.metric]

    rows: dict[str, dict] = {"lora": {}, "dylora": {}}
    lora_seconds = 0.0
    for r in args.ranks:
        task, model, tok = _model(args.seed)
        peftlab.attach(model, "lora", r=r, alpha=args.alpha, modules_to_save=head_modules(model, task))
        result = train(model, tok, task, config)
        lora_seconds += result.seconds
        rows["lora"][r] = {"score": score(task, model, tok), "train_seconds": result.seconds,
                           "trainable": peftlab.summary(model).trainable}
        print(f"lora r={r}: {task.metric} {rows['lora'][r]['score']:.4f}, {result.seconds:.1f} s", flush=True)

    schemes = {"dylora": False, "dylora_update_all": True} if args.update_all else {"dylora": False}
    seconds: dict[str, float] = {}
    for label, update_all in schemes.items():
        rows.setdefault(label, {})
        task, model, tok = _model(args.seed)
        peftlab.attach(model, "dylora", r_max=max(args.ranks), r_min=1, alpha=args.alpha, update_all=update_all,
                       modules_to_save=head_modules(model, task))
        result = train(model, tok, task, config)
        seconds[label] = result.seconds
        for r in args.ranks:
            dylora.set_rank(model, r)
            began = time.perf_counter()
            rows[label][r] = {"score": score(task, model, tok), "eval_seconds": time.perf_counter() - began}
            print(f"{label} at rank {r}: {task.metric} {rows[label][r]['score']:.4f}", flush=True)
    dylora_seconds = seconds["dylora"]
    method = peftlab.adapters(model)["default"]
    sampled = [method.sample_rank(s, args.seed) for s in range(args.steps)]

    print()
    print(f"tweets / minilm, {args.steps} steps x batch {args.batch_size}, lr {args.lr:g}, alpha {args.alpha:g}, "
          f"seed {args.seed}; {task.metric} on {args.test_examples} test examples")
    print("| rank | LoRA (own run) | " + " | ".join(f"{k} (one run)" for k in schemes) + " |")
    print("|---:|---:|" + "---:|" * len(schemes))
    for r in args.ranks:
        print(f"| {r} | {rows['lora'][r]['score']:.4f} | " + " | ".join(f"{rows[k][r]['score']:.4f}" for k in schemes)
              + " |")
    for k, sec in seconds.items():
        print(f"training time: {len(args.ranks)} LoRA runs {lora_seconds:.1f} s, one {k} run {sec:.1f} s "
              f"({lora_seconds / sec:.2f}x less)")
    print(f"DyLoRA steps per sampled rank: {dict(sorted((b, sampled.count(b)) for b in set(sampled)))}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                        "lora_seconds": lora_seconds, "dylora_seconds": dylora_seconds,
                                        "dylora_seconds_by_scheme": seconds,
                                        "rows": rows, "sampled_ranks": sampled,
                                        "threads": torch.get_num_threads()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
