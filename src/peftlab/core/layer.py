"""Adapted layers: in-place class surgery and the state every adapted layer shares.

A module is adapted *in place*: its class is swapped for a subclass ``(Mixin, OriginalClass)``
(the same technique FSDP2's ``fully_shard`` uses). Nothing is copied or re-parented, so

* the base parameters keep their names (``q_proj.weight`` stays ``q_proj.weight``): base
  state dicts load as before, and ``isinstance(layer, nn.Linear)`` still holds;
* it works on the meta device (no tensor is touched);
* undoing it is restoring ``__class__`` and deleting the adapter containers.

Each adapter of a layer lives in *containers*: ``nn.ModuleDict``/``nn.ParameterDict`` attributes
keyed by adapter name (``lora_A["default"]``), so several named adapters share one layer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import routing
from peftlab.core.errors import AdapterStateError
from peftlab.core.transaction import before_write, on_undo

_CLASS_CACHE: dict[tuple[type, type], type] = {}


class AdapterLayer(nn.Module):
    """Mixin of every adapted layer. Subclasses set the two class variables and write
    ``forward`` (calling ``super().forward`` for the base output) and ``add_adapter``."""

    owner_method: ClassVar[str] = ""
    """Registered name of the method that owns this layer type."""
    adapter_containers: ClassVar[tuple[str, ...]] = ()
    """Attributes holding per-adapter modules or parameters, keyed by adapter name."""
    class_prefix: ClassVar[str] = "Adapted"
    """Prefix of the swapped class's name: ``LoRA`` + ``Linear`` -> ``LoRALinear``."""
    parameter_containers: ClassVar[tuple[str, ...]] = ()
    """The subset of ``adapter_containers`` that are ``nn.ParameterDict`` (the rest: ``ModuleDict``)."""
    base_class: ClassVar[type[nn.Module]]
    """The module's original class (set on the swapped class)."""

    peftlab_active: list[str]
    peftlab_disabled: bool
    peftlab_state: dict[str, Any]
    """Per adapter name: the layer's non-tensor state of that adapter (its scale, its rank
    schedule), an immutable record replaced as a whole (:meth:`set_adapter_state`), so that a
    transaction's snapshot of this dict restores it and removing the adapter removes it."""

    # ------------------------------------------------------------------------ surgery
    @classmethod
    def adopt(cls, module: nn.Module) -> AdapterLayer:
        """Turn ``module`` into an adapted layer of this kind, in place; idempotent."""
        if isinstance(module, AdapterLayer) and type(module).__mro__[1] is cls:
            return module  # already this kind (a subclass of another method's layer is not that layer)
        if isinstance(module, AdapterLayer):
            raise AdapterStateError(
                f"{type(module).base_class.__name__} is already adapted by {module.owner_method!r}; "
                f"one module carries adapters of one method (detach the other method first)")
        base = type(module)
        key = (cls, base)
        new_cls = _CLASS_CACHE.get(key)
        if new_cls is None:
            name = f"{cls.class_prefix}{base.__name__}"
            new_cls = type(name, (cls, base), {"base_class": base, "__module__": cls.__module__})
            new_cls.__qualname__ = name
            # Registered in the mixin's module so that pickling (torch.save(model)) finds it.
            setattr(sys.modules[cls.__module__], name, new_cls)
            _CLASS_CACHE[key] = new_cls
        module.__class__ = new_cls
        layer: AdapterLayer = module  # type: ignore[assignment]
        layer.peftlab_active = []
        layer.peftlab_disabled = False
        layer._init_containers()
        return layer

    def _init_containers(self) -> None:
        for c in self.adapter_containers:
            setattr(self, c, nn.ParameterDict() if c in self.parameter_containers else nn.ModuleDict())

    def restore(self) -> nn.Module:
        """Undo :meth:`adopt`: drop every container and give the module its class back."""
        for c in self.adapter_containers:
            delattr(self, c)
        for attr in ("peftlab_active", "peftlab_disabled", "peftlab_merged", "peftlab_merge_fix",
                     "peftlab_weight_version", "peftlab_state", "peftlab_routing"):
            self.__dict__.pop(attr, None)
        routing.forget(self)
        self.__class__ = type(self).base_class
        return self

    # ------------------------------------------------------------------------ adapters
    def adapter_state(self, name: str) -> Any:
        """The state record of adapter ``name`` (see ``peftlab_state``)."""
        return self.__dict__["peftlab_state"][name]

    def set_adapter_state(self, name: str, state: Any) -> None:
        """Set (replace) the state record of adapter ``name``; records are never changed in place."""
        self.__dict__.setdefault("peftlab_state", {})[name] = state

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_containers[0]).keys())

    def live_adapters(self) -> list[str]:
        """Adapters whose update this forward pass must add (active, not merged, not disabled)."""
        if self.peftlab_disabled:
            return []
        merged = getattr(self, "peftlab_merged", ())
        return [n for n in self.peftlab_active if n not in merged]

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` (unmerging it first); restore the module when none is left."""
        if name in getattr(self, "peftlab_merged", ()):
            assert isinstance(self, MergeableLayer)
            self.unmerge_adapter(name)
        for c in self.adapter_containers:
            container = getattr(self, c)
            if name in container:
                del container[name]
        if name in self.peftlab_active:
            self.peftlab_active.remove(name)
        self.__dict__.get("peftlab_state", {}).pop(name, None)  # after the unmerge, which may need it
        routing.forget(self)
        if not self.adapter_names():
            self.restore()

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """``{key relative to this layer: parameter}`` of adapter ``name``."""
        return {k: t for k, t in self._adapter_items(name) if isinstance(t, nn.Parameter)}

    def adapter_file_tensors(self, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """``{local key: (file key, tensor)}``; the file key drops the adapter name (peft's rule)."""
        out = {}
        for key, t in self._adapter_items(name):
            container, rest = key.split(".", 1)
            rest = rest[len(name):]  # '' for a ParameterDict entry, '.weight' for a module entry
            out[key] = (self.file_key(container, rest.lstrip(".")), t)
        return out

    def file_key(self, container: str, rest: str) -> str:
        """File key of a tensor at ``<container>.<name>.<rest>``; override to change the layout."""
        return f"{container}.{rest}" if rest else container

    def _adapter_items(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        for c in self.adapter_containers:
            container = getattr(self, c)
            if name not in container:
                continue
            entry = container[name]
            if isinstance(entry, nn.Module):
                for k, t in entry.state_dict(keep_vars=True).items():
                    yield f"{c}.{name}.{k}", t
            else:
                yield f"{c}.{name}", entry


class MergeableLayer(AdapterLayer):
    """An adapted layer whose update is a weight delta that can be folded into the base weight.

    Merging is computed in fp32 whatever the weight dtype. It is *exactly* reversible: a merge
    records where ``round(round(W + dW) - dW)`` would not give back ``W`` (only elements whose
    binade changes, usually very few) with their original values, and the unmerge restores them,
    so merge/unmerge cycles never drift, even in bf16 and with several merged adapters (they
    unmerge last-in first-out). The record is dropped (plain subtraction) if the adapter or the
    weight changed since (``peftlab_weight_version``: the weight's version counter after the
    layer's own last write). Every write is logged for the open transaction (``core.transaction``):
    a merge is undone by its exact unmerge and an exact unmerge by the same merge, with no copy.
    """

    base_weight: ClassVar[str] = "weight"
    peftlab_merged: list[str]
    peftlab_merge_fix: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update of adapter ``name`` as an fp32 tensor shaped like the base weight."""
        raise NotImplementedError

    def _weight(self) -> torch.Tensor:
        return getattr(self, self.base_weight)

    def _adapter_versions(self, name: str) -> tuple[int, ...]:
        return tuple(p._version for p in self.adapter_parameters(name).values())

    def merge_is_finite(self, names: str | list[str]) -> bool:
        """Whether merging ``names`` (one or several adapters) gives finite weights *in the
        weight's dtype* (an fp16 sum can overflow where the fp32 one does not)."""
        w = self._weight()
        if w.device.type == "meta":
            return True
        with torch.no_grad():
            total = w.float()
            for n in [names] if isinstance(names, str) else names:
                total = total + self.delta_weight(n)
            return bool(torch.isfinite(total.to(w.dtype)).all())

    @torch.no_grad()
    def merge_adapter(self, name: str) -> None:
        merged = self.__dict__.setdefault("peftlab_merged", [])
        fixes = self.__dict__.setdefault("peftlab_merge_fix", {})
        if name in merged:
            return
        w = self._weight()
        delta = self.delta_weight(name)
        new = (w.float() + delta).to(w.dtype)
        if w.device.type != "meta":
            back = (new.float() - delta).to(w.dtype)
            wrong = (back != w).flatten().nonzero().flatten()
            originals = w.detach().flatten()[wrong].clone()
        else:
            wrong = originals = torch.empty(0)
        w.copy_(new)
        on_undo(lambda: self._subtract(name, wrong, originals), w)
        merged.append(name)
        fixes[name] = (wrong, originals, self._adapter_versions(name))
        self.__dict__["peftlab_weight_version"] = w._version

    @torch.no_grad()
    def unmerge_adapter(self, name: str) -> None:
        merged: list[str] = self.__dict__.get("peftlab_merged", [])
        if name not in merged:
            return
        later = merged[merged.index(name) + 1:]
        for other in reversed(later):  # exact reversal needs last-in, first-out
            self._unmerge_last()
        self._unmerge_last()
        for other in later:
            self.merge_adapter(other)

    def _subtract(self, name: str, wrong: torch.Tensor | None, originals: torch.Tensor | None) -> None:
        """``W - dW`` rounded to the weight dtype, then the recorded elements put back."""
        w = self._weight()
        w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
        if wrong is not None and originals is not None:
            w.view(-1)[wrong] = originals

    def _unmerge_last(self) -> None:
        name = self.peftlab_merged.pop()
        wrong, originals, versions = self.peftlab_merge_fix.pop(name)
        w = self._weight()
        exact = (versions == self._adapter_versions(name)
                 and self.__dict__.get("peftlab_weight_version") == w._version)
        if exact:
            self._subtract(name, wrong, originals)
            on_undo(lambda: w.copy_((w.float() + self.delta_weight(name)).to(w.dtype)), w)
        else:  # changed since the merge: plain subtraction, which has no exact inverse
            before_write(w)
            self._subtract(name, None, None)
        self.__dict__["peftlab_weight_version"] = w._version


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapted layer of ``model`` with its module path."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def new_parameter_like(shape: tuple[int, ...], ref: torch.Tensor, dtype: torch.dtype | None = None,
                       **_: Any) -> nn.Parameter:
    """An uninitialised parameter on ``ref``'s device (meta included)."""
    return nn.Parameter(torch.empty(shape, device=ref.device, dtype=dtype or ref.dtype))
