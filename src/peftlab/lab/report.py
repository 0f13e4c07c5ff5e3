"""Bench report: terminal table, report.md, a self-contained report.html, PNG plots, guidance.

The report states evidence, not rankings (``DESIGN.md``, "The lab reports evidence"):

* **Data and baselines.** The label counts of the examples used (train, validation, the scored
  test sample), the majority-class baseline (always predict the training split's most frequent
  label) and the chance baseline (guess uniformly at random), each with accuracy and macro-F1,
  and the training budget as a fraction of one epoch.
* **Spread.** A method's score carries an interval: with several seeds the 95% t-interval of the
  mean over seeds; with one seed a seeded paired bootstrap over the test examples (the bench
  stores every test prediction in its row). Two results are *distinguishable* when the
  interval of their difference excludes 0; a method *beats the baseline* when the interval of
  (method - baseline) lies above 0. The guidance names a best method only when it is
  distinguishable from every other method and above the baseline; it warns loudly for each method
  that does not beat the majority class.
* **Timings** come from the bench's interleaved timing rounds (``timings.jsonl``): every method
  is timed once per round, the rounds rotate the order, and the report shows medians with their
  interquartile range (IQR), CPU time beside wall time, and the machine's load, with a warning
  when it changed during the run. Memory is in MiB (2**20 bytes), as measured.

Scores relative to :data:`REFERENCE` (the registered method ``"full"``) are relative to that
method's rows like any other comparison; no method has a code path of its own here.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
"""Memory columns are MiB: resident-set and checkpoint sizes in bytes / 2**20."""
REFERENCE = "full"
"""The registered method whose score is the 1.0 of the ``vs full`` column (full fine-tuning)."""
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
"""The bootstrap is seeded, so a report rewritten from the same rows says the same thing."""
LOAD_CHANGE_PER_CPU = 0.5
"""A change of the 1-minute load average above ``max(1, this x CPUs)`` is material: on a 2-core
machine one more busy process changes what a second of wall time buys."""
MEMORY_TIE = 0.05
"""Peak resident memory is measured once per run; closer than this fraction is not a difference."""
SECONDARY = {"accuracy": "macro_f1", "rouge_l": "perplexity"}
"""The secondary metric shown beside a task's primary one."""

# t quantiles (two-sided 95%) by degrees of freedom, for the interval of a mean over few seeds.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: float) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (table, rounded down in df,
    so the interval is never narrower than the exact one); 1.96 beyond 30."""
    if df >= 31:
        return 1.96
    return _T95[max(k for k in _T95 if k <= max(1.0, df))]


# ----------------------------------------------------------------------------- baselines
def baselines(data: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The baselines of a bench's data facts (``row["data"]``) on its scored test sample; empty
    when the task is not a classification.

    * majority: always predict the *training* examples' most frequent label (what a model that
      learned only the label prior answers): its exact accuracy and macro-F1 over every class;
    * chance: guess uniformly at random: expected accuracy ``1 / k`` and expected macro-F1
      (:func:`peftlab.lab.metrics.chance_baseline`).
    """
    from peftlab.lab import metrics

    if data and data.get("base_model"):  # generated text: the untrained base model's own answers
        b = data["base_model"]
        return {"base": {"name": "base model (no training)", "score": b["metrics"].get(b["metric"]),
                         "secondary": b["metrics"].get(b["secondary_metric"])}}
    if not data or data.get("kind") != "classification" or not data.get("test_labels"):
        return {}
    labels, counts, test = data["labels"], data["counts"], data["test_labels"]
    train = [c for c, n in enumerate(counts["train"]) for _ in range(n)]
    majority = metrics.majority_baseline(test, train_labels=train, num_classes=len(labels))
    chance = metrics.chance_baseline(len(labels), test)
    return {"majority": {"class": majority.predicted_class, "accuracy": majority.accuracy,
                         "macro_f1": majority.macro_f1, "score": majority.accuracy, "secondary": majority.macro_f1,
                         "name": f"majority class ({labels[majority.predicted_class]!r})"},
            "chance": {"accuracy": chance.accuracy, "macro_f1": chance.macro_f1, "score": chance.accuracy,
                       "secondary": chance.macro_f1, "name": "chance (uniform guess)"}}


