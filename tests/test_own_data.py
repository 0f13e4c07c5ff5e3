"""The user's own data, as a new user meets it: a reviews-like CSV (two labels, two thirds in one
class), with and without a ``split`` column, through ``get_task``, ``peftlab train`` and
``peftlab bench``. Everything is generated here; nothing is downloaded."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

import peftlab
from peftlab import models
from peftlab.core.errors import ConfigError
from peftlab.lab.data import Example
from peftlab.lab.data_cli import data_task
from peftlab.lab.tasks import SPLIT_VALUES, DataFileError, DataFiles, FileTask, get_task

pytestmark = pytest.mark.usefixtures("one_thread")

POSITIVE = ["great", "love", "excellent", "works", "happy", "recommend"]
NEGATIVE = ["awful", "broken", "refund", "poor", "sad", "returned"]


def reviews(n: int, seed: int, share: float = 0.66, start: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct reviews, about ``share`` of them 'pos', each with two words of its class."""
    rng = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        label = "pos" if rng.random() < share else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(POSITIVE + NEGATIVE, 1)
        rows.append((f"review {i}: " + " ".join(words), label))
    return rows


def write(path: Path, rows: list[tuple], header: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path):
    """reviews.csv (no split column), test.csv, and split.csv (a split column with test rows)."""
    train = write(tmp_path / "reviews.csv", reviews(300, 0))
    test = write(tmp_path / "test.csv", reviews(60, 1, start=10_000))
    rows = reviews(240, 2, start=20_000)
    split = write(tmp_path / "split.csv", [(t, y, "test" if i % 4 == 0 else "Train") for i, (t, y) in enumerate(rows)],
                  ("text", "label", "split"))
    return {"train": train, "test": test, "split": split, "dir": tmp_path}


# --------------------------------------------------------------------------- splits


def test_validation_is_carved_stratified_when_absent(files):
    rows = reviews(300, 0)
    task = get_task(None, data=files["train"])
    train, val = task.examples("train"), task.examples("validation")
    assert task.labels == ("neg", "pos") and task.examples("test") == []
    # oracle: 10 % of each class's rows (rounded half up), the rest trains, nothing lost or shared
    per_class = Counter(label for _, label in rows)
    got = Counter(task.labels[e.label] for e in val)
    assert got == {c: int(0.1 * n + 0.5) for c, n in per_class.items()}
    everything = [Example(t, task.labels.index(y)) for t, y in rows]
    assert sorted(train + val, key=everything.index) == everything
    assert not {e.text for e in train} & {e.text for e in val}
    assert "carved: 30 of the 300 training rows (stratified by label, seed 0)" == task.origins["validation"]
    # a validation file replaces the carve
    val_file = write(files["dir"] / "val.csv", reviews(20, 3, start=30_000))
    own = get_task(None, data=files["train"], val_data=val_file)
    assert len(own.examples("train")) == 300 and len(own.examples("validation")) == 20
    assert own.origins["validation"] == str(val_file)


def test_split_files_and_split_column(files):
    task = get_task(None, data=DataFiles(files["train"], test=files["test"]))
    assert len(task.examples("test")) == 60
    assert task.label_counts("test") == {c: n for c, n in sorted(Counter(y for _, y in reviews(60, 1, start=10_000)).items())}
    task.require_test()
    column = get_task("file", data=files["split"])  # 'Train' and 'test' in any case
    assert len(column.examples("test")) == 60 and len(column.examples("train")) + len(column.examples("validation")) == 180
    assert column.origins["test"] == f"the 'split' column of {files['split']}"
    with pytest.raises(DataFileError, match=r"gives 60 test rows, and so does the 'split' column of .*give each split once"):
        get_task(None, data=files["split"], test_data=files["test"])
    wrong = write(files["dir"] / "wrong.csv", [("held out", "pos", "train")], ("text", "label", "split"))
    with pytest.raises(DataFileError, match=r"row 1 \(line 2\) has split 'train', but the file was given for the test"):
        get_task(None, data=files["train"], test_data=wrong)
    causal = files["dir"] / "qa.jsonl"
    causal.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(DataFileError, match="is a causal-lm file but .* is a classification file"):
        get_task(None, data=files["train"], test_data=causal)
    unseen = write(files["dir"] / "unseen.csv", [("meh", "neutral")])
    with pytest.raises(DataFileError, match=rf"{re.escape(str(unseen))}: row 1 \(line 2\) \(test\) has label 'neutral'"):
        get_task(None, data=files["train"], test_data=unseen)
    with pytest.raises(ConfigError, match="pass the training file with --data too"):
        get_task(None, test_data=files["test"])


def test_a_missing_test_split_names_the_fix(files):
    task = get_task(None, data=files["train"])
    with pytest.raises(DataFileError) as info:
        task.require_test()
    message = str(info.value)
    assert "no test rows" in message and "--test-data FILE" in message and "'split' column" in message
    for value in SPLIT_VALUES:  # every allowed spelling is named
        assert value in message


