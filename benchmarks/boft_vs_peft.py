#!/usr/bin/env python
"""peftlab BOFT vs peft BOFT: training-step time and peak memory, same model, same config, same run.

The harness of ``benchmarks/ia3_vs_peft.py`` (SmolLM2-135M's block shapes, time interleaved in one
process, peak memory per fresh worker process; see its docstring), with BOFT on every linear layer,
blocks of 32 and one butterfly factor: peft computes more than one factor only with its CUDA
extension and silently uses one without it, so one factor is the configuration both run on a CPU.
peft multiplies the input by a dense ``d x d`` rotation built from dense permutation and
block-diagonal matrices; peftlab rotates the blocks of the input in place of that product.

    PYTHONPATH=src python benchmarks/boft_vs_peft.py [--steps 20] [--rounds 3] [--batch 4] [--seq 128]

Measured (benchmarks/results/boft_vs_peft.json; 4 layers, batch 4 x 128, fp32, 2 threads, 16
steps, 3 memory rounds; a 2-core machine, load average 0.8-1.3; 659,712 trainable parameters each,
first-step losses identical):

* step 0.234 s vs peft's 1.102 s (0.21 wall and CPU);
* peak RSS of two training steps 697 vs 925 MiB (0.75), increase over the set-up model 238 vs
  383 MiB (0.62); activations autograd keeps 124.9 vs 259.2 MiB (0.48: peft keeps the dense
  ``d x d`` rotation and the products that build it, peftlab the gathered block inputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ia3_vs_peft import run  # noqa: E402  (the shared harness)

if __name__ == "__main__":
    run("boft", doc=__doc__, script=__file__)
