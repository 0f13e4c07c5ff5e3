"""The public API: put adapters on a model, switch them, merge them.

Every function takes the user's own model (a transformers model or any ``nn.Module``) and works
in place; there is no wrapper model, so ``model.generate``, ``model.save_pretrained`` of the base
and ``transformers.Trainer`` see the model they know.

Every function that changes the model is a transaction (``core.transaction``): it validates what
it can first, then makes its changes inside ``transaction(model)``, so on any error the model
(module classes, parameters, requires_grad, buffers, hooks, the registry) is exactly as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.core import routing, slots
from peftlab.core.errors import AdapterStateError, ConfigError, NonFiniteError
from peftlab.core.layer import AdapterLayer, MergeableLayer, adapter_layers
from peftlab.core.method import Method, get_method
from peftlab.core.slots import CopyLayer, Slot, registry
from peftlab.core.transaction import before_write, transaction


def attach(model: nn.Module, method: Method | str, name: str = "default", *, trainable: bool = True,
           activate: bool = True, **options: Any) -> nn.Module:
    """Add adapter ``name`` of ``method`` to ``model`` in place and return the model.

    The base model is frozen; the new adapter's parameters (and its ``modules_to_save``) train.

    Args:
        model: Any ``nn.Module``; transformers models get their heads and layouts recognised.
        method: A :class:`Method` instance, or a method name with ``options`` as its fields.
        name: Adapter name (letters, digits, ``_``, ``-``).
        trainable: Whether the new adapter's parameters require gradients.
        activate: Make the new adapter the active one (the others are deactivated).

    Example:
        >>> peftlab.attach(model, "lora", r=8, target_modules=["q_proj", "v_proj"])
    """
    if isinstance(method, str):
        method = get_method(method, **options)
    elif options:
        raise ConfigError("pass options either inside the Method instance or with a method name, not both")
    elif not isinstance(method, Method):
        raise ConfigError(f"method must be a peftlab Method or a method name such as 'lora' (got {method!r})")
    slots.check_name(name)
    present = {n: s.method for n, s in registry(model).adapters.items()} if slots.has_adapters(model) else {}
    if name in present:
        raise AdapterStateError(f"adapter {name!r} already exists; pick another name or peftlab.detach it first")
    if not method.multi_adapter and present:
        raise AdapterStateError(f"{method.method_name} does not share a model with other adapters "
                                f"(present: {sorted(present)})")
    if any(not m.multi_adapter for m in present.values()):
        raise AdapterStateError(f"the model carries {sorted(present)}, of a method that does not share a "
                                "model with other adapters")
    with transaction(model):
        base_params = {id(p) for p in _base_parameters(model)}
        modes = {id(m): m.training for m in model.modules()}
        reg = registry(model, create=True)
        reg.adapters[name] = Slot(method)
        slots.add_module_copies(model, name, tuple(method.modules_to_save))
        method.attach(model, name)
        for _, parent in model.named_modules():  # new modules (dropout!) take their parent's mode
            for child in parent.children():
                if id(child) not in modes and id(parent) in modes:
                    child.train(modes[id(parent)])
        for p in model.parameters():
            if id(p) in base_params:
                p.requires_grad_(False)
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(trainable)
        if activate:
            use(model, name)
    return model


def _base_parameters(model: nn.Module) -> list[nn.Parameter]:
    owned = {id(p) for n in (registry(model).adapters if slots.has_adapters(model) else ())
             for p in adapter_parameters(model, n).values()}
    return [p for p in model.parameters() if id(p) not in owned]


def adapters(model: nn.Module) -> dict[str, Method]:
    """The adapters on ``model`` by name (empty when none)."""
    if not slots.has_adapters(model):
        return {}
    return {n: s.method for n, s in registry(model).adapters.items()}


def active(model: nn.Module) -> list[str]:
    return list(registry(model).active) if slots.has_adapters(model) else []


def adapter_parameters(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor adapter ``name`` trains, by ``model.state_dict()`` key."""
    s = slots.slot(model, name)
    out: dict[str, torch.Tensor] = dict(s.method.parameters(model, name))
    for path, layer in slots.copy_layers(model, name):
        out.update({f"{path}.{k}": p for k, p in layer.adapter_parameters(name).items()})
    out.update(slots.base_parameters(model, name))
    return out


