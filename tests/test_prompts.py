"""Prompt tuning, P-tuning and prefix tuning on tiny models: caches and generate(), padding,
positions, labels, gradient checkpointing, encoder-decoder, peft interop and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from peftlab.core.errors import ConfigError
from peftlab.methods.prefix_tuning import LAYOUTS
from tests.conftest import perturb, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning"]
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
N = 5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def adapted(method: str, build, seed: int = 3, **options):
    model = build(0)
    peftlab.attach(model, method, num_virtual_tokens=N, **options)
    perturb(peftlab.adapter_parameters(model, "default"), seed=seed, scale=0.5)
    return model


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("method", METHODS)
def test_generate_with_cache_equals_forwards_without_cache(method, arch):
    model = adapted(method, DECODERS[arch])
    x = ids(2, 6)
    got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = x
    for _ in range(6):
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits
        assert logits.shape[:2] == seq.shape  # virtual positions are cut from the outputs
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)
    with torch.no_grad():
        adapted_logits = model(input_ids=x).logits
        with peftlab.disabled(model):
            base = model(input_ids=x).logits
    assert not torch.allclose(base, adapted_logits, atol=1e-3), "the adapter must change the output"


@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("method", METHODS)
def test_step_by_step_cache_equals_one_forward(method, arch):
    from transformers import DynamicCache

    model = adapted(method, DECODERS[arch])
    x = ids(1, 8)
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(input_ids=x[:, :5], past_key_values=cache, use_cache=True).logits
        assert cache.get_seq_length() == N + 5  # the virtual tokens are in the cache
        rest = [model(input_ids=x[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(5, 8)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("method", METHODS)
def test_left_and_right_padding_match_single_rows(method, arch):
    model = adapted(method, DECODERS[arch])
    a, b = ids(1, 7, seed=1), ids(1, 4, seed=2)
    with torch.no_grad():
        single_a, single_b = model(input_ids=a).logits, model(input_ids=b).logits
        pad = torch.zeros(1, 3, dtype=torch.long)
        left = model(input_ids=torch.cat([a, torch.cat([pad, b], 1)]),
                     attention_mask=torch.tensor([[1] * 7, [0] * 3 + [1] * 4])).logits
        right = model(input_ids=torch.cat([a, torch.cat([b, pad], 1)]),
                      attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3])).logits
    for batch_out in (left, right):
        torch.testing.assert_close(batch_out[0:1], single_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[1:, 3:], single_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right[1:, :4], single_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_generates_like_single_rows(method):
    model = adapted(method, tiny_llama)
    a, b = ids(1, 6, seed=1), ids(1, 3, seed=2)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    got = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(got[0, 6:], model.generate(a, **kw)[0, 6:])
    assert torch.equal(got[1, 6:], model.generate(b, **kw)[0, 3:])


@pytest.mark.parametrize("method", METHODS)
def test_real_tokens_take_positions_after_the_virtual_ones(method):
    """Explicit position ids describe the real tokens: passing 0..L-1 equals passing none."""
    model = adapted(method, tiny_gpt2)  # absolute position embeddings: a wrong offset shows
    x = ids(1, 6)
    with torch.no_grad():
        implicit = model(input_ids=x).logits
        explicit = model(input_ids=x, position_ids=torch.arange(6).unsqueeze(0)).logits
        shifted = model(input_ids=x, position_ids=torch.arange(1, 7).unsqueeze(0)).logits
    torch.testing.assert_close(explicit, implicit, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(shifted, implicit, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_labels_at_virtual_positions_are_ignored(method):
    model = adapted(method, tiny_llama)
    x = ids(2, 7)
    labels = x.clone()
    labels[:, 0] = -100  # the only label a prompt position could predict
    with torch.no_grad():
        o = model(input_ids=x, labels=labels)
    want = torch.nn.functional.cross_entropy(o.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(o.loss, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for checkpointing in (False, True):
        model = adapted(method, tiny_llama, **({"projection": True} if method == "prefix_tuning" else {}))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        x = ids(2, 6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=x, labels=x).loss.backward()
        params = peftlab.adapter_parameters(model, "default")
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
        grads.append({k: p.grad.clone() for k, p in params.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4)


def test_prefix_tuning_refuses_gradient_checkpointing_and_says_what_to_do():
    """transformers drops the cache inside checkpointed layers: training on would train nothing."""
    model = adapted("prefix_tuning", tiny_llama)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = ids(2, 6)
    with pytest.raises(ConfigError, match="gradient checkpointing.*gradient_checkpointing_disable"):
        model(input_ids=x, labels=x)
    model.eval()  # inference with checkpointing on: nothing is recomputed
    with torch.no_grad():
        model(input_ids=x)
    model.train()
    model.gradient_checkpointing_disable()
    model(input_ids=x, labels=x).loss.backward()


def test_prefix_shape_follows_grouped_query_attention():
    model = tiny_llama()  # 4 query heads, 2 key/value heads, head_dim 8, 2 layers
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N)
    (p,) = peftlab.adapter_parameters(model, "default").values()
    assert p.shape == (N, 2 * 2 * 2 * 8)
    cfg = peftlab.get_method("prefix_tuning", num_virtual_tokens=N).to_config(model)
    assert (cfg["num_attention_heads"], cfg["token_dim"], cfg["num_layers"]) == (2, 16, 2)


def test_vocab_initialised_prefix_equals_prompt_of_those_tokens():
    """'vocab' init: the prefix is the cache the frozen model builds for N random tokens."""
    model = tiny_llama()
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N, seed=7)
    words = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(7))
    x = ids(1, 4)
    with torch.no_grad():
        got = model(input_ids=x).logits
        with peftlab.disabled(model):
            want = model(input_ids=torch.cat([words, x], 1)).logits[:, N:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_encoder_classifier_right_padding_and_token_types(method):
    model = tiny_bert()
    peftlab.attach(model, method, num_virtual_tokens=N, modules_to_save=["classifier"])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.5)
    x = ids(1, 6)
    with torch.no_grad():
        single = model(input_ids=x).logits
        padded = model(input_ids=torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1),
                       attention_mask=torch.tensor([[1] * 6 + [0] * 3])).logits
        typed = model(input_ids=x, token_type_ids=torch.zeros_like(x)).logits
        with peftlab.disabled(model):
            base = model(input_ids=x).logits
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(typed, single, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(single, base, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_encoder_decoder(method):
    model = adapted(method, tiny_t5)
    x = ids(1, 5)
    got = model.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    seq = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=x, decoder_input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        dec = ids(1, 3, seed=4)
        single = model(input_ids=x, decoder_input_ids=dec).logits
        padded = model(input_ids=torch.cat([x, torch.zeros(1, 2, dtype=torch.long)], 1),
                       attention_mask=torch.tensor([[1] * 5 + [0] * 2]), decoder_input_ids=dec).logits
        with peftlab.disabled(model):
            base = model(input_ids=x, decoder_input_ids=dec).logits
    assert torch.equal(got, seq)
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single, base, atol=1e-3)


def test_prefix_reaches_every_decoder_layer_of_an_encoder_decoder():
    """peft's SEQ_2_SEQ_LM layout: decoder self-attention, layer i reading key rows 4i mod 2L."""
    from peftlab.methods.prefix_tuning import key_row, layout_of

    model = tiny_t5()
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N, init="random")
    (p,) = peftlab.adapter_parameters(model, "default").values()
    assert p.shape == (N, 2 * 2 * 4 * 8)  # 2 decoder layers x (key, value) x 4 heads x head_dim 8
    layout = layout_of(model)
    assert [key_row(layout, i) for i in range(2)] == [0, 0]  # with L = 2 both layers read rows 0 and 1
    x, dec = ids(1, 5), ids(1, 3, seed=4)
    with torch.no_grad():
        before = model(input_ids=x, decoder_input_ids=dec).logits
    width = 4 * 8
    for row in range(4):  # rows 0-1 are read, rows 2-3 (peft's cross-attention copy) are not
        with torch.no_grad():
            p[:, row * width:(row + 1) * width] += 1.0
            after = model(input_ids=x, decoder_input_ids=dec).logits
            p[:, row * width:(row + 1) * width] -= 1.0
        assert torch.allclose(after, before, atol=1e-6) == (row >= 2), row