def main_baseline(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The baseline a method must beat: the majority class (classification) or the untrained base
    model (generated text, where the bench scored it)."""
    found = baselines(data)
    return found.get("majority") or found.get("base")


# ----------------------------------------------------------------------------- spread
def spread(values: Sequence[float]) -> dict[str, float] | None:
    """Median and interquartile range (inclusive quartiles) of ``values``."""
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return None
    if len(vals) == 1:
        return {"median": vals[0], "q1": vals[0], "q3": vals[0], "n": 1}
    q1, med, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "n": len(vals)}


def above_noise(a: dict[str, float] | None, b: dict[str, float] | None) -> bool:
    """Whether two timing spreads differ by more than their noise: the IQRs do not overlap."""
    if not a or not b:
        return False
    return a["q1"] > b["q3"] or b["q1"] > a["q3"]


@dataclass
class Evidence:
    """How far a bench's scores can be trusted: seeds' spread, a bootstrap, or nothing."""

    kind: str
    """``"seeds"`` (several seeds: t-intervals of means), ``"bootstrap"`` (one seed, paired
    bootstrap over the test examples) or ``"none"``."""
    samples: dict[str, Any]
    """Per label: the seeds' scores, or the bootstrap's resampled scores (numpy array)."""
    baseline: Any = None
    """Bootstrap: the majority baseline's resampled accuracy."""

    def interval(self, label: str) -> tuple[float, float] | None:
        s = self.samples.get(label)
        if s is None:
            return None
        if self.kind == "seeds":
            if len(s) < 2:
                return None
            half = t95(len(s) - 1) * statistics.stdev(s) / math.sqrt(len(s))
            return statistics.fmean(s) - half, statistics.fmean(s) + half
        return _percentiles(s)

    def versus_baseline(self, label: str, value: float) -> tuple[float, float] | None:
        """Interval of (score - baseline): seeds against the constant ``value``; bootstrap paired."""
        s = self.samples.get(label)
        if s is None:
            return None
        if self.kind == "seeds":
            iv = self.interval(label)
            return None if iv is None else (iv[0] - value, iv[1] - value)
        return _percentiles(s - self.baseline) if self.baseline is not None else None

    def difference(self, a: str, b: str) -> tuple[float, float] | None:
        """Interval of score(a) - score(b): Welch's t-interval over seeds, or the paired bootstrap."""
        x, y = self.samples.get(a), self.samples.get(b)
        if x is None or y is None:
            return None
        if self.kind == "seeds":
            if len(x) < 2 or len(y) < 2:
                return None
            vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
            d = statistics.fmean(x) - statistics.fmean(y)
            if vx + vy == 0:
                return d, d
            df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
            half = t95(df) * math.sqrt(vx + vy)
            return d - half, d + half
        return _percentiles(x - y)

    def beats(self, label: str, value: float) -> bool | None:
        iv = self.versus_baseline(label, value)
        return None if iv is None else iv[0] > 0

    def distinguishable(self, a: str, b: str) -> bool | None:
        iv = self.difference(a, b)
        return None if iv is None else (iv[0] > 0 or iv[1] < 0)


def _percentiles(samples: Any) -> tuple[float, float]:
    import numpy as np

    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def evidence(agg: list[dict[str, Any]], data: dict[str, Any] | None) -> Evidence:
    """The spread behind the scores: seeds where every entry has several, else a paired bootstrap
    of accuracy over the test examples (the same resampled indices for every method and the
    majority baseline), else none."""
    import numpy as np

    if agg and all(len(a["values"]["score"]) >= 2 for a in agg):
        return Evidence("seeds", {a["label"]: list(a["values"]["score"]) for a in agg})
    labels = (data or {}).get("test_labels")
    usable = [a for a in agg if a.get("predictions") and labels and len(a["predictions"]) == len(labels)
              and a.get("metric") == "accuracy"]
    if not labels or not usable:
        return Evidence("none", {})
    refs = np.asarray(labels)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(refs), size=(BOOTSTRAP_SAMPLES, len(refs)))
    samples = {a["label"]: (np.asarray(a["predictions"]) == refs)[idx].mean(axis=1) for a in usable}
    base = baselines(data).get("majority")
    majority = (refs == base["class"])[idx].mean(axis=1) if base else None
    return Evidence("bootstrap", samples, majority)


