"""``peftlab bench``: every applicable method, same model, data, budget and seed, side by side.

Each method trains in its own process (forked from a server that has imported torch and
transformers once), so that peak memory is that method's alone and a crash in one method leaves
the others measured; its inference is measured in another fresh process (latency unmerged and merged, batch 1 and 8, peak resident memory). Every finished
method appends one row to ``runs/<name>/results.jsonl`` at once, so an interrupted bench keeps
what it measured, and ``--resume`` skips what is done. Full fine-tuning is always the 1.0
reference of the score.

Timing and memory come from the machine the bench runs on: the report states it, and the
comparisons it highlights are ratios measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL = "full"
"""Full fine-tuning: no adapter, every parameter trains; the bench's reference."""
FULL_LR = 5e-5


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
    train_examples: int | None = None


PROFILES: dict[str, Profile] = {
    # 13 methods in about 8.5 minutes on 2 CPU cores (~35 s per method, full fine-tuning ~55 s)
    "default": Profile(steps=40, batch_size=16, max_length=64, eval_every=20, eval_examples=160,
                       test_examples=512, seeds=(0,), latency_runs=8),
    "full": Profile(steps=400, batch_size=32, max_length=96, eval_every=50, eval_examples=1000,
                    test_examples=None, seeds=(0, 1, 2), latency_runs=50),
    "smoke": Profile(steps=3, batch_size=4, max_length=24, eval_every=2, eval_examples=8,
                     test_examples=8, seeds=(0,), latency_runs=2, train_examples=64),
}


