"""Input-side adapters: hooks that rewrite a model call's arguments and outputs.

Layer-wrapping methods change modules; input-side methods (soft prompts, prefixes) change what a
module is called with instead: prepend virtual-token embeddings, extend the attention mask, give
the real tokens their position ids, pad labels with -100, put key/value prefixes into the cache.
This module gives any such method the shared pieces:

* :func:`install`: a forward pre-hook *with keyword arguments* on any module (the model itself,
  its encoder, an attention module) plus a matching forward hook for the outputs. The hooks only
  act while the adapter is active and the model is not inside ``peftlab.disabled``; their handles
  live in the adapter's slot and are removed with the adapter.
* mask, position and output helpers that keep the conventions in one place.

Conventions every input-side method here follows (they are peft's, so files trained with either
library behave the same): ``N`` virtual tokens occupy positions ``0..N-1`` and the real tokens
follow from ``N``; a 2-D ``attention_mask``, ``position_ids`` and ``labels`` given by the caller
always describe the *real* tokens only; virtual positions never carry a loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError

PreFn = Callable[[nn.Module, dict[str, Any]], tuple[dict[str, Any], Any]]
"""``pre(module, kwargs) -> (new kwargs, context)``; the context (None: nothing to undo) reaches ``post``."""
PostFn = Callable[[nn.Module, Any, Any], Any]
"""``post(module, output, context) -> new output`` (None keeps the output)."""


def is_live(model: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` acts on ``model``'s calls now (active and not disabled)."""
    reg = model.__dict__.get("peftlab")
    return reg is not None and not reg.disabled and name in reg.active


def call_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of a call by name (positional ones bound to ``module.forward``'s signature)."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(module.forward)
    bound = sig.bind_partial(*args, **kwargs).arguments
    out: dict[str, Any] = {}
    for pname, value in bound.items():
        if sig.parameters[pname].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[pname].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(module).__name__}.forward takes extra positional arguments; pass them by name")
        else:
            out[pname] = value
    return out


def accepts(module: nn.Module, argument: str) -> bool:
    """Whether ``module.forward`` names ``argument`` (not just ``**kwargs``)."""
    return argument in inspect.signature(module.forward).parameters


def install(model: nn.Module, name: str, module: nn.Module, pre: PreFn, post: PostFn | None = None) -> None:
    """Hook ``module``'s calls for adapter ``name`` of ``model``.

    ``pre`` receives every argument by name and returns the arguments to call with; ``post``
    (optional) receives the output with ``pre``'s context. Both run only while the adapter is
    live (:func:`is_live`). The handles are stored in the adapter's slot, so removing the adapter
    removes the hooks (``peftlab.detach``, or a failed ``attach``).
    """
    contexts: list[Any] = []

    def _pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        contexts.append(None)  # pushed first, so that the output hook pops one even if ``pre`` raises
        if not is_live(model, name):
            return None
        new, context = pre(mod, call_arguments(mod, args, kwargs))
        contexts[-1] = context
        return (), new

    def _post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        context = contexts.pop() if contexts else None
        if context is None or post is None or output is None:
            return None
        return post(mod, output, context)

    s = slots.slot(model, name)
    s.hooks.append(module.register_forward_pre_hook(_pre, with_kwargs=True))
    s.hooks.append(module.register_forward_hook(_post, with_kwargs=True, always_call=True))


# ----------------------------------------------------------------------------- the key/value cache
# transformers renamed the cache argument of its models from ``past_key_values`` to ``cache``
# (5.x, with the old name deprecated). This block is the one place that knows the names; every
# input-side method reaches a model's cache through these helpers, and tests/test_prompts.py
# fails loudly (test_cache_argument_is_found) if a model takes neither.
CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The names a transformers model's ``forward`` may give its key/value cache, newest first."""


def cache_argument(module: nn.Module) -> str | None:
    """The name ``module.forward`` takes its key/value cache under, or None if it takes none."""
    params = inspect.signature(module.forward).parameters
    return next((a for a in CACHE_ARGUMENTS if a in params), None)