# ----------------------------------------------------------------------------- aggregation
def _timing_rows(timings: list[dict[str, Any]] | None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in timings or []:
        if "error" not in t:
            groups[(t["method"], t["impl"])].append(t)
    return groups


LATENCY_KEYS = ("b1_unmerged", "b1_merged", "b8_unmerged", "b8_merged")


def aggregate(rows: list[dict[str, Any]], timings: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per (method, implementation): values over seeds, score relative to
    :data:`REFERENCE`'s rows, the test predictions of its first seed, and the timing spreads
    pooled over every timing round."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[(r["method"], r["impl"])].append(r)
    reference = [r["score"] for r in groups.get((REFERENCE, "peftlab"), [])]
    ref_score = statistics.fmean(reference) if reference else None
    timed = _timing_rows(timings)
    out = []
    for (method, impl), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        keys = ("trainable", "percent", "score", "secondary", "peak_train_rss", "peak_train_gpu",
                "checkpoint_bytes", "wall_seconds", "train_seconds", "train_cpu_seconds", "tokens_per_step",
                "train_seconds_per_step")
        values = {k: [float(_value(r, k)) for r in rs if _value(r, k) is not None] for k in keys}
        score = statistics.fmean(values["score"])
        ts = timed.get((method, impl), [])
        timing = {"step_wall": spread([x for t in ts for x in t.get("step_wall", [])]),
                  "step_cpu": spread([x for t in ts for x in t.get("step_cpu", [])]),
                  "rounds": len(ts), "wall_seconds": sum(t.get("wall_seconds", 0.0) for t in ts),
                  "peak_infer_rss": max((t["peak_infer_rss"] for t in ts if t.get("peak_infer_rss")), default=None)}
        for key in LATENCY_KEYS:
            timing[f"latency_{key}"] = spread([1000 * x for t in ts for x in t.get("latency", {}).get(key, {})
                                               .get("wall", [])])
            timing[f"latency_{key}_cpu"] = spread([1000 * x for t in ts for x in t.get("latency", {}).get(key, {})
                                                   .get("cpu", [])])
        tokens = statistics.fmean(values["tokens_per_step"]) if values["tokens_per_step"] else None
        step = timing["step_wall"]
        out.append({
            "method": method, "impl": impl, "label": method if impl == "peftlab" else f"{method} (peft)",
            "seeds": [r["seed"] for r in rs], "values": values, "timing": timing,
            "trainable": statistics.fmean(values["trainable"]), "percent": statistics.fmean(values["percent"]),
            "checkpoint_bytes": statistics.fmean(values["checkpoint_bytes"]) if values["checkpoint_bytes"] else 0.0,
            "score": score, "relative": score / ref_score if ref_score else None,
            "secondary": statistics.fmean(values["secondary"]) if values["secondary"] else None,
            "metric": rs[0].get("metric"), "secondary_metric": rs[0].get("secondary_metric"),
            "history": rs[0].get("history", []), "evals": rs[0].get("evals", []),
            "overfitting": any(r.get("overfitting") for r in rs),
            "predictions": rs[0].get("test_predictions"),
            "tokens_per_second": tokens / step["median"] if tokens and step and step["median"] else None,
            "wall_seconds": sum(values["wall_seconds"]) + timing["wall_seconds"],
        })
    return sorted(out, key=lambda a: (a["method"] != REFERENCE, a["method"], a["impl"] != "peftlab"))


def _value(row: dict[str, Any], key: str) -> Any:
    if key == "secondary":
        name = row.get("secondary_metric") or SECONDARY.get(row.get("metric", ""), "")
        return (row.get("test_metrics") or {}).get(name)
    return row.get(key)


def data_facts(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The data facts of the bench (``row["data"]``, the same in every row of one bench)."""
    return next((r["data"] for r in rows if r.get("data")), None)


def peer_ratios(agg: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """peftlab / peft for every method measured both ways (medians; lower is better except score)."""
    by = {(a["method"], a["impl"]): a for a in agg}
    out = []
    for (method, impl), a in by.items():
        peer = by.get((method, "peft"))
        if impl != "peftlab" or peer is None:
            continue

        def ratio(key: str) -> float | None:
            x, y = a["timing"].get(key), peer["timing"].get(key)
            return x["median"] / y["median"] if x and y and y["median"] else None

        def mean_ratio(key: str) -> float | None:
            x, y = a["values"].get(key), peer["values"].get(key)
            return statistics.fmean(x) / statistics.fmean(y) if x and y and statistics.fmean(y) else None

        out.append({"method": method, "step_time": ratio("step_wall"), "peak_memory": mean_ratio("peak_train_rss"),
                    "score": mean_ratio("score"), "latency_b1_unmerged": ratio("latency_b1_unmerged"),
                    "latency_b1_merged": ratio("latency_b1_merged"),
                    "latency_b8_unmerged": ratio("latency_b8_unmerged")})
    return out


# ----------------------------------------------------------------------------- machine load
def load_summary(rows: list[dict[str, Any]], timings: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The 1-minute load averages recorded at the start and end of every measurement, and which
    measurements saw it change materially (:data:`LOAD_CHANGE_PER_CPU`).

    The first measurement's start is left out of the range: the bench's own threads raise the
    load once it begins, and that rise is not a change of the machine.
    """
    jobs = [(f"{r['method']} ({r['impl']}, seed {r['seed']}) training", r["load"]) for r in rows if r.get("load")]
    jobs += [(f"{t['method']} ({t['impl']}) timing round {t['round'] + 1}", t["load"])
             for t in timings or [] if t.get("load")]
    if not jobs:
        return None
    cpus = next((r.get("env", {}).get("cpus") for r in rows if r.get("env")), None) or 1
    limit = max(1.0, LOAD_CHANGE_PER_CPU * cpus)
    seen = [x for i, (_, (start, end)) in enumerate(jobs) for x in ((end,) if i == 0 else (start, end))]
    changed = [(name, start, end) for i, (name, (start, end)) in enumerate(jobs) if i > 0 and abs(end - start) > limit]
    return {"min": min(seen), "max": max(seen), "limit": limit, "cpus": cpus, "changed": changed,
            "material": max(seen) - min(seen) > limit or bool(changed)}


# ----------------------------------------------------------------------------- guidance
def _fmt_iv(iv: tuple[float, float] | None) -> str:
    return "" if iv is None else f"[{iv[0]:+.4f}, {iv[1]:+.4f}]"


def _names(labels: list[str]) -> str:
    return ", ".join(f"**{x}**" for x in labels)


def warnings_for(agg: list[dict[str, Any]], data: dict[str, Any] | None, ev: Evidence | None = None) -> list[str]:
    """One loud line per method that does not beat the majority-class (or base-model) baseline."""
    base = main_baseline(data)
    if not base:
        return []
    ev = ev or evidence(agg, data)
    out = []
    for a in agg:
        beats = ev.beats(a["label"], base["score"])
        if beats is True:
            continue
        verdict = "does not beat"
        if a["score"] <= base["score"]:
            how = f"{a['metric']} {a['score']:.4f} vs {base['score']:.4f}"
        else:
            verdict = "is not distinguishably above"
            iv = ev.versus_baseline(a["label"], base["score"])
            how = (f"{a['metric']} {a['score']:.4f} vs {base['score']:.4f}, "
                   + (f"{CONFIDENCE:.0%} interval of the difference {_fmt_iv(iv)} includes 0" if iv else
                      "no spread measured to tell them apart"))
        secondary = f"; {a['secondary_metric']} {a['secondary']:.4f} vs {base['secondary']:.4f}" \
            if a.get("secondary") is not None and base.get("secondary") is not None else ""
        out.append(f"WARNING: **{a['label']}** {verdict} the {base['name']} baseline ({how}{secondary}).")
    return out


def guidance(agg: list[dict[str, Any]], data: dict[str, Any] | None = None,
             load: dict[str, Any] | None = None) -> list[str]:
    """Plain-language conclusions the measurements support, and no more.

    A best method is named only when its score is above the majority baseline and
    distinguishable from every other method's; otherwise the tied methods are listed.
    """
    ours = [a for a in agg if a["impl"] == "peftlab"]
    if not ours:
        return []
    ev = evidence(agg, data)
    lines: list[str] = []
    fraction = (data or {}).get("epoch_fraction")
    if fraction is not None and fraction < 1:
        lines.append(f"The budget is {fraction:.0%}" if fraction >= 0.01 else f"The budget is {fraction:.2%}")
        lines[-1] += (f" of one epoch ({data['examples_seen']:,} of "
                     f"{data['used']['train']:,} training examples seen once): scores at this budget say little "
                     "about what the methods reach with more training (raise `--steps`).")
    lines += warnings_for(ours, data, ev)
    base = main_baseline(data)
    if ev.kind == "none":
        lines.append("No spread was measured (one seed, no per-example test predictions), so no method is named "
                     "best: run several seeds (`--seeds 0 1 2`).")
        contenders = []
    else:
        how = (f"{CONFIDENCE:.0%} t-interval over {len(ours[0]['seeds'])} seeds" if ev.kind == "seeds" else
               f"{CONFIDENCE:.0%} paired bootstrap over {len((data or {}).get('test_labels') or [])} test examples")
        contenders = [a for a in ours if base is None or ev.beats(a["label"], base["score"])]
        if base is not None and not contenders:
            lines.append(f"No method beats the {base['name']} baseline, so these results name no best method "
                         "and no relative score means anything (full fine-tuning included): train longer or on "
                         "more data.")
        elif contenders:
            top = max(contenders, key=lambda a: a["score"])
            tied = [a for a in contenders if a is not top and ev.distinguishable(top["label"], a["label"]) is not True]
            if not tied:
                lines.append(f"Best score: **{top['label']}** ({top['metric']} {top['score']:.4f}), distinguishable "
                             f"from every other method ({how}).")
            else:
                group = [top, *tied]
                cheap = min(group, key=lambda a: a["trainable"])
                lines.append(f"No single best method: {_names([a['label'] for a in group])} are not distinguishable "
                             f"({how}). Of these, **{cheap['label']}** trains the fewest parameters "
                             f"({cheap['percent']:.3f}% of base).")
    ref = next((a for a in ours if a["method"] == REFERENCE), None)
    if ref is not None and ref in contenders:
        same = [a["label"] for a in ours if a is not ref and ev.distinguishable(a["label"], ref["label"]) is False]
        below = [a["label"] for a in ours if a is not ref and ev.distinguishable(a["label"], ref["label"])
                 and a["score"] < ref["score"]]
        if same:
            lines.append(f"Not distinguishable from {REFERENCE}: {_names(same)}.")
        if below:
            lines.append(f"Distinguishably below {REFERENCE}: {_names(below)}.")
    lines += _memory_lines(ours)
    lines += _latency_lines(ours, bool(load and load["material"]))
    over = [a["label"] for a in ours if a["overfitting"]]
    if over:
        lines.append("Overfitting flagged (training loss falling while validation loss rose) for: "
                     + ", ".join(over) + ".")
    if load and load["material"]:
        lines.append(load_warning(load))
    return lines


def _memory_lines(ours: list[dict[str, Any]]) -> list[str]:
    """The lowest peak training memory, named only when it is :data:`MEMORY_TIE` below the next."""
    mem = sorted((statistics.fmean(a["values"]["peak_train_rss"]), a["label"]) for a in ours
                 if a["values"].get("peak_train_rss"))
    if not mem:
        return []
    tied = [label for value, label in mem if value <= mem[0][0] * (1 + MEMORY_TIE)]
    if len(tied) == 1:
        return [f"Lowest peak training memory (process RSS): **{tied[0]}** ({mem[0][0] / MIB:,.0f} MiB, more than "
                f"{MEMORY_TIE:.0%} below the next)."]
    return [f"Lowest peak training memory (process RSS, {mem[0][0] / MIB:,.0f} MiB): {_names(tied)}, within "
            f"{MEMORY_TIE:.0%} of each other."]


def load_warning(load: dict[str, Any]) -> str:
    where = "; ".join(f"{n}: {s:.2f} -> {e:.2f}" for n, s, e in load["changed"][:4])
    return (f"WARNING: the machine's load changed during the run (1-minute average {load['min']:.2f} to "
            f"{load['max']:.2f} on {load['cpus']} CPUs, more than {load['limit']:.2f})"
            + (f", e.g. {where}" if where else "") + ". The interleaved timing rounds share this, but timings "
            "from a quiet machine are worth more; CPU time is less affected than wall time.")


def _latency_lines(ours: list[dict[str, Any]], loaded: bool = False) -> list[str]:
    """Merged versus unmerged latency, said only where the difference is above the noise and the
    machine's load held still (a job measures unmerged before its training steps and merged after,
    so a load change between the two is not the method's)."""
    lines = []
    slower = [a["label"] for a in ours if above_noise(a["timing"].get("latency_b1_unmerged"),
                                                      a["timing"].get("latency_b1_merged"))
              and a["timing"]["latency_b1_unmerged"]["median"] > a["timing"]["latency_b1_merged"]["median"]]
    merged = [a["label"] for a in ours if a["timing"].get("latency_b1_merged")]
    if merged:
        lines.append("Mergeable methods (" + ", ".join(merged) + ") serve at the base model's latency once merged"
                     + ("; the machine's load changed during the run, so no unmerged/merged difference is "
                        "claimed" if loaded else
                        f"; unmerged, {', '.join(slower)} measured slower than merged (batch 1, beyond the IQR)"
                        if slower else "; unmerged, no difference above the measured noise (IQR) at batch 1")
                     + ". Serving many tasks from one base favours small checkpoints and switching adapters unmerged.")
    return lines


# ----------------------------------------------------------------------------- tables
def _mean_pm(vals: Sequence[float], fmt: str, scale: float = 1.0) -> str:
    if not vals:
        return "-"
    mean = statistics.fmean(vals) / scale
    if len(vals) > 1:
        return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(vals) / scale)}"
    return fmt.format(mean)


def _iqr(s: dict[str, float] | None, fmt: str) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['q1'])}-{fmt.format(s['q3'])})"


