"""``peftlab estimate``: memory per device to fine-tune (or serve) a model, per method.

Examples::

    peftlab estimate llama-2-7b --batch 4 --seq 2048                      # every method, full included
    peftlab estimate mistral-7b --methods lora --quantize nf4 --checkpointing full --budget 24GB
    peftlab estimate 3b --dtype fp16 --batch 8 --seq 1024 --methods full   # the seed article's example
    peftlab estimate path/to/config.json --json - --png memory.png
    peftlab estimate llama-3-8b --inference --context 8192 --methods full
    peftlab estimate --list                                               # presets and embedded models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from peftlab.core.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a preset (see --list), an embedded model name, or a config.json path")
    p.add_argument("--list", action="store_true", help="list the presets and embedded models and exit")
    p.add_argument("--methods", nargs="*", help="methods to compare (default: every registered method, full included)")
    p.add_argument("--options", default="{}", help='per-method options as JSON: \'{"lora": {"r": 16}}\'')
    p.add_argument("--batch", type=int, default=1, help="sequences per device (micro-batch)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (inference: prompt tokens)")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, fp16, bf16")
    p.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false",
                   help="everything in --dtype (default: 16-bit compute, fp32 master weights and states)")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, sgd, sgd-momentum, adafactor, galore")
    p.add_argument("--galore-rank", type=int, default=128, help="projection rank of --optimizer galore")
    p.add_argument("--quantize", choices=["nf4"], help="store frozen linear weights in 4-bit NF4 (QLoRA, modelled)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="with --quantize: fp32 block constants instead of QLoRA's double quantization")
    p.add_argument("--checkpointing", default="none", help="activation recomputation: none, selective, full")
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (1: optimizer states, 2: + gradients, "
                                                       "3: + weights sharded over --devices)")
    p.add_argument("--fsdp", action="store_true", help="FSDP full sharding (ZeRO-3) over --devices")
    p.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    p.add_argument("--keep-grads", dest="set_to_none", action="store_false",
                   help="the loop calls zero_grad(set_to_none=False): gradients are held through the forward "
                        "(default: PyTorch's set_to_none=True, none exist during the forward)")
    p.add_argument("--grad-accumulation", type=int, default=1,
                   help="micro-batches per optimizer step (above 1 the gradients are held through the forward)")
    p.add_argument("--inference", action="store_true", help="serve instead of train: weights + KV cache + prefill")
    p.add_argument("--context", type=int, help="--inference: positions in the KV cache (default --seq)")
    p.add_argument("--attention", default="auto", help="auto, flash, math, eager")
    p.add_argument("--device", default="cuda", help="cuda or cpu (dropout masks, optimizer kernels, runtime)")
    p.add_argument("--head", help="model head: causal-lm, classifier, base (default: from the config)")
    p.add_argument("--budget", help="memory per device, e.g. 24GB or 24GiB: which methods fit, largest batch/seq")
    p.add_argument("--units", default="GB", choices=["GB", "GiB"], help="units of the table")
    p.add_argument("--json", metavar="PATH", help="write the estimates as JSON to PATH ('-': stdout, no table)")
    p.add_argument("--png", metavar="PATH", help="write a stacked-bar chart comparing the methods")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": args.dtype, "mixed_precision": args.mixed_precision, "optimizer": args.optimizer,
            "checkpointing": args.checkpointing, "zero": args.zero, "fsdp": args.fsdp, "devices": args.devices,
            "mode": "inference" if args.inference else "train", "context": args.context,
            "attention": args.attention, "device": args.device, "quantize": args.quantize,
            "double_quant": args.double_quant, "galore_rank": args.galore_rank, "set_to_none": args.set_to_none,
            "grad_accumulation": args.grad_accumulation}


def _options(text: str) -> dict[str, dict[str, Any]]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--options must be JSON such as '{{\"lora\": {{\"r\": 16}}}}' ({e})") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ConfigError("--options maps method names to option objects: '{\"lora\": {\"r\": 16}}'")
    return options


def run(args: argparse.Namespace) -> int:
    import peftlab
    from peftlab.estimate import arch, core, report

    if args.list:
        for name, description in arch.known().items():
            print(f"{name:<16} {description}")
        return 0
    if not args.model:
        raise ConfigError("name a model: a preset (peftlab estimate --list), an embedded model or a config.json path")
    options = _options(args.options)
    settings = _settings(args)
    methods = args.methods if args.methods else list(peftlab.methods())
    unknown = [m for m in methods if m not in peftlab.methods()]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {list(peftlab.methods())}")
    stray = sorted(set(options) - set(methods))
    if stray:
        raise ConfigError(f"--options names {stray}, which are not among the methods {methods}")
    core.check_settings(args.batch, args.seq, **settings)  # a bad setting is an error, not "n/a" per method
    source = arch.resolve(args.model, args.head)
    estimates, errors = [], {}
    for method in methods:
        try:
            estimates.append(core.estimate(source, method, options.get(method), batch=args.batch, seq=args.seq,
                                           **settings))
        except ConfigError as e:  # the method does not apply to this model or setting (e.g. BitFit on Llama)
            errors[method] = str(e)
    if not estimates:
        raise ConfigError("; ".join(errors.values()))
    fits = None
    if args.budget:
        fits = core.fit(args.budget, source, [m for m in methods if m not in errors], options, batch=args.batch,
                        seq=args.seq, **settings)
    if args.json:
        text = report.to_json(estimates, fits, errors)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.json != "-":
        print(report.table(estimates, args.units, fits, errors))
    if args.png:
        path = report.png(estimates, args.png, core.parse_size(args.budget) if args.budget else None, args.units,
                          errors)
        print(f"chart: {path}", file=sys.stderr)
    return 0