@dataclass
class BenchConfig:
    model: str | None = None
    task: str = "tweets"
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
def applicable_methods(task_name: str, model_name: str, data: str | None = None,
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
    out: dict[str, str | None] = {FULL: None}
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
    import peftlab

    return FULL_LR if method == FULL else float(getattr(peftlab.method_class(method), "suggested_lr", 1e-3))


# ----------------------------------------------------------------------------- workers
def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _environment() -> dict[str, Any]:
    import torch

    return {"torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
    if method != FULL and impl == "peftlab":
        peftlab.attach(model, method, **options)
    elif method != FULL:  # the peer library's version of the same method, same settings
        import peft

        with torch.device("meta"):
            scratch, _ = models.load(spec["model"], num_labels=task.num_labels or 2, with_tokenizer=False)
        peftlab.attach(scratch, method, **options)
        config = peftlab.adapters(scratch)["default"].to_config(scratch, "default")
        config = {k: v for k, v in config.items() if k not in ("inference_mode",)}
        model = peft.get_peft_model(model, peft.get_peft_config(config))
    return task, model, tok, base_params


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method and measure it (runs in its own process)."""
    import torch

    import peftlab
    from peftlab.lab.trainer import TrainConfig, subset, train

    p = Profile(**{**spec["profile"], "seeds": tuple(spec["profile"]["seeds"])})
    task, model, tok, base = _prepare(spec)
    if spec["method"] == FULL:
        for param in model.parameters():
            param.requires_grad_(True)
    if spec["method"] != FULL and spec["impl"] == "peftlab":
        s = peftlab.summary(model)
        trainable, base = s.trainable, s.base
    else:
        trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
        if spec["impl"] == "peft":
            trainable, _ = model.get_nb_trainable_parameters()
    rss_before = _rss_bytes()
    cfg = TrainConfig(steps=p.steps, batch_size=p.batch_size, lr=spec["lr"], eval_every=p.eval_every,
                      eval_examples=p.eval_examples, max_length=p.max_length, seed=spec["seed"],
                      save_every=spec.get("save_every", 0), train_examples=p.train_examples,
                      progress=spec.get("progress", True))
    out_dir = Path(spec["out_dir"])
    result = train(model, tok, task, cfg, run_dir=out_dir / "train", resume=spec.get("resume", False))
    rss_train = _rss_bytes()
    test = subset(task.examples("test"), p.test_examples, 0)  # the same fair sample for every run
    metrics = task.evaluate(model, tok, test, batch_size=max(p.batch_size, 16), max_length=p.max_length)
    ckpt = out_dir / "adapter"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    if spec["method"] == FULL or spec["impl"] == "peft":
        model.save_pretrained(ckpt)
    else:
        peftlab.save(model, ckpt)
    return {
        "trainable": trainable, "base_params": base, "percent": 100.0 * trainable / base,
        "train_seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
        "tokens_per_second": result.tokens_per_second, "steps": result.steps,
        "peak_train_rss": rss_train, "train_rss_over_start": rss_train - rss_before,
        "score": metrics[task.metric], "metric": task.metric, "test_metrics": metrics,
        "history": [{k: h[k] for k in ("step", "loss") if k in h} for h in result.history],
        "evals": result.evals, "overfitting": result.overfitting,
        "checkpoint_bytes": _dir_bytes(ckpt), "threads": torch.get_num_threads(),
    }


def _latency_ms(model: Any, batch: dict[str, Any], runs: int) -> float:
    import torch

    with torch.inference_mode():
        model(**batch)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def infer_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Reload the trained adapter into a fresh base and time inference (own process)."""
    import torch

    import peftlab
    from peftlab import models
    from peftlab.lab.tasks import get_task

    p = Profile(**{**spec["profile"], "seeds": tuple(spec["profile"]["seeds"])})
    task = get_task(spec["task"], spec.get("data"), encoding=spec.get("encoding", "utf-8"))
    ckpt = Path(spec["out_dir"]) / "adapter"
    torch.manual_seed(spec["seed"])
    if spec["method"] == FULL:
        base, tok = models.load(spec["model"], num_labels=task.num_labels or 2, seed=spec["seed"])
        model = type(base).from_pretrained(ckpt).eval()
    elif spec["impl"] == "peft":
        import peft

        base, tok = models.load(spec["model"], num_labels=task.num_labels or 2, seed=spec["seed"])
        model = peft.PeftModel.from_pretrained(base, ckpt).eval()
    else:
        model, tok = models.load(spec["model"], num_labels=task.num_labels or 2, seed=spec["seed"])
        peftlab.load(model, ckpt)
    examples = task.examples("test")
    out: dict[str, Any] = {}
    batches = {b: task.collate(tok, (examples * 8)[:b], p.max_length) for b in (1, 8)}
    batches = {b: {k: v for k, v in x.items() if k != "labels"} for b, x in batches.items()}
    mergeable = spec["method"] == FULL or (spec["impl"] == "peftlab" and peftlab.method_class(spec["method"]).mergeable) \
        or spec["impl"] == "peft"
    for b, x in batches.items():
        out[f"latency_ms_b{b}" + ("" if spec["method"] == FULL else "_unmerged")] = _latency_ms(model, x, p.latency_runs)
    if spec["method"] != FULL and mergeable:
        model = model.merge_and_unload() if spec["impl"] == "peft" else peftlab.merge_and_unload(model)
        for b, x in batches.items():
            out[f"latency_ms_b{b}_merged"] = _latency_ms(model, x, p.latency_runs)
    out["peak_infer_rss"] = _rss_bytes()
    return out


# Modules every worker needs: imported once by the fork server, so each worker starts in
# well under a second instead of re-importing torch and transformers (~5 s on 2 CPU cores).
# Missing optional ones (peft) are skipped by the fork server.
_PRELOAD = ["torch", "transformers", "peftlab", "peftlab.methods", "peftlab.lab.trainer",
            "peftlab.lab.tasks", "peftlab.lab.bench", "transformers.models.bert.modeling_bert",
            "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
            "peft"]


def _child(mode: str, spec: dict[str, Any], out_path: str) -> None:
    """Worker process body: run one job and write its result (or its traceback) as JSON."""
    import traceback

    try:
        result = (train_worker if mode == "train" else infer_worker)(spec)
    except Exception:  # reported by the parent with the method's name; the bench goes on
        result = {"__error__": traceback.format_exc(limit=-8)}
    Path(out_path).write_text(json.dumps(result))


def _spawn(mode: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run ``train_worker``/``infer_worker`` in a fresh process forked from a preloaded server.

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


# ----------------------------------------------------------------------------- driver
def run(config: BenchConfig) -> list[dict[str, Any]]:
    """Run the bench; returns every result row (also in ``run_dir/results.jsonl``)."""
    import peftlab
    from peftlab import models
    from peftlab.lab import report
    from peftlab.lab.tasks import get_task

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
        if profile.steps < 1 or profile.batch_size < 1 or profile.max_length < 2 or not profile.seeds:
            raise peftlab.ConfigError(f"profile overrides give an empty budget: {dataclasses.asdict(profile)}")
    task = get_task(config.task, config.data, encoding=config.encoding)
    model_name = config.model or task.default_model
    if model_name not in models.names():
        raise peftlab.ConfigError(f"unknown model {model_name!r}; known: {models.names()}")
    run_dir = Path(config.run_dir)
    results_path = run_dir / "results.jsonl"
    if run_dir.exists() and any(run_dir.iterdir()) and not (config.resume or config.overwrite):
        raise peftlab.ConfigError(f"{run_dir} exists; pass --resume to continue it or --overwrite to replace it")
    if config.overwrite and run_dir.exists():
        from peftlab.lab.bench_cli import check_overwrite

        check_overwrite(run_dir)  # only a folder holding nothing but the bench's own entries is replaced
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    known = applicable_methods(config.task, model_name, config.data, config.encoding)
    wanted = config.methods or list(known)
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise peftlab.ConfigError(f"unknown method(s) {unknown}; known: {sorted(known)}")
    if FULL not in wanted:
        wanted = [FULL, *wanted]  # the 1.0 reference
    skipped = {m: known[m] for m in wanted if known[m] is not None}
    plan = [(m, impl) for m in wanted if known[m] is None
            for impl in (("peftlab", "peft") if config.vs_peft and m != FULL and peftlab.method_class(m).peft_type
                         else ("peftlab",))]

    rows = _read_rows(results_path)
    done = {(r["method"], r["impl"], r["seed"]) for r in rows}
    env = _environment()
    meta_model = _meta_model(model_name, task)
    print(f"bench: {model_name} on {task.name}, profile {config.profile}, methods "
          f"{', '.join(m + (' (+ peft)' if (m, 'peft') in plan else '') for m, i in plan if i == 'peftlab')}"
          f"; results in {run_dir}")
    for m, why in skipped.items():
        print(f"  skipped {m}: {why}")
    try:
        for seed in profile.seeds:
            for method, impl in plan:
                if (method, impl, seed) in done:
                    continue
                out_dir = run_dir / f"{method}-{impl}-seed{seed}"
                spec = {"model": model_name, "task": config.task, "data": config.data,
                        "encoding": config.encoding, "method": method,
                        "impl": impl, "seed": seed, "lr": learning_rate(method), "out_dir": str(out_dir),
                        "profile": dataclasses.asdict(profile),
                        "options": {} if method == FULL else default_options(
                            method, meta_model, task, config.options.get(method)),
                        "resume": config.resume, "save_every": max(profile.steps // 3, 1)}
                print(f"\n== {method} ({impl}), seed {seed}")
                t0 = time.perf_counter()
                row = {"method": method, "impl": impl, "seed": seed, "model": model_name, "task": task.name,
                       "profile": config.profile + ("*" if config.overrides else ""),
                       "budget": dataclasses.asdict(profile), "options": spec["options"], "lr": spec["lr"], "env": env}
                try:
                    row.update(_spawn("train", spec, out_dir))
                    row.update(_spawn("infer", spec, out_dir))
                except RuntimeError as e:
                    print(f"  {e}")
                    row["error"] = str(e)
                row["wall_seconds"] = time.perf_counter() - t0
                with results_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                report.write(run_dir, rows, skipped=skipped, plots=False)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished methods are in {results_path}; `peftlab bench --resume "
              f"--run-dir {run_dir}` continues")
        report.write(run_dir, rows, skipped=skipped)
        raise
    report.write(run_dir, rows, skipped=skipped)
    print("\n" + report.terminal_table(rows))
    print(f"\nreport: {run_dir / 'report.html'} (also report.md, results.jsonl, *.png)")
    return rows


def _meta_model(model_name: str, task: Any) -> Any:
    import torch

    from peftlab import models

    with torch.device("meta"):
        model, _ = models.load(model_name, num_labels=task.num_labels or 2, with_tokenizer=False)
    return model


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{i} is not valid JSON (an interrupted write?); ignoring it")
    return [r for r in rows if "error" not in r]

