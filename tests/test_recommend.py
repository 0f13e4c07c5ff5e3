"""``peftlab recommend``: ranking from measured results, published scores and the memory budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import peftlab
from peftlab.estimate import estimate, fit, parse_size
from peftlab.lab.recommend import COPY_COST, Need, recommend, suggestions

TEST_LABELS = [1] * 66 + [0] * 34  # 66% in one class, as in the issue
DATA = {"kind": "classification", "labels": ["neg", "pos"], "test_labels": TEST_LABELS, "fingerprint": "abc",
        "counts": {"train": [340, 660], "validation": [34, 66], "test": [34, 66]},
        "sizes": {"train": 1000, "validation": 100, "test": 100}, "used": {"train": 1000, "validation": 100, "test": 100},
        "examples_seen": 480, "epoch_fraction": 0.48}


def predictions(score: float) -> list[int]:
    """Test predictions with accuracy ``score``, the errors spread evenly over the examples."""
    n = len(TEST_LABELS)
    wrong = n - round(score * n)
    flipped = {j * n // wrong for j in range(wrong)} if wrong else set()
    return [1 - y if i in flipped else y for i, y in enumerate(TEST_LABELS)]


def _row(method: str, score: float, *, seed: int = 0, model: str = "minilm", steps: int = 30, batch: int = 16,
         seq: int = 64, **extra) -> dict:
    return {"method": method, "impl": "peftlab", "seed": seed, "model": model, "task": "tweets", "score": score,
            "metric": "accuracy", "trainable": 1000, "percent": 1.0, "checkpoint_bytes": 10,
            "test_predictions": predictions(score), "data": DATA, "device": "cpu", "env": {"cpus": 2},
            "budget": {"steps": steps, "batch_size": batch, "max_length": seq, "train_examples": None,
                       "eval_examples": 160, "test_examples": 100, "seeds": [seed]}, **extra}


def _write(path, rows: list[dict], timings: list[dict] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with (path / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"truncated by an interrupt\n')  # ignored, like the bench ignores it
    if timings:
        (path / "timings.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timings))


def _rows(path, scores: dict[str, float], **kw) -> None:
    _write(path, [_row(m, s, **kw) for m, s in scores.items()])


def _latency(method: str, ms: list[float]) -> list[dict]:
    return [{"method": method, "impl": "peftlab", "round": r, "step_wall": [1.0], "step_cpu": [1.0],
             "latency": {"b1_unmerged": {"wall": [x / 1000 for x in ms], "cpu": [x / 1000 for x in ms]}}}
            for r in range(1)]


def test_measured_scores_rank_and_are_relative_to_full(tmp_path):
    _rows(tmp_path, {"full": 0.90, "lora": 0.88, "bitfit": 0.70})
    picks = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora", "bitfit")))
    assert [p.method for p in picks] == ["full", "lora", "bitfit"]
    by = {p.method: p for p in picks}
    assert by["lora"].expected == pytest.approx(0.88 / 0.90)
    assert by["bitfit"].expected == pytest.approx(0.70 / 0.90)
    assert by["lora"].evidence == "measured (1 seed, 30 steps x batch 16 x 64 tokens)"
    assert "does not beat the majority class ('pos') baseline" in by["bitfit"].reason  # 0.70 vs 0.66 on 100 examples
    assert all(p.fits is None for p in picks)  # no budget: memory shown, not enforced
    for p in picks:  # the memory shown is the estimator's total at the need's batch (8) and sequence (512)
        assert p.memory_source == "estimate"
        assert p.memory_bytes == estimate("minilm", p.method, batch=8, seq=512).total, p.method
        assert p.trainable_percent == pytest.approx(100 * estimate("minilm", p.method).params["trainable"]
                                                    / estimate("minilm", "full").params["trainable"], rel=1e-12)


def test_runs_of_different_budgets_are_never_pooled(tmp_path):
    """The issue: a 30-step and a 150-step run were averaged as '2 seeds'."""
    _write(tmp_path / "a", [_row("full", 0.90, steps=30), _row("lora", 0.66, steps=30)])
    _write(tmp_path / "b", [_row("full", 0.92, steps=150), _row("lora", 0.92, steps=150)])
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path / "a", tmp_path / "b"),
                                              methods=("full", "lora")))}
    assert by["lora"].expected == pytest.approx(1.0)  # the 150-step run alone, not the mean of two ratios
    assert by["lora"].evidence == "measured (1 seed, 150 steps x batch 16 x 64 tokens)"
    assert "other budgets, not pooled: 30 steps x batch 16 x 64 tokens" in by["lora"].reason
    # the same budget in two runs with two seeds is one measurement of two seeds
    _write(tmp_path / "c", [_row("full", 0.90, seed=1, steps=150), _row("lora", 0.88, seed=1, steps=150)])
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path / "b", tmp_path / "c"),
                                              methods=("full", "lora")))}
    assert by["lora"].evidence.startswith("measured (2 seeds, 150 steps")
    assert by["lora"].expected == pytest.approx((0.92 + 0.88) / (0.92 + 0.90))
    # a run repeated with the same seed is not a second seed
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path / "b", tmp_path / "b"),
                                              methods=("full", "lora")))}
    assert by["lora"].evidence.startswith("measured (1 seed,")


def test_a_run_where_full_does_not_beat_the_baseline_is_not_evidence(tmp_path):
    _rows(tmp_path, {"full": 0.66, "lora": 0.66})  # everything at the majority class
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora")))}
    assert by["lora"].evidence == "published" and by["lora"].expected == peftlab.method_class("lora").typical_score
    assert "full did not beat the majority class ('pos') baseline" in by["lora"].reason


def test_rows_of_another_model_are_not_evidence(tmp_path):
    _rows(tmp_path, {"full": 0.9, "lora": 0.4}, model="smollm2-135m")
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path / "results.jsonl",),
                                              methods=("full", "lora")))}
    assert by["lora"].evidence == "published"
    assert by["lora"].expected == peftlab.method_class("lora").typical_score


def test_serving_many_tasks_penalises_methods_that_train_the_base_weights(tmp_path):
    _rows(tmp_path, {"full": 0.90, "lora": 0.88})
    one = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora")))
    many = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora", "galore"), tasks=5))
    assert one[0].method == "full"
    assert many[0].method == "lora"
    by = {p.method: p for p in many}
    assert by["full"].utility == pytest.approx(1.0 - 4 * COPY_COST)
    galore = peftlab.method_class("galore")
    assert galore.trains_base_weights and "5 full copies" in by["galore"].reason


def test_budget_ranks_methods_that_do_not_fit_last(tmp_path):
    _rows(tmp_path, {"full": 0.90, "lora": 0.88})
    picks = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora"), budget="0.8GB",
                           batch=1, seq=64))
    by = {p.method: p for p in picks}
    assert by["full"].memory_bytes > by["lora"].memory_bytes
    assert by["lora"].fits is True and by["full"].fits is False, [p.reason for p in picks]
    assert [p.method for p in picks] == ["lora", "full"]
    assert "does not fit" in by["full"].reason


def test_when_nothing_fits_it_says_so_and_offers_what_would(tmp_path):
    """The issue: nothing fitted, no pick was printed, and a method fitting at no batch ranked above
    one that fits at a smaller batch."""
    settings = {"device": "cpu"}
    everything = {f.method: f for f in fit("1000TB", "minilm", ["full", "lora"], batch=64, seq=512, **settings)}
    lora = everything["lora"].estimate.total
    budget = int(lora * 0.7)  # lora does not fit as asked, but a smaller batch or checkpointing does
    picks = recommend(Need(model="minilm", methods=("full", "lora"), budget=str(budget), batch=64, seq=512,
                           settings=tuple(settings.items())))
    by = {p.method: p for p in picks}
    assert not any(p.fits for p in picks)
    assert by["lora"].fixes and picks[0].method == "lora"
    for fix in by["lora"].fixes:  # every offer fits, with the estimator's memory under that change
        assert fix.memory_bytes <= budget
    batch_fix = next(x for x in by["lora"].fixes if x.change.startswith("batch "))
    small = int(batch_fix.change.split()[1])
    assert batch_fix.memory_bytes == estimate("minilm", "lora", batch=small, seq=512, **settings).total
    assert estimate("minilm", "lora", batch=small + 1, seq=512, **settings).total > budget
    ckpt = [x for x in by["lora"].fixes if "checkpointing" in x.change and "8-bit" not in x.change]
    assert ckpt and by["lora"].fixes[0] == ckpt[0]  # a setting change ranks before a smaller batch
    assert ckpt[0].memory_bytes == estimate("minilm", "lora", batch=64, seq=512, checkpointing="full",
                                            **settings).total
    lines = suggestions(Need(model="minilm", methods=("full", "lora"), budget=str(budget), batch=64, seq=512,
                             settings=tuple(settings.items())), picks)
    assert lines[0] == f"nothing fits {budget} at batch 64 x 512 as asked"
    assert any(line.startswith("lora fits with gradient checkpointing") and "; or batch" in line for line in lines)
    assert any(line.startswith("qlora (not among the candidates)") for line in lines)
    assert parse_size(str(budget)) == budget


def test_fewest_parameters_objective():
    picks = recommend(Need(model="minilm", methods=("full", "lora", "bitfit", "prompt_tuning"), objective="params"))
    percents = [p.trainable_percent for p in picks]
    assert percents == sorted(percents) and picks[-1].method == "full"
    with pytest.raises(peftlab.ConfigError, match="objective"):
        recommend(Need(model="minilm", objective="cheapest"))


def test_latency_counts_only_above_the_measured_noise(tmp_path):
    cls = peftlab.method_class("prompt_tuning")
    assert not cls.mergeable
    rows = [_row("full", 0.9), _row("prompt_tuning", 0.9)]
    # within the noise: the IQRs overlap, so no penalty and no percentage quoted as a reason
    _write(tmp_path / "noisy", rows, _latency("full", [10, 11, 30, 31]) + _latency("prompt_tuning", [1, 2, 25, 40]))
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path / "noisy",),
                                              methods=("full", "prompt_tuning"), latency_critical=True))}
    assert by["prompt_tuning"].utility == pytest.approx(1.0)
    assert "within the noise" in by["prompt_tuning"].reason and "%" not in by["prompt_tuning"].reason.split(
        "cannot merge")[1]
    # above the noise: 13 ms vs 10 ms with tight spreads costs 3 points
    _write(tmp_path / "clear", rows, _latency("full", [10, 10, 10, 10]) + _latency("prompt_tuning", [13, 13, 13, 13]))
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path / "clear",),
                                              methods=("full", "prompt_tuning", "lora"), latency_critical=True))}
    assert by["prompt_tuning"].utility == pytest.approx(1.0 - 0.03)
    assert "+30% latency at batch 1 measured" in by["prompt_tuning"].reason
    assert "no extra latency" in by["lora"].reason


def test_measured_peak_memory_is_preferred_where_the_bench_trained_as_asked(tmp_path):
    _write(tmp_path, [_row("full", 0.9, batch=8, seq=64, peak_train_rss=123_000_000),
                      _row("lora", 0.9, batch=8, seq=64, peak_train_rss=45_000_000)])
    cpu_fp32 = (("device", "cpu"), ("dtype", "fp32"), ("mixed_precision", False))
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora"),
                                              batch=8, seq=64, settings=cpu_fp32, budget="0.1GB"))}
    assert by["lora"].memory_bytes == 45_000_000 and by["lora"].memory_source == "measured"
    assert by["full"].fits is False and by["lora"].fits is True
    assert "measured peak" in by["lora"].reason
    # other conditions (the default bf16 on CUDA, another batch): the estimate
    for need in (Need(model="minilm", results=(tmp_path,), methods=("lora",), batch=8, seq=64),
                 Need(model="minilm", results=(tmp_path,), methods=("lora",), batch=4, seq=64, settings=cpu_fp32)):
        pick = recommend(need)[0]
        assert pick.memory_source == "estimate"
        assert pick.memory_bytes == estimate("minilm", "lora", batch=need.batch, seq=64, **dict(need.settings)).total


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(peftlab.ConfigError, match="known"):
        recommend(Need(model="minilm", methods=("lorra",)))
    with pytest.raises(peftlab.ConfigError, match="results.jsonl"):
        recommend(Need(model="minilm", results=(tmp_path / "nothing",)))
    with pytest.raises(peftlab.ConfigError, match="positive"):
        recommend(Need(model="minilm", tasks=0))


def test_cli_prints_a_ranking(tmp_path):
    _rows(tmp_path, {"full": 0.90, "lora": 0.88})
    out = subprocess.run([sys.executable, "-m", "peftlab.cli", "recommend", "--model", "minilm", "--budget", "24GB",
                          "--results", str(tmp_path), "--methods", "full", "lora", "--json"],
                         capture_output=True, text=True, check=True).stdout
    picks = json.loads(out)
    assert [p["method"] for p in picks] == ["full", "lora"]
    assert all(p["fits"] for p in picks)
    out = subprocess.run([sys.executable, "-m", "peftlab.cli", "recommend", "--model", "minilm", "--budget", "1MB",
                          "--methods", "lora", "--objective", "params"],
                         capture_output=True, text=True, check=True).stdout
    assert "no pick: nothing fits 1MB" in out and "pick: lora" not in out