def test_a_layer_that_ignores_the_cache_fails_loudly():
    """If an upstream change stops one attention layer from reading the cache, the call fails
    instead of silently running without that layer's prefix."""
    from peftlab.methods.prefix_tuning import PrefixCacheError

    model = adapted("prefix_tuning", tiny_llama)

    def drop_cache(_, args, kwargs):  # the decoder stack ignores the cache it is handed
        for key in ("cache", "past_key_values", "attention_mask", "position_ids"):
            kwargs.pop(key, None)
        return args, kwargs

    handle = model.model.register_forward_pre_hook(drop_cache, with_kwargs=True)
    with pytest.raises(PrefixCacheError, match=r"layers \[0, 1\]"):
        model(input_ids=ids(1, 4))
    handle.remove()
    model(input_ids=ids(1, 4))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert, tiny_t5])
def test_cache_argument_is_found(build):
    """The one place that knows transformers' cache argument names finds one on every model the
    input-side methods support; an upstream rename shows here first."""
    from peftlab.core.inputs import cache_argument
    from peftlab.methods.prefix_tuning import cache_taker

    model = build()
    taker = cache_taker(model)
    assert taker is not None and cache_argument(taker) in ("cache", "past_key_values")


@pytest.mark.parametrize("method", ["p_tuning", "prefix_tuning"])
def test_saved_form_needs_no_encoder(method, tmp_path):
    opts = {"projection": True} if method == "prefix_tuning" else {}
    model = adapted(method, tiny_llama, **opts)
    x = ids(2, 6)
    with torch.no_grad():
        want = model(input_ids=x).logits
    peftlab.save(model, tmp_path)
    fresh = tiny_llama()
    peftlab.load(fresh, tmp_path, trainable=True)
    params = peftlab.adapter_parameters(fresh, "default")
    assert list(params) == ["peftlab_inputs.default.embedding.weight"]  # the output only, no encoder
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, want, atol=1e-6, rtol=1e-6)
    fresh(input_ids=x, labels=x).loss.backward()
    assert next(iter(params.values())).grad is not None