def use(model: nn.Module, *names: str) -> None:
    """Make ``names`` the active adapters (their updates add up; order matters only for
    ``modules_to_save``, where the first active adapter's copy is used).

    Merged adapters that become inactive are unmerged first (exactly).
    """
    reg = registry(model)
    unknown = [n for n in names if n not in reg.adapters]
    if unknown:
        raise AdapterStateError(f"no adapter named {unknown}; adapters on this model: {sorted(reg.adapters)}")
    claimed: dict[str, str] = {}
    for n in names:
        for k in reg.adapters[n].base_keys:
            if k in claimed:
                raise AdapterStateError(f"adapters {claimed[k]!r} and {n!r} both train {k!r} in place; "
                                        "they cannot be active together")
            claimed[k] = n
    with transaction(model):
        for path, layer in adapter_layers(model):
            if isinstance(layer, MergeableLayer):
                for m in list(getattr(layer, "peftlab_merged", ())):
                    if m not in names:
                        layer.unmerge_adapter(m)
        for n, s in reg.adapters.items():
            if n not in names:
                slots.swap_out_base(model, s)
        for n in names:
            slots.swap_in_base(model, reg.adapters[n])
        for _, layer in adapter_layers(model):
            layer.peftlab_active = [n for n in names if n in layer.adapter_names()]
        reg.active = list(names)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the model computes exactly the base model's output.

    Merged adapters are unmerged for the block (exactly) and merged back after it.
    """
    reg = registry(model)
    layers = [layer for _, layer in adapter_layers(model)]
    remerge = [(layer, list(getattr(layer, "peftlab_merged", ()))) for layer in layers
               if isinstance(layer, MergeableLayer)]
    swapped = [s for s in reg.adapters.values() if s.in_model and s.base_keys]
    with transaction(model):
        for layer, names in remerge:
            for n in reversed(names):
                layer.unmerge_adapter(n)
        for s in swapped:
            slots.swap_out_base(model, s)
        for layer in layers:
            layer.peftlab_disabled = True
        was_disabled, reg.disabled = reg.disabled, True
    try:
        yield model
    finally:
        with transaction(model):
            reg.disabled = was_disabled
            for layer in layers:
                layer.peftlab_disabled = False
            for s in swapped:
                slots.swap_in_base(model, s)
            for layer, names in remerge:
                for n in names:
                    layer.merge_adapter(n)


@contextlib.contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within this block row ``i`` of every batch is computed with adapter ``names[i]`` (``None``
    or ``"__base__"``: the base model), for inference (``torch.inference_mode()``/``no_grad``;
    ``generate()`` works inside the block).

    Each adapted layer computes the updates of all the batch's adapters together in batched
    matrix products over per-adapter tiles of rows (``core.routing``), not a forward pass per
    adapter. A tensor with ``k`` times as many rows (``generate`` with ``num_beams`` or
    ``num_return_sequences``) maps its row ``j`` to ``names[j // k]``.

    The active set does not matter inside the block (every adapter not named is off). Refused
    with the reason, and nothing changed: the model in training mode, a merged adapter, an
    adapter that trains base tensors in place (LoRA's ``bias``, BitFit) or changes the input
    sequence (prompt methods), and layers without a per-row form (LoRA on embeddings or
    convolutions, AdapterFusion); ``modules_to_save`` copies run on their own rows.

    Example:
        >>> with torch.inference_mode(), peftlab.per_row(model, ["math", "code", None]):
        ...     logits = model(**batch).logits
    """
    reg = registry(model)
    if isinstance(names, str) or not len(names):
        raise ConfigError("per_row takes one adapter name (or None for the base model) per batch row, as a list")
    rows = tuple(None if n in routing.BASE_ROW_NAMES else n for n in names)
    unknown = sorted({n for n in rows if n is not None and n not in reg.adapters}, key=str)
    if unknown:
        raise AdapterStateError(f"no adapter named {unknown}; adapters on this model: {sorted(reg.adapters)}")
    if reg.routing is not None:
        raise AdapterStateError("a per_row block is already open on this model; close it before opening another")
    if model.training:
        raise AdapterStateError("mixed-adapter batches are for inference: call model.eval() first (dropout "
                                "would make rows differ from running them alone)")
    layers = [layer for _, layer in adapter_layers(model)]
    merged = sorted({n for layer in layers for n in getattr(layer, "peftlab_merged", ())})
    if merged:
        raise AdapterStateError(f"adapters {merged} are merged into the base weights, which every row would see; "
                                "peftlab.unmerge(model) first")
    for n, s in reg.adapters.items():
        if s.base_keys and (n in rows or s.in_model):
            raise AdapterStateError(
                f"adapter {n!r} ({s.method.method_name}) trains base tensors in place ({list(s.base_keys)[:3]}...), "
                "which one batch cannot hold per row; " + ("deactivate it (peftlab.use) first" if n not in rows else
                "serve it alone, or export it with its biases folded into the base (peftlab export --for vllm)"))
    routed = set(rows) - {None}
    for n in sorted(routed):
        if reg.adapters[n].hooks:
            raise AdapterStateError(f"adapter {n!r} ({reg.adapters[n].method.method_name}) changes the input "
                                    "sequence, which differs per adapter; serve it in batches of its own")
    for path, layer in adapter_layers(model):
        for n in sorted(routed & set(layer.adapter_names())):
            why = routing.refusal(layer, n)
            if why is not None:
                raise AdapterStateError(f"adapter {n!r} cannot serve a mixed-adapter batch at {path}: {why}; "
                                        "serve it in batches of its own")
    plan = routing.Routing(rows)
    before = [(layer, layer.peftlab_disabled) for layer in layers]
    was_disabled = reg.disabled
    reg.routing = plan
    try:
        for layer in layers:
            layer.peftlab_disabled = True  # what is not routed is off
            if routed & set(layer.adapter_names()):
                layer.__dict__["peftlab_routing"] = plan
        reg.disabled = True
        yield model
    finally:
        for layer, flag in before:
            layer.peftlab_disabled = flag
            layer.__dict__.pop("peftlab_routing", None)
        reg.disabled = was_disabled
        reg.routing = None


