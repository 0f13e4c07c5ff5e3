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
* the updates of the real (unpadded) rows are added to the base output with one ``index_add``.

The number of kernels per layer does not grow with the number of adapters; the stacked weights
(one copy of the batch's adapters per layer) are built on the first forward pass of a routing
and reused by every later pass of that routing (all the decoding steps of ``generate``).

A tensor whose leading dimension is ``k`` times the routing's rows (``generate`` with
``num_beams`` or ``num_return_sequences``, or layers that flatten ``(batch, positions)``) maps its
row ``j`` to the routing's row ``j // k``, which is how both of those lay rows out.

This module knows no method: a layer kind takes part by answering ``routed_form(name)`` and
calling :meth:`Routing.apply` in its forward; the maths of a form lives with the methods that
share it.
"""

from __future__ import annotations

import math
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
    at that layer. ``key`` says which forms stack together (same kind, same non-linearity...); the class's
    ``stack`` builds the per-tile tensors from one form per tile, and ``apply`` computes the
    update of every tile, ``(tiles, t x L, d_out)``, from the layer's tensors gathered into
    tiles (``gather``) and the named inputs of the layer's forward (``inputs``)."""

    key: ClassVar[Hashable] | Hashable

    @classmethod
    def stack(cls, forms: Sequence[Any]) -> Any: ...

    @classmethod
    def apply(cls, stacked: Any, gather: Gather, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Group:
    """The tiles of one stackable group of adapters at one layer, for one row count."""

    form: type
    stacked: Any
    tile_rows: torch.Tensor
    """``(tiles * t,)`` row index of every tile slot (padding slots repeat a real row)."""
    valid: torch.Tensor
    """``(tiles * t,)`` True where the slot is a real row."""
    rows: torch.Tensor
    """The real rows, in slot order."""
    tiles: int


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


@dataclass(eq=False)
class Routing:
    """An adapter name per row of a batch (``None``: the base model), for inference."""

    names: tuple[str | None, ...]
    _plans: dict[tuple[int, int], list[_Group] | None] = field(default_factory=dict, repr=False)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The distinct adapters of the batch, in order of first appearance."""
        return tuple(dict.fromkeys(n for n in self.names if n is not None))

    def rows_of(self, n_rows: int) -> dict[str, list[int]]:
        """``{adapter: rows}`` of a tensor with ``n_rows`` leading rows (a multiple of the batch)."""
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
        """``out`` (the layer's output so far, features last) plus each routed row's update."""
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
        positions = flat.shape[1]
        for g in groups:
            def gather(t: torch.Tensor, g: _Group = g) -> torch.Tensor:
                t = t.reshape(n, -1, t.shape[-1])
                return t.index_select(0, g.tile_rows).reshape(g.tiles, -1, t.shape[-1])

            delta = g.form.apply(g.stacked, gather, {"out": out, **inputs})
            delta = delta.reshape(-1, positions, d_out)[g.valid]
            flat = flat.index_add(0, g.rows, delta.to(flat.dtype))
        return flat.view(out.shape)

    def _plan(self, layer: nn.Module, n_rows: int, device: torch.device) -> list[_Group] | None:
        held = set(layer.adapter_names())  # type: ignore[operator]
        rows_of = {a: r for a, r in self.rows_of(n_rows).items() if a in held}
        if not rows_of:
            return None
        forms = {a: f for a in rows_of if (f := layer.routed_form(a)) is not None}  # type: ignore[operator]
        by_key: dict[tuple[type, Hashable], list[str]] = {}
        for a in self.adapters:
            if a in forms:
                by_key.setdefault((type(forms[a]), forms[a].key), []).append(a)
        groups = []
        for (cls, _), members in by_key.items():
            owners, chunks, t = tile(rows_of, members)
            slots, valid = [], []
            for chunk in chunks:
                slots += chunk + [chunk[0]] * (t - len(chunk))
                valid += [True] * len(chunk) + [False] * (t - len(chunk))
            valid_t = torch.tensor(valid, device=device)
            slots_t = torch.tensor(slots, device=device, dtype=torch.long)
            groups.append(_Group(cls, cls.stack([forms[a] for a in owners]), slots_t, valid_t,
                                 slots_t[valid_t], len(owners)))
        return groups


def refusal(layer: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` of ``layer`` cannot serve a mixed-adapter batch (None: it can)."""
    answer = getattr(layer, "route_refusal", None)
    if answer is None:
        return f"{type(layer).__name__} layers have no per-row form"
    return answer(name)
