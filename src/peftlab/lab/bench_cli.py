"""``peftlab bench`` arguments."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from peftlab.core.errors import ConfigError

_BENCH_FILES = ("results.jsonl", "timings.jsonl", "baseline.json", "report.md", "report.html")
_BENCH_DIR = re.compile(r".+-(peftlab|peft)-seed-?\d+|base")
"""What ``peftlab bench`` writes into its run directory: the only entries --overwrite may delete."""


def check_overwrite(run_dir: Path) -> None:
    """Refuse ``--overwrite`` of a folder holding anything ``peftlab bench`` did not write (the
    bench replaces the whole folder), naming what is there."""
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if not (p.name in _BENCH_FILES or (p.suffix == ".png" and p.is_file())
                             or (p.is_dir() and _BENCH_DIR.fullmatch(p.name))))
    if foreign:
        raise ConfigError(f"--overwrite: {run_dir} holds files peftlab bench did not write ({foreign[:5]}"
                          f"{' ...' if len(foreign) > 5 else ''}), so nothing in it was deleted; move them away, "
                          "or pass another --run-dir / --name")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="embedded model name (default: the task's default model)")
    from peftlab.lab.data_cli import add_data_arguments

    add_data_arguments(p, task_default="tweets")  # --task, --data, --val-data, --test-data, --encoding
    p.add_argument("--methods", nargs="*", help="methods to compare (default: every applicable one; full is "
                                                "always added as the reference)")
    p.add_argument("--profile", default="default", help="default | full (3 seeds, more data) | smoke")
    p.add_argument("--vs", choices=["peft"], help="also train the peft library's version of each method it has")
    p.add_argument("--name", help="run name: results go to runs/<name>/ (default: <task>-<model>-<profile>)")
    p.add_argument("--run-dir", help="explicit results directory (overrides --name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping finished methods")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--options", default="{}", help='per-method options as JSON: {"lora": {"r": 16}}')
    g = p.add_argument_group("budget overrides (change the profile for every method alike)")
    g.add_argument("--steps", type=int, help="optimizer steps per method")
    g.add_argument("--batch-size", type=int, help="training batch size")
    g.add_argument("--max-length", type=int, help="tokens per example (longer ones are cut)")
    g.add_argument("--eval-every", type=int, help="validation every N steps")
    g.add_argument("--eval-examples", type=int, help="validation examples per evaluation")
    g.add_argument("--test-examples", type=int, help="test examples for the final score")
    g.add_argument("--seeds", type=int, nargs="+", help="seeds (mean +- std over them)")
    g.add_argument("--timing-rounds", type=int, help="rounds of the timing phase (each times every method once)")
    g.add_argument("--timing-steps", type=int, help="training steps timed per method and round")


def run(args: argparse.Namespace) -> int:
    from peftlab.lab.bench import BenchConfig
    from peftlab.lab.bench import run as bench
    from peftlab.lab.data_cli import data_files, data_task

    task = data_task(args, default="tweets")  # a bad file or a missing test split fails here, before training
    fields = ("steps", "batch_size", "max_length", "eval_every", "eval_examples", "test_examples", "seeds",
              "timing_rounds", "timing_steps")
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    name = args.name or f"{task.name}-{args.model or 'default'}-{args.profile}" + ("-custom" if overrides else "")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / name
    if args.overwrite:
        check_overwrite(run_dir)
    bench(BenchConfig(model=args.model, task=None if args.data else task.name, data=data_files(args),
                      encoding=args.encoding,
                      methods=args.methods,
                      profile=args.profile, vs_peft=args.vs == "peft", run_dir=run_dir, resume=args.resume,
                      overwrite=args.overwrite, options=json.loads(args.options),
                      overrides=overrides))
    return 0
