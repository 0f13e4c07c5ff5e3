"""The trainer: exact resume, divergence handling, schedules, optimizer groups, and ``peftlab train``."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import time
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab import models
from peftlab.core import files
from peftlab.core.errors import ConfigError
from peftlab.lab import trainer
from peftlab.lab.tasks import get_task
from peftlab.lab.trainer import TrainConfig, TrainingDiverged, checkpoints, train
from tests.test_tasks import tiny_causal_lm, word_tokenizer

# A run small enough for the default suite: 20 training examples, so 6 steps of 2 x 4 cross epochs.
SMALL = dict(batch_size=4, grad_accum=2, lr=5e-3, warmup_ratio=0.2, eval_every=2, eval_examples=8,
             train_examples=20, max_length=24, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    _, tokenizer = models.load("tiny-bert")
    if tokenizer is None:
        pytest.skip("the minilm package (its tokenizer) is not installed")
    return tokenizer


@pytest.fixture(scope="module")
def tweets():
    return get_task("tweets")


def lora_bert(seed: int = 0, adapter_seed: int | None = None) -> nn.Module:
    model, _ = models.load("tiny-bert", num_labels=3, seed=seed, with_tokenizer=False)
    torch.manual_seed(seed if adapter_seed is None else adapter_seed)
    peftlab.attach(model, "lora", r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    return model


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def losses(result) -> list[tuple]:
    return [(h["step"], h["loss"], h["lr"], h["tokens"]) for h in result.history]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"tensors differ after resume: {different}"


class Interrupted(Exception):
    """Stands in for a crash or a kill in the middle of a run."""


def interrupt_after(task, calls: int):
    """Make ``task.collate`` fail on training micro-batch number ``calls + 1``."""
    seen = {"n": 0}
    original = task.collate

    def collate(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] > calls:
            raise Interrupted
        return original(*args, **kwargs)

    task.collate = collate
    return task


# --------------------------------------------------------------------------- exact resume


def test_resume_after_a_crash_is_bit_identical(tmp_path, tok):
    config = TrainConfig(steps=6, save_every=3, schedule="cosine", **SMALL)
    reference = lora_bert()
    full = train(reference, tok, get_task("tweets"), config, run_dir=tmp_path / "a")

    model = lora_bert()
    with pytest.raises(Interrupted):  # crash in the middle of step 5 (micro-batch 9 of 12)
        train(model, tok, interrupt_after(get_task("tweets"), 8), config, run_dir=tmp_path / "b")
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-3"]
    fresh = lora_bert(adapter_seed=1)  # another adapter init: everything trained must come from the checkpoint
    resumed = train(fresh, tok, get_task("tweets"), config, run_dir=tmp_path / "b", resume=True)

    assert_identical(trainable(fresh), trainable(reference))
    assert losses(resumed) == losses(full)
    assert resumed.evals == full.evals
    assert resumed.final == full.final and resumed.steps == 6


def test_resume_extending_a_run_is_bit_identical(tmp_path, tok, tweets):
    """The brief's recipe: 6 steps at once vs 3 steps then resume to 6 (a constant schedule,
    since a decaying schedule depends on the total number of steps)."""
    settings = {**SMALL, "warmup_ratio": 0.0, "schedule": "constant"}
    reference = lora_bert()
    full = train(reference, tok, tweets, TrainConfig(steps=6, save_every=3, **settings), run_dir=tmp_path / "a")
    model = lora_bert()
    train(model, tok, tweets, TrainConfig(steps=3, save_every=3, **settings), run_dir=tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing that matters changed: no warning
        resumed = train(model, tok, tweets, TrainConfig(steps=6, save_every=3, **settings), run_dir=tmp_path / "b",
                        resume=True)
    assert_identical(trainable(model), trainable(reference))
    assert losses(resumed) == losses(full)


def test_checkpoints_are_complete_and_only_the_last_two_kept(tmp_path, tok, tweets):
    train(lora_bert(), tok, tweets, TrainConfig(steps=4, save_every=1, **SMALL), run_dir=tmp_path)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]  # no temporary folders left
    step = root / "step-4"
    assert {p.name for p in step.iterdir()} == {trainer.PARAMS_FILE, trainer.OPTIMIZER_FILE, trainer.RNG_FILE,
                                                trainer.STATE_FILE}
    torch.load(step / trainer.OPTIMIZER_FILE, weights_only=True)
    torch.load(step / trainer.RNG_FILE, weights_only=True)
    state = json.loads((step / trainer.STATE_FILE).read_text())
    assert state["step"] == 4 and len(state["history"]) == 4
    assert (state["epoch"], state["position"]) == (1, 12)  # 4 steps x 8 examples over 20


def test_resume_refuses_a_different_data_order(tmp_path, tok, tweets):
    train(lora_bert(), tok, tweets, TrainConfig(steps=2, save_every=2, **SMALL), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1 changes the order of the training data"):
        train(lora_bert(), tok, tweets, TrainConfig(steps=4, save_every=2, **{**SMALL, "seed": 1}), run_dir=tmp_path,
              resume=True)
    with pytest.warns(UserWarning, match="changed lr"):
        result = train(lora_bert(), tok, tweets, TrainConfig(steps=3, **{**SMALL, "lr": 1e-3}), run_dir=tmp_path,
                       resume=True)
    assert result.history[2]["lr"] == pytest.approx(1e-3 * trainer._schedule(TrainConfig(steps=3, **SMALL))(2))


def test_resume_without_checkpoint_starts_fresh(tmp_path, tok, tweets):
    a = train(lora_bert(), tok, tweets, TrainConfig(steps=2, **SMALL), run_dir=tmp_path / "x", resume=True)
    b = train(lora_bert(), tok, tweets, TrainConfig(steps=2, **SMALL))
    assert losses(a) == losses(b)


# --------------------------------------------------------------------------- divergence


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tok, tweets):
    model = lora_bert()
    calls = {"n": 0}

    def poison(module, args, kwargs, output):  # the loss of the 9th forward (step 5) becomes NaN
        if module.training:
            calls["n"] += 1
            if calls["n"] == 9:
                output["loss"] = output["loss"] * float("nan")
        return output

    model.register_forward_hook(poison, with_kwargs=True)
    config = TrainConfig(steps=8, save_every=2, **SMALL)
    with pytest.raises(TrainingDiverged) as info:
        train(model, tok, tweets, config, run_dir=tmp_path)
    error = info.value
    assert error.step == 5 and math.isnan(error.loss)
    assert error.checkpoint == tmp_path / "checkpoints" / "step-4"
    message = str(error)
    assert "step 5 of 8" in message and "nan" in message and str(error.checkpoint) in message
    assert "lower learning rate" in message
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-4"]
    # the optimizer step was not taken: the model is exactly the checkpointed step 4
    from safetensors.torch import load_file

    saved = load_file(str(error.checkpoint / trainer.PARAMS_FILE))
    assert_identical(trainable(model), saved)
    # and the run resumes from it (here with the poison gone)
    resumed = train(lora_bert(), tok, tweets, config, run_dir=tmp_path, resume=True)
    assert resumed.steps == 8 and all(math.isfinite(h["loss"]) for h in resumed.history)


def test_enormous_learning_rate_diverges_with_a_clear_message(tmp_path, tok, tweets):
    config = TrainConfig(steps=10, save_every=1, **{**SMALL, "lr": 1e30, "warmup_ratio": 0.0, "max_grad_norm": 0.0})
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ of 10.*Try a lower learning rate"):
        train(lora_bert(), tok, tweets, config, run_dir=tmp_path)
    for path in checkpoints(tmp_path):  # every checkpoint left behind is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(str(path / trainer.PARAMS_FILE)).values())


# --------------------------------------------------------------------------- the optimization itself


def test_schedule_warmup_then_decay():
    f = trainer._schedule(TrainConfig(steps=10, warmup_ratio=0.2, schedule="cosine"))
    values = [f(s) for s in range(10)]
    assert values[:3] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert all(a > b for a, b in zip(values[2:], values[3:])) and values[-1] > 0
    g = trainer._schedule(TrainConfig(steps=10, warmup_ratio=0.0, schedule="linear"))
    assert [g(s) for s in (0, 5)] == [1.0, pytest.approx(0.5)]
    assert trainer._schedule(TrainConfig(steps=10, warmup_ratio=0.0, schedule="constant"))(9) == 1.0


def test_history_records_the_schedule(tok, tweets):
    result = train(lora_bert(), tok, tweets, TrainConfig(steps=5, **{**SMALL, "warmup_ratio": 0.4}))
    f = trainer._schedule(TrainConfig(steps=5, **{**SMALL, "warmup_ratio": 0.4}))
    assert [h["lr"] for h in result.history] == [pytest.approx(SMALL["lr"] * f(s)) for s in range(5)]
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.tokens == sum(h["tokens"] for h in result.history) > 0
    assert result.tokens_per_second == pytest.approx(result.tokens / result.seconds)
    assert [e["step"] for e in result.evals] == [2, 4, 5]
    assert set(result.evals[0]) == {"step", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_loss_noise",
                                    "overfitting"}
    assert result.final == {k[4:]: v for k, v in result.evals[-1].items() if k.startswith("val_") and k != "val_loss_noise"}
    assert result.evals[0]["val_loss_noise"] is None  # 2 steps: too few to measure the noise
    assert result.evals[-1]["val_loss_noise"] == pytest.approx(
        trainer.loss_noise([h["loss"] for h in result.history], 8, 8))
    assert result.train_size == 20 and result.epochs == pytest.approx(5 * 8 / 20)


def test_weight_decay_skips_biases_and_norms():
    model, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
    named = dict(model.named_parameters())
    optimizer = trainer._make_optimizer(model, named, TrainConfig(weight_decay=0.1))
    by_id = {id(p): n for n, p in named.items()}
    decayed = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    plain = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | plain == set(named) and not decayed & plain
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert "bert.encoder.layer.0.attention.self.query.bias" in plain
    assert "bert.embeddings.LayerNorm.weight" in plain


def test_method_optimizer_hook_is_used(tok, tweets):
    model = lora_bert()
    method = peftlab.adapters(model)["default"]
    made = {}

    def make_optimizer(m, *, lr, weight_decay, grad_accum):
        made["args"] = (m, lr, weight_decay, grad_accum)
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)

    object.__setattr__(method, "make_optimizer", make_optimizer)  # what a method like GaLore defines
    before = trainable(model)
    train(model, tok, tweets, TrainConfig(steps=2, **{**SMALL, "eval_every": 0}))
    assert made["args"] == (model, SMALL["lr"], 0.01, SMALL["grad_accum"])
    assert any(not torch.equal(before[n], p) for n, p in trainable(model).items())


def test_gradient_accumulation_matches_a_bigger_batch(tok, tweets):
    def run(batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
        model = lora_bert()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        settings = {**SMALL, "batch_size": batch_size, "grad_accum": grad_accum, "eval_every": 0}
        train(model, tok, tweets, TrainConfig(steps=3, **settings))
        return trainable(model)

    a, b = run(4, 2), run(8, 1)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_training(tok, tweets):
    plain, checkpointed = lora_bert(), lora_bert()
    train(plain, tok, tweets, TrainConfig(steps=3, **SMALL))
    train(checkpointed, tok, tweets, TrainConfig(steps=3, gradient_checkpointing=True, **SMALL))
    assert not checkpointed.is_gradient_checkpointing  # switched off again afterwards
    a, b = trainable(plain), trainable(checkpointed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_on_cpu_and_fp16_refused(tok, tweets):
    result = train(lora_bert(), tok, tweets, TrainConfig(steps=2, precision="bf16", **SMALL))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(lora_bert(), tok, tweets, TrainConfig(steps=2, precision="fp16", **SMALL))


def test_model_mode_and_frozen_model():
    model, tok = models.load("tiny-bert", num_labels=3)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        train(model, tok, get_task("tweets"), TrainConfig(steps=1, **SMALL))
    with pytest.raises(ConfigError, match="run_dir"):
        train(lora_bert(), tok, get_task("tweets"), TrainConfig(steps=1, save_every=1, **SMALL))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("schedule", "exp", "schedule must be one of cosine, linear, constant"),
    ("precision", "int8", "precision must be one of"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("warmup_ratio", 1.0, r"warmup_ratio must be in \[0, 1\)"),
    ("eval_examples", 0, "eval_examples must be None"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def _evals(val: list[float], train: list[float], noise: float | None = None) -> list[dict]:
    return [{"step": i + 1, "train_loss": t, "val_loss": v, "val_loss_noise": noise}
            for i, (v, t) in enumerate(zip(val, train))]


def test_overfitting_needs_a_material_rise():
    # the case: 0.412 -> 0.418 (1.5 %) with a validation loss whose noise is 0.02
    assert not trainer.overfitting(_evals([0.5, 0.412, 0.418], [0.6, 0.45, 0.40], noise=0.02))
    # the same rise against a noise of 0.002 is 3 standard errors: flagged
    assert trainer.overfitting(_evals([0.5, 0.412, 0.418], [0.6, 0.45, 0.40], noise=0.002))
    # more than twice the noise but not 1 % above the best: not flagged
    assert not trainer.overfitting(_evals([1.0, 0.900, 0.905], [1.0, 0.8, 0.5], noise=0.001))
    # a big rise while training loss rose too: not overfitting
    assert not trainer.overfitting(_evals([1.0, 0.9, 0.95], [1.0, 0.8, 0.9], noise=0.001))
    # unknown noise and a single rise: not enough evidence
    assert not trainer.overfitting(_evals([1.0, 0.9, 0.95], [1.0, 0.8, 0.5]))
    assert not trainer.overfitting(_evals([1.0, 0.9], [1.0, 0.8], noise=0.001))  # the best is the last


def test_overfitting_by_rises_at_consecutive_evaluations():
    val, train = [0.90, 0.80, 0.805, 0.81, 0.82], [1.0, 0.8, 0.7, 0.6, 0.5]
    # each rise is within the noise (0.05), but the loss rose at 3 evaluations in a row, 2.5 % above its best
    assert trainer.overfitting(_evals(val, train, noise=0.05))
    assert not trainer.overfitting(_evals(val[:4], train[:4], noise=0.05))  # 2 rises only
    assert not trainer.overfitting(_evals([0.90, 0.80, 0.83, 0.81, 0.82], train, noise=0.05))  # not monotone
    line = trainer.overfit_line(_evals(val, train, noise=0.005))
    assert "overfitting: validation loss 0.8200 is above its best 0.8000 (step 2), 4.0x its noise" in line


def test_loss_noise_recovers_the_spread_of_a_mean():
    # step losses: a falling trend plus noise of a mean over 16 examples whose losses spread 0.8
    g = torch.Generator().manual_seed(0)
    sigma, per_step, n_val = 0.8, 16, 160
    steps = 2000
    noise = torch.randn(steps, generator=g) * sigma / math.sqrt(per_step)
    losses = [2.0 * math.exp(-s / 300) + 0.3 + float(e) for s, e in enumerate(noise)]
    estimates = [trainer.loss_noise(losses[: end], per_step, n_val) for end in range(200, steps + 1, 50)]
    expected = sigma / math.sqrt(n_val)  # the standard error of a mean over n_val examples
    assert statistics.median(estimates) == pytest.approx(expected, rel=0.1)
    assert trainer.loss_noise([1.0, 0.9, 0.8], per_step, n_val) is None  # too few steps


def test_overfitting_is_flagged_in_the_output(tok, tweets, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "overfitting", lambda evals: len(evals) > 1)
    result = train(lora_bert(), tok, tweets, TrainConfig(steps=4, **{**SMALL, "progress": True}))
    out = capsys.readouterr().out
    assert "step 2/4: train_loss" in out and "val_accuracy" in out
    assert "overfitting: validation loss" in out
    assert result.overfitting and result.evals[-1]["overfitting"]


# --------------------------------------------------------------------------- causal LM


def test_causal_lm_training_on_a_user_file(tmp_path):
    rows = [{"prompt": f"what is {w}?", "response": f"{w} is a word."} for w in
            ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea", "sky", "fish"]]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task("file", data=path)
    tok = word_tokenizer([t for r in rows for t in r.values()])
    model = tiny_causal_lm(len(tok))
    config = TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_ratio=0.1, eval_every=15, max_length=32,
                         progress=False)
    result = train(model, tok, task, config)
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 2
    assert set(result.final) == {"loss", "perplexity", "rouge_l"}
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"] or result.final["rouge_l"] > 0


# --------------------------------------------------------------------------- peftlab train


def cli(*argv: str) -> int:
    from peftlab.cli import main

    return main(["train", *argv])


TINY = ("--task", "tweets", "--model", "tiny-bert", "--batch-size", "4", "--train-examples", "16",
        "--eval-examples", "8", "--max-length", "24", "--eval-every", "0", "--no-progress")


def test_cli_trains_saves_resumes_and_refuses(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(*TINY, "--steps", "2", "--save-every", "2", "--opt", "r=2", "--opt", 'target_modules=["query"]',
               "--run-dir", str(run_dir)) == 0
    out = capsys.readouterr().out
    assert "training the new classification head 'classifier'" in out and "accuracy" in out
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 2
    fresh, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
    peftlab.load(fresh, run_dir / "adapter")
    assert peftlab.adapters(fresh)["default"].r == 2

    assert cli(*TINY, "--steps", "3", "--run-dir", str(run_dir)) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert cli(*TINY, "--steps", "3", "--opt", "r=4", "--run-dir", str(run_dir), "--resume") == 2
    assert "different settings" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="changed steps"):  # the cosine schedule now spans 3 steps
        assert cli(*TINY, "--steps", "3", "--save-every", "2", "--opt", "r=2", "--opt", 'target_modules=["query"]',
                   "--run-dir", str(run_dir), "--resume") == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 3 and len(result["history"]) == 3
    assert cli(*TINY, "--steps", "1", "--run-dir", str(run_dir), "--overwrite") == 0
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 1


def test_cli_full_fine_tuning_and_user_data(tmp_path, capsys):
    data = tmp_path / "mine.csv"
    data.write_text("text,label,split\n" + "".join(f"text number {i},{'ab'[i % 2]},{'test' if i % 5 == 0 else 'train'}\n"
                                                   for i in range(40)))
    run_dir = tmp_path / "full"
    assert cli("--data", str(data), "--model", "tiny-bert", "--method", "full", "--steps", "2", "--batch-size", "4",
               "--no-progress", "--run-dir", str(run_dir)) == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()  # 'full' saves like any method
    out = capsys.readouterr().out
    assert "100.000% of the base model's" in out  # every parameter trains
    assert "test split (8 examples)" in out
    assert cli("--task", "chat", "--model", "minilm", "--run-dir", str(tmp_path / "x")) == 2
    assert "needs a causal-lm model" in capsys.readouterr().err
    assert cli("--task", "tweets", "--model", "tiny-bert", "--method", "nope", "--run-dir", str(tmp_path / "y")) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli("--model", "tiny-bert") == 2
    assert "--task" in capsys.readouterr().err


# --------------------------------------------------------------------------- run directories


def _fork_holding_the_lock(run_dir) -> int:
    """A child process that holds ``run_dir``'s lock (as a running ``peftlab train`` does)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with trainer.run_lock(run_dir):
                os.write(ready_w, b"1")
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


