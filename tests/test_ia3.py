"""(IA)^3: the maths against a naive reference, peft both ways (outputs and merges), exact
merge/unmerge, peft's config space, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.methods.ia3 import IA3, PEFT_HANDLED, PEFT_METADATA, default_targets
from tests.conftest import TINY, batch, out, perturb

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

PEFT_TARGETS = {  # peft's own names for the same modules peftlab's defaults find
    "tiny-llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "tiny-bert": (["key", "value", "output.dense"], ["output.dense"]),
    "tiny-gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


def trained(model: nn.Module, steps: int = 1) -> nn.Module:
    """One AdamW step on a squared-logits loss: non-trivial vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    model.train()
    for _ in range(steps):
        model(**batch()).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def naive(base: nn.Module, vectors: dict[str, tuple[torch.Tensor, bool]]) -> nn.Module:
    """The base model with hooks that rescale each listed module's output (or input) by its vector."""
    for path, (v, ff) in vectors.items():
        m = base.get_submodule(path)
        if ff:
            m.register_forward_pre_hook(lambda mod, args, v=v: (args[0] * v.flatten(),) + args[1:])
        else:
            m.register_forward_hook(lambda mod, args, o, v=v: o * v.flatten())
    return base


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_outputs_equal_a_naive_reference(model_name):
    model = TINY[model_name]()
    peftlab.attach(model, "ia3")
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    vectors = {p: (layer.ia3_l["default"].detach(), layer.scales_input("default"))
               for p, layer in IA3().adapted_layers(model, "default")}
    assert {p.rsplit(".", 1)[-1] for p in vectors} >= {PEFT_TARGETS[model_name][0][0].rsplit(".", 1)[-1]}
    ref = naive(TINY[model_name](), vectors)
    torch.testing.assert_close(out(model, batch()), out(ref, batch()), rtol=1e-6, atol=1e-6)


def test_default_targets_are_keys_values_and_feed_forward_outputs():
    llama, ff = default_targets(TINY["tiny-llama"]())
    assert [p.rsplit(".", 1)[-1] for p in llama] == ["k_proj", "v_proj", "down_proj"] * 2
    assert [p.rsplit(".", 1)[-1] for p in ff] == ["down_proj"] * 2
    bert, ff = default_targets(TINY["tiny-bert"]())
    assert "bert.encoder.layer.0.attention.output.dense" not in bert  # the attention output is not the FFN
    assert "bert.encoder.layer.0.output.dense" in ff
    gpt2, ff = default_targets(TINY["tiny-gpt2"]())
    assert "transformer.h.0.attn.c_proj" not in gpt2 and "transformer.h.0.mlp.c_proj" in ff
    t5, ff = default_targets(TINY["tiny-t5"]())
    assert {p.rsplit(".", 1)[-1] for p in t5} == {"k", "v", "wo"} and all(p.endswith(".wo") for p in ff)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_peftlab_file_loads_in_peft_with_the_same_outputs_and_merge(model_name, tmp_path):
    from peft import PeftModel

    model = TINY[model_name]()
    peftlab.attach(model, "ia3")
    trained(model)
    x = batch()
    want = out(model, x)
    peftlab.save(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(TINY[model_name](), tmp_path)
    torch.testing.assert_close(out(pm, x), want, rtol=1e-5, atol=1e-5)
    peftlab.merge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    torch.testing.assert_close(out(model, x), out(pm, x), rtol=1e-5, atol=1e-5)
    merged_peft = {k.replace("base_layer.", ""): v for k, v in pm.get_base_model().state_dict().items()}
    for k, v in model.state_dict().items():  # the merged weights themselves (and scaled biases)
        if k in merged_peft:
            torch.testing.assert_close(v, merged_peft[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_peft_file_loads_in_peftlab_with_the_same_outputs(model_name, tmp_path):
    from peft import IA3Config, get_peft_model

    targets, ff = PEFT_TARGETS[model_name]
    torch.manual_seed(0)
    pm = get_peft_model(TINY[model_name](), IA3Config(target_modules=targets, feedforward_modules=ff))
    trained(pm)
    pm.save_pretrained(tmp_path)
    model = peftlab.load(TINY[model_name](), tmp_path)
    x = batch()
    torch.testing.assert_close(out(model, x), out(pm, x), rtol=1e-5, atol=1e-5)
    # peft's feedforward list matches by plain suffix: BERT's attention.output.dense is one too
    kinds = {p: layer.scales_input("default") for p, layer in IA3().adapted_layers(model, "default")}
    peft_kinds = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in pm.named_modules()
                  if hasattr(m, "is_feedforward")}
    assert kinds == peft_kinds


def test_conv2d_scales_channels_as_peft_does(tmp_path):
    from peft import IA3Config, get_peft_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 6, 3)
            self.conv3 = nn.Conv2d(6, 4, 1, groups=2)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))

    torch.manual_seed(0)
    base = Net()
    x = torch.randn(2, 3, 9, 9)
    cfg = IA3Config(target_modules=["conv1", "conv2", "conv3"], feedforward_modules=["conv2", "conv3"],
                    init_ia3_weights=False)
    import copy

    pm = get_peft_model(copy.deepcopy(base), cfg)
    pm.save_pretrained(tmp_path)
    model = peftlab.load(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), rtol=1e-5, atol=1e-5)
        l1, l2, l3 = (model.get_submodule(n).ia3_l["default"] for n in ("conv1", "conv2", "conv3"))
        h = torch.relu(base.conv1(x) * l1)  # naive: output channels, then input channels
        h = torch.relu(base.conv2(h * l2))
        torch.testing.assert_close(model(x), base.conv3(h * l3), rtol=1e-6, atol=1e-6)
        expected = model(x)
        peftlab.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        pm.merge_adapter()
        torch.testing.assert_close(model(x), pm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_unmerge_is_bit_exact_with_two_adapters(dtype):
    model = TINY["tiny-bert"]()  # BERT: biases of key/value are scaled by a merge too (made non-zero here)
    perturb({k: p for k, p in model.named_parameters() if k.endswith("bias")}, seed=9)
    model = model.to(dtype)
    peftlab.attach(model, "ia3", modules_to_save=["classifier"])
    peftlab.attach(model, "ia3", "b", target_modules=["key", "query"], feedforward_modules=["query"])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    perturb(peftlab.adapter_parameters(model, "b"), seed=4, scale=0.3)
    with torch.no_grad():  # a zero scale: division could not undo it
        model.bert.encoder.layer[0].attention.self.key.ia3_l["default"][0] = 0
    peftlab.use(model, "default", "b")
    x = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = out(model, x)
    peftlab.merge(model)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out(model, x), unmerged, rtol=tol, atol=tol)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.key.bias, before[
        "bert.encoder.layer.0.attention.self.key.bias"])
    peftlab.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_two_active_adapters_multiply():
    model = TINY["tiny-llama"]()
    peftlab.attach(model, "ia3", target_modules=["v_proj"])
    peftlab.attach(model, "ia3", "b", target_modules=["v_proj"])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    perturb(peftlab.adapter_parameters(model, "b"), seed=5, scale=0.3)
    peftlab.use(model, "default", "b")
    vectors = {}
    for p, layer in IA3().adapted_layers(model, "default"):
        vectors[p] = (layer.ia3_l["default"].detach() * layer.ia3_l["b"].detach(), False)
    torch.testing.assert_close(out(model, batch()), out(naive(TINY["tiny-llama"](), vectors), batch()),
                               rtol=1e-6, atol=1e-6)


