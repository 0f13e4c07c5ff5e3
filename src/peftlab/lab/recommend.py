"""``peftlab recommend``: rank methods for a model, a memory budget and how it will be served.

Evidence, strongest first:

1. **Measured**: rows of a ``peftlab bench`` run on the same model (``results.jsonl``): task
   score relative to full fine-tuning, unmerged inference latency, checkpoint size.
2. **Published**: the score relative to full fine-tuning that the method's paper reports
   (``Method.typical_score`` and its source), where nothing was measured.
3. **Memory**: the estimator (:func:`peftlab.estimate.fit`) at the requested batch and sequence:
   a method that does not fit the budget is ranked after every method that does.

The ranking key is explicit, so a user can check it: first "fits the budget", then the expected
relative score minus the serving penalties below, then fewer trainable parameters.

* Latency-critical serving: a mergeable method costs nothing once merged; a method that cannot
  merge pays its measured extra latency over the base (or :data:`UNMEASURED_LATENCY_COST` when not
  measured), one score point per 10% slower.
* Several tasks: full fine-tuning keeps one full model per task (N copies of the weights in
  memory or swapped from disk); a PEFT method keeps one base and N small adapters. Full
  fine-tuning pays :data:`COPY_COST` per extra task, and when a budget is given and N copies of
  the weights do not fit it, it counts as not fitting for serving.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FULL = "full"
LATENCY_POINT = 0.10
"""Fractional extra latency that costs one point (0.01) of relative score when latency-critical."""
UNMEASURED_LATENCY_COST = 0.02
"""Score cost of a non-mergeable method when latency matters and no latency was measured."""
COPY_COST = 0.01
"""Score cost of each extra full model copy when serving several tasks."""


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
    """Candidates (default: full fine-tuning and every registered method)."""
    settings: tuple[tuple[str, Any], ...] = ()
    """Extra estimator settings (dtype, optimizer, checkpointing, ...)."""


@dataclass(frozen=True)
class Pick:
    """One ranked method with the evidence behind it."""

    method: str
    expected: float | None
    """Expected task score relative to full fine-tuning."""
    evidence: str
    """'measured (n seeds)', 'published' or 'none'."""
    utility: float | None
    """``expected`` minus serving penalties: the ranking value."""
    fits: bool | None
    """Fits the budget at the requested batch and sequence (None: no budget or not estimated)."""
    memory_bytes: int | None
    trainable_percent: float | None
    reason: str


def _result_rows(paths: Iterable[Path], model: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        file = path / "results.jsonl" if path.is_dir() else path
        if not file.is_file():
            from peftlab.core.errors import ConfigError

            raise ConfigError(f"no bench results at {file}; pass a results.jsonl or a `peftlab bench` run directory")
        for line in file.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # an interrupted write: the bench itself ignores it too
                if "error" not in row and row.get("impl", "peftlab") == "peftlab" and row.get("model") == model:
                    rows.append(row)
    return rows


def _measured(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean relative score (to full fine-tuning of the same task), latency, size."""
    from peftlab.lab.report import aggregate

    out: dict[str, dict[str, Any]] = {}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(str(r.get("task")), []).append(r)
    per_method: dict[str, list[dict[str, Any]]] = {}
    for task_rows in by_task.values():
        for a in aggregate(task_rows):
            if a["relative"] is not None:
                per_method.setdefault(a["method"], []).append(a)
    for method, aggs in per_method.items():
        def mean(key: str) -> float | None:
            xs = [x for a in aggs for x in a["values"].get(key, [])]
            return statistics.fmean(xs) if xs else None

        out[method] = {"relative": statistics.fmean(a["relative"] for a in aggs),
                       "seeds": sum(len(a["seeds"]) for a in aggs), "percent": statistics.fmean(a["percent"] for a in aggs),
                       "latency_unmerged": mean("latency_ms_b1_unmerged"), "latency_full": None}
    full_latency = [x for a in per_method.get(FULL, []) for x in a["values"].get("latency_ms_b1", [])]
    for m in out.values():
        m["latency_full"] = statistics.fmean(full_latency) if full_latency else None
    return out


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def recommend(need: Need) -> list[Pick]:
    """Rank the candidate methods for ``need``; best first."""
    import peftlab
    from peftlab.core.errors import ConfigError

    if need.tasks < 1 or need.batch < 1 or need.seq < 1:
        raise ConfigError("tasks, batch and seq must be positive integers")
    candidates = list(need.methods) if need.methods else [FULL, *peftlab.methods()]
    for m in candidates:
        if m != FULL:
            peftlab.method_class(m)  # unknown names: an error listing the known ones
    measured = _measured(_result_rows(need.results, need.model)) if need.results else {}

    from peftlab.estimate import fit, parse_size

    budget = need.budget or "1000TB"  # no budget: estimate the memory, enforce nothing
    fits = {f.method: f for f in fit(budget, need.model, candidates, batch=need.batch, seq=need.seq,
                                     **dict(need.settings))}
    limit = parse_size(need.budget) if need.budget else None

    picks: list[Pick] = []
    for m in candidates:
        f = fits[m]
        if f.error:
            picks.append(Pick(m, None, "none", None, False, None, None, f"does not apply: {f.error}"))
            continue
        est = f.estimate
        assert est is not None
        parts: list[str] = []
        cls = None if m == FULL else peftlab.method_class(m)
        mergeable = True if cls is None else cls.mergeable
        if m in measured:
            expected: float | None = measured[m]["relative"]
            evidence = f"measured ({measured[m]['seeds']} seed{'s' if measured[m]['seeds'] != 1 else ''})"
            parts.append(f"{expected:.3f}x full fine-tuning, measured")
        elif m == FULL:
            expected, evidence = 1.0, "reference"
            parts.append("the reference score")
        elif cls is not None and cls.typical_score is not None:
            expected, evidence = cls.typical_score, "published"
            parts.append(f"~{expected:.2f}x full fine-tuning in its paper ({cls.typical_score_source})")
        else:
            expected, evidence = None, "none"
            parts.append("no measured or published score: run `peftlab bench` to measure it")
        trainable = est.params.get("trainable")
        base = est.params.get("base") or est.params.get("total")
        percent = 100.0 * trainable / base if trainable is not None and base else None
        if percent is not None:
            parts.append(f"{percent:.3g}% of parameters train")
        fit_ok = limit is None or f.fits
        if limit is not None:
            parts.append(f"needs {_gb(est.total)} at batch {need.batch} x {need.seq} "
                         + ("(fits" if f.fits else "(does not fit") + f" {need.budget}; largest batch {f.max_batch})")
        else:
            parts.append(f"needs {_gb(est.total)} at batch {need.batch} x {need.seq}")
        penalty = 0.0
        if need.latency_critical and m != FULL:
            if mergeable:
                parts.append("merges into the base: no extra latency")
            else:
                ms = measured.get(m, {})
                if ms.get("latency_unmerged") and ms.get("latency_full"):
                    extra = ms["latency_unmerged"] / ms["latency_full"] - 1.0
                    penalty += max(extra, 0.0) / LATENCY_POINT * 0.01
                    parts.append(f"cannot merge: {100 * extra:+.0f}% latency measured")
                else:
                    penalty += UNMEASURED_LATENCY_COST
                    parts.append("cannot merge: adds inference compute (not measured)")
        if need.tasks > 1:
            if m == FULL:
                penalty += COPY_COST * (need.tasks - 1)
                copies = need.tasks * est.weights
                parts.append(f"{need.tasks} tasks need {need.tasks} full copies ({_gb(copies)} of weights)")
                if limit is not None and copies > limit:
                    fit_ok = False
            else:
                parts.append(f"{need.tasks} tasks share one base, one small adapter each")
        utility = None if expected is None else expected - penalty
        picks.append(Pick(m, expected, evidence, utility, fit_ok if limit is not None else None, est.total,
                          percent, "; ".join(parts)))

    def key(p: Pick) -> tuple:
        applies = p.reason.startswith("does not apply")
        return (applies, p.fits is False, p.utility is None, -(p.utility or 0.0), p.trainable_percent or 0.0)

    return sorted(picks, key=key)


def table(picks: list[Pick]) -> str:
    """Ranked picks as a terminal table followed by the one-line reasons."""
    lines = [f"{'#':>2}  {'method':<16} {'expected':>9} {'evidence':<18} {'memory':>10} {'fits':>5}"]
    for i, p in enumerate(picks, 1):
        exp = "-" if p.expected is None else f"{p.expected:.3f}"
        fits = "-" if p.fits is None else ("yes" if p.fits else "no")
        lines.append(f"{i:>2}  {p.method:<16} {exp:>9} {p.evidence:<18} {_gb(p.memory_bytes):>10} {fits:>5}")
    lines.append("")
    lines += [f"{i:>2}. {p.method}: {p.reason}" for i, p in enumerate(picks, 1)]
    return "\n".join(lines)
