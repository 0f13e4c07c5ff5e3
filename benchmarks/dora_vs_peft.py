#!/usr/bin/env python
"""peftlab DoRA vs peft DoRA (and peft LoRA for scale) training steps, in ONE process, turn by turn.

All variants start from the same base weights and the same adapter tensors (peft's are copied into
peftlab's), and take steps in rotating order, so slow drifts of a shared machine hit all alike. A
step is forward + backward + AdamW step + zero_grad on the embedded SmolLM2-135M, r=8 on q_proj,
v_proj, fp32 on the CPU. The outputs of the two DoRA models are compared before timing.

    PYTHONPATH=src python benchmarks/dora_vs_peft.py [--steps 10] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dora_vs_peft.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import peft

    import peftlab
    from peftlab import models

    targets = ["q_proj", "v_proj"]
    base, _ = models.load(args.model, seed=0)
    state = base.state_dict()

    def fresh():
        m, _ = models.load(args.model, seed=0)
        m.load_state_dict(state)
        return m

    variants = {
        "peft-dora": peft.get_peft_model(fresh(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                  use_dora=True)),
        "peft-lora": peft.get_peft_model(fresh(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)),
    }
    ours = fresh()
    peftlab.attach(ours, "lora", r=8, alpha=16, dora=True, target_modules=targets)
    theirs = {k.replace("base_model.model.", "").replace(".default", "").replace("vector.weight", "vector"): t
              for k, t in variants["peft-dora"].named_parameters() if t.requires_grad}
    with torch.no_grad():
        for k, t in peftlab.adapter_parameters(ours, "default").items():
            t.copy_(theirs[k.replace(".default", "")] + (0.01 if "lora_B" in k else 0))
            if "lora_B" in k:
                theirs[k.replace(".default", "")].copy_(t)
    variants["peftlab-dora"] = ours
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1000, (args.batch, args.seq), generator=g)
    with torch.no_grad():
        diff = (ours(input_ids=x).logits - variants["peft-dora"](input_ids=x).logits).abs().max().item()
    opts = {n: torch.optim.AdamW([t for t in m.parameters() if t.requires_grad], lr=1e-4) for n, m in variants.items()}
    for m in variants.values():
        m.train()
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for i in range(args.warmup + args.steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            loss = variants[n](input_ids=x, labels=x).loss
            loss.backward()
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    spread = {n: (min(v), max(v)) for n, v in times.items()}
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "threads": args.threads, "max_abs_output_difference": diff, "median_step_s": med,
              "min_max_step_s": spread,
              "peftlab_dora_over_peft_dora": med["peftlab-dora"] / med["peft-dora"],
              "peft_dora_over_peft_lora": med["peft-dora"] / med["peft-lora"],
              "peftlab_dora_over_peft_lora": med["peftlab-dora"] / med["peft-lora"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
