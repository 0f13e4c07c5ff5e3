"""LoKr against a naive reference written here and against peft's LoKr (the oracle): peft's
factorisation rule, the Kronecker forward orders against the naive update (values and gradients),
peft's initialisation draws, outputs and gradients of the same adapter, files both ways on Llama,
BERT, a small CNN and Conv1d (decompose_both, decompose_factor, the Tucker form, full factors),
merged outputs against peft's merged model, training-mode dropouts under one seed, config fields
and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError
from peftlab.methods.lokr import factorization
from tests.conftest import perturb, tiny_gpt2, tiny_llama
from tests.test_loha import (TOL, check_config_fields, from_peft, run, seeded_init_matches_peft, to_peft,
                             training_mode_matches_peft)

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 5, 8, 16, 0, -2])
def test_factorization_is_peft_s(factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 700):
        assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    assert factorization(576) == (24, 24) and factorization(1536) == (32, 48) and factorization(127) == (1, 127)


# ----------------------------------------------------------------------------- the maths
def naive_kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``(W1 ⊗ W2)[a b_dim + b, c d_dim + d, ...] = W1[a, c] W2[b, d, ...]``, element by element."""
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:], dtype=w1.dtype)
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
    return out


def _layer(module: nn.Module, **options) -> nn.Module:
    holder = nn.Sequential(module)
    peftlab.attach(holder, "lokr", target_modules=["0"], **options)
    perturb(peftlab.adapter_parameters(holder, "default"), scale=0.3)
    return holder[0]


LAYERS = {
    "linear": (lambda: nn.Linear(24, 20), torch.randn(3, 5, 24)),
    "linear-prime": (lambda: nn.Linear(13, 12), torch.randn(4, 13)),
    "conv2d": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
    "conv2d-dilated": (lambda: nn.Conv2d(8, 12, (3, 2), padding=2, dilation=2), torch.randn(2, 8, 9, 9)),
    "conv2d-grouped": (lambda: nn.Conv2d(8, 12, 3, groups=2), torch.randn(2, 8, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1), torch.randn(2, 6, 11)),
}
OPTIONS = {"low-rank": {"r": 1, "alpha": 2.0}, "full": {"r": 8, "alpha": 4.0},
           "both": {"r": 1, "decompose_both": True}, "tucker": {"r": 1, "use_effective_conv2d": True},
           "factor": {"r": 2, "decompose_factor": 2}}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_every_forward_order_equals_the_naive_update(kind, variant):
    if (kind, variant) == ("conv1d", "full"):
        pytest.skip("a full 3-D W2 on nn.Conv1d follows peft's torch.kron layout (a 2-D by 3-D kron), not the "
                    "block formula; the peft tests check it")
    make, x = LAYERS[kind]
    torch.manual_seed(0)
    x = torch.randn(x.shape)  # seeded here: the module-level tensor depends on what ran before the import
    layer = _layer(make(), **OPTIONS[variant])
    s = layer.settings("default").scaling
    w1, w2 = layer.w1("default"), layer.w2("default")
    delta = naive_kron(w1, w2.reshape(w2.shape[0], -1, *layer.weight.shape[2:])) * s
    torch.testing.assert_close(layer.delta_weight("default"), delta.detach(), atol=1e-6, rtol=1e-5)
    want = layer.apply_delta(x, delta)
    plans = layer._plans("default", x)
    assert ("w2_first" in plans) == (kind not in ("conv2d-grouped", "conv1d"))
    params = list(layer.adapter_parameters("default").values())
    grads_want = torch.autograd.grad(want.pow(2).sum(), params, retain_graph=True)
    forms = {"dense": lambda: layer.dense_update("default", x, s)}
    forms.update({order: (lambda o=order: layer.factored_update("default", x, s, o)) for order in plans if order != "dense"})
    for order, form in forms.items():
        got = form()
        torch.testing.assert_close(got, want.detach(), **TOL, msg=order)
        for g, gw in zip(torch.autograd.grad(got.pow(2).sum(), params), grads_want):
            torch.testing.assert_close(g, gw, atol=1e-5, rtol=1e-4, msg=order)
    with torch.no_grad():
        base = type(layer).base_class.forward(layer, x)
        torch.testing.assert_close(layer(x) - base, want.detach(), **TOL)


def test_the_cheapest_order_is_chosen():
    layer = _layer(nn.Linear(576, 1536), r=8)
    plans = layer._plans("default", torch.randn(4, 576))
    assert min(plans, key=plans.__getitem__) != "dense" and plans["dense"] > 10 * min(plans.values())
    assert layer.lokr_w1["default"].shape == (32, 24) and layer.lokr_w2_a["default"].shape == (48, 8)


