"""Multi-adapter state of one model: the named adapters, the active set, and what they own
outside adapted layers.

The registry lives on the root module (``model.peftlab``). Besides adapted layers (which keep
their own per-adapter containers), an adapter may own

* **base tensors it trains in place** (bias training in LoRA, BitFit): the registry keeps the
  original values once, and each adapter keeps its own values aside while it is not active, so
  switching adapters, ``disabled()`` and ``detach`` are exact;
* **full copies of modules** (``modules_to_save``, e.g. a new classification head), held by a
  :class:`CopyLayer` in peft's on-disk layout.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.core.errors import AdapterStateError, ConfigError
from peftlab.core.layer import AdapterLayer
from peftlab.core.method import FILE_PREFIX, Method
from peftlab.core.transaction import before_write, on_undo

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")
_RESERVED = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))
"""Attributes of torch's module containers: adapters are stored under their names in them."""


@dataclass
class Slot:
    """One named adapter on a model."""

    method: Method
    base_keys: tuple[str, ...] = ()
    """``state_dict`` keys of base tensors this adapter trains in place."""
    own: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    """This adapter's values of ``base_keys`` while they are not in the model (None while they are)."""
    hooks: list[Any] = field(default_factory=list, repr=False)
    """Removable hook handles the adapter installed (input-side methods, see ``core.inputs``);
    removed when the adapter is removed."""

    @property
    def in_model(self) -> bool:
        return self.own is None


@dataclass
class Registry:
    adapters: dict[str, Slot] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    originals: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)
    """Base values of tensors that adapters train in place (None: no copy kept)."""
    disabled: bool = False
    """True inside ``peftlab.disabled``: hooks installed by adapters must then pass inputs through."""
    routing: Any = None
    """The open ``peftlab.per_row`` block's :class:`peftlab.core.routing.Routing` (None: none)."""


def registry(model: nn.Module, create: bool = False) -> Registry:
    reg = model.__dict__.get("peftlab")
    if reg is None:
        if not create:
            raise AdapterStateError(f"{type(model).__name__} carries no peftlab adapter; use peftlab.attach first")
        reg = Registry()
        model.__dict__["peftlab"] = reg
    return reg


def has_adapters(model: nn.Module) -> bool:
    reg = model.__dict__.get("peftlab")
    return reg is not None and bool(reg.adapters)


def check_name(name: str) -> str:
    """Adapter names become module keys and directory names: refuse anything path-like."""
    if not isinstance(name, str) or not name:
        raise ConfigError("adapter name must be a non-empty string, e.g. 'default'")
    bad = [s for s in ("/", "\\", "..", "\x00", ".") if s in name]
    if bad or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"adapter name {name!r} is not allowed (contains {bad or 'other characters'}); "
                          "use letters, digits, '_' and '-' only, e.g. 'task_a'")
    if name in _RESERVED:
        raise ConfigError(f"adapter name {name!r} is an attribute of torch's nn.ModuleDict/nn.ParameterDict "
                          f"(which hold adapters by name); pick another name, e.g. '{name}_adapter' or 'task_a'")
    return name


def slot(model: nn.Module, name: str) -> Slot:
    reg = registry(model)
    if name not in reg.adapters:
        raise AdapterStateError(f"no adapter named {name!r}; adapters on this model: {sorted(reg.adapters)}")
    return reg.adapters[name]


# ----------------------------------------------------------------------------- base tensors
def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    module_path, _, attr = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    return getattr(module, attr)


def train_base_tensors(model: nn.Module, name: str, keys: list[str], *, keep_original: bool = True) -> None:
    """Let adapter ``name`` train the base tensors ``keys`` in place.

    The model holds, for each such tensor, either the original values (no adapter that trains it
    is active) or the values of the one active adapter that does; the others are kept aside.

    Args:
        keep_original: Keep a copy of the original values (exact ``disabled()``/``detach``).
            Full fine-tuning passes False: a second copy of the model is what it avoids.
    """
    reg = registry(model)
    s = reg.adapters[name]
    live = {k for n, o in reg.adapters.items() if n != name and o.in_model for k in o.base_keys}
    if live & set(keys) and any(reg.originals.get(k) is None for k in live & set(keys)):
        raise AdapterStateError(f"adapter {name!r} would train tensors that another adapter changed without "
                                "keeping the originals; detach it first")
    for k in keys:
        if k not in reg.originals:
            reg.originals[k] = _tensor(model, k).detach().clone() if keep_original else None
        _tensor(model, k).requires_grad_(True)
    s.base_keys = tuple(keys)
    # A new adapter starts from the original values: already in the model unless another active
    # adapter holds these tensors, in which case they wait aside until this one is activated.
    s.own = {k: reg.originals[k].clone() for k in keys} if live & set(keys) else None  # type: ignore[union-attr]


def bias_mode_keys(model: nn.Module, paths: list[str], mode: str, what: str,
                   containers: tuple[str, ...]) -> list[str]:
    """``state_dict`` keys of the biases peft's ``bias`` option trains: ``'none'`` none, ``'all'``
    every bias of the model outside the adapter ``containers`` and module copies, ``'<x>_only'``
    those of the adapted ``paths``. A mode that finds no bias is an error naming the fix."""
    if mode == "none":
        return []
    if mode.endswith("_only"):
        keys = [f"{p}.bias" for p in paths if getattr(model.get_submodule(p), "bias", None) is not None]
    else:
        keys = [k for k, _ in model.named_parameters() if k.rsplit(".", 1)[-1] == "bias"
                and not any(c in k.split(".") for c in (*containers, "peftlab_copy"))]
    if not keys:
        where = "adapted layers" if mode.endswith("_only") else "model"
        raise ConfigError(f"{what}: bias={mode!r} but the {where} have no bias; use bias='none'")
    return keys


