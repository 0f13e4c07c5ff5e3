"""LoRA initialisations taken from the base weight (PiSSA, fast PiSSA, OLoRA), QLoRA's LoftQ, and
peft's ``layers_pattern``; peft 0.21 is the oracle where it has the same option, a naive
reference written here where it does not (LoftQ in peft needs CUDA)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peftlab
from peftlab.core.errors import AdapterFileError, ConfigError
from tests.conftest import perturb

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from tests.conftest import tiny_llama as make

    return make(seed).to(dtype)


def tiny_gpt2(seed: int = 0):
    from tests.conftest import TINY

    return TINY["tiny-gpt2"](seed)


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits.float()


def peft_model(base, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(**config))


def nudge(model, seed: int = 5) -> None:
    """Make every trainable tensor non-trivial (as a few training steps would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----------------------------------------------------------------------------- PiSSA / OLoRA
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_initial_factors_and_residual_equal_peft(init, arch):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = TARGETS if arch == "llama" else ["c_attn", "c_fc"]
    ours = copy.deepcopy(base)
    peftlab.attach(ours, "lora", r=4, alpha=8, target_modules=targets, init=init)
    assert torch.allclose(logits(ours), logits(base), atol=1e-5)  # identity at init, up to rounding
    if arch == "gpt2" and init == "olora":
        # peft 0.21's OLoRA factorises Conv1D's stored (d_in, d_out) matrix and then fails in the forward;
        # the reference here is the QR of the (d_out, d_in) map, written out
        layer, w = ours.transformer.h[0].attn.c_attn, base.transformer.h[0].attn.c_attn.weight.detach()
        q, upper = torch.linalg.qr(w.T)
        a, b = layer.factor_tensors("default")
        assert torch.allclose(b, q[:, :4], atol=1e-6) and torch.allclose(a, upper[:4], atol=1e-6)
        assert torch.allclose(layer.weight, w - 2.0 * (q[:, :4] @ upper[:4]).T, atol=1e-6)
        return
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
                        fan_in_fan_out=arch == "gpt2")
    mine = dict(ours.named_parameters())
    for key, value in theirs.base_model.model.named_parameters():
        key = key.replace(".base_layer.", ".").replace(".default.", ".")
        key = key.replace("lora_A.weight", 'lora_A.default.weight').replace("lora_B.weight", "lora_B.default.weight")
        assert torch.allclose(mine[key], value, atol=1e-6, rtol=0), key


def test_fast_pissa_finds_the_principal_subspace():
    """pissa_niter_<n> (randomized SVD): the initial update is close to the best rank-r
    approximation from the full SVD, and the identity at init holds as for PiSSA."""
    torch.manual_seed(0)
    base = tiny_llama()
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    # give the weight a clear spectrum so that the top-4 subspace is well defined
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    spectrum = torch.tensor([8.0, 6.0, 5.0, 4.0] + [0.1] * (w.shape[0] - 4))
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight.copy_(u @ torch.diag(spectrum) @ vh)
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=4, alpha=4, target_modules=["q_proj"], init="pissa_niter_4")
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.factor_tensors("default")
    best = u[:, :4] @ torch.diag(spectrum[:4]) @ vh[:4]
    assert torch.allclose(layer.scaling("default") * (b @ a), best, atol=1e-3)
    assert torch.allclose(layer.weight + layer.scaling("default") * (b @ a), w, atol=1e-5)
    assert torch.allclose(logits(model), logits(base), atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_3"])
def test_detach_gives_the_exact_base_back(init):
    for dtype in (torch.float32, torch.bfloat16):
        base = tiny_llama(dtype=dtype)
        model = copy.deepcopy(base)
        peftlab.attach(model, "lora", r=4, target_modules=TARGETS, init=init)
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
        nudge(model)
        peftlab.merge(model)
        peftlab.detach(model)
        for key, value in base.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (dtype, key)


def test_a_failed_attach_leaves_the_weights_untouched():
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", name="other", r=2, target_modules=["v_proj"])
    with pytest.raises(ConfigError, match="already carries"):  # v_proj: checked before any weight changes
        peftlab.attach(model, "lora", r=4, target_modules=["q_proj", "v_proj"], init="pissa")
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_file_is_peft_s_converted_lora_of_the_original_base(init, tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=4, alpha=8, target_modules=TARGETS, init=init)
    nudge(model)
    trained = logits(model)
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(loaded), trained, atol=1e-5)
    fresh = copy.deepcopy(base)
    peftlab.load(fresh, tmp_path)
    assert torch.allclose(logits(fresh), trained, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_file_loads_onto_the_original_base(init, tmp_path):
    """peft's own conversion (``path_initial_model_for_weight_conversion``) read by peftlab."""
    base = tiny_llama()
    initial = tmp_path / "initial"
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    theirs.peft_config["default"].init_lora_weights = True  # as peft's docs save the initial adapter
    theirs.save_pretrained(initial)
    theirs.peft_config["default"].init_lora_weights = init
    nudge(theirs)
    trained = logits(theirs)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(initial))
    fresh = copy.deepcopy(base)
    peftlab.load(fresh, tmp_path / "converted")
    assert torch.allclose(logits(fresh), trained, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_peft_file_gives_peft_s_outputs(init, tmp_path):
    """peft re-initialises an unconverted PiSSA/OLoRA adapter from the base it is loaded onto;
    peftlab does the same, so both give the trained model on the original base."""
    from peft import PeftModel

    base = tiny_llama()
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    nudge(theirs)
    trained = logits(theirs)
    theirs.save_pretrained(tmp_path)
    peft_loaded = logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path))
    fresh = copy.deepcopy(base)
    peftlab.load(fresh, tmp_path)
    assert torch.allclose(logits(fresh), peft_loaded, atol=1e-5)
    assert torch.allclose(peft_loaded, trained, atol=1e-5)