def prepare_hotswap(model: nn.Module, rank: int, names: list[str] | None = None) -> None:
    """Make adapters take any adapter of their method up to rank ``rank`` in place
    (``peftlab.hotswap``), without a new shape or a new Python number: LoRA pads its factors with
    zeros to ``rank`` (exact) and holds its scales as tensors. Call it before ``torch.compile``,
    so that hot-swaps never recompile; it also gives adapters of different ranks one shape for
    serving. The recorded config becomes the padded form (same outputs; saves load in peft)."""
    reg = registry(model)
    names = list(reg.adapters) if names is None else list(names)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"prepare_hotswap: rank must be a positive int (got {rank!r}), e.g. the largest rank served")
    unknown = [n for n in names if n not in reg.adapters]
    if unknown:
        raise AdapterStateError(f"no adapter named {unknown}; adapters on this model: {sorted(reg.adapters)}")
    merged = sorted({n for _, layer in adapter_layers(model) for n in getattr(layer, "peftlab_merged", ()) if n in names})
    if merged:
        raise AdapterStateError(f"adapters {merged} are merged; peftlab.unmerge(model) before preparing them")
    with transaction(model):
        for n in names:
            s = reg.adapters[n]
            s.method = s.method.prepare_hotswap(model, n, rank)


def merge(model: nn.Module, names: list[str] | None = None, *, safe: bool = True) -> None:
    """Fold active adapters into the base weights (all active ones by default).

    Refused, with nothing changed: an inactive or unmergeable adapter, a weight shared with
    another module (tied input and output embeddings: merging would change both), and with
    ``safe`` a result that is not finite in the weight's own dtype (an fp16 overflow).
    Merged adapters unmerge exactly (:func:`unmerge`), in any dtype and any number of them.

    Args:
        names: Adapters to merge (default: every active one).
        safe: Check every layer for NaN/inf in its dtype before writing any weight
            (:class:`~peftlab.core.errors.NonFiniteError`, a ``FloatingPointError``).
    """
    reg = registry(model)
    names = list(dict.fromkeys(reg.active if names is None else names))
    inactive = [n for n in names if n not in reg.active]
    if inactive:
        raise AdapterStateError(f"adapters {inactive} are not active; peftlab.use them before merging")
    for n in names:
        if not reg.adapters[n].method.mergeable:
            m = reg.adapters[n].method
            raise AdapterStateError(f"adapter {n!r} ({m.method_name}) cannot be merged"
                                    + (f"; {m.merge_hint}" if m.merge_hint else ""))
    pending: dict[str, tuple[MergeableLayer, list[str]]] = {}
    for n in names:
        for path, layer in reg.adapters[n].method.adapted_layers(model, n):
            if isinstance(layer, MergeableLayer) and n not in getattr(layer, "peftlab_merged", ()):
                pending.setdefault(path, (layer, []))[1].append(n)
    _refuse_tied(model, {path: layer for path, (layer, _) in pending.items()})
    if safe:
        bad = [f"{path} ({', '.join(ns)})" for path, (layer, ns) in pending.items() if not layer.merge_is_finite(ns)]
        if bad:
            raise NonFiniteError(
                f"merging would put NaN/inf into {len(bad)} layer(s) in their dtype ({', '.join(bad[:5])}); "
                "nothing was changed. Check the adapter's weights, or merge into a wider dtype "
                "(model.to(torch.float32)) first.")
    with transaction(model):
        for n in names:
            reg.adapters[n].method.merge(model, n)