def pop_cache(kw: dict[str, Any]) -> Any:
    """Remove the caller's cache from a call's arguments under any of its names and return it."""
    given = [(a, kw.pop(a)) for a in CACHE_ARGUMENTS if a in kw]
    given = [(a, v) for a, v in given if v is not None]
    if len(given) > 1 and given[0][1] is not given[1][1]:
        raise ConfigError(f"two different caches were passed ({given[0][0]}= and {given[1][0]}=); pass one")
    return given[0][1] if given else None


def new_cache(config: Any, encoder_decoder: bool = False) -> Any:
    """An empty transformers ``DynamicCache`` (an ``EncoderDecoderCache`` of two for seq2seq models)."""
    from transformers import DynamicCache

    def one() -> Any:
        try:
            return DynamicCache(config=config)
        except TypeError:  # releases whose DynamicCache takes no config
            return DynamicCache()

    if encoder_decoder:
        from transformers import EncoderDecoderCache

        return EncoderDecoderCache(one(), one())
    return one()


def self_attention_cache(cache: Any) -> Any:
    """The decoder self-attention part of a cache (the cache itself for decoder-only models)."""
    return getattr(cache, "self_attention_cache", cache)


def layer_length(cache: Any, layer: int) -> int:
    """Tokens held by layer ``layer`` of a cache."""
    return int(cache.get_seq_length(layer))


