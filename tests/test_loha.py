"""LoHa against a naive reference written here and against peft's LoHa (the oracle): maths of
both forward forms, peft's initialisation draws, outputs and gradients of the same adapter,
files both ways on Llama, BERT and a small CNN (Conv2d, Conv1d, the Tucker form), merged outputs
against peft's merged model, training-mode dropouts against peft's under one seed, config fields
and bad input."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError
from tests.conftest import perturb, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
TOL = {"atol": 1e-5, "rtol": 1e-5}
IDS = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
SIGNAL = torch.randn(2, 4, 20, generator=torch.Generator().manual_seed(3))


class CNN(nn.Module):
    """A small image model: 3x3 and 1x1 convolutions (one strided, one dilated, one grouped), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, dilation=1, padding=1, bias=False)
        self.conv3 = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3)
        self.conv4 = nn.Conv2d(12, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.conv4(F.relu(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))


class Signal(nn.Module):
    """A 1-D convolutional model (nn.Conv1d, kernels 5 and 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 12, 5, padding=2)
        self.conv2 = nn.Conv1d(12, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(F.relu(self.conv1(x))).mean(-1))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CNN().eval()


def signal(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Signal().eval()


MODELS: dict[str, tuple[Callable[..., nn.Module], torch.Tensor]] = {
    "llama": (tiny_llama, IDS), "bert": (tiny_bert, IDS), "cnn": (cnn, IMAGES), "conv1d": (signal, SIGNAL)}


def run(model: nn.Module, kind: str, grad: bool = False) -> torch.Tensor:
    x = MODELS[kind][1]
    with torch.set_grad_enabled(grad):
        o = model(input_ids=x) if kind in ("llama", "bert") else model(x)
    return (o.logits if hasattr(o, "logits") else o).float()


def train_step(model: nn.Module, kind: str, params: list[torch.Tensor], seed: int = 0) -> None:
    """One AdamW step on a squared-output loss (gives every factor a non-trivial value)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=0.01)
    run(model, kind, grad=True).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def peft_trainable(pm: nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapter parameters under peftlab's keys (``base_model.model.`` and ``.default`` dropped)."""
    return {k.removeprefix("base_model.model.").replace(".default", ""): p
            for k, p in pm.named_parameters() if p.requires_grad and "modules_to_save" not in k}


def ours(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): p for k, p in peftlab.adapter_parameters(model, "default").items()
            if "peftlab_copy" not in k}


def to_peft(method: str, kind: str, options: dict, tmp_path) -> None:
    """peftlab attaches and trains; peft loads the files: same outputs, same merged outputs."""
    make = MODELS[kind][0]
    base = run(make(), kind)
    model = make()
    peftlab.attach(model, method, **options)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.2)
    train_step(model, kind, list(peftlab.adapter_parameters(model, "default").values()))
    model.eval()
    want = run(model, kind)
    assert not torch.allclose(want, base, atol=1e-4), "the adapter must change the output"
    peftlab.save(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    torch.testing.assert_close(run(loaded, kind), want, **TOL)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) <= set(peft.get_peft_model_state_dict(loaded))
    merged = loaded.merge_and_unload()
    peftlab.merge(model)
    torch.testing.assert_close(run(model, kind), run(merged, kind), **TOL)
    method = peftlab.adapters(model)["default"]
    for path, layer in method.adapted_layers(model, "default"):  # the same merged weights
        torch.testing.assert_close(layer.weight, merged.get_submodule(path).weight, atol=1e-6, rtol=1e-5, msg=path)


