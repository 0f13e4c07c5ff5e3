"""``peftlab bench``: every applicable method, same model, data, budget and seed, side by side.

Two phases, so that scores and timings are each measured fairly:

1. **Training.** Each (method, implementation, seed) trains in its own process (forked from a
   server that has imported torch and transformers once), so that peak memory is that run's
   alone and a crash in one method leaves the others measured. It scores the test split,
   keeps every test prediction in its row (the report bootstraps over them) and records its
   wall time, CPU time and the machine's load at start and end. Every finished run appends one
   row to ``runs/<name>/results.jsonl`` at once, so an interrupted bench keeps what it measured,
   and ``--resume`` skips what is done.
2. **Timing rounds.** Time per training step and inference latency are measured in
   ``timing_rounds`` rounds; each round times every method once, in an order rotated by one
   place per round, so that every method sees the machine in the same states (a method timed
   while another program ran is not alone in it). One fresh process per (round, method) loads
   the trained checkpoint, times forward passes unmerged (batch 1 and 8), then ``timing_steps``
   training steps of the real trainer, then merged forward passes where the method merges. Wall
   and CPU (process) time are both kept, with the load average at start and end, in
   ``timings.jsonl``; the report shows medians and interquartile ranges.

Full fine-tuning is the registered method ``"full"``, run like any other; the report's relative
scores are relative to its rows (:data:`peftlab.lab.report.REFERENCE`), and it is always
included.

Timing and memory come from the machine the bench runs on: the report states it, and the
comparisons it highlights are ratios measured in the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.lab.report import REFERENCE


@dataclass(frozen=True)
class Profile:
    """A training and measurement budget, the same for every method."""

    steps: int
    batch_size: int
    max_length: int
    eval_every: int
    eval_examples: int
    test_examples: int | None
    seeds: tuple[int, ...]
    latency_runs: int
    """Forward passes per latency measurement (batch 1 and 8, unmerged and merged) and round."""
    train_examples: int | None = None
    timing_rounds: int = 3
    """Rounds of the timing phase: each times every method once, in rotated order."""
    timing_steps: int = 4
    """Training steps timed per method and round (after one untimed warm-up step)."""


PROFILES: dict[str, Profile] = {
    # per method on 2 idle CPU cores: ~35 s of training (the previous profile's measurement) plus three
    # timing rounds of a few seconds each; a loaded machine is slower, as the report's load line shows
    "default": Profile(steps=40, batch_size=16, max_length=64, eval_every=20, eval_examples=160,
                       test_examples=512, seeds=(0,), latency_runs=8, timing_rounds=3, timing_steps=4),
    "full": Profile(steps=400, batch_size=32, max_length=96, eval_every=50, eval_examples=1000,
                    test_examples=None, seeds=(0, 1, 2), latency_runs=30, timing_rounds=5, timing_steps=8),
    "smoke": Profile(steps=3, batch_size=4, max_length=24, eval_every=2, eval_examples=8,
                     test_examples=8, seeds=(0,), latency_runs=2, train_examples=64, timing_rounds=2,
                     timing_steps=2),
}


@dataclass
class BenchConfig:
    model: str | None = None
    task: str | None = None
    """A built-in task name; None: ``"tweets"``, or the user's file when ``data`` is given."""
    data: str | None = None
    encoding: str = "utf-8"
    """Text encoding of ``data``."""
    methods: list[str] | None = None
    profile: str = "default"
    vs_peft: bool = False
    run_dir: Path = Path("runs/bench")
    resume: bool = False
    overwrite: bool = False
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    """Profile fields to change (``{"steps": 30, "seeds": [0, 1]}``); every method gets the same."""


