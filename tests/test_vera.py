"""VeRA: the shared matrices against peft's own generator, the maths against a naive reference,
peft both ways (with and without the matrices in the file, outputs and merges), sharing, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.methods.vera import PEFT_HANDLED, PEFT_METADATA, VeRA, projection_matrices
from tests.conftest import TINY, batch, out, perturb

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

TARGETS = {"tiny-llama": ["q_proj", "v_proj", "down_proj"], "tiny-bert": ["query", "value", "intermediate.dense"],
           "tiny-gpt2": ["c_attn", "c_fc"]}


def trained(model: nn.Module) -> nn.Module:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    model.train()
    model(**batch()).logits.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize(("r", "d_in", "d_out", "key"), [(4, 64, 32, 0), (16, 96, 200, 12345), (1, 3, 5, 2**40)])
def test_projections_are_peft_s_bit_for_bit(r, d_in, d_out, key):
    from peft.tuners.vera.model import _kaiming_init

    g = torch.Generator(device="cpu").manual_seed(key)
    want_a, want_b = _kaiming_init((r, d_in), generator=g), _kaiming_init((d_out, r), generator=g)
    a, b = projection_matrices(r, d_in, d_out, key)
    assert torch.equal(a, want_a) and torch.equal(b, want_b)


def test_outputs_equal_a_naive_reference():
    model = TINY["tiny-llama"]()
    peftlab.attach(model, "vera", r=8, target_modules=TARGETS["tiny-llama"])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    ref = TINY["tiny-llama"]()
    proj = next(layer for _, layer in VeRA().adapted_layers(model, "default")).vera_projection["default"]
    a_full, b_full = projection_matrices(8, 64, 32, 0)  # max d_in (down_proj: 64), max d_out (q, down: 32)
    assert torch.equal(proj.vera_A, a_full) and torch.equal(proj.vera_B, b_full)
    for path, layer in VeRA().adapted_layers(model, "default"):
        lam_b, lam_d = layer.vera_lambda_b["default"].detach(), layer.vera_lambda_d["default"].detach()
        m = ref.get_submodule(path)
        a, b = a_full[:, :m.in_features], b_full[:m.out_features]
        m.register_forward_hook(lambda mod, args, o, a=a, b=b, lb=lam_b, ld=lam_d:
                                o + lb * ((ld * (args[0] @ a.T)) @ b.T))
    torch.testing.assert_close(out(model, batch()), out(ref, batch()), rtol=1e-5, atol=1e-6)


def test_shared_matrices_are_one_frozen_tensor_outside_the_state_dict():
    model = TINY["tiny-llama"]()
    peftlab.attach(model, "vera", r=8, target_modules=TARGETS["tiny-llama"])
    layers = [layer for _, layer in VeRA().adapted_layers(model, "default")]
    projections = {id(layer.vera_projection["default"]) for layer in layers}
    assert len(layers) == 6 and len(projections) == 1
    a = layers[0].vera_projection["default"].vera_A
    assert not a.requires_grad and not any(a is p for p in model.parameters())
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())
    assert set(peftlab.adapter_parameters(model, "default")) == {
        k for k, p in model.named_parameters() if p.requires_grad}
    assert peftlab.summary(model).trainable == 6 * 8 + 4 * 32 + 2 * 16  # r per layer + d_out per layer
    model.to(torch.float64)  # moving the model moves the one tensor once
    assert len({id(layer.vera_projection["default"].vera_A) for layer in layers}) == 1


@pytest.mark.parametrize("save_projection", [True, False], ids=["with-projection", "key-only"])
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_peftlab_file_loads_in_peft_with_the_same_outputs_and_merge(model_name, save_projection, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = TINY[model_name]()
    peftlab.attach(model, "vera", r=8, target_modules=TARGETS[model_name], save_projection=save_projection,
                   projection_prng_key=3)
    trained(model)
    x = batch()
    want = out(model, x)
    peftlab.save(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save_projection
    assert not any(".vera_A" in k or ".vera_B" in k for k in keys if k.startswith("base_model.model."))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(TINY[model_name](), tmp_path)
    torch.testing.assert_close(out(pm, x), want, rtol=1e-5, atol=1e-5)
    peftlab.merge(model)
    pm.merge_adapter()
    torch.testing.assert_close(out(model, x), out(pm, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(model, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False], ids=["with-projection", "key-only"])
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_peft_file_loads_in_peftlab_with_the_same_outputs(model_name, save_projection, tmp_path):
    from peft import VeraConfig, get_peft_model

    cfg = VeraConfig(r=8, target_modules=TARGETS[model_name], save_projection=save_projection,
                     projection_prng_key=11, d_initial=0.2)
    torch.manual_seed(0)
    pm = get_peft_model(TINY[model_name](), cfg)
    trained(pm)
    pm.save_pretrained(tmp_path)
    model = peftlab.load(TINY[model_name](), tmp_path)
    x = batch()
    torch.testing.assert_close(out(model, x), out(pm, x), rtol=1e-5, atol=1e-5)
    if not save_projection:  # regenerated from the key alone: identical to peft's
        mine = next(layer for _, layer in VeRA().adapted_layers(model, "default")).vera_projection["default"]
        assert torch.equal(mine.vera_A, pm.base_model.vera_A["default"])
        assert torch.equal(mine.vera_B, pm.base_model.vera_B["default"])


def test_file_matrices_are_used_as_saved(tmp_path):
    """With save_projection the file's matrices win over the key (a file from another platform)."""
    model = TINY["tiny-llama"]()
    peftlab.attach(model, "vera", r=4, target_modules=["q_proj"])
    _, proj = VeRA().projection(model, "default")
    with torch.no_grad():
        proj.vera_A.mul_(2)  # not what the key gives
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp_path)
    fresh = peftlab.load(TINY["tiny-llama"](), tmp_path)
    torch.testing.assert_close(out(fresh, batch()), out(model, batch()), rtol=0, atol=0)


