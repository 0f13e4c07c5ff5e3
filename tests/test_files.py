"""Adapter files that are wrong in every way we could think of: each gives a clear error
(``peftlab.AdapterFileError`` and friends, naming what is wrong) and leaves the model as it was.
Plus adapter names, target typos, multi-adapter folders and atomic saves (more in
``test_atomic.py``; inert loading in ``test_inert_load.py``)."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import peftlab
from peftlab.core.layer import AdapterLayer
from tests.conftest import batch, out, perturb, tiny_bert, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

INPUTS = batch()
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q1_B = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"



# ----------------------------------------------------------------------------- helpers
def _saved(tmp: Path, make=tiny_llama, **options) -> Path:
    """A valid, perturbed peftlab adapter in ``tmp``."""
    options = {"r": 4, "target_modules": ["q_proj", "v_proj"], **options}
    model = make()
    peftlab.attach(model, "lora", **options)
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp)
    return tmp


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    save_file(tensors, str(path / WEIGHTS), metadata=metadata)


class Snapshot:
    """What 'the model is unchanged' means: keys, values, classes, grads flags, adapters, output."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.classes = {p: type(m) for p, m in model.named_modules()}
        self.adapters = dict(peftlab.adapters(model))
        self.active = peftlab.active(model)
        self.logits = out(model, INPUTS)

    def check(self) -> None:
        m = self.model
        assert peftlab.adapters(m) == self.adapters
        assert peftlab.active(m) == self.active
        state = m.state_dict()
        assert set(state) == set(self.state)
        for k, v in self.state.items():
            assert torch.equal(state[k], v), k
        assert {p: type(x) for p, x in m.named_modules()} == self.classes
        if not self.adapters:
            assert not any(isinstance(x, AdapterLayer) for x in m.modules())
            assert "peftlab" not in m.__dict__
        assert torch.equal(out(m, INPUTS), self.logits)


def _fails(model: nn.Module, directory, error=peftlab.AdapterFileError, name: str = "default") -> str:
    snap = Snapshot(model)
    with pytest.raises(error) as info:
        peftlab.load(model, directory, name=name)
    snap.check()
    return str(info.value)


# ----------------------------------------------------------------------------- tensor mismatches
def test_missing_keys_are_listed(tmp_path):
    d = _saved(tmp_path)
    tensors, meta = _read(d)
    del tensors[Q0_A], tensors[Q1_B]
    _rewrite(d, tensors, meta)
    msg = _fails(tiny_llama(), d)
    assert "missing" in msg and Q0_A in msg and Q1_B in msg


def test_missing_keys_in_a_peft_style_file_without_metadata(tmp_path):
    d = _saved(tmp_path)
    tensors, _ = _read(d)
    del tensors[Q0_A]
    _rewrite(d, tensors, {"format": "pt"})  # what peft writes: the config is all there is
    msg = _fails(tiny_llama(), d)
    assert "missing" in msg and Q0_A in msg


def test_unexpected_keys_are_listed(tmp_path):
    d = _saved(tmp_path)
    tensors, meta = _read(d)
    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    tensors[extra] = torch.zeros(4, 32)
    _rewrite(d, tensors, meta)
    msg = _fails(tiny_llama(), d)
    assert "unexpected" in msg and extra in msg


def test_misshaped_tensor_is_listed_with_both_shapes(tmp_path):
    d = _saved(tmp_path)
    tensors, meta = _read(d)
    tensors[Q0_A] = torch.zeros(5, 32)
    _rewrite(d, tensors, meta)
    msg = _fails(tiny_llama(), d)
    assert "mis-shaped" in msg and Q0_A in msg and "(5, 32)" in msg and "(4, 32)" in msg


def test_config_rank_that_does_not_fit_the_tensors(tmp_path):
    """Saved with r=4; the config (all a peft-style file has) claims r=8: every LoRA tensor mis-shapes."""
    d = _saved(tmp_path)
    tensors, _ = _read(d)
    _rewrite(d, tensors, {"format": "pt"})
    config = json.loads((d / CONFIG).read_text())
    config["r"] = 8
    (d / CONFIG).write_text(json.dumps(config))
    msg = _fails(tiny_llama(), d)
    assert "mis-shaped" in msg and Q0_A in msg and "(4, 32)" in msg and "(8, 32)" in msg