# ----------------------------------------------------------------------------- planning
def applicable_methods(task_name: str | None, model_name: str, data: str | None = None,
                       encoding: str = "utf-8") -> dict[str, str | None]:
    """Every registered method and whether it applies: ``{name: None | reason it does not}``.

    Applicability is found by attaching each method to the model on the meta device, so a method
    that cannot apply (e.g. BitFit on a model without biases) says why in its own words.
    """
    import torch

    import peftlab
    from peftlab import models
    from peftlab.lab.tasks import get_task

    task = get_task(task_name, data, encoding=encoding)
    out: dict[str, str | None] = {}
    for name in peftlab.methods():
        with torch.device("meta"):
            model, _ = models.load(model_name, num_labels=task.num_labels or 2, with_tokenizer=False)
        try:
            peftlab.attach(model, name, **default_options(name, model, task))
            out[name] = None
        except peftlab.PeftlabError as e:
            out[name] = str(e)
    return out


def head_modules(model: Any, task: Any) -> list[str]:
    """A classification task needs its new head trained: the last Linear with num_labels outputs."""
    from torch import nn

    if task.kind != "classification":
        return []
    heads = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == task.num_labels]
    return heads[-1:]


def default_options(method: str, model: Any, task: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's own defaults, plus the task head in ``modules_to_save`` for classification."""
    opts: dict[str, Any] = {"modules_to_save": head_modules(model, task)}
    opts.update(overrides or {})
    return opts


def learning_rate(method: str) -> float:
    """The method's own ``suggested_lr`` (full fine-tuning's is 5e-5, adapters' about 1e-3)."""
    import peftlab

    return float(peftlab.method_class(method).suggested_lr)


def data_facts(task: Any, profile: Profile) -> dict[str, Any]:
    """What the report needs to know about the data: sizes, the examples each split uses, label
    counts of those examples, the scored test labels, the budget as a fraction of an epoch, and a
    fingerprint (so that ``peftlab recommend`` pools only runs on the same data).

    The training examples counted are those the trainer draws from (``train_examples`` of them,
    chosen by the first seed, when the profile caps them); validation and test are the fixed
    samples every run is scored on (``subset(..., 0)``).
    """
    from peftlab.lab.metrics import epoch_fraction
    from peftlab.lab.trainer import subset

    splits = {s: task.examples(s) for s in ("train", "validation", "test")}
    used = {"train": subset(splits["train"], profile.train_examples, profile.seeds[0]),
            "validation": subset(splits["validation"], profile.eval_examples, 0),
            "test": subset(splits["test"], profile.test_examples, 0)}
    digest = hashlib.sha256()
    for split, examples in splits.items():
        for e in examples:
            digest.update(json.dumps([split, *dataclasses.astuple(e)], ensure_ascii=False).encode())
    seen = profile.steps * profile.batch_size
    facts: dict[str, Any] = {
        "kind": task.kind, "sizes": {s: len(x) for s, x in splits.items()},
        "used": {s: len(x) for s, x in used.items()}, "examples_seen": seen,
        "epoch_fraction": epoch_fraction(profile.steps, profile.batch_size, len(used["train"])) if used["train"] else None,
        "fingerprint": digest.hexdigest()[:16], "labels": list(task.labels) if task.labels else None,
    }
    if task.kind == "classification":
        facts["counts"] = {s: [Counter(e.label for e in x).get(c, 0) for c in range(task.num_labels)]
                           for s, x in used.items()}
        facts["test_labels"] = [e.label for e in used["test"]]
    return facts


def secondary_metric(task: Any) -> str:
    """The task's secondary metric: its own ``secondary_metric`` if it names one, else macro-F1 for
    classification and perplexity for generated text."""
    from peftlab.lab.report import SECONDARY

    return getattr(task, "secondary_metric", None) or SECONDARY.get(task.metric, "loss")


# ----------------------------------------------------------------------------- workers
def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _load() -> float:
    """The machine's 1-minute load average (runnable processes, this bench's own included)."""
    return os.getloadavg()[0]


def _environment() -> dict[str, Any]:
    import torch

    return {"torch": torch.__version__, "accelerator": "cuda" if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _profile(spec: dict[str, Any]) -> Profile:
    return Profile(**{**spec["profile"], "seeds": tuple(spec["profile"]["seeds"])})


def _prepare(spec: dict[str, Any]):
    import torch

    import peftlab
    from peftlab import models
    from peftlab.lab.tasks import get_task

    task = get_task(spec["task"], spec.get("data"), encoding=spec.get("encoding", "utf-8"))
    torch.manual_seed(spec["seed"])
    model, tok = models.load(spec["model"], num_labels=task.num_labels or 2, seed=spec["seed"])
    base_params = sum(t.numel() for t in model.parameters())
    method, impl = spec["method"], spec["impl"]
    options = spec["options"]
    if impl == "peftlab":
        peftlab.attach(model, method, **options)
    else:  # the peer library's version of the same method, same settings
        import peft

        with torch.device("meta"):
            scratch, _ = models.load(spec["model"], num_labels=task.num_labels or 2, with_tokenizer=False)
        peftlab.attach(scratch, method, **options)
        config = peftlab.adapters(scratch)["default"].to_config(scratch, "default")
        config = {k: v for k, v in config.items() if k not in ("inference_mode",)}
        model = peft.get_peft_model(model, peft.get_peft_config(config))
    return task, model, tok, base_params


def _evaluate(task: Any, model: Any, tok: Any, examples: list, batch_size: int, max_length: int
              ) -> tuple[dict[str, float], list[int] | None]:
    """``task.evaluate`` and, for classification, the predicted class of every example.

    The predictions are read from the logits of the very forward passes ``evaluate`` makes (a
    forward hook on the model), in example order, and kept only if they reproduce its accuracy
    and macro-F1 exactly; so the report's bootstrap rests on the scores the bench reports.
    """
    from peftlab.lab import metrics as m

    captured: list[list[int]] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is not None and not module.training and logits.dim() == 2:
            captured.append(logits.argmax(-1).tolist())

    handle = model.register_forward_hook(hook) if task.kind == "classification" else None
    try:
        scores = task.evaluate(model, tok, examples, batch_size=batch_size, max_length=max_length)
    finally:
        if handle is not None:
            handle.remove()
    predictions = [p for batch in captured for p in batch]
    references = [e.label for e in examples] if task.kind == "classification" else []
    if (not references or len(predictions) != len(references)
            or m.accuracy(predictions, references) != scores.get("accuracy")
            or m.macro_f1(predictions, references) != scores.get("macro_f1")):
        return scores, None
    return scores, predictions


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method, score it on the test split and save it (runs in its own process)."""
    import torch

    import peftlab
    from peftlab.lab.trainer import TrainConfig, subset, train

    p = _profile(spec)
    load_start = _load()
    task, model, tok, base = _prepare(spec)
    if spec["impl"] == "peftlab":
        s = peftlab.summary(model)
        trainable, base = s.trainable, s.base
    else:  # the same denominator as peftlab.summary: the base model's parameters
        trainable, _ = model.get_nb_trainable_parameters()
    rss_before = _rss_bytes()
    cfg = TrainConfig(steps=p.steps, batch_size=p.batch_size, lr=spec["lr"], eval_every=p.eval_every,
                      eval_examples=p.eval_examples, max_length=p.max_length, seed=spec["seed"],
                      save_every=spec.get("save_every", 0), train_examples=p.train_examples,
                      progress=spec.get("progress", True))
    out_dir = Path(spec["out_dir"])
    device = next(model.parameters()).device.type  # where it trains (models load on the CPU)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu0 = time.process_time()
    result = train(model, tok, task, cfg, run_dir=out_dir / "train", resume=spec.get("resume", False))
    cpu_train = time.process_time() - cpu0
    rss_train = _rss_bytes()
    gpu_peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    test = subset(task.examples("test"), p.test_examples, 0)  # the same fair sample for every run
    metrics, predictions = _evaluate(task, model, tok, test, max(p.batch_size, 16), p.max_length)
    # what each method says about its trained adapter (AdaLoRA: the final rank allocation)
    notes = peftlab.summary(model).notes if spec["impl"] == "peftlab" else []
    ckpt = out_dir / "adapter"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    if spec["impl"] == "peft":
        model.save_pretrained(ckpt)
    else:
        peftlab.save(model, ckpt)
    return {
        "trainable": trainable, "base_params": base, "percent": 100.0 * trainable / base,
        "train_seconds": result.seconds, "train_cpu_seconds": cpu_train,
        "train_seconds_per_step": result.seconds_per_step,
        "tokens_per_step": result.tokens / result.steps if result.steps else None, "steps": result.steps,
        "peak_train_rss": rss_train, "train_rss_over_start": rss_train - rss_before, "peak_train_gpu": gpu_peak,
        "score": metrics[task.metric], "metric": task.metric, "secondary_metric": secondary_metric(task),
        "test_metrics": metrics, "test_predictions": predictions,
        "history": [{k: h[k] for k in ("step", "loss") if k in h} for h in result.history],
        "evals": result.evals, "overfitting": result.overfitting,
        "checkpoint_bytes": _dir_bytes(ckpt), "threads": torch.get_num_threads(), "device": device,
        "load": [load_start, _load()], "notes": notes,
    }


def base_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The untrained base model's test metrics (own process): the baseline of generated text,
    where no class prior exists to compare with."""
    import torch

    from peftlab import models
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import subset

    p = _profile(spec)
    task = get_task(spec["task"], spec.get("data"), encoding=spec.get("encoding", "utf-8"))
    torch.manual_seed(spec["seed"])
    model, tok = models.load(spec["model"], num_labels=task.num_labels or 2, seed=spec["seed"])
    test = subset(task.examples("test"), p.test_examples, 0)
    metrics = task.evaluate(model, tok, test, batch_size=max(p.batch_size, 16), max_length=p.max_length)
    return {"metrics": metrics, "metric": task.metric, "secondary_metric": secondary_metric(task)}


def _latency(model: Any, batch: dict[str, Any], runs: int) -> dict[str, list[float]]:
    """Wall and CPU (process) seconds of ``runs`` forward passes, after one warm-up pass."""
    import torch

    wall, cpu = [], []
    with torch.inference_mode():
        model(**batch)  # warm-up
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.process_time()
            model(**batch)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def _step_times(model: Any, tok: Any, task: Any, spec: dict[str, Any], p: Profile) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``timing_steps`` steps of the lab trainer (batch, length and learning
    rate of the profile; optimizer and hooks as in training), after one untimed warm-up step.

    A step is the time from one training forward pass to the next (batching, forward, backward,
    optimizer step): a forward pre-hook stamps each training forward, so nothing of the trainer's
    loop is copied here.
    """
    from peftlab.lab.trainer import TrainConfig, train

    stamps: list[tuple[float, float]] = []

    def hook(module: Any, args: Any) -> None:
        if module.training:
            stamps.append((time.perf_counter(), time.process_time()))

    handle = model.register_forward_pre_hook(hook)
    try:
        cfg = TrainConfig(steps=p.timing_steps + 2, batch_size=p.batch_size, lr=spec["lr"], eval_every=0,
                          eval_examples=1, max_length=p.max_length, seed=spec["seed"],
                          train_examples=p.train_examples, progress=False, warmup_ratio=0.0)
        train(model, tok, task, cfg)
    finally:
        handle.remove()
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][1:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][1:]
    return wall, cpu


def timing_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timing round of one method (own process): the trained checkpoint loaded into a fresh
    base, forward latency unmerged, training-step times, forward latency merged."""
    import torch

    import peftlab
    from peftlab import models
    from peftlab.lab.tasks import get_task

    p = _profile(spec)
    load_start = _load()
    task = get_task(spec["task"], spec.get("data"), encoding=spec.get("encoding", "utf-8"))
    ckpt = Path(spec["out_dir"]) / "adapter"
    torch.manual_seed(spec["seed"])
    base, tok = models.load(spec["model"], num_labels=task.num_labels or 2, seed=spec["seed"])
    if spec["impl"] == "peft":  # peft refuses to load prompt-learning adapters as trainable
        import peft

        model = peft.PeftModel.from_pretrained(base, ckpt)
    else:
        model = base
        peftlab.load(model, ckpt, trainable=True)
    model.eval()
    examples = task.examples("test") or task.examples("validation")
    batches = {b: task.collate(tok, (examples * 8)[:b], p.max_length) for b in (1, 8)}
    batches = {b: {k: v for k, v in x.items() if k != "labels"} for b, x in batches.items()}
    latency = {f"b{b}_unmerged": _latency(model, x, p.latency_runs) for b, x in batches.items()}
    peak_infer = _rss_bytes()  # loading and unmerged inference only: measured before any training step
    # the steps train the loaded adapter (peft: a fresh one of the same config, the same compute)
    stepper = model if spec["impl"] == "peftlab" else _prepare(spec)[1]
    step_wall, step_cpu = _step_times(stepper, tok, task, spec, p)
    del stepper
    model.eval()
    if peftlab.method_class(spec["method"]).mergeable:
        model = model.merge_and_unload() if spec["impl"] == "peft" else peftlab.merge_and_unload(model)
        latency.update({f"b{b}_merged": _latency(model, x, p.latency_runs) for b, x in batches.items()})
    return {"latency": latency, "step_wall": step_wall, "step_cpu": step_cpu, "peak_infer_rss": peak_infer,
            "load": [load_start, _load()]}


# Modules every worker needs: imported once by the fork server, so each worker starts in
# well under a second instead of re-importing torch and transformers (~5 s on 2 CPU cores).
# Missing optional ones (peft) are skipped by the fork server.
_PRELOAD = ["torch", "transformers", "peftlab", "peftlab.methods", "peftlab.lab.trainer",
            "peftlab.lab.tasks", "peftlab.lab.bench", "transformers.models.bert.modeling_bert",
            "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
            "peft"]
_WORKERS = {"train": train_worker, "timing": timing_worker, "base": base_worker}


def _child(mode: str, spec: dict[str, Any], out_path: str) -> None:
    """Worker process body: run one job and write its result (or its traceback) as JSON."""
    import traceback

    try:
        result = _WORKERS[mode](spec)
    except Exception:  # reported by the parent with the method's name; the bench goes on
        result = {"__error__": traceback.format_exc(limit=-8)}
    Path(out_path).write_text(json.dumps(result))


def _start_workers() -> None:
    """Start the fork server (it imports torch and transformers once, several seconds) before the
    first job's clock starts, so that no method's wall time carries it."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    forkserver.ensure_running()


def _spawn(mode: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run a worker in a fresh process forked from a preloaded server.

    A fresh process per job keeps each method's peak memory its own; the fork server (which
    only imports, never computes, so no thread pool is forked) keeps the start-up cheap.
    """
    import multiprocessing

    workdir.mkdir(parents=True, exist_ok=True)
    out_path = workdir / f"{mode}-result.json"
    out_path.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    proc = ctx.Process(target=_child, args=(mode, spec, str(out_path)), name=f"peftlab-{mode}")
    proc.start()
    proc.join()
    result = json.loads(out_path.read_text()) if out_path.exists() else None
    if result is None or "__error__" in result:
        detail = result["__error__"].strip() if result else f"worker exited with code {proc.exitcode}"
        raise RuntimeError(f"{spec['method']} ({spec['impl']}) {mode} failed:\n{detail}")
    return result


# ----------------------------------------------------------------------------- progress
def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """The overall progress line: job k of n, elapsed time and an estimate of the time left.

    The estimate is the mean duration of the finished jobs of each kind times the jobs of that
    kind still to run; a kind not yet seen is estimated from training jobs scaled by its share
    of steps (marked ``~``).
    """

    def __init__(self, train_jobs: int, timing_jobs: int, profile: Profile) -> None:
        self.total = {"train": train_jobs, "timing": timing_jobs}
        self.done = {"train": 0, "timing": 0}
        self.seconds = {"train": 0.0, "timing": 0.0}
        self.scale = (profile.timing_steps + 2) / max(profile.steps, 1) + 0.15
        self.began = time.perf_counter()

    def finished(self, kind: str, seconds: float) -> None:
        self.done[kind] += 1
        self.seconds[kind] += seconds

    def skip(self, kind: str) -> None:
        self.total[kind] -= 1

    def line(self, what: str) -> str:
        n = sum(self.total.values())
        k = sum(self.done.values()) + 1
        mean = {kind: self.seconds[kind] / self.done[kind] if self.done[kind] else None for kind in self.done}
        guess = mean["timing"] is None and self.total["timing"] - self.done["timing"] > 0
        if mean["timing"] is None and mean["train"] is not None:
            mean["timing"] = mean["train"] * self.scale
        left = [(self.total[kind] - self.done[kind]) * mean[kind] for kind in mean if mean[kind] is not None]
        eta = ("unknown" if mean["train"] is None and self.total["train"] > self.done["train"]
               else ("~" if guess else "") + _clock(sum(left)))
        return f"[{k}/{n}] {what} | elapsed {_clock(time.perf_counter() - self.began)}, ETA {eta}"


def _result_line(row: dict[str, Any]) -> str:
    """One line per finished training run: score, secondary metric, majority baseline, size, time."""
    from peftlab.lab.report import MIB, main_baseline

    if "error" in row:
        return f"  -> {row['method']} ({row['impl']}, seed {row['seed']}) FAILED: {row['error'].splitlines()[-1]}"
    base = main_baseline(row.get("data"))
    versus = ""
    if base:
        versus = (f" ({base['name']} {base['score']:.4f}" + (": NOT above it)" if row["score"] <= base["score"] else ")"))
    second = row.get("secondary_metric")
    value = (row.get("test_metrics") or {}).get(second)
    return (f"  -> {row['method']} ({row['impl']}, seed {row['seed']}): {row['metric']} {row['score']:.4f}{versus}"
            + (f", {second} {value:.4f}" if value is not None else "")
            + f", {row['percent']:.3f}% of base trains, peak {row['peak_train_rss'] / MIB:,.0f} MiB, "
            f"{row['wall_seconds']:.1f} s wall ({row['train_cpu_seconds']:.1f} s CPU training)")


# ----------------------------------------------------------------------------- driver
def _profile_of(config: BenchConfig) -> Profile:
    import peftlab

    if config.profile not in PROFILES:
        raise peftlab.ConfigError(f"unknown profile {config.profile!r}; known: {sorted(PROFILES)}")
    profile = PROFILES[config.profile]
    if config.overrides:
        known_fields = {f.name for f in dataclasses.fields(Profile)}
        bad = sorted(set(config.overrides) - known_fields)
        if bad:
            raise peftlab.ConfigError(f"unknown profile field(s) {bad}; known: {sorted(known_fields)}")
        changes = dict(config.overrides)
        if "seeds" in changes:
            changes["seeds"] = tuple(changes["seeds"])
        profile = dataclasses.replace(profile, **changes)
    if (profile.steps < 1 or profile.batch_size < 1 or profile.max_length < 2 or not profile.seeds
            or profile.timing_rounds < 1 or profile.timing_steps < 1 or profile.latency_runs < 1):
        raise peftlab.ConfigError("profile overrides give an empty budget (steps, batch_size, timing_rounds, "
                                  f"timing_steps and latency_runs must be >= 1): {dataclasses.asdict(profile)}")
    return profile


def run(config: BenchConfig) -> list[dict[str, Any]]:
    """Run the bench; returns every result row (also in ``run_dir/results.jsonl``; the timing
    rounds are in ``run_dir/timings.jsonl``)."""
    import peftlab
    from peftlab import models
    from peftlab.lab import report
    from peftlab.lab.tasks import get_task

    profile = _profile_of(config)
    task_name = config.task if config.task is not None else (None if config.data else "tweets")
    task = get_task(task_name, config.data, encoding=config.encoding)
    model_name = config.model or task.default_model
    if model_name not in models.names():
        raise peftlab.ConfigError(f"unknown model {model_name!r}; known: {models.names()}")
    run_dir = Path(config.run_dir)
    results_path, timings_path = run_dir / "results.jsonl", run_dir / "timings.jsonl"
    if run_dir.exists() and any(run_dir.iterdir()) and not (config.resume or config.overwrite):
        raise peftlab.ConfigError(f"{run_dir} exists; pass --resume to continue it or --overwrite to replace it")
    if config.overwrite and run_dir.exists():
        from peftlab.lab.bench_cli import check_overwrite

        check_overwrite(run_dir)  # only a folder holding nothing but the bench's own entries is replaced
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    known = applicable_methods(task_name, model_name, config.data, config.encoding)
    wanted = list(dict.fromkeys(config.methods or list(known)))
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise peftlab.ConfigError(f"unknown method(s) {unknown}; known: {sorted(known)}")
    wanted = [REFERENCE, *(m for m in wanted if m != REFERENCE)]  # the 1.0 of the relative scores, run first
    skipped = {m: known[m] for m in wanted if known[m] is not None}

    def peer(m: str) -> bool:
        cls = peftlab.method_class(m)
        if config.vs_peft and cls.peft_type and cls.peft_peer_untrainable:
            skipped[f"{m} (peft)"] = cls.peft_peer_untrainable
        return bool(config.vs_peft and cls.peft_type and not cls.peft_peer_untrainable)

    plan = [(m, impl) for m in wanted if known[m] is None
            for impl in (("peftlab", "peft") if peer(m) else ("peftlab",))]

    rows = [r for r in report.read_jsonl(results_path) if "error" not in r]  # failed runs are retried
    all_rows = list(rows)
    timings = [t for t in report.read_jsonl(timings_path) if "error" not in t]
    done = {(r["method"], r["impl"], r["seed"]) for r in rows}
    timed = {(t["method"], t["impl"], t["round"]) for t in timings}
    env = _environment()
    facts = data_facts(task, profile)
    meta_model = _meta_model(model_name, task)
    seed0 = profile.seeds[0]
    jobs = [(seed, m, i) for seed in profile.seeds for m, i in plan]
    progress = Progress(len(jobs), profile.timing_rounds * len(plan), profile)
    print(f"bench: {model_name} on {task.name}, profile {config.profile}, {len(plan)} method run(s): "
          f"{', '.join(m + (' (+ peft)' if (m, 'peft') in plan else '') for m, i in plan if i == 'peftlab')}"
          f"; {len(profile.seeds)} seed(s), {profile.timing_rounds} timing round(s); results in {run_dir}")
    for m, why in skipped.items():
        print(f"  skipped {m}: {why}")
    began = time.perf_counter()
    _start_workers()

    def spec_of(method: str, impl: str, seed: int) -> dict[str, Any]:
        return {"model": model_name, "task": task_name, "data": config.data, "encoding": config.encoding,
                "method": method, "impl": impl, "seed": seed, "lr": learning_rate(method),
                "out_dir": str(run_dir / f"{method}-{impl}-seed{seed}"), "profile": dataclasses.asdict(profile),
                "options": default_options(method, meta_model, task, config.options.get(method)),
                "resume": config.resume, "save_every": max(profile.steps // 3, 1)}

    if task.kind != "classification":  # the untrained base model is the baseline of generated text
        base_path = run_dir / "baseline.json"
        if not base_path.exists():
            print(f"scoring the untrained base model on the test split (the baseline of {task.metric})")
            base_path.write_text(json.dumps(_spawn("base", spec_of(REFERENCE, "peftlab", seed0), run_dir / "base")))
        facts["base_model"] = json.loads(base_path.read_text())

    try:
        for seed, method, impl in jobs:
            if (method, impl, seed) in done:
                progress.skip("train")
                continue
            spec = spec_of(method, impl, seed)
            print(f"\n{progress.line(f'training {method} ({impl}), seed {seed}')}")
            t0 = time.perf_counter()
            row = {"method": method, "impl": impl, "seed": seed, "model": model_name, "task": task.name,
                   "data_path": config.data, "profile": config.profile + ("*" if config.overrides else ""),
                   "budget": dataclasses.asdict(profile), "options": spec["options"], "lr": spec["lr"], "env": env,
                   "data": facts}
            try:
                row.update(_spawn("train", spec, Path(spec["out_dir"])))
            except RuntimeError as e:
                print(f"  {e}")
                row["error"] = str(e)
            row["wall_seconds"] = time.perf_counter() - t0
            progress.finished("train", row["wall_seconds"])
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            all_rows.append(row)
            if "error" not in row:
                rows.append(row)
            print(_result_line(row))
            report.write(run_dir, all_rows, skipped=skipped, plots=False, timings=timings)
        trained = {(r["method"], r["impl"]) for r in rows if r["seed"] == seed0}
        for rnd in range(profile.timing_rounds):
            order = plan[rnd % len(plan):] + plan[:rnd % len(plan)]  # every method in every position
            for method, impl in order:
                if (method, impl, rnd) in timed or (method, impl) not in trained:
                    progress.skip("timing")
                    continue
                spec = spec_of(method, impl, seed0)
                print(progress.line(f"timing round {rnd + 1}/{profile.timing_rounds}: {method} ({impl})"))
                t0 = time.perf_counter()
                entry: dict[str, Any] = {"method": method, "impl": impl, "round": rnd, "seed": seed0}
                try:
                    entry.update(_spawn("timing", spec, Path(spec["out_dir"])))
                except RuntimeError as e:
                    print(f"  {e}")
                    entry["error"] = str(e)
                entry["wall_seconds"] = time.perf_counter() - t0
                progress.finished("timing", entry["wall_seconds"])
                with timings_path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                if "error" not in entry:
                    timings.append(entry)
                    step = report.spread(entry["step_wall"])
                    if step:
                        print(f"  -> {method} ({impl}): {step['median']:.3f} s/step, "
                              f"b1 {1000 * statistics.median(entry['latency']['b1_unmerged']['wall']):.1f} ms unmerged")
            report.write(run_dir, all_rows, skipped=skipped, plots=False, timings=timings)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished methods are in {results_path}; `peftlab bench --resume "
              f"--run-dir {run_dir}` continues")
        report.write(run_dir, all_rows, skipped=skipped, timings=timings)
        raise
    report.write(run_dir, all_rows, skipped=skipped, timings=timings)
    print("\n" + report.terminal_table(rows, timings))
    lines = report.console_guidance(rows, timings)
    if lines:
        print("\n" + "\n".join(f"* {line}" for line in lines))
    print(f"\nbench wall time {_clock(time.perf_counter() - began)}; report: {run_dir / 'report.html'} "
          "(also report.md, results.jsonl, timings.jsonl, *.png)")
    return all_rows


def _meta_model(model_name: str, task: Any) -> Any:
    import torch

    from peftlab import models

    with torch.device("meta"):
        model, _ = models.load(model_name, num_labels=task.num_labels or 2, with_tokenizer=False)
    return model
