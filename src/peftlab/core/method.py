"""The one extension point: :class:`Method` and the :func:`register` decorator.

A method is a frozen dataclass that is both its configuration and its behaviour. Its fields are
the hyperparameters (serialised to ``adapter_config.json``); its methods put the adapter on a
model, merge it, and name its tensors. Shared code (``peftlab.api``, ``core.state``, the lab)
talks to every method through this class only, so adding a method is adding one file under
``peftlab/methods/`` that calls :func:`register`.

The default implementations below serve every *layer-wrapping* method: they walk the model for
:class:`~peftlab.core.layer.AdapterLayer` modules that hold the adapter. Methods of other kinds
(parameter selection, input side, optimizer side) override what differs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.layer import AdapterLayer, MergeableLayer, adapter_layers
from peftlab.core.transaction import before_write

FILE_PREFIX = "base_model.model."
"""Prefix of every tensor key in an adapter file: peft's layout, so that peft loads our files."""


def wrapped_base_key(model: nn.Module, key: str, name: str, layer_type: type[AdapterLayer]) -> str:
    """File key of base tensor ``key`` for methods whose peft layers wrap the adapted module: a
    tensor of a ``layer_type`` layer holding adapter ``name`` is under its ``base_layer``."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if isinstance(module, layer_type) and name in module.adapter_names():
        return f"{FILE_PREFIX}{path}.base_layer.{leaf}"
    return FILE_PREFIX + key


M = TypeVar("M", bound="Method")
_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator that registers a :class:`Method` subclass under ``name``.

    Args:
        name: The method's public name (``peftlab.methods()``, CLI, saved configs).
    """

    def deco(cls: type[M]) -> type[M]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__qualname__} must be a @dataclass(frozen=True) to be registered")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin_methods() -> None:
    import peftlab.methods  # noqa: F401  (registers the built-in methods on import)


def methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; an unknown name is an error listing the known ones."""
    _load_builtin_methods()
    if not isinstance(name, str):
        raise ConfigError(f"a method name must be a string such as 'lora' (got {name!r}); "
                          f"known methods: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}.") from None


def get_method(name: str, **options: Any) -> Method:
    """Build a method by name: ``get_method("lora", r=16, target_modules=["q_proj"])``."""
    return method_class(name).from_options(options)


@dataclass(frozen=True)
class Method:
    """Base class of every PEFT method.

    Subclasses are ``@register("name") @dataclass(frozen=True)`` classes whose fields are the
    method's hyperparameters. Capabilities are class variables so that shared code (and the
    contract test suite) can ask instead of special-casing a method.
    """

    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full and saved with the adapter (e.g. a new classification head)."""

    method_name: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    """peft's ``peft_type`` where peft has this method (its files then load in peft)."""
    peft_peer_untrainable: ClassVar[str] = ""
    """Why a generic training loop cannot train peft's version of this method like peftlab's
    (empty: it can). ``peftlab bench --vs peft`` then lists that peer as not measured, with this
    reason, instead of timing a peer that trains something else."""
    file_prefix: ClassVar[str] = FILE_PREFIX
    """Prefix of base-model paths in file keys (peft: ``base_model.model.`` for LoRA-style
    methods, ``base_model.`` for prompt learning, whose peft model wraps the base directly)."""
    mergeable: ClassVar[bool] = False
    """Whether the update can be folded into the base weights (``peftlab.merge``)."""
    identity_at_init: ClassVar[bool] = True
    """Whether the adapted model equals the base model right after ``attach``."""
    multi_adapter: ClassVar[bool] = True
    """Whether several adapters of this method can live on one model at once."""
    suggested_lr: ClassVar[float] = 1e-3
    """A learning rate that works for short runs; the lab's default for this method."""
    layer_owner: ClassVar[str] = ""
    """The ``owner_method`` tag of the adapted layers this method's adapters live in; empty means
    ``method_name``. Methods that share one layer type (e.g. the bottleneck-adapter family, so that
    their adapters can sit on the same module) share a tag."""
    typical_score: ClassVar[float | None] = None
    """Task score relative to full fine-tuning that the method's paper reports (``peftlab
    recommend`` uses it where no measured result exists); cite it in ``typical_score_source``."""
    typical_score_source: ClassVar[str] = ""

    fsdp_compatible: ClassVar[bool] = True
    """Whether the adapter trains with its model sharded by FSDP2 (``fully_shard``: every tensor
    split along dim 0 over the ranks). A method whose tensors or optimizer need whole matrices on
    every rank (an optimizer that projects each gradient matrix, such as GaLore; parameters
    shared by every block, such as Compacter's rule matrices) sets False: the trainer then refuses
    ``strategy="fsdp"`` with ``fsdp_reason`` and names ``fsdp_alternative``. Tensors that must be
    sharded but are not parameters are made so in :meth:`prepare_sharding`."""
    fsdp_reason: ClassVar[str] = ""
    fsdp_alternative: ClassVar[str] = "--strategy ddp (torchrun) or DeepSpeed ZeRO-2"
    ddp_find_unused_parameters: ClassVar[bool] = False
    """Whether some trainable parameters may get no gradient in a training step (DDP then has to
    look for them: ``find_unused_parameters=True``, one extra graph walk per step)."""
    merge_hint: ClassVar[str] = ""
    """What to do instead, appended to the error when a non-mergeable method is merged."""

    saves_trainable_parameters: ClassVar[bool] = True
    """Whether the file holds the trainable parameters themselves. False where it holds a form
    derived from them for inference (P-tuning and prefix tuning save their prompt encoder's output,
    as peft does, so loading needs no encoder)."""

    trains_base_weights: ClassVar[bool] = False
    """Whether the method trains the base model's own weights in full, in place and without a copy
    of the originals (full-parameter training with its own optimizer: GaLore). Its tensors are
    then the base weights: ``peftlab.disabled`` and ``detach`` refuse (there is no base to go back
    to), up to 100 % of the base trains, and its saved file is the full trained model."""

    # ----------------------------------------------------------------------------- fields
    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every method's fields are type-checked when it is built, before its own __post_init__.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_peftlab_checks_fields", False):
            @functools.wraps(own)
            def post_init(self: Method) -> None:
                check_fields(self)
                own(self)

            post_init._peftlab_checks_fields = True  # type: ignore[attr-defined]
            cls.__post_init__ = post_init  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        """Check every field against its declared type (:func:`check_fields`); subclasses'
        own ``__post_init__`` runs after this check (``__init_subclass__`` arranges it)."""
        check_fields(self)

    # ----------------------------------------------------------------------------- sizing
    def extra_sequence_tokens(self) -> int:
        """Positions the method adds to every input sequence (prompt tuning's virtual tokens).

        Default 0. Shared code that sizes a forward pass (``peftlab.estimate``) lengthens the
        sequence of every layer by this many tokens, so activations grow with it.
        """
        return 0

    def extra_key_tokens(self) -> int:
        """Key/value positions the method adds to every attention layer without adding queries
        (prefix tuning's prefixes). Default 0; ``peftlab.estimate`` lengthens the keys by this."""
        return 0

    def make_optimizer(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                       grad_accum: int = 1) -> torch.optim.Optimizer | None:
        """The optimizer this method trains with, over ``model``'s trainable tensors, or None
        (the default) for the trainer's own AdamW. The lab trainer asks every attached adapter;
        at most one may answer. A method refuses settings its optimizer cannot follow here
        (layer-wise GaLore with ``grad_accum > 1``)."""
        return None

    def optimizer_state_elements(self, model: nn.Module, name: str) -> dict[str, tuple[int, int]] | None:
        """The state of the optimizer the method brings (``make_optimizer``), for the memory
        estimator: ``{trainable key: (elements kept in the state dtype, fixed bytes)}`` on the
        attached model (meta device). Default None: the method brings no optimizer and the
        estimator's ``optimizer`` setting applies."""
        return None

    def prepare_sharding(self, model: nn.Module) -> None:
        """Called on the attached model just before FSDP2 shards it (``fully_shard`` splits
        parameters only; buffers stay whole on every rank). The default does nothing. QLoRA turns
        its quantized storage (uint8 codes and constants, kept as buffers otherwise) into frozen
        parameters here so that each rank holds its share of the 4-bit base."""

    # ----------------------------------------------------------------------------- life cycle
    def prepare_base(self, model: nn.Module) -> nn.Module:
        """Change the base model itself the way this method needs, in place, and return it.

        The default changes nothing. QLoRA quantizes the frozen weights it targets: a lossy
        change that belongs to the base and stays after ``detach``. :meth:`attach` calls it; the
        contract suite calls it on a fresh base to get the reference the adapter must equal at
        init, when disabled and after detach. It must be idempotent.
        """
        return model

    def attach(self, model: nn.Module, name: str) -> None:
        """Add adapter ``name`` to ``model`` in place. Shared code has already frozen the base,
        validated ``name`` and set up ``modules_to_save``; the method adds its own parameters
        (created with ``requires_grad=True``) and must raise before changing anything on bad input.
        """
        raise NotImplementedError

    def detach(self, model: nn.Module, name: str) -> None:
        """Remove adapter ``name``, restoring the base modules exactly."""
        for _, layer in self.adapted_layers(model, name):
            layer.remove_adapter(name)

    def merge(self, model: nn.Module, name: str) -> None:
        """Fold adapter ``name`` into the base weights (exactly reversible by :meth:`unmerge`).
        ``peftlab.merge`` has already checked that the result is finite."""
        if not self.mergeable:
            raise ConfigError(f"{self.method_name} cannot be merged into the base weights")
        for _, layer in self.adapted_layers(model, name):
            if isinstance(layer, MergeableLayer):
                layer.merge_adapter(name)

    def unmerge(self, model: nn.Module, name: str) -> None:
        """Undo :meth:`merge` for adapter ``name``."""
        for _, layer in self.adapted_layers(model, name):
            if isinstance(layer, MergeableLayer):
                layer.unmerge_adapter(name)

    def begin_step(self, model: nn.Module, name: str, step: int, seed: int) -> None:
        """Called by training loops before each optimizer step, for every active adapter.

        ``step`` counts optimizer steps from 0 and ``seed`` is the run's seed. The default does
        nothing; methods whose training forward changes from step to step (DyLoRA's sampled
        rank) override it. It must depend on its arguments only (no hidden random state), so a
        resumed run repeats an uninterrupted one exactly.
        """

    def extra_loss(self, model: nn.Module, name: str) -> torch.Tensor | None:
        """A term training loops add to every micro-batch's loss while adapter ``name`` is active
        and the model trains (a regulariser on the adapter's own tensors, e.g. AdaLoRA's
        orthogonality penalty), or None (the default). It is added before the division by the
        number of accumulation micro-batches, like the task loss."""
        return None

    def end_step(self, model: nn.Module, name: str, step: int, seed: int) -> None:
        """Called by training loops after each optimizer step and before the gradients are
        cleared, for every active adapter (``step`` 0-based, as in :meth:`begin_step`). The
        default does nothing; methods that act on the gradients or the updated tensors between
        steps (AdaLoRA's importance scores and rank allocation) override it. Any state it keeps
        must live in the adapter's tensors (saved in checkpoints) so resumed runs stay exact."""

    def training_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter ``name`` that training changes besides its trainable parameters and
        that a resumed run needs to continue exactly (AdaLoRA's importance scores and allocation
        mask), by ``model.state_dict()`` key. They are not part of adapter files. Default: none.
        A checkpointing loop saves them with the trainable tensors and copies them back on resume."""
        return {}

    def describe(self, model: nn.Module, name: str) -> list[str]:
        """Lines ``peftlab.summary`` prints about adapter ``name`` beyond parameter counts (AdaLoRA:
        its rank allocation). Default: none."""
        return []

    # ----------------------------------------------------------------------------- tensors
    def adapted_layers(self, model: nn.Module, name: str) -> Iterator[tuple[str, AdapterLayer]]:
        """The adapted layers of ``model`` that hold adapter ``name`` of this method."""
        owner = self.layer_owner or self.method_name
        for path, layer in adapter_layers(model):
            if layer.owner_method == owner and name in layer.adapter_names():
                yield path, layer

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """Adapter parameters by their key in ``model.state_dict()`` (what trains)."""
        out: dict[str, nn.Parameter] = {}
        for path, layer in self.adapted_layers(model, name):
            for key, p in layer.adapter_parameters(name).items():
                out[f"{path}.{key}" if path else key] = p
        return out

    def file_tensors(self, model: nn.Module, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """``{file key: (state_dict key, tensor)}`` for everything this adapter saves.

        File keys follow peft's layout (``base_model.model.<module>.lora_A.weight``: the adapter
        name is not part of a key) so one table serves saving, loading and peft interop.
        """
        out: dict[str, tuple[str, torch.Tensor]] = {}
        for path, layer in self.adapted_layers(model, name):
            for key, (file_key, t) in layer.adapter_file_tensors(name).items():
                out[FILE_PREFIX + (f"{path}.{file_key}" if path else file_key)] = (
                    f"{path}.{key}" if path else key, t)
        return out

    def load_file_tensors(self, model: nn.Module, name: str,
                          values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put loaded values into adapter ``name``: ``{file key: (tensor from file_tensors, value)}``.

        The default copies each value into its tensor. Methods whose files hold a derived form
        (see ``saves_trainable_parameters``) override this to switch the adapter to that form.
        """
        with torch.no_grad():
            for target, value in values.values():
                before_write(target)  # a base tensor the adapter trains in place (new tensors need no log)
                target.copy_(value.to(dtype=target.dtype))

    def for_file(self, shapes: Mapping[str, tuple[int, ...]], source: str) -> Method:
        """The method that reads a file whose config gave ``self`` and whose tensors have
        ``shapes`` (``{file key: shape}``; ``source`` names the file for messages), before any
        model is touched. The default is ``self``: the config is the one source of truth. A method
        whose peer is known to write tensors that disagree with its own config in one documented
        way returns the method the tensors describe, and warns (BOFT: peft without its CUDA
        extension saves one butterfly factor whatever the config says)."""
        return self

    def saved_form(self, model: nn.Module, name: str,
                   tensors: dict[str, torch.Tensor]) -> tuple[Method, dict[str, torch.Tensor]]:
        """The adapter a file holds for adapter ``name``: ``(method, {file key: tensor})``, given
        ``tensors`` (the file keys and values :meth:`file_tensors` names). The default is the
        adapter itself. A method whose trained form needs the base it changed (PiSSA and OLoRA
        take their initial factors out of the base weights) returns an equivalent adapter of the
        *unchanged* base here (peft's conversion), so the file loads onto the original model."""
        return self, tensors

    # ----------------------------------------------------------------------------- hot-swap
    def prepare_hotswap(self, model: nn.Module, name: str, rank: int) -> Method:
        """Make adapter ``name`` take, in place, any adapter of this method up to rank ``rank``
        (padding with zeros, numbers that may change held as tensors), before ``torch.compile``;
        return the method that now describes it (its saved config). The default: nothing can be
        padded, so a hot-swap must bring the same config (:meth:`hotswap_writes`)."""
        raise ConfigError(f"{self.method_name}: adapters of this method are not padded for hot-swapping; "
                          "a hot-swap into it must have the same config (ranks, widths, scales)")

    def hotswap_writes(self, model: nn.Module, name: str, new: Method,
                       values: dict[str, tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Method]:
        """The in-place writes that turn adapter ``name`` into ``new`` (a file's adapter of this
        method), given ``values`` ``{file key: (tensor of file_tensors, file value)}`` (the key
        sets already match): ``([(target, value)], method to record)``. Nothing is written here.

        The default accepts the same config only (every option equal) and values of the tensors'
        own shapes. Raises ``ConfigError`` naming what differs."""
        differ = sorted(k for k, v in self.options().items() if new.options().get(k) != v)
        if differ:
            raise ConfigError(f"{self.method_name}: the new adapter differs in {differ}; a hot-swap writes tensors in "
                              "place, so everything else must be the same (peftlab.load it as a new adapter instead)")
        writes = []
        for key, (target, value) in values.items():
            if tuple(value.shape) != tuple(target.shape):
                raise ConfigError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model")
            writes.append((target, value))
        return writes, self

    def base_file_key(self, model: nn.Module, key: str, name: str) -> str:
        """File key of a base tensor this adapter trains in place (``state_dict`` key ``key``)."""
        return FILE_PREFIX + key

    # ----------------------------------------------------------------------------- config
    def options(self) -> dict[str, Any]:
        """The hyperparameters as a JSON-ready dict."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        """The ``adapter_config.json`` content. peft-backed methods override this with peft's
        own config; the full peftlab options always round-trip through :meth:`from_config`."""
        return {"peft_type": self.peft_type or f"PEFTLAB_{self.method_name.upper()}",
                "peftlab_method": self.method_name, **self.options()}

    @classmethod
    def from_options(cls: type[M], options: dict[str, Any]) -> M:
        """Build from a dict of hyperparameters; unknown keys are an error naming the known ones."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"{cls.method_name}: unknown option(s) {unknown}; "
                              f"known options: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(hints[k], v) for k, v in options.items()}
        return cls(**kwargs)

    @classmethod
    def from_config(cls: type[M], config: dict[str, Any]) -> M:
        """Inverse of :meth:`to_config`."""
        options = {k: v for k, v in config.items() if k not in ("peft_type", "peftlab_method")}
        return cls.from_options(options)

    def to_json(self) -> str:
        return json.dumps(self.to_config(), indent=2, sort_keys=True)


def method_from_config(config: dict[str, Any]) -> Method:
    """Build the method that wrote ``config`` (a peftlab or a peft ``adapter_config.json``)."""
    _load_builtin_methods()
    name = config.get("peftlab_method")
    if name is not None:
        return method_class(name).from_config(config)
    peft_type = config.get("peft_type")
    for cls in _REGISTRY.values():
        if cls.peft_type is not None and cls.peft_type == peft_type:
            return cls.from_config(config)
    known = sorted(c.peft_type for c in _REGISTRY.values() if c.peft_type)
    raise ConfigError(f"adapter config has peft_type {peft_type!r}, which peftlab does not read; "
                      f"readable peft types: {known}; peftlab methods: {sorted(_REGISTRY)}")


# ----------------------------------------------------------------------------- field types
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception:  # a hint that cannot be resolved (a class defined in a function): not checked
            _HINTS[cls] = {}
    return _HINTS[cls]


_NO = object()


def _conform(hint: Any, v: Any, top: bool = True) -> Any:
    """``v`` if it is a value of type ``hint`` (a list for a tuple, and for a field itself a
    scalar for a one-element tuple: normalised to the tuple), else ``_NO``. Floats must be
    finite; bools are not ints."""
    if hint is Any or isinstance(hint, typing.TypeVar):
        return v
    if hint is None or hint is type(None):
        return v if v is None else _NO
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            out = _conform(arg, v, top)
            if out is not _NO:
                return out
        return _NO
    if hint is bool:
        return v if isinstance(v, bool) else _NO
    if hint is int:
        return v if isinstance(v, int) and not isinstance(v, bool) else _NO
    if hint is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return v if ok else _NO
    if origin is tuple or hint is tuple:
        if not args:
            return tuple(v) if isinstance(v, (list, tuple)) else _NO
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(v, (list, tuple)):
                return (v,) if top and _conform(args[0], v, False) is not _NO else _NO
            items = [_conform(args[0], x, False) for x in v]
        else:
            if not isinstance(v, (list, tuple)) or len(v) != len(args):
                return _NO
            items = [_conform(a, x, False) for a, x in zip(args, v)]
        return _NO if any(x is _NO for x in items) else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(v, dict):
            return _NO
        if not args:
            return v
        pairs = [(_conform(args[0], k, False), _conform(args[1], x, False)) for k, x in v.items()]
        if any(k is _NO or x is _NO for k, x in pairs):
            return _NO
        return v if all(k is k0 and x is x0 for (k, x), (k0, x0) in zip(pairs, v.items())) else dict(pairs)
    if origin is list or hint is list:
        if not isinstance(v, (list, tuple)):
            return _NO
        items = [_conform(args[0], x, False) for x in v] if args else list(v)
        return _NO if any(x is _NO for x in items) else list(items)
    if isinstance(hint, type):
        return v if isinstance(v, hint) else _NO
    return v


def _describe(hint: Any) -> str:
    if hint is bool:
        return "true or false (a bool, not a string or a number)"
    if hint is int:
        return "an integer (not a bool)"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a string"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list (each {_describe(args[0])})" if len(args) == 2 and args[1] is Ellipsis else \
            f"a list of {len(args)} values"
    if origin is dict:
        return f"a dict from {_describe(args[0])} to {_describe(args[1])}" if args else "a dict"
    return getattr(hint, "__name__", str(hint))


def check_fields(method: Method) -> None:
    """Check every field of ``method`` against its declared type (normalising lists to tuples);
    a :class:`ConfigError` names the first field that does not fit."""
    hints = _hints(type(method))
    name = method.method_name or type(method).__name__
    for f in dataclasses.fields(method):
        if f.name not in hints:
            continue
        value = getattr(method, f.name)
        fixed = _conform(hints[f.name], value)
        if fixed is _NO:
            raise ConfigError(f"{name}: {f.name} must be {_describe(hints[f.name])} (got {value!r})")
        if fixed is not value:
            object.__setattr__(method, f.name, fixed)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _coerce(hint: Any, v: Any) -> Any:
    """JSON gives lists where the dataclass holds tuples (hashable, frozen): convert back."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is tuple and isinstance(v, (list, tuple)):
                return tuple(v)
        return v
    if origin is tuple and isinstance(v, (list, tuple)):
        return tuple(v)
    if isinstance(v, list) and hint is tuple:
        return tuple(v)
    return v


def tuple_field(*default: Any) -> Any:
    """A dataclass field holding a tuple default (lists are unhashable in a frozen config)."""
    return field(default=tuple(default))


def dict_field() -> Any:
    return field(default_factory=dict)