def test_a_second_writer_into_a_run_dir_fails_at_once(tmp_path, capsys, tok, tweets):
    run_dir = tmp_path / "run"
    pid = _fork_holding_the_lock(run_dir)
    try:
        began = time.monotonic()
        assert cli(*TINY, "--steps", "1", "--run-dir", str(run_dir)) == 2
        assert time.monotonic() - began < 10
        err = capsys.readouterr().err
        assert f"in use by another peftlab process (pid {pid})" in err
        assert sorted(p.name for p in run_dir.iterdir()) == [trainer.LOCK_FILE]  # nothing written
        with pytest.raises(ConfigError, match="in use by another peftlab process"):
            train(lora_bert(), tok, tweets, TrainConfig(steps=1, **SMALL), run_dir=run_dir)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # the kernel dropped the killed holder's lock: the folder is free again
    assert cli(*TINY, "--steps", "1", "--run-dir", str(run_dir)) == 0


def test_overwrite_refuses_a_folder_peftlab_did_not_create(tmp_path, capsys):
    run_dir = tmp_path / "mine"
    for name in ("model", "checkpoints", "adapter"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "precious.txt").write_text(name)
    assert cli(*TINY, "--steps", "1", "--run-dir", str(run_dir), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "was not created by peftlab train" in err and "nothing in it was deleted" in err
    for name in ("model", "checkpoints", "adapter"):
        assert (run_dir / name / "precious.txt").read_text() == name


def test_overwrite_removes_only_what_peftlab_wrote(tmp_path):
    run_dir = tmp_path / "run"
    assert cli(*TINY, "--steps", "2", "--save-every", "1", "--run-dir", str(run_dir)) == 0
    (run_dir / "notes.txt").write_text("mine")
    assert cli(*TINY, "--steps", "1", "--run-dir", str(run_dir), "--overwrite") == 0
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 1
    assert not (run_dir / "checkpoints").exists()  # the earlier run's, deleted; this run saved none


def test_a_failed_command_leaves_no_run_dir_behind(tmp_path, capsys):
    run_dir = tmp_path / "never"
    assert cli(*TINY, "--steps", "1", "--run-dir", str(run_dir), "--opt", "r=0") == 2
    assert "r must be" in capsys.readouterr().err
    assert not run_dir.exists()


def test_bench_overwrite_refuses_a_folder_bench_did_not_write(tmp_path, capsys):
    from peftlab.cli import main

    run_dir = tmp_path / "bench"
    (run_dir / "lora-peftlab-seed0").mkdir(parents=True)
    (run_dir / "results.jsonl").write_text("")
    (run_dir / "thesis.tex").write_text("mine")
    assert main(["bench", "--run-dir", str(run_dir), "--overwrite"]) == 2
    assert "thesis.tex" in capsys.readouterr().err and (run_dir / "thesis.tex").exists()


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(("file", "how"), [(trainer.PARAMS_FILE, "truncate"), (trainer.OPTIMIZER_FILE, "flip"),
                                           (trainer.STATE_FILE, "truncate")])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, tok, tweets, file, how):
    config = TrainConfig(steps=4, save_every=2, **SMALL)
    reference = lora_bert()
    full = train(reference, tok, tweets, config, run_dir=tmp_path / "a")
    train(lora_bert(), tok, tweets, config, run_dir=tmp_path / "b")
    _damage(tmp_path / "b" / "checkpoints" / "step-4" / file, how)
    assert trainer.intact(tmp_path / "b" / "checkpoints" / "step-4") is not None
    fresh = lora_bert(adapter_seed=1)
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint\(s\): step-4.*Resuming from .*step-2"):
        resumed = train(fresh, tok, tweets, config, run_dir=tmp_path / "b", resume=True)
    assert_identical(trainable(fresh), trainable(reference))
    assert losses(resumed) == losses(full)


