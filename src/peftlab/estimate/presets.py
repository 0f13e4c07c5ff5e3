"""Well-known architectures as config numbers only (no weights, nothing downloaded).

Each preset is what the estimator needs from a ``config.json``: ``model_type`` plus the sizes
(hidden width, layers, heads, key/value heads, MLP width, vocabulary, tied embeddings, context).
The numbers are copied from the models' published ``config.json`` files; the parameter count in
each description is what :func:`transformers.AutoModelForCausalLM.from_config` builds from them
(checked by ``tests/test_estimate.py``).

``3b`` is the schematic model of the seed article ("a 3B model in FP16 has 6 GB of weights..."):
24 layers of width 2048 as in its activation example, with an MLP width chosen so that the model
has 3.00e9 parameters.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "3b": {
        "description": "the seed article's schematic 3B decoder (24 layers, hidden 2048): 3.00B params",
        "head": "causal-lm",
        "config": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_key_value_heads": 16, "intermediate_size": 16725, "vocab_size": 32000,
                   "tie_word_embeddings": False, "max_position_embeddings": 4096},
    },
    "llama-2-7b": {
        "description": "Llama-2-7B (meta-llama/Llama-2-7b-hf): 6.74B params, MHA",
        "head": "causal-lm",
        "config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
                   "tie_word_embeddings": False, "max_position_embeddings": 4096},
    },
    "llama-2-13b": {
        "description": "Llama-2-13B (meta-llama/Llama-2-13b-hf): 13.0B params, MHA",
        "head": "causal-lm",
        "config": {"model_type": "llama", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                   "num_key_value_heads": 40, "intermediate_size": 13824, "vocab_size": 32000,
                   "tie_word_embeddings": False, "max_position_embeddings": 4096},
    },
    "llama-3.2-3b": {
        "description": "Llama-3.2-3B (meta-llama/Llama-3.2-3B): 3.21B params, GQA 24/8, tied embeddings",
        "head": "causal-lm",
        "config": {"model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                   "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "vocab_size": 128256,
                   "tie_word_embeddings": True, "max_position_embeddings": 131072},
    },
    "mistral-7b": {
        "description": "Mistral-7B-v0.1 (mistralai/Mistral-7B-v0.1): 7.24B params, GQA 32/8, sliding window 4096",
        "head": "causal-lm",
        "config": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                   "tie_word_embeddings": False, "max_position_embeddings": 32768, "sliding_window": 4096},
    },
    "llama-3-8b": {
        "description": "Llama-3-8B (meta-llama/Meta-Llama-3-8B): 8.03B params, GQA 32/8, 128k vocabulary",
        "head": "causal-lm",
        "config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                   "tie_word_embeddings": False, "max_position_embeddings": 8192},
    },
    "qwen2.5-0.5b": {
        "description": "Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B): 494M params, GQA 14/2, tied embeddings",
        "head": "causal-lm",
        "config": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                   "tie_word_embeddings": True, "max_position_embeddings": 32768},
    },
    "qwen2.5-7b": {
        "description": "Qwen2.5-7B (Qwen/Qwen2.5-7B): 7.62B params, GQA 28/4",
        "head": "causal-lm",
        "config": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False, "max_position_embeddings": 131072},
    },
    "smollm2-135m": {
        "description": "SmolLM2-135M (HuggingFaceTB/SmolLM2-135M): 134.5M params, GQA 9/3, tied embeddings",
        "head": "causal-lm",
        "config": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
                   "tie_word_embeddings": True, "max_position_embeddings": 8192},
    },
    "gpt2": {
        "description": "GPT-2 small (openai-community/gpt2): 124M params, tied embeddings",
        "head": "causal-lm",
        "config": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                   "n_positions": 1024},
    },
    "bert-base": {
        "description": "BERT-base uncased (google-bert/bert-base-uncased): 110M params, as a 2-class classifier",
        "head": "classifier",
        "config": {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512,
                   "type_vocab_size": 2},
    },
    "roberta-base": {
        "description": "RoBERTa-base (FacebookAI/roberta-base): 125M params, as a 2-class classifier",
        "head": "classifier",
        "config": {"model_type": "roberta", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, "vocab_size": 50265, "max_position_embeddings": 514,
                   "type_vocab_size": 1, "pad_token_id": 1},
    },
}
"""Preset name -> ``{"description", "head", "config"}``; ``head`` is ``causal-lm`` or ``classifier``."""


def names() -> list[str]:
    """The preset names, in table order."""
    return list(PRESETS)