def test_factored_training_keeps_no_dense_update():
    layer = _layer(nn.Linear(256, 192), r=4)
    x = torch.randn(2, 8, 256, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.update("default", x, 1.0).sum()  # the adapter's part (the base keeps its frozen weight)
    assert sizes and max(sizes) <= x.numel() < 256 * 192


@pytest.mark.parametrize("order", ["w1_first", "w2_first"])
@pytest.mark.parametrize("needs", ["all", "x", "w1", "w2", "weights"])
def test_chunked_kronecker_function_gives_the_naive_gradients(order, needs):
    """The hand-written backward over several chunks (the last one short) against autograd through
    the naive ``x (W1 ⊗ W2)^T``, for every subset of inputs that needs a gradient."""
    from peftlab.methods import lokr

    torch.manual_seed(0)
    n = 2 * lokr.CHUNK + 7
    x, w1, w2 = torch.randn(n, 3 * 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), \
        torch.randn(6, 5, dtype=torch.float64)
    grads = {"all": "x w1 w2", "x": "x", "w1": "w1", "w2": "w2", "weights": "w1 w2"}[needs].split()
    inputs = {k: t.requires_grad_(k in grads) for k, t in {"x": x, "w1": w1, "w2": w2}.items()}
    up = torch.randn(n, 4 * 6, dtype=torch.float64)
    got = lokr._KronLinear.apply(x, w1, w2, order)
    want = x @ naive_kron(w1, w2).T
    torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-12)
    wanted = torch.autograd.grad((want * up).sum(), [inputs[k] for k in grads])
    for k, g, gw in zip(grads, torch.autograd.grad((got * up).sum(), [inputs[k] for k in grads]), wanted):
        torch.testing.assert_close(g, gw, atol=1e-12, rtol=1e-12, msg=k)


