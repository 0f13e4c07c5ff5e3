"""BOFT: a naive dense reference of the butterfly product, and peft both ways (outputs, gradients,
merge) for one and several butterfly factors, on Linear and Conv2d layers."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.methods.boft import BOFT, PEFT_HANDLED, PEFT_METADATA, butterfly_permutation, cayley_exact
from tests.conftest import assert_same_as_peft, perturb, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]
TOL = {"atol": 1e-5, "rtol": 1e-5}
X = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(1))
CASES = {"llama": (tiny_llama, ["q_proj", "v_proj", "o_proj", "down_proj"]),
         "bert": (tiny_bert, ["query", "value", "output.dense"])}


# ----------------------------------------------------------------------------- naive reference
def naive_permutation(n: int, blocks: int, half: int) -> list[int]:
    """The butterfly permutation from the paper's description, written out element by element:
    within each of ``blocks`` groups, chunks of ``half`` features, even-numbered chunks first."""
    group = n // blocks
    perm: list[int] = []
    for g in range(blocks):
        chunks = [list(range(g * group + c * half, g * group + c * half + half)) for c in range(group // half)]
        for c in chunks[0::2] + chunks[1::2]:
            perm += c
    return perm


def naive_butterfly(a: torch.Tensor, d: int) -> torch.Tensor:
    """Dense ``B = M_(m-1) ... M_0``, ``M_i = P_i diag(cayley(A_i)) P_i^T`` (``P[j, perm[j]] = 1``),
    built with dense matrices and a per-block Cayley transform computed by an explicit inverse."""
    m, blocks, b, _ = a.shape
    out = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        rots = []
        for j in range(blocks):
            s = 0.5 * (a[i, j] - a[i, j].T).double()
            eye = torch.eye(b, dtype=torch.float64)
            rots.append((eye - s) @ torch.linalg.inv(eye + s))
        bd = torch.block_diag(*rots)
        perm = list(range(d)) if m == 1 else naive_permutation(d, blocks // 2**i, b // 2)
        p = torch.zeros(d, d, dtype=torch.float64)
        p[torch.arange(d), torch.tensor(perm)] = 1
        out = (p @ bd @ p.T) @ out
    return out


@pytest.mark.parametrize(("d", "factors", "b"), [(16, 1, 4), (16, 2, 4), (16, 3, 2), (32, 3, 4), (24, 2, 6)])
def test_linear_equals_the_dense_butterfly_product(d, factors, b):
    layer = nn.Linear(d, 5)
    ref = nn.Linear(d, 5)
    ref.load_state_dict(layer.state_dict())
    model = nn.Sequential(layer)
    peftlab.attach(model, "boft", block_size=b, n_butterfly_factor=factors, target_modules=["0"], init_weights=False)
    a, s = layer.boft_R["default"].detach(), layer.boft_s["default"].detach()
    assert a.shape == (factors, d // b, b, b) and s.shape == (5, 1)
    big = naive_butterfly(a, d)
    torch.testing.assert_close(big @ big.T, torch.eye(d, dtype=torch.float64), atol=1e-10, rtol=0)  # orthogonal
    x = torch.randn(3, d)
    want = (x.double() @ big @ ref.weight.double().T) * s.double().T + ref.bias.double()
    torch.testing.assert_close(model(x).double(), want, atol=1e-5, rtol=1e-5)
    # the butterfly connects every input to b * 2^(m-1) of them, no more
    reach = (big.abs() > 1e-12).sum(1)
    assert set(reach.tolist()) == {min(d, b * 2 ** (factors - 1))}


def test_permutation_matches_the_naive_one():
    for n, blocks, half in [(16, 4, 2), (16, 2, 2), (32, 8, 2), (24, 4, 3), (64, 4, 8)]:
        assert butterfly_permutation(n, blocks, half).tolist() == naive_permutation(n, blocks, half)


def test_cayley_is_orthogonal_and_zero_is_the_identity():
    a = torch.randn(5, 6, 6)
    q = cayley_exact(a)
    torch.testing.assert_close(q @ q.mT, torch.eye(6).expand(5, 6, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(cayley_exact(torch.zeros(2, 3, 3)), torch.eye(3).expand(2, 3, 3))


# ----------------------------------------------------------------------------- peft both ways
@pytest.fixture
def peft_butterfly(monkeypatch):
    """peft computes BOFT with more than one butterfly factor only through its CUDA extension
    (without it, it silently uses one factor). The oracle for several factors is peft's own maths
    with that one kernel, a block-diagonal assembly, done by torch: the extension's entry point is
    replaced by an object with its ``forward`` / ``backward``."""
    import peft.tuners.boft.layer as boft_layer

    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        n, b = blocks.shape[1], blocks.shape[2]
        return [torch.stack([torch.stack([g[j * b:(j + 1) * b, j * b:(j + 1) * b] for j in range(n)]) for g in grad])]

    assert callable(boft_layer.get_fbd_cuda), "peft's BOFT no longer has get_fbd_cuda: update this oracle"
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: types.SimpleNamespace(forward=forward, backward=backward))


VARIANTS = {  # peftlab options -> the same peft options
    "oft-form": ({"block_size": 4}, {"boft_block_size": 4}),
    "two-factors": ({"block_size": 4, "n_butterfly_factor": 2}, {"boft_block_size": 4, "boft_n_butterfly_factor": 2}),
    "three-factors-by-count": ({"block_num": 4, "block_size": 0, "n_butterfly_factor": 3},
                               {"boft_block_num": 4, "boft_block_size": 0, "boft_n_butterfly_factor": 3}),
}


def _train_step(model, params) -> None:
    model.train()
    opt = torch.optim.AdamW(params, lr=2e-2)
    model(input_ids=X).logits.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", sorted(CASES))
def test_peftlab_file_loads_in_peft_after_a_step(arch, variant, tmp_path, peft_butterfly):
    from peft import PeftModel

    build, targets = CASES[arch]
    ours, _ = VARIANTS[variant]
    model = build()
    peftlab.attach(model, "boft", target_modules=targets, **ours)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.05)
    _train_step(model, list(peftlab.adapter_parameters(model, "default").values()))
    with torch.no_grad():
        want = model(input_ids=X).logits
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) == set(peft.BOFTConfig(target_modules=["x"]).to_dict())  # peft's fields, nothing else
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X).logits, want, **TOL)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=X).logits, want, **TOL)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_file_gives_peft_outputs_gradients_and_merge(arch, variant, tmp_path, peft_butterfly):
    build, targets = CASES[arch]
    _, theirs_kw = VARIANTS[variant]
    pm = peft.get_peft_model(build(), peft.BOFTConfig(target_modules=targets, **theirs_kw))
    perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.05)
    _train_step(pm, [p for p in pm.parameters() if p.requires_grad])
    pm.save_pretrained(tmp_path)
    model = build()
    peftlab.load(model, tmp_path, trainable=True)
    assert_same_as_peft(model, pm, X, TOL)


@pytest.mark.parametrize("variant", ["two-factors", "three-factors-by-count"])
@pytest.mark.parametrize("arch", sorted(CASES))
def test_file_of_peft_without_its_extension_loads_as_what_it_computed(arch, variant, tmp_path, monkeypatch):
    """peft without its CUDA extension (every CPU) keeps ``boft_n_butterfly_factor`` > 1 in the
    config but trains and saves one factor: peftlab reads the tensors' one factor, warns, and gives
    peft's outputs, gradients and merge; a file that really has the factors loads with no warning."""
    import warnings

    import peft.tuners.boft.layer as boft_layer

    assert callable(boft_layer.get_fbd_cuda), "peft's BOFT no longer has get_fbd_cuda: update this test"
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)  # what peft finds without the extension
    build, targets = CASES[arch]
    ours_kw, theirs_kw = VARIANTS[variant]
    pm = peft.get_peft_model(build(), peft.BOFTConfig(target_modules=targets, **theirs_kw))
    perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.05)
    _train_step(pm, [p for p in pm.parameters() if p.requires_grad])
    pm.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["boft_n_butterfly_factor"] == theirs_kw["boft_n_butterfly_factor"] > 1  # the config keeps it
    model = build()
    with pytest.warns(UserWarning, match="without its CUDA extension"):
        peftlab.load(model, tmp_path / "peft", trainable=True)
    assert peftlab.adapters(model)["default"].n_butterfly_factor == 1
    assert_same_as_peft(model, pm, X, TOL)

    real = build()
    peftlab.attach(real, "boft", target_modules=targets, **ours_kw)
    peftlab.save(real, tmp_path / "peftlab")
    again = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftlab.load(again, tmp_path / "peftlab")
    assert peftlab.adapters(again)["default"].n_butterfly_factor == ours_kw["n_butterfly_factor"]


