"""Which model to estimate: a preset, an embedded model, or a ``config.json``; built on the meta device.

A :class:`ModelSource` holds the config numbers only. :meth:`ModelSource.build_meta` builds the
transformers model from them under ``torch.device("meta")``: every parameter has its real shape
and dtype and no storage, so an 8B model builds in about a second and no weight is ever read.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.estimate.presets import PRESETS

HEADS = ("causal-lm", "classifier", "base")
"""What sits on top of the transformer: an LM head (the loss over the vocabulary is counted),
a sequence-classification head, or nothing (``AutoModel``)."""

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""Config fields every estimate needs (under their canonical transformers names)."""

_EXAMPLES = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
             "intermediate_size": 11008, "model_type": '"llama"'}
_DROP = ("transformers_version", "_name_or_path", "_model_name_or_path", "torch_dtype", "dtype",
         "quantization_config", "auto_map")


class UnknownModelError(PeftlabError, KeyError):
    """A model that is neither a preset, an embedded model nor a config file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSource:
    """A model's architecture, as config numbers.

    Attributes:
        name: Display name (the preset or embedded name, or the config file's path).
        config_json: The transformers config as canonical JSON (hashable, so results cache).
        head: One of :data:`HEADS`.
    """

    name: str
    config_json: str
    head: str

    @property
    def numbers(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    def config(self) -> Any:
        """The transformers ``PretrainedConfig`` (built from the numbers; nothing is downloaded)."""
        tf = _transformers()
        numbers = self.numbers
        model_type = numbers.pop("model_type")
        with _quiet():
            return tf.AutoConfig.for_model(model_type, **numbers)

    def build_meta(self, dtype: torch.dtype) -> nn.Module:
        """The model on the meta device in ``dtype``: real shapes, no storage, no weights read."""
        tf = _transformers()
        config = self.config()
        auto = {"causal-lm": tf.AutoModelForCausalLM, "classifier": tf.AutoModelForSequenceClassification,
                "base": tf.AutoModel}[self.head]
        try:
            with _quiet(), torch.device("meta"):
                return auto.from_config(config, dtype=dtype)
        except ValueError as e:
            raise ConfigError(f"{self.name}: transformers cannot build a {self.head} model for model_type "
                              f"{config.model_type!r} ({e}); pass head='base' or another head") from e


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("peftlab.estimate needs transformers: pip install 'peftlab[hf]'") from e
    return transformers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' advisory logging while building configs and meta models."""
    logging = _transformers().utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def known() -> dict[str, str]:
    """Every model name :func:`resolve` accepts besides a path: ``{name: description}``."""
    from peftlab import models

    out = {name: spec["description"] for name, spec in PRESETS.items()}
    for name, spec in models.MODELS.items():
        out.setdefault(name, f"embedded: {spec.description}")
    return out


def resolve(model: str | os.PathLike | dict | Any, head: str | None = None) -> ModelSource:
    """Turn a model argument into a :class:`ModelSource`.

    Args:
        model: A preset name (``"llama-2-7b"``, see :func:`known`), an embedded model name
            (``"smollm2-135m"``, ``"minilm"``, ``"tiny-llama"``...), a path to a ``config.json`` (or
            to a folder holding one), a dict of config numbers with ``model_type``, or a
            transformers ``PretrainedConfig``.
        head: Override the head (:data:`HEADS`); by default the preset's, the embedded model's
            kind, or the config's ``architectures`` entry.

    Raises:
        UnknownModelError: A name that is none of the above (the message lists the known names).
        ConfigError: A config without a field the estimate needs (the message names it).
    """
    if head is not None and head not in HEADS:
        raise ConfigError(f"head must be one of {HEADS} (got {head!r})")
    tf = _transformers()
    if isinstance(model, tf.PretrainedConfig):
        numbers = model.to_dict()
        return _source(getattr(model, "name_or_path", "") or model.model_type, numbers, head)
    if isinstance(model, dict):
        return _source("config", dict(model), head)
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model must be a name, a config.json path, a dict or a PretrainedConfig "
                          f"(got {type(model).__name__})")
    text = os.fspath(model)
    key = text.strip().lower()
    if key in PRESETS:
        spec = PRESETS[key]
        return _source(key, dict(spec["config"]), head or spec["head"])
    from peftlab import models

    if text in models.MODELS:
        return _embedded(text, head)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            numbers = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON config ({e})") from e
        if not isinstance(numbers, dict):
            raise ConfigError(f"{path}: a config.json must hold a JSON object")
        return _source(str(path), numbers, head)
    names = list(known())
    close = difflib.get_close_matches(key, names, n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UnknownModelError(f"unknown model {text!r}.{hint} Known presets: {', '.join(PRESETS)}; embedded "
                            f"models: {', '.join(models.MODELS)}; or pass the path of a transformers config.json.")


def _embedded(name: str, head: str | None) -> ModelSource:
    """An embedded model's config, without loading (or converting) its weights where possible."""
    from peftlab import models

    spec = models.MODELS[name]
    kind = head or ("causal-lm" if spec.kind == "causal-lm" else "classifier")
    if name == "smollm2-135m":
        cache = models.smollm2_cache_dir() / "config.json"
        numbers = json.loads(cache.read_text()) if cache.is_file() else dict(PRESETS["smollm2-135m"]["config"])
        return _source(name, numbers, kind)
    if spec.prepare is not None:  # minilm: a config.json inside its pip package
        folder = spec.prepare()
        numbers = json.loads((Path(folder) / "config.json").read_text())
    else:  # tiny models build in milliseconds; their config is the source of truth
        built, _ = models.load(name, with_tokenizer=False)
        numbers = built.config.to_dict()
    if kind == "classifier":
        numbers["num_labels"] = 3  # models.load's default head
        numbers.pop("id2label", None)
        numbers.pop("label2id", None)
    return _source(name, numbers, kind)


def _source(name: str, numbers: dict[str, Any], head: str | None) -> ModelSource:
    tf = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = numbers.get("model_type")
    if not model_type:
        raise ConfigError(f"{name}: the config has no 'model_type', which the estimate needs to pick the "
                          f"architecture; add it, e.g. \"model_type\": {_EXAMPLES['model_type']}")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{name}: model_type {model_type!r} is not known to transformers "
                          f"{tf.__version__}.{hint}")
    if numbers.get("is_encoder_decoder"):
        raise ConfigError(f"{name}: {model_type!r} is an encoder-decoder model; the estimator's activation "
                          "model covers encoder-only and decoder-only transformers (cross-attention and the "
                          "decoder stack are not modelled), so it refuses rather than guess")
    cls = CONFIG_MAPPING[model_type]
    alias = dict(getattr(cls, "attribute_map", {}) or {})
    needed = list(REQUIRED)
    with _quiet():
        if getattr(cls(), "intermediate_size", None) is not None:
            needed.append("intermediate_size")
    missing = [f for f in needed if f not in numbers and alias.get(f) not in numbers]
    if missing:
        f = missing[0]
        spelled = f"'{f}'" + (f" (or '{alias[f]}')" if f in alias else "")
        raise ConfigError(f"{name}: the config is missing {spelled}, which the estimate needs "
                          f"({_WHY[f]}); add it, e.g. \"{alias.get(f, f)}\": {_EXAMPLES[f]}"
                          + (f"; also missing: {missing[1:]}" if len(missing) > 1 else ""))
    for f in needed:
        value = numbers.get(f, numbers.get(alias.get(f, f)))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}: config field {f!r} must be a positive integer (got {value!r})")
    clean = {k: v for k, v in numbers.items() if k not in _DROP}
    if head is None:
        archs = numbers.get("architectures") or []
        arch = archs[0] if archs else ""
        head = ("classifier" if arch.endswith(("ForSequenceClassification",)) else
                "base" if arch.endswith("Model") and not arch.endswith("LMHeadModel") else "causal-lm")
    return ModelSource(name, json.dumps(clean, sort_keys=True, default=str), head)


_WHY = {
    "hidden_size": "the width of every activation",
    "num_hidden_layers": "activations and KV cache scale with the number of layers",
    "num_attention_heads": "the attention scores and the head width",
    "vocab_size": "the embedding, LM head and loss sizes",
    "intermediate_size": "the MLP width",
}


@dataclass(frozen=True)
class Arch:
    """The numbers the closed forms use, read from a built config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int | None
    sliding_window: int | None
    sliding_layers: int
    """How many layers attend within ``sliding_window`` only (their KV cache is capped by it)."""


def arch_of(config: Any) -> Arch:
    """Read :class:`Arch` from a transformers config (aliases such as GPT-2's ``n_embd`` resolve)."""
    hidden, layers, heads = int(config.hidden_size), int(config.num_hidden_layers), int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        window, sliding = None, 0
    elif types:
        sliding = sum(1 for t in types if "sliding" in str(t))
    else:
        sliding = layers
    return Arch(hidden, layers, heads, int(kv), int(head_dim), int(inter), int(config.vocab_size),
                getattr(config, "max_position_embeddings", None), int(window) if window else None, sliding)
