"""transformers.Trainer (and TRL's SFTTrainer where installed) train a peftlab-adapted model and
save only the adapter, which peftlab and peft load back to the same outputs."""

from __future__ import annotations

import os

import pytest
import torch

import peftlab
from peftlab import models
from peftlab.lab.tasks import get_task
from peftlab.lab.trainer import subset

pytest.importorskip("transformers")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
PROBE = ["what a great day", "this is awful, I hate it", "the weather is fine"]


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_bert(seed: int = 0):
    model, tok = models.load("tiny-bert", num_labels=3, seed=0)
    if tok is None:
        pytest.skip("the minilm package (its tokenizer) is not installed")
    torch.manual_seed(seed)
    peftlab.attach(model, "lora", r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    return model, tok


def dataset(tok):
    examples = subset(get_task("tweets").examples("train"), 32, 0)
    return [dict(tok(e.text, truncation=True, max_length=24), labels=e.label) for e in examples]


def trainer_for(model, tok, out, steps: int):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from peftlab.integrations.hf import PeftlabTrainer

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
                             save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return PeftlabTrainer(model=model, args=args, train_dataset=dataset(tok),
                          data_collator=DataCollatorWithPadding(tok))


def logits(model, tok) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tok(PROBE, padding=True, return_tensors="pt")).logits


def test_trainer_trains_and_saves_only_the_adapter(tmp_path):
    model, tok = lora_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_for(model, tok, tmp_path / "out", steps=4)
    trainer.train()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert sorted(moved) == sorted(start)  # every adapter tensor and the head trained
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and "lora" in n]
    assert not frozen
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)

    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) == ADAPTER_FILES  # no model.safetensors, no base weights
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert ADAPTER_FILES <= set(os.listdir(checkpoint))
    assert "model.safetensors" not in os.listdir(checkpoint)

    expected = logits(model, tok)
    fresh, _ = models.load("tiny-bert", num_labels=3, seed=0, with_tokenizer=False)
    peftlab.load(fresh, tmp_path / "final")
    torch.testing.assert_close(logits(fresh, tok), expected, rtol=0, atol=1e-6)

    from peft import PeftModel

    base, _ = models.load("tiny-bert", num_labels=3, seed=0, with_tokenizer=False)
    by_peft = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    torch.testing.assert_close(logits(by_peft, tok), expected, rtol=0, atol=1e-6)


def test_trainer_resumes_from_an_adapter_checkpoint(tmp_path):
    model, tok = lora_bert()
    trainer_for(model, tok, tmp_path / "a", steps=4).train()
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    other, _ = lora_bert(seed=1)  # another initialisation: what trains must come from the checkpoint
    from peftlab.integrations.hf import TRAINABLE_FILE

    assert TRAINABLE_FILE in os.listdir(tmp_path / "a" / "checkpoint-2")
    trainer_for(other, tok, tmp_path / "a", steps=4).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for n, p in other.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), reference[n], rtol=0, atol=1e-6, msg=n)


def test_trl_sft_trainer_saves_only_the_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.integrations.hf import adapter_trainer
    from tests.test_tasks import word_tokenizer

    texts = [f"Question {i} Answer {i % 3}" for i in range(16)]
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0))
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    from datasets import Dataset

    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                           report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = adapter_trainer(trl.SFTTrainer)(model=model, args=config, processing_class=tok,
                                              train_dataset=Dataset.from_dict({"text": texts}))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert ADAPTER_FILES <= files and not any(f.startswith("model") and f.endswith(".safetensors") for f in files)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_smoke(tmp_path, monkeypatch, stage):
    """ZeRO-2/3 with the example configs on one GPU: trains, and saves only the adapter."""
    pytest.importorskip("deepspeed")
    if not torch.cuda.is_available():
        pytest.skip("the DeepSpeed smoke run needs a GPU")
    from pathlib import Path

    from transformers import DataCollatorWithPadding, TrainingArguments

    from peftlab.integrations.hf import PeftlabTrainer

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        monkeypatch.setenv(key, value)
    model, tok = lora_bert()
    config = Path(__file__).resolve().parents[1] / "examples" / "deepspeed" / f"zero{stage}.json"
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=5e-3, save_strategy="no", report_to=[], disable_tqdm=True,
                             deepspeed=str(config))
    trainer = PeftlabTrainer(model=model, args=args, train_dataset=dataset(tok), data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) == ADAPTER_FILES