def test_pissa_trains_and_rolls_back_on_a_fault():
    from peftlab.core import layer as layer_module

    base = tiny_llama()
    model = copy.deepcopy(base)
    original = layer_module.AdapterLayer.set_adapter_state
    calls = {"n": 0}

    def failing(self, name, state):
        calls["n"] += 1
        if calls["n"] == 4:  # after the first layers' residuals were written
            raise RuntimeError("injected")
        return original(self, name, state)

    layer_module.AdapterLayer.set_adapter_state = failing
    try:
        with pytest.raises(RuntimeError, match="injected"):
            peftlab.attach(model, "lora", r=4, target_modules=TARGETS, init="pissa")
    finally:
        layer_module.AdapterLayer.set_adapter_state = original
    assert peftlab.adapters(model) == {}
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------------------- LoftQ
def _loftq_reference(w: torch.Tensor, r: int, s: float, iters: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ written out (Li et al. 2023, Alg. 1): (the dequantized base, the update s B A)."""
    from peftlab.quant import roundtrip

    update = torch.zeros_like(w)
    for _ in range(iters):
        q = roundtrip(w - update, config)
        u, sv, vh = torch.linalg.svd(w - q)
        update = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
    return q, update


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_matches_the_reference_and_beats_plain_quantization(iters):
    base = tiny_llama()
    opts = dict(r=4, alpha=8, target_modules=TARGETS, blocksize=32)
    model = copy.deepcopy(base)
    peftlab.attach(model, "qlora", init="loftq", loftq_iter=iters, **opts)
    plain = copy.deepcopy(base)
    peftlab.attach(plain, "qlora", **opts)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer, w = model.get_submodule(path), base.get_submodule(path).weight.detach()
        q_ref, update_ref = _loftq_reference(w, 4, 2.0, iters, layer.peftlab_quant)
        a, b = layer.factor_tensors("default")
        assert torch.allclose(layer.dequantized_weight(torch.float32), q_ref, atol=1e-6)
        assert torch.allclose(layer.scaling("default") * (b.float() @ a.float()), update_ref, atol=1e-5)
        err = (layer.dequantized_weight(torch.float32) + update_ref - w).norm()
        err_plain = (plain.get_submodule(path).dequantized_weight(torch.float32) - w).norm()
        assert err < 0.9 * err_plain
    assert (logits(model) - logits(base)).abs().max() < (logits(plain) - logits(base)).abs().max()


def test_loftq_adapter_reloads_exactly_and_refuses_a_quantized_base(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, "qlora", r=4, target_modules=TARGETS, init="loftq", loftq_iter=2, blocksize=32)
    nudge(model)
    peftlab.save(model, tmp_path)
    fresh = copy.deepcopy(base)
    peftlab.load(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    quantized = copy.deepcopy(base)
    peftlab.attach(quantized, "qlora", name="other", r=2, target_modules=TARGETS, blocksize=32)
    with pytest.raises((ConfigError, AdapterFileError), match="full-precision"):
        peftlab.load(quantized, tmp_path)


def test_peft_loftq_and_lora_loftq_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="qlora"):
        peftlab.get_method("lora", init="loftq")
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "loftq"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="LoftQ replaces the base"):
        peftlab.load(tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------- layers_pattern
def tiny_t5():
    from tests.conftest import TINY

    return TINY["tiny-t5"](0)


@pytest.mark.parametrize("pattern", ["block", "layer", ["block", "layer"]])
def test_layers_pattern_selects_what_peft_selects_on_t5(pattern, tmp_path):
    base = tiny_t5()
    theirs = peft_model(base, r=4, target_modules=["q", "v", "wo"], layers_to_transform=[1],
                        layers_pattern=pattern)
    expected = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
                      for n, _ in theirs.named_parameters() if n.endswith("lora_A.default.weight"))
    nudge(theirs)
    theirs.save_pretrained(tmp_path)
    fresh = copy.deepcopy(base)
    peftlab.load(fresh, tmp_path)
    ours = sorted(p for p, _ in peftlab.adapters(fresh)["default"].adapted_layers(fresh, "default"))
    assert ours == expected and ours
    x = {"input_ids": ids(), "decoder_input_ids": ids(4)[:, :3]}
    with torch.no_grad():
        assert torch.allclose(fresh(**x).logits, theirs(**x).logits, atol=1e-5)


def test_layers_with_a_regex_target_is_refused_as_in_peft(tmp_path):
    """peft refuses layers_to_transform with a string (regex) target_modules; so does loading."""
    base = tiny_llama()
    peft_model(base, r=4, target_modules=r".*\.(q_proj|v_proj)").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(layers_to_transform=[0], layers_pattern="layers")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match="layers_to_transform"):
        peftlab.load(model, tmp_path)
    assert peftlab.adapters(model) == {}


def test_layers_pattern_both_ways_on_llama(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=4, target_modules=TARGETS, layers=[1], layers_pattern=["layers"])
    assert {p.split(".")[2] for p, _ in peftlab.adapters(model)["default"].adapted_layers(model, "default")} == {"1"}
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp_path)
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)
    with pytest.raises(ConfigError, match="set layers"):
        peftlab.get_method("lora", layers_pattern=["layers"])
