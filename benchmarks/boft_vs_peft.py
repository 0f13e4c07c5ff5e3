#!/usr/bin/env python
"""peftlab BOFT vs peft BOFT: training-step time and peak memory, same model, same config, same run.

The harness of ``benchmarks/ia3_vs_peft.py`` (SmolLM2-135M's block shapes, time interleaved in one
process, peak memory per fresh worker process; see its docstring), with BOFT on every linear layer,
blocks of 32 and one butterfly factor: peft computes more than one factor only with its CUDA
extension and silently uses one without it, so one factor is the configuration both run on a CPU.
peft multiplies the input by a dense ``d x d`` rotation built from dense permutation and
block-diagonal matrices; peftlab rotates the blocks of the input in place of that product.

    PYTHONPATH=src python benchmarks/boft_vs_peft.py [--steps 20] [--rounds 3] [--batch 4] [--seq 128]

MEASURED
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ia3_vs_peft import run  # noqa: E402  (the shared harness)

if __name__ == "__main__":
    run("boft", doc=__doc__, script=__file__)
