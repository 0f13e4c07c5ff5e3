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
    if row["method"] == "full":
        model = type(model).from_pretrained(saved)
    else:
        peftlab.load(model, saved)
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
    return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(examples),
            "macro_f1": sum(f1s) / len(f1s),
            "loss": float(torch.nn.functional.cross_entropy(logits, batch["labels"]))}


def assert_row_matches_what_it_saved(row: dict[str, Any], run_dir: Path) -> None:
    again = rescored(row, run_dir)
    assert row["score"] == row["test_metrics"]["accuracy"] == pytest.approx(again["accuracy"], abs=1e-12), row["method"]
    assert row["test_metrics"]["macro_f1"] == pytest.approx(again["macro_f1"], rel=1e-9), row["method"]
    assert row["test_metrics"]["loss"] == pytest.approx(again["loss"], rel=1e-5), row["method"]
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


def test_bench_smoke_two_methods(tmp_path):
    run_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore's default rank is clamped on a width-32 model
        rows = run(BenchConfig(model="tiny-bert", task="tweets", methods=["lora", "galore"], profile="smoke",
                               run_dir=run_dir))
    assert {(r["method"], r["impl"]) for r in rows} == {("full", "peftlab"), ("lora", "peftlab"), ("galore", "peftlab")}
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    parsed = [json.loads(x) for x in lines]
    assert len(parsed) == 3 and all("error" not in r for r in parsed), [r.get("error") for r in parsed]
    # galore (full-parameter, GaLore optimizer) trains what full fine-tuning trains and saves the full model
    by = {r["method"]: r for r in parsed}
    assert by["galore"]["trainable"] == by["full"]["trainable"] and by["galore"]["percent"] == 100.0
    from safetensors.torch import load_file

    galore_file = load_file(run_dir / "galore-peftlab-seed0" / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in galore_file.values()) == by["full"]["trainable"]  # the full model is saved
    for r in parsed:
        for key in ("trainable", "percent", "seconds_per_step", "tokens_per_second", "peak_train_rss", "score",
                    "latency_ms_b1", "checkpoint_bytes", "peak_infer_rss", "env"):
            assert key in r or f"{key}_unmerged" in r, (r["method"], key)
        assert r["env"]["torch"] == torch.__version__ and r["env"]["threads"] == torch.get_num_threads()
        assert_row_matches_what_it_saved(r, run_dir)
    lora = by["lora"]
    # timings have no reference to compare with; that they were measured is what is checked
    assert lora["latency_ms_b1_merged"] > 0 and lora["latency_ms_b8_unmerged"] > 0
    assert by["galore"]["latency_ms_b1_merged"] > 0
    assert lora["trainable"] < by["full"]["trainable"]
    html = (run_dir / "report.html").read_text()
    for name in ("score_vs_params.png", "score_vs_memory.png", "latency.png", "loss_curves.png"):
        width, height = png_size(run_dir / name)
        assert width > 100 and height > 100, name
        assert f"src='data:image/png;base64,{base64.b64encode((run_dir / name).read_bytes()).decode()}'" in html, name
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    report_md = (run_dir / "report.md").read_text()
    for r in parsed:  # each row's numbers as the results hold them
        assert f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} |" in report_md, r["method"]
        relative = f"{r['score'] / by['full']['score']:.3f}" if by["full"]["score"] else "-"
        assert f"| {r['score']:.4f} | {relative} |" in report_md, r["method"]
    # an existing run directory is refused without --resume/--overwrite; --resume skips finished work
    with pytest.raises(ValueError, match="--resume"):
        run(BenchConfig(model="tiny-bert", task="tweets", methods=["lora"], profile="smoke", run_dir=run_dir))
    again = run(BenchConfig(model="tiny-bert", task="tweets", methods=["lora", "galore"], profile="smoke",
                            run_dir=run_dir, resume=True))
    assert len(again) == 3


def test_unknown_names_list_known_ones(tmp_path):
    with pytest.raises(ValueError, match="known"):
        run(BenchConfig(model="tiny-bert", task="tweets", methods=["lorra"], profile="smoke", run_dir=tmp_path / "a"))
    with pytest.raises(ValueError, match="known"):
        run(BenchConfig(model="nope", task="tweets", profile="smoke", run_dir=tmp_path / "b"))


def test_report_aggregates_seeds_and_ratios():
    base = {"trainable": 10, "percent": 1.0, "seconds_per_step": 1.0, "tokens_per_second": 100.0,
            "peak_train_rss": 2**20, "checkpoint_bytes": 100, "metric": "accuracy", "history": [], "evals": []}
    rows = [{**base, "method": "full", "impl": "peftlab", "seed": s, "score": 0.8, "trainable": 1000} for s in (0, 1)]
    rows += [{**base, "method": "lora", "impl": "peftlab", "seed": s, "score": 0.7 + 0.1 * s} for s in (0, 1)]
    rows += [{**base, "method": "lora", "impl": "peft", "seed": 0, "score": 0.75, "seconds_per_step": 2.0}]
    agg = {a["label"]: a for a in report.aggregate(rows)}
    assert agg["lora"]["relative"] == pytest.approx(0.75 / 0.8)
    assert "±" in report.terminal_table(rows)
    ratios = report.peer_ratios(report.aggregate(rows))
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
