"""Prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190) and P-tuning v2
(Liu et al., 2022, https://arxiv.org/abs/2110.07602).

Every attention layer gets ``N`` trainable key and value vectors in front of the keys and values
computed from the input: the frozen model attends to them as to ``N`` extra tokens it never sees.
They are shaped for the model's real key/value layout, ``num_key_value_heads x head_dim`` (grouped-
query attention stores fewer key/value heads than query heads). While training they can be the
output of an MLP over ``N`` smaller embeddings (``projection=True``, the paper's
reparameterisation, which it finds more stable); the file always holds the output, as peft's does.

How the prefix reaches attention: through the model's public key/value cache, as peft does. A
forward pre-hook on the model hands it a transformers ``DynamicCache`` already holding the
prefixes of every layer (the caller's own cache when it passes an empty one, as ``generate()``
does; a new one otherwise), extends the 2-D attention mask by ``N`` ones and gives the real tokens
positions from ``N`` on (peft's and the papers' convention). Attention layers then append their
keys and values to the prefix like any cached tokens, so no private argument of an attention
module is touched. After a call that started from the prefix, every layer of the cache must have
grown: if one did not, the model no longer reads the cache (an upstream change) and the call
fails loudly instead of silently training nothing.

The layout (layers, key/value heads, head dimension) comes from the model's config
(``num_key_value_heads``, ``head_dim``, ``num_hidden_layers`` and their older spellings); an
entry in :data:`LAYOUTS` overrides it for a model type whose config says otherwise.
Encoder-decoder models get prefixes in decoder self-attention (peft's layout for
``SEQ_2_SEQ_LM``). Gradient checkpointing is refused: transformers drops the cache inside
checkpointed layers, which would disconnect the prefixes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import inputs
from peftlab.core.config import HIDDEN, first_int, text_config
from peftlab.core.errors import ConfigError
from peftlab.core.method import Method, register
from peftlab.methods.prompt_tuning import FILE_KEY, adapter_dtype

INITS = ("vocab", "random")


@dataclass(frozen=True)
class Layout:
    """Where a model's prefixes go and their shape."""

    seq2seq: bool
    """Encoder-decoder: the prefixes go to the decoder's self-attention cache."""
    layers: int
    """Attention layers that receive a prefix (the decoder's, for encoder-decoder models)."""
    kv_heads: int
    head_dim: int


def _cfg(model: nn.Module) -> Any:
    return text_config(model)


def layout_from_config(model: nn.Module) -> Layout:
    """The key/value layout stated by a transformers config (any architecture that uses the usual names)."""
    cfg = _cfg(model)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq:
        layers = first_int(cfg, "num_decoder_layers", "decoder_layers", "num_layers", "num_hidden_layers")
        heads = first_int(cfg, "decoder_attention_heads", "num_heads", "num_attention_heads")
    else:
        layers = first_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
        heads = first_int(cfg, "num_attention_heads", "n_head", "num_heads")
    hidden = first_int(cfg, *HIDDEN)
    if layers is None or heads is None or hidden is None:
        raise ConfigError(f"prefix_tuning: {type(model).__name__}'s config does not state its layers, attention "
                          "heads and hidden size under the usual names; register its layout: "
                          "peftlab.methods.prefix_tuning.LAYOUTS[model_type] = fn(model) -> Layout")
    kv = first_int(cfg, "num_key_value_heads", "num_kv_heads") or heads
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1
    head_dim = first_int(cfg, "head_dim", "d_kv") or hidden // heads
    return Layout(seq2seq, layers, kv, head_dim)


LAYOUTS: dict[str, Callable[[nn.Module], Layout]] = {}
"""``model_type -> fn(model) -> Layout``: overrides for a model type whose config does not state its
key/value layout under the usual names (:func:`layout_from_config` covers the rest)."""


def cache_taker(model: nn.Module) -> nn.Module | None:
    """The module that receives the prefix cache: the model itself when its forward takes a cache,
    else its backbone (``model.base_model``: a classifier head's forward often takes none)."""
    if inputs.cache_argument(model) is not None:
        return model
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model and inputs.cache_argument(backbone) is not None:
        return backbone
    return None


