"""``peftlab recommend``: ranking from measured results, published scores and the memory budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import peftlab
from peftlab.lab.recommend import COPY_COST, Need, recommend


def _rows(path, scores: dict[str, float], latency: dict[str, float] | None = None, model: str = "minilm") -> None:
    latency = latency or {}
    with path.open("w") as f:
        for method, score in scores.items():
            row = {"method": method, "impl": "peftlab", "seed": 0, "model": model, "task": "tweets", "score": score,
                   "metric": "accuracy", "trainable": 1000, "percent": 1.0, "checkpoint_bytes": 10}
            key = "latency_ms_b1" if method == "full" else "latency_ms_b1_unmerged"
            if method in latency:
                row[key] = latency[method]
            f.write(json.dumps(row) + "\n")
        f.write('{"truncated by an interrupt\n')  # ignored, like the bench ignores it


def test_measured_scores_rank_and_are_relative_to_full(tmp_path):
    _rows(tmp_path / "results.jsonl", {"full": 0.80, "lora": 0.78, "bitfit": 0.70})
    picks = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora", "bitfit")))
    assert [p.method for p in picks] == ["full", "lora", "bitfit"]
    by = {p.method: p for p in picks}
    assert by["lora"].expected == pytest.approx(0.78 / 0.80)
    assert by["bitfit"].expected == pytest.approx(0.70 / 0.80)
    assert by["lora"].evidence == "measured (1 seed)"
    assert all(p.fits is None for p in picks)  # no budget: memory shown, not enforced
    from peftlab.estimate import estimate

    for p in picks:  # the memory shown is the estimator's total at the need's batch (8) and sequence (512)
        assert p.memory_bytes == estimate("minilm", p.method, batch=8, seq=512).total, p.method
        assert p.trainable_percent == pytest.approx(100 * estimate("minilm", p.method).params["trainable"]
                                                    / estimate("minilm", "full").params["trainable"], rel=1e-12)


def test_rows_of_another_model_are_not_evidence(tmp_path):
    _rows(tmp_path / "results.jsonl", {"full": 0.8, "lora": 0.4}, model="smollm2-135m")
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path / "results.jsonl",),
                                              methods=("full", "lora")))}
    assert by["lora"].evidence == "published"
    assert by["lora"].expected == peftlab.method_class("lora").typical_score


def test_serving_many_tasks_penalises_full_copies(tmp_path):
    _rows(tmp_path / "results.jsonl", {"full": 0.80, "lora": 0.78})
    one = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora")))
    many = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora"), tasks=5))
    assert one[0].method == "full"
    assert many[0].method == "lora"
    assert {p.method: p for p in many}["full"].utility == pytest.approx(1.0 - 4 * COPY_COST)


def test_budget_ranks_methods_that_do_not_fit_last(tmp_path):
    _rows(tmp_path / "results.jsonl", {"full": 0.80, "lora": 0.78})
    picks = recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora"), budget="0.8GB",
                           batch=1, seq=64))
    by = {p.method: p for p in picks}
    assert by["full"].memory_bytes > by["lora"].memory_bytes
    assert by["lora"].fits is True and by["full"].fits is False, [p.reason for p in picks]
    assert [p.method for p in picks] == ["lora", "full"]
    assert "does not fit" in by["full"].reason


def test_latency_critical_charges_measured_overhead_of_unmergeable_methods(tmp_path):
    cls = peftlab.method_class("lora")
    assert cls.mergeable  # merged LoRA costs nothing
    _rows(tmp_path / "results.jsonl", {"full": 0.8, "lora": 0.8}, latency={"full": 10.0, "lora": 13.0})
    by = {p.method: p for p in recommend(Need(model="minilm", results=(tmp_path,), methods=("full", "lora"),
                                              latency_critical=True))}
    assert by["lora"].utility == pytest.approx(1.0)
    assert "no extra latency" in by["lora"].reason


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(peftlab.ConfigError, match="known"):
        recommend(Need(model="minilm", methods=("lorra",)))
    with pytest.raises(peftlab.ConfigError, match="results.jsonl"):
        recommend(Need(model="minilm", results=(tmp_path / "nothing",)))
    with pytest.raises(peftlab.ConfigError, match="positive"):
        recommend(Need(model="minilm", tasks=0))


def test_cli_prints_a_ranking(tmp_path):
    _rows(tmp_path / "results.jsonl", {"full": 0.80, "lora": 0.78})
    out = subprocess.run([sys.executable, "-m", "peftlab.cli", "recommend", "--model", "minilm", "--budget", "24GB",
                          "--results", str(tmp_path), "--methods", "full", "lora", "--json"],
                         capture_output=True, text=True, check=True).stdout
    picks = json.loads(out)
    assert [p["method"] for p in picks] == ["full", "lora"]
    assert all(p["fits"] for p in picks)
