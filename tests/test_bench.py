"""Bench smoke run on a tiny model: every report file is produced and parseable, and the numbers
in it are recomputed here from what the bench saved (scores by a naive count, sizes from disk)."""

from __future__ import annotations

import base64
import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from peftlab.lab import report
from peftlab.lab.bench import BenchConfig, applicable_methods, run


def rescored(row: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """A bench row's test metrics recomputed here: its saved model reloaded into a fresh seeded
    base, the same test sample (``subset(test, test_examples, 0)``), one forward pass, and accuracy
    and macro-F1 from naive counts of the argmax predictions."""
    import peftlab
    from peftlab import models
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import subset

    task = get_task(row["task"])
    saved = run_dir / f"{row['method']}-{row['impl']}-seed{row['seed']}" / "adapter"
    model, tok = models.load(row["model"], num_labels=task.num_labels, seed=row["seed"])
    peftlab.load(model, saved)  # full fine-tuning too: a registered method, saved as any other
    examples = subset(task.examples("test"), row["budget"]["test_examples"], 0)
    batch = task.collate(tok, examples, row["budget"]["max_length"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predictions, references = logits.argmax(-1).tolist(), [e.label for e in examples]
    f1s = []
    for c in sorted(set(predictions) | set(references)):
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp, fn = predictions.count(c) - tp, references.count(c) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"predictions": predictions, "references": references,
            "accuracy": sum(p == r for p, r in zip(predictions, references)) / len(examples),
            "macro_f1": sum(f1s) / len(f1s),
            "loss": float(torch.nn.functional.cross_entropy(logits, batch["labels"]))}


def assert_row_matches_what_it_saved(row: dict[str, Any], run_dir: Path) -> None:
    again = rescored(row, run_dir)
    assert row["score"] == row["test_metrics"]["accuracy"] == pytest.approx(again["accuracy"], abs=1e-12), row["method"]
    assert row["test_metrics"]["macro_f1"] == pytest.approx(again["macro_f1"], rel=1e-9), row["method"]
    assert row["test_metrics"]["loss"] == pytest.approx(again["loss"], rel=1e-5), row["method"]
    # the stored predictions (the report bootstraps over them) are the saved model's
    assert row["test_predictions"] == again["predictions"] and row["data"]["test_labels"] == again["references"]
    saved = run_dir / f"{row['method']}-{row['impl']}-seed{row['seed']}" / "adapter"
    assert row["checkpoint_bytes"] == sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk (an error if it is not a PNG)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def test_applicability_is_decided_by_attaching():
    found = applicable_methods("tweets", "tiny-bert")
    assert found["full"] is None and found["lora"] is None and found["bitfit"] is None
    llama = applicable_methods("tweets", "tiny-llama-cls")
    assert "no bias" in llama["bitfit"]


def test_bench_smoke_two_methods(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore's default rank is clamped on a width-32 model
        rows = run(BenchConfig(model="tiny-bert", task="tweets", methods=["lora", "galore", "full"], profile="smoke",
                               run_dir=run_dir))
    out = capsys.readouterr().out
    # full fine-tuning is a registered method: run once, like the others
    assert sorted((r["method"], r["impl"]) for r in rows) == [("full", "peftlab"), ("galore", "peftlab"),
                                                              ("lora", "peftlab")]
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    parsed = [json.loads(x) for x in lines]
    assert len(parsed) == 3 and all("error" not in r for r in parsed), [r.get("error") for r in parsed]
    # galore (full-parameter, GaLore optimizer) trains what full fine-tuning trains and saves the full model
    by = {r["method"]: r for r in parsed}
    assert by["galore"]["trainable"] == by["full"]["trainable"] and by["galore"]["percent"] == 100.0
    from safetensors.torch import load_file

    galore_file = load_file(run_dir / "galore-peftlab-seed0" / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in galore_file.values()) == by["full"]["trainable"]  # the full model is saved
    from peftlab import models
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import subset

    task = get_task("tweets")
    base_params = sum(p.numel() for p in models.load("tiny-bert", num_labels=3, with_tokenizer=False)[0].parameters())
    train = subset(task.examples("train"), 64, 0)
    test = subset(task.examples("test"), 8, 0)
    for r in parsed:
        for key in ("trainable", "percent", "train_seconds", "train_cpu_seconds", "peak_train_rss", "score",
                    "checkpoint_bytes", "env", "load", "wall_seconds", "test_predictions"):
            assert r.get(key) is not None, (r["method"], key)
        assert r["env"]["torch"] == torch.__version__ and r["env"]["threads"] == torch.get_num_threads()
        assert r["percent"] == 100.0 * r["trainable"] / base_params  # peftlab.summary's denominator: the base
        # the data facts, counted here from the same samples
        assert r["data"]["counts"]["train"] == [sum(e.label == c for e in train) for c in range(3)]
        assert r["data"]["counts"]["test"] == [sum(e.label == c for e in test) for c in range(3)]
        assert r["data"]["epoch_fraction"] == 3 * 4 / 64 and r["secondary_metric"] == "macro_f1"
        assert_row_matches_what_it_saved(r, run_dir)
    # timing rounds: every method once per round, the order rotated by one place per round
    timings = [json.loads(x) for x in (run_dir / "timings.jsonl").read_text().splitlines()]
    plan = ["full", "lora", "galore"]
    assert [t["method"] for t in timings] == plan + plan[1:] + plan[:1]
    for t in timings:
        assert len(t["step_wall"]) == len(t["step_cpu"]) == 2 and min(t["step_wall"]) > 0, t
        assert len(t["latency"]["b1_unmerged"]["wall"]) == 2 and t["peak_infer_rss"] > 0 and len(t["load"]) == 2
        assert set(t["latency"]) == {"b1_unmerged", "b8_unmerged", "b1_merged", "b8_merged"}  # all three merge
    # progress and one result line per finished method
    assert "[1/9] training full (peftlab), seed 0" in out and "[9/9] timing round 2/2" in out and "ETA" in out
    assert out.count("  -> ") == 9 and "(majority class (" in out
    html = (run_dir / "report.html").read_text()
    for name in ("score_vs_params.png", "score_vs_memory.png", "latency.png", "loss_curves.png"):
        width, height = png_size(run_dir / name)
        assert width > 100 and height > 100, name
        assert f"src='data:image/png;base64,{base64.b64encode((run_dir / name).read_bytes()).decode()}'" in html, name
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    report_md = (run_dir / "report.md").read_text()
    agg = {a["method"]: a for a in report.aggregate(parsed, timings)}
    for r in parsed:  # each row's numbers as the results hold them
        assert f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {r['score']:.4f}" in report_md
        relative = f"{r['score'] / by['full']['score']:.3f}" if by["full"]["score"] else "-"
        assert f"| {relative} | {report._iqr(agg[r['method']]['timing']['step_wall'], '{:.3f}')} |" in report_md
    assert "## Data and baselines" in report_md and "majority class" in report_md and "MiB" in report_md
    # an existing run directory is refused without --resume/--overwrite; --resume skips finished work
    with pytest.raises(ValueError, match="--resume"):
        run(BenchConfig(model="tiny-bert", task="tweets", methods=["lora"], profile="smoke", run_dir=run_dir))
    again = run(BenchConfig(model="tiny-bert", task="tweets", methods=["lora", "galore"], profile="smoke",
                            run_dir=run_dir, resume=True))
    assert len(again) == 3 and len((run_dir / "timings.jsonl").read_text().splitlines()) == 6


def test_progress_estimates_the_time_left_from_finished_jobs(monkeypatch):
    from peftlab.lab import bench

    clock = iter([100.0, 160.0, 190.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    p = bench.Progress(train_jobs=3, timing_jobs=6, profile=bench.PROFILES["default"])
    p.finished("train", 20.0)
    p.finished("train", 40.0)  # mean 30 s; one training job and six timing jobs left
    scale = (4 + 2) / 40 + 0.15
    assert p.line("x") == f"[3/9] x | elapsed 1m00s, ETA ~{bench._clock(30 + 6 * 30 * scale)}"
    p.finished("train", 30.0)
    p.finished("timing", 5.0)
    assert p.line("y") == "[5/9] y | elapsed 1m30s, ETA 0m25s"


def test_unknown_names_list_known_ones(tmp_path):
    with pytest.raises(ValueError, match="known"):
        run(BenchConfig(model="tiny-bert", task="tweets", methods=["lorra"], profile="smoke", run_dir=tmp_path / "a"))
    with pytest.raises(ValueError, match="known"):
        run(BenchConfig(model="nope", task="tweets", profile="smoke", run_dir=tmp_path / "b"))


def test_report_aggregates_seeds_and_ratios():
    base = {"trainable": 10, "percent": 1.0, "peak_train_rss": 2**20, "checkpoint_bytes": 100, "metric": "accuracy",
            "history": [], "evals": []}
    rows = [{**base, "method": "full", "impl": "peftlab", "seed": s, "score": 0.8, "trainable": 1000} for s in (0, 1)]
    rows += [{**base, "method": "lora", "impl": "peftlab", "seed": s, "score": 0.7 + 0.1 * s} for s in (0, 1)]
    rows += [{**base, "method": "lora", "impl": "peft", "seed": 0, "score": 0.75}]
    timings = [{"method": "lora", "impl": impl, "round": 0, "step_wall": [x], "step_cpu": [x], "latency": {}}
               for impl, x in (("peftlab", 1.0), ("peft", 2.0))]
    agg = {a["label"]: a for a in report.aggregate(rows, timings)}
    assert agg["lora"]["relative"] == pytest.approx(0.75 / 0.8)
    assert "±" in report.terminal_table(rows, timings)
    ratios = report.peer_ratios(report.aggregate(rows, timings))
    assert ratios[0]["step_time"] == pytest.approx(0.5) and ratios[0]["score"] == pytest.approx(1.0)


def test_a_failing_method_is_reported_and_the_bench_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    rows = run(BenchConfig(model="tiny-bert", task="tweets", methods=["lora", "bitfit"], profile="smoke",
                           run_dir=run_dir, options={"lora": {"r": -1}}))
    by_method = {r["method"]: r for r in rows}
    assert "lora (peftlab) train failed" in by_method["lora"]["error"] and "r" in by_method["lora"]["error"]
    assert "error" not in by_method["bitfit"]
    assert_row_matches_what_it_saved(by_method["bitfit"], run_dir)
    # the failed method is not counted as done: --resume retries it
    assert [json.loads(x)["method"] for x in (run_dir / "results.jsonl").read_text().splitlines()].count("lora") == 1


def test_profile_overrides_apply_to_every_method_and_are_checked(tmp_path):
    rows = run(BenchConfig(model="tiny-bert", task="tweets", methods=["bitfit"], profile="smoke",
                           run_dir=tmp_path / "run", overrides={"steps": 2, "seeds": [3]}))
    assert {r["seed"] for r in rows} == {3} and all(r["steps"] == 2 for r in rows)
    assert all(r["profile"] == "smoke*" and r["budget"]["steps"] == 2 for r in rows)
    assert "2 steps x batch 4" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown profile field"):
        run(BenchConfig(model="tiny-bert", task="tweets", profile="smoke", run_dir=tmp_path / "x",
                        overrides={"stepz": 2}))


def test_overwrite_from_python_keeps_a_folder_the_bench_did_not_write(tmp_path):
    """bench.run(overwrite=True) refuses, like the CLI, a folder holding files it did not write."""
    from peftlab.core.errors import ConfigError
    from peftlab.lab import bench

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not write"):
        bench.run(bench.BenchConfig(task="tweets", run_dir=str(tmp_path), overwrite=True, methods=["lora"]))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_generated_text_is_compared_with_the_untrained_base_model_and_peft(tmp_path):
    """A causal-LM task has no class prior: its baseline is the base model's own answers, scored
    once before anything trains; --vs peft times peft's LoRA in the same rounds."""
    from peftlab import models
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import subset

    run_dir = tmp_path / "run"
    rows = run(BenchConfig(model="tiny-llama", task="chat", methods=["lora", "adalora"], profile="smoke",
                           run_dir=run_dir, vs_peft=True, overrides={"timing_rounds": 1}))
    assert sorted((r["method"], r["impl"]) for r in rows) == [("adalora", "peftlab"), ("full", "peftlab"),
                                                              ("lora", "peft"), ("lora", "peftlab")]
    # a peer a generic loop cannot train like peftlab's (peft's AdaLoRA needs its own per-step call) is not timed
    assert "adalora (peft): does not apply (peft's AdaLoRA allocates ranks" in (run_dir / "report.md").read_text()
    adalora = next(r for r in rows if r["method"] == "adalora")
    assert any("rank allocation" in n for n in adalora["notes"])
    rows = [r for r in rows if r["method"] != "adalora"]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    base = json.loads((run_dir / "baseline.json").read_text())
    task = get_task("chat")
    model, tok = models.load("tiny-llama", seed=0)
    again = task.evaluate(model, tok, subset(task.examples("test"), 8, 0), batch_size=16, max_length=24)
    assert base["metric"] == "rouge_l" and base["metrics"] == pytest.approx(again, rel=1e-6)
    assert all(r["data"]["base_model"] == base and r["test_predictions"] is None for r in rows)
    timings = [json.loads(x) for x in (run_dir / "timings.jsonl").read_text().splitlines()]
    assert [(t["method"], t["impl"]) for t in timings] == [("full", "peftlab"), ("lora", "peftlab"), ("lora", "peft"),
                                                           ("adalora", "peftlab")]
    assert all(len(t["step_wall"]) == 2 and "b1_merged" in t["latency"] for t in timings)
    md = (run_dir / "report.md").read_text()
    assert f"| base model (no training) | - | - | {base['metrics']['rouge_l']:.4f} |" in md
    assert "## peftlab / peft (same run)" in md and "| lora |" in md
