#!/usr/bin/env python
"""FLoRA versus conv LoRA versus full fine-tuning on a small CNN (Fashion-MNIST, CPU).

A 3-conv CNN is pre-trained on Fashion-MNIST classes 0-4, then a copy is adapted to classes 5-9
from a small training subset with each method (see :mod:`peftlab.lab.vision`): full
fine-tuning, the new head alone, LoRA (rank ``--lora-r``) on the three convolutions, and FLoRA on
the same convolutions with ranks matched to LoRA's parameter count. Prints test accuracy on the
new classes, trainable parameters and training time per method.

Needs the Debian/Ubuntu package ``dataset-fashion-mnist`` (``sudo apt-get install
dataset-fashion-mnist`` or ``make fashion-mnist``).

Usage:
    python benchmarks/vision_flora.py                      # 300 + 4 x 120 small steps
    python benchmarks/vision_flora.py --adapt-steps 50 --pretrain-steps 100   # quicker
    python benchmarks/vision_flora.py --out benchmarks/results/vision_flora.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from peftlab.lab import vision

    defaults = vision.VisionConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--adapt-steps", type=int, default=defaults.adapt_steps)
    p.add_argument("--adapt-examples", type=int, default=defaults.adapt_examples)
    p.add_argument("--lora-r", type=int, default=defaults.lora_r)
    p.add_argument("--flora-kernel-r", type=int, default=defaults.flora_kernel_r)
    p.add_argument("--methods", nargs="+", default=list(defaults.methods), choices=list(vision.METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", help="folder of the idx files (default: the Debian package's)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = vision.VisionConfig(pretrain_steps=args.pretrain_steps, adapt_steps=args.adapt_steps,
                                 adapt_examples=args.adapt_examples, lora_r=args.lora_r,
                                 flora_kernel_r=args.flora_kernel_r, methods=tuple(args.methods), seed=args.seed)
    pre, results = vision.run(config, root=args.root, progress=True)
    print()
    print(f"Fashion-MNIST: pre-trained on classes {list(config.pretrain_classes)} ({config.pretrain_steps} steps, "
          f"test accuracy {pre['accuracy']:.4f}, {pre['seconds']:.1f} s); adapted to {list(config.adapt_classes)} "
          f"with {config.adapt_examples} training images, {config.adapt_steps} steps x batch {config.batch_size}; "
          f"accuracy on all their test images; {torch.get_num_threads()} CPU threads")
    print(vision.table(results))
    flora = next((r for r in results if r.method == "flora"), None)
    if flora is not None:
        print(f"FLoRA ranks per conv (out, in, kh, kw): {flora.options['rank_pattern']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": dataclasses.asdict(config), "pretrain": pre,
                                        "results": [vision.as_dict(r) for r in results],
                                        "threads": torch.get_num_threads()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
