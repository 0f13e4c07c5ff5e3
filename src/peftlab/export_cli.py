"""``peftlab export DIR --for vllm|peft``: a checked copy of an adapter for a serving engine or peft."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--for", dest="target", required=True, choices=["vllm", "peft"],
                   help="vllm: a plain LoRA vLLM loads (exact conversions, base_overrides for trained biases and "
                        "module copies); peft: checked against the installed peft's config fields")
    p.add_argument("--out", help="the new output folder (default: <adapter>-<target> next to it)")


def run(args: argparse.Namespace) -> int:
    from peftlab.export import ExportRefused, export

    src = Path(args.adapter)
    out = Path(args.out) if args.out else src.resolve().parent / f"{src.resolve().name}-{args.target}"
    try:
        report = export(src, out, args.target)
    except ExportRefused as e:
        print(e.report.table())
        print(f"peftlab: export refused: {'; '.join(e.report.refused)}", file=sys.stderr)
        return 3
    print(report.table())
    return 0
