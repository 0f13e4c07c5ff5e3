"""Training on 2 processes (torchrun, gloo on loopback, CPU) gives the run of 1 process.

The global batch is the same (``batch_size`` is global: each of the 2 ranks takes half of every
micro-batch), dropout is off, so the per-step loss of DDP and FSDP2 runs equals the one-process
loss to float rounding: tolerance 1e-5 absolute on losses near 1.1 (fp32; the ranks pad their
halves to different lengths and sum in another order, nothing else differs). The adapter rank 0
saves loads into a fresh model and gives the trained model's outputs to 1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab import models
from peftlab.core.errors import ConfigError
from peftlab.lab import distributed
from tests import dist_worker

ROOT = Path(__file__).resolve().parents[1]
LORA = json.dumps({"r": 4, "target_modules": ["query", "value"]})
LOSS_TOL = 1e-5
STEPS, ACCUM, BATCH = 4, 2, 8  # dist_worker trains with batch_size 8


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def launch(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def torchrun(out: Path, method: str, options: str, strategy: str, steps: int, accum: int = 1,
             resume: bool = False) -> None:
    launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.dist_worker", str(out), method, options, strategy,
           str(steps), str(accum), "resume" if resume else "fresh")


def history(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "history.json").read_text())]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same worker in this process (world size 1)."""
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    try:
        dist_worker.main([str(out), "lora", LORA, "ddp", str(STEPS), str(ACCUM)])
    finally:
        torch.set_num_threads(threads)
    return out


def fresh_logits(adapter: Path) -> torch.Tensor:
    """The saved adapter on a fresh tiny-bert. A QLoRA adapter quantizes the full-precision base
    on load as in training (its targets and ``quantize_also`` travel in its config) and says so."""
    model, tok = models.load("tiny-bert", num_labels=3, seed=0)
    quantized = json.loads((adapter / "adapter_config.json").read_text()).get("peftlab_method") == "qlora"
    with pytest.warns(UserWarning, match="the base model was not quantized") if quantized else nullcontext():
        peftlab.load(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(**tok(dist_worker.PROBE, padding=True, return_tensors="pt")).logits


def test_ddp_matches_one_process_and_its_adapter_loads(tmp_path, one_process):
    torchrun(tmp_path, "lora", LORA, "ddp", STEPS, ACCUM)  # accumulation: no_sync on the first micro-batch
    assert len(history(tmp_path)) == STEPS
    assert history(tmp_path) == pytest.approx(history(one_process), abs=LOSS_TOL)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [r["examples"] for r in ranks] == [STEPS * ACCUM * BATCH // 2] * 2  # each rank half of every batch
    trained = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(trained, torch.load(one_process / "logits.pt"), rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh_logits(tmp_path / "adapter"), trained, rtol=0, atol=1e-6)
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-4"]

    # the checkpoint of 2 processes refuses a 1-process resume and says what to do
    with pytest.raises(ConfigError, match=r"written by a job of 2 process\(es\), this job has 1.*resume with 2"):
        dist_worker.main([str(tmp_path), "lora", LORA, "ddp", str(STEPS + 2), str(ACCUM), "resume"])


def test_fsdp2_matches_one_process_and_its_adapter_loads(tmp_path, one_process):
    """FSDP2 (fully_shard per BertLayer and the root; gloo on CPU)."""
    torchrun(tmp_path, "lora", LORA, "fsdp", STEPS, ACCUM)
    assert history(tmp_path) == pytest.approx(history(one_process), abs=LOSS_TOL)
    trained = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(trained, torch.load(one_process / "logits.pt"), rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh_logits(tmp_path / "adapter"), trained, rtol=0, atol=1e-6)


QLORA = json.dumps({"r": 4, "target_modules": ["query", "value"], "quantize_also": ["all-linear"]})
GALORE = json.dumps({"rank": 4, "update_proj_gap": 2, "target_modules": [r".*attention.*", r".*intermediate.*"]})


@pytest.mark.parametrize("method,options,strategy", [("qlora", QLORA, "fsdp"), ("galore", GALORE, "ddp")],
                         ids=["qlora-fsdp2", "galore-ddp"])
def test_method_on_two_processes_matches_one(tmp_path, method, options, strategy):
    """QLoRA sharded with FSDP2 (its uint8 codes and constants become frozen parameters that
    fully_shard splits: each rank holds about half of the 4-bit base) and GaLore under DDP (the
    projector of every rank is the SVD of the same all-reduced gradient, refreshed at step 2)."""
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    try:
        dist_worker.main([str(one), method, options, strategy, str(STEPS), "1"])
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    torchrun(two, method, options, strategy, STEPS)
    assert history(two) == pytest.approx(history(one), abs=LOSS_TOL)
    trained = torch.load(two / "logits.pt")
    torch.testing.assert_close(trained, torch.load(one / "logits.pt"), rtol=0, atol=1e-5)
    whole = json.loads((one / "rank-0.json").read_text())["quant_bytes"]
    shares = [json.loads((two / f"rank-{r}.json").read_text())["quant_bytes"] for r in (0, 1)]
    if method == "qlora":
        assert whole > 0 and sum(shares) >= whole  # dim-0 shards, the last one padded
        assert all(0.45 * whole < s < 0.6 * whole for s in shares), (whole, shares)
        torch.testing.assert_close(fresh_logits(two / "adapter"), trained, rtol=0, atol=1e-6)
    else:
        assert whole == 0 and shares == [0, 0]


@pytest.mark.slow
def test_fsdp2_resumes_a_sharded_run_exactly(tmp_path, one_process):
    """2 steps, then a resumed job to 4 from the sharded run's checkpoint (whole tensors,
    optimizer state re-sharded on load, each rank's RNG)."""
    torchrun(tmp_path, "lora", LORA, "fsdp", 2, ACCUM)
    shutil.rmtree(tmp_path / "adapter")
    torchrun(tmp_path, "lora", LORA, "fsdp", STEPS, ACCUM, resume=True)
    assert history(tmp_path) == pytest.approx(history(one_process), abs=LOSS_TOL)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), torch.load(one_process / "logits.pt"),
                               rtol=0, atol=1e-5)


