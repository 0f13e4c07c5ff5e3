"""The bench report from hand-made rows: baselines against naive counts, intervals against their
formulas, and the guidance's rules (no winner among results the spread cannot tell apart, a loud
warning for every method that does not beat the majority class)."""

from __future__ import annotations

import math
import statistics

import pytest

from peftlab.lab import report


def facts(test_labels: list[int], train_counts: list[int], labels=("neg", "pos"), seen: int = 480) -> dict:
    return {"kind": "classification", "labels": list(labels), "test_labels": test_labels,
            "counts": {"train": train_counts, "validation": train_counts,
                       "test": [test_labels.count(c) for c in range(len(labels))]},
            "sizes": {"train": sum(train_counts), "validation": 10, "test": len(test_labels)},
            "used": {"train": sum(train_counts), "validation": 10, "test": len(test_labels)},
            "examples_seen": seen, "epoch_fraction": seen / sum(train_counts), "fingerprint": "x"}


def row(method: str, predictions: list[int], data: dict, seed: int = 0, trainable: int = 10, **extra) -> dict:
    refs = data["test_labels"]
    acc = sum(p == r for p, r in zip(predictions, refs)) / len(refs)
    return {"method": method, "impl": "peftlab", "seed": seed, "model": "m", "task": "t", "score": acc,
            "metric": "accuracy", "secondary_metric": "macro_f1", "test_metrics": {"accuracy": acc, "macro_f1": 0.5},
            "test_predictions": predictions, "trainable": trainable, "percent": 100.0 * trainable / 1000,
            "checkpoint_bytes": 100, "peak_train_rss": 300 * 2**20, "data": data, "history": [], "evals": [],
            "budget": {"steps": 30, "batch_size": 16, "max_length": 64, "test_examples": None, "seeds": [seed]},
            **extra}


# 200 test examples, 66% in class 1 (the shape: most rows in one class)
LABELS = [1] * 132 + [0] * 68
DATA = facts(LABELS, [1300, 2700])
MAJORITY = [1] * 200


def test_baselines_equal_naive_counts():
    base = report.baselines(DATA)
    assert base["majority"]["class"] == 1  # the training split's most frequent label
    p = 132 / 200
    assert base["majority"]["accuracy"] == pytest.approx(p, abs=1e-12)
    # macro-F1 over the classes present: class 1 has precision p, recall 1; class 0 scores 0
    assert base["majority"]["macro_f1"] == pytest.approx((2 * p / (1 + p) + 0.0) / 2, abs=1e-12)
    assert base["chance"]["accuracy"] == 0.5
    shares = [68 / 200, 132 / 200]
    assert base["chance"]["macro_f1"] == pytest.approx(sum(2 * s * 0.5 / (s + 0.5) for s in shares) / 2, abs=1e-12)
    # the majority is the training split's, not the test split's
    flipped = report.baselines(facts(LABELS, [2700, 1300]))["majority"]
    assert flipped["class"] == 0 and flipped["accuracy"] == pytest.approx(68 / 200)


def test_everything_at_the_majority_class_names_no_winner_and_warns_for_each():
    """The issue's run: every method, full included, predicts the majority class."""
    rows = [row(m, MAJORITY, DATA, trainable=t) for m, t in (("full", 1000), ("lora", 15), ("prompt_tuning", 2))]
    agg = report.aggregate(rows)
    lines = report.guidance(agg, DATA)
    text = "\n".join(lines)
    assert "Best score" not in text and "within 3%" not in text and "of full" not in text
    warnings = [x for x in lines if x.startswith("WARNING")]
    assert len(warnings) == 3 and all("does not beat the majority class ('pos')" in w for w in warnings)
    assert "No method beats the majority class ('pos') baseline" in text
    assert "12% of one epoch" in text  # 480 of 4000
    md = report._markdown(agg, rows, None, {})
    assert md.count("WARNING") >= 3 and "| train | 4,000 (4,000) | neg 1,300 (32%), pos 2,700 (68%) |" in md
    assert "majority class ('pos'): accuracy 0.6600" in md and "macro-F1 0.3976" in md


