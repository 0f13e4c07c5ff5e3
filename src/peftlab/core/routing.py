"""Mixed-adapter batches: one adapter (or the base model) per row, in one forward pass.

A :class:`Routing` names an adapter per batch row (``None``: the base model). While it is set on
a model (``peftlab.per_row``), each adapted layer adds to every row the update of that row's
adapter, computed for all the batch's adapters together:

* the rows routed to the adapters present at a layer are cut into *tiles* of at most
  ``ceil(rows / adapters)`` rows, each tile one adapter's (so padding never more than doubles the
  work, however unevenly the rows are spread);
* the layer's adapters are given in a *form* (:class:`RoutedForm`: a low-rank map, a bottleneck
  MLP), the forms are stacked once per tile (``(tiles, ...)`` tensors), and the update of every
  tile is a few batched matrix products (``torch.bmm``) over a gathered ``(tiles, tile rows x
  positions, features)`` view of the input;
* each row reads its own slot of the tiles' updates back (one ``index_select``; rows of the base
  model or of adapters absent at the layer read a zero slot) and adds it to the base output.

The number of kernels per layer does not grow with the number of adapters. Each layer's adapters
are stacked once (one copy of their weights, padded to the largest rank or width, kept outside
the module and rebuilt only when an adapter or a weight changes); a batch whose tiles are the
stack itself (every adapter of the layer, each in one tile) uses it as it is, any other batch
selects its tiles from it once, on its first forward pass, for all its passes (every decoding
step of ``generate``).

A tensor whose leading dimension is ``k`` times the routing's rows (``generate`` with
``num_beams`` or ``num_return_sequences``, or layers that flatten ``(batch, positions)``) maps its
row ``j`` to the routing's row ``j // k``, which is how both of those lay rows out.

This module knows no method: a layer kind takes part by answering ``routed_form(name)`` and
calling :meth:`Routing.apply` in its forward; the maths of a form lives with the methods that
share it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from peftlab.core.errors import AdapterStateError

BASE_ROW_NAMES: tuple[Any, ...] = (None, "__base__")
"""Names that route a row to the base model (``"__base__"`` is peft's spelling)."""

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Maps a tensor with the layer's leading rows ``(N, ..., d)`` to its tiles ``(tiles, t x L, d)``."""


class RoutedForm(Protocol):
    """One adapter's update at one layer, in a form whose updates stack across adapters.

    A layer's ``routed_form(name)`` returns one, or None where adapter ``name`` changes nothing
    at that layer. ``key`` says which forms stack together (same kind, same non-linearity...).
    The class's ``stack`` turns forms into ``(per_tile, static)``: tensors with one leading entry
    per form (selected per tile by the routing), and what they share; ``apply`` computes the
    update of every tile, ``(tiles, t x L, d_out)``, from those, the layer's tensors gathered
    into tiles (``gather``) and the named inputs of the layer's forward (``inputs``)."""

    key: ClassVar[Hashable] | Hashable

    @classmethod
    def stack(cls, forms: Sequence[Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    @classmethod
    def apply(cls, per_tile: dict[str, torch.Tensor], static: dict[str, Any], gather: Gather,
              inputs: dict[str, torch.Tensor | None]) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Group:
    """The tiles of one stackable group of adapters at one layer, for one row count."""

    form: type
    per_tile: dict[str, torch.Tensor]
    static: dict[str, Any]
    tile_rows: torch.Tensor
    """``(tiles * t,)`` row index of every tile slot (padding slots repeat a real row)."""
    inverse: torch.Tensor
    """``(rows,)`` each row's slot (rows outside the group: the zero slot after the tiles)."""
    partial: bool
    """Whether some rows are outside the group (and read the zero slot)."""
    tiles: int
    in_order: bool
    """The slots are the rows ``0..N-1`` in order: no gather either way."""


def tile(rows_of: dict[str, list[int]], order: Sequence[str]) -> tuple[list[str], list[list[int]], int]:
    """Cut each adapter's rows into tiles of at most ``t = ceil(rows / adapters)`` rows.

    Returns ``(adapter of each tile, rows of each tile, t)``. There are at most ``2 x adapters``
    tiles, so padding every tile to ``t`` rows costs at most twice the real rows."""
    present = [a for a in order if rows_of.get(a)]
    total = sum(len(rows_of[a]) for a in present)
    t = max(1, math.ceil(total / max(1, len(present))))
    owners: list[str] = []
    chunks: list[list[int]] = []
    for a in present:
        rs = rows_of[a]
        for i in range(0, len(rs), t):
            owners.append(a)
            chunks.append(rs[i:i + t])
    return owners, chunks, t


@dataclass(frozen=True)
class _Stack:
    """Every routable adapter of one layer in one form, stacked (in the layer's adapter order)."""

    form: type
    names: tuple[str, ...]
    per_tile: dict[str, torch.Tensor]
    static: dict[str, Any]


_STACKS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[_Stack]]] = weakref.WeakKeyDictionary()
"""Per layer: the stacked forms of its adapters and the fingerprint they were built from. Kept
outside the module (never pickled, copied or saved with it); rebuilt when an adapter, a weight
or a parameter version changes; dropped with the layer's adapters (:func:`forget`)."""


def _fingerprint(layer: nn.Module) -> tuple:
    names = tuple(layer.adapter_names())  # type: ignore[operator]
    tensors = tuple((id(t), t._version) for t in (*layer.parameters(), *layer.buffers()))
    return names, tensors


def stacks(layer: nn.Module) -> list[_Stack]:
    """The layer's adapters stacked by form, built once and reused while nothing changed."""
    key = _fingerprint(layer)
    cached = _STACKS.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    forms: dict[tuple[type, Hashable], list[tuple[str, Any]]] = {}
    for a in key[0]:
        if refusal(layer, a) is None and (f := layer.routed_form(a)) is not None:  # type: ignore[operator]
            forms.setdefault((type(f), f.key), []).append((a, f))
    built = []
    for (cls, _), members in forms.items():
        per_tile, static = cls.stack([f for _, f in members])
        built.append(_Stack(cls, tuple(a for a, _ in members), per_tile, static))
    _STACKS[layer] = (key, built)
    return built


def forget(layer: nn.Module) -> None:
    """Drop the layer's stacked forms (its adapters changed or went)."""
    _STACKS.pop(layer, None)


@dataclass(eq=False)
class Routing:
    """An adapter name per row of a batch (``None``: the base model), for inference."""

    names: tuple[str | None, ...]
    _plans: dict[tuple[int, int], list[_Group] | None] = field(default_factory=dict, repr=False)
    _rows: dict[int, dict[str, list[int]]] = field(default_factory=dict, repr=False)
    _tiles: dict[tuple, tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, bool, int]] = \
        field(default_factory=dict, repr=False)
    """Tile plans by (stack names, rows, device): layers holding the same adapters share one."""

    def rows_of(self, n_rows: int) -> dict[str, list[int]]:
        """``{adapter: rows}`` of a tensor with ``n_rows`` leading rows (a multiple of the batch)."""
        if n_rows not in self._rows:
            self._rows[n_rows] = self._rows_of(n_rows)
        return self._rows[n_rows]

    def _rows_of(self, n_rows: int) -> dict[str, list[int]]:
        b = len(self.names)
        if n_rows % b:
            raise AdapterStateError(
                f"a mixed-adapter batch of {b} rows met a tensor of {n_rows} rows, which is not a multiple of "
                f"{b}; give one adapter name per row of the input (repeat names for repeated rows)")
        k = n_rows // b
        out: dict[str, list[int]] = {}
        for j in range(n_rows):
            a = self.names[j // k]
            if a is not None:
                out.setdefault(a, []).append(j)
        return out

    def apply(self, layer: nn.Module, out: torch.Tensor, **inputs: torch.Tensor | None) -> torch.Tensor:
        """``out`` (the layer's output so far, features last) plus each routed row's update, added
        in place (inference: nothing keeps ``out`` for a backward pass)."""
        if torch.is_grad_enabled():
            raise AdapterStateError("mixed-adapter batches are for inference: run them under torch.inference_mode() "
                                    "or torch.no_grad() (generate() does)")
        n = out.shape[0]
        key = (id(layer), n)
        if key not in self._plans:
            self._plans[key] = self._plan(layer, n, out.device)
        groups = self._plans[key]
        if not groups:
            return out
        d_out = out.shape[-1]
        flat = out.reshape(n, -1, d_out)
        for g in groups:
            def gather(t: torch.Tensor, g: _Group = g) -> torch.Tensor:
                t = t.reshape(n, -1, t.shape[-1])
                if g.in_order:
                    return t.reshape(g.tiles, -1, t.shape[-1])
                return t.index_select(0, g.tile_rows).reshape(g.tiles, -1, t.shape[-1])

            delta = g.form.apply(g.per_tile, g.static, gather, {"out": out, **inputs})
            delta = delta.reshape(-1, flat.shape[1], d_out).to(flat.dtype)
            if g.in_order:  # the tiles are the rows as they are
                flat.add_(delta)
                continue
            if g.partial:
                delta = torch.cat([delta, delta.new_zeros(1, *delta.shape[1:])])
            flat.add_(delta.index_select(0, g.inverse))  # each row's own slot: a gather, no scatter
        return flat.view(out.shape)

    def _plan(self, layer: nn.Module, n_rows: int, device: torch.device) -> list[_Group] | None:
        held = set(layer.adapter_names())  # type: ignore[operator]
        rows_of = {a: r for a, r in self.rows_of(n_rows).items() if a in held}
        if not rows_of:
            return None
        groups = []
        for stack in stacks(layer):
            key = (stack.names, n_rows, device)
            if key not in self._tiles:
                self._tiles[key] = self._tile(stack.names, {a: r for a, r in rows_of.items() if a in stack.names},
                                              n_rows, device)
            where, index, slots, inverse, partial, tiles = self._tiles[key]
            if not tiles:
                continue
            if where == list(range(len(stack.names))):
                per_tile = stack.per_tile
            else:  # the batch's tiles only: one copy of their weights for this batch
                per_tile = {k: v.index_select(0, index) for k, v in stack.per_tile.items()}
            in_order = not partial and slots.shape[0] == n_rows and bool(
                (slots == torch.arange(n_rows, device=device)).all())
            groups.append(_Group(stack.form, per_tile, stack.static, slots, inverse, partial, tiles, in_order))
        return groups


    @staticmethod
    def _tile(names: tuple[str, ...], rows_of: dict[str, list[int]], n_rows: int, device: torch.device
              ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, bool, int]:
        """``(stack position of each tile, the same as a tensor, slot rows, each row's slot, whether
        some rows have none, tiles)``; tiles follow the stack's order, so a batch holding every
        adapter once is the stack itself."""
        owners, chunks, t = tile(rows_of, names)
        where = [names.index(o) for o in owners]
        slots: list[int] = []
        inverse = [len(chunks) * t] * n_rows  # the zero slot
        for i, chunk in enumerate(chunks):
            for j, row in enumerate(chunk):
                inverse[row] = i * t + j
            slots += chunk + [chunk[0]] * (t - len(chunk))
        partial = any(v == len(chunks) * t for v in inverse)
        return (where, torch.tensor(where, device=device, dtype=torch.long),
                torch.tensor(slots, device=device, dtype=torch.long),
                torch.tensor(inverse, device=device, dtype=torch.long), partial, len(owners))


def refusal(layer: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` of ``layer`` cannot serve a mixed-adapter batch (None: it can)."""
    answer = getattr(layer, "route_refusal", None)
    if answer is None:
        return f"{type(layer).__name__} layers have no per-row form"
    return answer(name)