# ----------------------------------------------------------------------------- peft interop
def _peft_config(method: str, model, **extra):
    import peft

    cls = {"prompt_tuning": peft.PromptTuningConfig, "p_tuning": peft.PromptEncoderConfig,
           "prefix_tuning": peft.PrefixTuningConfig}[method]
    return cls(task_type="CAUSAL_LM", num_virtual_tokens=N, **extra)


def _peft_logits(peft_model, method: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    return logits if method == "prefix_tuning" else logits[:, N:]


@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("method", METHODS)
def test_peftlab_file_loads_in_peft(method, arch, tmp_path):
    from peft import PeftModel

    model = adapted(method, DECODERS[arch])
    x = ids(2, 6)
    with torch.no_grad():
        want = model(input_ids=x).logits
    peftlab.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(DECODERS[arch](0), tmp_path)
    torch.testing.assert_close(_peft_logits(loaded, method, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("method", METHODS)
def test_peft_file_loads_in_peftlab(method, arch, tmp_path):
    from peft import get_peft_model

    extra = {"prefix_projection": True} if method == "prefix_tuning" else {}
    peft_model = get_peft_model(DECODERS[arch](0), _peft_config(method, None, **extra))
    perturb(dict(peft_model.prompt_encoder.named_parameters()), scale=0.1)
    peft_model.eval()
    x = ids(2, 6)
    want = _peft_logits(peft_model, method, x)
    peft_model.save_pretrained(tmp_path)
    model = DECODERS[arch](0)
    peftlab.load(model, tmp_path)
    assert type(peftlab.adapters(model)["default"]).method_name == method
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_virtual_tokens(method, n):
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer"):
        peftlab.get_method(method, num_virtual_tokens=n)


@pytest.mark.parametrize("method", METHODS)
def test_too_many_virtual_tokens_or_too_long_input(method):
    model = tiny_gpt2()  # 64 positions
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="64 positions"):
        peftlab.attach(model, method, num_virtual_tokens=64)
    assert peftlab.adapters(model) == {} and model.state_dict().keys() == before.keys()
    peftlab.attach(model, method, num_virtual_tokens=10)
    model(input_ids=ids(1, 54))  # exactly fits
    with pytest.raises(ConfigError, match="at most 54 tokens"):
        model(input_ids=ids(1, 55))


def test_text_init_needs_a_tokenizer():
    with pytest.raises(ConfigError, match="needs a tokenizer.*tokenizer="):
        peftlab.get_method("prompt_tuning", init="text", init_text="classify the sentiment")
    with pytest.raises(ConfigError, match="needs init_text"):
        peftlab.get_method("prompt_tuning", init="text")


class _CountingTokenizer:
    """A caller's tokenizer: maps each word to a fixed id and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.calls += 1
        return {"input_ids": [3 + (sum(map(ord, w)) % 100) for w in text.split()]}


def test_text_init_uses_the_callers_tokenizer_once_and_files_never_name_one(tmp_path):
    import json

    tok = _CountingTokenizer()
    model = tiny_llama()
    peftlab.attach(model, "prompt_tuning", num_virtual_tokens=N, init="text", init_text="rate this review",
                   tokenizer=tok)
    assert tok.calls == 1
    want_ids = tok("rate this review")["input_ids"]
    (p,) = peftlab.adapter_parameters(model, "default").values()
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(p.detach(), table[(want_ids * 2)[:N]].detach())
    peftlab.save(model, tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert json.loads(text)["tokenizer_name_or_path"] is None
    fresh = tiny_llama()
    peftlab.load(fresh, tmp_path)
    assert tok.calls == 2  # only the call above that built want_ids: loading tokenized nothing
    assert peftlab.adapters(fresh)["default"].init_token_ids in ((), tuple(want_ids))
    x = ids(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)


def test_a_peft_file_naming_a_tokenizer_loads_without_touching_it(tmp_path, monkeypatch):
    """peft's config may name ``tokenizer_name_or_path``: loading must never open it."""
    import transformers
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    peft_model.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello", tokenizer_name_or_path=str(tmp_path / "evil"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))

    def refuse(*a, **k):
        raise AssertionError("a tokenizer was loaded from a file's config")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    model = tiny_llama()
    peftlab.load(model, tmp_path)
    assert "default" in peftlab.adapters(model)


def test_a_model_type_no_table_names_gets_its_layout_from_the_config():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    assert "opt" not in LAYOUTS
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=N, seed=7)
    words = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(7))
    x = ids(1, 4)
    with torch.no_grad():  # 'vocab' init: the prefix is the cache the base builds for N tokens
        got = model(input_ids=x).logits
        with peftlab.disabled(model):
            want = model(input_ids=torch.cat([words, x], 1)).logits[:, N:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_without_a_cache_is_refused_with_the_alternatives():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=128, dim=32, n_layers=1, n_heads=4,
                                                                 hidden_dim=64, max_position_embeddings=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="takes no key/value cache.*prompt_tuning"):
        peftlab.attach(model, "prefix_tuning")
    assert peftlab.adapters(model) == {} and model.state_dict().keys() == before.keys()