@pytest.mark.parametrize("order", ["w1_first", "w2_first"])
def test_factored_backward_makes_no_per_position_tensor_beyond_one_chunk(order):
    """Every tensor the factored form creates in the backward pass (and the forward's intermediates)
    holds at most one chunk of positions, except the output and ``dL/dx``: the transients that had
    raised the peak resident set at 2048 tokens a step above peft's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from peftlab.methods import lokr

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            given = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):  # new storages only (no views, no out=)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                    self.numels.append(t.numel())
            return out

    torch.manual_seed(0)
    n, (a, c), (b, d) = 5 * lokr.CHUNK, (6, 4), (5, 7)
    x = torch.randn(n, c * d, requires_grad=True)
    w1, w2 = torch.randn(a, c, requires_grad=True), torch.randn(b, d, requires_grad=True)
    sizes = Sizes()
    with sizes:
        y = lokr._KronLinear.apply(x, w1, w2, order)
        y.backward(torch.ones_like(y))
    whole = {n * a * b, n * c * d}  # the output and dL/dx (and the ones_like upstream gradient)
    chunk = lokr.CHUNK * max(a * b, c * d, c * b, a * d, a * c)
    assert sizes.numels and max(s for s in sizes.numels if s not in whole) <= chunk < n * min(c * b, a * d)
    assert sorted(s for s in sizes.numels if s in whole) == sorted([n * a * b, n * a * b, n * c * d])


# ----------------------------------------------------------------------------- peft as the oracle
PEFTLAB_CASES = {
    "llama": ("llama", {"r": 1, "alpha": 3.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
                        "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"down_proj": 0.5}}),
    "llama-both-lycoris": ("llama", {"r": 1, "decompose_both": True, "init": "lycoris"}),
    "llama-factor": ("llama", {"r": 2, "decompose_factor": 4, "target_modules": ["q_proj", "gate_proj"]}),
    "bert": ("bert", {"r": 2, "rank_dropout_scale": True, "target_modules": ["query", "value", "dense"],
                      "modules_to_save": ["classifier"]}),
    "cnn": ("cnn", {"r": 1, "target_modules": ["conv1", "conv2", "conv3", "conv4", "head"]}),
    "cnn-tucker-both": ("cnn", {"r": 1, "use_effective_conv2d": True, "decompose_both": True,
                                "target_modules": ["conv1", "conv2", "conv3", "conv4"]}),
    "cnn-full": ("cnn", {"r": 8, "target_modules": ["conv1", "conv2", "conv3", "conv4"]}),
    # (peft 0.21 cannot run LoKr's Tucker form on nn.Conv1d: torch.kron rejects the einsum's strides)
    "conv1d": ("conv1d", {"r": 1, "decompose_both": True, "target_modules": ["conv1", "conv2"]}),
    "conv1d-full": ("conv1d", {"r": 8, "target_modules": ["conv1", "conv2"]}),
}


@pytest.mark.parametrize("case", sorted(PEFTLAB_CASES))
def test_peftlab_file_loads_in_peft(case, tmp_path):
    kind, options = PEFTLAB_CASES[case]
    to_peft("lokr", kind, options, tmp_path)


PEFT_CASES = {
    "llama": ("llama", dict(r=1, alpha=2, target_modules=["q_proj", "v_proj", "gate_proj"],
                            rank_pattern={"gate_proj": 16}, alpha_pattern={"v_proj": 5})),
    "llama-both": ("llama", dict(r=1, decompose_both=True, init_weights="lycoris", target_modules=["k_proj", "o_proj"])),
    "bert": ("bert", dict(r=2, decompose_factor=8, target_modules=["query", "value", "output.dense"],
                          modules_to_save=["classifier"])),
    "cnn": ("cnn", dict(r=1, target_modules=["conv1", "conv2", "conv3", "conv4"])),
    "cnn-tucker": ("cnn", dict(r=1, use_effective_conv2d=True, init_weights=False, target_modules=["conv1", "conv2"])),
    "conv1d": ("conv1d", dict(r=8, target_modules=["conv1", "conv2"])),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_file_gives_peft_outputs_gradients_and_merge(case, tmp_path):
    kind, kwargs = PEFT_CASES[case]
    from_peft(peft.LoKrConfig(**kwargs), kind, tmp_path)


@pytest.mark.parametrize("init", ["default", "lycoris", "random"])
def test_initialisation_draws_what_peft_draws(init):
    peft_init = {"default": True, "lycoris": "lycoris", "random": False}[init]
    seeded_init_matches_peft("lokr", "llama", {"r": 1, "decompose_both": True, "init": init,
                                               "target_modules": ["q_proj", "down_proj"]},
                             peft.LoKrConfig(r=1, decompose_both=True, init_weights=peft_init,
                                             target_modules=["q_proj", "down_proj"]))
    seeded_init_matches_peft("lokr", "cnn", {"r": 1, "init": init, "use_effective_conv2d": True,
                                             "target_modules": ["conv1", "conv4", "head"]},
                             peft.LoKrConfig(r=1, init_weights=peft_init, use_effective_conv2d=True,
                                             target_modules=["conv1", "conv4", "head"]))


@pytest.mark.parametrize("scale", [False, True])
def test_training_mode_dropouts_equal_peft(scale):
    training_mode_matches_peft("lokr", {"r": 1, "rank_dropout": 0.5, "module_dropout": 0.3, "rank_dropout_scale": scale,
                                        "target_modules": ["q_proj", "v_proj", "down_proj"]},
                               peft.LoKrConfig(r=1, rank_dropout=0.5, module_dropout=0.3, rank_dropout_scale=scale,
                                               target_modules=["q_proj", "v_proj", "down_proj"]))


def test_config_fields_are_peft_s():
    check_config_fields("lokr", peft.LoKrConfig)
    method = peftlab.method_class("lokr").from_config(
        {"peft_type": "LOKR", "target_modules": ["q_proj"], "init_weights": "lycoris", "decompose_factor": 4,
         "decompose_both": True, "rank_dropout_scale": True})
    assert (method.init, method.decompose_factor, method.decompose_both, method.rank_dropout_scale) == \
        ("lycoris", 4, True, True)
    with pytest.raises(ConfigError, match="init_weights"):
        peftlab.method_class("lokr").from_config({"peft_type": "LOKR", "target_modules": ["q_proj"],
                                                  "init_weights": "gaussian"})


def test_gpt2_conv1d_is_refused_as_peft_refuses_it():
    with pytest.raises(ConfigError, match=r"Conv1D.*peft's LOKR does not adapt.*Use lora"):
        peftlab.attach(tiny_gpt2(), "lokr")
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(tiny_gpt2(), peft.LoKrConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize(("options", "match"), [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": -1.0}, "alpha must be > 0"),
    ({"decompose_factor": 0}, "decompose_factor must be -1"),
    ({"decompose_factor": -3}, "decompose_factor must be -1"),
    ({"init": "gaussian"}, "init must be one of"),
    ({"rank_dropout": 1.5}, r"rank_dropout must be in \[0, 1\)"),
    ({"decompose_both": "yes"}, "decompose_both must be true or false"),
    ({"target_modules": ["nothing_here"]}, "matches no module"),
])
def test_bad_input_is_a_clear_error(options, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        peftlab.attach(model, "lokr", **options)
    assert peftlab.adapters(model) == {}


def test_saved_config_is_peft_s(tmp_path):
    model = tiny_llama()
    peftlab.attach(model, "lokr", r=1, decompose_both=True, decompose_factor=4, init="lycoris",
                   target_modules=["re:.*\\.q_proj"])
    perturb(peftlab.adapter_parameters(model, "default"))
    want = run(model, "llama")
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_weights"], config["decompose_factor"], config["decompose_both"]) == \
        ("LOKR", "lycoris", 4, True)
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path), peft.LoKrConfig)
    fresh = tiny_llama()
    peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(run(fresh, "llama"), want, rtol=0, atol=0)
