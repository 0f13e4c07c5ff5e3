"""Prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190) and P-tuning v2
(Liu et al., 2022, https://arxiv.org/abs/2110.07602).

Every attention layer gets ``N`` trainable key and value vectors in front of the keys and values
computed from the input: the frozen model attends to them as to ``N`` extra tokens it never sees.
They are shaped for the model's real key/value layout, ``num_key_value_heads x head_dim`` (grouped-
query attention stores fewer key/value heads than query heads). While training they can be the
output of an MLP over ``N`` smaller embeddings (``projection=True``, the paper's
reparameterisation, which it finds more stable); the file always holds the output, as peft's does.

How the prefix reaches attention (``peftlab.core.inputs`` hooks; no wrapper model):

* with a transformers Cache (``generate()``, step-by-step decoding, or an eval call with
  ``use_cache``): the first call fills the cache with the prefix; later calls find it there;
* otherwise (training, ``use_cache=False``, encoders): each attention module is called with a
  small cache object that puts the prefix in front of its keys and values and stores nothing, and
  the model gets a 4-D mask covering the prefix. This needs no state between calls, so gradient
  checkpointing (which recomputes layers in the backward pass) works.

The real tokens take positions from ``N`` on, as if the prefix were ``N`` tokens in front (peft's
and the papers' convention). Encoder-decoder models get prefixes on encoder self-attention,
decoder self-attention and decoder cross-attention. The key/value layout of each architecture is
listed in :data:`LAYOUTS`; add an entry there for a new one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import inputs
from peftlab.core.errors import ConfigError
from peftlab.core.method import Method, register
from peftlab.methods.prompt_tuning import FILE_KEY, _check_submodules, adapter_dtype

INITS = ("vocab", "random")


@dataclass(frozen=True)
class Site:
    """One attention module that receives a prefix."""

    path: str
    group: str
    """'self' (decoder-only or encoder-only model), 'encoder', 'decoder' or 'cross' (encoder-decoder)."""


@dataclass(frozen=True)
class Layout:
    """Where an architecture's prefixes go and their shape."""

    kind: str
    """'decoder' (causal, keeps a Cache), 'encoder' (bidirectional, no cache) or 'seq2seq'."""
    sites: tuple[Site, ...]
    kv_heads: int
    head_dim: int


def _find(model: nn.Module, pattern: str, group: str) -> list[Site]:
    rx = re.compile(pattern)
    return [Site(p, group) for p, _ in model.named_modules() if rx.fullmatch(p)]


