"""The embedded pretrained models with peftlab methods (real weights, offline)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab import models


def _encode(tok, texts):
    return tok(texts, padding=True, return_tensors="pt")


def test_minilm_lora_trains_saves_and_loads(tmp_path):
    model, tok = models.load("minilm", num_labels=3, seed=0)
    x = _encode(tok, ["I love driverless cars", "never getting in one of those", "cars exist"])
    y = torch.tensor([2, 0, 1])
    with torch.no_grad():
        base = model(**x).logits
    peftlab.attach(model, "lora", r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    s = peftlab.summary(model)
    assert 0 < s.percent < 1
    with torch.no_grad():
        assert torch.equal(model(**x).logits, base)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(**x).logits
    peftlab.save(model, tmp_path)
    fresh, _ = models.load("minilm", num_labels=3, seed=0)
    peftlab.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, trained, rtol=1e-5, atol=1e-5)
    peftlab.merge(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, trained, rtol=1e-4, atol=1e-4)


def test_minilm_bitfit():
    model, tok = models.load("minilm", num_labels=3, seed=0)
    peftlab.attach(model, "bitfit", modules_to_save=["classifier"])
    s = peftlab.summary(model)
    assert 0 < s.percent < 0.5  # biases + head of a 22.7M-parameter encoder


@pytest.mark.slow
def test_smollm2_lora_generate_save_load_merge(tmp_path):
    model, tok = models.load("smollm2-135m")
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        base_ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    peftlab.attach(model, "lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False), base_ids)
    for name, p in peftlab.adapter_parameters(model, "default").items():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    with torch.no_grad():
        adapted = model(**prompt).logits
    peftlab.save(model, tmp_path)
    fresh, _ = models.load("smollm2-135m", with_tokenizer=False)
    peftlab.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**prompt).logits, adapted, rtol=1e-5, atol=1e-5)
    merged = peftlab.merge_and_unload(fresh)
    with torch.no_grad():
        torch.testing.assert_close(merged(**prompt).logits, adapted, rtol=1e-4, atol=1e-4)