def test_accelerate_launch_runs_peftlab_train_on_two_processes(tmp_path):
    """The example config of docs/scaling.md, 2 processes on CPU (accelerate runs torchrun)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's command line is not installed")
    run_dir = tmp_path / "run"
    done = launch(accelerate, "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp.yaml"),
                  "--main_process_port", str(free_port()), "-m", "peftlab.cli", "train", "--task", "tweets",
                  "--model", "tiny-bert", "--steps", "2", "--batch-size", "4", "--train-examples", "16",
                  "--eval-examples", "8", "--max-length", "24", "--no-progress", "--save-every", "2",
                  "--opt", "r=2", "--opt", 'target_modules=["query"]', "--run-dir", str(run_dir))
    assert done.stdout.count("on 2 processes (ddp)") == 1  # rank 0 alone reports
    state = json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {p.name for p in (run_dir / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 2 and all(h["tokens"] > 0 for h in result["history"])


def test_fsdp_refuses_a_method_that_cannot_shard():
    """Compacter's rule matrices are one parameter shared by every block (``fsdp_compatible = False``)."""
    model, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
    peftlab.attach(model, "lora", r=2, target_modules=["query"])
    distributed.check_strategy(model, "fsdp")  # LoRA shards
    peftlab.attach(model, "compacter", name="phm")
    with pytest.raises(ConfigError, match=r"adapter 'phm' \(compacter\) cannot be sharded with FSDP: its PHM rule "
                                          r"matrices are one parameter shared .*; use --strategy ddp \(torchrun\) "
                                          r"or DeepSpeed ZeRO-2 instead"):
        distributed.check_strategy(model, "fsdp")
    distributed.check_strategy(model, "ddp")
    with pytest.raises(ConfigError, match="strategy must be one of ddp, fsdp"):
        distributed.check_strategy(model, "zero")


def test_batch_size_must_split_over_the_processes(monkeypatch):
    from peftlab.lab import trainer
    from peftlab.lab.tasks import get_task

    monkeypatch.setattr(distributed, "current", lambda: distributed.Dist(rank=0, world=4))
    model, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
    with pytest.raises(ConfigError, match=r"batch_size 6 is the global micro-batch.*multiple of the 4 processes; "
                                          r"use batch_size 4"):
        trainer.train(model, None, get_task("tweets"), trainer.TrainConfig(steps=1, batch_size=6, progress=False))