def test_split_files_travel_with_the_path(files):
    import pickle

    data = DataFiles(files["train"], test=files["test"])
    assert data == str(files["train"]) and json.dumps(data) == json.dumps(str(files["train"]))
    back = pickle.loads(pickle.dumps(data))  # as the bench hands it to its workers
    assert (back.train, back.validation, back.test) == (str(files["train"]), None, str(files["test"]))
    assert len(get_task(None, back).examples("test")) == 60


def test_data_options_resolve_the_task(files):
    from argparse import Namespace

    def args(**kw):
        return Namespace(**{"task": None, "data": None, "val_data": None, "test_data": None, "encoding": "utf-8", **kw})

    assert data_task(args(), default="tweets").name == "tweets"
    with pytest.raises(ConfigError, match="--task .* or --data FILE"):
        data_task(args())
    task = data_task(args(data=str(files["train"]), test_data=str(files["test"])), default="tweets")
    assert isinstance(task, FileTask) and task.name == "reviews"  # no task named: the file task
    assert data_task(args(task="file", data=str(files["split"]))).name == "split"
    with pytest.raises(ConfigError, match="built in and reads no data file"):
        data_task(args(task="tweets", data=str(files["split"])))
    with pytest.raises(DataFileError, match="no test rows"):
        data_task(args(data=str(files["train"])), default="tweets")


# --------------------------------------------------------------------------- peftlab train


def cli(*argv: str) -> int:
    from peftlab.cli import main

    return main(list(argv))


SMALL = ("--model", "tiny-bert", "--steps", "4", "--batch-size", "8", "--max-length", "24", "--eval-every", "0",
         "--no-progress")


def test_train_without_a_test_split_fails_before_anything(files, capsys):
    run_dir = files["dir"] / "run"
    assert cli("train", "--data", str(files["train"]), *SMALL, "--run-dir", str(run_dir)) == 2
    err = capsys.readouterr().err
    assert "no test rows" in err and "--test-data" in err
    assert not run_dir.exists()


def test_train_scores_the_test_split_beside_its_baselines(files, capsys):
    run_dir = files["dir"] / "run"
    assert cli("train", "--data", str(files["train"]), "--test-data", str(files["test"]), "--method", "lora",
               "--opt", "r=2", *SMALL, "--run-dir", str(run_dir)) == 0
    out = capsys.readouterr().out
    result = json.loads((run_dir / "result.json").read_text())
    task = get_task(None, data=files["train"], test_data=files["test"])

    # the saved adapter, reloaded into a fresh model, scores what train printed
    model, tok = models.load("tiny-bert", num_labels=2, with_tokenizer=True)
    peftlab.load(model, run_dir / "adapter")
    test = task.examples("test")
    again = task.evaluate(model, tok, test, batch_size=8, max_length=24)
    for key in ("accuracy", "macro_f1", "loss"):
        assert result["test"][key] == pytest.approx(again[key], abs=1e-5)
    assert f"test split (60 examples): loss {again['loss']:.4f}  accuracy {again['accuracy']:.4f}" in out

    # label counts and baselines from naive counting of the files
    test_labels = [y for _, y in reviews(60, 1, start=10_000)]
    top, top_n = Counter(test_labels).most_common(1)[0]
    majority = top_n / 60
    f1_top = 2 * top_n / (2 * top_n + (60 - top_n))  # the other class scores 0
    n_neg = test_labels.count("neg")
    assert f"test neg {n_neg} ({n_neg / 60:.1%}), pos {60 - n_neg} ({(60 - n_neg) / 60:.1%})" in out
    assert (f"majority class (always {top!r}) accuracy {majority:.4f} macro_f1 {f1_top / 2:.4f}; "
            "chance (uniform over 2) accuracy 0.5000") in out
    n_train = len(task.examples("train"))
    assert f"4 steps x 8 examples = 32 examples, {32 / n_train:.2f} of an epoch of {n_train:,} training examples" in out
    assert result["epochs"] == pytest.approx(32 / n_train)
    beaten = again["accuracy"] > majority + 2 * math.sqrt(majority * (1 - majority) / 60)
    assert ("WARNING: the test accuracy" in out) == (not beaten)

    # % of base: trainable over the parameters of the model without the adapter (not the total with it)
    fresh, _ = models.load("tiny-bert", num_labels=2, with_tokenizer=False)
    base = sum(p.numel() for p in fresh.parameters())
    shown = re.search(r"([\d,]+) trainable parameters, ([\d.]+)% of the base model's ([\d,]+)", out)
    trainable = int(shown[1].replace(",", ""))
    assert int(shown[3].replace(",", "")) == base
    assert shown[2] == f"{100 * trainable / base:.3f}"
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))  # every trained tensor, once
    assert trainable == sum(t.numel() for t in saved.values())
    assert result["percent_of_base"] == pytest.approx(100 * trainable / base, abs=1e-9)