def test_bias_trains_and_files_are_peft_s(tmp_path):
    from peft import PeftModel

    model = TINY["tiny-bert"]()
    peftlab.attach(model, "vera", r=4, target_modules=["query", "value"], bias="vera_only",
                   modules_to_save=["classifier"])
    assert "bert.encoder.layer.0.attention.self.query.bias" in peftlab.adapter_parameters(model, "default")
    trained(model)
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    from peft import VeraConfig

    assert set(config) <= set(VeraConfig().to_dict()), set(config) - set(VeraConfig().to_dict())
    pm = PeftModel.from_pretrained(TINY["tiny-bert"](), tmp_path)
    torch.testing.assert_close(out(pm, batch()), out(model, batch()), rtol=1e-5, atol=1e-5)
    fresh = peftlab.load(TINY["tiny-bert"](), tmp_path)
    torch.testing.assert_close(out(fresh, batch()), out(model, batch()), rtol=0, atol=0)


def test_init_weights_false_is_peft_s_distribution():
    model = TINY["tiny-llama"]()
    peftlab.attach(model, "vera", r=8, target_modules=["q_proj"], init_weights=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.vera_lambda_b["default"], torch.ones(32))
    assert VeRA.identity_at_init and not torch.equal(layer.vera_lambda_d["default"], torch.full((8,), 0.1))


def test_every_peft_config_field_is_handled_or_metadata():
    from peft import VeraConfig

    fields = set(VeraConfig().to_dict())
    assert fields <= PEFT_HANDLED | PEFT_METADATA, fields - PEFT_HANDLED - PEFT_METADATA
    with pytest.raises(ConfigError, match="does not implement"):
        VeRA.from_config({**VeraConfig(target_modules=["q"]).to_dict(), "peft_type": "VERA", "new_option": 1})
    cfg = VeraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers").to_dict()
    method = VeRA.from_config(cfg)
    model = TINY["tiny-llama"]()
    peftlab.attach(model, method)
    assert [p for p, _ in method.adapted_layers(model, "default")] == ["model.layers.1.self_attn.q_proj"]


def test_bad_input_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="positive"):
        peftlab.get_method("vera", r=0)
    with pytest.raises(ConfigError, match="bias must be one of"):
        peftlab.get_method("vera", bias="lora_only")
    model = TINY["tiny-llama"]()
    with pytest.raises(PeftlabError, match="supported types"):
        peftlab.attach(model, "vera", target_modules=["embed_tokens"])
    with pytest.raises(ConfigError, match="have no bias"):
        peftlab.attach(model, "vera", target_modules=["q_proj"], bias="vera_only")
    assert peftlab.adapters(model) == {}


def test_defaults_apply_on_the_meta_device_of_the_embedded_models():
    from peftlab import models

    for name in ("smollm2-135m", "minilm"):
        with torch.device("meta"):
            model, _ = models.load(name, num_labels=2, with_tokenizer=False)
        peftlab.attach(model, "vera")
        _, proj = VeRA().projection(model, "default")
        assert proj.vera_A.shape[0] == 256 and proj.vera_A.device.type == "meta"
        assert 0 < peftlab.summary(model).percent < 1


def test_recompute_gives_the_same_gradients_and_keeps_less():
    def grads_and_saved(recompute: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = TINY["tiny-llama"]()
        peftlab.attach(model, "vera", r=8, target_modules=TARGETS["tiny-llama"], recompute=recompute)
        perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
        model.train()
        params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch(length=40)).logits.float().pow(2).mean()
        loss.backward()
        return {k: p.grad for k, p in peftlab.adapter_parameters(model, "default").items()}, sum(seen.values())

    plain, plain_bytes = grads_and_saved(False)
    lean, lean_bytes = grads_and_saved(True)
    assert plain.keys() == lean.keys()
    for k in plain:
        torch.testing.assert_close(lean[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
    # per token and layer, recompute drops the d_out-wide product: 2 x 40 tokens x (32 + 16 + 32) x 2 layers x 4 B
    assert plain_bytes - lean_bytes >= 2 * 40 * (32 + 16 + 32) * 2 * 4
