"""Which modules a configuration selects: the only place where module names are matched.

A target list holds entries of these forms (all JSON-serialisable):

==================  =====================================================================
``"q_proj"``        a name: the module path equals it or ends with ``".q_proj"`` (peft's rule)
``"*.attn.c_*"``    a glob (contains ``*``, ``?`` or ``[``), matched against the whole path
``"re:.*\\.(q|v)"`` a regular expression, full-matched against the whole path
``"type:Linear"``   every module whose class (or original class, once adapted) has that name
``"all-linear"``    every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) except the output head and
                    mixture-of-experts routers
==================  =====================================================================

``exclude`` takes entries of the same forms; ``layers`` keeps modules whose layer index (the
first numeric component of the path, e.g. ``model.layers.3.mlp``) is in the given set, written
as ints or ranges (``"0-3,10"``). An entry that selects nothing is an error that lists close
module names, even when the other entries match: silence there hides typos.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from peftlab.core.config import first_int, text_config
from peftlab.core.errors import TargetError
from peftlab.core.layer import AdapterLayer

ALL_LINEAR = "all-linear"


def peft_targets(value: object) -> tuple[str, ...]:
    """peftlab target entries for a peft ``target_modules`` / ``exclude_modules`` value: a list is
    names (peft's suffix rule, as here), a string a regular expression full-matched against the
    path (``re:``), except ``'all-linear'``; None is no entry."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value == ALL_LINEAR else (f"re:{value}",)
    return tuple(value)  # type: ignore[arg-type]


def parse_layers(spec: str | int | Iterable[int | str] | None) -> frozenset[int] | None:
    """``"0-3,7"`` / ``[0, 1, "4-5"]`` / ``3`` -> a set of layer indices (None: all layers)."""
    if spec is None:
        return None
    items: Iterable[int | str] = [spec] if isinstance(spec, (str, int)) else spec
    out: set[int] = set()
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise TargetError(f"layer range {part!r} is empty; write it low-high, e.g. '0-3'")
                out.update(range(lo, hi + 1))
            elif part.isdigit():
                out.add(int(part))
            else:
                raise TargetError(f"cannot read layer index {part!r}; use ints or ranges like '0-3,7'")
    return frozenset(out)


def layer_index(path: str, patterns: Sequence[str] = ()) -> int | None:
    """The layer index of a module path, if any: the first numeric component (its transformer
    block), or with ``patterns`` (peft's ``layers_pattern``: the name of the module list, e.g.
    ``"layers"``, ``"h"``, ``"block"``; regular expressions) the number right after the first
    component that one of them full-matches, the first pattern that matches winning (peft's rule)."""
    if not patterns:
        for part in path.split("."):
            if part.isdigit():
                return int(part)
        return None
    for pattern in patterns:  # the pattern starts at a component; the index is followed by a component
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if m is not None:
            return int(m.group(1))
    return None


def _class_names(module: nn.Module) -> set[str]:
    cls = type(module)
    base = getattr(cls, "base_class", cls) if isinstance(module, AdapterLayer) else cls
    return {c.__name__ for c in base.__mro__}


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or "Conv1D" in _class_names(module)


def matches(entry: str, path: str, module: nn.Module) -> bool:
    """Whether one target entry selects the module at ``path``."""
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], path) is not None
    if entry.startswith("type:"):
        return entry[5:] in _class_names(module)
    if any(ch in entry for ch in "*?["):
        return fnmatch.fnmatchcase(path, entry)
    return path == entry or path.endswith("." + entry)


def check_entry(entry: object, label: str = "target", what: str = "method") -> None:
    """Refuse an entry that is not a string, or a ``re:`` entry that is not a regular expression."""
    if not isinstance(entry, str):
        raise TargetError(f"{what}: {label} entry {entry!r} must be a string (use 'type:Linear' for types)")
    if not entry:
        raise TargetError(f"{what}: {label} entry '' is empty; name a module, e.g. 'q_proj'")
    if entry.startswith("re:"):
        try:
            re.compile(entry[3:])
        except re.error as e:
            raise TargetError(f"{what}: {label} entry {entry!r} is not a regular expression ({e}); escape "
                              "special characters with a backslash, e.g. 're:.*\\.q_proj'") from None


