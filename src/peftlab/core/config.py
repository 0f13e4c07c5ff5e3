"""Reading numbers from a transformers config, under the names architectures give them."""

from __future__ import annotations

from typing import Any

from torch import nn

HIDDEN = ("hidden_size", "n_embd", "d_model", "dim")
"""Names of the hidden size across architectures (Llama/BERT, GPT-2, T5/BART, DistilBERT)."""


def text_config(model: nn.Module) -> Any:
    """The model's config, or its text part for multimodal configs (None without a config)."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def first_int(cfg: Any, *keys: str, minimum: int = 1) -> int | None:
    """The first of ``keys`` that ``cfg`` holds as an integer of at least ``minimum`` (not a bool)."""
    for key in keys:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
    return None
