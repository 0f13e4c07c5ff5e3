"""LoRA on fused mixture-of-experts tensors (peft's ``target_parameters``): one low-rank update per
expert, checked against a hand-built reference and against peft's files both ways."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from peftlab.core.errors import ConfigError
from tests.conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 120, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_update_per_expert_equals_a_hand_built_reference():
    """The adapted model equals the base with W_e + s * B_e A_e written into every expert by hand,
    with peft's layout: A rows expert-major (e, r), B columns expert-minor (r, e)."""
    model = tiny_mixtral()
    peftlab.attach(model, "lora", r=2, alpha=6, target_modules=(), target_parameters=EXPERTS)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    x = ids()
    got = logits(model, x)
    ref = tiny_mixtral()
    state = dict(model.named_parameters())
    with torch.no_grad():
        for layer in range(2):
            for pname in ("gate_up_proj", "down_proj"):
                key = f"model.layers.{layer}.mlp.experts.lora_params.default.{pname}"
                a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
                w = getattr(ref.model.layers[layer].mlp.experts, pname)  # (experts, d_out, d_in)
                for e in range(4):
                    a_e = a[e * 2:(e + 1) * 2]  # (r, d_in)
                    b_e = b[:, e::4]  # (d_out, r)
                    w[e] += (b_e @ a_e) * (6 / 2)
    torch.testing.assert_close(got, logits(ref, x), atol=1e-5, rtol=1e-5)
    with peftlab.disabled(model):
        torch.testing.assert_close(logits(model, x), logits(tiny_mixtral(), x), rtol=0, atol=0)


def test_experts_train_and_only_adapter_tensors_change():
    model = tiny_mixtral()
    peftlab.attach(model, "lora", r=2, target_modules=["q_proj"], target_parameters=EXPERTS)
    params = peftlab.adapter_parameters(model, "default")
    assert sum("experts" in k for k in params) == 8  # 2 layers x 2 parameters x (A, B)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for k, p in params.items() if "lora_A" in k)  # B = 0: A's grad flows via B
    torch.optim.SGD(params.values(), lr=1.0).step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(params)
    peftlab.detach(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_target_parameters_file_loads_in_peftlab(tmp_path):
    import peft

    pm = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                             target_parameters=list(EXPERTS)))
    perturb({k: p for k, p in pm.named_parameters() if "lora_B" in k}, scale=0.3)
    pm.eval()
    x = ids()
    want = logits(pm, x)
    pm.save_pretrained(tmp_path)
    model = tiny_mixtral()
    peftlab.load(model, tmp_path)
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, logits(tiny_mixtral(), x), atol=1e-3)


def test_peftlab_target_parameters_file_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = tiny_mixtral()
    peftlab.attach(model, "lora", r=2, alpha=4, target_modules=(), target_parameters=EXPERTS[::-1])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    x = ids()
    want = logits(model, x)
    peftlab.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_mixtral(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, x), want, atol=1e-5, rtol=1e-5)


def test_all_linear_says_which_expert_parameters_it_leaves_out_and_skips_routers():
    model = tiny_mixtral()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftlab.attach(model, "lora")
    text = " ".join(str(w.message) for w in caught)
    assert "leaves out 4 fused expert parameter(s)" in text and "target_parameters" in text
    adapted = {p for p, _ in peftlab.adapters(model)["default"].adapted_layers(model, "default")}
    assert not any(".mlp.gate" in p for p in adapted)  # the router stays as it is
    assert any(p.endswith("self_attn.o_proj") for p in adapted)


def test_expert_updates_refuse_merge_and_dropout_and_change_nothing():
    model = tiny_mixtral()
    peftlab.attach(model, "lora", r=2, target_modules=(), target_parameters=EXPERTS)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    x = ids()
    before = logits(model, x)
    with pytest.raises(ConfigError, match="merging updates of expert parameters"):
        peftlab.merge(model)
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="dropout"):
        peftlab.attach(tiny_mixtral(), "lora", dropout=0.1, target_parameters=EXPERTS)
    with pytest.raises(ConfigError, match="matches no parameter"):
        peftlab.attach(tiny_mixtral(), "lora", target_parameters=("mlp.experts.nope",))
