"""Hot-swapping adapter weights in place (``peftlab.hotswap``) and padding to one rank
(``peftlab.prepare_hotswap``): the oracle is a fresh ``peftlab.load`` of the same file (and peft
for peft's files); a custom ``torch.compile`` backend counts compilations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import AdapterFileError, AdapterStateError, ConfigError
from tests.conftest import perturb, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

X = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def _saved(base: nn.Module, folder: Path, name: str, method: str = "lora", seed: int = 5, **opts) -> Path:
    m = copy.deepcopy(base)
    peftlab.attach(m, method, name=name, **opts)
    perturb(peftlab.adapter_parameters(m, name), seed=seed, scale=0.1)
    peftlab.save(m, folder, [name])
    return folder / name


def _fresh(base: nn.Module, path: Path) -> torch.Tensor:
    m = copy.deepcopy(base)
    peftlab.load(m, path, "fresh")
    return _logits(m)


def _fingerprint(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: s.method for n, s in model.peftlab.adapters.items()},
            [id(p) for p in model.parameters()])


def _same(a: tuple, b: tuple) -> None:
    assert a[1] == b[1] and a[2] == b[2]
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


class _Counter:
    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: list) -> object:
        self.compiles += 1
        return gm.forward


def test_prepared_adapter_takes_other_ranks_and_alphas_without_recompiling(tmp_path: Path) -> None:
    base = tiny_llama()
    files = [_saved(base, tmp_path / "a", "a", r=4, alpha=12, seed=1),
             _saved(base, tmp_path / "b", "b", r=16, alpha=8, rslora=True, seed=2),
             _saved(base, tmp_path / "c", "c", r=2, alpha=2, rank_pattern={"v_proj": 6},
                    alpha_pattern={"q_proj": 30.0}, seed=3)]
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=8)
    perturb(peftlab.adapter_parameters(model, "default"), seed=9, scale=0.1)
    before = _logits(model)
    peftlab.prepare_hotswap(model, rank=16)
    _close(_logits(model), before)
    params = [id(p) for p in model.parameters()]
    counter = _Counter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        _close(compiled(X).logits, before)
    for path in files * 2:
        peftlab.hotswap(model, path)
        with torch.no_grad():
            _close(compiled(X).logits, _fresh(base, path))
        assert [id(p) for p in model.parameters()] == params  # in place: the same parameter objects
    assert counter.compiles == 1


def test_the_padded_form_saves_and_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=4, alpha=10, rslora=True, target_modules=["q_proj", "v_proj"])
    perturb(peftlab.adapter_parameters(model, "default"), seed=4, scale=0.1)
    peftlab.prepare_hotswap(model, rank=8)
    peftlab.hotswap(model, _saved(base, tmp_path / "src", "x", r=6, alpha=9, target_modules=["q_proj", "v_proj"]))
    peftlab.save(model, tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        _close(theirs(X).logits, _logits(model), 1e-5)
    assert peftlab.adapters(model)["default"].r == 8


def test_a_peft_trained_file_hot_swaps_in(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=6, lora_alpha=20,
                                                                      target_modules=["q_proj", "v_proj"]))
    perturb({k: v for k, v in theirs.named_parameters() if "lora_" in k}, seed=2, scale=0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=8, target_modules=["q_proj", "v_proj"])
    peftlab.prepare_hotswap(model, rank=8)
    peftlab.hotswap(model, tmp_path / "peft")
    with torch.no_grad():
        _close(_logits(model), theirs.eval()(X).logits, 1e-5)


def test_unprepared_adapter_takes_only_its_own_shapes_and_scales(tmp_path: Path) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=4, alpha=8)
    same = _saved(base, tmp_path / "same", "s", r=4, alpha=8, dropout=0.1, seed=3)
    peftlab.hotswap(model, same)
    _close(_logits(model), _fresh(base, same))
    before = _fingerprint(model)
    for path, match in [(_saved(base, tmp_path / "rank", "r", r=8, alpha=16), r"prepare_hotswap"),
                        (_saved(base, tmp_path / "alpha", "a", r=4, alpha=4), r"scale 1 differ .*prepare_hotswap"),
                        (_saved(base, tmp_path / "mods", "m", r=4, alpha=8, target_modules=["q_proj"]),
                         r"missing .*same modules"),
                        (_saved(base, tmp_path / "dora", "d", r=4, alpha=8, dora=True), r"unexpected|dora"),
                        (_saved(base, tmp_path / "ia3", "i", method="ia3"), r"holds a ia3 adapter")]:
        with pytest.raises(AdapterFileError, match=match):
            peftlab.hotswap(model, path)
        _same(_fingerprint(model), before)


def test_prepare_refusals_change_nothing(tmp_path: Path) -> None:
    model = tiny_llama()
    peftlab.attach(model, "lora", r=8)
    before = _fingerprint(model)
    with pytest.raises(ConfigError, match=r"rank 4 is below this adapter's rank 8"):
        peftlab.prepare_hotswap(model, rank=4)
    _same(_fingerprint(model), before)
    with pytest.raises(ConfigError, match="positive int"):
        peftlab.prepare_hotswap(model, rank=True)  # type: ignore[arg-type]
    peftlab.merge(model)
    with pytest.raises(AdapterStateError, match="merged"):
        peftlab.prepare_hotswap(model, rank=16)
    with pytest.raises(AdapterStateError, match="merged"):
        peftlab.hotswap(model, _saved(tiny_llama(), tmp_path, "z", r=8))
    peftlab.unmerge(model)
    other = tiny_llama()
    peftlab.attach(other, "houlsby")
    with pytest.raises(ConfigError, match="houlsby: adapters of this method are not padded"):
        peftlab.prepare_hotswap(other, rank=8)


def test_a_failed_write_leaves_the_model_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peftlab.core.state as state

    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, "lora", r=8)
    perturb(peftlab.adapter_parameters(model, "default"), seed=1, scale=0.1)
    peftlab.prepare_hotswap(model, rank=8)
    path = _saved(base, tmp_path, "n", r=4, alpha=3)
    before = _fingerprint(model)
    real, calls = state.before_write, []

    def failing(t: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise OSError("injected")
        real(t)

    monkeypatch.setattr(state, "before_write", failing)
    with pytest.raises(OSError, match="injected"):
        peftlab.hotswap(model, path)
    _same(_fingerprint(model), before)
    monkeypatch.setattr(state, "before_write", real)
    peftlab.hotswap(model, path)
    _close(_logits(model), _fresh(base, path))


@pytest.mark.parametrize("method", ["houlsby", "ia3", "loha"])
def test_other_methods_swap_the_same_config(method: str, tmp_path: Path) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    peftlab.attach(model, method)
    counter = _Counter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(X)
    path = _saved(base, tmp_path, "n", method=method)
    peftlab.hotswap(model, path)
    with torch.no_grad():
        _close(compiled(X).logits, _fresh(base, path))
    assert counter.compiles == 1


def test_padded_adapters_of_different_ranks_serve_one_mixed_batch(tmp_path: Path) -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    paths = [_saved(base, tmp_path / f"t{r}", f"t{r}", r=r, alpha=2 * r, seed=r) for r in (2, 8, 12)]
    for p in paths:
        peftlab.load(model, p, p.name)
    peftlab.prepare_hotswap(model, rank=16)
    shapes = {tuple(t.shape) for k, t in model.state_dict().items() if ".q_proj.lora_A." in k and "layers.0." in k}
    assert shapes == {(16, 32)}
    names = ["t2", "t8", "t12", None]
    x = X.repeat(2, 1)
    with torch.inference_mode(), peftlab.per_row(model, names):
        routed = model(x).logits
    for i, n in enumerate(names):
        ref = _logits(base)[i % 2] if n is None else _fresh(base, tmp_path / n / n)[i % 2]
        _close(routed[i], ref)
    peftlab.hotswap(model, paths[0], "t12")  # the stacks follow an in-place swap
    with torch.inference_mode(), peftlab.per_row(model, ["t12"] * 4):
        _close(model(x).logits[:2], _fresh(base, paths[0]))
