"""The architecture matrix: every registered method on tiny random models of 19 mainstream
architectures (hidden 32, 2 layers). Each cell attaches the method with its defaults, runs
forward and backward, takes one optimizer step (only the adapter's tensors may change), checks
that ``disabled()`` gives the base output exactly, that a saved adapter loaded into a fresh base
gives the same outputs, that merging equals the unmerged model where the method merges, and on
causal LMs that generate()'s per-step scores equal a no-cache forward. A cell that cannot apply
is listed in ``REFUSED`` with the message it must give; anything else that raises fails.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import PeftlabError
from tests.conftest import perturb

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

_D = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          max_position_embeddings=64)
_GQA = dict(num_key_value_heads=2, **_D)

# name -> (config class, model class, config keywords, kind)
SPECS: dict[str, tuple[str, str, dict, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, "causal"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, "causal"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_GQA, "head_dim": 8}, "causal"),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA, "causal"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
                "causal"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_GQA, "head_dim": 8}, "causal"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_GQA, "pad_token_id": 0}, "causal"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=1, eos_token_id=2), "causal"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _D, "causal"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                num_attention_heads=4, max_position_embeddings=64,
                                                word_embed_proj_dim=32), "causal"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, bos_token_id=1, eos_token_id=2),
               "causal"),
    "bert": ("BertConfig", "BertForSequenceClassification", {**_D, "num_labels": 3}, "cls"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                {**_D, "max_position_embeddings": 70, "num_labels": 3}, "cls"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                        num_labels=3), "cls"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", {**_D, "num_labels": 3}, "cls"),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {**_D, "embedding_size": 32, "num_labels": 3},
                "cls"),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_heads=4, decoder_start_token_id=0, pad_token_id=0),
           "seq2seq"),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
             "seq2seq"),
    # not named in any issue or table: found from their structure like the rest
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   rotary_dim=4, bos_token_id=1, eos_token_id=2), "causal"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=128, hidden_size=32, n_layer=2, n_head=4,
                                                      bos_token_id=1, eos_token_id=2), "causal"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _GQA, "causal"),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, num_labels=3), "vision"),
}

_NO_CACHE = r"takes no key/value cache.*prompt_tuning"
_NOT_TOKENS = r"token-embedding table.*ViTPatchEmbeddings.*lora"
_NO_BIAS = r"bitfit: .*has no bias parameters.*Use LoRA"
_QLORA_CONV1D = r"qlora: .*Conv1D.*supported types.*lora adapts"
REFUSED: dict[tuple[str, str], str] = {
    **{(a, "bitfit"): _NO_BIAS for a in ("llama", "qwen3", "mistral", "mixtral", "gemma2", "phi3", "t5")},
    **{(a, "prefix_tuning"): _NO_CACHE for a in ("distilbert", "deberta-v2", "vit")},
    ("vit", "prompt_tuning"): _NOT_TOKENS,
    ("vit", "p_tuning"): _NOT_TOKENS,
    ("gpt2", "qlora"): _QLORA_CONV1D,
    **{("gpt2", m): rf"{m}: .*transformers Conv1D layers.*peft's {m.upper()} does not adapt.*Use lora" for m in ("loha", "lokr")},
    ("gpt2", "oft"): r"oft: .*GPT-2 Conv1D layer.*peft's OFT adapts nn.Linear, nn.Conv2d and nn.Embedding only.*\(lora",
    ("gpt2", "boft"): r"boft: .*GPT-2 Conv1D layer.*peft's BOFT adapts nn.Linear and nn.Conv2d only.*\(lora",
}
"""(architecture, method) -> the message its refusal must match; every other cell must work."""


def build(arch: str, seed: int = 0) -> nn.Module:
    import transformers

    cfg_cls, model_cls, kw, _ = SPECS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kw)
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                 "dropout_rate", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "seq_classif_dropout"):
        if isinstance(getattr(cfg, attr, None), float):
            setattr(cfg, attr, 0.0)  # so training-mode outputs are comparable too
    return getattr(transformers, model_cls)(cfg).eval()


def batch(arch: str) -> dict[str, torch.Tensor]:
    kind = SPECS[arch][3]
    g = torch.Generator().manual_seed(1)
    if kind == "vision":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    x = torch.randint(3, 120, (2, 6), generator=g)
    out = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, 120, (2, 3), generator=g)
    return out


def options(arch: str, method: str, model: nn.Module) -> dict:
    opts: dict = {}
    if SPECS[arch][3] in ("cls", "vision") and not peftlab.method_class(method).trains_base_weights:
        opts["modules_to_save"] = ["classifier"]
    if method == "fusion":
        opts.update(adapters={"a": {"method": "houlsby"}, "b": {"method": "houlsby", "reduction_factor": 8}},
                    train_adapters=True)
    if method == "flora":
        opts["r"] = 2
    return opts


def outputs(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).logits.float()


CELLS = [(a, m) for a in SPECS for m in sorted(peftlab.methods())]


@pytest.mark.parametrize(("arch", "method"), CELLS, ids=[f"{a}-{m}" for a, m in CELLS])
def test_matrix_cell(arch: str, method: str, tmp_path) -> None:
    cls = peftlab.method_class(method)
    model = build(arch)
    opts = options(arch, method, model)
    if (arch, method) in REFUSED:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        classes = {p: type(m) for p, m in model.named_modules()}
        with pytest.raises(PeftlabError, match=REFUSED[arch, method]):
            peftlab.attach(model, method, **opts)
        assert {p: type(m) for p, m in model.named_modules()} == classes
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        return

    method_obj = peftlab.get_method(method, **opts)
    reference = method_obj.prepare_base(build(arch))  # QLoRA's reference base is the quantized one
    b = batch(arch)
    base_out = outputs(reference, b)
    peftlab.attach(model, method, **opts)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.2)

    # forward, backward, one optimizer step: only the adapter's tensors change
    trainable = peftlab.adapter_parameters(model, "default")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    loss = model(**b).logits.float().pow(2).mean()
    loss.backward()
    grads = {k for k, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads, "no adapter tensor got a gradient"
    params = [p for p in model.parameters() if p.requires_grad]
    torch.optim.SGD(params, lr=0.1).step()
    model.zero_grad(set_to_none=True)
    model.eval()
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])}
    trainable_ids = {id(t) for t in trainable.values()}
    named = dict(model.named_parameters())
    stray = {k for k in changed if k in named and id(named[k]) not in trainable_ids}
    assert not stray, f"base tensors changed: {sorted(stray)[:5]}"
    assert changed, "the optimizer step changed nothing"

    got = outputs(model, b)
    if not cls.trains_base_weights:
        with peftlab.disabled(model):
            torch.testing.assert_close(outputs(model, b), base_out, rtol=0, atol=0)
        assert not torch.allclose(got, base_out, atol=1e-6), "the adapter does not change the output"

    peftlab.save(model, tmp_path)
    fresh = build(arch)
    peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh, b), got, atol=1e-5, rtol=1e-5)

    if cls.mergeable and not cls.trains_base_weights:
        peftlab.merge(fresh)
        torch.testing.assert_close(outputs(fresh, b), got, atol=1e-4, rtol=1e-4)
        peftlab.unmerge(fresh)

    if SPECS[arch][3] == "causal":
        _check_generate(model, b)


def _check_generate(model: nn.Module, b: dict[str, torch.Tensor]) -> None:
    """generate()'s per-step scores equal a no-cache forward over the same tokens (fp32, 1e-4)."""
    x = b["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, min_new_tokens=3,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        for step, logits in enumerate(out.logits):
            t = x.shape[1] + step
            want = model(input_ids=seq[:, :t], attention_mask=torch.ones(2, t, dtype=torch.long),
                         use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits.float(), want.float(), atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_refusals_name_a_way_out() -> None:
    """Every listed refusal tells the user what to use instead."""
    for pattern in set(REFUSED.values()):
        assert re.search(r"lora|LoRA|prompt_tuning|supported|match no", pattern), pattern


def test_matrix_covers_every_registered_method() -> None:
    assert {m for _, m in CELLS} == set(peftlab.methods())
    assert len(SPECS) >= 19
