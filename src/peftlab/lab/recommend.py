"""``peftlab recommend``: rank methods for a model, a memory budget and how it will be served.

Evidence, strongest first:

1. **Measured**: rows of ``peftlab bench`` runs on the same model (``results.jsonl``, and the
   timing rounds in ``timings.jsonl`` beside it). Runs are pooled as seeds only when they share
   the task, the data (its fingerprint) and the whole budget (steps, batch, sequence length,
   training/validation/test examples); runs of different budgets are never averaged. For each
   method the budget with the most training (steps x batch) is used, and the others are named.
   A measurement whose reference (the registered method ``"full"``) does not beat the
   majority-class baseline (or, for generated text, the untrained base model) says nothing about relative quality, so it is set aside for the
   published score, with the reason.
2. **Published**: the score relative to full fine-tuning that the method's paper reports
   (``Method.typical_score`` and its source), where nothing usable was measured.
3. **Memory**: a bench's measured peak where it trained under the conditions asked for (same
   model, batch, sequence, device, dtype, precision, optimizer and checkpointing), else the
   estimator (:func:`peftlab.estimate.fit`). When a method does not fit, the changes that would
   make it fit are tried with the estimator (a smaller batch or sequence, gradient
   checkpointing, an 8-bit optimizer, both), and when nothing fits the output says so and lists
   them, with QLoRA where it is not already a candidate.

The ranking key is explicit, so a user can check it: first "fits the budget" (fits as asked; fits
after a change of a setting; after a smaller batch with gradient accumulation; only with a shorter
sequence; in no way tried), then the objective: ``score`` (the expected relative
score minus the serving penalties below, then fewer trainable parameters) or ``params`` (fewest
trainable parameters, then the score).

* Latency-critical serving: a mergeable method costs nothing once merged; a method that cannot
  merge pays its measured extra latency over the reference's at batch 1, one score point per 10%
  slower, but only when the difference is above the measured noise (the interquartile ranges of
  the timing rounds do not overlap); within the noise it pays nothing, and unmeasured it pays
  :data:`UNMEASURED_LATENCY_COST`.
* Several tasks: a method that trains the base weights (``Method.trains_base_weights``: full
  fine-tuning, GaLore) keeps one full model per task; a PEFT method keeps one base and N small
  adapters. Such a method pays :data:`COPY_COST` per extra task, and when a budget is given and N
  copies of the weights do not fit it, it counts as not fitting for serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.lab.report import REFERENCE

LATENCY_POINT = 0.10
"""Fractional extra latency that costs one point (0.01) of relative score when latency-critical."""
UNMEASURED_LATENCY_COST = 0.02
"""Score cost of a non-mergeable method when latency matters and no latency was measured."""
COPY_COST = 0.01
"""Score cost of each extra full model copy when serving several tasks."""
OBJECTIVES = ("score", "params")
BUDGET_KEYS = ("steps", "batch_size", "max_length", "train_examples", "eval_examples", "test_examples")
"""The budget fields that must match for runs to be pooled as seeds of one measurement."""
BENCH_CONDITIONS = {"dtype": "fp32", "mixed_precision": False, "optimizer": "adamw", "checkpointing": "none"}
"""How ``peftlab bench`` trains (the trainer's defaults): the settings under which its measured
peak memory stands for the estimator's."""


@dataclass(frozen=True)
class Need:
    """What the user has and wants."""

    model: str
    """Embedded model name, preset or path to a config.json (as ``peftlab estimate`` reads it)."""
    budget: str | None = None
    """Memory per device, e.g. ``"24GB"``; None: memory is shown, not enforced."""
    latency_critical: bool = False
    tasks: int = 1
    """Number of tasks served from one base model."""
    batch: int = 8
    seq: int = 512
    results: tuple[Path, ...] = ()
    """``results.jsonl`` files or run directories of ``peftlab bench``."""
    methods: tuple[str, ...] | None = None
    """Candidates (default: every registered method, full fine-tuning included)."""
    settings: tuple[tuple[str, Any], ...] = ()
    """Extra estimator settings (dtype, optimizer, checkpointing, ...)."""
    objective: str = "score"
    """``"score"``: best expected score; ``"params"``: fewest trainable parameters."""


@dataclass(frozen=True)
class Fix:
    """A change that makes a method fit the budget, with the estimator's memory under it."""

    change: str
    memory_bytes: int
    cost: int = 0
    """How much of the asked-for training it changes: 0 a setting (checkpointing, optimizer),
    1 a smaller batch (gradient accumulation keeps the effective batch), 2 a shorter sequence
    (the model sees less of each example)."""


@dataclass(frozen=True)
class Pick:
    """One ranked method with the evidence behind it."""

    method: str
    expected: float | None
    """Expected task score relative to full fine-tuning."""
    evidence: str
    """'measured (n seeds, budget)', 'published' or 'none'."""
    utility: float | None
    """``expected`` minus serving penalties: the ranking value of the ``score`` objective."""
    fits: bool | None
    """Fits the budget at the requested batch and sequence (None: no budget or not estimated)."""
    memory_bytes: int | None
    trainable_percent: float | None
    reason: str
    memory_source: str = "estimate"
    """``"measured"`` (a bench's peak under the same conditions) or ``"estimate"``."""
    fixes: tuple[Fix, ...] = ()
    """Changes that make a method that does not fit fit (estimated), smallest change first."""
    trainable: int | None = None


# ----------------------------------------------------------------------------- measured evidence
def _result_rows(paths: Iterable[Path], model: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The successful peftlab rows of ``model`` in the given results files, and the timing rounds
    beside them; every row and timing carries ``_run``, the file it came from."""
    from peftlab.lab.report import read_jsonl

    rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        file = path / "results.jsonl" if path.is_dir() else path
        if not file.is_file():
            from peftlab.core.errors import ConfigError

            raise ConfigError(f"no bench results at {file}; pass a results.jsonl or a `peftlab bench` run directory")
        for row in _quiet_jsonl(file, read_jsonl):
            if "error" not in row and row.get("impl", "peftlab") == "peftlab" and row.get("model") == model:
                rows.append({**row, "_run": str(file)})
        for t in _quiet_jsonl(file.parent / "timings.jsonl", read_jsonl):
            if "error" not in t and t.get("impl", "peftlab") == "peftlab":
                timings.append({**t, "_run": str(file)})
    return rows, timings


def _quiet_jsonl(path: Path, reader: Any) -> list[dict[str, Any]]:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # an interrupted line is skipped, as the bench does
        return reader(path)


def budget_key(row: dict[str, Any]) -> tuple:
    """What must be equal for two runs to be seeds of one measurement: task, data, budget."""
    b = row.get("budget") or {}
    data = row.get("data") or {}
    return (row.get("task"), data.get("fingerprint") or row.get("data_path"),
            *(b.get(k) for k in BUDGET_KEYS))


def budget_text(row: dict[str, Any]) -> str:
    b = row.get("budget") or {}
    return f"{b.get('steps', '?')} steps x batch {b.get('batch_size', '?')} x {b.get('max_length', '?')} tokens"


def _groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows split by :func:`budget_key`; within a group one row per (method, seed) (a run repeated
    with the same seed is the same measurement, not a second seed)."""
    groups: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(budget_key(r), {}).setdefault((r["method"], r["seed"]), r)
    return [list(g.values()) for g in groups.values()]


def _measured(rows: list[dict[str, Any]], timings: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the measurement to use: from one budget group (never pooled across groups),
    preferring groups where the reference beats the majority baseline, then the most training,
    then the most seeds."""
    from peftlab.lab import report

    found: dict[str, list[dict[str, Any]]] = {}
    for group in _groups(rows):
        runs = {r["_run"] for r in group}
        ts = [t for t in timings if t["_run"] in runs]
        agg = report.aggregate(group, ts)
        data = report.data_facts(group)
        ev = report.evidence(agg, data)
        base = report.main_baseline(data)
        by = {a["method"]: a for a in agg}
        ref = by.get(REFERENCE)
        b = group[0].get("budget") or {}
        for method, a in by.items():
            found.setdefault(method, []).append({
                "relative": a["relative"], "seeds": len(a["seeds"]), "budget": budget_text(group[0]),
                "training": (b.get("steps") or 0) * (b.get("batch_size") or 0),
                "baseline": base["name"] if base else "baseline",
                "informative": ref is not None and (base is None or ev.beats(ref["label"], base["score"]) is True),
                "beats_baseline": None if base is None else ev.beats(a["label"], base["score"]),
                "latency": a["timing"].get("latency_b1_unmerged"),
                "reference_latency": ref["timing"].get("latency_b1_unmerged") if ref else None,
                "rows": [r for r in group if r["method"] == method],
            })
    out = {}
    for method, options in found.items():
        usable = [o for o in options if o["relative"] is not None]
        if not usable:
            continue
        best = max(usable, key=lambda o: (o["informative"], o["training"], o["seeds"]))
        best["others"] = [o["budget"] for o in usable if o is not best]
        out[method] = best
    return out


def _measured_memory(m: dict[str, Any] | None, need: Need, settings: dict[str, Any]) -> int | None:
    """The bench's measured peak training memory where it trained as asked, else None."""
    if not m:
        return None
    asked = {k: settings.get(k, v) for k, v in BENCH_CONDITIONS.items()}
    if asked != BENCH_CONDITIONS:
        return None
    device = settings.get("device", "cuda")
    peaks = []
    for r in m["rows"]:
        b = r.get("budget") or {}
        if b.get("batch_size") != need.batch or b.get("max_length") != need.seq:
            continue
        if r.get("device", (r.get("env") or {}).get("device")) != device:
            continue
        peak = r.get("peak_train_gpu") if device == "cuda" else r.get("peak_train_rss")
        if peak:
            peaks.append(int(peak))
    return max(peaks) if peaks else None


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


# ----------------------------------------------------------------------------- fixes
def _fixes(need: Need, method: str, f: Any, limit: int, settings: dict[str, Any]) -> tuple[Fix, ...]:
    """Changes that make ``method`` fit ``limit``, each with the estimator's memory; one change
    before two, smaller memory first within each."""
    from peftlab.core.errors import ConfigError
    from peftlab.estimate import estimate

    def total(batch: int, seq: int, **changes: Any) -> int | None:
        try:
            return estimate(need.model, method, batch=batch, seq=seq, **{**settings, **changes}).total
        except ConfigError:
            return None

    out: list[Fix] = []
    if 1 <= f.max_batch < need.batch:
        accum = -(-need.batch // f.max_batch)
        out.append(Fix(f"batch {f.max_batch} x {accum} accumulation steps (instead of batch {need.batch})",
                       total(f.max_batch, need.seq) or 0, 1))
    if 1 <= f.max_seq < need.seq:
        out.append(Fix(f"sequence {f.max_seq} (instead of {need.seq})", total(need.batch, f.max_seq) or 0, 2))
    singles = []
    if settings.get("checkpointing", "none") != "full":
        singles.append(("gradient checkpointing (checkpointing=full)", {"checkpointing": "full"}))
    if settings.get("optimizer", "adamw") == "adamw":
        singles.append(("8-bit optimizer (optimizer=adamw8bit)", {"optimizer": "adamw8bit"}))
    for text, changes in singles:
        t = total(need.batch, need.seq, **changes)
        if t is not None and t <= limit:
            out.append(Fix(text, t))
    if len(singles) == 2 and not any(x.change == singles[0][0] or x.change == singles[1][0] for x in out):
        t = total(need.batch, need.seq, **singles[0][1], **singles[1][1])
        if t is not None and t <= limit:
            out.append(Fix(f"{singles[0][0]} and {singles[1][0]}", t))
    return tuple(sorted(out, key=lambda x: (x.cost, x.memory_bytes)))


def suggestions(need: Need, picks: list[Pick]) -> list[str]:
    """When no candidate fits the budget as asked: what would, with the estimated memory (the
    best-ranked methods' fixes, and QLoRA where it is not a candidate). Empty otherwise."""
    import peftlab
    from peftlab.core.errors import ConfigError
    from peftlab.estimate import fit

    if not need.budget or any(p.fits for p in picks):
        return []
    lines = [f"nothing fits {need.budget} at batch {need.batch} x {need.seq} as asked"]
    for p in picks:
        if p.fixes:
            lines.append(f"{p.method} fits with " + "; or ".join(f"{x.change}: {_gb(x.memory_bytes)}"
                                                                 for x in p.fixes))
    if "qlora" in peftlab.methods() and "qlora" not in {p.method for p in picks}:
        try:
            q = fit(need.budget, need.model, ["qlora"], batch=need.batch, seq=need.seq, **dict(need.settings))[0]
        except ConfigError:
            q = None
        if q is not None and q.estimate is not None:
            lines.append(f"qlora (not among the candidates): {_gb(q.estimate.total)} at batch {need.batch} x "
                         f"{need.seq}" + (", fits" if q.fits else f"; fits at batch {q.max_batch}" if q.max_batch
                                          else ", does not fit"))
    if len(lines) == 1:
        lines.append("no single change tried fits (smaller batch or sequence, checkpointing, 8-bit optimizer): "
                     "a larger device or several devices (ZeRO/FSDP settings) are needed")
    return lines


# ----------------------------------------------------------------------------- ranking
def recommend(need: Need) -> list[Pick]:
    """Rank the candidate methods for ``need``; best first."""
    import peftlab
    from peftlab.core.errors import ConfigError

    if need.tasks < 1 or need.batch < 1 or need.seq < 1:
        raise ConfigError("tasks, batch and seq must be positive integers")
    if need.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {need.objective!r}")
    candidates = list(dict.fromkeys(need.methods)) if need.methods else list(peftlab.methods())
    for m in candidates:
        peftlab.method_class(m)  # unknown names: an error listing the known ones
    measured = _measured(*_result_rows(need.results, need.model)) if need.results else {}

    from peftlab.estimate import fit, parse_size

    settings = dict(need.settings)
    budget = need.budget or "1000TB"  # no budget: estimate the memory, enforce nothing
    fits = {f.method: f for f in fit(budget, need.model, candidates, batch=need.batch, seq=need.seq, **settings)}
    limit = parse_size(need.budget) if need.budget else None

    picks: list[Pick] = []
    for m in candidates:
        f = fits[m]
        if f.error:
            picks.append(Pick(m, None, "none", None, False, None, None, f"does not apply: {f.error}"))
            continue
        est = f.estimate
        assert est is not None
        cls = peftlab.method_class(m)
        parts: list[str] = []
        ms = measured.get(m)
        expected: float | None
        if ms and ms["informative"]:
            expected = ms["relative"]
            seeds = f"{ms['seeds']} seed{'s' if ms['seeds'] != 1 else ''}"
            evidence = f"measured ({seeds}, {ms['budget']})"
            parts.append(f"{expected:.3f}x {REFERENCE}, measured at {ms['budget']} ({seeds})")
            if ms["beats_baseline"] is False:
                parts.append(f"it does not beat the {ms['baseline']} baseline there")
            if ms["others"]:
                parts.append("other budgets, not pooled: " + ", ".join(ms["others"]))
        elif cls.typical_score is not None:
            expected, evidence = cls.typical_score, "published"
            parts.append(f"~{expected:.2f}x full fine-tuning in its paper ({cls.typical_score_source})")
        else:
            expected, evidence = None, "none"
            parts.append("no measured or published score: run `peftlab bench` to measure it")
        if ms and not ms["informative"]:
            parts.append(f"measured at {ms['budget']}, but {REFERENCE} did not beat the {ms['baseline']} baseline "
                         "there, so that run says nothing about relative scores")
        trainable = est.params.get("trainable")
        base = est.params.get("base") or est.params.get("total")
        percent = 100.0 * trainable / base if trainable is not None and base else None
        if percent is not None:
            parts.append(f"{percent:.3g}% of parameters train")
        peak = _measured_memory(ms, need, settings)
        memory, source = (peak, "measured") if peak is not None else (est.total, "estimate")
        fit_ok = limit is None or memory <= limit
        where = (f"measured peak {_gb(peak)} (estimate {_gb(est.total)})" if peak is not None
                 else f"needs {_gb(est.total)} (estimate)")
        fixes: tuple[Fix, ...] = ()
        if limit is not None:
            parts.append(f"{where} at batch {need.batch} x {need.seq} "
                         + ("(fits" if fit_ok else "(does not fit") + f" {need.budget})")
            if not fit_ok:
                fixes = _fixes(need, m, f, limit, settings)
                parts.append(("fits with " + "; or ".join(f"{x.change} ({_gb(x.memory_bytes)})" for x in fixes))
                             if fixes else "no single change tried makes it fit")
        else:
            parts.append(f"{where} at batch {need.batch} x {need.seq}")
        penalty = 0.0
        if need.latency_critical:
            if cls.mergeable:
                parts.append("merges into the base: no extra latency")
            else:
                own, ref = (ms or {}).get("latency"), (ms or {}).get("reference_latency")
                from peftlab.lab.report import above_noise

                if own and ref and above_noise(own, ref):
                    extra = own["median"] / ref["median"] - 1.0
                    penalty += max(extra, 0.0) / LATENCY_POINT * 0.01
                    parts.append(f"cannot merge: {100 * extra:+.0f}% latency at batch 1 measured "
                                 f"({own['median']:.1f} vs {ref['median']:.1f} ms, beyond the noise)")
                elif own and ref:
                    parts.append("cannot merge; its measured latency is within the noise of the base model's "
                                 f"({own['median']:.1f} vs {ref['median']:.1f} ms at batch 1)")
                else:
                    penalty += UNMEASURED_LATENCY_COST
                    parts.append("cannot merge: adds inference compute (not measured)")
        if need.tasks > 1:
            if cls.trains_base_weights:
                penalty += COPY_COST * (need.tasks - 1)
                copies = need.tasks * est.weights
                parts.append(f"{need.tasks} tasks need {need.tasks} full copies ({_gb(copies)} of weights)")
                if limit is not None and copies > limit:
                    fit_ok, fixes = False, ()
            else:
                parts.append(f"{need.tasks} tasks share one base, one small adapter each")
        utility = None if expected is None else expected - penalty
        picks.append(Pick(m, expected, evidence, utility, fit_ok if limit is not None else None, memory,
                          percent, "; ".join(parts), source, fixes, trainable))

    def key(p: Pick) -> tuple:
        applies = p.reason.startswith("does not apply")
        tier = 0 if p.fits is not False else (1 + min(x.cost for x in p.fixes) if p.fixes else 9)
        if need.objective == "params":
            return (applies, tier, p.trainable_percent if p.trainable_percent is not None else float("inf"),
                    -(p.utility or 0.0))
        return (applies, tier, p.utility is None, -(p.utility or 0.0), p.trainable_percent or 0.0)

    return sorted(picks, key=key)


def table(picks: list[Pick]) -> str:
    """Ranked picks as a terminal table followed by the one-line reasons."""
    lines = [f"{'#':>2}  {'method':<16} {'expected':>9} {'evidence':<18} {'trainable %':>11} {'memory':>10} "
             f"{'fits':>5}"]
    for i, p in enumerate(picks, 1):
        exp = "-" if p.expected is None else f"{p.expected:.3f}"
        fits = "-" if p.fits is None else ("yes" if p.fits else ("fix" if p.fixes else "no"))
        pct = "-" if p.trainable_percent is None else f"{p.trainable_percent:.3g}"
        mem = _gb(p.memory_bytes) + ("*" if p.memory_source == "measured" else "")
        lines.append(f"{i:>2}  {p.method:<16} {exp:>9} {p.evidence.split(' (')[0]:<18} {pct:>11} {mem:>10} {fits:>5}")
    lines.append("(memory: estimate; * measured by a bench; fits 'fix': fits after a change listed below)")
    lines.append("")
    lines += [f"{i:>2}. {p.method}: {p.evidence}; {p.reason}" for i, p in enumerate(picks, 1)]
    return "\n".join(lines)


def to_json(picks: list[Pick]) -> str:
    import dataclasses

    return json.dumps([dataclasses.asdict(p) for p in picks], indent=2)


__all__ = ["COPY_COST", "Fix", "Need", "Pick", "budget_key", "recommend", "suggestions", "table", "to_json"]
