"""BitFit specifics."""

from __future__ import annotations

import pytest

import peftlab
from tests.conftest import batch, out, perturb, tiny_bert, tiny_llama


def test_trains_every_bias_and_nothing_else():
    model = tiny_bert()
    peftlab.attach(model, "bitfit")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tiny_bert().named_parameters() if n.endswith(".bias")}
    assert peftlab.summary(model).percent < 10


def test_subset_by_pattern():
    model = tiny_bert()
    peftlab.attach(model, "bitfit", target_modules=["query", "intermediate.dense"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"bert.encoder.layer.{i}.{m}.bias" for i in range(2)
                         for m in ("attention.self.query", "intermediate.dense")}


def test_model_without_biases_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(peftlab.ConfigError, match="no bias parameters.*LoRA"):
        peftlab.attach(model, "bitfit")
    assert peftlab.adapters(model) == {}
    assert all(p.requires_grad for p in model.parameters())  # untouched: a fresh model trains


def test_save_holds_only_biases(tmp_path):
    model = tiny_bert()
    peftlab.attach(model, "bitfit")
    perturb(peftlab.adapter_parameters(model, "default"))
    x = batch()
    expected = out(model, x)
    peftlab.save(model, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.") and k.endswith(".bias") for k in keys)
    fresh = tiny_bert()
    peftlab.load(fresh, tmp_path)
    assert (out(fresh, x) - expected).abs().max() == 0