def test_bias_modes_match_peft_both_ways(tmp_path):
    from peft import PeftModel

    for mode in ("boft_only", "all"):
        model = tiny_bert()
        peftlab.attach(model, "boft", block_size=4, target_modules=["query", "value"], bias=mode)
        perturb(peftlab.adapter_parameters(model, "default"), scale=0.05)
        with torch.no_grad():
            want = model(input_ids=X).logits
        peftlab.save(model, tmp_path / mode)
        loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / mode).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=X).logits, want, **TOL)
        pm = peft.get_peft_model(tiny_bert(), peft.BOFTConfig(boft_block_size=4, target_modules=["query", "value"],
                                                              bias=mode))
        perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.05)
        pm.save_pretrained(tmp_path / f"peft-{mode}")
        back = tiny_bert()
        peftlab.load(back, tmp_path / f"peft-{mode}")
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=X).logits, pm.eval()(input_ids=X).logits, **TOL)


# ----------------------------------------------------------------------------- a small CNN
class CNN(nn.Module):
    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(4, 8, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


IMAGES = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("kernel", "factors"), [(1, 1), (3, 1), (3, 2)])
def test_conv2d_equals_the_dense_reference_and_peft_both_ways(kernel, factors, tmp_path, peft_butterfly):
    from peft import PeftModel

    model = CNN(kernel)
    base = model(IMAGES)
    opts = {"block_size": 2, "n_butterfly_factor": factors, "target_modules": ["conv1", "conv2", "head"]}
    peftlab.attach(model, "boft", **opts)
    torch.testing.assert_close(model(IMAGES), base, atol=1e-6, rtol=0)  # identity at init
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.2)
    got = model(IMAGES)
    conv = model.conv1
    a, s = conv.boft_R["default"].detach(), conv.boft_s["default"].detach()
    assert s.shape == (1, 8)  # peft's layout on Conv2d (Linear: (out, 1))
    big = naive_butterfly(a, 4 * kernel * kernel)
    w = (conv.weight.detach().double().reshape(8, -1) @ big.T) * s.double().T  # W' = s * (W_flat B^T)
    ref = nn.functional.conv2d(IMAGES.double(), w.reshape(conv.weight.shape), conv.bias.double(), padding=kernel // 2)
    torch.testing.assert_close(conv(IMAGES).double(), ref, atol=1e-5, rtol=1e-5)

    peftlab.save(model, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(CNN(kernel), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES), got, **TOL)
        torch.testing.assert_close(loaded.merge_and_unload()(IMAGES), got, **TOL)

    pm = peft.get_peft_model(CNN(kernel), peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=factors,
                                                          target_modules=["conv1", "conv2", "head"]))
    perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.2)
    pm.save_pretrained(tmp_path / "theirs")
    back = CNN(kernel)
    peftlab.load(back, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(IMAGES), pm(IMAGES), **TOL)
        torch.testing.assert_close(back(IMAGES), pm.merge_and_unload()(IMAGES), **TOL)


