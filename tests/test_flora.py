"""FLoRA: Tucker reconstruction, every layer kind against a dense reference, parameter counts, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError, TargetError
from peftlab.methods.flora import flora_parameter_count, tucker
from tests.conftest import perturb


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_tucker_equals_a_dense_einsum():
    core = torch.randn(3, 4, 2, 2, generator=g(0), dtype=torch.float64)
    us = [torch.randn(d, r, generator=g(i + 1), dtype=torch.float64) for i, (d, r) in
          enumerate([(7, 3), (5, 4), (3, 2), (3, 2)])]
    dense = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *us)
    torch.testing.assert_close(tucker(core, us), dense, rtol=1e-12, atol=1e-12)
    # 2-D: U1 G U2^T; 3-D
    torch.testing.assert_close(tucker(core[:, :, 0, 0], us[:2]), us[0] @ core[:, :, 0, 0] @ us[1].T)
    torch.testing.assert_close(tucker(core[..., 0], us[:3]), torch.einsum("abc,ia,jb,kc->ijk", core[..., 0], *us[:3]))
    # a None factor keeps that mode
    partial = tucker(core, [None, None, us[2], us[3]])
    torch.testing.assert_close(partial, torch.einsum("abcd,kc,ld->abkl", core, us[2], us[3]))
    with pytest.raises(ValueError, match="3 factors for a core with 4 modes"):
        tucker(core, us[:3])


def adapted(module: nn.Module, **options) -> nn.Module:
    model = nn.Sequential(module)
    peftlab.attach(model, "flora", target_modules=["0"], **options)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    return model


def dense_delta(model: nn.Module, scale: float) -> torch.Tensor:
    """The update from the adapter's tensors through an explicit einsum over all modes."""
    params = peftlab.adapter_parameters(model, "default")
    core = next(p for k, p in params.items() if k.endswith("flora_core.default"))
    factors = [params[k] for k in sorted(k for k in params if ".flora_factors." in k)]
    letters = "abcde"[:core.ndim]
    spec = f"{letters}," + ",".join(f"{o}{r}" for o, r in zip("ijklm", letters)) + "->" + "ijklm"[:core.ndim]
    return torch.einsum(spec, core, *factors) * scale


CONVS = [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), {"r": 3, "kernel_r": 2}, (2, 4, 9, 8)),
    (nn.Conv2d(4, 6, (3, 5), dilation=2, padding=(2, 1), padding_mode="reflect"), {"r": 4}, (2, 4, 11, 12)),
    (nn.Conv1d(5, 3, 4, padding=2), {"rank_pattern": {"0": [2, 5, 3]}}, (2, 5, 13)),
    (nn.Conv3d(2, 3, 3, padding=1), {"r": 2, "kernel_r": 1}, (1, 2, 5, 4, 6)),
]


