#!/usr/bin/env python
"""peftlab's pure-PyTorch AdamW8bit vs bitsandbytes' AdamW8bit on CPU, in ONE process.

Step time: one 1024 x 1024 weight (1M parameters, 8-bit moments), a fixed gradient, both
optimizers stepping it in turns (A B B A ...), ``--rounds`` rounds of ``--steps`` steps each; the
ratio is the median of the per-round ratios fallback / bitsandbytes (and the ratio of the medians),
with the machine's load average beside it.

Accuracy: 50 steps on a least-squares fit of the same weight from the same start; the relative
distance ``||w - w_fp32|| / ||w_fp32 - w_start||`` to ``torch.optim.AdamW`` for bitsandbytes and
for the fallback at block sizes 256 (default, bitsandbytes') and 2048, and the fraction of 8-bit
moment codes on which the fallback and bitsandbytes agree after one step from the same state.

    PYTHONPATH=src python benchmarks/adamw8bit.py [--rounds 15] [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _time_steps(opt: torch.optim.Optimizer, p: torch.nn.Parameter, grad: torch.Tensor, steps: int) -> float:
    p.grad = grad
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps


def _fit(make: Any, start: torch.Tensor, target: torch.Tensor, steps: int) -> torch.Tensor:
    w = torch.nn.Parameter(start.clone())
    opt = make([w])
    for _ in range(steps):
        w.grad = 2 * (w.detach() - target) / target.numel() * 1e3
        opt.step()
    return w.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="the weight is size x size")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="timed steps per optimizer per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "adamw8bit.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from peftlab.optim import AdamW8bit
    from peftlab.quant import import_bitsandbytes

    bnb = import_bitsandbytes()
    if bnb is None:
        raise SystemExit("this benchmark compares against bitsandbytes: pip install bitsandbytes")
    g = torch.Generator().manual_seed(0)
    start = torch.randn(args.size, args.size, generator=g) * 0.02
    target = torch.randn(args.size, args.size, generator=g) * 0.02
    grad = torch.randn(args.size, args.size, generator=g) * 1e-3
    kw = {"lr": 1e-3, "weight_decay": 1e-2}

    # ---- step time, interleaved
    params = {"fallback": torch.nn.Parameter(start.clone()), "bitsandbytes": torch.nn.Parameter(start.clone())}
    opts = {"fallback": AdamW8bit([params["fallback"]], **kw),
            "bitsandbytes": bnb.optim.AdamW8bit([params["bitsandbytes"]], **kw)}
    for name in opts:  # warm-up: state allocation, lookup tables
        _time_steps(opts[name], params[name], grad, 2)
    times: dict[str, list[float]] = {name: [] for name in opts}
    order = ["fallback", "bitsandbytes"]
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(_time_steps(opts[name], params[name], grad, args.steps))
    pair = [a / b for a, b in zip(times["fallback"], times["bitsandbytes"])]
    med = {k: statistics.median(v) for k, v in times.items()}

    # ---- accuracy against fp32 AdamW
    steps = 50
    ref = _fit(lambda ps: torch.optim.AdamW(ps, **kw), start, target, steps)
    travelled = float((ref - start).norm())
    fits = {"bitsandbytes": _fit(lambda ps: bnb.optim.AdamW8bit(ps, **kw), start, target, steps),
            "fallback_256": _fit(lambda ps: AdamW8bit(ps, **kw), start, target, steps),
            "fallback_2048": _fit(lambda ps: AdamW8bit(ps, blocksize=2048, **kw), start, target, steps)}
    distance = {k: float((w - ref).norm()) / travelled for k, w in fits.items()}

    # ---- the quantized state after one step from the same (zero) state
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    oa, ob = AdamW8bit([a], **kw), bnb.optim.AdamW8bit([b], **kw)
    a.grad, b.grad = grad.clone(), grad.clone()
    oa.step()
    ob.step()
    sa, sb = oa.state[a], ob.state[b]
    agree = {"m_codes": float((sa["m_codes"] == sb["state1"].reshape(-1)).float().mean()),
             "v_codes": float((sa["v_codes"] == sb["state2"].reshape(-1)).float().mean()),
             "m_absmax_equal": bool(torch.equal(sa["m_absmax"], sb["absmax1"])),
             "v_absmax_equal": bool(torch.equal(sa["v_absmax"], sb["absmax2"]))}

    result = {
        "torch": torch.__version__, "bitsandbytes": bnb.__version__, "threads": args.threads,
        "parameters": args.size * args.size, "rounds": args.rounds, "steps_per_round": args.steps,
        "load_average": os.getloadavg(),
        "median_step_ms": {k: v * 1e3 for k, v in med.items()},
        "ratio_fallback_over_bitsandbytes": statistics.median(pair),
        "ratio_of_medians": med["fallback"] / med["bitsandbytes"],
        "pair_ratios": pair,
        "distance_to_fp32_adamw_after_50_steps": distance,
        "state_after_one_step": agree,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_ms", "ratio_fallback_over_bitsandbytes",
                                             "distance_to_fp32_adamw_after_50_steps", "state_after_one_step",
                                             "load_average")}, indent=1))


if __name__ == "__main__":
    main()
