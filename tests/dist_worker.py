"""One process of a distributed test run (``python -m torch.distributed.run ... -m tests.dist_worker``).

Trains tiny-bert (dropout off, so one process and N processes compute the same thing) with one
method on the tweets task through :func:`peftlab.lab.trainer.train`. Rank 0 writes
``history.json`` (the per-step loss), the adapter (``adapter/``) and the trained model's logits
on a fixed batch (``logits.pt``); every rank writes ``rank-<r>.json`` (its rank, world size,
the number of examples it saw and the bytes of quantized storage it holds).

Arguments: OUT METHOD OPTIONS_JSON STRATEGY STEPS [GRAD_ACCUM [RESUME]]; METHOD ``full`` trains
every parameter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import peftlab
from peftlab import models
from peftlab.lab import distributed
from peftlab.lab.tasks import get_task
from peftlab.lab.trainer import TrainConfig, train

PROBE = ["what a great day", "this is awful, I hate it", "the weather is fine"]


def main(argv: list[str]) -> int:
    out, method, options, strategy, steps = Path(argv[0]), argv[1], json.loads(argv[2]), argv[3], int(argv[4])
    grad_accum = int(argv[5]) if len(argv) > 5 else 1
    resume = len(argv) > 6 and argv[6] == "resume"
    torch.set_num_threads(1)
    dist, started = distributed.init_from_env()
    try:
        model, tok = models.load("tiny-bert", num_labels=3, seed=0)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        if method == "full":
            model.requires_grad_(True)
        else:
            torch.manual_seed(0)
            peftlab.attach(model, method, modules_to_save=["classifier"], **options)
        task = get_task("tweets")
        seen = {"n": 0}
        collate = task.collate

        def counting(tokenizer, examples, max_length):
            if model.training:  # training micro-batches only, not evaluation
                seen["n"] += len(examples)
            return collate(tokenizer, examples, max_length)

        task.collate = counting
        config = TrainConfig(steps=steps, batch_size=8, grad_accum=grad_accum, lr=5e-3, warmup_ratio=0.0,
                             schedule="constant", eval_every=0, eval_examples=8, train_examples=40, max_length=24,
                             save_every=2, progress=False, strategy=strategy)
        result = train(model, tok, task, config, run_dir=out / "run", resume=resume)
        from peftlab.quant import quantized_modules

        quant_bytes = sum(distributed.local(t).numel() * t.element_size()  # this rank's share (FSDP2)
                          for _, q in quantized_modules(model) for t in q.storage_tensors().values())
        (out / f"rank-{dist.rank}.json").write_text(json.dumps({"rank": dist.rank, "world": dist.world,
                                                                "examples": seen["n"], "quant_bytes": quant_bytes}))
        model.eval()
        batch = tok(PROBE, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits  # FSDP2: a collective forward on every rank
        with distributed.full_parameters(model):
            if dist.is_main and method != "full":
                peftlab.save(model, out / "adapter")
        if dist.is_main:
            (out / "history.json").write_text(json.dumps(result.history))
            torch.save(logits, out / "logits.pt")
        dist.barrier()
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