def _refuse_tied(model: nn.Module, layers: dict[str, MergeableLayer]) -> None:
    """A weight that several modules share (tied embeddings) cannot take one module's update."""
    paths: dict[int, list[str]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(p), []).append(key)
    for path, layer in layers.items():
        keys = paths.get(id(layer._weight()), [])
        if len(keys) > 1:
            own = f"{path}.{layer.base_weight}"
            others = [k for k in keys if k != own]
            raise AdapterStateError(
                f"cannot merge into {own}: it is the same tensor as {others} (tied input and output "
                "embeddings), so merging would change those too; nothing was changed. Untie the weights first "
                f"(m = model.get_submodule({path!r}); m.{layer.base_weight} = nn.Parameter(m.{layer.base_weight}"
                ".detach().clone()); and config.tie_word_embeddings = False for transformers models), or attach "
                f"the adapter without {path!r} (exclude_modules) and merge then.")


def unmerge(model: nn.Module) -> None:
    """Undo every merge (exactly: merge/unmerge cycles do not drift)."""
    reg = registry(model)
    with transaction(model):
        for n, s in reversed(list(reg.adapters.items())):
            if s.method.mergeable:
                s.method.unmerge(model, n)


def merge_and_unload(model: nn.Module, *, safe: bool = True) -> nn.Module:
    """Merge the active adapters for good and remove every adapter: a plain model comes back,
    with its original module classes (``modules_to_save`` copies replace their originals)."""
    reg = registry(model)
    with transaction(model):
        merge(model, safe=safe)
        with torch.no_grad():
            for _, layer in slots.copy_layers(model):
                live = [n for n in reg.active if n in layer.adapter_names()]
                if live:
                    state = layer.peftlab_copy[live[0]].state_dict()
                    original = layer.restore()
                    for t in [*original.parameters(), *original.buffers()]:
                        before_write(t)  # the copy's values go into the original's own tensors
                    original.load_state_dict(state)
        for _, layer in list(adapter_layers(model)):
            layer.restore()
        for p in model.parameters():
            p.requires_grad_(False)
        del model.__dict__["peftlab"]
    return model


def _remove(model: nn.Module, name: str) -> None:
    reg = registry(model)
    s = reg.adapters[name]
    for handle in s.hooks:
        handle.remove()
    s.hooks.clear()
    for _, layer in list(adapter_layers(model)):
        if name in layer.adapter_names() and (layer.owner_method in ("", s.method.layer_owner or s.method.method_name)):
            layer.remove_adapter(name)
    if s.base_keys and s.in_model and all(reg.originals.get(k) is not None for k in s.base_keys):
        slots.swap_out_base(model, s)
    slots.forget_base(model, name)
    del reg.adapters[name]
    if name in reg.active:
        reg.active.remove(name)
    if not reg.adapters:
        del model.__dict__["peftlab"]


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (all adapters when None); the base model comes back exactly.

    A merged adapter is unmerged first (exactly), so the base weights are the original ones.
    """
    reg = registry(model)
    names = list(reg.adapters) if name is None else [name]
    for n in names:
        s = slots.slot(model, n)
        if any(reg.originals.get(k) is None for k in s.base_keys):
            raise AdapterStateError(f"adapter {n!r} ({s.method.method_name}) trained the base weights in place "
                                    "without a copy; there is no base model to go back to")
    with transaction(model):
        for n in names:
            s = reg.adapters[n]
            if s.method.mergeable:
                s.method.unmerge(model, n)
            s.method.detach(model, n)
            _remove(model, n)
    return model


def is_adapter_layer(module: nn.Module) -> bool:
    return isinstance(module, (AdapterLayer, CopyLayer))