def layer_key_values(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values layer ``layer`` of a cache holds, ``(batch, kv_heads, tokens, head_dim)``."""
    entry = cache.layers[layer] if hasattr(cache, "layers") else None
    if entry is not None and hasattr(entry, "keys"):
        return entry.keys, entry.values
    k, v = cache[layer][:2]
    return k, v


def checkpointing_activations(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on (transformers renamed the flag in 5.x)."""
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(type(model), flag, None)
        if isinstance(value, property) and value.fget is not None:  # the newest name the release has
            return value.fget(model) is True
    return False


# ----------------------------------------------------------------------------- helpers
def cache_length(cache: Any) -> int:
    """Tokens already held by a transformers ``Cache`` (0 for None)."""
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        raise ConfigError("legacy tuple past_key_values are not supported; pass a transformers Cache "
                          "(e.g. transformers.DynamicCache)")
    return int(cache.get_seq_length())


def two_d_mask(mask: Any, what: str) -> torch.Tensor | None:
    """The caller's attention mask, which must be 2-D (batch x real tokens)."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return mask
    raise ConfigError(f"{what} needs a 2-D attention_mask (batch x tokens, 1 = attend); got "
                      f"{getattr(mask, 'shape', type(mask).__name__)}. Pass the tokenizer's attention_mask.")


def prepend_ones(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def real_positions(position_ids: torch.Tensor | None, mask: torch.Tensor | None, past: int, length: int,
                   offset: int, device: torch.device) -> torch.Tensor:
    """Position ids of ``length`` new real tokens after ``past`` real ones, shifted by ``offset``.

    Given ids are shifted; otherwise they follow the real-token mask (left padding gives each row
    the positions it has alone), or count up from ``past``.
    """
    if position_ids is not None:
        return position_ids + offset
    if mask is not None:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[:, -length:] + offset
    return torch.arange(past, past + length, device=device).unsqueeze(0) + offset


def max_positions(config: Any) -> int | None:
    """The model's maximum number of positions, where its config states one."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config: Any, last_position: int | torch.Tensor, n_virtual: int, what: str) -> None:
    """Refuse a call that would push positions past the model's maximum (a meta-device tensor,
    as in the memory estimator's probe forward, holds no value and is not checked)."""
    if isinstance(last_position, torch.Tensor):
        if last_position.is_meta:
            return
        last_position = int(last_position)
    limit = max_positions(config)
    if limit is not None and last_position >= limit:
        raise ConfigError(f"{what}: {n_virtual} virtual tokens plus the input need position {last_position}, but the "
                          f"model has {limit} positions; shorten the input to at most {limit - n_virtual} tokens "
                          "or use fewer virtual tokens")


def prefix_attention_mask(mask: torch.Tensor | None, batch: int, q_len: int, past: int, n_prefix: int,
                          causal: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An additive 4-D mask ``(batch, 1, q_len, n_prefix + past + q_len)`` over a key/value prefix.

    Prefix keys are always visible; the other keys follow the real-token ``mask`` (length
    ``past + q_len``) and, when ``causal``, the causal order. transformers uses a 4-D mask as given,
    which is how a prefix reaches attention layers that build their mask from the input length.
    """
    total = past + q_len
    keep = torch.ones(batch, q_len, total, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & mask.to(device=device, dtype=torch.bool)[:, None, :]
    if causal:
        q = torch.arange(past, total, device=device)[:, None]
        k = torch.arange(total, device=device)[None, :]
        keep = keep & (k <= q)[None]
    keep = torch.cat([torch.ones(batch, q_len, n_prefix, dtype=torch.bool, device=device), keep], dim=2)
    out = torch.zeros(keep.shape, dtype=dtype, device=device)
    out.masked_fill_(~keep, torch.finfo(dtype).min)
    return out[:, None]


def prefix_padding_mask(mask: torch.Tensor, n_prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive ``(batch, 1, 1, n_prefix + tokens)`` mask for bidirectional attention over a
    prefix and the keys a 2-D ``mask`` describes (encoders, cross-attention)."""
    return prefix_attention_mask(mask, mask.shape[0], 1, mask.shape[1] - 1, n_prefix, False, dtype, mask.device)


def strip_virtual(output: Any, n: int, total: int) -> Any:
    """Drop the first ``n`` positions of sequence outputs (logits, hidden states) of length ``total``,
    so that outputs line up with the caller's ``input_ids`` again."""

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[1] == total:
            return v[:, n:]
        return v

    if isinstance(output, dict):  # transformers ModelOutput
        for key in ("logits", "last_hidden_state"):
            if key in output:
                output[key] = cut(output[key])
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(cut(h) for h in output["hidden_states"])
        return output
    if isinstance(output, tuple) and output:
        return (cut(output[0]), *output[1:])
    return cut(output)


# ----------------------------------------------------------------------------- adapter storage
CONTAINER = "peftlab_inputs"
"""Attribute of the model root holding input-side adapters' modules, keyed by adapter name
(``state_dict`` keys ``peftlab_inputs.<adapter>.<tensor>``)."""


def add_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Register adapter ``name``'s parameters on the model (so optimisers, ``.to()`` and
    ``state_dict`` see them); the module takes the model's train/eval mode."""
    container = model._modules.get(CONTAINER)
    if container is None:
        container = nn.ModuleDict()
        model.add_module(CONTAINER, container)
    module.train(model.training)
    container[name] = module


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model._modules[CONTAINER][name]  # type: ignore[index]


def remove_module(model: nn.Module, name: str) -> None:
    container = model._modules.get(CONTAINER)
    if container is not None and name in container:
        del container[name]
        if not len(container):
            del model._modules[CONTAINER]


def module_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s parameters by ``state_dict`` key."""
    container = model._modules.get(CONTAINER)
    if container is None or name not in container:
        return {}
    return {f"{CONTAINER}.{name}.{k}": p for k, p in container[name].named_parameters()}


def peft_task_type(model: nn.Module | None) -> str | None:
    """peft's ``task_type`` for a transformers model (peft picks its model class from it)."""
    if model is None:
        return None
    cls = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("LMHeadModel", "CAUSAL_LM")):
        if cls.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """``(hidden size, attention heads, layers)`` from a transformers config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError(f"{type(model).__name__} has no transformers config; input-side methods need one "
                          "(hidden size, layers, heads)")
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def first(*keys: str) -> int:
        for k in keys:
            v = getattr(cfg, k, None)
            if isinstance(v, int):
                return v
        raise ConfigError(f"{type(model).__name__}'s config has none of {keys}")

    return (first("hidden_size", "n_embd", "d_model"), first("num_attention_heads", "n_head", "num_heads"),
            first("num_hidden_layers", "n_layer", "num_layers"))