def test_test_report_warns_only_without_a_clear_margin():
    from peftlab.lab.train_cli import test_report
    from peftlab.lab.trainer import TrainConfig, TrainResult

    class Task:
        kind, labels, num_labels, name = "classification", ("neg", "pos"), 2, "t"

        def examples(self, split):
            return [Example(str(i), int(i >= 34)) for i in range(100)]

    config = TrainConfig(steps=10, batch_size=8, progress=False)
    result = TrainResult(steps=10, seconds=1.0, tokens=1, tokens_per_second=1.0, seconds_per_step=0.1,
                         train_size=100, epochs=0.8)
    test = Task().examples("test")  # 66 % pos
    margin = 2 * math.sqrt(0.66 * 0.34 / 100)
    lines = "\n".join(test_report(Task(), result, config, test, {"accuracy": 0.66 + margin / 2, "macro_f1": 0.5}))
    assert f"is within {margin:.4f} (2 standard errors) of the majority-class baseline 0.6600" in lines
    lines = "\n".join(test_report(Task(), result, config, test, {"accuracy": 0.60, "macro_f1": 0.5}))
    assert "is at or below the majority-class baseline 0.6600" in lines
    lines = "\n".join(test_report(Task(), result, config, test, {"accuracy": 0.66 + 1.5 * margin, "macro_f1": 0.7}))
    assert "WARNING" not in lines and "0.80 of an epoch of 100" in lines


def test_full_fine_tuning_is_a_method_like_the_others(files, capsys):
    run_dir = files["dir"] / "full"
    assert cli("train", "--data", str(files["split"]), "--method", "full", *SMALL, "--run-dir", str(run_dir)) == 0
    out = capsys.readouterr().out
    assert "100.000% of the base model's" in out
    model, tok = models.load("tiny-bert", num_labels=2, with_tokenizer=True)
    peftlab.load(model, run_dir / "adapter")
    task = get_task(None, data=files["split"])
    scores = task.evaluate(model, tok, task.examples("test"), batch_size=8, max_length=24)
    assert json.loads((run_dir / "result.json").read_text())["test"]["loss"] == pytest.approx(scores["loss"], abs=1e-5)
    assert json.loads((run_dir / "run.json").read_text())["method"] == "full"


# --------------------------------------------------------------------------- peftlab bench


def test_bench_on_a_file_without_split_column(files, capsys):
    run_dir = files["dir"] / "bench"
    assert cli("bench", "--data", str(files["train"]), "--model", "tiny-bert", "--profile", "smoke", "--methods",
               "lora", "--run-dir", str(run_dir)) == 2
    err = capsys.readouterr().err
    assert "no test rows" in err and "--test-data" in err
    assert not run_dir.exists()  # refused before anything was written or trained


@pytest.mark.parametrize("how", ["test-file", "split-column"])
def test_bench_on_own_data_end_to_end(files, capsys, how):
    run_dir = files["dir"] / "bench"
    data = (["--data", str(files["train"]), "--test-data", str(files["test"])] if how == "test-file"
            else ["--data", str(files["split"])])
    assert cli("bench", *data, "--model", "tiny-bert", "--profile", "smoke", "--methods", "lora",
               "--run-dir", str(run_dir)) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    assert {r["method"] for r in rows} >= {"lora"} and not [r for r in rows if "error" in r]
    assert len([r for r in rows if r["method"] == "full"]) <= 1  # the reference runs once
    for path in re.findall(r"report: (\S+)", out):  # every report path printed exists
        assert Path(path).is_file(), path
    assert re.findall(r"report: (\S+)", out)


def test_train_on_a_causal_file_scores_the_base_model_as_its_baseline(tmp_path, capsys):
    rows = [{"prompt": f"what colour is item {i}?", "response": f"item {i} is {c}.",
             "split": "test" if i % 5 == 0 else "train"}
            for i, c in enumerate(["red", "blue", "green", "black", "white"] * 4)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run_dir = tmp_path / "run"
    assert cli("train", "--data", str(path), "--model", "tiny-llama", "--steps", "2", "--batch-size", "4",
               "--max-length", "48", "--eval-every", "0", "--no-progress", "--run-dir", str(run_dir)) == 0
    out = capsys.readouterr().out
    result = json.loads((run_dir / "result.json").read_text())
    # oracle: a fresh base model (same seed) scored on the same test rows
    model, tok = models.load("tiny-llama", seed=0)
    task = get_task(None, data=path)
    base = task.evaluate(model, tok, task.examples("test"), batch_size=4, max_length=48)
    assert result["base_model_test"]["loss"] == pytest.approx(base["loss"], abs=1e-5)
    assert f"the base model before training: loss {base['loss']:.4f}" in out
    assert ("WARNING: the test rouge_l" in out) == (result["test"]["rouge_l"] <= base["rouge_l"])
    assert "2 steps x 4 examples = 8 examples" in out
