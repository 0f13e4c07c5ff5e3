"""``peftlab train``: fine-tune an embedded model on a task with one method.

Examples::

    peftlab train --task tweets --method lora --opt r=8 --opt 'target_modules=["query","value"]' --lr 1e-3
    peftlab train --task chat --method lora --steps 100 --save-every 25 --run-dir runs/chat
    peftlab train --task chat --run-dir runs/chat --resume          # continue after an interruption
    peftlab train --data my.csv --method full                       # a split column with test rows
    peftlab train --data train.csv --test-data test.csv --method lora
    torchrun --nproc_per_node 4 -m peftlab.cli train --task chat --method lora --strategy ddp
    torchrun --nproc_per_node 8 -m peftlab.cli train --task chat --method full --strategy fsdp

Under ``torchrun`` (or ``accelerate launch``) every process runs this command; ``--batch-size``
is the global micro-batch (each of N processes takes 1/N of it), and rank 0 alone writes the run
directory and prints. See ``docs/scaling.md``.

Data: ``--task`` names a built-in task; ``--data FILE`` alone is the user's file (the task
``file``), with ``--val-data`` and ``--test-data`` for separate split files (see
:class:`peftlab.lab.tasks.FileTask`). A task without test examples is refused before any model
is loaded, and the run ends by scoring the test split next to the label counts, the
majority-class and chance baselines and the budget as a fraction of an epoch, with a warning
when the score does not beat the majority class by more than its sampling margin.

"% of base" is :attr:`peftlab.Summary.percent`: trainable parameters over the base model's
parameters (adapter tensors not counted, quantized weights at their logical size), the figure
papers report and the one ``peftlab bench`` shows.

The run directory holds ``run.json`` (what was trained, with the size and sha256 of each data
file), ``checkpoints/step-<N>/``, the trained tensors (``adapter/``, written with
:func:`peftlab.save` and swapped in as a whole folder; for ``full`` every base tensor) and
``result.json`` (the :class:`~peftlab.lab.trainer.TrainResult` with ``test``, the test scores).
Two files of peftlab's own:
``.peftlab-run`` marks a folder that peftlab created (``--overwrite`` deletes only what it wrote,
and only in such a folder), and ``.peftlab-lock`` is held (``flock``) for the whole command, so a
second ``peftlab train`` into the same folder fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import types
import typing
from pathlib import Path
from typing import Any

from peftlab.core import files
from peftlab.core.errors import ConfigError
from peftlab.lab import distributed, metrics
from peftlab.lab.distributed import STRATEGIES
from peftlab.lab.data_cli import add_data_arguments, data_task
from peftlab.lab.tasks import CLASSIFICATION, head_modules
from peftlab.lab.trainer import (
    LOCK_FILE,
    PRECISIONS,
    SCHEDULES,
    TrainConfig,
    TrainResult,
    hold_run_dir,
    score,
    subset,
    train,
)

RUN_FILE = "run.json"
RESULT_FILE = "result.json"
MARKER = ".peftlab-run"
"""Written into a run directory that peftlab created (or found empty): --overwrite needs it."""
_OWNED = ("checkpoints", "adapter", "model", RUN_FILE, RESULT_FILE)  # what --overwrite may delete ("model":
# where earlier releases saved a fully fine-tuned model)
_OURS = (LOCK_FILE, MARKER)  # peftlab's bookkeeping: not a sign of an earlier run

_HELP = {
    "steps": "optimizer steps in total",
    "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay (not on biases and norm weights)",
    "warmup_ratio": "fraction of the steps spent warming up linearly",
    "schedule": "learning-rate decay after warm-up",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "eval_every": "evaluate every N steps and at the end (0: only at the end)",
    "eval_examples": "validation examples per evaluation ('none': all)",
    "save_every": "checkpoint every N steps and at the end (0: never)",
    "max_length": "maximum tokens per sequence",
    "seed": "seed of data order, subset, dropout and adapter initialisation",
    "precision": "autocast precision (fp16: CUDA only)",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory)",
    "train_examples": "train on a seeded subset of this many examples ('none': all)",
    "progress": "show the progress bar and evaluation lines",
    "strategy": "under torchrun: DistributedDataParallel (ddp) or FSDP2 fully_shard (fsdp)",
}


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "all", ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``peftlab train``'s options to ``parser`` (one flag per :class:`TrainConfig` field)."""
    what = parser.add_argument_group("what to train")
    add_data_arguments(what)
    what.add_argument("--model", help="embedded model name (default: the task's default model)")
    what.add_argument("--method", default="lora", help="a registered method, e.g. lora, bitfit or full (default: lora)")
    what.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                      help="method option with a JSON value, repeatable (e.g. --opt r=8 "
                           "--opt 'target_modules=[\"query\",\"value\"]')")
    how = parser.add_argument_group("how to train")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        kw: dict[str, Any] = {"default": f.default, "help": f"{_HELP.get(f.name, '')} (default: {f.default})"}
        if f.name == "lr":  # resolved per method in run(): soft prompts and full fine-tuning differ by 1000x
            kw = {"default": None, "help": "peak learning rate (default: the method's suggested_lr, e.g. lora "
                                           "1e-3, full 5e-5)"}
        if kind is bool:
            how.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "schedule":
            how.add_argument(flag, choices=SCHEDULES, **kw)
        elif f.name == "precision":
            how.add_argument(flag, choices=PRECISIONS, **kw)
        elif f.name == "strategy":
            how.add_argument(flag, choices=STRATEGIES, **kw)
        elif typing.get_origin(kind) in (typing.Union, types.UnionType):
            how.add_argument(flag, type=_optional_int, metavar="N", **kw)
        else:
            how.add_argument(flag, type=kind, **kw)
    how.add_argument("--test-examples", type=_optional_int, metavar="N", default=None,
                     help="test examples scored at the end, a seeded sample ('none': all; default: all)")
    run = parser.add_argument_group("run directory")
    run.add_argument("--run-dir", help="where checkpoints, the adapter and results go "
                                       "(default: runs/<task>-<model>-<method>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="start over in an existing --run-dir")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["r=8", "target_modules=[\\"q\\"]"]`` -> ``{"r": 8, "target_modules": ["q"]}`` (JSON values,
    plain strings where a value is not JSON)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt {pair!r} must look like key=value (e.g. r=8 or "
                              "target_modules='[\"q_proj\"]')")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _model_kind_check(task: Any, model_name: str) -> None:
    from peftlab import models

    spec = models.MODELS.get(model_name)
    if spec is None:
        return  # models.load names the known models
    need = "encoder-classifier" if task.kind == "classification" else "causal-lm"
    if spec.kind != need:
        fits = [n for n, s in models.MODELS.items() if s.kind == need]
        article = "an" if spec.kind[0] in "aeiou" else "a"
        raise ConfigError(f"task {task.name!r} ({task.kind}) needs a {need} model ({', '.join(fits)}); "
                          f"{model_name!r} is {article} {spec.kind}; pick one with --model")