def swap_out_base(model: nn.Module, s: Slot) -> None:
    """Put the original values back in the model, keeping the adapter's aside."""
    if not s.base_keys or not s.in_model:
        return
    reg = registry(model)
    if any(reg.originals[k] is None for k in s.base_keys):
        raise AdapterStateError(f"{s.method.method_name} trained the base weights in place without keeping "
                                "the originals: the base model cannot be restored or switched away from")
    with torch.no_grad():
        own = {k: _tensor(model, k).detach().clone() for k in s.base_keys}
        s.own = own
        for k in s.base_keys:
            t = _tensor(model, k)
            t.copy_(reg.originals[k])  # type: ignore[arg-type]
            on_undo(lambda t=t, v=own[k]: t.copy_(v), t)  # the adapter's values were kept aside: no copy


def swap_in_base(model: nn.Module, s: Slot) -> None:
    """Put the adapter's values in the model (the model must hold the originals)."""
    if not s.base_keys or s.in_model:
        return
    with torch.no_grad():
        for k in s.base_keys:
            t = _tensor(model, k)
            before_write(t)
            t.copy_(s.own[k])  # type: ignore[index]
    s.own = None


def forget_base(model: nn.Module, name: str) -> None:
    """Drop adapter ``name``'s claim on base tensors (after it was swapped out)."""
    reg = registry(model)
    s = reg.adapters[name]
    others = {k for n, o in reg.adapters.items() if n != name for k in o.base_keys}
    for k in s.base_keys:
        if k not in others:
            reg.originals.pop(k, None)
            _tensor(model, k).requires_grad_(False)


def base_parameters(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: _tensor(model, k) for k in slot(model, name).base_keys}


# ----------------------------------------------------------------------------- module copies
class CopyLayer(AdapterLayer):
    """A module trained in full per adapter (``modules_to_save``); the original stays frozen."""

    owner_method = ""
    class_prefix = "Trained"
    adapter_containers = ("peftlab_copy",)

    def forward(self, *args, **kwargs):  # type: ignore[override]
        routing = self.__dict__.get("peftlab_routing")
        if routing is not None:
            return self.routed_forward(routing, *args, **kwargs)
        for n in self.live_adapters():
            if n in self.peftlab_copy:
                return self.peftlab_copy[n](*args, **kwargs)
        return super().forward(*args, **kwargs)

    def route_refusal(self, name: str) -> str | None:
        return None

    def routed_forward(self, routing: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A mixed-adapter batch: each adapter's copy runs on its own rows (a copy is a whole
        module, so there is nothing to stack), the base module on the rest."""
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise AdapterStateError(f"modules_to_save copy of {type(self).base_class.__name__} got other arguments "
                                    "than one tensor; per-row routing splits only a tensor's rows")
        x = args[0]
        out = super().forward(x)
        for n, rows in routing.rows_of(x.shape[0]).items():
            if n in self.peftlab_copy:
                idx = torch.tensor(rows, device=x.device)
                out = out.index_copy(0, idx, self.peftlab_copy[n](x.index_select(0, idx)).to(out.dtype))
        return out

    def live_adapters(self) -> list[str]:
        return [] if self.peftlab_disabled else list(self.peftlab_active)

    def file_key(self, container: str, rest: str) -> str:
        return rest  # peft's layout: the copy is saved under the module's own keys

    def add_copy(self, name: str) -> None:
        saved = {c: self._modules.pop(c) for c in self.adapter_containers}
        try:
            clone = copy.deepcopy(self)
        finally:
            self._modules.update(saved)
        clone.__class__ = type(self).base_class
        for attr in ("peftlab_active", "peftlab_disabled"):
            clone.__dict__.pop(attr, None)
        clone.requires_grad_(True)
        self.peftlab_copy[name] = clone


def add_module_copies(model: nn.Module, name: str, patterns: tuple[str, ...]) -> list[str]:
    from peftlab.core.targets import select

    if not patterns:
        return []
    present = {p.rsplit(".", 1)[-1] for p, _ in model.named_modules()}
    # peft lists every head name of a task type; the ones this model lacks are not an error
    patterns = tuple(p for p in patterns if p not in PEFT_HEADS or p in present) or patterns
    paths = select(model, list(patterns), what="modules_to_save")
    for path in paths:
        CopyLayer.adopt(model.get_submodule(path))
        layer = model.get_submodule(path)
        assert isinstance(layer, CopyLayer)
        layer.add_copy(name)
    return paths


def copy_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, CopyLayer]]:
    """The module copies of adapter ``name`` (of every adapter when None)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, CopyLayer) and (name is None or name in module.adapter_names()):
            yield path, module


def copy_file_tensors(model: nn.Module, name: str, prefix: str = FILE_PREFIX) -> dict[str, tuple[str, torch.Tensor]]:
    """File keys of adapter ``name``'s module copies, under the method's ``prefix`` (peft puts a
    prompt-learning model's copies under ``base_model.``, a LoRA model's under ``base_model.model.``)."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for path, layer in copy_layers(model, name):
        for key, (file_key, t) in layer.adapter_file_tensors(name).items():
            out[f"{prefix}{path}.{file_key}"] = (f"{path}.{key}", t)
    return out


PEFT_HEADS = frozenset({"classifier", "score", "qa_outputs"})
"""Heads peft adds to ``modules_to_save`` by task type (SEQ_CLS/TOKEN_CLS: classifier and score;
QUESTION_ANS: qa_outputs), whichever of them the model has."""
