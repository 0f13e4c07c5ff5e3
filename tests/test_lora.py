"""LoRA specifics: each layer kind, the maths, scaling, bias modes, patterns, merging."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab.methods.lora import LoRA
from tests.conftest import batch, out, perturb, tiny_bert, tiny_gpt2, tiny_llama


class Toy(nn.Module):
    """One layer of each supported kind."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 6)
        self.conv1 = nn.Conv1d(6, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, (3, 2), stride=(1, 2), padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids))  # (B, T, 6)
        h = self.conv1(h.transpose(1, 2))  # (B, 4, T)
        return self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))


IDS = torch.tensor([[1, 5, 0, 7, 19, 3]])


@pytest.mark.parametrize("target", ["emb", "lin", "conv1", "conv2"])
def test_each_layer_kind_identity_merge_and_maths(target):
    model = Toy()
    base = model(IDS).detach()
    peftlab.attach(model, "lora", r=2, alpha=4, target_modules=[target])
    assert torch.equal(model(IDS), base)
    perturb(peftlab.adapter_parameters(model, "default"))
    adapted = model(IDS).detach()
    assert not torch.allclose(adapted, base)
    layer = getattr(model, target)
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight("default")
    assert delta.shape == w0.shape
    # the merged weight computes what the unmerged adapter computes
    peftlab.merge(model)
    torch.testing.assert_close(layer.weight.detach(), w0 + delta)
    torch.testing.assert_close(model(IDS).detach(), adapted, rtol=1e-5, atol=1e-5)
    peftlab.unmerge(model)
    assert torch.equal(layer.weight, w0)


def test_linear_update_formula_and_scaling():
    lin = nn.Linear(5, 3)
    holder = nn.Sequential(lin)
    peftlab.attach(holder, "lora", r=2, alpha=6, target_modules=["0"])
    perturb(peftlab.adapter_parameters(holder, "default"))
    a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    x = torch.randn(4, 5)
    expected = x @ lin.weight.T + lin.bias + (x @ a.T @ b.T) * (6 / 2)
    torch.testing.assert_close(holder(x), expected)


def test_rslora_scale():
    m = nn.Sequential(nn.Linear(20, 16))
    peftlab.attach(m, "lora", r=16, alpha=8, rslora=True, target_modules=["0"])
    assert m[0].scaling("default") == pytest.approx(8 / math.sqrt(16))
    m2 = nn.Sequential(nn.Linear(20, 16))
    peftlab.attach(m2, "lora", r=16, alpha=8, target_modules=["0"])
    assert m2[0].scaling("default") == pytest.approx(8 / 16)


def test_init_a_random_b_zero():
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj"])
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.abs().sum() > 0
    assert torch.count_nonzero(q.lora_B["default"].weight) == 0


def test_gpt2_conv1d_merge_transposes():
    model = tiny_gpt2()
    x = batch()
    peftlab.attach(model, "lora", r=4, target_modules=["c_attn"])
    perturb(peftlab.adapter_parameters(model, "default"))
    unmerged = out(model, x)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.delta_weight("default").shape == layer.weight.shape  # (in, out) for Conv1D
    peftlab.merge(model)
    torch.testing.assert_close(out(model, x), unmerged, rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_patterns():
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={"v_proj": 3})
    l0, l1 = model.model.layers
    assert l0.self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    assert l1.self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
    assert l0.self_attn.v_proj.lora_A["default"].weight.shape[0] == 6
    assert l0.self_attn.v_proj.scaling("default") == pytest.approx(3 / 6)
    assert l1.self_attn.q_proj.scaling("default") == pytest.approx(8 / 2)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes(bias, tmp_path):
    model = tiny_bert()
    x = batch()
    base = out(tiny_bert(), x)
    peftlab.attach(model, "lora", r=2, target_modules=["query"], bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith(".bias")}
    if bias == "none":
        assert not biases
    elif bias == "lora_only":
        assert biases == {f"bert.encoder.layer.{i}.attention.self.query.bias" for i in range(2)}
    else:
        all_biases = {n for n, _ in tiny_bert().named_parameters() if n.endswith(".bias")}
        assert biases == all_biases
    perturb(peftlab.adapter_parameters(model, "default"))
    adapted = out(model, x)
    with peftlab.disabled(model):
        assert torch.equal(out(model, x), base)
    peftlab.save(model, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    if bias == "lora_only":
        assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    fresh = tiny_bert()
    peftlab.load(fresh, tmp_path)
    assert torch.equal(out(fresh, x), adapted)
    peftlab.detach(model)
    assert torch.equal(out(model, x), base)


def test_bias_all_on_model_without_biases_is_an_error():
    model = tiny_llama()
    with pytest.raises(peftlab.ConfigError, match="no bias"):
        peftlab.attach(model, "lora", target_modules=["q_proj"], bias="all")
    assert peftlab.adapters(model) == {}
    assert not any(isinstance(m, peftlab.api.AdapterLayer) for m in model.modules())


def test_repeated_merge_unmerge_does_not_drift_bf16():
    model = tiny_llama().to(torch.bfloat16)
    peftlab.attach(model, "lora", r=8, alpha=16, target_modules="all-linear")
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.5)  # large update: many binade changes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(100):
        peftlab.merge(model)
        peftlab.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bitwise: within 0 ulp, stricter than 1 ulp


