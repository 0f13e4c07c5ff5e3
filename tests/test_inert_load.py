"""Loading is inert, and adapter_config.json is the one source of truth.

* Nothing named in a file is imported or loaded (tokenizers, model classes, libraries).
* Shapes are checked against the model before anything is allocated: a 5 KB folder whose config
  says r=2e6 allocates nothing.
* Only regular files of bounded size are read: a FIFO, a device, a directory or a link to one
  is refused at once.
* Every malformed input is an AdapterFileError naming the file and the field, and the model is
  exactly as before (checked by :class:`tests.test_files.Snapshot`), also for random
  corruptions of a valid folder (hypothesis).
* An edited ``lora_alpha`` in adapter_config.json is followed as peft follows it: the same
  logits from both libraries on the same folder.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import json
import os
import resource
import shutil
import signal
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.core import files
from tests.conftest import batch, out, perturb, tiny_llama
from tests.test_files import CONFIG, Q0_A, WEIGHTS, Snapshot

pytestmark = [pytest.mark.usefixtures("one_thread")]

INPUTS = batch()


def _saved(directory: Path, **options) -> Path:
    model = tiny_llama()
    peftlab.attach(model, "lora", **{"r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj"], **options})
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, directory)
    return directory


@contextlib.contextmanager
def _within(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def alarm(signum, frame):
        raise TimeoutError(f"load did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _refused(directory: Path, *words: str, make=tiny_llama) -> str:
    """Load fails with an AdapterFileError that contains ``words``; the model is unchanged."""
    model = make()
    snap = Snapshot(model)
    with _within(20), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(peftlab.AdapterFileError) as info:
            peftlab.load(model, directory)
    snap.check()
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)
    return msg


def _edit(directory: Path, **fields) -> None:
    config = json.loads((directory / CONFIG).read_text())
    config.update(fields)
    (directory / CONFIG).write_text(json.dumps(config))


# ----------------------------------------------------------------------------- one source of truth
def test_edited_lora_alpha_gives_the_same_logits_as_peft(tmp_path):
    peft = pytest.importorskip("peft")
    d = _saved(tmp_path / "a")
    saved_with_16 = tiny_llama()
    peftlab.load(saved_with_16, d)
    _edit(d, lora_alpha=64)

    ours = tiny_llama()
    with pytest.warns(UserWarning, match=r"following it, as peft does.*alpha: 16 in the header, 64 in the config"):
        peftlab.load(ours, d)
    assert peftlab.adapters(ours)["default"].alpha == 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(d))
    torch.testing.assert_close(out(ours, INPUTS), out(theirs, INPUTS), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out(ours, INPUTS), out(saved_with_16, INPUTS), atol=1e-3), "the edit had no effect"


def test_an_unedited_config_keeps_peftlab_only_options(tmp_path):
    """Globs and layer ranges live in the header; they are used while the config is exactly the
    one they were saved with (its sha256 is in the header)."""
    d = _saved(tmp_path / "a", target_modules=["*.q_proj"], layers=["0-0"])
    assert json.loads((d / CONFIG).read_text())["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        peftlab.load(model, d)
    method = peftlab.adapters(model)["default"]
    assert method.target_modules == ("*.q_proj",) and method.layers == ("0-0",)


def test_an_edited_config_wins_over_the_header_also_for_targets(tmp_path):
    d = _saved(tmp_path / "a")
    _edit(d, target_modules=["q_proj"])  # v_proj's tensors are now unexpected, as in peft
    _refused(d, "unexpected keys", "v_proj.lora_A.weight")


# ----------------------------------------------------------------------------- no allocation before the check
def _peak_growth_mb(directory: Path, *words: str, make=tiny_llama) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(directory, *words, make=make)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_a_huge_rank_in_the_config_allocates_nothing(tmp_path):
    d = _saved(tmp_path / "a")
    _edit(d, r=2_000_000)  # the real attach would allocate 2e6 x 32 fp32 per tensor: 2 GB in all
    assert sum(p.stat().st_size for p in d.iterdir()) < 20_000
    grown = _peak_growth_mb(d, str(d), "2000000")
    assert grown < 100, f"peak memory grew by {grown:.0f} MB"


def test_a_huge_prompt_in_the_config_is_shape_checked_before_allocation(tmp_path):
    """A size the method accepts (10M virtual tokens: 1.3 GB) is compared with the file's
    (4, 32) on a meta-device copy of the model first."""
    def long_llama():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, pad_token_id=0,
                                            max_position_embeddings=2**30)).eval()

    model = long_llama()
    peftlab.attach(model, "prompt_tuning", num_virtual_tokens=4)
    peftlab.save(model, tmp_path / "p")
    _edit(tmp_path / "p", num_virtual_tokens=10_000_000)
    grown = _peak_growth_mb(tmp_path / "p", "mis-shaped", "10000000", "(4, 32)", make=long_llama)
    assert grown < 100, f"peak memory grew by {grown:.0f} MB"


def test_an_overflowing_rank_is_a_file_error(tmp_path):
    d = _saved(tmp_path / "a")
    _edit(d, r=10**30)
    _refused(d, str(d))


def _rewrite_header(d: Path, edit) -> None:
    data = (d / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_a_huge_shape_declared_in_the_header_is_refused_before_reading(tmp_path):
    d = _saved(tmp_path / "a")

    def huge(header):
        entry = header[Q0_A]
        entry["shape"] = [2**40, 32]
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 2**40 * 32 * 4]

    _rewrite_header(d, huge)
    _refused(d, WEIGHTS, "bytes")


def test_a_header_length_bomb_is_refused(tmp_path):
    d = _saved(tmp_path / "a")
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _refused(d, WEIGHTS, "header length")


@pytest.mark.parametrize("dtype", ["I32", "BOOL", "F16", "XX"])
def test_a_wrong_dtype_in_the_header_is_refused(dtype, tmp_path):
    d = _saved(tmp_path / "a")
    _rewrite_header(d, lambda h: h[Q0_A].update(dtype=dtype))
    _refused(d, WEIGHTS)


def test_a_flipped_data_byte_fails_the_checksum(tmp_path):
    d = _saved(tmp_path / "a")
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-3] ^= 0x40
    (d / WEIGHTS).write_bytes(bytes(data))
    _refused(d, WEIGHTS, "checksum")


# ----------------------------------------------------------------------------- regular files only
def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dangling-link":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "directory":
        path.mkdir()
    elif kind == "link-to-fifo":
        os.mkfifo(path.parent / "fifo")
        path.symlink_to(path.parent / "fifo")


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "link-to-fifo"])
def test_only_regular_files_are_read(name, kind, tmp_path):
    d = _saved(tmp_path / "a")
    _replace(d / name, kind)
    words = {"fifo": "a FIFO", "dev-zero": "a character device", "directory": "a directory",
             "link-to-fifo": "a FIFO"}
    _refused(d, name, words[kind])


def test_a_dangling_link_is_a_missing_file(tmp_path):
    d = _saved(tmp_path / "a")
    _replace(d / CONFIG, "dangling-link")
    _refused(d, CONFIG)


def test_links_to_regular_files_are_followed(tmp_path):
    """The Hugging Face cache keeps files as links into a blobs folder."""
    d = _saved(tmp_path / "a")
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for name in (CONFIG, WEIGHTS):
        shutil.move(d / name, blobs / name)
        (snapshot / name).symlink_to(blobs / name)
    model = tiny_llama()
    peftlab.load(model, snapshot)
    assert "default" in peftlab.adapters(model)


def test_an_oversized_config_is_not_read(tmp_path):
    d = _saved(tmp_path / "a")
    config = (d / CONFIG).read_text()
    (d / CONFIG).write_text(config[:-2] + " " * files.JSON_LIMIT + "}\n")
    _refused(d, CONFIG, "bytes")


# ----------------------------------------------------------------------------- malformed JSON
@pytest.mark.parametrize(("content", "words"), [
    (b"[1, 2]", ["JSON list", "not an object"]),
    (b"\xff\xfe{}", ["not UTF-8"]),
    (b"[" * 200_000, ["deeper than"]),
    (b'{"a":' * 100 + b"1" + b"}" * 100, ["deeper than"]),
    (b'{"r": 4,', ["not valid JSON"]),
    (b"{}", ["'peft_type'"]),
    (b'{"peft_type": 5}', ["'peft_type'", "string"]),
    (b'{"peft_type": "NOPE"}', ["'NOPE'", "readable peft types"]),
])
def test_malformed_configs_name_the_file_and_the_problem(content, words, tmp_path):
    d = _saved(tmp_path / "a")
    (d / CONFIG).write_bytes(content)
    _refused(d, CONFIG, *words)


@pytest.mark.parametrize(("field", "value", "option"), [
    ("r", "8", "'r'"), ("r", True, "'r'"), ("r", [4], "'r'"), ("r", 0, "r must be a positive integer"),
    ("lora_alpha", float("nan"), "alpha"), ("lora_alpha", float("inf"), "alpha"), ("lora_alpha", "x", "alpha"),
    ("lora_dropout", "high", "'high'"), ("target_modules", 5, "5"), ("target_modules", [1, 2], "target_modules"),
    ("rank_pattern", {"q_proj": "2"}, "rank_pattern"), ("rank_pattern", [1], "[1]"), ("bias", 3, "bias"),
    ("lora_bias", True, "lora_bias"),
])
def test_wrong_field_types_name_the_field(field, value, option, tmp_path):
    d = _saved(tmp_path / "a")
    _edit(d, **{field: value})
    _refused(d, CONFIG, option)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("peftlab_options", "[1]", ["peftlab_options", "list"]),
    ("peftlab_options", '{"r": "4"}', ["peftlab_options", "r must be an integer"]),
    ("peftlab_options", '{"nope": 1}', ["peftlab_options", "nope"]),
    ("peftlab_method", "nope", ["peftlab_method", "nope"]),
    ("peftlab_base", '{"model_type": 5}', ["peftlab_base"]),
    ("peftlab_base", "[[[", ["peftlab_base"]),
])
def test_malformed_header_metadata_names_the_field(key, value, words, tmp_path):
    d = _saved(tmp_path / "a")
    _rewrite_header(d, lambda h: h["__metadata__"].update({key: value}))
    _refused(d, WEIGHTS, *words)


# ----------------------------------------------------------------------------- nothing named is loaded
class _Recorder(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names, self.asked = names, []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            self.asked.append(name)
        return None


def test_names_in_a_config_are_never_imported_or_loaded(tmp_path, monkeypatch):
    import transformers

    d = _saved(tmp_path / "a")
    _edit(d, auto_mapping={"base_model_class": "Evil", "parent_library": "peftlab_evil_module"},
          base_model_name_or_path="peftlab_evil_module/model", revision="main")
    recorder = _Recorder({"peftlab_evil_module"})
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])

    def forbidden(*args, **kwargs):
        raise AssertionError(f"load reached out for {args}")

    for cls in (transformers.AutoTokenizer, transformers.AutoModel, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", forbidden)
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftlab.load(model, d)
    assert recorder.asked == []


def test_a_prompt_config_naming_a_tokenizer_does_not_load_it(tmp_path, monkeypatch):
    import transformers

    model = tiny_llama()
    peftlab.attach(model, "prompt_tuning", num_virtual_tokens=4)
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp_path / "p")
    _edit(tmp_path / "p", prompt_tuning_init="TEXT", prompt_tuning_init_text="hello world",
          tokenizer_name_or_path="peftlab_evil_module/tokenizer")
    calls = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a))
    fresh = tiny_llama()
    snap = Snapshot(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peftlab.load(fresh, tmp_path / "p")
        except peftlab.PeftlabError:
            snap.check()
    assert calls == [], "loading an adapter loaded a tokenizer named in its config"


# ----------------------------------------------------------------------------- random corruptions
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
_files = st.sampled_from([CONFIG, WEIGHTS])
_ops = st.one_of(
    st.tuples(st.just("truncate"), _files, st.floats(0, 1)),
    st.tuples(st.just("flip"), _files, st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("field"), st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                                                 "peft_type", "rank_pattern", "alpha_pattern", "modules_to_save",
                                                 "use_rslora", "init_lora_weights", "layers_to_transform",
                                                 "fan_in_fan_out", "exclude_modules", "new_field"]), _json),
    st.tuples(st.just("drop"), st.sampled_from(["r", "lora_alpha", "peft_type", "target_modules"])),
    st.tuples(st.just("replace"), _files, st.sampled_from(["fifo", "dev-zero", "dangling-link", "directory"])),
    st.tuples(st.just("shape"), st.integers(0, 7), st.lists(st.integers(0, 2**45), max_size=3)),
    st.tuples(st.just("dtype"), st.integers(0, 7), st.sampled_from([*files.DTYPES, "F4", ""])),
    st.tuples(st.just("meta"), st.sampled_from(["peftlab_options", "peftlab_method", "peftlab_base",
                                                "peftlab_config_sha256", "peftlab_data_sha256"]), st.text(max_size=20)),
)


def _corrupt(d: Path, op: tuple) -> None:
    kind = op[0]
    touched = op[1] if kind in ("truncate", "flip") else CONFIG if kind in ("field", "drop") else \
        None if kind == "replace" else WEIGHTS
    if touched is not None and not (d / touched).is_file():  # a FIFO put there by an earlier step would block
        return
    if kind == "truncate":
        data = (d / op[1]).read_bytes()
        (d / op[1]).write_bytes(data[:int(len(data) * op[2])])
    elif kind == "flip":
        data = bytearray((d / op[1]).read_bytes())
        if data:
            data[min(int(len(data) * op[2]), len(data) - 1)] ^= op[3]
            (d / op[1]).write_bytes(bytes(data))
    elif kind in ("field", "drop"):
        try:
            config = json.loads((d / CONFIG).read_text())
        except (OSError, ValueError):
            return
        if not isinstance(config, dict):
            return
        if kind == "field":
            config[op[1]] = op[2]
        else:
            config.pop(op[1], None)
        (d / CONFIG).write_text(json.dumps(config))
    elif kind == "replace":
        if os.path.lexists(d / op[1]):
            shutil.rmtree(d / op[1]) if (d / op[1]).is_dir() and not (d / op[1]).is_symlink() else (d / op[1]).unlink()
        (d / op[1]).touch()
        _replace(d / op[1], op[2])
    else:
        try:
            def edit(header):
                keys = sorted(k for k in header if k != "__metadata__")
                if kind == "meta":
                    header.setdefault("__metadata__", {})[op[1]] = op[2]
                elif kind == "shape":
                    header[keys[op[1] % len(keys)]]["shape"] = op[2]
                else:
                    header[keys[op[1] % len(keys)]]["dtype"] = op[2]

            _rewrite_header(d, edit)
        except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError, TypeError, AttributeError):
            return  # an earlier corruption made the header unreadable for this edit too


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory.mktemp("valid") / "adapter")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ops=st.lists(_ops, min_size=1, max_size=3))
def test_random_corruptions_give_peftlab_errors_and_leave_the_model_unchanged(valid_folder, ops):
    model = _MODEL.setdefault("model", tiny_llama())
    snap = _MODEL.setdefault("snap", Snapshot(model))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "adapter"
        shutil.copytree(valid_folder, d)
        for op in ops:
            _corrupt(d, op)
        with _within(20), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                peftlab.load(model, d)
            except peftlab.PeftlabError as e:
                assert str(e)
                event(f"refused: {type(e).__name__}")
            else:  # a corruption that still describes a valid adapter (e.g. another dropout)
                event("loaded")
                peftlab.detach(model, "default")
    snap.check()


_MODEL: dict[str, object] = {}
