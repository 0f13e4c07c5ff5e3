"""Prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

``N`` trainable virtual-token embeddings are prepended to the input embeddings; the model stays
frozen. The paper initialises them from vocabulary embeddings (sampled tokens, or the tokens of a
text describing the task): random vectors train worse because they start off the embedding
manifold.

How it acts on a model (``peftlab.core.inputs`` hooks, no wrapper model):

* decoder-only and encoder models: ``input_ids`` become ``inputs_embeds`` with the prompt in front,
  the 2-D ``attention_mask`` gets ``N`` leading ones, ``token_type_ids`` ``N`` leading zeros, 2-D
  ``labels`` ``N`` leading -100 (virtual positions carry no loss), and the real tokens get
  positions from ``N`` on (following the mask, so left-padded rows match single rows). Sequence
  outputs (``logits``, ``last_hidden_state``, ``hidden_states``) have the virtual positions cut
  off again, so they line up with ``input_ids``.
* with a transformers Cache (``generate()``, step-by-step decoding): the prompt goes in with the
  first call, which fills the cache; later calls only extend the mask and shift positions.
* encoder-decoder models: the prompt goes in front of the encoder input; the decoder attends to it
  through cross-attention.

Files follow peft: a single tensor ``prompt_embeddings`` (``N x hidden``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import inputs
from peftlab.core.errors import ConfigError
from peftlab.core.method import Method, register

INITS = ("vocab", "random", "text")
PEFT_INITS = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}
FILE_KEY = "prompt_embeddings"


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Soft prompts of a half-precision model train in fp32 (as peft's do)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class PromptEmbedding(nn.Module):
    """The virtual tokens themselves: ``embedding.weight`` is the prompt (``N x hidden``)."""

    def __init__(self, n: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, dim, device=device, dtype=dtype)

    def prompt(self) -> torch.Tensor:
        return self.embedding.weight

    def use_saved(self, value: torch.Tensor) -> None:
        """Hold ``value`` (a saved prompt) directly; any encoder is dropped."""
        with torch.no_grad():
            self.embedding.weight.copy_(value.to(self.embedding.weight.dtype))


@register("prompt_tuning")
@dataclass(frozen=True)
class PromptTuning(Method):
    """Soft prompt of ``num_virtual_tokens`` trainable embeddings in front of the input."""

    num_virtual_tokens: int = 20
    """Prompt length. The paper finds 20 close to the best for large models; 5-100 all work."""
    init: str = "vocab"
    """'vocab' (embeddings of random vocabulary tokens, the paper's choice), 'random' (normal with
    the embedding table's standard deviation) or 'text' (embeddings of ``init_text``)."""
    init_text: str | None = None
    """Text whose tokens initialise the prompt (repeated or cut to ``num_virtual_tokens``)."""
    init_token_ids: tuple[int, ...] = ()
    """The tokens of ``init_text``: given, or made from it by ``tokenizer`` when the method is built.
    Saved with the adapter, so a file never needs (or names) a tokenizer."""
    tokenizer: Any = field(default=None, compare=False, repr=False)
    """The caller's tokenizer (any callable returning ``{"input_ids": [...]}``), used once to turn
    ``init_text`` into ``init_token_ids``; never saved. peftlab never loads a tokenizer by name."""
    num_transformer_submodules: int = 1
    """peft's field: 2 on an encoder-decoder model holds ``2 x num_virtual_tokens`` prompt rows, of
    which peft's forward and generate() use the first ``num_virtual_tokens`` (in front of the
    encoder input); the rest are kept so that such files round-trip."""
    seed: int = 0
    """Seed of the 'vocab' and 'random' initialisations."""

    peft_type: ClassVar[str | None] = "PROMPT_TUNING"
    file_prefix: ClassVar[str] = "base_model."  # peft's prompt-learning models wrap the base directly
    identity_at_init: ClassVar[bool] = False
    multi_adapter: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    suggested_lr: ClassVar[float] = 3e-2

    def extra_sequence_tokens(self) -> int:
        return self.num_virtual_tokens

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"{self.method_name}: num_virtual_tokens must be a positive integer (got {n!r}); "
                              "20 is a good start")
        if self.init not in INITS:
            raise ConfigError(f"{self.method_name}: init must be one of {INITS} (got {self.init!r})")
        if self.num_transformer_submodules not in (1, 2):
            raise ConfigError(f"{self.method_name}: num_transformer_submodules must be 1 or 2 "
                              f"(got {self.num_transformer_submodules!r})")
        if self.init == "text" and not self.init_text:
            raise ConfigError(f"{self.method_name}: init='text' needs init_text (a description of the task)")
        if self.init == "text" and not self.init_token_ids:
            if self.tokenizer is None:
                raise ConfigError(f"{self.method_name}: init='text' needs a tokenizer to turn init_text into tokens; "
                                  "pass tokenizer=<the model's tokenizer> (or init_token_ids), or use init='vocab'")
            ids = list(self.tokenizer(self.init_text, add_special_tokens=False)["input_ids"])
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in ids))
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.init_token_ids):
            raise ConfigError(f"{self.method_name}: init_token_ids must be integers (got {self.init_token_ids!r})")
        object.__setattr__(self, "tokenizer", None)  # used once; a built method holds no tokenizer

    def options(self) -> dict[str, Any]:
        opts = super().options()
        opts.pop("tokenizer", None)
        return opts

    # ------------------------------------------------------------------------- building
    def _check_model(self, model: nn.Module) -> nn.Embedding:
        if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
            raise ConfigError(f"{self.method_name} needs a transformers model with input embeddings "
                              f"({type(model).__name__} has no get_input_embeddings())")
        if not isinstance(model.get_input_embeddings(), nn.Embedding):
            kind = type(model.get_input_embeddings()).__name__
            raise ConfigError(f"{self.method_name} prepends virtual tokens to a token-embedding table, but the "
                              f"input embeddings of {type(model).__name__} are {kind} (not nn.Embedding: e.g. image "
                              "patches); use lora, bitfit or an adapter (houlsby, pfeiffer) on this model")
        limit = inputs.max_positions(getattr(model, "config", None))
        if limit is not None and self.num_virtual_tokens >= limit:
            raise ConfigError(f"{self.method_name}: {self.num_virtual_tokens} virtual tokens leave no room in the "
                              f"model's {limit} positions; use fewer (e.g. 20)")
        return model.get_input_embeddings()

    def rows(self) -> int:
        """Prompt rows the adapter holds (``num_virtual_tokens`` of them act)."""
        return self.num_virtual_tokens * self.num_transformer_submodules

    def _init_ids(self, vocab: int) -> torch.Tensor:
        n = self.rows()
        if self.init == "text":
            ids = list(self.init_token_ids)
            if not ids:
                raise ConfigError(f"{self.method_name}: init_text {self.init_text!r} has no tokens")
            ids = (ids * (n // len(ids) + 1))[:n]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ConfigError(f"{self.method_name}: the tokenizer gives ids {bad[:5]} outside the model's "
                                  f"vocabulary of {vocab}; use the model's own tokenizer")
            return torch.tensor(ids)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, vocab, (n,), generator=g)

    def build(self, model: nn.Module) -> nn.Module:
        """The adapter module (initialised), before it is registered on the model."""
        emb = self._check_model(model)
        w = emb.weight
        ids = self._init_ids(w.shape[0])
        module = PromptEmbedding(self.rows(), w.shape[1], w.device, adapter_dtype(w))
        self._init_prompt(module.embedding.weight, w, ids)
        return module

    def _init_prompt(self, target: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> None:
        if table.device.type == "meta":
            return
        with torch.no_grad():
            if self.init == "random":
                g = torch.Generator().manual_seed(self.seed)
                std = float(table.float().std())
                target.copy_((torch.randn(target.shape, generator=g) * std).to(target.dtype))
            else:
                target.copy_(table[ids.to(table.device)].to(target.dtype))

    def attach(self, model: nn.Module, name: str) -> None:
        module = self.build(model)
        enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        if self.num_transformer_submodules == 2 and not enc_dec:
            raise ConfigError(f"{self.method_name}: num_transformer_submodules=2 is peft's encoder-decoder layout; "
                              f"{type(model).__name__} is not encoder-decoder (use 1)")
        if enc_dec and not hasattr(model, "get_encoder"):
            raise ConfigError(f"{self.method_name}: {type(model).__name__} is encoder-decoder but has no get_encoder()")
        inputs.add_module(model, name, module)
        if enc_dec:
            inputs.install(model, name, model.get_encoder(), self._encoder_pre(model, name))
            inputs.install(model, name, model, self._seq2seq_pre())
        else:
            inputs.install(model, name, model, self._model_pre(model, name), self._model_post)

    def detach(self, model: nn.Module, name: str) -> None:
        inputs.remove_module(model, name)

    # ------------------------------------------------------------------------- tensors
    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return inputs.module_parameters(model, name)

    def file_tensors(self, model: nn.Module, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        module = inputs.get_module(model, name)
        key = f"{inputs.CONTAINER}.{name}.embedding.weight"
        return {FILE_KEY: (key, module.prompt())}

    def load_file_tensors(self, model: nn.Module, name: str,
                          values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        values = dict(values)
        _, value = values.pop(FILE_KEY)
        inputs.get_module(model, name).use_saved(value)
        super().load_file_tensors(model, name, values)

    # ------------------------------------------------------------------------- hooks
    def _prompt(self, model: nn.Module, name: str, batch: int, dtype: torch.dtype) -> torch.Tensor:
        p = inputs.get_module(model, name).prompt()[:self.num_virtual_tokens].to(dtype)
        return p.unsqueeze(0).expand(batch, -1, -1)

    def _embed(self, model: nn.Module, name: str, kw: dict[str, Any]) -> int:
        """Put the prompt in front of ``input_ids``/``inputs_embeds``; returns the real length."""
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        batch, length = embeds.shape[:2]
        kw["inputs_embeds"] = torch.cat([self._prompt(model, name, batch, embeds.dtype), embeds], dim=1)
        kw["input_ids"] = None
        return length

    def _model_pre(self, model: nn.Module, name: str) -> inputs.PreFn:
        n = self.num_virtual_tokens
        takes_positions = inputs.accepts(model, "position_ids")
        cache_arg = inputs.cache_argument(model)

        def pre(_: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            if kw.get("input_ids") is None and kw.get("inputs_embeds") is None:
                return kw, None
            mask = inputs.two_d_mask(kw.get("attention_mask"), self.method_name)
            cache = inputs.pop_cache(kw)
            if cache is not None:
                if cache_arg is None:
                    raise ConfigError(f"{self.method_name}: a key/value cache was passed to "
                                      f"{type(model).__name__}, whose forward takes none")
                kw[cache_arg] = cache
            past = inputs.cache_length(cache)
            fresh = past == 0
            device = model.get_input_embeddings().weight.device
            if fresh:
                length = self._embed(model, name, kw)
                real_past = 0
                batch = kw["inputs_embeds"].shape[0]
                if mask is not None:
                    kw["attention_mask"] = inputs.prepend_ones(mask, n)
                if kw.get("token_type_ids") is not None:
                    tt = kw["token_type_ids"]
                    kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], n), tt], dim=1)
                labels = kw.get("labels")
                if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == length:
                    kw["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
            else:  # a cache that already holds the prompt: only new real tokens come in
                x = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
                batch, length = x.shape[:2]
                real_past = past - n
                if mask is not None and mask.shape[1] == real_past + length:
                    kw["attention_mask"] = inputs.prepend_ones(mask, n)
            pos = inputs.real_positions(kw.get("position_ids"), mask, real_past, length, n, device)
            inputs.check_positions(model.config, pos.max(), n, self.method_name)
            if takes_positions:
                if fresh:
                    virtual = torch.arange(n, device=pos.device).expand(pos.shape[0], n)
                    pos = torch.cat([virtual, pos], dim=1)
                kw["position_ids"] = pos
            return kw, (n, n + length) if fresh else None

        return pre

    @staticmethod
    def _model_post(_: nn.Module, output: Any, context: tuple[int, int]) -> Any:
        return inputs.strip_virtual(output, *context)

    def _encoder_pre(self, model: nn.Module, name: str) -> inputs.PreFn:
        n = self.num_virtual_tokens

        def pre(_: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            if kw.get("input_ids") is None and kw.get("inputs_embeds") is None:
                return kw, None
            mask = inputs.two_d_mask(kw.get("attention_mask"), self.method_name)
            length = self._embed(model, name, kw)
            inputs.check_positions(model.config, n + length - 1, n, self.method_name)
            if mask is not None and mask.shape[1] == length:
                kw["attention_mask"] = inputs.prepend_ones(mask, n)
            return kw, None

        return pre

    def _seq2seq_pre(self) -> inputs.PreFn:
        n = self.num_virtual_tokens

        def pre(_: nn.Module, kw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            mask = kw.get("attention_mask")
            if mask is None or mask.dim() != 2:
                return kw, None
            enc = kw.get("encoder_outputs")
            if enc is not None:
                real = enc[0].shape[1] - n
            else:
                x = kw["input_ids"] if kw.get("input_ids") is not None else kw.get("inputs_embeds")
                real = x.shape[1] if x is not None else -1
            if mask.shape[1] == real:  # the caller's mask covers the real tokens: add the prompt's
                kw["attention_mask"] = inputs.prepend_ones(mask, n)
            return kw, None

        return pre

    # ------------------------------------------------------------------------- peft config
    def _peft_common(self, model: nn.Module | None) -> dict[str, Any]:
        hidden, heads, layers = inputs.model_dims(model) if model is not None else (None, None, None)
        return {
            "task_type": inputs.peft_task_type(model),
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": hidden,
            "num_transformer_submodules": self.num_transformer_submodules,
            "num_attention_heads": heads,
            "num_layers": layers,
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
        }

    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        # The file holds the trained prompt, so the init only matters when training starts; peft is
        # told 'RANDOM' so that loading never looks for the init tokenizer.
        return {"peft_type": self.peft_type, **self._peft_common(model), "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PromptTuning:
        if "peftlab_method" in config or config.get("peft_type") != cls.peft_type:
            return super().from_config(config)
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]), init="random",
                   num_transformer_submodules=submodules(config),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))


def submodules(config: dict[str, Any]) -> int:
    """peft's ``num_transformer_submodules`` of a prompt-learning config (1 or 2)."""
    value = config.get("num_transformer_submodules") or 1
    if value not in (1, 2):
        raise ConfigError(f"num_transformer_submodules={value!r} is not a layout peft writes (1, or 2 for "
                          "encoder-decoder models)")
    return int(value)
