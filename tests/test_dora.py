"""DoRA (weight-decomposed LoRA) against peft's implementation: outputs and gradients of the same
adapter, files both ways, merge/unmerge, and the norms against the plain formula."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.errors import ConfigError
from tests.conftest import perturb, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]
CASES = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
         "bert": (tiny_bert, ["query", "value", "output.dense"])}
X = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def _peft(arch: str, tmp_path=None, dropout: float = 0.0):
    import peft

    build, targets = CASES[arch]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                      lora_dropout=dropout, fan_in_fan_out=arch == "gpt2"))
    perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.3)
    if tmp_path is not None:
        pm.save_pretrained(tmp_path)
    return pm


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_dora_file_gives_peft_outputs_and_gradients(arch, tmp_path):
    pm = _peft(arch, tmp_path)
    model = CASES[arch][0]()
    peftlab.load(model, tmp_path, trainable=True)
    pm.eval()
    model.eval()
    out_p, out_l = pm(input_ids=X).logits, model(input_ids=X).logits
    torch.testing.assert_close(out_l, out_p, atol=1e-5, rtol=1e-5)
    out_p.pow(2).mean().backward()
    out_l.pow(2).mean().backward()
    theirs = {k.replace("base_model.model.", "").replace(".default", "").replace("vector.weight", "vector"): p.grad
              for k, p in pm.named_parameters() if p.requires_grad and "classifier" not in k}
    ours = {k.replace(".default", ""): p.grad for k, p in model.named_parameters()
            if p.requires_grad and "classifier" not in k}
    assert set(theirs) == set(ours) and any("lora_magnitude_vector" in k for k in ours)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peftlab_dora_file_loads_in_peft(arch, tmp_path):
    from peft import PeftModel

    build, targets = CASES[arch]
    model = build()
    peftlab.attach(model, "lora", r=4, dora=True, target_modules=targets)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    with torch.no_grad():
        want = model(input_ids=X).logits
    peftlab.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X).logits, want, atol=1e-5, rtol=1e-5)


def test_row_norms_equal_the_plain_formula_and_identity_at_init():
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, dora=True, target_modules=["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), peftlab.disabled(model):
        base = model(input_ids=X).logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, base, atol=1e-6, rtol=1e-6)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.5)
    w = layer.weight.float()
    plain = (w + layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
             * layer.scaling("default")).norm(dim=1)
    torch.testing.assert_close(layer.dora_norm("default"), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_unmerged_and_unmerge_is_exact(dtype):
    model = tiny_llama().to(dtype)
    peftlab.attach(model, "lora", r=4, dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(input_ids=X).logits.float()
        for _ in range(5):
            peftlab.merge(model)
            got = model(input_ids=X).logits.float()
            peftlab.unmerge(model)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # bit-exact after 5 cycles
    merged = peftlab.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=X).logits.float(), want, atol=tol, rtol=tol)


def test_dora_trains_and_refuses_layers_it_does_not_cover():
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, dora=True, target_modules=["q_proj", "v_proj"])
    model.train()
    opt = torch.optim.AdamW(peftlab.adapter_parameters(model, "default").values(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="dora=True is implemented for Linear"):
        peftlab.attach(tiny_llama(), "lora", dora=True, target_modules=["embed_tokens"])