def test_failed_load_keeps_the_other_adapters_and_the_active_one(tmp_path):
    """A model that already carries an active adapter: a bad file loaded under a second name
    must leave the first one there, still active, with the same output."""
    d = _saved(tmp_path)
    tensors, meta = _read(d)
    del tensors[Q0_A]
    _rewrite(d, tensors, meta)
    model = tiny_llama()
    peftlab.attach(model, "lora", name="mine", r=2, target_modules=["v_proj", "o_proj"])
    perturb(peftlab.adapter_parameters(model, "mine"))
    msg = _fails(model, d, name="second")
    assert Q0_A in msg


def test_failed_load_does_not_freeze_the_model(tmp_path):
    """'A failed load leaves the model as it was' includes requires_grad: loading a bad adapter
    into a model one is about to fine-tune must not silently freeze it."""
    d = _saved(tmp_path, bias="all", target_modules=["query"], make=tiny_bert, modules_to_save=["classifier"])
    tensors, meta = _read(d)
    del tensors[sorted(tensors)[0]]
    _rewrite(d, tensors, meta)
    model = tiny_bert()
    before = {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(before.values())
    _fails(model, d)
    after = {k: p.requires_grad for k, p in model.named_parameters()}
    frozen = sorted(k for k in before if before[k] and not after[k])
    assert not frozen, f"{len(frozen)} parameters were frozen by a failed load, e.g. {frozen[:3]}"


# ----------------------------------------------------------------------------- not safetensors
def _payload(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil())


def test_pickle_payload_proves_it_would_run(tmp_path):
    """Control for the next test: unpickling this payload does create its marker file."""
    marker = tmp_path / "control-marker"
    f = pickle.loads(_payload(marker))  # noqa: S301 (that is the point)
    f.close()
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch-save", "random", "empty", "truncated"])
def test_weights_file_that_is_not_safetensors(kind, tmp_path):
    d = _saved(tmp_path / "adapter")
    marker = tmp_path / "unpickled-marker"
    weights = d / WEIGHTS
    if kind == "pickle":
        weights.write_bytes(_payload(marker))
    elif kind == "torch-save":
        torch.save({"x": torch.zeros(2), "evil": _TorchEvil(marker)}, weights)
    elif kind == "random":
        weights.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        weights.write_bytes(b"")
    else:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
    msg = _fails(tiny_llama(), d)
    assert WEIGHTS in msg
    assert not marker.exists(), "peftlab unpickled the adapter file"


class _TorchEvil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_only_a_pickled_bin_file_is_refused_with_a_pickle_hint(tmp_path):
    d = _saved(tmp_path / "adapter")
    marker = tmp_path / "bin-marker"
    tensors, _ = _read(d)
    torch.save({**tensors, "evil": _TorchEvil(marker)}, d / "adapter_model.bin")
    (d / WEIGHTS).unlink()
    msg = _fails(tiny_llama(), d)
    assert "pickle" in msg and "adapter_model.bin" in msg
    assert not marker.exists()


def test_missing_folder(tmp_path):
    msg = _fails(tiny_llama(), tmp_path / "nope")
    assert "nope" in msg


def test_a_file_instead_of_a_folder(tmp_path):
    d = _saved(tmp_path)
    msg = _fails(tiny_llama(), d / WEIGHTS)
    assert "directory" in msg


def test_invalid_json_config(tmp_path):
    d = _saved(tmp_path)
    (d / CONFIG).write_text('{"peft_type": "LORA", "r": 4,')
    msg = _fails(tiny_llama(), d)
    assert CONFIG in msg and "JSON" in msg


def test_missing_config(tmp_path):
    d = _saved(tmp_path)
    (d / CONFIG).unlink()
    msg = _fails(tiny_llama(), d)
    assert CONFIG in msg


def test_corrupt_peftlab_header_metadata(tmp_path):
    """The safetensors header is part of the file: a broken ``peftlab_options`` entry is a bad
    adapter file (AdapterFileError naming the file), not a bare json.JSONDecodeError."""
    d = _saved(tmp_path)
    tensors, meta = _read(d)
    meta["peftlab_options"] = "{not json"
    _rewrite(d, tensors, meta)
    msg = _fails(tiny_llama(), d)
    assert WEIGHTS in msg or str(d) in msg


def test_config_of_a_method_peftlab_does_not_read(tmp_path):
    d = _saved(tmp_path)
    tensors, _ = _read(d)
    _rewrite(d, tensors, {"format": "pt"})
    (d / CONFIG).write_text(json.dumps({"peft_type": "CPT", "num_virtual_tokens": 4}))
    msg = _fails(tiny_llama(), d, error=peftlab.PeftlabError)
    assert "CPT" in msg


# ----------------------------------------------------------------------------- architecture
def test_adapter_of_another_architecture_names_both(tmp_path):
    d = _saved(tmp_path)  # trained on tiny_llama
    msg = _fails(tiny_bert(), d)
    assert "llama" in msg.lower() and "bert" in msg.lower()


def test_adapter_of_another_architecture_with_matching_names_is_still_refused(tmp_path):
    """A 'type:Linear' target (kept as such in the file header) matches Llama modules too: the
    recorded architecture must still refuse the file, naming both."""
    d = _saved(tmp_path, make=tiny_bert, target_modules=["type:Linear"], exclude_modules=["classifier"])
    msg = _fails(tiny_llama(), d)
    assert "llama" in msg.lower() and "bert" in msg.lower()


# ----------------------------------------------------------------------------- adapter names
@pytest.mark.parametrize("name", ["a/b", "..", "../up", "a\x00b", ".", "a.b", "a\\b", "", " "])
def test_path_like_adapter_names_are_refused(name):
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(peftlab.ConfigError):
        peftlab.attach(model, "lora", name=name, r=2, target_modules=["q_proj"])
    snap.check()


@pytest.mark.parametrize("name", ["../up", "a/b", "."])
def test_path_like_names_are_refused_by_load_too(name, tmp_path):
    d = _saved(tmp_path / "adapter")
    _fails(tiny_llama(), d, error=peftlab.PeftlabError, name=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ----------------------------------------------------------------------------- targets
def test_target_typo_suggests_close_names():
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(peftlab.TargetError) as info:
        peftlab.attach(model, "lora", target_modules=["q_prj"])
    snap.check()
    assert "q_prj" in str(info.value) and "q_proj" in str(info.value)


def test_one_bad_entry_among_good_ones_is_named():
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(peftlab.TargetError) as info:
        peftlab.attach(model, "lora", target_modules=["q_proj", "vv_proj", "o_proj"])
    snap.check()
    msg = str(info.value)
    assert "'vv_proj'" in msg and "v_proj" in msg
    assert "'q_proj'" not in msg.split("Close names")[0]


def test_target_typo_in_a_bert_model():
    model = tiny_bert()
    with pytest.raises(peftlab.TargetError) as info:
        peftlab.attach(model, "lora", target_modules=["querry"])
    assert "query" in str(info.value)
    assert peftlab.adapters(model) == {}


# ----------------------------------------------------------------------------- several adapters
def test_default_and_other_adapters_save_to_their_folders_and_load_back(tmp_path):
    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    peftlab.attach(model, "lora", name="other", r=2, target_modules=["o_proj", "down_proj"])
    perturb(peftlab.adapter_parameters(model, "default"), seed=5)
    perturb(peftlab.adapter_parameters(model, "other"), seed=6)
    peftlab.use(model, "default")
    want_default = out(model, INPUTS)
    peftlab.use(model, "other")
    want_other = out(model, INPUTS)
    assert not torch.allclose(want_default, want_other)

    written = peftlab.save(model, tmp_path)
    assert sorted(written) == sorted([tmp_path, tmp_path / "other"])
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG, WEIGHTS, "other"}
    assert {p.name for p in (tmp_path / "other").iterdir()} == {CONFIG, WEIGHTS}
    assert json.loads((tmp_path / "other" / CONFIG).read_text())["r"] == 2

    fresh = tiny_llama()
    peftlab.load(fresh, tmp_path)
    peftlab.load(fresh, tmp_path / "other", name="other")
    assert set(peftlab.adapters(fresh)) == {"default", "other"}
    assert peftlab.active(fresh) == ["other"]
    torch.testing.assert_close(out(fresh, INPUTS), want_other, atol=1e-6, rtol=1e-6)
    peftlab.use(fresh, "default")
    torch.testing.assert_close(out(fresh, INPUTS), want_default, atol=1e-6, rtol=1e-6)


def _bias_adapter(seed: int, tmp: Path, **options) -> tuple[Path, torch.Tensor]:
    model = tiny_bert()
    peftlab.attach(model, "lora", **{"r": 2, "target_modules": ["query"], "bias": "all", **options})
    perturb(peftlab.adapter_parameters(model, "default"), seed=seed)
    peftlab.save(model, tmp)
    return tmp, out(model, INPUTS)


def test_saving_an_inactive_adapter_that_trains_biases_saves_its_own_biases(tmp_path):
    """Two adapters train the biases in place (bias='all'); the inactive one keeps its values
    aside (Slot.own). Saving must write those, not the active adapter's."""
    model = tiny_bert()
    peftlab.attach(model, "lora", name="a", r=2, target_modules=["query"], bias="all")
    perturb(peftlab.adapter_parameters(model, "a"), seed=1)
    want_a = out(model, INPUTS)
    peftlab.attach(model, "lora", name="b", r=2, target_modules=["query"], bias="all")  # b active now
    perturb(peftlab.adapter_parameters(model, "b"), seed=2)
    want_b = out(model, INPUTS)
    peftlab.save(model, tmp_path)
    for name, want in (("a", want_a), ("b", want_b)):
        fresh = tiny_bert()
        peftlab.load(fresh, tmp_path / name, name=name)
        torch.testing.assert_close(out(fresh, INPUTS), want, atol=1e-6, rtol=1e-6, msg=f"adapter {name!r}")


def test_loading_an_inactive_bias_adapter_leaves_the_active_one_alone(tmp_path):
    da, want_a = _bias_adapter(1, tmp_path / "a")
    db, want_b = _bias_adapter(2, tmp_path / "b")
    model = tiny_bert()
    peftlab.load(model, db, name="b")
    peftlab.load(model, da, name="a", activate=False)
    assert peftlab.active(model) == ["b"]
    torch.testing.assert_close(out(model, INPUTS), want_b, atol=1e-6, rtol=1e-6, msg="active adapter b changed")
    peftlab.use(model, "a")
    torch.testing.assert_close(out(model, INPUTS), want_a, atol=1e-6, rtol=1e-6, msg="adapter a did not load")


def test_one_adapter_of_a_multi_adapter_model_loads_on_its_own(tmp_path):
    """Adapter 'a' trains every bias; adapter 'b' puts LoRA on 'value'. Saved from the shared
    model, a's value biases are keyed ``value.base_layer.bias`` (value is wrapped because of b);
    loading 'a' alone (value not wrapped) must still find them."""
    model = tiny_bert()
    peftlab.attach(model, "lora", name="a", r=2, target_modules=["query"], bias="all")
    perturb(peftlab.adapter_parameters(model, "a"), seed=1)
    want_a = out(model, INPUTS)
    peftlab.attach(model, "lora", name="b", r=2, target_modules=["value"], activate=False)
    peftlab.save(model, tmp_path)
    fresh = tiny_bert()
    peftlab.load(fresh, tmp_path / "a", name="a")
    torch.testing.assert_close(out(fresh, INPUTS), want_a, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- atomic save
def test_save_is_atomic_on_a_full_disk(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_llama()
    peftlab.attach(model, "lora", r=4, target_modules=["q_proj"])
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp_path)
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    perturb(peftlab.adapter_parameters(model, "default"), seed=9)  # a newer version to save
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\x00" * 64)  # half a file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(peftlab.PeftlabError) as info:
        peftlab.save(model, tmp_path)
    assert calls, "save did not go through safetensors.torch.save_file"
    msg = str(info.value).lower()
    assert "disk space" in msg or "no space left" in msg
    assert "disk" in msg
    assert "still holds the previous version, unchanged" in msg and "overwritten" not in msg
    files_after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert files_after == files_before  # no temp file left, the old adapter untouched
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(f".{tmp_path.name}.peftlab-")]

    monkeypatch.undo()
    fresh = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftlab.load(fresh, tmp_path)  # the old adapter still loads
