"""Bottleneck adapters (Houlsby, Pfeiffer), Compacter, AdapterFusion, AdapterDrop and parallel
multi-task inference: placement, closed-form sizes, exact equivalences, files and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core.errors import AdapterFileError, AdapterStateError, ConfigError, TargetError
from peftlab.methods.bottleneck import adapter_drop
from peftlab.methods.fusion import fuse, fusion_weights, parallel_forward, prune_fusion
from tests.conftest import batch, out, perturb, tiny_bert, tiny_gpt2, tiny_llama

D = 32  # hidden size of the tiny models


def new_keys(model, base):
    return set(model.state_dict()) - set(base.state_dict())


# ----------------------------------------------------------------------------- placement and sizes
def test_houlsby_and_pfeiffer_exact_keys_on_bert():
    m = peftlab.attach(tiny_bert(), "houlsby", reduction_factor=4)
    parts = ("down.weight", "down.bias", "up.weight", "up.bias")
    sites = [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dense", "output.dense")]
    assert new_keys(m, tiny_bert()) == {f"{s}.adapters.default.{p}" for s in sites for p in parts}
    m = peftlab.attach(tiny_bert(), "pfeiffer", layer_norm=True)
    parts += ("norm.weight", "norm.bias")
    assert new_keys(m, tiny_bert()) == {f"bert.encoder.layer.{i}.output.dense.adapters.default.{p}"
                                        for i in range(2) for p in parts}


@pytest.mark.parametrize(("factory", "out_paths"), [
    (tiny_llama, ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj")),
    (tiny_gpt2, ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj")),
])
def test_map_places_adapters_on_llama_and_gpt2(factory, out_paths):
    m = peftlab.attach(factory(), "houlsby", reduction_factor=8, parallel=True)
    assert {k.split(".adapters.")[0] for k in new_keys(m, factory())} == {p.format(i=i) for p in out_paths for i in range(2)}


@pytest.mark.parametrize(("method", "rf", "layer_norm", "sites"), [
    ("houlsby", 4, False, 4), ("houlsby", 16, True, 4), ("pfeiffer", 2, False, 2), ("pfeiffer", 8, True, 2)])
def test_parameter_count_closed_form(method, rf, layer_norm, sites):
    m = peftlab.attach(tiny_llama(), method, reduction_factor=rf, layer_norm=layer_norm)
    b = D // rf
    per_site = 2 * D * b + b + D + (2 * D if layer_norm else 0)
    assert peftlab.summary(m).trainable == sites * per_site


def test_compacter_parameter_count_and_phm_weight():
    m = peftlab.attach(tiny_bert(), "compacter", phm_dim=4, phm_rank=2, reduction_factor=2)
    n, r, b = 4, 2, 16
    per_site = r * (D + b) + b + r * (b + D) + D
    assert peftlab.summary(m).trainable == 4 * per_site + n ** 3  # the rule is shared by every site
    m2 = peftlab.attach(tiny_bert(), "compacter", placement=["ffn"])  # Compacter++
    b = 4  # 32 // 32 rounded up to phm_dim
    assert peftlab.summary(m2).trainable == 2 * (1 * (D + b) + b + 1 * (b + D) + D) + 4 ** 3
    layers = [layer for _, layer in m.named_modules() if hasattr(layer, "adapters")]
    owner = layers[0].adapters["default"]
    other = layers[3].adapters["default"]
    assert other.shared_rule() is owner.rule
    down = other.down
    perturb({"t": down.t, "s": down.s})
    explicit = sum(torch.kron(owner.rule[i], down.s[i] @ down.t[i]) for i in range(n))
    torch.testing.assert_close(down.weight(owner.rule), explicit, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- maths
def _act(name):
    return {"swish": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu}[name]


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_adapter_equals_hand_written_hooks(parallel):
    x = batch()
    model = peftlab.attach(tiny_llama(), "houlsby", reduction_factor=4, parallel=parallel, layer_norm=True, scaling=0.5)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.2)
    got = out(model, x)
    ref = tiny_llama()
    state = {k: v for k, v in model.state_dict().items() if ".adapters." in k}
    seen = {}
    for i in range(2):
        for inp, outp in (("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")):
            key = f"model.layers.{i}.{outp}.adapters.default."
            block = ref.model.layers[i]

            def grab(mod, args, kwargs, key=key):
                seen[key] = args[0] if args else kwargs["hidden_states"]

            def add(mod, args, output, key=key):
                src = seen[key] if parallel else output
                z = torch.nn.functional.layer_norm(src, (D,), state[key + "norm.weight"], state[key + "norm.bias"])
                z = torch.nn.functional.silu(z @ state[key + "down.weight"].T + state[key + "down.bias"])
                return output + 0.5 * (z @ state[key + "up.weight"].T + state[key + "up.bias"])

            block.get_submodule(inp).register_forward_pre_hook(grab, with_kwargs=True)
            block.get_submodule(outp).register_forward_hook(add)
    torch.testing.assert_close(got, out(ref, x), rtol=1e-5, atol=1e-5)


def test_stacked_adapters_apply_in_order():
    x = batch()
    model = peftlab.attach(tiny_gpt2(), "houlsby", "a")
    perturb(peftlab.adapter_parameters(model, "a"))
    a = out(model, x)
    peftlab.attach(model, "pfeiffer", "b")  # zero: stacking it changes nothing
    peftlab.use(model, "a", "b")
    torch.testing.assert_close(out(model, x), a, rtol=0, atol=0)
    perturb(peftlab.adapter_parameters(model, "b"), seed=5)
    both = out(model, x)
    peftlab.use(model, "b")
    assert not torch.allclose(both, a) and not torch.allclose(both, out(model, x))


def test_half_precision_base_keeps_fp32_adapters():
    model = tiny_llama().to(torch.bfloat16)
    peftlab.attach(model, "compacter", parallel=True)
    assert all(p.dtype == torch.float32 for p in peftlab.adapter_parameters(model, "default").values())
    assert out(model, batch()).isfinite().all()


# ----------------------------------------------------------------------------- AdapterDrop
def test_drop_first_and_inference_drop_equal_zeroed_lower_adapters():
    x = batch()
    m = peftlab.attach(tiny_bert(), "houlsby", drop_first=1)
    assert not any(".layer.0." in k for k in peftlab.adapter_parameters(m, "default"))
    model = peftlab.attach(tiny_llama(), "houlsby")
    perturb(peftlab.adapter_parameters(model, "default"))
    full = out(model, x)
    with adapter_drop(model, 1):
        dropped = out(model, x)
    torch.testing.assert_close(out(model, x), full, rtol=0, atol=0)  # restored after the block
    with torch.no_grad():
        for k, p in peftlab.adapter_parameters(model, "default").items():
            if k.startswith("model.layers.0."):
                p.zero_()
    torch.testing.assert_close(dropped, out(model, x), rtol=0, atol=0)
    with adapter_drop(model, 2), peftlab.disabled(model):
        base = out(model, x)
    with adapter_drop(model, 2):
        torch.testing.assert_close(out(model, x), base, rtol=0, atol=0)


def test_robust_drop_draws_k_per_training_step():
    x = batch()
    model = peftlab.attach(tiny_llama(), "pfeiffer", robust_drop=True)
    perturb(peftlab.adapter_parameters(model, "default"))
    expected = {}
    for k in range(2):
        with adapter_drop(model, k):
            expected[k] = out(model, x)
    state = model.model.layers[1].mlp.down_proj.adapters["default"].drop_state
    model.train()  # tiny llama has no dropout: training mode changes only the drop
    torch.manual_seed(0)
    ks = []
    for _ in range(8):
        with torch.no_grad():
            y = model(**x).logits.float()
        ks.append(state.k)
        torch.testing.assert_close(y, expected[state.k], rtol=0, atol=0)
    assert set(ks) == {0, 1}


def test_drop_bad_k():
    model = peftlab.attach(tiny_llama(), "houlsby")
    with pytest.raises(ConfigError, match="0..2"), adapter_drop(model, 3):
        pass
    with pytest.raises(ConfigError, match="has 2 blocks"):
        peftlab.attach(tiny_llama(), "houlsby", drop_first=2)


# ----------------------------------------------------------------------------- parallel multi-task inference
def _three_tasks(factory, **kw):
    model = factory()
    for i, method in enumerate(("houlsby", "pfeiffer", "compacter")):
        peftlab.attach(model, method, f"t{i}", **kw)
        perturb(peftlab.adapter_parameters(model, f"t{i}"), seed=10 + i)
    return model


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("drop", [0, 1, 2])
def test_parallel_forward_equals_each_task_alone(factory, drop):
    heads = {"modules_to_save": ["classifier"]} if factory is tiny_bert else {}
    model = _three_tasks(factory, parallel=factory is tiny_gpt2, **heads)
    x = batch(size=3)
    names = ["t0", "t1", "t2"]
    alone = []
    with adapter_drop(model, drop):
        for n in names:
            peftlab.use(model, n)
            alone.append(out(model, x))
        blocks = model.bert.encoder.layer if factory is tiny_bert else \
            model.model.layers if factory is tiny_llama else model.transformer.h
        sizes = []
        hooks = [b.register_forward_hook(lambda mod, a, o: sizes.append((o[0] if isinstance(o, tuple) else o).shape[0]))
                 for b in blocks]
        with torch.no_grad():
            together = parallel_forward(model, x, names)
        for h in hooks:
            h.remove()
    assert peftlab.active(model) == ["t2"]  # the active set is given back
    for got, ref in zip(together, alone):
        torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)
    assert sizes == [3] * drop + [9] * (2 - drop)  # the shared part ran once, the rest per task
    if factory is tiny_bert:  # the task heads differ even where every block is shared
        assert not torch.allclose(alone[0], alone[1])


# ----------------------------------------------------------------------------- AdapterFusion
def _trained(factory=tiny_bert, methods=("houlsby", "houlsby"), **kw):
    model = factory()
    for i, method in enumerate(methods):
        peftlab.attach(model, method, f"task{i}", reduction_factor=4, **kw)
        perturb(peftlab.adapter_parameters(model, f"task{i}"), seed=20 + i, scale=0.3)
    return model


def test_fusion_freezes_members_and_counts():
    model = _trained()
    fuse(model, ["task0", "task1"], modules_to_save=["classifier"])
    assert peftlab.active(model) == ["fusion"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(peftlab.adapter_parameters(model, "fusion"))
    fusion_only = sum(p.numel() for k, p in peftlab.adapter_parameters(model, "fusion").items() if "classifier" not in k)
    assert fusion_only == 4 * (2 * (D * D + D) + D * D)  # query, key (with bias), value per site
    assert all(".members." not in k for k in trainable)
    layer = model.bert.encoder.layer[1].output.dense
    for n in ("task0", "task1"):
        for k, v in layer.adapters[n].state_dict().items():
            assert torch.equal(layer.adapters["fusion"].members[n].state_dict()[k], v)


def test_fusion_at_init_is_weighted_mean_and_single_member_equals_adapter():
    x = batch()
    model = _trained(tiny_llama)
    peftlab.use(model, "task0")
    a = out(model, x)
    fuse(model, ["task0"], name="solo")  # softmax over one adapter is exactly 1, V = I
    torch.testing.assert_close(out(model, x), a, rtol=1e-6, atol=1e-6)
    fuse(model, ["task0", "task1"])
    out(model, x)
    weights = fusion_weights(model)
    assert len(weights) == 4
    for w in weights.values():
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-6)
        assert all(abs(v - 0.5) < 0.05 for v in w.values())  # near-uniform at init
    unit = model.model.layers[0].mlp.down_proj.adapters["fusion"]
    h = torch.randn(2, 3, D)
    a0, a1 = unit.members["task0"](h, None), unit.members["task1"](h, None)
    y = unit(h, None)
    w = torch.softmax(torch.stack([(unit.query(h) * unit.key(ai)).sum(-1) for ai in (a0, a1)], -1), -1)
    torch.testing.assert_close(y, w[..., :1] * a0 + w[..., 1:] * a1, rtol=1e-5, atol=1e-5)


def test_fusion_of_fresh_members_is_identity():
    x = batch()
    model = peftlab.attach(tiny_gpt2(), "fusion", adapters={"a": {"method": "houlsby"}, "b": {"method": "compacter"}})
    torch.testing.assert_close(out(model, x), out(tiny_gpt2(), x), rtol=0, atol=0)


def test_fusion_saves_and_loads_as_one_directory(tmp_path):
    x = batch()
    model = _trained(methods=("houlsby", "compacter"), parallel=True)
    fuse(model, ["task0", "task1"], modules_to_save=["classifier"])
    perturb(peftlab.adapter_parameters(model, "fusion"), seed=7)
    expected = out(model, x)
    peftlab.save(model, tmp_path, "fusion")
    folder = tmp_path / "fusion"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(folder / "adapter_model.safetensors")
    members = {n: sum(t.numel() for t in peftlab.adapter_parameters(model, n).values()) for n in ("task0", "task1")}
    own = sum(t.numel() for t in peftlab.adapter_parameters(model, "fusion").values())
    assert sum(t.numel() for t in saved.values()) == own + sum(members.values())
    config = json.loads((folder / "adapter_config.json").read_text())
    assert list(config["adapters"]) == ["task0", "task1"] and config["adapters"]["task1"]["method"] == "compacter"
    fresh = tiny_bert()
    peftlab.load(fresh, folder, "fusion")
    assert list(peftlab.adapters(fresh)) == ["fusion"]
    torch.testing.assert_close(out(fresh, x), expected, rtol=0, atol=0)


def test_fusion_drop_prunes_least_used_member():
    x = batch()
    model = _trained(tiny_llama, methods=("pfeiffer", "pfeiffer", "pfeiffer"))
    fuse(model, ["task0", "task1", "task2"])
    with torch.no_grad():  # make the fusion prefer task2, then task0
        for _, layer in model.named_modules():
            if hasattr(layer, "adapters") and "fusion" in layer.adapters:
                unit = layer.adapters["fusion"]
                unit.query.weight.zero_()
                unit.query.bias.fill_(1.0)  # score_i = sum of adapter i's output
                unit.key.weight.copy_(torch.eye(D))
                for bump, n in ((1.0, "task0"), (0.0, "task1"), (2.0, "task2")):
                    unit.members[n].up.bias.add_(bump)
    out(model, x)
    mean = {n: sum(w[n] for w in fusion_weights(model).values()) for n in ("task0", "task1", "task2")}
    assert min(mean, key=mean.get) == "task1"
    assert prune_fusion(model, keep=2) == ["task1"]
    assert list(peftlab.adapters(model)["fusion"].adapters) == ["task0", "task2"]
    assert not any(".members.task1." in k for k in model.state_dict())
    assert out(model, x).isfinite().all()
    with pytest.raises(ConfigError, match="1..2"):
        out(model, x)
        prune_fusion(model, keep=3)


def test_fusion_bad_input():
    model = _trained(methods=("houlsby", "pfeiffer"))
    with pytest.raises(AdapterStateError, match=r"\['nope'\]"):
        fuse(model, ["task0", "nope"])
    with pytest.raises(ConfigError, match="task0.*task1.*different places"):
        fuse(model, ["task0", "task1"])
    peftlab.attach(model, "lora", "lo", target_modules=["query"])
    with pytest.raises(ConfigError, match="lo"):
        fuse(model, ["task0", "lo"])
    assert "fusion" not in peftlab.adapters(model)
    with pytest.raises(ConfigError, match="no adapters to fuse"):
        peftlab.attach(tiny_bert(), "fusion")
    with pytest.raises(ConfigError, match="bottleneck adapters"):
        peftlab.get_method("fusion", adapters={"a": {"method": "lora"}})


# ----------------------------------------------------------------------------- architectures, options, files
def test_unknown_architecture_and_override():
    x = batch()
    ref = peftlab.attach(tiny_llama(), "houlsby")
    perturb(peftlab.adapter_parameters(ref, "default"))
    mystery = tiny_llama()
    mystery.config.model_type = "mystery"  # no table names it: the sites are found from its structure
    peftlab.attach(mystery, "houlsby")
    with torch.no_grad():
        for k, p in peftlab.adapter_parameters(mystery, "default").items():
            p.copy_(ref.state_dict()[k])
    torch.testing.assert_close(out(mystery, x), out(ref, x), rtol=0, atol=0)
    flat = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(TargetError, match="found no transformer blocks.*architecture="):
        peftlab.attach(flat, "houlsby")
    assert peftlab.adapters(flat) == {}
    model = tiny_llama()
    arch = {"blocks": "model.layers", "attn_out": "self_attn.o_proj", "ffn_out": "mlp.down_proj",
            "attn_in": "self_attn", "ffn_in": "mlp"}
    peftlab.attach(model, "houlsby", architecture=arch)
    with torch.no_grad():
        for k, p in peftlab.adapter_parameters(model, "default").items():
            p.copy_(ref.state_dict()[k])
    torch.testing.assert_close(out(model, x), out(ref, x), rtol=0, atol=0)
    with pytest.raises(TargetError, match="nonexistent"):
        peftlab.attach(tiny_llama(), "houlsby", architecture={**arch, "ffn_out": "mlp.nonexistent"})
    with pytest.raises(ConfigError, match="missing"):
        peftlab.get_method("houlsby", architecture={"blocks": "h"})


@pytest.mark.parametrize("options", [{"reduction_factor": 0}, {"placement": ["attn", "x"]}, {"non_linearity": "foo"},
                                     {"drop_first": -1}, {"phm_dim": 0}])
def test_bad_options(options):
    with pytest.raises(ConfigError):
        peftlab.get_method("compacter", **options)


def test_compacter_width_not_divisible():
    with pytest.raises(ConfigError, match="phm_dim"):
        peftlab.attach(tiny_bert(), "compacter", phm_dim=5)


def test_mismatched_file_is_rejected(tmp_path):
    model = peftlab.attach(tiny_bert(), "houlsby", reduction_factor=4)
    peftlab.save(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    meta["peftlab_options"] = meta["peftlab_options"].replace('"reduction_factor": 4', '"reduction_factor": 8')
    save_file(tensors, weights, metadata=meta)
    fresh = tiny_bert()
    with pytest.raises(AdapterFileError, match="mis-shaped"):
        peftlab.load(fresh, tmp_path)
    assert peftlab.adapters(fresh) == {}
    with pytest.raises(AdapterFileError):
        peftlab.load(tiny_gpt2(), tmp_path)


def test_not_mergeable():
    model = peftlab.attach(tiny_bert(), "pfeiffer")
    with pytest.raises(AdapterStateError, match="cannot be merged"):
        peftlab.merge(model)


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_minilm_sizes_identity_and_learning():
    from peftlab import models

    base, tok = models.load("minilm", num_labels=3)
    x = tok(["what a lovely day", "this is terrible"], return_tensors="pt", padding=True)
    ref = out(base, dict(x))
    d, n_blocks = 384, 6
    expected = {"houlsby": 2 * n_blocks * (2 * d * 24 + 24 + d), "pfeiffer": n_blocks * (2 * d * 24 + 24 + d),
                "compacter": 2 * n_blocks * ((d + 12) + 12 + (12 + d) + d) + 4 ** 3}
    for method, count in expected.items():
        model, _ = models.load("minilm", num_labels=3)
        peftlab.attach(model, method)
        assert peftlab.summary(model).trainable == count
        torch.testing.assert_close(out(model, dict(x)), ref, rtol=0, atol=0)
    model, _ = models.load("minilm", num_labels=3)
    peftlab.attach(model, "houlsby", modules_to_save=["classifier"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    labels = torch.tensor([2, 0])
    losses = []
    for _ in range(15):
        loss = model(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_deepcopy_and_pickle_keep_shared_rule(tmp_path):
    import copy

    x = batch()
    model = peftlab.attach(tiny_bert(), "compacter", parallel=True)
    perturb(peftlab.adapter_parameters(model, "default"))
    expected = out(model, x)
    twin = copy.deepcopy(model)
    layers = [m for m in twin.modules() if hasattr(m, "adapters")]
    assert layers[-1].adapters["default"].shared_rule() is layers[0].adapters["default"].rule
    torch.testing.assert_close(out(twin, x), expected, rtol=0, atol=0)
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(out(again, x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_defaults_identity_and_sizes():
    from peftlab import models

    base, _ = models.load("smollm2-135m", with_tokenizer=False)
    x = {"input_ids": torch.randint(10, 1000, (1, 12))}
    ref = out(base, x)
    d, n_blocks = 576, 30
    m = 16  # 576 // 32 = 18, rounded down to a multiple of phm_dim 4
    expected = {"houlsby": 2 * n_blocks * (2 * d * 36 + 36 + d), "pfeiffer": n_blocks * (2 * d * 36 + 36 + d),
                "compacter": 2 * n_blocks * ((d + m) + m + (m + d) + d) + 4 ** 3}
    for method, count in expected.items():
        model, _ = models.load("smollm2-135m", with_tokenizer=False)
        peftlab.attach(model, method)
        assert peftlab.summary(model).trainable == count
        torch.testing.assert_close(out(model, x), ref, rtol=0, atol=0)