@pytest.mark.parametrize(("conv", "options", "shape"), CONVS, ids=["conv2d", "conv2d-reflect", "conv1d", "conv3d"])
def test_conv_equals_convolving_with_the_dense_update(conv, options, shape):
    torch.manual_seed(0)
    model = adapted(conv, scale=1.5, **options)
    x = torch.randn(shape, generator=g(7))
    w = conv.weight + dense_delta(model, 1.5)
    expected = conv._conv_forward(x, w, conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        peftlab.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_linear_and_embedding_equal_the_dense_update():
    torch.manual_seed(0)
    lin = nn.Linear(9, 7)
    model = adapted(lin, r=3, scale=2.0)
    x = torch.randn(4, 9, generator=g(1))
    torch.testing.assert_close(model(x), F.linear(x, lin.weight + dense_delta(model, 2.0), lin.bias))
    emb = nn.Embedding(30, 8, padding_idx=0)
    model = adapted(emb, rank_pattern={"0": [5, 2]}, scale=0.5)
    ids = torch.randint(0, 30, (3, 6), generator=g(2))
    torch.testing.assert_close(model(ids), F.embedding(ids, emb.weight + dense_delta(model, 0.5)))


def test_gpt2_conv1d_weight_layout():
    """GPT-2's Conv1D stores (in, out): ranks follow that order and the update matches."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs: weight (5, 7)
    model = adapted(layer, rank_pattern={"0": [2, 4]}, scale=4.0)
    params = peftlab.adapter_parameters(model, "default")
    assert tuple(params["0.flora_core.default"].shape) == (2, 4)
    x = torch.randn(3, 5, generator=g(3))
    torch.testing.assert_close(model(x), x @ (layer.weight + dense_delta(model, 4.0)) + layer.bias)


def test_identity_at_init_and_gradients_reach_the_core_first():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 6, 6, generator=g(4))
    base = conv(x).detach()
    peftlab.attach(model, "flora", target_modules=["0"], r=2, kernel_r=2)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    model(x).pow(2).sum().backward()
    params = peftlab.adapter_parameters(model, "default")
    grads = {k.split(".")[1] + k.split(".")[-1]: p.grad for k, p in params.items()}
    assert grads["flora_coredefault"].abs().sum() > 0
    factors = [v for k, v in grads.items() if k.startswith("flora_factors")]
    assert len(factors) == 4 and all(v.abs().sum() == 0 for v in factors)  # zero core: no factor gradient yet
    u = peftlab.adapter_parameters(model, "default")["0.flora_factors.default.0"]
    torch.testing.assert_close(u.T @ u, torch.eye(2), rtol=0, atol=1e-5)  # orthonormal columns


def test_article_parameter_count_against_lora():
    """Kernel 3, r3 = r4 = 2, r1 = r2 = 32, d_in = 256, d_out = 512."""
    conv = nn.Conv2d(256, 512, 3, padding=1)
    with torch.device("meta"):
        f_model = nn.Sequential(nn.Conv2d(256, 512, 3, padding=1))
        l_model = nn.Sequential(nn.Conv2d(256, 512, 3, padding=1))
    peftlab.attach(f_model, "flora", target_modules=["0"], r=32, kernel_r=2)
    peftlab.attach(l_model, "lora", target_modules=["0"], r=32)
    flora = peftlab.summary(f_model).trainable
    lora = peftlab.summary(l_model).trainable
    core, factors = 32 * 32 * 2 * 2, 512 * 32 + 256 * 32 + 3 * 2 + 3 * 2
    assert flora == core + factors == 28_684 == flora_parameter_count(conv.weight.shape, (32, 32, 2, 2))
    assert lora == 32 * 256 * 3 * 3 + 512 * 32 == 90_112  # A: r x d_in x 3 x 3, B: d_out x r
    assert lora / flora == pytest.approx(3.1415, abs=1e-3)
    full = 512 * 256 * 9
    assert flora / full == pytest.approx(0.0243, abs=1e-4)


def test_save_load_round_trip_on_a_cnn(tmp_path):
    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 5))

    model = cnn()
    peftlab.attach(model, "flora", target_modules=["type:Conv2d", "4"], r=4, kernel_r=2,
                   rank_pattern={"0": [4, 1, 2, 2]})
    perturb(peftlab.adapter_parameters(model, "default"))
    x = torch.randn(2, 1, 6, 6, generator=g(5))
    expected = model(x).detach()
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB_FLORA" and config["rank_pattern"] == {"0": [4, 1, 2, 2]}
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{m}.{t}" for m in ("0", "2") for t in
                    ["flora_core", *(f"flora_factors.{i}" for i in range(4))]} | {
        f"base_model.model.4.{t}" for t in ("flora_core", "flora_factors.0", "flora_factors.1")}
    fresh = cnn()
    peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"target_modules": ["0"], "r": 2, "kernel_r": 4}, ConfigError,
     r"Tucker rank 4 of mode 2 is larger than that mode of 0 \(weight shape \[8, 2, 3, 3\]: mode 2 has size 3\); "
     "lower kernel_r to at most 3"),
    ({"target_modules": ["0"], "r": 4}, ConfigError, r"Tucker rank 4 of mode 1 .* lower r to at most 2"),
    ({"target_modules": ["0"], "rank_pattern": {"0": [2, 2]}}, ConfigError, "gives 2 ranks .* has 4 modes"),
    ({"target_modules": ["1"]}, TargetError, r"supported types: \['Conv1D', 'Conv1d', 'Conv2d', 'Conv3d', "
                                               r"'Embedding', 'Linear'\]"),
    ({"r": 0}, ConfigError, "r must be a positive integer"),
    ({"kernel_r": 0}, ConfigError, "kernel_r must be None"),
    ({"scale": 0}, ConfigError, "scale must be a positive number"),
    ({"rank_pattern": {"x": 3}}, ConfigError, "must be a list of positive ranks"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(options, error, match):
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.LayerNorm(6), nn.Conv2d(8, 8, 3))
    before = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        peftlab.attach(model, "flora", **{"target_modules": ["0", "2"], **options})
    assert [type(m) for m in model.modules()] == before
    assert peftlab.adapters(model) == {}
    assert all(p.requires_grad for p in model.parameters())