def data_file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of a user's data file (recorded in run.json, checked on --resume)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _in_use(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in _OURS for p in run_dir.iterdir())


def _check_run_dir(run_dir: Path, record: dict[str, Any], resume: bool, overwrite: bool) -> bool:
    """Refuse an existing run directory unless resuming the same run or overwriting one that
    peftlab created; return whether it is in use."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file; pass a directory")
    used = _in_use(run_dir)
    if used and not (resume or overwrite):
        raise ConfigError(f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite "
                          "to start over, or another --run-dir")
    if used and overwrite and not (run_dir / MARKER).is_file():
        raise ConfigError(f"--overwrite: {run_dir} was not created by peftlab train (it has no {MARKER} file), so "
                          "nothing in it was deleted; empty or remove it yourself, or pass another --run-dir")
    if used and resume and (run_dir / RUN_FILE).is_file():
        try:
            before = json.loads((run_dir / RUN_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--resume: {run_dir / RUN_FILE} cannot be read ({e}); start a new --run-dir") from None
        if not isinstance(before, dict):
            raise ConfigError(f"--resume: {run_dir / RUN_FILE} is not a JSON object; start a new --run-dir")
        old_file, new_file = before.get("data_file"), record.get("data_file")
        if old_file is not None and old_file != new_file and before.get("data") == record.get("data"):
            raise ConfigError(
                f"--resume: the data file {record['data']} changed since the run in {run_dir} started (size "
                f"{old_file.get('size')} -> {new_file.get('size') if new_file else None} bytes, sha256 "
                f"{str(old_file.get('sha256'))[:12]}... -> {str(new_file.get('sha256'))[:12] if new_file else None}...): "
                "its checkpoints were trained on other data. Restore the file, or start a new --run-dir")
        diff = sorted(k for k in record if k != "data_file" and before.get(k) != record[k])
        if diff:
            details = "; ".join(f"{k}: {before.get(k)!r} -> {record[k]!r}" for k in diff)
            raise ConfigError(f"--resume: {run_dir} was trained with different settings ({details}); "
                              "resume with the same ones or use another --run-dir")
    return used


def _write_json(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}{files.MARK}tmp-{os.getpid()}")
    try:
        files.write_bytes(tmp, (json.dumps(value, indent=1) + "\n").encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _start_run_dir(run_dir: Path, record: dict[str, Any], clear: bool) -> None:
    """Delete what an earlier run wrote here (only peftlab's own files, only where the marker
    says peftlab created the folder) when ``clear``; write the marker and run.json."""
    fresh = not _in_use(run_dir)
    if clear:
        for name in _OWNED:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh or clear:
        _write_json(run_dir / MARKER, {"created_by": "peftlab train"})
    _write_json(run_dir / RUN_FILE, record)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say, save the adapter into ``run_dir/adapter`` and print the final metrics.

    Under ``torchrun`` this joins the process group from the environment first (and leaves it at
    the end if it started it).
    """
    dist, started = distributed.init_from_env()
    try:
        return _run(args, dist)
    finally:
        if started:
            import torch

            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, dist: distributed.Dist) -> int:
    import peftlab

    task = data_task(args)
    model_name = args.model or task.default_model
    _model_kind_check(task, model_name)
    method = peftlab.method_class(args.method)  # an unknown method fails here, before any loading
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["lr"] is None:
        values["lr"] = float(method.suggested_lr)
    config = TrainConfig(**values)
    options = parse_options(args.opt)
    run_dir = Path(args.run_dir or f"runs/{task.name}-{model_name}-{args.method}")
    record = {"task": task.name, "data": _resolved(args.data), "model": model_name, "method": args.method,
              "options": dict(options), "data_file": data_file_fingerprint(args.data) if args.data else None}
    for key in ("val_data", "test_data"):  # recorded only when given, so older run directories still resume
        if getattr(args, key):
            record[key] = {"path": _resolved(getattr(args, key)), **data_file_fingerprint(getattr(args, key))}
    existed = run_dir.exists()
    with hold_run_dir(run_dir, dist):  # a second writer fails here, at once
        try:
            return _run_locked(args, dist, task, model_name, config, options, run_dir, record)
        except BaseException:
            if dist.is_main and not existed:
                _discard(run_dir)
            raise


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _discard(run_dir: Path) -> None:
    """Remove a run directory this command created, if nothing but peftlab's bookkeeping is in
    it (the command failed before writing anything). Runs while the lock is still held."""
    if run_dir.is_dir() and not _in_use(run_dir):
        for name in _OURS:
            (run_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def _run_locked(args: argparse.Namespace, dist: distributed.Dist, task: Any, model_name: str, config: TrainConfig,
                options: dict[str, Any], run_dir: Path, record: dict[str, Any]) -> int:
    import torch

    import peftlab
    from peftlab import models

    used = _check_run_dir(run_dir, record, args.resume, args.overwrite)
    dist.barrier()  # every rank has looked at the run directory before rank 0 changes it

    model, tokenizer = models.load(model_name, num_labels=task.num_labels or 2, seed=config.seed)
    if tokenizer is None:
        raise ConfigError(f"model {model_name!r} comes without a tokenizer (tiny-gpt2 has none; tiny-llama* use "
                          "SmolLM2's once `peftlab prepare smollm2-135m` has run); pick another --model")
    model.to(distributed.device_for(dist))
    say = print if dist.is_main else (lambda *a, **k: None)
    test = subset(task.examples("test"), args.test_examples, 0)  # the bench's sample for the same N
    # A causal LM's baseline is the base model itself (no class counts to compare with): scored
    # on the same test examples before anything is attached.
    base_scores = score(model, tokenizer, task, test, config) if task.kind != CLASSIFICATION else None
    if "modules_to_save" not in options:
        heads = head_modules(model, task)
        if heads:
            options["modules_to_save"] = heads
            say(f"peftlab: training the new classification head {heads[0]!r} in full (modules_to_save)")
    torch.manual_seed(config.seed)  # adapter initialisation (the same on every rank)
    peftlab.attach(model, args.method, **options)
    distributed.check_strategy(model, config.strategy)  # before anything is written
    if dist.is_main:
        _start_run_dir(run_dir, record, clear=used and args.overwrite)
    dist.barrier()

    counts = peftlab.summary(model)
    where = f" on {dist.world} processes ({config.strategy})" if dist.active else ""
    say(f"peftlab: {task.name} ({task.kind}) on {model_name} with {args.method}: {counts.trainable:,} trainable "
        f"parameters, {counts.percent:.3f}% of the base model's {counts.base:,}{where}; run directory {run_dir}")
    origins = getattr(task, "origins", {})  # a user's files: where each split came from
    for split in ("train", "validation", "test"):
        if split in origins:
            say(f"peftlab: {split} split: {origins[split]}")
    result = train(model, tokenizer, task, config, run_dir=run_dir, resume=args.resume)
    test_scores = score(model, tokenizer, task, test, config)  # every rank: a sharded model evaluates together

    saved = run_dir / "adapter"
    with distributed.full_parameters(model):  # FSDP2: every rank gathers, rank 0 writes
        if dist.is_main:
            peftlab.save(model, saved)
    dist.barrier()
    if not dist.is_main:
        return 0
    _write_json(run_dir / RESULT_FILE, {**result.to_dict(), "test": test_scores, "test_examples": len(test),
                                        "base_model_test": base_scores, "percent_of_base": counts.percent})

    print(f"\n{result.steps} steps in {result.seconds:.1f} s ({result.seconds_per_step:.3f} s/step, "
          f"{result.tokens_per_second:,.0f} tokens/s)")
    print(f"final validation metrics ({len(result.evals)} evaluations):")
    for key, value in result.final.items():
        print(f"  {key:<12} {value:.4f}")
    if result.overfitting:
        print("  overfitting: the validation loss rose above its best by more than its noise while the training "
              "loss fell; see the evaluations in result.json")
    print()
    print("\n".join(test_report(task, result, config, test, test_scores, base_scores)))
    print(f"saved to {saved}")
    return 0


def test_report(task: Any, result: TrainResult, config: TrainConfig, test: list, scores: dict[str, float],
                base: dict[str, float] | None = None) -> list[str]:
    """The lines ``peftlab train`` ends with: the test scores beside what they must be read against.

    For every task: the test scores (classification: accuracy and macro-F1) and the budget as
    a fraction of an epoch. For classification also the label counts of the training and test
    splits, the majority-class baseline (always answering the test split's most frequent class:
    the best a model that learned nothing can score) and the chance baseline (uniform guessing),
    and a warning when the accuracy does not beat the majority class by more than
    :func:`~peftlab.lab.metrics.binomial_margin` (2 standard errors at this many test examples).
    For a causal LM the baseline is the base model's scores on the same examples (``base``),
    with a warning when the trained model's primary metric is not above it.
    """
    shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
    lines = [f"test split ({len(test):,} examples): {shown}"]
    per_step = config.batch_size * config.grad_accum
    lines.append(f"  budget: {result.steps} steps x {per_step} examples = {result.steps * per_step:,} examples, "
                 f"{result.epochs:.2f} of an epoch of {result.train_size:,} training examples")
    if task.kind != CLASSIFICATION:
        if base is not None:
            lines.append("  baseline on test: the base model before training: "
                         + "  ".join(f"{k} {v:.4f}" for k, v in base.items()))
            if scores[task.metric] <= base[task.metric]:
                lines.append("")
                lines.append(f"WARNING: the test {task.metric} {scores[task.metric]:.4f} is not above the base "
                             f"model's {base[task.metric]:.4f}: training did not improve the answers. The budget was "
                             f"{result.epochs:.2f} of an epoch: train longer (--steps) or try another --lr.")
        return lines
    names = task.labels
    test_labels = [e.label for e in test]

    def counts(labels: list[int]) -> str:
        c = metrics.label_counts(labels)
        return ", ".join(f"{names[i]} {c.get(i, 0):,} ({c.get(i, 0) / len(labels):.1%})" for i in range(len(names)))

    train_labels = [e.label for e in subset(task.examples("train"), config.train_examples, config.seed)]
    lines.append(f"  labels: train {counts(train_labels)}; test {counts(test_labels)}")
    majority = metrics.majority_baseline(test_labels, num_classes=task.num_labels)
    chance = metrics.chance_baseline(task.num_labels, test_labels)
    lines.append(f"  baselines on test: majority class (always {names[majority.predicted_class]!r}) accuracy "
                 f"{majority.accuracy:.4f} macro_f1 {majority.macro_f1:.4f}; chance (uniform over {task.num_labels}) "
                 f"accuracy {chance.accuracy:.4f} macro_f1 {chance.macro_f1:.4f}")
    margin = metrics.binomial_margin(majority.accuracy, len(test))
    accuracy = scores["accuracy"]
    if accuracy <= majority.accuracy + margin:
        how = "is at or below" if accuracy <= majority.accuracy else f"is within {margin:.4f} (2 standard errors) of"
        lines.append("")
        lines.append(f"WARNING: the test accuracy {accuracy:.4f} {how} the majority-class baseline "
                     f"{majority.accuracy:.4f}: this result is no evidence that the model learned more than the "
                     f"label counts (macro_f1 {scores.get('macro_f1', math.nan):.4f} vs {majority.macro_f1:.4f}). "
                     f"The budget was {result.epochs:.2f} of an epoch: train longer (--steps), try another --lr, "
                     "or check the labels.")
    return lines