# ----------------------------------------------------------------------------- embedded models
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_smollm2_generate_padding_and_training(method, tmp_path):
    from peftlab import models

    model, tok = models.load("smollm2-135m", seed=0)
    opts = {"init": "text", "init_text": "Answer briefly and politely.", "tokenizer": tok} \
        if method == "prompt_tuning" else {}
    peftlab.attach(model, method, num_virtual_tokens=8, **opts)
    assert peftlab.summary(model).percent < 1
    tok.padding_side = "left"
    x = tok(["The capital of France is", "Hi"], padding=True, return_tensors="pt")
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tok.pad_token_id}
    got = model.generate(**x, **kw)
    single = model.generate(**tok(["Hi"], return_tensors="pt"), **kw)
    assert torch.equal(got[1, -5:], single[0, -5:])
    seq = x["input_ids"][:1]
    for _ in range(5):
        with torch.no_grad():
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got[0, -5:], seq[0, -5:])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=peftlab.method_class(method).suggested_lr)
    y = tok(["The capital of France is Paris."], return_tensors="pt")
    losses = []
    for _ in range(4):
        loss = model(**y, labels=y["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_minilm_classifier_trains_and_round_trips(method, tmp_path):
    from peftlab import models

    model, tok = models.load("minilm", num_labels=3, seed=0)
    peftlab.attach(model, method, modules_to_save=["classifier"])
    tok.padding_side = "right"
    x = tok(["I love driverless cars", "never getting in one of those", "cars exist"], padding=True,
            return_tensors="pt")
    y = torch.tensor([2, 0, 1])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=peftlab.method_class(method).suggested_lr)
    losses = []
    for _ in range(6):
        loss = model(**x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        batch = model(**x).logits
        one = model(**tok(["cars exist"], return_tensors="pt")).logits
    torch.testing.assert_close(batch[2:], one, atol=1e-4, rtol=1e-4)
    peftlab.save(model, tmp_path)
    fresh, _ = models.load("minilm", num_labels=3, seed=0)
    peftlab.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, batch, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- generate(), per step
def _no_cache_step_logits(model, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> list[torch.Tensor]:
    """The next-token logits of every generated step, each from one forward over the whole
    sequence so far with no cache (the oracle for generate()'s cached steps)."""
    out = []
    with torch.no_grad():
        for t in range(prompt_len, seq.shape[1]):
            logits = model(input_ids=seq[:, :t], attention_mask=mask[:, :t], use_cache=False).logits
            out.append(logits[:, -1])
    return out


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("method", METHODS)
def test_generate_per_step_scores_equal_a_no_cache_forward(method, arch, sample):
    """Every decoding step's scores equal a no-cache forward over the same tokens (fp32, 1e-4),
    for a left-padded batch of rows of different lengths; the cache holds N + tokens, no more."""
    from transformers import DynamicCache

    model = adapted(method, DECODERS[arch])
    a, b = ids(1, 7, seed=1), ids(1, 3, seed=2)
    x = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    steps = 6
    cache = DynamicCache(config=model.config)
    torch.manual_seed(11)
    out = model.generate(x, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=sample,
                         top_k=0, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         past_key_values=cache)
    seq = out.sequences
    assert seq.shape[1] == 7 + steps
    # the cache holds the virtual tokens once, plus every token but the last generated one
    assert cache.get_seq_length() == N + 7 + steps - 1
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=torch.long)], 1)
    want = _no_cache_step_logits(model, seq, full_mask, 7)
    assert len(out.logits) == steps
    for step, (got, ref) in enumerate(zip(out.logits, want)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    if not sample:
        assert torch.equal(seq[:, 7:], torch.stack([r.argmax(-1) for r in want], 1))