def test_save_load_round_trip_and_config_is_peft_s(tmp_path):
    import json

    from peft import IA3Config

    model = TINY["tiny-gpt2"]()
    peftlab.attach(model, "ia3")
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["peft_type"] == "IA3"
    known = set(IA3Config().to_dict())
    assert set(config) <= known, set(config) - known
    fresh = peftlab.load(TINY["tiny-gpt2"](), tmp_path)
    torch.testing.assert_close(out(fresh, batch()), out(model, batch()), rtol=0, atol=0)


def test_every_peft_config_field_is_handled_or_metadata():
    from peft import IA3Config

    fields = set(IA3Config().to_dict())
    assert fields <= PEFT_HANDLED | PEFT_METADATA, fields - PEFT_HANDLED - PEFT_METADATA
    with pytest.raises(ConfigError, match="does not implement"):
        IA3.from_config({**IA3Config(target_modules=["k"]).to_dict(), "peft_type": "IA3", "new_option": 3})


def test_bad_input_is_refused_with_the_way_out():
    model = TINY["tiny-llama"]()
    with pytest.raises(ConfigError, match="subset|target_modules also selects"):
        peftlab.attach(model, "ia3", target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="empty"):
        peftlab.get_method("ia3", target_modules=[])
    with pytest.raises(PeftlabError, match="cannot adapt|supported types"):
        peftlab.attach(model, "ia3", target_modules=["input_layernorm"])
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(PeftlabError, match="name the modules in target_modules"):
        peftlab.attach(plain, "ia3")
    assert peftlab.adapters(model) == {}


def test_default_targets_apply_on_the_meta_device_of_the_embedded_models():
    """What the bench does: attach with the defaults on meta copies of the embedded models."""
    from peftlab import models

    for name, want in (("smollm2-135m", {"k_proj", "v_proj", "down_proj"}), ("minilm", {"key", "value", "dense"})):
        with torch.device("meta"):
            model, _ = models.load(name, num_labels=2, with_tokenizer=False)
        peftlab.attach(model, "ia3")
        leaves = {p.rsplit(".", 1)[-1] for p, _ in IA3().adapted_layers(model, "default")}
        assert leaves == want
        assert 0 < peftlab.summary(model).percent < 0.1
