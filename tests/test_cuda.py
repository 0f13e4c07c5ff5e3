"""The CUDA paths: autocast training, exact merges in bf16, interop and cached generation on a GPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
Every test uses tiny models built from configs and an offline word-level tokenizer, so nothing
but torch, transformers and peft is needed there.
"""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab import models
from peftlab.lab.tasks import get_task
from peftlab.lab.trainer import TrainConfig, train
from tests.test_tasks import tiny_causal_lm, word_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROWS = [{"prompt": f"what is {w}?", "response": f"{w} is a word."} for w in
        ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea", "sky", "fish"]]


@pytest.fixture()
def qa(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    task = get_task("file", data=path)
    tok = word_tokenizer([t for r in ROWS for t in r.values()])
    return task, tok


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning", "houlsby"])
def test_training_on_cuda_lowers_the_loss_and_touches_only_the_adapter(qa, precision, method):
    task, tok = qa
    model = tiny_causal_lm(len(tok)).cuda()
    options = {"num_virtual_tokens": 4} if "tuning" in method else {}
    peftlab.attach(model, method, **options)
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    config = TrainConfig(steps=25, batch_size=4, lr=1e-2, warmup_ratio=0.1, eval_every=0, max_length=32,
                         precision=precision, progress=False)
    result = train(model, tok, task, config)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for k, v in model.named_parameters():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_repeated_merge_unmerge_is_exact_in_bf16_on_cuda():
    model, _ = models.load("tiny-llama", with_tokenizer=False)
    model = model.to("cuda", torch.bfloat16)
    peftlab.attach(model, "lora", r=8, alpha=16, target_modules="all-linear")
    with torch.no_grad():
        for p in peftlab.adapter_parameters(model, "default").values():
            p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(100):
        peftlab.merge(model)
        peftlab.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_merged_equals_unmerged_on_cuda_bf16():
    model, _ = models.load("tiny-llama", with_tokenizer=False)
    model = model.to("cuda", torch.bfloat16)
    peftlab.attach(model, "lora", r=8, target_modules="all-linear")
    with torch.no_grad():
        for p in peftlab.adapter_parameters(model, "default").values():
            p.normal_(0, 0.05)
    x = torch.randint(3, model.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        unmerged = model(input_ids=x).logits.float()
        peftlab.merge(model)
        merged = model(input_ids=x).logits.float()
    assert torch.allclose(merged, unmerged, atol=0.1, rtol=0.05), (merged - unmerged).abs().max()


def test_peft_loads_a_cuda_trained_adapter_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = models.load("tiny-llama", with_tokenizer=False)
    model = model.cuda()
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for p in peftlab.adapter_parameters(model, "default").values():
            p.normal_(0, 0.1)
    peftlab.save(model, tmp_path / "a")
    base, _ = models.load("tiny-llama", with_tokenizer=False)
    theirs = peft.PeftModel.from_pretrained(base.cuda(), tmp_path / "a").eval()
    x = torch.randint(3, model.config.vocab_size, (2, 12), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_cached_generation_equals_uncached_forwards_on_cuda(method):
    model, _ = models.load("tiny-llama", with_tokenizer=False)
    model = model.cuda()
    peftlab.attach(model, method, num_virtual_tokens=4)
    model.eval()
    x = torch.randint(3, model.config.vocab_size, (1, 6), device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        seq = x
        for _ in range(6):
            logits = model(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
