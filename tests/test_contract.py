"""The contract every registered method keeps, on every tiny model it has an example for.

A new method joins this suite by registering itself and adding examples to
``conftest.METHOD_EXAMPLES``.
"""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab.core.method import method_class
from tests.conftest import METHOD_EXAMPLES, TINY, batch, cases, out, perturb

CASES = cases()
IDS = [f"{m}-{model}" for m, model in CASES]


def reference(method: str, model_name: str, seed: int = 0):
    """The base model as the method's adapters see it (``Method.prepare_base``: QLoRA's quantized base)."""
    return peftlab.get_method(method, **METHOD_EXAMPLES[method][model_name]).prepare_base(TINY[model_name](seed))


def build(method: str, model_name: str, seed: int = 0):
    model = TINY[model_name](seed)
    peftlab.attach(model, method, **METHOD_EXAMPLES[method][model_name])
    return model


def test_every_method_has_examples():
    missing = sorted(set(peftlab.methods()) - set(METHOD_EXAMPLES))
    assert not missing, f"add contract-test examples for {missing} to tests/conftest.py METHOD_EXAMPLES"


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_only_adapter_parameters_train(method, model_name):
    model = build(method, model_name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    owned = set(peftlab.adapter_parameters(model, "default"))
    assert trainable, "the adapter must have trainable parameters"
    assert trainable == owned
    s = peftlab.summary(model)
    assert s.trainable == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    if method_class(method).trains_base_weights:  # full-parameter training: the base trains itself
        from peftlab.core.slots import copy_layers

        copied = [path for path, _ in copy_layers(model)]
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert 0 < s.percent <= 100
        assert all(any(n.startswith(c + ".") for c in copied) for n in frozen), "only copied modules stay frozen"
    else:
        assert 0 < s.percent < 100


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_base_keys_unchanged(method, model_name):
    base = reference(method, model_name)
    ref = base.state_dict()
    model = build(method, model_name)
    sd = model.state_dict()
    assert set(ref) <= set(sd), f"base keys lost: {sorted(set(ref) - set(sd))[:5]}"
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k
    fresh = TINY[model_name](1)
    peftlab.attach(fresh, method, **METHOD_EXAMPLES[method][model_name])
    missing, unexpected = fresh.load_state_dict(ref, strict=False)
    assert not unexpected
    assert set(missing) == set(sd) - set(ref)


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_identity_at_init(method, model_name):
    x = batch(model=model_name)
    base = out(reference(method, model_name), x)
    model = build(method, model_name)
    if not method_class(method).identity_at_init:
        pytest.skip(f"{method} does not claim identity at init")
    torch.testing.assert_close(out(model, x), base, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_disabled_and_detach_give_exact_base(method, model_name):
    x = batch(model=model_name)
    base_model = reference(method, model_name)
    base = out(base_model, x)
    model = build(method, model_name)
    perturb(peftlab.adapter_parameters(model, "default"))
    adapted = out(model, x)
    assert not torch.allclose(adapted, base), "a perturbed adapter must change the output"
    if method_class(method).trains_base_weights:  # no copy of the base is kept: both refuse, nothing changes
        with pytest.raises(peftlab.AdapterStateError, match="without"), peftlab.disabled(model):
            pass
        with pytest.raises(peftlab.AdapterStateError, match="without a copy"):
            peftlab.detach(model)
        torch.testing.assert_close(out(model, x), adapted, rtol=0, atol=0)
        return
    with peftlab.disabled(model):
        torch.testing.assert_close(out(model, x), base, rtol=0, atol=0)
    torch.testing.assert_close(out(model, x), adapted, rtol=0, atol=0)
    peftlab.detach(model)
    torch.testing.assert_close(out(model, x), base, rtol=0, atol=0)
    assert set(model.state_dict()) == set(base_model.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in base_model.modules()]
    assert peftlab.adapters(model) == {}


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_save_load_round_trip(method, model_name, tmp_path):
    x = batch(model=model_name)
    model = build(method, model_name)
    perturb(peftlab.adapter_parameters(model, "default"))
    expected = out(model, x)
    peftlab.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    from peftlab.core.state import file_tensors

    table = file_tensors(model, "default")
    assert set(saved) == set(table)  # adapter tensors only
    for key, (_, t) in table.items():
        assert torch.equal(saved[key], t.detach().cpu()), key
    n_adapter = sum(t.numel() for t in peftlab.adapter_parameters(model, "default").values())
    if method_class(method).saves_trainable_parameters:
        assert sum(t.numel() for t in saved.values()) == n_adapter
    fresh = TINY[model_name](0)
    peftlab.load(fresh, tmp_path)
    # a derived form (an encoder's output) may round differently from the encoder run inside the model
    tol = 0 if method_class(method).saves_trainable_parameters else 1e-6
    torch.testing.assert_close(out(fresh, x), expected, rtol=tol, atol=tol)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference by default
    fresh2 = TINY[model_name](0)
    peftlab.load(fresh2, tmp_path, trainable=True)
    assert {n for n, p in fresh2.named_parameters() if p.requires_grad} == set(
        peftlab.adapter_parameters(fresh2, "default"))


def _merges_into_layers(model, name: str = "default") -> bool:
    """Whether merging adapter ``name`` writes base weights (False: its update already lives in
    base tensors it trains in place, as BitFit's and GaLore's do, so merging is a no-op)."""
    from peftlab.core.layer import MergeableLayer

    method = peftlab.adapters(model)[name]
    return any(isinstance(layer, MergeableLayer) for _, layer in method.adapted_layers(model, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_merged_equals_unmerged(method, model_name, dtype):
    if not method_class(method).mergeable:
        pytest.skip(f"{method} is not mergeable")
    x = batch(model=model_name)
    model = build(method, model_name).to(dtype)
    if not _merges_into_layers(model):
        pytest.skip(f"{method}'s merge is a no-op (its update lives in the base tensors): "
                    "test_no_op_merge checks that")
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = out(model, x)
    peftlab.merge(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "a merge of a perturbed adapter must change base weights"
    merged = out(model, x)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
    peftlab.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"unmerge did not restore {k} exactly"
    plain = peftlab.merge_and_unload(model)
    torch.testing.assert_close(out(plain, x), unmerged, rtol=tol, atol=tol)
    assert peftlab.adapters(plain) == {}
    assert set(plain.state_dict()) == set(TINY[model_name](0).state_dict())
    assert not any(peftlab.api.is_adapter_layer(m) for m in plain.modules())


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_no_op_merge(method, model_name):
    """A method whose update lives in the base tensors (trained in place): merging writes
    nothing, the merged model is the trained model, and merge_and_unload gives a plain model
    that computes what the adapted model computed (not the base)."""
    if not method_class(method).mergeable:
        pytest.skip(f"{method} is not mergeable")
    x = batch(model=model_name)
    base = out(reference(method, model_name), x)
    model = build(method, model_name)
    if _merges_into_layers(model):
        pytest.skip(f"{method} merges into base weights: test_merged_equals_unmerged checks that")
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.05)
    trained = out(model, x)
    assert not torch.allclose(trained, base), "the trained-in-place update must change the output"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a no-op merge wrote weights"
    torch.testing.assert_close(out(model, x), trained, rtol=0, atol=0)
    plain = peftlab.merge_and_unload(model)
    assert peftlab.adapters(plain) == {}
    assert not any(peftlab.api.is_adapter_layer(m) for m in plain.modules())
    assert set(plain.state_dict()) == set(TINY[model_name](0).state_dict())
    assert not any(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(out(plain, x), trained, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_one_step_changes_only_adapter(method, model_name):
    model = build(method, model_name).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors = {t.data_ptr() for t in peftlab.adapter_parameters(model, "default").values()}
    owned = {k for k, v in model.state_dict().items() if v.data_ptr() in tensors}  # tied keys too
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.01)  # let every gradient flow
    after_perturb = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = batch(model=model_name)
    logits = model(**x).logits
    logits.float().pow(2).mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, after_perturb[k])}
    assert changed, "one step must change the adapter"
    assert changed <= owned, f"non-adapter tensors changed: {sorted(changed - owned)[:5]}"
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before if k not in owned)


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_attach_on_meta_device(method, model_name):
    with torch.device("meta"):
        model = TINY[model_name](0)
    peftlab.attach(model, method, **METHOD_EXAMPLES[method][model_name])
    assert all(p.device.type == "meta" for p in model.parameters())
    real = build(method, model_name)
    assert peftlab.summary(model).trainable == peftlab.summary(real).trainable
    assert peftlab.summary(model).base == peftlab.summary(real).base


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_config_round_trips_through_json(method, model_name):
    m = peftlab.get_method(method, **METHOD_EXAMPLES[method][model_name])
    again = type(m).from_options(json.loads(json.dumps(m.options())))
    assert again == m
    model = build(method, model_name)
    config = json.loads(json.dumps(m.to_config(model, "default")))
    from peftlab.core.method import method_from_config

    rebuilt = method_from_config(config)
    assert type(rebuilt) is type(m)
    fresh = TINY[model_name](0)
    peftlab.attach(fresh, rebuilt)
    assert set(peftlab.adapter_parameters(fresh, "default")) == set(peftlab.adapter_parameters(model, "default"))


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=IDS)
def test_two_named_adapters(method, model_name):
    if not method_class(method).multi_adapter:
        pytest.skip(f"{method} keeps one adapter per model")
    x = batch(model=model_name)
    base = out(reference(method, model_name), x)
    model = build(method, model_name)
    perturb(peftlab.adapter_parameters(model, "default"), seed=1)
    a = out(model, x)
    opts = dict(METHOD_EXAMPLES[method][model_name])
    if method == "bitfit":
        opts["modules_to_save"] = []
    peftlab.attach(model, method, "other", **opts)
    assert peftlab.active(model) == ["other"]
    perturb(peftlab.adapter_parameters(model, "other"), seed=2)
    b = out(model, x)
    assert not torch.allclose(a, b)
    peftlab.use(model, "default")
    torch.testing.assert_close(out(model, x), a, rtol=0, atol=0)
    with peftlab.disabled(model):
        torch.testing.assert_close(out(model, x), base, rtol=0, atol=0)
    peftlab.detach(model, "default")
    assert list(peftlab.adapters(model)) == ["other"]
    peftlab.use(model, "other")
    torch.testing.assert_close(out(model, x), b, rtol=0, atol=0)
    peftlab.detach(model, "other")
    torch.testing.assert_close(out(model, x), base, rtol=0, atol=0)