def test_unmerge_after_adapter_changed_falls_back_to_subtraction():
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj"])
    perturb(peftlab.adapter_parameters(model, "default"))
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftlab.merge(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.mul_(2)
    peftlab.unmerge(model)
    layer = model.model.layers[0].self_attn.q_proj
    d = layer.delta_weight("default")
    torch.testing.assert_close(layer.weight.detach(), w0 + d / 2 - d, rtol=1e-5, atol=1e-6)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    perturb(peftlab.adapter_parameters(model, "default"))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="layers.1.self_attn.v_proj"):
        peftlab.merge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (torch.isnan(v).any() and torch.equal(v.isnan(), before[k].isnan()))
    assert not model.model.layers[0].self_attn.q_proj.__dict__.get("peftlab_merged")


def test_merge_and_unload_gives_plain_model():
    model = tiny_llama()
    x = batch()
    peftlab.attach(model, "lora", r=4, target_modules="all-linear")
    perturb(peftlab.adapter_parameters(model, "default"))
    expected = out(model, x)
    plain = peftlab.merge_and_unload(model)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in plain.modules())
    torch.testing.assert_close(out(plain, x), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in plain.parameters())


def test_all_linear_skips_output_head():
    model = tiny_llama()
    peftlab.attach(model, "lora", target_modules="all-linear")
    adapted = {p for p, _ in peftlab.adapters(model)["default"].adapted_layers(model, "default")}
    assert "lm_head" not in adapted
    assert len(adapted) == 2 * 7  # q k v o gate up down per block


def test_dropout_only_in_training():
    model = tiny_llama()
    x = batch()
    peftlab.attach(model, "lora", r=4, dropout=0.5, target_modules=["q_proj"])
    perturb(peftlab.adapter_parameters(model, "default"))
    model.eval()
    assert torch.equal(out(model, x), out(model, x))
    model.train()
    torch.manual_seed(0)
    a = model(**x).logits
    torch.manual_seed(1)
    b = model(**x).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"bias": "some"}, {"init": "pisa"},
                                 {"init": "loftq"}, {"init": "pissa", "dora": True}, {"layers_pattern": ["layers"]},
                                 {"rank_pattern": {"q": 0}}, {"rank": 4}])
def test_bad_options_are_clear(bad):
    with pytest.raises(peftlab.ConfigError):
        peftlab.get_method("lora", **bad)


def test_two_active_adapters_add_up():
    model = tiny_llama()
    x = batch()
    base = out(model, x)
    peftlab.attach(model, "lora", "a", r=2, target_modules=["q_proj"])
    perturb(peftlab.adapter_parameters(model, "a"), seed=1)
    da = out(model, x) - base
    peftlab.attach(model, "lora", "b", r=2, target_modules=["v_proj"])
    perturb(peftlab.adapter_parameters(model, "b"), seed=2)
    db = out(model, x) - base
    peftlab.use(model, "a", "b")
    both = out(model, x)
    assert not torch.allclose(both, base + da) and not torch.allclose(both, base + db)
    peftlab.merge(model)
    torch.testing.assert_close(out(model, x), both, rtol=1e-5, atol=1e-5)
    peftlab.use(model, "a")  # unmerges b exactly
    torch.testing.assert_close(out(model, x), base + da, rtol=1e-4, atol=1e-5)


def test_method_equality_and_defaults():
    assert LoRA() == peftlab.get_method("lora")
    assert LoRA().target_modules == ("all-linear",)


@pytest.mark.parametrize("method", ["lora", "dylora", "qlora"])
def test_dropout_follows_the_models_eval_mode_after_attach_and_load(method, tmp_path):
    """A from_pretrained model is in eval mode: an adapter with dropout attached or loaded onto it
    must not drop anything until the model is put in training mode (peft's behaviour)."""
    model = tiny_llama()  # eval mode
    opts = {"target_modules": ["q_proj", "v_proj"], "dropout": 0.5}
    peftlab.attach(model, method, **opts)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    assert not any(m.training for m in model.modules())
    x = torch.randint(2, 100, (2, 6))
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    peftlab.save(model, tmp_path)
    fresh = tiny_llama()
    peftlab.load(fresh, tmp_path)
    assert not any(m.training for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, a, atol=1e-5, rtol=1e-5)
    fresh.train()
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=x).logits, a, atol=1e-4)  # dropout acts in training