def test_resume_with_every_checkpoint_damaged_is_an_error(tmp_path, tok, tweets):
    config = TrainConfig(steps=4, save_every=2, **SMALL)
    train(lora_bert(), tok, tweets, config, run_dir=tmp_path)
    for step in (2, 4):
        _damage(tmp_path / "checkpoints" / f"step-{step}" / trainer.PARAMS_FILE, "truncate")
    model = lora_bert()
    before = trainable(model)
    with pytest.raises(ConfigError, match=r"no intact checkpoint .*step-4: .*step-2: .*start a new run_dir"):
        train(model, tok, tweets, config, run_dir=tmp_path, resume=True)
    assert_identical(trainable(model), before)


def test_resume_refuses_changed_training_data(tmp_path, tok):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(40)))
    config = TrainConfig(steps=2, save_every=2, **{**SMALL, "train_examples": None})
    model, _ = models.load("tiny-bert", num_labels=2, with_tokenizer=False)
    peftlab.attach(model, "lora", r=2, target_modules=["query"], modules_to_save=["classifier"])
    train(model, tok, get_task("file", data=data), config, run_dir=tmp_path / "run")
    data.write_text(data.read_text().replace("text number 7,", "text number seven,"))
    before = trainable(model)
    with pytest.raises(ConfigError, match=r"the training data changed since it was written \(sha256: .*start a new"):
        train(model, tok, get_task("file", data=data), TrainConfig(steps=3, save_every=2, **{**SMALL, "train_examples": None}),
              run_dir=tmp_path / "run", resume=True)
    assert_identical(trainable(model), before)  # refused before anything was restored


