"""Shared fixtures: tiny, randomly initialised transformers models (fast, exact, offline)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

# Every registered method needs example configurations here: the contract suite runs each one
# against every tiny model. A method missing from this table fails test_every_method_has_examples.
# Values: (model name) -> options; "model" keys are the tiny models below.
METHOD_EXAMPLES: dict[str, dict[str, dict]] = {
    "lora": {
        "tiny-llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"r": 4, "target_modules": ["query", "value", "word_embeddings"], "bias": "lora_only",
                      "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"r": 4, "target_modules": ["c_attn", "c_fc"], "rslora": True},
    },
    "qlora": {  # the reference base is the quantized one (Method.prepare_base); GPT-2's Conv1D is not quantized
        "tiny-llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"r": 4, "target_modules": ["query", "value"], "blocksize": 32, "bias": "lora_only",
                      "modules_to_save": ["classifier"], "quantize_also": ["intermediate.dense"]},
    },
    "dylora": {
        "tiny-llama": {"r_max": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"r_max": 4, "rank": 3, "target_modules": ["query", "value", "word_embeddings"],
                      "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"r_max": 4, "r_min": 2, "update_all": True, "target_modules": ["c_attn", "c_fc"]},
    },
    "flora": {
        "tiny-llama": {"r": 4, "scale": 2.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"r": 4, "target_modules": ["query", "value", "word_embeddings"],
                      "rank_pattern": {"value": [8, 2]}, "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"r": 4, "target_modules": ["c_attn", "c_fc"]},
    },
    "bitfit": {
        "tiny-bert": {"target_modules": ["query", "intermediate.dense"], "modules_to_save": ["classifier"]},
        "tiny-gpt2": {},
    },
    "prompt_tuning": {
        "tiny-llama": {"num_virtual_tokens": 4},
        "tiny-bert": {"num_virtual_tokens": 3, "init": "random", "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"num_virtual_tokens": 4},
        "tiny-t5": {"num_virtual_tokens": 3},
    },
    "p_tuning": {
        "tiny-llama": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
        "tiny-bert": {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8,
                      "modules_to_save": ["classifier"]},
        "tiny-t5": {"num_virtual_tokens": 3},
    },
    "prefix_tuning": {
        "tiny-llama": {"num_virtual_tokens": 4},
        "tiny-bert": {"num_virtual_tokens": 3, "projection": True, "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"num_virtual_tokens": 4, "init": "random"},
        "tiny-t5": {"num_virtual_tokens": 3},
    },
    "houlsby": {
        "tiny-bert": {"reduction_factor": 4, "modules_to_save": ["classifier"]},
        "tiny-llama": {"reduction_factor": 4, "parallel": True, "layer_norm": True},
        "tiny-gpt2": {"reduction_factor": 8, "non_linearity": "gelu"},
    },
    "pfeiffer": {
        "tiny-bert": {"parallel": True, "modules_to_save": ["classifier"]},
        "tiny-llama": {"drop_first": 1},
        "tiny-gpt2": {"parallel": True, "scaling": 2.0},
    },
    "compacter": {
        "tiny-bert": {"modules_to_save": ["classifier"]},
        "tiny-llama": {"placement": ["ffn"], "phm_rank": 2, "robust_drop": True},
        "tiny-gpt2": {"parallel": True, "phm_dim": 2},
    },
    "fusion": {  # train_adapters=True: the members train too, so the file holds exactly what trains
        "tiny-bert": {"adapters": {"a": {"method": "houlsby", "reduction_factor": 4}, "b": {"method": "compacter"}},
                      "train_adapters": True, "modules_to_save": ["classifier"]},
        "tiny-llama": {"adapters": {"a": {"method": "pfeiffer", "parallel": True}, "b": {"method": "pfeiffer"}},
                       "train_adapters": True},
        "tiny-gpt2": {"adapters": {"a": {"method": "houlsby"}, "b": {"method": "houlsby", "layer_norm": True}},
                      "train_adapters": True},
    },
    "adalora": {  # a saved pruned allocation (rank_pattern) is tested in tests/test_adalora.py
        "tiny-llama": {"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"init_r": 3, "target_r": 1, "alpha": 4, "target_modules": ["query", "value"],
                      "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"init_r": 4, "target_r": 3, "target_modules": ["c_attn", "c_fc"], "dropout": 0.1},
    },
    "ia3": {  # default targets found by name (keys, values, feed-forward outputs) on llama and bert
        "tiny-llama": {},
        "tiny-bert": {"modules_to_save": ["classifier"]},
        "tiny-gpt2": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    },
    "vera": {  # save_projection=False: the file holds exactly what trains (the key regenerates the rest)
        "tiny-llama": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "save_projection": False},
        "tiny-bert": {"r": 4, "bias": "vera_only", "save_projection": False, "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"r": 8, "target_modules": ["c_attn", "c_fc"], "projection_prng_key": 7,
                      "save_projection": False},
    },
    "oft": {  # peft's OFT adapts no Conv1D: GPT-2's untied position embedding is its one layer there
        "tiny-llama": {"block_size": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"r": 4, "block_size": 0, "target_modules": ["query", "value", "word_embeddings"],
                      "bias": "oft_only", "modules_to_save": ["classifier"]},
        "tiny-gpt2": {"block_size": 4, "target_modules": ["wpe"], "cayley_neumann": False, "block_share": True},
    },
    "boft": {  # peft's BOFT adapts no Conv1D (nor embeddings): GPT-2 has no layer for it
        "tiny-llama": {"block_size": 4, "n_butterfly_factor": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"block_num": 4, "block_size": 0, "n_butterfly_factor": 3, "target_modules": ["query", "value"],
                      "bias": "boft_only", "dropout": 0.25, "modules_to_save": ["classifier"]},
    },
    "loha": {  # GPT-2's Conv1D is refused (peft's LoHa does not adapt it)
        "tiny-llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                       "rank_pattern": {"down_proj": 2}},
        "tiny-bert": {"r": 2, "rank_dropout": 0.1, "target_modules": ["query", "value"],
                      "modules_to_save": ["classifier"]},
    },
    "lokr": {  # GPT-2's Conv1D is refused (peft's LoKr does not adapt it)
        "tiny-llama": {"r": 1, "alpha": 2.0, "decompose_both": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tiny-bert": {"r": 4, "init": "lycoris", "target_modules": ["query", "value", "intermediate.dense"],
                      "modules_to_save": ["classifier"]},
    },
    "full": {  # every base tensor trains in place (trains_base_weights), the trainer's AdamW
        "tiny-llama": {},
        "tiny-bert": {"modules_to_save": ["classifier"]},
        "tiny-gpt2": {},
    },
    "galore": {  # full-parameter training: every base tensor trains in place (trains_base_weights)
        "tiny-llama": {"rank": 8, "update_proj_gap": 2, "target_modules": [r".*attn.*", r".*mlp.*"]},
        "tiny-bert": {"rank": 4, "eight_bit": True, "modules_to_save": ["classifier"]},
    },
}


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


TINY: dict[str, Callable[..., nn.Module]] = {"tiny-llama": tiny_llama, "tiny-bert": tiny_bert, "tiny-gpt2": tiny_gpt2,
                                             "tiny-t5": tiny_t5}


def batch(seed: int = 1, size: int = 2, length: int = 9, model: str | None = None) -> dict[str, torch.Tensor]:
    """Random token ids; encoder-decoder models (``model`` 'tiny-t5') also get decoder inputs."""
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(1, 128, (size, length), generator=g)}
    if model is not None and model.endswith("t5"):
        x["decoder_input_ids"] = torch.randint(1, 128, (size, 4), generator=g)
    return x


def out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def assert_same_as_peft(model: nn.Module, pm: nn.Module, input_ids: torch.Tensor, tol: dict[str, float]) -> None:
    """peftlab ``model`` (one trainable adapter) computes what peft model ``pm`` computes: logits
    within ``tol``, the gradients of every trained tensor (same key set, rtol 1e-4), and the
    merged models' logits. Leaves both models merged."""
    import peftlab

    out_p, out_l = pm(input_ids=input_ids).logits, model(input_ids=input_ids).logits
    torch.testing.assert_close(out_l, out_p, **tol)
    out_p.pow(2).mean().backward()
    out_l.pow(2).mean().backward()
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): p.grad
              for k, p in pm.named_parameters() if p.requires_grad}
    ours = {k.replace(".default", ""): p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert set(theirs) == set(ours) and ours
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=tol["atol"], rtol=1e-4, msg=k)
    with torch.no_grad():
        peftlab.merge(model)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(model(input_ids=input_ids).logits, merged(input_ids=input_ids).logits, **tol)


def perturb(tensors: dict[str, torch.Tensor], seed: int = 3, scale: float = 0.1) -> None:
    """Give adapter tensors non-trivial values (a trained adapter, not the identity init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in sorted(tensors):
            t = tensors[k]
            t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * scale)


def cases() -> list[tuple[str, str]]:
    return [(m, model) for m, per in METHOD_EXAMPLES.items() for model in per]


@pytest.fixture
def one_thread(request):
    """One intra-op thread for the test (restored after it): tiny models run many times faster
    on one thread than on two busy cores (no OpenMP barrier waits). Tests marked ``slow`` (real
    models) keep every thread. Files use it with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path