def test_bootstrap_interval_is_seeded_and_near_the_normal_approximation():
    better = [y if i % 10 else 1 - y for i, y in enumerate(LABELS)]  # 90% right
    rows = [row("full", better, DATA), row("lora", MAJORITY, DATA)]
    agg = report.aggregate(rows)
    ev = report.evidence(agg, DATA)
    assert ev.kind == "bootstrap"
    lo, hi = ev.interval("full")
    assert (lo, hi) == report.evidence(agg, DATA).interval("full")  # seeded: the same every time
    p, n = 0.9, 200
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.2)
    assert lo < p < hi
    assert ev.beats("full", 0.66) is True and ev.beats("lora", 0.66) is False
    assert ev.distinguishable("full", "lora") is True
    assert ev.distinguishable("lora", "lora") is False


def test_a_winner_is_named_only_when_distinguishable_from_every_other():
    good = [y if i % 10 else 1 - y for i, y in enumerate(LABELS)]  # 0.90
    almost = [y if i % 9 else 1 - y for i, y in enumerate(LABELS)]  # ~0.885: within the noise of good
    rows = [row("full", good, DATA, trainable=1000), row("lora", almost, DATA, trainable=15),
            row("bitfit", MAJORITY, DATA, trainable=5)]
    text = "\n".join(report.guidance(report.aggregate(rows), DATA))
    assert "Best score" not in text
    assert "No single best method: **full**, **lora** are not distinguishable" in text
    assert "**lora** trains the fewest parameters" in text  # bitfit is not a contender: at the baseline
    assert "WARNING: **bitfit** does not beat" in text
    rows = [row("full", good, DATA, trainable=1000), row("lora", MAJORITY, DATA, trainable=15)]
    text = "\n".join(report.guidance(report.aggregate(rows), DATA))
    assert "Best score: **full** (accuracy 0.9000)" in text


def test_seeds_use_the_t_interval_of_the_mean():
    data = facts(LABELS, [1300, 2700])
    scores = {"full": [0.80, 0.82, 0.84], "lora": [0.70, 0.90, 0.80]}
    rows = [{**row(m, MAJORITY, data, seed=i), "score": s, "test_predictions": None}
            for m, ss in scores.items() for i, s in enumerate(ss)]
    agg = report.aggregate(rows)
    ev = report.evidence(agg, data)
    assert ev.kind == "seeds"
    mean, sd = statistics.fmean(scores["full"]), statistics.stdev(scores["full"])
    lo, hi = ev.interval("full")
    assert lo == pytest.approx(mean - 4.303 * sd / math.sqrt(3)) and hi == pytest.approx(mean + 4.303 * sd / math.sqrt(3))
    assert ev.distinguishable("full", "lora") is False  # lora's seeds spread over 0.2
    assert report.t95(2) == 4.303 and report.t95(2.5) == 4.303 and report.t95(100) == 1.96


def test_no_spread_names_no_winner():
    rows = [{**row(m, MAJORITY, DATA), "score": s, "test_predictions": None}
            for m, s in (("full", 0.9), ("lora", 0.7))]
    text = "\n".join(report.guidance(report.aggregate(rows), DATA))
    assert "No spread was measured" in text and "Best score" not in text


def test_relative_scores_are_relative_to_the_full_method_rows():
    good = [y if i % 10 else 1 - y for i, y in enumerate(LABELS)]
    agg = {a["method"]: a for a in report.aggregate([row("full", good, DATA), row("lora", MAJORITY, DATA)])}
    assert agg["lora"]["relative"] == pytest.approx(0.66 / 0.9)
    assert agg["full"]["relative"] == 1.0


def test_timings_are_medians_and_iqr_of_every_round():
    rows = [row("full", MAJORITY, DATA, tokens_per_step=100.0), row("lora", MAJORITY, DATA, tokens_per_step=100.0)]
    timings = [{"method": m, "impl": "peftlab", "round": r, "step_wall": [base + 0.01 * r, base + 0.02 * r],
                "step_cpu": [base], "latency": {"b1_unmerged": {"wall": [0.001 * (1 + r)], "cpu": [0.001]}},
                "peak_infer_rss": 2**20 * 100, "load": [1.0, 1.0], "wall_seconds": 2.0}
               for m, base in (("full", 1.0), ("lora", 0.5)) for r in range(3)]
    agg = {a["method"]: a for a in report.aggregate(rows, timings)}
    walls = [1.0, 1.0, 1.01, 1.02, 1.02, 1.04]
    q1, med, q3 = statistics.quantiles(walls, n=4, method="inclusive")
    assert agg["full"]["timing"]["step_wall"] == {"median": med, "q1": q1, "q3": q3, "n": 6}
    assert agg["full"]["timing"]["latency_b1_unmerged"]["median"] == pytest.approx(2.0)  # ms
    assert agg["full"]["tokens_per_second"] == pytest.approx(100.0 / med)
    assert agg["full"]["wall_seconds"] == pytest.approx(6.0)  # three rounds; the rows have no wall time
    assert report.above_noise(agg["full"]["timing"]["step_wall"], agg["lora"]["timing"]["step_wall"])
    assert not report.above_noise(agg["full"]["timing"]["step_wall"], agg["full"]["timing"]["step_wall"])
    md = report._markdown(list(agg.values()), rows, timings, {})
    assert "MB" not in md.replace("MiB", "") and "peak train memory (MiB)" in md
    assert f"{med:.3f} ({q1:.3f}-{q3:.3f})" in md