def _cfg(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _llama_like(model: nn.Module) -> Layout:
    cfg = _cfg(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return Layout("decoder", tuple(_find(model, r"(.*\.)?layers\.\d+\.self_attn", "self")), kv, head_dim)


def _gpt2(model: nn.Module) -> Layout:
    cfg = _cfg(model)
    return Layout("decoder", tuple(_find(model, r"(.*\.)?h\.\d+\.attn", "self")), cfg.n_head, cfg.n_embd // cfg.n_head)


def _bert_like(model: nn.Module) -> Layout:
    cfg = _cfg(model)
    if getattr(cfg, "is_decoder", False):
        raise ConfigError("prefix_tuning: BERT-style models used as decoders are not supported; use an encoder")
    heads = cfg.num_attention_heads
    return Layout("encoder", tuple(_find(model, r"(.*\.)?encoder\.layer\.\d+\.attention\.self", "self")),
                  heads, cfg.hidden_size // heads)


def _t5(model: nn.Module) -> Layout:
    cfg = model.config
    sites = (_find(model, r"(.*\.)?encoder\.block\.\d+\.layer\.0\.SelfAttention", "encoder")
             + _find(model, r"(.*\.)?decoder\.block\.\d+\.layer\.0\.SelfAttention", "decoder")
             + _find(model, r"(.*\.)?decoder\.block\.\d+\.layer\.1\.EncDecAttention", "cross"))
    return Layout("seq2seq", tuple(sites), cfg.num_heads, cfg.d_kv)


LAYOUTS: dict[str, Callable[[nn.Module], Layout]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2"), _llama_like),
    "gpt2": _gpt2,
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _bert_like),
    **dict.fromkeys(("t5", "mt5"), _t5),
}
"""``model_type -> layout``. The attention modules listed must take ``past_key_values`` and call
``past_key_values.update(key, value, layer_idx)`` with ``(batch, kv_heads, tokens, head_dim)``
tensors, as transformers' attention modules do. To support another architecture, add
``LAYOUTS["<model_type>"] = fn`` where ``fn(model)`` returns its :class:`Layout`."""


def layout_of(model: nn.Module) -> Layout:
    """The key/value layout of ``model``; an unknown architecture is an error naming the known ones."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in LAYOUTS:
        raise ConfigError(
            f"prefix_tuning: the key/value layout of {type(model).__name__} (model_type {model_type!r}) is not known. "
            f"Supported model types: {sorted(LAYOUTS)}. To add one, register a function that lists its attention "
            "modules and key/value shape: peftlab.methods.prefix_tuning.LAYOUTS[model_type] = fn "
            "(see _llama_like for the pattern).")
    layout = LAYOUTS[model_type](model)
    if not layout.sites:
        raise ConfigError(f"prefix_tuning: no attention modules found in {type(model).__name__} for model_type "
                          f"{model_type!r}; its module names differ from the registered layout")
    return layout


class PrefixCache:
    """A stand-in for a transformers Cache in one attention call: puts the prefix in front of the
    keys and values and stores nothing (so recomputing the layer gives the same result)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int = 0, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key.shape[-2]


class _Recorder(PrefixCache):
    """Records the keys and values an attention module computes (prefix initialisation)."""

    def __init__(self) -> None:
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int = 0, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = (key.detach(), value.detach())
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


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


class _Current:
    """The prefixes of the latest model call: computed once per call (one MLP pass shared by every
    layer) and reused by attention calls outside a model call (an encoder run on its own by
    ``generate()``, layers recomputed by gradient checkpointing) while the parameters are unchanged."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.value: torch.Tensor | None = None
        self.versions: tuple[int, ...] = ()

    def compute(self, module: nn.Module) -> torch.Tensor:
        self.value = module.prompt()
        self.versions = tuple(p._version for p in module.parameters())
        return self.value

    def get(self, module: nn.Module) -> torch.Tensor:
        if self.value is None or self.versions != tuple(p._version for p in module.parameters()):
            return self.compute(module)
        return self.value


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
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"prefix_tuning: encoder_hidden_size must be positive (got {self.encoder_hidden_size})")

    # ------------------------------------------------------------------------- building
    def attach(self, model: nn.Module, name: str) -> None:
        layout = layout_of(model)
        limit = inputs.max_positions(_cfg(model))
        if limit is not None and self.num_virtual_tokens >= limit:
            raise ConfigError(f"prefix_tuning: {self.num_virtual_tokens} virtual tokens leave no room in the "
                              f"model's {limit} positions; use fewer (e.g. 20)")
        emb = model.get_input_embeddings().weight
        hidden = emb.shape[1]
        total = len(layout.sites) * 2 * layout.kv_heads * layout.head_dim
        module = PrefixEncoder(self.num_virtual_tokens, total, hidden, self.encoder_hidden_size or hidden,
                               self.projection, emb.device, adapter_dtype(emb))
        if emb.device.type != "meta":
            self._initialise(model, layout, module, emb)
        inputs.add_module(model, name, module)
        current = _Current(layout)
        for i, site in enumerate(layout.sites):
            inputs.install(model, name, model.get_submodule(site.path), self._site_pre(model, name, i, current))
        if layout.kind == "seq2seq":
            inputs.install(model, name, model.get_encoder(), self._encoder_pre())
            inputs.install(model, name, model, self._seq2seq_pre(model, name, layout, current))
        else:
            inputs.install(model, name, model, self._model_pre(model, name, layout, current))

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
        recorders = [_Recorder() for _ in layout.sites]
        handles = []
        for site, rec in zip(layout.sites, recorders):
            def pre(_: nn.Module, args: Any, kwargs: dict[str, Any], rec: _Recorder = rec) -> Any:
                kwargs["past_key_values"] = rec
                return args, kwargs
            handles.append(model.get_submodule(site.path).register_forward_pre_hook(pre, with_kwargs=True))
        was_training = model.training
        try:
            model.eval()
            extra = {"decoder_input_ids": ids} if layout.kind == "seq2seq" else {}
            model(input_ids=ids, use_cache=False, **extra)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        parts = []
        for rec in recorders:
            assert rec.seen is not None, "an attention module did not use the prefix cache"
            k, v = rec.seen  # (1, kv_heads, n, head_dim)
            parts += [k[0].permute(1, 0, 2).reshape(n, -1), v[0].permute(1, 0, 2).reshape(n, -1)]
        w = module.embedding.weight
        w.copy_(torch.cat(parts, dim=1).to(w.dtype))

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

    # ------------------------------------------------------------------------- hooks
    def _kv(self, model: nn.Module, name: str, current: _Current, index: int, batch: int,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value prefix of site ``index``: ``(batch, kv_heads, N, head_dim)`` each."""
        flat = current.get(inputs.get_module(model, name))
        layout = current.layout
        n = self.num_virtual_tokens
        kv = flat.view(n, len(layout.sites) * 2, layout.kv_heads, layout.head_dim)
        k = kv[:, 2 * index].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)
        v = kv[:, 2 * index + 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)
        return k, v

    def _site_pre(self, model: nn.Module, name: str, index: int, current: _Current) -> inputs.PreFn:
        def pre(_: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            if kw.get("past_key_values") is not None:  # a real cache: the model call put the prefix there
                return kw, None
            hs = kw["hidden_states"]
            kw["past_key_values"] = PrefixCache(*self._kv(model, name, current, index, hs.shape[0], hs.dtype))
            return kw, None

        return pre

    def _start(self, model: nn.Module, name: str, layout: Layout, current: _Current) -> None:
        current.compute(inputs.get_module(model, name))

    def _fill(self, model: nn.Module, name: str, current: _Current, layout: Layout, cache: Any, group: str,
              batch: int, dtype: torch.dtype) -> None:
        for i, site in enumerate(layout.sites):
            if site.group == group:
                layer = model.get_submodule(site.path).layer_idx
                cache.update(*self._kv(model, name, current, i, batch, dtype), layer)

    def _model_pre(self, model: nn.Module, name: str, layout: Layout, current: _Current) -> inputs.PreFn:
        n = self.num_virtual_tokens
        takes_positions = inputs.accepts(model, "position_ids")
        causal = layout.kind == "decoder"

        def pre(_: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            x = kw["input_ids"] if kw.get("input_ids") is not None else kw.get("inputs_embeds")
            if x is None:
                return kw, None
            batch, length = x.shape[:2]
            emb = model.get_input_embeddings().weight
            dtype = emb.dtype if emb.is_floating_point() else torch.float32
            mask = inputs.two_d_mask(kw.get("attention_mask"), "prefix_tuning")
            cache = kw.get("past_key_values")
            use_cache = kw.get("use_cache")
            if use_cache is None:
                use_cache = bool(getattr(_cfg(model), "use_cache", False))
            self._start(model, name, layout, current)
            if causal and (cache is not None or (use_cache and not model.training)):
                if cache is None:
                    from transformers import DynamicCache

                    cache = DynamicCache(config=model.config)
                past = inputs.cache_length(cache)
                if past == 0:
                    self._fill(model, name, current, layout, cache, "self", batch, dtype)
                    past = n
                real_past = past - n
                kw["past_key_values"], kw["use_cache"] = cache, True
                if mask is not None and mask.shape[1] == real_past + length:
                    kw["attention_mask"] = inputs.prepend_ones(mask, n)
            else:
                real_past = 0
                kw["use_cache"] = False
                kw["attention_mask"] = inputs.prefix_attention_mask(mask, batch, length, 0, n, causal, dtype, x.device)
            pos = inputs.real_positions(kw.get("position_ids"), mask, real_past, length, n, x.device)
            inputs.check_positions(_cfg(model), pos.max(), n, "prefix_tuning")
            if takes_positions:
                kw["position_ids"] = pos
            return kw, True

        return pre

    def _encoder_pre(self) -> inputs.PreFn:
        n = self.num_virtual_tokens

        def pre(mod: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            mask = kw.get("attention_mask")
            x = kw["input_ids"] if kw.get("input_ids") is not None else kw.get("inputs_embeds")
            if x is not None and mask is not None and mask.dim() == 2:
                dtype = mod.embed_tokens.weight.dtype if hasattr(mod, "embed_tokens") else torch.float32
                kw["attention_mask"] = inputs.prefix_padding_mask(mask, n, dtype)
            return kw, None

        return pre

    def _seq2seq_pre(self, model: nn.Module, name: str, layout: Layout, current: _Current) -> inputs.PreFn:
        n = self.num_virtual_tokens

        def pre(_: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            self._start(model, name, layout, current)
            dtype = model.get_input_embeddings().weight.dtype
            mask = kw.get("attention_mask")
            if mask is not None and mask.dim() == 2:  # encoder self- and cross-attention see the prefix
                kw["attention_mask"] = inputs.prefix_padding_mask(mask, n, dtype)
            dec = next((kw[k] for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")
                        if kw.get(k) is not None), None)
            if dec is None:
                return kw, True
            batch, length = dec.shape[:2]
            dmask = inputs.two_d_mask(kw.get("decoder_attention_mask"), "prefix_tuning")
            cache = kw.get("past_key_values")
            use_cache = kw.get("use_cache")
            if use_cache is None:
                use_cache = bool(getattr(model.config, "use_cache", False))
            if cache is not None or (use_cache and not model.training):
                from transformers import DynamicCache, EncoderDecoderCache

                if cache is None:
                    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
                past = inputs.cache_length(cache)
                if past == 0:
                    self._fill(model, name, current, layout, cache.self_attention_cache, "decoder", batch, dtype)
                    self._fill(model, name, current, layout, cache.cross_attention_cache, "cross", batch, dtype)
                    past = n
                kw["past_key_values"], kw["use_cache"] = cache, True
                if dmask is not None and dmask.shape[1] == past - n + length:
                    kw["decoder_attention_mask"] = inputs.prepend_ones(dmask, n)
            else:
                kw["use_cache"] = False
                kw["decoder_attention_mask"] = inputs.prefix_attention_mask(dmask, batch, length, 0, n, True, dtype,
                                                                            dec.device)
            return kw, True

        return pre

    # ------------------------------------------------------------------------- peft config
    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        layout = layout_of(model) if model is not None else None
        hidden = inputs.model_dims(model)[0] if model is not None else None
        return {
            "peft_type": self.peft_type,
            "task_type": inputs.peft_task_type(model),
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": layout.kv_heads * layout.head_dim if layout else None,
            "num_transformer_submodules": 1,
            "num_attention_heads": layout.kv_heads if layout else None,
            "num_layers": len(layout.sites) if layout else None,
            "encoder_hidden_size": self.encoder_hidden_size or hidden,
            "prefix_projection": self.projection,
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PrefixTuning:
        if "peftlab_method" in config or config.get("peft_type") != cls.peft_type:
            return super().from_config(config)
        _check_submodules(config, cls.method_name)
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]),
                   projection=bool(config.get("prefix_projection", False)),
                   encoder_hidden_size=config.get("encoder_hidden_size"),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))

