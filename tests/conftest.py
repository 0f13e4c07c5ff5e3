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


TINY: dict[str, Callable[..., nn.Module]] = {"tiny-llama": tiny_llama, "tiny-bert": tiny_bert, "tiny-gpt2": tiny_gpt2}


def batch(seed: int = 1, size: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 128, (size, length), generator=g)}


def out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


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
def tmp_dir(tmp_path):
    return tmp_path