def _latency(a: dict[str, Any], b: int) -> str:
    un, me = a["timing"].get(f"latency_b{b}_unmerged"), a["timing"].get(f"latency_b{b}_merged")
    if not un:
        return "-"
    return f"{_iqr(un, '{:.1f}')} / {_iqr(me, '{:.1f}')}" if me else _iqr(un, "{:.1f}")


def _score_cell(a: dict[str, Any], ev: Evidence) -> str:
    text = _mean_pm(a["values"]["score"], "{:.4f}")
    iv = ev.interval(a["label"])
    return f"{text} [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else text


def _beats_cell(a: dict[str, Any], ev: Evidence, base: dict[str, Any] | None) -> str:
    if not base:
        return "-"
    beats = ev.beats(a["label"], base["score"])
    return {True: "yes", False: "NO", None: "NO" if a["score"] <= base["score"] else "?"}[beats]


def columns(ev: Evidence, base: dict[str, Any] | None, short: bool = False
            ) -> list[tuple[str, str, Callable[[dict[str, Any]], str]]]:
    """(terminal header, report header, cell) per column."""
    return [
        ("method", "method", lambda a: a["label"]),
        ("trainable", "trainable params", lambda a: f"{a['trainable']:,.0f}"),
        ("% base", "% of base", lambda a: f"{a['percent']:.3f}"),
        ("score", "score (95% interval)", lambda a: _score_cell(a, ev) if not short else _mean_pm(a["values"]["score"], "{:.4f}")),
        ("2nd", "secondary metric", lambda a: _mean_pm(a["values"]["secondary"], "{:.4f}")),
        ("beats base.", "beats baseline", lambda a: _beats_cell(a, ev, base)),
        ("vs full", f"score / {REFERENCE}", lambda a: f"{a['relative']:.3f}" if a.get("relative") is not None else "-"),
        ("s/step", "s / step median (IQR)", lambda a: _iqr(a["timing"]["step_wall"], "{:.3f}")),
        ("cpu s/step", "CPU s / step median (IQR)", lambda a: _iqr(a["timing"]["step_cpu"], "{:.3f}")),
        ("tok/s", "tokens / s", lambda a: f"{a['tokens_per_second']:,.0f}" if a.get("tokens_per_second") else "-"),
        ("train MiB", "peak train memory (MiB)", lambda a: _mean_pm(a["values"]["peak_train_rss"], "{:,.0f}", MIB)),
        ("b1 ms", "latency b1 (ms) unmerged / merged", lambda a: _latency(a, 1)),
        ("b8 ms", "latency b8 (ms) unmerged / merged", lambda a: _latency(a, 8)),
        ("infer MiB", "peak inference memory (MiB)",
         lambda a: f"{a['timing']['peak_infer_rss'] / MIB:,.0f}" if a["timing"].get("peak_infer_rss") else "-"),
        ("ckpt MiB", "checkpoint (MiB)", lambda a: f"{a['checkpoint_bytes'] / MIB:,.2f}"),
        ("wall s", "wall time (s)", lambda a: f"{a['wall_seconds']:,.1f}"),
    ]


