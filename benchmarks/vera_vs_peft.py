#!/usr/bin/env python
"""peftlab VeRA vs peft VeRA: training-step time and peak memory, same model, same config, same run.

The harness of ``benchmarks/ia3_vs_peft.py`` (SmolLM2-135M's block shapes, time interleaved in one
process, peak memory per fresh worker process; see its docstring), with VeRA's config: r=256 on
every linear layer (peftlab's defaults; peft: ``VeraConfig(r=256, target_modules="all-linear")``),
the shared matrices drawn from key 0 by both, so the first losses must agree.

    PYTHONPATH=src python benchmarks/vera_vs_peft.py [--steps 20] [--rounds 3] [--batch 4] [--seq 128]
    PYTHONPATH=src python benchmarks/vera_vs_peft.py --recompute --out benchmarks/results/vera_vs_peft_recompute.json

Measured (4 layers, batch 4 x 128, fp32 CPU, a shared 2-core machine; 27,904 trainable parameters
each, first-step losses identical):

* defaults (benchmarks/results/vera_vs_peft.json, 2 threads, load average 4.5-7.1): peak RSS of two
  training steps 653 vs peft's 672 MiB (0.97), increase over the set-up model 192 vs 210 MiB (0.92),
  activations autograd keeps 115.65 MiB each (1.00: the same graph as peft's); step 2.85 vs 2.58 s
  (1.11 wall and CPU);
* the same with 1 thread (vera_vs_peft_1thread.json, no OpenMP spinning in the CPU time): step
  0.590 vs 0.587 s (1.004), peak RSS 655 vs 657 MiB (0.997). A profiler count of one step gives the
  same 80 matmuls for both (3,399 ops vs peft's 3,395): the 2-thread time ratio is noise;
* ``recompute=True`` (vera_vs_peft_recompute.json): activations kept 75.2 vs 115.7 MiB (0.65),
  peak RSS 618 vs 666 MiB (0.93), increase 158 vs 204 MiB (0.77); its one extra r x d_out matmul per
  layer in backward did not show through this machine's noise (step 1.15 vs 1.92 s wall).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ia3_vs_peft import run  # noqa: E402  (the shared harness)

if __name__ == "__main__":
    run("vera", doc=__doc__, script=__file__)
