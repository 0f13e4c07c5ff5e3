#!/usr/bin/env python
"""peftlab AdaLoRA vs peft AdaLoRA: training-step time (one process, turn by turn) and peak memory
(one subprocess per implementation), same model, same config, same adapter tensors.

A step is what each library's AdaLoRA training needs: forward with the loss plus the orthogonality
penalty (peftlab: ``Method.extra_loss``; peft: ``AdaLoraModel.forward`` through a CAUSAL_LM
``PeftModel``), backward, AdamW step, the rank allocation (peftlab: ``Method.end_step``; peft:
``update_and_allocate``), zero_grad. ``tinit=1`` and ``total_step`` = all steps run, so every timed
step is in the budgeting phase (scores updated and a mask computed at every step, ``deltaT=1``):
the allocator's heaviest regime. Models: a random Llama with SmolLM2's shape scaled down
("medium": hidden 512, 4 layers, intermediate 1376; AdaLoRA on every linear layer, init_r=12,
target_r=8), or the embedded SmolLM2-135M (``--model smollm2-135m``). fp32 on the CPU. Peak
memory is ``ru_maxrss`` after the steps minus the resident size before the adapter was attached,
in a fresh process per implementation.

    PYTHONPATH=src python benchmarks/adalora_vs_peft.py [--model medium|small|smollm2-135m] [--steps 20]
        [--batch 4] [--seq 128] [--threads 2]

Wall time is reported with the CPU time of each step (``time.process_time``), which a loaded
shared machine disturbs less.

Results: benchmarks/results/adalora_vs_peft_<model>.json. Measured on 2 shared CPU cores under a
load average of 4-14, one thread, batch x seq as given, peftlab / peft medians (wall; CPU time):

    small   (4 x 64, 30 steps): step 0.957 (CPU 0.951); peak memory 1.000 (3 runs each)
    medium  (4 x 64, 20 steps): step 0.949 (CPU 0.964); peak memory 0.960 (3 runs each; both
            implementations' runs fall on the same two levels, 294 and 307 MB, noise of the allocator)
    smollm2-135m (2 x 64, 6 steps): step 0.967 (CPU 0.960); peak memory 1.000 (one run each)

Both end with the same number of kept triplets (the target budget) on the same data.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


SHAPES = {"medium": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=1376),
          "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=688)}


def base_model(name: str):
    if name in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=2000, max_position_embeddings=256, tie_word_embeddings=True, **SHAPES[name])
        return LlamaForCausalLM(cfg)
    from peftlab import models

    return models.load(name, seed=0, with_tokenizer=False)[0]


def build(impl: str, model_name: str, total_step: int, same_init: bool = True):
    """(model, step function) for one implementation; with ``same_init`` the peftlab adapter
    copies peft's tensors (the memory runs skip that: a second model alive would count)."""
    import peft

    import peftlab

    opts = dict(init_r=12, target_r=8, tinit=1, tfinal=0, total_step=total_step)
    torch.manual_seed(1)
    theirs = {}
    if impl == "peft" or same_init:
        pm = peft.get_peft_model(base_model(model_name), peft.AdaLoraConfig(
            **opts, deltaT=1, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
        theirs = {k.replace("base_model.model.", ""): t for k, t in pm.named_parameters() if t.requires_grad}
        with torch.no_grad():  # E != 0, as after some training: the penalty and scores see real values
            for k, t in theirs.items():
                if "lora_E" in k:
                    t.normal_(0, 0.1)
    if impl == "peft":
        model = pm
    else:
        model = base_model(model_name)
        peftlab.attach(model, "adalora", **opts, delta_t=1, alpha=8, target_modules=TARGETS)
        with torch.no_grad():
            for k, t in peftlab.adapter_parameters(model, "default").items():
                if theirs:
                    t.copy_(theirs[k])
                elif "lora_E" in k:
                    t.normal_(0, 0.1)
    theirs.clear()
    model.train()
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-3)

    def step(x: torch.Tensor, i: int) -> None:
        if impl == "peft":
            loss = model(input_ids=x, labels=x).loss  # AdaLoraModel.forward adds the penalty
        else:
            method = peftlab.adapters(model)["default"]
            loss = model(input_ids=x, labels=x).loss + method.extra_loss(model, "default")
        loss.backward()
        opt.step()
        if impl == "peft":
            model.base_model.update_and_allocate(i)
        else:
            peftlab.adapters(model)["default"].end_step(model, "default", i, 0)
        opt.zero_grad(set_to_none=True)

    return model, step


def memory_worker(impl: str, model_name: str, steps: int, batch: int, seq: int) -> dict:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    _ = base_model(model_name)  # imports and one base model resident, as in the timing run
    del _
    before = rss()
    model, step = build(impl, model_name, steps, same_init=False)
    x = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    for i in range(steps):
        step(x, i)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "peak_over_start_bytes": peak - before, "peak_bytes": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="medium", help="'medium' or 'small' (random Llamas) or an embedded model name")
    p.add_argument("--memory-runs", type=int, default=3, help="fresh processes per implementation (median)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=4)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.model, args.memory_steps, args.batch, args.seq)))
        return

    total = args.warmup + args.steps
    variants = {impl: build(impl, args.model, total) for impl in ("peft", "peftlab")}
    x = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = {n: m(input_ids=x).logits for n, (m, _) in variants.items()}
    diff = (outs["peft"] - outs["peftlab"]).abs().max().item()
    times: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for i in range(total):
        order = names[i % 2:] + names[:i % 2]
        for n in order:
            t0, c0 = time.perf_counter(), time.process_time()
            variants[n][1](x, i)
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
    import peftlab

    ours = variants["peftlab"][0]
    ranks_ours = peftlab.adapters(ours)["default"].ranks(ours, "default")
    pattern = variants["peft"][0].peft_config["default"].rank_pattern or {}
    kept_peft = sum(sum(v) for v in pattern.values())

    memory: dict[str, list[int]] = {"peft": [], "peftlab": []}
    for _ in range(args.memory_runs):  # alternating fresh processes
        for impl in ("peft", "peftlab"):
            out = subprocess.run([sys.executable, __file__, "--memory-worker", impl, "--model", args.model,
                                  "--memory-steps", str(args.memory_steps), "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            memory[impl].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_over_start_bytes"])
    peak = {n: statistics.median(v) for n, v in memory.items()}
    med = {n: statistics.median(v) for n, v in times.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    result = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
        "targets": TARGETS, "init_r": 12, "target_r": 8,
        "max_abs_output_difference_at_start": diff,
        "median_step_s": med, "min_max_step_s": {n: (min(v), max(v)) for n, v in times.items()},
        "step_time_peftlab_over_peft": med["peftlab"] / med["peft"],
        "median_cpu_step_s": med_cpu, "cpu_time_peftlab_over_peft": med_cpu["peftlab"] / med_cpu["peft"],
        "triplets_kept_after_run": {"peftlab": sum(k for k, _ in ranks_ours.values()), "peft": kept_peft},
        "peak_memory_over_start_bytes_runs": memory, "peak_memory_over_start_bytes": peak,
        "peak_memory_peftlab_over_peft": peak["peftlab"] / peak["peft"],
        "load_average_1min_at_end": Path("/proc/loadavg").read_text().split()[0],
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"adalora_vs_peft_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