def _baseline_rows(data: dict[str, Any] | None, n_columns: int) -> list[list[str]]:
    """Table rows for the baselines: name, then the score and secondary cells, '-' elsewhere."""
    out = []
    for b in baselines(data).values():
        cells = ["-"] * n_columns
        cells[0] = b["name"]
        cells[3] = "-" if b.get("score") is None else f"{b['score']:.4f}"
        cells[4] = "-" if b.get("secondary") is None else f"{b['secondary']:.4f}"
        out.append(cells)
    return out


def terminal_table(rows: list[dict[str, Any]], timings: list[dict[str, Any]] | None = None) -> str:
    agg = aggregate(rows, timings)
    if not agg:
        return "(no finished methods yet)"
    data = data_facts(rows)
    cols = columns(evidence(agg, data), main_baseline(data), short=True)
    header = [c[0] for c in cols]
    body = [[fn(a) for _, _, fn in cols] for a in agg] + _baseline_rows(data, len(cols))
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    ratios = peer_ratios(agg)
    if ratios:
        lines.append("\npeftlab / peft (same run; < 1 is better for time, memory and latency):")
        for r in ratios:
            lines.append(f"  {r['method']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                          if k != "method" and v is not None))
    return "\n".join(lines)


def console_guidance(rows: list[dict[str, Any]], timings: list[dict[str, Any]] | None = None) -> list[str]:
    """The guidance as plain text lines (no markdown emphasis) for the terminal."""
    agg = aggregate(rows, timings)
    lines = guidance(agg, data_facts(rows), load_summary(rows, timings))
    return [line.replace("**", "").replace("`", "") for line in lines]


def _budget(row: dict[str, Any]) -> str:
    b = row.get("budget")
    if not b:
        return ""
    return (f" ({b['steps']} steps x batch {b['batch_size']}, {b['max_length']} tokens, "
            f"{b['test_examples'] or 'all'} test examples, {len(b['seeds'])} seed(s), "
            f"{b.get('timing_rounds', '?')} timing round(s))")


def _counts(data: dict[str, Any], split: str) -> str:
    counts = data["counts"].get(split) or []
    total = sum(counts)
    return ", ".join(f"{name} {n:,} ({n / total:.0%})" for name, n in zip(data["labels"], counts)) if total else "-"


def _data_section(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    out = ["## Data and baselines", ""]
    used, sizes = data["used"], data["sizes"]
    if data.get("kind") == "classification":
        out += ["| split | examples used (of split) | label counts |", "|---|---|---|"]
        for split in ("train", "validation", "test"):
            out.append(f"| {split} | {used[split]:,} ({sizes[split]:,}) | {_counts(data, split)} |")
        out.append("")
        for b in baselines(data).values():
            out.append(f"- {b['name']}: accuracy {b['accuracy']:.4f}, macro-F1 {b['macro_f1']:.4f}")
    else:
        out.append(f"- examples used: train {used['train']:,}, validation {used['validation']:,}, "
                   f"test {used['test']:,} (generated text: no class baselines)")
        for b in baselines(data).values():
            out.append(f"- {b['name']}: score {b['score']:.4f}"
                       + (f", secondary {b['secondary']:.4f}" if b.get("secondary") is not None else ""))
    if data.get("epoch_fraction") is not None:
        out.append(f"- budget: {data['examples_seen']:,} training examples seen = {data['epoch_fraction']:.1%} of "
                   f"one epoch over {used['train']:,} training examples")
    out.append("")
    return out


def method_notes(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """``{"method (seed s)": lines}``: what each method's ``describe`` said about its trained adapter
    (``peftlab.summary(...).notes``; AdaLoRA's final rank allocation), per run that has any."""
    return {f"{r['method']} (seed {r.get('seed', 0)})": list(r["notes"]) for r in rows
            if "error" not in r and r.get("notes")}


def _markdown(agg: list[dict[str, Any]], rows: list[dict[str, Any]], timings: list[dict[str, Any]] | None,
              skipped: dict[str, str]) -> str:
    first = next((r for r in rows if "error" not in r), rows[0] if rows else {})
    env = first.get("env", {})
    data = data_facts(rows)
    ev = evidence(agg, data)
    load = load_summary(rows, timings)
    total = sum(a["wall_seconds"] for a in agg)
    out = [f"# peftlab bench: {first.get('model', '?')} on {first.get('task', '?')}", "",
           f"Profile `{first.get('profile', '?')}`{_budget(first)}; trained on {first.get('device', env.get('device', '?'))}, "
           f"{env.get('cpus', '?')} CPUs, {env.get('threads', '?')} threads, torch {env.get('torch', '?')}. "
           f"Score is the test-split `{agg[0]['metric'] if agg else '?'}` (interval: "
           + {"seeds": f"{CONFIDENCE:.0%} t-interval of the mean over seeds",
              "bootstrap": f"{CONFIDENCE:.0%} bootstrap over the test examples ({BOOTSTRAP_SAMPLES} resamples, "
                           f"seed {BOOTSTRAP_SEED})",
              "none": "none measured"}[ev.kind]
           + f"); the secondary metric is `{agg[0].get('secondary_metric') or '-'}`. `score / {REFERENCE}` is "
           f"relative to the `{REFERENCE}` method's rows. Times are medians (IQR) of interleaved timing rounds; "
           f"memory in MiB (2^20 bytes). Total wall time {total:,.0f} s.", ""]
    loud = warnings_for([a for a in agg if a["impl"] == "peftlab"], data, ev)
    if load and load["material"]:
        loud.append(load_warning(load))
    if loud:
        out += [f"> **{line}**" if not line.startswith("WARNING") else f"> {line}" for line in loud] + [""]
    out += _data_section(data)
    if load:
        out += [f"Machine load (1-minute average) during the measurements: {load['min']:.2f} to {load['max']:.2f} "
                f"on {load['cpus']} CPUs.", ""]
    cols = columns(ev, main_baseline(data))
    out.append("## Results")
    out.append("")
    out.append("| " + " | ".join(c[1] for c in cols) + " |")
    out.append("|" + "---|" * len(cols))
    for a in agg:
        out.append("| " + " | ".join(fn(a) for _, _, fn in cols) + " |")
    for cells in _baseline_rows(data, len(cols)):
        out.append("| " + " | ".join(cells) + " |")
    ratios = peer_ratios(agg)
    if ratios:
        out += ["", "## peftlab / peft (same run)", "",
                "| method | step time | peak memory | score | latency b1 unmerged | latency b1 merged | latency b8 unmerged |",
                "|---|---|---|---|---|---|---|"]
        for r in ratios:
            out.append(f"| {r['method']} | " + " | ".join("-" if r[k] is None else f"{r[k]:.3f}" for k in
                       ("step_time", "peak_memory", "score", "latency_b1_unmerged", "latency_b1_merged",
                        "latency_b8_unmerged")) + " |")
    notes = method_notes(rows)
    if notes:
        out += ["", "## Method notes (trained adapters)", ""]
        for label, lines in notes.items():
            out += [f"- **{label}**: " + "; ".join(lines)]
    g = [line for line in guidance(agg, data, load) if not line.startswith("WARNING")]  # shown at the top
    if g:
        out += ["", "## Guidance", ""] + [f"- {line}" for line in g]
    errors = [r for r in rows if "error" in r]
    if skipped or errors:
        out += ["", "## Not measured", ""]
        out += [f"- {m}: does not apply ({why})" for m, why in skipped.items()]
        out += [f"- {r['method']} ({r['impl']}, seed {r['seed']}): failed: {r['error'].splitlines()[-1]}"
                for r in errors]
    out += ["", "## Plots", "", "![score vs trainable parameters](score_vs_params.png)",
            "![score vs peak memory](score_vs_memory.png)", "![inference latency](latency.png)",
            "![loss curves](loss_curves.png)", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots and HTML
def _plots(run_dir: Path, agg: list[dict[str, Any]], data: dict[str, Any] | None) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    colors = {a["label"]: f"C{i % 10}" for i, a in enumerate(agg)}
    base = baselines(data)

    def scatter(name: str, xkey: Callable[[dict[str, Any]], float], xlabel: str, logx: bool) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for a in agg:
            ax.scatter(xkey(a), a["score"], s=60, color=colors[a["label"]], label=a["label"])
            ax.annotate(a["label"], (xkey(a), a["score"]), textcoords="offset points", xytext=(6, 4), fontsize=9)
        for key, style in (("majority", "--"), ("chance", ":"), ("base", "--")):
            if key in base and base[key].get("score") is not None:
                ax.axhline(base[key]["score"], color="gray", linestyle=style, linewidth=1, label=base[key]["name"])
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {agg[0]['metric']}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        paths.append(run_dir / name)

    scatter("score_vs_params.png", lambda a: max(a["trainable"], 1), "trainable parameters (log)", True)
    mem = [a for a in agg if a["values"].get("peak_train_rss")]
    if mem:
        scatter("score_vs_memory.png", lambda a: statistics.fmean(a["values"]["peak_train_rss"]) / MIB
                if a["values"].get("peak_train_rss") else 0.0, "peak training memory (MiB)", False)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(agg) + 2), 4.2))
    width = 0.8 / len(LATENCY_KEYS)
    for j, key in enumerate(LATENCY_KEYS):
        meds, lo, hi = [], [], []
        for a in agg:
            s = a["timing"].get(f"latency_{key}")
            meds.append(s["median"] if s else 0.0)
            lo.append(s["median"] - s["q1"] if s else 0.0)
            hi.append(s["q3"] - s["median"] if s else 0.0)
        ax.bar([i + j * width for i in range(len(agg))], meds, width, yerr=[lo, hi], capsize=2,
               label=key.replace("_", " "))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(agg))], [a["label"] for a in agg], rotation=20)
    ax.set_ylabel("forward latency (ms, median and IQR)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "latency.png", dpi=110)
    plt.close(fig)
    paths.append(run_dir / "latency.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in agg:
        h = a["history"]
        if h:
            ax1.plot([x["step"] for x in h], [x["loss"] for x in h], color=colors[a["label"]], label=a["label"],
                     alpha=0.8)
        ev = [e for e in a["evals"] if "val_loss" in e]
        if ev:
            ax2.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", color=colors[a["label"]],
                     label=a["label"])
    ax1.set_title("training loss")
    ax2.set_title("validation loss")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=110)
    plt.close(fig)
    paths.append(run_dir / "loss_curves.png")
    return paths