# ----------------------------------------------------------------------------- behaviour
def test_dropout_replaces_blocks_of_one_factor_in_training_only():
    layer = nn.Linear(16, 4)
    model = nn.Sequential(layer)
    peftlab.attach(model, "boft", block_size=2, n_butterfly_factor=3, dropout=0.5, target_modules=["0"],
                   init_weights=False)
    eye = torch.eye(2)
    model.eval()
    assert not any(torch.equal(r, eye) for r in layer.rotations("default").flatten(0, 1))
    model.train()
    for _ in range(5):
        rot = layer.rotations("default")
        dropped = [[torch.equal(r, eye) for r in factor] for factor in rot]
        assert sorted(sum(f) for f in dropped) == [0, 0, 4]  # int(0.5 * 8) blocks of one factor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_active_adapters_merge_to_what_they_compute_and_unmerge_exactly(dtype):
    model = tiny_llama().to(dtype)
    peftlab.attach(model, "boft", block_size=4, n_butterfly_factor=2, target_modules=["q_proj", "v_proj", "down_proj"])
    peftlab.attach(model, "boft", "other", block_size=8, target_modules=["q_proj", "o_proj"])
    perturb(peftlab.adapter_parameters(model, "default"), seed=1, scale=0.1)
    perturb(peftlab.adapter_parameters(model, "other"), seed=2, scale=0.1)
    peftlab.use(model, "default", "other")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(input_ids=X).logits.float()
        for _ in range(3):
            peftlab.merge(model)
            got = model(input_ids=X).logits.float()
            peftlab.unmerge(model)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    plain = peftlab.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=X).logits.float(), want, atol=tol, rtol=tol)


