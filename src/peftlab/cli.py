"""``peftlab`` command line: thin wrappers around the public API."""

from __future__ import annotations

import argparse
import json
import sys


def _methods(args: argparse.Namespace) -> int:
    import dataclasses

    import peftlab

    for name in peftlab.methods():
        cls = peftlab.method_class(name)
        opts = ", ".join(f.name for f in dataclasses.fields(cls))
        print(f"{name:<10} mergeable={cls.mergeable!s:<5} peft_type={cls.peft_type or '-':<8} options: {opts}")
    return 0


def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"option {pair!r} must look like key=value (e.g. r=8 or target_modules='[\"q_proj\"]')")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _summary(args: argparse.Namespace) -> int:
    import peftlab
    from peftlab import models

    model, _ = models.load(args.model, with_tokenizer=False)
    peftlab.attach(model, args.method, **_parse_options(args.option))
    print(peftlab.summary(model))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from peftlab import models

    for name in args.models:
        models.prepare(name)
    return 0


# Subcommands that live next to their feature: module -> (name, help). Each module defines
# ``add_arguments(parser)`` and ``run(args) -> int``; importing happens only when used.
PLUGGED: dict[str, tuple[str, str]] = {
    "peftlab.lab.bench_cli": ("bench", "train every applicable method side by side and write a report"),
    "peftlab.lab.train_cli": ("train", "fine-tune a model on a task with a method"),
    "peftlab.estimate.cli": ("estimate", "memory per device to fine-tune or serve a model, per method"),
    "peftlab.lab.recommend_cli": ("recommend", "rank methods for a model, memory budget and serving needs"),
    "peftlab.export_cli": ("export", "checked copy of an adapter for vLLM or peft (exact conversions, refusals)"),
}


def _plug(sub: argparse._SubParsersAction) -> None:
    import importlib

    for module, (name, help_text) in PLUGGED.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("peftlab"):
                raise
            continue
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(fn=mod.run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning lab")
    sub = parser.add_subparsers(dest="command", required=True)
    _plug(sub)
    sub.add_parser("methods", help="list the registered methods and their options").set_defaults(fn=_methods)
    p = sub.add_parser("summary", help="attach a method to an embedded model and show what trains")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--method", default="lora")
    p.add_argument("option", nargs="*", help="method options as key=value (JSON values)")
    p.set_defaults(fn=_summary)
    p = sub.add_parser("prepare", help="one-time conversion of embedded models into a fast cache")
    p.add_argument("models", nargs="*", default=["smollm2-135m"])
    p.set_defaults(fn=_prepare)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # a clear one-line error for the CLI user; tracebacks with PEFTLAB_DEBUG=1
        import os

        from peftlab.core.errors import PeftlabError

        if os.environ.get("PEFTLAB_DEBUG") or not isinstance(e, (PeftlabError, KeyError, ValueError)):
            raise
        print(f"peftlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