def _html(markdown_text: str, run_dir: Path, agg: list[dict[str, Any]]) -> str:
    """A self-contained page: the tables as HTML, the plots inlined as base64 PNG."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>peftlab bench</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}",
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}",
             "blockquote{background:#fff3f3;border-left:4px solid #c00;margin:1em 0;padding:.5em 1em}",
             "img{max-width:100%;border:1px solid #eee;margin:8px 0}code{background:#f5f5f5}</style></head><body>"]
    in_table = in_list = False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                parts.append("<table>")
                parts.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
                in_table = True
                continue
            parts.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            parts.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            parts.append("</ul>")
            in_list = False
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            path = run_dir / name
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        elif line.startswith("## "):
            parts.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            parts.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("> "):
            parts.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
        elif line.startswith("- "):
            if not in_list:
                parts.append("<ul>")
                in_list = True
            parts.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            parts.append(f"<p>{_inline(line)}</p>")
    if in_table:
        parts.append("</table>")
    if in_list:
        parts.append("</ul>")
    parts.append("<script type='application/json' id='results'>"
                 + html.escape(json.dumps([{k: v for k, v in a.items() if k not in ('history', 'evals', 'predictions')}
                                           for a in agg])) + "</script></body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    out = html.escape(text)
    while out.count("**") >= 2:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    while out.count("`") >= 2:
        out = out.replace("`", "<code>", 1).replace("`", "</code>", 1)
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none when it does not exist); a line cut short by an interrupted
    write is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{i} is not valid JSON (an interrupted write?); ignoring it")
    return rows


def write(run_dir: Path, rows: list[dict[str, Any]], skipped: dict[str, str] | None = None,
          plots: bool = True, timings: list[dict[str, Any]] | None = None) -> None:
    """(Re)write report.md, and with ``plots`` report.html and the PNGs, from the rows so far.

    The bench refreshes report.md after every measurement (cheap) and draws the plots once at the
    end or on interruption (about 2 s each time).
    """
    run_dir = Path(run_dir)
    agg = aggregate(rows, timings)
    if not agg:
        return
    md = _markdown(agg, rows, timings, skipped or {})
    (run_dir / "report.md").write_text(md)
    if not plots:
        return
    _plots(run_dir, agg, data_facts(rows))
    (run_dir / "report.html").write_text(_html(md, run_dir, agg))