def key_row(layout: Layout, layer: int) -> int:
    """Row (of ``layers * 2`` key/value rows) holding layer ``layer``'s keys; the values follow it.

    peft reads a seq2seq prefix as [self k, self v, cross k, cross v] per layer over two copies of
    the rows and then drops the cross-attention part, so decoder layer ``i`` reads rows
    ``4i mod 2L`` and the one after it; files are only interchangeable if this reading is kept.
    """
    return (4 * layer) % (2 * layout.layers) if layout.seq2seq else 2 * layer


def layout_of(model: nn.Module) -> Layout:
    """The key/value layout of ``model``; a model that takes no key/value cache is refused."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_input_embeddings"):
        raise ConfigError(f"prefix_tuning needs a transformers model (with a config); got {type(model).__name__}")
    if cache_taker(model) is None:
        raise ConfigError(
            f"prefix_tuning: {type(model).__name__} (model_type {getattr(cfg, 'model_type', None)!r}) takes no "
            f"key/value cache (its forward has none of {inputs.CACHE_ARGUMENTS}), so prefixes cannot reach its "
            "attention; use prompt_tuning or p_tuning (input-side prompts) or lora instead")
    fn = LAYOUTS.get(getattr(cfg, "model_type", None), layout_from_config)
    return fn(model)


class PrefixCacheError(RuntimeError):
    """An attention layer did not read the prefix from the cache (the model's cache handling changed)."""


class PrefixEncoder(nn.Module):
    """The prefixes, ``(N, sites * 2 * kv_heads * head_dim)``: ``embedding.weight`` itself, or
    (``projection``) an MLP's output over ``N`` smaller embeddings. Names follow peft."""

    def __init__(self, n: int, total: int, dim: int, hidden: int, projection: bool, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(n, dim if projection else total, **kw)
        self.transform: nn.Sequential | None = (
            nn.Sequential(nn.Linear(dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, total, **kw))
            if projection else None)

    def prompt(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x

    def use_saved(self, value: torch.Tensor) -> None:
        """Drop the MLP and hold the saved prefixes (its output) directly."""
        old = self.embedding.weight
        self.transform = None
        self.embedding = nn.Embedding(value.shape[0], value.shape[1], device=old.device, dtype=old.dtype)
        self.embedding.weight.requires_grad_(old.requires_grad)
        with torch.no_grad():
            self.embedding.weight.copy_(value.to(old.dtype))


@register("prefix_tuning")
@dataclass(frozen=True)
class PrefixTuning(Method):
    """Trainable key/value prefixes in every attention layer (P-tuning v2)."""

    num_virtual_tokens: int = 20
    """Prefix length. Li & Liang use 10 (table-to-text) to 200 (summarisation)."""
    projection: bool = False
    """Train the prefixes through an MLP (Li & Liang's reparameterisation); the file holds its output."""
    encoder_hidden_size: int | None = None
    """MLP width with ``projection``; None: the model's hidden size."""
    init: str = "vocab"
    """'vocab': the keys and values the frozen model computes for random vocabulary tokens (Li &
    Liang, Sec. 7.2: initialising with real activations trains better); 'random': normal, std 0.02."""
    seed: int = 0

    peft_type: ClassVar[str | None] = "PREFIX_TUNING"
    file_prefix: ClassVar[str] = "base_model."  # peft's prompt-learning models wrap the base directly
    identity_at_init: ClassVar[bool] = False
    multi_adapter: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    saves_trainable_parameters: ClassVar[bool] = False
    suggested_lr: ClassVar[float] = 1e-2

    def extra_key_tokens(self) -> int:
        return self.num_virtual_tokens

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"prefix_tuning: num_virtual_tokens must be a positive integer (got {n!r}); "
                              "20 is a good start")
        if self.init not in INITS:
            raise ConfigError(f"prefix_tuning: init must be one of {INITS} (got {self.init!r})")
        if not isinstance(self.projection, bool):
            raise ConfigError(f"prefix_tuning: projection must be True or False (got {self.projection!r})")
        h = self.encoder_hidden_size
        if h is not None and (not isinstance(h, int) or isinstance(h, bool) or h < 1):
            raise ConfigError(f"prefix_tuning: encoder_hidden_size must be a positive integer (got {h!r})")

    # ------------------------------------------------------------------------- building
    def attach(self, model: nn.Module, name: str) -> None:
        layout = layout_of(model)
        limit = inputs.max_positions(_cfg(model))
        if limit is not None and self.num_virtual_tokens >= limit:
            raise ConfigError(f"prefix_tuning: {self.num_virtual_tokens} virtual tokens leave no room in the "
                              f"model's {limit} positions; use fewer (e.g. 20)")
        emb = model.get_input_embeddings().weight
        hidden = emb.shape[1]
        total = layout.layers * 2 * layout.kv_heads * layout.head_dim
        module = PrefixEncoder(self.num_virtual_tokens, total, hidden, self.encoder_hidden_size or hidden,
                               self.projection, emb.device, adapter_dtype(emb))
        if emb.device.type != "meta":
            self._initialise(model, layout, module, emb)
        inputs.add_module(model, name, module)
        taker = cache_taker(model)
        assert taker is not None  # layout_of checked it
        inputs.install(model, name, taker, self._model_pre(model, taker, name, layout), self._model_post(layout))

    @torch.no_grad()
    def _initialise(self, model: nn.Module, layout: Layout, module: PrefixEncoder, emb: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.seed)
        n = self.num_virtual_tokens
        if self.init == "random":
            w = module.embedding.weight
            w.copy_((torch.randn(w.shape, generator=g) * 0.02).to(w.dtype))
            return
        ids = torch.randint(0, emb.shape[0], (1, n), generator=g).to(emb.device)
        if self.projection:  # the MLP's inputs start as word embeddings
            module.embedding.weight.copy_(emb[ids[0]].to(module.embedding.weight.dtype))
            return
        # the keys and values the frozen model puts into its cache for those N tokens
        cache = inputs.new_cache(model.config, layout.seq2seq)
        extra = {"decoder_input_ids": ids} if layout.seq2seq else {}
        was_training = model.training
        try:
            model.eval()
            taker = cache_taker(model)
            assert taker is not None  # layout_of checked it
            taker(input_ids=ids, use_cache=True, **{inputs.cache_argument(taker) or "": cache},
                  **(extra if taker is model else {}))
        finally:
            model.train(was_training)
        own = inputs.self_attention_cache(cache)
        rows = torch.zeros(n, layout.layers * 2, layout.kv_heads * layout.head_dim)
        for layer in reversed(range(layout.layers)):  # where peft's seq2seq reading shares rows, layer 0's win
            if inputs.layer_length(own, layer) != n:
                raise PrefixCacheError(
                    f"prefix_tuning: attention layer {layer} of {type(model).__name__} did not store its keys and "
                    "values in the cache it was given; this transformers release handles the cache differently. "
                    "Use init='random', or report the model type and transformers version")
            k, v = inputs.layer_key_values(own, layer)  # (1, kv_heads, n, head_dim)
            row = key_row(layout, layer)
            rows[:, row] = k[0].permute(1, 0, 2).reshape(n, -1).float().cpu()
            rows[:, row + 1] = v[0].permute(1, 0, 2).reshape(n, -1).float().cpu()
        w = module.embedding.weight
        w.copy_(rows.reshape(n, -1).to(device=w.device, dtype=w.dtype))

    def detach(self, model: nn.Module, name: str) -> None:
        inputs.remove_module(model, name)

    # ------------------------------------------------------------------------- tensors
    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return inputs.module_parameters(model, name)

    def file_tensors(self, model: nn.Module, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        module = inputs.get_module(model, name)
        value = module.prompt()
        value = value if isinstance(value, nn.Parameter) else value.detach()
        return {FILE_KEY: (f"{inputs.CONTAINER}.{name}.embedding.weight", value)}

    def load_file_tensors(self, model: nn.Module, name: str,
                          values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        values = dict(values)
        _, value = values.pop(FILE_KEY)
        inputs.get_module(model, name).use_saved(value)
        super().load_file_tensors(model, name, values)

    # ------------------------------------------------------------------------- the hook
    def _fill(self, prefix: torch.Tensor, layout: Layout, cache: Any, batch: int, dtype: torch.dtype) -> None:
        """Put every layer's prefix, ``(batch, kv_heads, N, head_dim)``, into an empty cache."""
        n = self.num_virtual_tokens
        kv = prefix.view(n, layout.layers * 2, layout.kv_heads, layout.head_dim).to(dtype)
        for layer in range(layout.layers):
            row = key_row(layout, layer)
            k = kv[:, row].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
            v = kv[:, row + 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(k, v, layer)

    def _model_pre(self, model: nn.Module, taker: nn.Module, name: str, layout: Layout) -> inputs.PreFn:
        n = self.num_virtual_tokens
        cache_arg = inputs.cache_argument(taker)
        assert cache_arg is not None  # layout_of checked it
        takes_positions = not layout.seq2seq and inputs.accepts(taker, "position_ids")
        ids_key, mask_key = ("decoder_input_ids", "decoder_attention_mask") if layout.seq2seq \
            else ("input_ids", "attention_mask")
        embeds_key = "decoder_inputs_embeds" if layout.seq2seq else "inputs_embeds"

        def pre(_: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            x = kw[ids_key] if kw.get(ids_key) is not None else kw.get(embeds_key)
            if x is None and layout.seq2seq and kw.get("labels") is not None:
                x = kw["labels"]  # the decoder input is made from the labels (shifted right)
            if x is None:
                return kw, None
            if model.training and inputs.checkpointing_activations(model):
                raise ConfigError("prefix_tuning cannot train with gradient checkpointing: transformers drops the "
                                  "key/value cache inside checkpointed layers, which would disconnect the prefixes. "
                                  "Turn gradient checkpointing off (model.gradient_checkpointing_disable()), or use "
                                  "prompt_tuning, p_tuning or lora")
            batch, length = x.shape[:2]
            emb = model.get_input_embeddings().weight
            dtype = emb.dtype if emb.is_floating_point() else torch.float32
            mask = inputs.two_d_mask(kw.get(mask_key), "prefix_tuning")
            cache = inputs.pop_cache(kw)
            if cache is None:
                cache = inputs.new_cache(model.config, layout.seq2seq)
            past = inputs.cache_length(cache)
            filled = past == 0
            if filled:
                self._fill(inputs.get_module(model, name).prompt(), layout, inputs.self_attention_cache(cache),
                           batch, dtype)
                past = n
            real_past = past - n
            kw[cache_arg] = cache
            if mask is not None and mask.shape[1] == real_past + length:
                kw[mask_key] = inputs.prepend_ones(mask, n)
            if takes_positions:
                pos = inputs.real_positions(kw.get("position_ids"), mask, real_past, length, n, x.device)
                inputs.check_positions(_cfg(model), pos.max(), n, "prefix_tuning")
                kw["position_ids"] = pos
            elif not layout.seq2seq:
                inputs.check_positions(_cfg(model), real_past + length + n - 1, n, "prefix_tuning")
            return kw, (cache, length) if filled else None

        return pre

    def _model_post(self, layout: Layout) -> inputs.PostFn:
        n = self.num_virtual_tokens

        def post(mod: nn.Module, output: Any, context: tuple[Any, int]) -> Any:
            cache, length = context
            own = inputs.self_attention_cache(cache)
            short = [layer for layer in range(layout.layers) if inputs.layer_length(own, layer) < n + length]
            if short:
                raise PrefixCacheError(
                    f"prefix_tuning: attention layers {short} of {type(mod).__name__} did not read the prefix from "
                    "the key/value cache passed to the model, so the adapter had no effect. This transformers "
                    "release passes the cache differently; pin the versions in the project's constraints file "
                    "and report the model type and transformers version")
            return None

        return post

    # ------------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        layout = layout_of(model) if model is not None else None
        hidden = inputs.model_dims(model)[0] if model is not None else None
        return {
            "peft_type": self.peft_type,
            "task_type": inputs.peft_task_type(model),
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": layout.kv_heads * layout.head_dim if layout else None,
            "num_transformer_submodules": 2 if layout and layout.seq2seq else 1,
            "num_attention_heads": layout.kv_heads if layout else None,
            "num_layers": layout.layers if layout else None,
            "encoder_hidden_size": self.encoder_hidden_size or hidden,
            "prefix_projection": self.projection,
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PrefixTuning:
        if "peftlab_method" in config or config.get("peft_type") != cls.peft_type:
            return super().from_config(config)
        # peft prefixes a seq2seq decoder with num_transformer_submodules=2 (self-attention; the
        # cross-attention copy is dropped), the layout peftlab builds, so both values are accepted.
        if (config.get("num_transformer_submodules") or 1) not in (1, 2):
            raise ConfigError(f"prefix_tuning: num_transformer_submodules="
                              f"{config['num_transformer_submodules']} is not a layout peft or peftlab writes")
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]),
                   projection=bool(config.get("prefix_projection", False)),
                   encoder_hidden_size=config.get("encoder_hidden_size"),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))