def from_peft(config, kind: str, tmp_path, wrong_peft_grads: tuple[str, ...] = ()) -> nn.Module:
    """peft attaches and trains; peftlab loads the files: same outputs and gradients, merged as peft merges.
    ``wrong_peft_grads``: tensor names whose gradient peft computes wrongly (not compared; the maths
    tests check ours against autograd through the naive formula)."""
    make = MODELS[kind][0]
    pm = peft.get_peft_model(make(), config)
    params = [p for p in pm.parameters() if p.requires_grad]
    perturb(peft_trainable(pm), scale=0.2)
    train_step(pm, kind, params)
    pm.eval()
    pm.save_pretrained(tmp_path)
    model = make()
    peftlab.load(model, tmp_path, trainable=True)
    model.eval()
    out_p, out_l = run(pm, kind, grad=True), run(model, kind, grad=True)
    torch.testing.assert_close(out_l, out_p, **TOL)
    out_p.pow(2).mean().backward()
    out_l.pow(2).mean().backward()
    theirs, mine = peft_trainable(pm), ours(model)
    assert set(theirs) == set(mine)
    for k in mine:
        if not k.endswith(wrong_peft_grads):
            torch.testing.assert_close(mine[k].grad, theirs[k].grad, atol=1e-5, rtol=1e-4, msg=k)
    merged = pm.merge_and_unload()
    peftlab.merge(model)
    torch.testing.assert_close(run(model, kind), run(merged, kind), **TOL)
    return model


def seeded_init_matches_peft(method: str, kind: str, options: dict, config) -> None:
    """The same draws as peft from one seed: every factor equal at initialisation."""
    make = MODELS[kind][0]
    model, base = make(), make()
    torch.manual_seed(7)
    peftlab.attach(model, method, **options)
    torch.manual_seed(7)
    pm = peft.get_peft_model(base, config)
    theirs, mine = peft_trainable(pm), ours(model)
    assert set(theirs) == set(mine)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def training_mode_matches_peft(method: str, options: dict, config) -> None:
    """rank_dropout and module_dropout in training: peft's draws, so one seed gives peft's output."""
    model = tiny_llama()
    peftlab.attach(model, method, **options)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.2)
    pm = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for k, p in peft_trainable(pm).items():
            p.copy_(ours(model)[k])
    model.train()
    pm.train()
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        a = run(model, "llama")
        torch.manual_seed(seed)
        b = run(pm, "llama")
        torch.testing.assert_close(a, b, **TOL)
        outs.append(a)
    assert not all(torch.allclose(outs[0], o) for o in outs[1:]), "the dropouts must act in training"


def check_config_fields(method: str, config_cls) -> None:
    """Every field of peft's config class is written by peftlab and read back (or refused by name)."""
    cls = peftlab.method_class(method)
    fields = set(config_cls().to_dict())
    written = set(cls().to_config())
    assert fields - written <= {"peft_version", "revision", "base_model_name_or_path", "auto_mapping"}
    assert written <= fields, written - fields
    for key, value in config_cls(target_modules=["q_proj"]).to_dict().items():  # peft's own defaults load
        if key in ("peft_type",):
            continue
        cls.from_config({"peft_type": method.upper(), "target_modules": ["q_proj"], key: value})
    with pytest.raises(ConfigError, match="layers_pattern"):
        cls.from_config({"peft_type": method.upper(), "target_modules": ["q_proj"], "layers_pattern": "layers"})
    with pytest.raises(ConfigError, match="target_modules"):
        cls.from_config({"peft_type": method.upper(), "target_modules": None})


# ----------------------------------------------------------------------------- the maths
def naive_loha(w1a, w1b, w2a, w2b, scale, shape, t1=None, t2=None) -> torch.Tensor:
    """delta W element by element from the paper's formula (loops over the rank)."""
    if t1 is None:
        p1 = sum(torch.outer(w1a[:, i], w1b[i]) for i in range(w1a.shape[1]))
        p2 = sum(torch.outer(w2a[:, i], w2b[i]) for i in range(w2a.shape[1]))
    else:  # W[o, c, u, v] = sum_pq T[p, q, u, v] Wa[p, o] Wb[q, c]
        r = t1.shape[0]
        p1 = sum(t1[p, q][None, None] * torch.outer(w1a[p], w1b[q])[:, :, None, None] for p in range(r) for q in range(r))
        p2 = sum(t2[p, q][None, None] * torch.outer(w2a[p], w2b[q])[:, :, None, None] for p in range(r) for q in range(r))
    return (p1 * p2 * scale).reshape(shape)