def test_a_load_change_during_the_run_is_warned_about():
    rows = [row("full", MAJORITY, DATA, env={"cpus": 2}, load=[0.1, 1.9]),  # the bench's own ramp-up
            row("lora", MAJORITY, DATA, env={"cpus": 2}, load=[1.9, 2.1])]
    quiet = report.load_summary(rows, [])
    assert quiet["material"] is False and quiet["min"] == 1.9 and quiet["limit"] == 1.0
    rows.append(row("bitfit", MAJORITY, DATA, env={"cpus": 2}, load=[2.1, 4.0]))
    busy = report.load_summary(rows, [])
    assert busy["material"] is True and busy["changed"][0][0].startswith("bitfit")
    assert "WARNING: the machine's load changed" in "\n".join(report.guidance(report.aggregate(rows), DATA, busy))


def test_memory_names_the_lowest_only_beyond_the_tie_margin():
    rows = [row("full", MAJORITY, DATA, peak_train_rss=400 * 2**20), row("lora", MAJORITY, DATA, peak_train_rss=395 * 2**20),
            row("bitfit", MAJORITY, DATA, peak_train_rss=300 * 2**20)]
    text = "\n".join(report.guidance(report.aggregate(rows), DATA))
    assert "Lowest peak training memory (process RSS): **bitfit** (300 MiB" in text
    rows[2]["peak_train_rss"] = 390 * 2**20
    text = "\n".join(report.guidance(report.aggregate(rows), DATA))
    assert "**bitfit**, **lora**, **full**, within 5% of each other" in text


def test_a_tiny_budget_is_not_printed_as_zero_and_loaded_latency_claims_nothing():
    data = facts(LABELS, [13000, 27000], seen=96)
    rows = [row("full", MAJORITY, data), row("lora", MAJORITY, data)]
    timings = [{"method": "full", "impl": "peftlab", "round": 0, "step_wall": [1.0], "step_cpu": [1.0],
                "latency": {"b1_unmerged": {"wall": [1.4, 1.5, 1.6]}, "b1_merged": {"wall": [0.2, 0.21, 0.22]}}}]
    agg = report.aggregate(rows, timings)
    quiet = {"material": False}
    text = "\n".join(report.guidance(agg, data, quiet))
    assert "The budget is 0.24% of one epoch (96 of 40,000" in text
    assert "full measured slower than merged" in text
    busy = {"material": True, "min": 8.0, "max": 15.0, "cpus": 2, "limit": 1.0, "changed": []}
    text = "\n".join(report.guidance(agg, data, busy))
    assert "slower than merged" not in text and "no unmerged/merged difference is claimed" in text


def test_a_method_s_notes_on_its_trained_adapter_are_in_the_report():
    """AdaLoRA's final rank allocation (``Method.describe``, via ``peftlab.summary``) reaches the report."""
    import peftlab
    from tests.conftest import tiny_llama

    model = tiny_llama()
    peftlab.attach(model, "adalora", init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], total_step=10)
    notes = peftlab.summary(model).notes
    assert notes and any("rank allocation" in n for n in notes)
    rows = [row("full", MAJORITY, DATA, trainable=1000), row("adalora", MAJORITY, DATA, notes=notes),
            row("lora", MAJORITY, DATA)]
    md = report._markdown(report.aggregate(rows), rows, None, {})
    section = md.split("## Method notes (trained adapters)", 1)[1].split("##", 1)[0]
    assert "**adalora (seed 0)**" in section and notes[0] in section and "**lora (seed" not in section
