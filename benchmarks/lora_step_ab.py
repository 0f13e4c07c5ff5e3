#!/usr/bin/env python
"""peftlab LoRA vs peft LoRA training steps, alternated in ONE process (ABBA order).

``lora_vs_peft.py`` runs each variant in its own process, so slow drifts of a shared machine
between processes (seen here: the same variant 5.4 s in one run, 6.6 s in the next) land in the
ratio. Here both models live in one process, start from the same weights (peft's LoRA tensors are
copied from peftlab's) and take turns step by step: A B B A A B ..., so drift hits both alike.
A step is forward + backward + AdamW step + zero_grad, smollm2-135m, r=8 on q_proj/v_proj, fp32.

    PYTHONPATH=src python benchmarks/lora_step_ab.py [--steps 12] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_step_ab.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import peft

    import peftlab
    from peftlab import models

    base, _ = models.load(args.model, with_tokenizer=False)
    targets = ["q_proj", "v_proj"]
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    peftlab.attach(ours, "lora", r=8, alpha=16, target_modules=targets)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                         target_modules=targets))
    del base
    mine = dict(peftlab.adapter_parameters(ours, "default"))
    with torch.no_grad():  # same starting LoRA weights
        for k, v in theirs.named_parameters():
            if v.requires_grad:
                key = k.removeprefix("base_model.model.")
                v.copy_(mine[key])
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in (("peftlab", ours), ("peft", theirs))}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, ours.config.vocab_size, (args.batch, args.seq), generator=g)

    def step(name: str) -> tuple[float, float]:
        m = ours if name == "peftlab" else theirs
        w0, c0 = time.perf_counter(), time.process_time()
        m(input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - w0, time.process_time() - c0

    order = []
    for i in range(args.warmup + args.steps):
        pair = ("peftlab", "peft") if i % 2 == 0 else ("peft", "peftlab")
        order.extend((i, n) for n in pair)
    times: dict[str, list[tuple[float, float]]] = {"peftlab": [], "peft": []}
    pairs = []
    current: dict[str, float] = {}
    for i, name in order:
        wall, cpu = step(name)
        if i >= args.warmup:
            times[name].append((wall, cpu))
            current[name] = wall
            if len(current) == 2:
                pairs.append(current["peftlab"] / current["peft"])
                current = {}
        print(f"step {i} {name:8s} {wall:.3f} s (cpu {cpu:.3f} s)", flush=True)
    med = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
    cpu = {n: statistics.median(c for _, c in t) for n, t in times.items()}
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "threads": args.threads, "steps": args.steps,
              "median_step_s": med, "median_cpu_s": cpu, "ratio_of_medians": med["peftlab"] / med["peft"],
              "cpu_ratio_of_medians": cpu["peftlab"] / cpu["peft"], "pair_ratios": pairs,
              "median_pair_ratio": statistics.median(pairs), "torch": torch.__version__, "peft": peft.__version__}
    print(json.dumps({k: v for k, v in result.items() if k != "pair_ratios"}, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