def test_boft_trains():
    model = tiny_llama()
    peftlab.attach(model, "boft", block_size=4, n_butterfly_factor=2)
    model.train()
    opt = torch.optim.AdamW(peftlab.adapter_parameters(model, "default").values(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_refusals_name_the_way_out():
    with pytest.raises(ConfigError, match=r"GPT-2 Conv1D layer.*exclude_modules"):
        peftlab.attach(tiny_gpt2(), "boft", target_modules=["c_attn"])
    with pytest.raises(PeftlabError, match=r"cannot adapt"):
        peftlab.attach(tiny_gpt2(), "boft", target_modules=["wte"])
    for conv in (nn.Conv2d(4, 4, (3, 1)), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2),
                 nn.Conv2d(4, 4, 3, stride=(1, 2)), nn.Conv2d(4, 4, 3, padding="same"),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        model = nn.Sequential(conv)
        with pytest.raises(ConfigError, match=r"square kernels with groups=1.*exclude_modules"):
            peftlab.attach(model, "boft", block_size=4, target_modules=["0"])
        assert type(model[0]) is nn.Conv2d
    for opts, match in [({"block_size": 5}, "not divisible by block_size 5"),
                        ({"block_num": 3, "block_size": 0}, "not divisible by block_num 3"),
                        ({"block_size": 4, "n_butterfly_factor": 5}, r"multiple of block_size x 2\^4"),
                        ({"block_num": 4, "block_size": 0, "n_butterfly_factor": 4}, r"multiple of 2\^3"),
                        ({"block_size": 3, "n_butterfly_factor": 2}, "not divisible|must both be even")]:
        model = tiny_llama()
        with pytest.raises(ConfigError, match=match):
            peftlab.attach(model, "boft", target_modules=["q_proj", "down_proj"], **opts)
        assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # nothing changed
    for opts, match in [({"block_num": 4, "block_size": 8}, "exactly one of"), ({"block_size": 0}, "exactly one"),
                        ({"block_size": -1}, ">= 0"), ({"dropout": 1.0}, r"\[0, 1\)"),
                        ({"n_butterfly_factor": 0}, ">= 1"), ({"bias": "lora_only"}, "bias must be one of"),
                        ({"layers_pattern": ["("]}, "regular expression")]:
        with pytest.raises(ConfigError, match=match):
            peftlab.get_method("boft", **opts)


def test_every_peft_config_field_is_handled_or_metadata():
    fields = set(peft.BOFTConfig(target_modules=["x"]).to_dict())
    assert fields <= PEFT_HANDLED | PEFT_METADATA, sorted(fields - PEFT_HANDLED - PEFT_METADATA)
    assert set(BOFT().to_config()) == fields
    default = peft.BOFTConfig(target_modules=["q_proj"]).to_dict()
    default["peft_type"] = "BOFT"
    mine = BOFT.from_config(json.loads(json.dumps(default, default=list)))
    assert (mine.block_size, mine.block_num, mine.n_butterfly_factor, mine.dropout) == (4, 0, 1, 0.0)
    with pytest.raises(ConfigError, match="does not implement.*'rank_pattern'"):
        BOFT.from_config({**default, "rank_pattern": {"q": 2}})
