"""Prefix tuning on the four model families peft supports it on (Llama, GPT-2, BERT, T5), with and
without the reparameterisation MLP: training, save/load, peft interop both ways, generate()."""

from __future__ import annotations

import pytest
import torch

import peftlab
from tests.conftest import perturb, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

N = 4
ARCHS = {"llama": (tiny_llama, "CAUSAL_LM"), "gpt2": (tiny_gpt2, "CAUSAL_LM"), "bert": (tiny_bert, "SEQ_CLS"),
         "t5": (tiny_t5, "SEQ_2_SEQ_LM")}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 128, shape, generator=torch.Generator().manual_seed(seed))


def batch(arch: str) -> dict[str, torch.Tensor]:
    x = ids(2, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])  # right padding: every family accepts it
    extra = {"decoder_input_ids": ids(2, 3, seed=5)} if arch == "t5" else {}
    return {"input_ids": x, "attention_mask": mask, **extra}


def labels(arch: str, b: dict[str, torch.Tensor]) -> torch.Tensor:
    if arch == "bert":
        return torch.tensor([0, 2])
    if arch == "t5":
        return b["decoder_input_ids"]
    return b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)


def logits(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The outputs at real positions (a padded position's logits are not defined by either library)."""
    with torch.no_grad():
        out = model(**b).logits
    if out.dim() == 3 and out.shape[1] == b["input_ids"].shape[1] and "decoder_input_ids" not in b:
        out = out * b["attention_mask"][..., None]
    return out


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "mlp"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trains_saves_and_loads(arch, projection, tmp_path):
    build, _ = ARCHS[arch]
    model = build(0)
    opts = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N, projection=projection, **opts)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "peftlab" not in k and "modules_to" not in k}
    params = peftlab.adapter_parameters(model, "default")
    model.train()
    opt = torch.optim.AdamW(params.values(), lr=3e-2)
    b = batch(arch)
    losses = []
    for _ in range(5):
        loss = model(**b, labels=labels(arch, b)).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in params.items() if "peftlab" in k)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # only the adapter trained
    model.eval()
    want = logits(model, b)
    with peftlab.disabled(model):
        assert not torch.allclose(logits(model, b), want, atol=1e-4)
    peftlab.save(model, tmp_path)
    fresh = build(0)
    peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, b), want, atol=1e-6, rtol=1e-6)


def _peft_refuses(peft_model, b) -> str | None:
    """peft's own refusal of a family on this transformers release (its reason), or None."""
    try:
        peft_model(**b)
    except ValueError as e:
        if "past key values" in str(e):
            return str(e)
        raise
    return None


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "mlp"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_file_loads_in_peftlab(arch, projection, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    build, task = ARCHS[arch]
    peft_model = get_peft_model(build(0), PrefixTuningConfig(task_type=task, num_virtual_tokens=N,
                                                             prefix_projection=projection))
    perturb(dict(peft_model.prompt_encoder.named_parameters()), scale=0.5)
    peft_model.eval()
    b = batch(arch)
    reason = _peft_refuses(peft_model, b)
    if reason:
        pytest.skip(f"peft cannot run prefix tuning on {arch} with this transformers release: {reason}")
    want = logits(peft_model, b)
    peft_model.save_pretrained(tmp_path)
    model = build(0)
    peftlab.load(model, tmp_path)
    torch.testing.assert_close(logits(model, b), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peftlab_file_loads_in_peft(arch, tmp_path):
    from peft import PeftModel

    build, _ = ARCHS[arch]
    model = build(0)
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N, init="random")
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.5)
    b = batch(arch)
    want = logits(model, b)
    peftlab.save(model, tmp_path)
    if arch == "bert":  # peft adds the classifier head of a SEQ_CLS model to what it loads
        pytest.skip("peft requires a saved classifier for SEQ_CLS prefix tuning; see the BERT oracle test")
    loaded = PeftModel.from_pretrained(build(0), tmp_path).eval()
    reason = _peft_refuses(loaded, b)
    if reason:
        pytest.skip(f"peft cannot run prefix tuning on {arch} with this transformers release: {reason}")
    torch.testing.assert_close(logits(loaded, b), want, atol=1e-5, rtol=1e-5)


def test_bert_prefix_equals_a_hand_filled_cache():
    """Oracle for BERT, where peft refuses on current transformers: BertModel run directly with a
    DynamicCache the test fills itself, the mask extended and the real tokens at positions N.."""
    from transformers import DynamicCache

    model = tiny_bert()
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N, init="random")
    (p,) = peftlab.adapter_parameters(model, "default").values()
    perturb({"p": p}, scale=0.5)
    b = batch("bert")
    got = logits(model, b)
    heads, dim = 4, 8
    kv = p.detach().view(N, 2 * 2, heads, dim)  # (N, layers x (key, value), heads, head_dim)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(kv[:, 2 * layer].permute(1, 0, 2)[None].expand(2, -1, -1, -1),
                     kv[:, 2 * layer + 1].permute(1, 0, 2)[None].expand(2, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), b["attention_mask"]], 1)
    pos = torch.arange(N, N + 6)[None].expand(2, -1)
    with torch.no_grad(), peftlab.disabled(model):
        arg = peftlab.core.inputs.cache_argument(model.bert)
        hidden = model.bert(input_ids=b["input_ids"], attention_mask=mask, position_ids=pos, **{arg: cache})
        want = model.classifier(model.dropout(hidden.pooler_output))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_t5_generate_per_step_scores_equal_a_no_cache_forward():
    model = tiny_t5()
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N, init="random")
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.5)
    x = ids(2, 5)
    out = model.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        for step, got in enumerate(out.logits):
            want = model(input_ids=x, decoder_input_ids=seq[:, :step + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_estimator_meta_probe_counts_prefix_tuning():
    from peftlab import estimate

    e = estimate.estimate("tiny-llama", "prefix_tuning", {"num_virtual_tokens": 12}, batch=2, seq=32)
    assert e.params["trainable"] == 12 * 2 * 2 * 2 * 8  # N x layers x (k, v) x kv heads x head_dim
