"""``peftlab recommend`` arguments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="embedded model name, preset (e.g. llama-2-7b) or config.json path")
    p.add_argument("--budget", help="memory per device, e.g. 24GB (methods that do not fit rank last)")
    p.add_argument("--latency-critical", action="store_true", help="inference latency matters more than a "
                                                                   "fraction of a score point")
    p.add_argument("--tasks", type=int, default=1, help="number of tasks served from one base model")
    p.add_argument("--batch", type=int, default=8, help="training batch size to check the budget at")
    p.add_argument("--seq", type=int, default=512, help="training sequence length to check the budget at")
    p.add_argument("--results", nargs="*", default=[], help="`peftlab bench` run directories or results.jsonl "
                                                           "files (measured evidence; default: runs/*/ for this model)")
    p.add_argument("--methods", nargs="*", help="candidates (default: every registered method, full included)")
    p.add_argument("--objective", choices=["score", "params"], default="score",
                   help="score: best expected score (default); params: fewest trainable parameters")
    p.add_argument("--settings", default="{}", help='estimator settings as JSON: {"dtype": "bf16", '
                                                   '"checkpointing": "full"}')
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")


def run(args: argparse.Namespace) -> int:
    from peftlab.lab.recommend import Need, recommend, suggestions, table, to_json

    results = [Path(r) for r in args.results]
    if not args.results:
        results = [p.parent for p in sorted(Path("runs").glob("*/results.jsonl"))]
    need = Need(model=args.model, budget=args.budget, latency_critical=args.latency_critical, tasks=args.tasks,
                batch=args.batch, seq=args.seq, results=tuple(results),
                methods=tuple(args.methods) if args.methods else None,
                settings=tuple(json.loads(args.settings).items()), objective=args.objective)
    picks = recommend(need)
    if args.json:
        print(to_json(picks))
        return 0
    used = [str(r) for r in results]
    print(f"recommendation for {args.model}" + (f", {args.budget} per device" if args.budget else "")
          + (", latency-critical" if args.latency_critical else "") + f", {args.tasks} task(s)"
          + (", fewest trainable parameters" if args.objective == "params" else ""))
    print("measured evidence: " + (", ".join(used) if used else "none (run `peftlab bench` to measure)"))
    print(table(picks))
    if picks and picks[0].fits is not False and not picks[0].reason.startswith("does not apply"):
        print(f"\npick: {picks[0].method}")
        return 0
    lines = suggestions(need, picks)
    if lines:
        print(f"\nno pick: {lines[0]}. What would fit (estimated):")
        print("\n".join(f"  - {line}" for line in lines[1:]))
    return 0