def _layer(module: nn.Module, **options) -> nn.Module:
    holder = nn.Sequential(module)
    peftlab.attach(holder, "loha", target_modules=["0"], **options)
    perturb(peftlab.adapter_parameters(holder, "default"), scale=0.3)
    return holder[0]


LAYERS = {
    "linear": (lambda: nn.Linear(24, 20), torch.randn(3, 5, 24)),
    "conv2d": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
    "conv2d-dilated": (lambda: nn.Conv2d(6, 10, (3, 2), padding=2, dilation=2), torch.randn(2, 6, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1), torch.randn(2, 6, 11)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("r", [2, 5])
def test_both_forward_forms_equal_the_naive_update(kind, r):
    make, x = LAYERS[kind]
    torch.manual_seed(0)
    layer = _layer(make(), r=r, alpha=3.0)
    w1a, w1b, w2a, w2b = (layer.__getattr__(c)["default"] for c in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    delta = naive_loha(w1a, w1b, w2a, w2b, 3.0 / r, layer.weight.shape)
    torch.testing.assert_close(layer.delta_weight("default"), delta.detach(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        want = layer.apply_delta(x, delta)
        base = type(layer).base_class.forward(layer, x)
        for form in (layer.factored_update, layer.dense_update):
            torch.testing.assert_close(form("default", x, 3.0 / r), want, **TOL)
        torch.testing.assert_close(layer(x) - base, want, **TOL)
    # gradients of the two forms agree with autograd through the naive formula
    grads = []
    for form in (layer.factored_update, layer.dense_update, lambda n, x, s: layer.apply_delta(x, naive_loha(
            w1a, w1b, w2a, w2b, s, layer.weight.shape))):
        layer.zero_grad()
        form("default", x, 3.0 / r).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in (w1a, w1b, w2a, w2b)])
    for g in grads[:2]:
        for a, b in zip(g, grads[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["conv2d", "conv2d-dilated", "conv1d"])
def test_tucker_form_equals_the_naive_update(kind):
    make, x = LAYERS[kind]
    torch.manual_seed(0)
    layer = _layer(make(), r=3, alpha=6.0, use_effective_conv2d=True)
    f = {c: layer.__getattr__(c)["default"] for c in layer.adapter_containers}
    assert f["hada_t1"].shape[:2] == (3, 3) and f["hada_w1_a"].shape == (3, layer.out_channels)
    t1, t2 = f["hada_t1"], f["hada_t2"]
    shape = (*layer.weight.shape, 1) if layer.weight.dim() == 3 else layer.weight.shape
    delta = naive_loha(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], 2.0, shape, t1, t2)
    delta = delta.reshape(layer.weight.shape)
    torch.testing.assert_close(layer.delta_weight("default"), delta.detach(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        base = type(layer).base_class.forward(layer, x)
        torch.testing.assert_close(layer(x) - base, layer.apply_delta(x, delta), **TOL)
    factors = [f[c] for c in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")]
    layer.dense_update("default", x, 2.0).pow(2).sum().backward()
    ours = [p.grad.clone() for p in factors]
    naive = layer.apply_delta(x, naive_loha(*factors[:4], 2.0, shape, *factors[4:]).reshape(layer.weight.shape))
    for want, got in zip(torch.autograd.grad(naive.pow(2).sum(), factors), ours):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_cheaper_form_is_chosen():
    """Small rank on a wide layer: factored (r^2 (d_in + d_out) per token); a rank near the
    layer's width: materialised (d_in d_out per token); the Tucker form is always materialised."""
    wide = _layer(nn.Linear(256, 256), r=4)
    x = torch.randn(64, 256)
    assert wide.factored_is_cheaper("default", x)
    assert not wide.factored_is_cheaper("default", torch.randn(256 * 256 // 16 + 1, 256))  # keeps more than delta W
    narrow = _layer(nn.Linear(32, 32), r=16)
    assert not narrow.factored_is_cheaper("default", torch.randn(64, 32))
    tucker = _layer(nn.Conv2d(16, 16, 3), r=2, use_effective_conv2d=True)
    assert not tucker.factored_is_cheaper("default", torch.randn(1, 16, 8, 8))


def test_factored_training_keeps_no_dense_update():
    """The factored form keeps only r^2-wide tensors for the backward pass, never a d_out x d_in one."""
    layer = _layer(nn.Linear(128, 96), r=4)
    x = torch.randn(2, 8, 128, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.factored_update("default", x, 1.0).sum()
    assert max(sizes) < 128 * 96 and layer.factored_is_cheaper("default", x)


# ----------------------------------------------------------------------------- peft as the oracle
PEFTLAB_CASES = {
    "llama": ("llama", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}),
    "llama-all-linear": ("llama", {"r": 2}),
    "bert": ("bert", {"r": 4, "target_modules": ["query", "value", "dense"], "modules_to_save": ["classifier"]}),
    "cnn": ("cnn", {"r": 2, "target_modules": ["conv1", "conv2", "conv3", "conv4", "head"]}),
    "cnn-tucker": ("cnn", {"r": 2, "alpha": 4.0, "use_effective_conv2d": True,
                           "target_modules": ["conv1", "conv2", "conv3", "conv4"]}),
    "conv1d": ("conv1d", {"r": 3, "use_effective_conv2d": True, "target_modules": ["conv1", "conv2"]}),
}


@pytest.mark.parametrize("case", sorted(PEFTLAB_CASES))
def test_peftlab_file_loads_in_peft(case, tmp_path):
    kind, options = PEFTLAB_CASES[case]
    to_peft("loha", kind, options, tmp_path)


PEFT_CASES = {
    "llama": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                            rank_pattern={"gate_proj": 2}, alpha_pattern={"v_proj": 5})),
    "bert": ("bert", dict(r=3, target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"])),
    "bert-regex": ("bert", dict(r=2, target_modules=r".*attention\.self\.(query|key)", init_weights=False)),
    "cnn": ("cnn", dict(r=2, alpha=3, target_modules=["conv1", "conv2", "conv3", "conv4"])),
    "cnn-tucker": ("cnn", dict(r=2, use_effective_conv2d=True, target_modules=["conv1", "conv2", "conv4", "head"])),
    "conv1d": ("conv1d", dict(r=2, use_effective_conv2d=True, target_modules=["conv1", "conv2"])),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_file_gives_peft_outputs_gradients_and_merge(case, tmp_path):
    kind, kwargs = PEFT_CASES[case]
    # peft 0.21's hand-written backward of the Tucker form (HadaWeightCP) builds the gradients of
    # hada_w1_a and hada_w2_a from the other product's factors; its forward and the rest are right
    wrong = ("hada_w1_a", "hada_w2_a") if kwargs.get("use_effective_conv2d") else ()
    from_peft(peft.LoHaConfig(**kwargs), kind, tmp_path, wrong)


def test_initialisation_draws_what_peft_draws():
    seeded_init_matches_peft("loha", "llama", {"r": 3, "target_modules": ["q_proj", "down_proj"]},
                             peft.LoHaConfig(r=3, target_modules=["q_proj", "down_proj"]))
    seeded_init_matches_peft("loha", "cnn", {"r": 2, "init": "random", "use_effective_conv2d": True,
                                             "target_modules": ["conv1", "conv4", "head"]},
                             peft.LoHaConfig(r=2, init_weights=False, use_effective_conv2d=True,
                                             target_modules=["conv1", "conv4", "head"]))


def test_training_mode_dropouts_equal_peft():
    training_mode_matches_peft("loha", {"r": 4, "rank_dropout": 0.5, "module_dropout": 0.3,
                                        "target_modules": ["q_proj", "v_proj", "down_proj"]},
                               peft.LoHaConfig(r=4, rank_dropout=0.5, module_dropout=0.3,
                                               target_modules=["q_proj", "v_proj", "down_proj"]))


def test_config_fields_are_peft_s():
    check_config_fields("loha", peft.LoHaConfig)


def test_gpt2_conv1d_is_refused_as_peft_refuses_it():
    model = tiny_gpt2()
    with pytest.raises(ConfigError, match=r"Conv1D.*peft's LOHA does not adapt.*Use lora"):
        peftlab.attach(model, "loha", target_modules=["c_attn"])
    assert not any(isinstance(m, peftlab.core.layer.AdapterLayer) for m in model.modules())
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(tiny_gpt2(), peft.LoHaConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize(("options", "match"), [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"rank_dropout": 1.0}, r"rank_dropout must be in \[0, 1\)"),
    ({"module_dropout": -0.1}, r"module_dropout must be in \[0, 1\)"),
    ({"init": "lycoris"}, "init must be one of"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"rank_pattern": {"(": 2}}, "not a regular expression"),
    ({"r": 40, "target_modules": ["q_proj"]}, "larger than both of its dimensions"),
    ({"target_modules": ["embed_tokens"]}, "cannot adapt"),
])
def test_bad_input_is_a_clear_error(options, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        peftlab.attach(model, "loha", **options)
    assert peftlab.adapters(model) == {}


def test_a_reflect_padded_convolution_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ConfigError, match="padding_mode"):
        peftlab.attach(model, "loha", target_modules=["0"])


def test_half_precision_base_trains_fp32_factors_and_merges_exactly():
    model = tiny_llama().to(torch.bfloat16)
    peftlab.attach(model, "loha", r=2, target_modules=["q_proj", "v_proj"])
    assert {p.dtype for p in peftlab.adapter_parameters(model, "default").values()} == {torch.float32}
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = run(model, "llama")
    peftlab.merge(model)
    torch.testing.assert_close(run(model, "llama"), unmerged, atol=5e-2, rtol=5e-2)
    peftlab.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_saved_config_is_peft_s(tmp_path):
    model = tiny_llama()
    peftlab.attach(model, "loha", r=4, alpha=2.0, target_modules=["*.self_attn.q_proj"], rank_dropout=0.1)
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["alpha"] == 2.0 and config["rank_dropout"] == 0.1
    assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path), peft.LoHaConfig)
    assert math.isclose(peftlab.summary(model).trainable, 2 * 4 * 4 * 32)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_two_adapters_stack_and_merge_in_any_order(method):
    """Two adapters of one method on the same layers: active together their updates add; merging
    them one after the other equals the unmerged sum; unmerging restores the weights exactly."""
    model = tiny_llama()
    peftlab.attach(model, method, "a", r=2, target_modules=["q_proj", "down_proj"])
    peftlab.attach(model, method, "b", r=1, alpha=3.0, target_modules=["q_proj", "v_proj"])
    perturb(peftlab.adapter_parameters(model, "a"), scale=0.2)
    perturb(peftlab.adapter_parameters(model, "b"), seed=5, scale=0.2)
    base = run(tiny_llama(), "llama")
    peftlab.use(model, "a")
    only_a = run(model, "llama")
    peftlab.use(model, "b")
    only_b = run(model, "llama")
    peftlab.use(model, "a", "b")
    both = run(model, "llama")
    assert not torch.allclose(only_a, base, atol=1e-4) and not torch.allclose(only_b, base, atol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        w = layer.weight + layer.delta_weight("a") + layer.delta_weight("b")
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w), **TOL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.merge(model, ["b"])
    peftlab.merge(model, ["a"])
    torch.testing.assert_close(run(model, "llama"), both, **TOL)
    peftlab.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
