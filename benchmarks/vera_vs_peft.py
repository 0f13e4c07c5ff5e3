#!/usr/bin/env python
"""peftlab VeRA vs peft VeRA: training-step time and peak memory, same model, same config, same run.

The harness of ``benchmarks/ia3_vs_peft.py`` (SmolLM2-135M's block shapes, time interleaved in one
process, peak memory per fresh worker process; see its docstring), with VeRA's config: r=256 on
every linear layer (peftlab's defaults; peft: ``VeraConfig(r=256, target_modules="all-linear")``),
the shared matrices drawn from key 0 by both, so the first losses must agree.

    PYTHONPATH=src python benchmarks/vera_vs_peft.py [--steps 20] [--rounds 3] [--batch 4] [--seq 128]
    PYTHONPATH=src python benchmarks/vera_vs_peft.py --recompute --out benchmarks/results/vera_vs_peft_recompute.json

Measured (4 layers, batch 4 x 128, fp32 CPU, 2 threads, 16 steps, a quiet 2-core machine, load
average 0.9-1.2; 27,904 trainable parameters each, first-step losses equal to 5e-7):

* defaults (benchmarks/results/vera_vs_peft.json, 5 memory rounds): step 0.263 vs peft's 0.266 s
  (0.99 wall and CPU); peak RSS of two training steps 642 vs 662 MiB (0.97), increase over the
  set-up model 181 vs 200 MiB (0.91); activations autograd keeps 115.65 MiB each (1.00: the same
  graph as peft's). The scaled update goes into the base output in place (``addcmul_``); before
  that change two quiet runs gave 1.00 / 1.01 of peft's time and 1.01 / 1.00 of its peak;
* the same with 1 thread before that change (vera_vs_peft_1thread.json): step 0.590 vs 0.587 s
  (1.004), peak RSS 655 vs 657 MiB (0.997);
* ``recompute=True`` (vera_vs_peft_recompute.json, 3 memory rounds): activations kept 75.2 vs
  115.7 MiB (0.65), peak RSS 620 vs 663 MiB (0.94), increase 158 vs 200 MiB (0.79); step 0.271 vs
  0.260 s (1.04: one extra r x d_out matmul per layer in backward).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ia3_vs_peft import run  # noqa: E402  (the shared harness)

if __name__ == "__main__":
    run("vera", doc=__doc__, script=__file__)