def test_cli_resume_refuses_a_changed_data_file(tmp_path, capsys):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(40)))
    test = tmp_path / "test.csv"
    test.write_text("text,label\nheld out one,a\nheld out two,b\n")
    args = ("--data", str(data), "--test-data", str(test), "--model", "tiny-bert", "--batch-size", "4", "--max-length", "24", "--no-progress",
            "--eval-every", "0", "--run-dir", str(tmp_path / "run"))
    assert cli(*args, "--steps", "2", "--save-every", "2") == 0
    with data.open("a") as f:
        f.write("one more,a\n")
    assert cli(*args, "--steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert f"the data file {data.resolve()} changed since the run" in err and "start a new --run-dir" in err


def test_what_a_killed_checkpoint_writer_left_is_cleaned(tmp_path, tok, tweets):
    config = TrainConfig(steps=2, save_every=2, **SMALL)
    train(lora_bert(), tok, tweets, config, run_dir=tmp_path)
    root = tmp_path / "checkpoints"
    (root / f".step-9{files.MARK}tmp-1-ab").mkdir()
    (root / f".step-9{files.MARK}tmp-1-ab" / trainer.PARAMS_FILE).write_bytes(b"half")
    (root / ".tmp-step-3-123").mkdir()  # an older peftlab's temporary
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2"]
    with pytest.warns(UserWarning, match="changed steps"):
        train(lora_bert(), tok, tweets, TrainConfig(steps=3, save_every=2, **SMALL), run_dir=tmp_path, resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


# --------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_minilm_lora_on_tweets_beats_chance():
    model, tok = models.load("minilm", num_labels=3, seed=0)
    task = get_task("tweets")
    torch.manual_seed(0)
    peftlab.attach(model, "lora", r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    val = task.examples("validation")
    config = TrainConfig(steps=30, batch_size=16, lr=2e-3, eval_every=15, eval_examples=300, max_length=64,
                         progress=False)
    before = task.evaluate(model, tok, trainer.subset(val, 300, 0), batch_size=32, max_length=64)
    result = train(model, tok, task, config)
    majority = max(sum(e.label == c for e in val) for c in range(3)) / len(val)
    assert result.final["accuracy"] > max(majority, before["accuracy"]) + 0.03, (before, result.final)
    assert result.final["loss"] < before["loss"]


@pytest.mark.slow
def test_smollm2_lora_on_chat_lowers_the_answer_loss(tmp_path):
    model, tok = models.load("smollm2-135m")
    task = get_task("chat")
    torch.manual_seed(0)
    peftlab.attach(model, "lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    config = TrainConfig(steps=6, batch_size=8, lr=1e-3, eval_every=3, eval_examples=8, max_length=96,
                         save_every=3, progress=False)
    before = task.evaluate(model, tok, trainer.subset(task.examples("validation"), 8, 0), batch_size=8,
                           max_length=96, max_new_tokens=8)
    result = train(model, tok, task, config, run_dir=tmp_path)
    assert result.final["loss"] < before["loss"]
    assert result.final["perplexity"] == pytest.approx(math.exp(result.final["loss"]))
    assert 0.0 <= result.final["rouge_l"] <= 1.0
    assert [p.name for p in checkpoints(tmp_path)] == ["step-3", "step-6"]