def _output_head_paths(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {p for p, m in model.named_modules() if head is not None and m is head}


def _experts(model: nn.Module) -> int | None:
    return first_int(text_config(model), "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                     minimum=2)


def is_router(model: nn.Module, path: str, module: nn.Module) -> bool:
    """A mixture-of-experts router: a linear layer scoring the experts. 'all-linear' leaves it alone
    (it decides where tokens go; adapting it is a choice to make by name)."""
    n = _experts(model)
    if n is None or not is_linear(module):
        return False
    out = module.out_features if isinstance(module, nn.Linear) else int(module.weight.shape[-1])
    return out == n or "router" in type(module).__name__.lower()


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of ``model`` except the insides of adapters (which are never targets)."""
    hidden: list[str] = []
    out: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(path == h or path.startswith(h + ".") for h in hidden):
            continue
        if isinstance(module, AdapterLayer):
            hidden.extend(f"{path}.{c}" if path else c for c in module.adapter_containers)
        if path:
            out.append((path, module))
    return out


def select(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    exclude: Sequence[str] = (),
    layers: str | int | Iterable[int | str] | None = None,
    supported: tuple[type, ...] | None = None,
    supported_names: Sequence[str] = (),
    skip: Sequence[str] = (),
    what: str = "method",
    layers_pattern: Sequence[str] = (),
) -> list[str]:
    """Paths of the modules selected by ``targets``, in model order.

    Args:
        model: The model to search.
        targets: Target entries (see the module docstring); a single string is one entry.
        exclude: Entries whose matches are removed from the selection.
        layers: Keep only modules of these layer indices.
        supported: Module classes the method can adapt. A module of another class that an entry
            selects is skipped (a glob may well match containers); an entry that selects *only*
            unsupported modules is an error naming the supported types.
        supported_names: Class names also accepted (for optional dependencies such as
            transformers' ``Conv1D``).
        skip: Module names that are never selected (e.g. ``modules_to_save``).
        what: The method's name, for error messages.
        layers_pattern: How ``layers`` finds a module's index (see :func:`layer_index`).

    Raises:
        TargetError: An entry that selects nothing, or only modules of unsupported types.
    """
    entries = [targets] if isinstance(targets, str) else list(targets)
    if not entries:
        raise TargetError(f"{what}: target_modules is empty; name at least one module (or 'all-linear')")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    skip = [skip] if isinstance(skip, str) else list(skip)
    for label, group in (("target", entries), ("exclude", exclude), ("modules_to_save", skip)):
        for entry in group:
            check_entry(entry, label, what)
    keep_layers = parse_layers(layers)
    candidates = candidate_modules(model)
    heads = _output_head_paths(model)

    def ok_type(module: nn.Module) -> bool:
        if supported is None:
            return True
        return isinstance(module, supported) or bool(_class_names(module) & set(supported_names))

    skip_roots = [p for p, m in candidates if any(matches(s, p, m) for s in skip)]

    def skipped(path: str, module: nn.Module) -> bool:  # a skipped module and everything inside it
        return any(path == r or path.startswith(r + ".") for r in skip_roots)

    chosen: dict[str, None] = {}
    for entry in entries:
        if entry == ALL_LINEAR:
            hits = [p for p, m in candidates if is_linear(m) and p not in heads and not skipped(p, m)
                    and not is_router(model, p, m)]
        else:
            hits = [p for p, m in candidates if matches(entry, p, m) and not skipped(p, m)]
        if not hits:
            raise TargetError(f"{what}: target {entry!r} matches no module of {type(model).__name__}."
                              + _close_names(entry, candidates))
        typed = [p for p in hits if ok_type(dict(candidates)[p])]
        if not typed:
            kinds = sorted({type(dict(candidates)[p]).__name__ for p in hits})
            names = sorted({t.__name__ for t in supported or ()} | set(supported_names))
            raise TargetError(f"{what}: target {entry!r} selects only modules of type {kinds} "
                              f"({', '.join(hits[:3])}{', ...' if len(hits) > 3 else ''}), which {what} "
                              f"cannot adapt; supported types: {names}. Name modules of a supported type in "
                              "target_modules, or use a method that adapts these (lora adapts Linear, Conv1D, "
                              "Embedding and Conv layers).")
        chosen.update(dict.fromkeys(typed))

    by_path = dict(candidates)
    out = [p for p in chosen if not any(matches(e, p, by_path[p]) for e in exclude)]
    if keep_layers is not None:
        out = [p for p in out if layer_index(p, layers_pattern) in keep_layers]
    if not out:
        found = sorted({i for p in chosen if (i := layer_index(p, layers_pattern)) is not None})
        raise TargetError(f"{what}: targets {entries} select {len(chosen)} module(s), but exclude={list(exclude)} "
                          f"and layers={sorted(keep_layers) if keep_layers is not None else None} remove all "
                          f"of them (layer indices present: {found}).")
    order = {p: i for i, (p, _) in enumerate(candidates)}
    return sorted(out, key=order.__getitem__)


def _close_names(entry: str, candidates: list[tuple[str, nn.Module]]) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p, _ in candidates if not p.rsplit(".", 1)[-1].isdigit()})
    key = entry.removeprefix("re:").removeprefix("type:").rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(entry, [p for p, _ in candidates], n=5, cutoff=0.5)
    shown = close or leaves[:12]
    label = "Close names" if close else "Module names include"
    return f" {label}: {', '.join(shown)}."


def regex_select(model: nn.Module, patterns: Sequence[str], *, supported: tuple[type, ...], what: str) -> list[str]:
    """Paths of the modules of a ``supported`` type whose path full-matches any of ``patterns``.

    Unlike :func:`select`, a pattern that matches nothing is fine as long as one pattern matches:
    regex target lists such as GaLore's defaults cover several architectures at once.

    Raises:
        TargetError: ``patterns`` is empty, a pattern is not a regular expression, or no
            module of a supported type matches any of them (the message lists the module names
            of that type).
    """
    entries = [patterns] if isinstance(patterns, str) else list(patterns)
    if not entries:
        raise TargetError(f"{what}: the target list is empty; give regular expressions such as '.*attn.*'")
    compiled = []
    for entry in entries:
        try:
            compiled.append(re.compile(entry))
        except (re.error, TypeError) as e:
            raise TargetError(f"{what}: target {entry!r} is not a regular expression ({e})") from None
    typed = [(p, m) for p, m in candidate_modules(model) if isinstance(m, supported)]
    out = [p for p, _ in typed if any(c.fullmatch(p) for c in compiled)]
    if not out:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in typed})
        kinds = ", ".join(t.__name__ for t in supported)
        raise TargetError(f"{what}: the targets {entries} (full-matched regular expressions) match no {kinds} "
                          f"of {type(model).__name__}; its {kinds} modules are named "
                          f"{', '.join(names[:12]) or '(none)'} (e.g. {typed[0][0] if typed else '-'})")
    return out
