"""Operations are transactions: a change to a model either completes or leaves no trace.

Usage::

    from peftlab.core.transaction import transaction

    with transaction(model):
        ...  # change the model in any way
    # on an exception inside the block the model is exactly as it was before the block, and the
    # exception propagates unchanged

Every public operation (``attach``, ``detach``, ``use``, ``merge``, ``unmerge``,
``merge_and_unload``, ``load``) runs its changes inside one; a method's ``attach`` needs no
rollback code of its own.

What a transaction restores, and how (nothing is deep-copied, so it costs a few dictionary copies
per module and works on the meta device):

* **Structure**, from a snapshot taken on entry: every module reachable from ``model`` gets back
  its class (an adapter's or a quantized layer's class swap is undone), its ``__dict__`` (the
  same attribute objects) and the contents of every dict, list and set in it, restored *in place*:
  ``_parameters``, ``_buffers``, ``_modules`` (the same ``Parameter`` and submodule objects, so
  identity holds), every hook dictionary (hook handles taken before the block still work), and
  per-layer state such as ``peftlab_merged``. The registry (``model.peftlab``) and each of its
  slots are restored the same way. Objects held *inside* those containers are not snapshotted:
  replace them rather than mutate them in place (the frozen ``Method`` configs already are).
* **``requires_grad``** and the **version counter** of every parameter and buffer reachable on
  entry (the exact merge/unmerge bookkeeping of ``core.layer`` relies on version counters).
* **Values** written in place into tensors that existed on entry. Shape-changing or
  identity-changing operations are covered by the snapshot; an in-place write is not visible to
  it, so code that writes into an existing tensor logs the write first, in one of two ways:

  - :func:`before_write` ``(tensor)``: keeps a copy of the tensor's value (once per transaction;
    the cost is the tensor's size, so use it for small tensors such as biases, or where no exact
    inverse exists);
  - :func:`on_undo` ``(fn, *written)``: registers an exact inverse that costs no copy (the merge of an
    adapter is undone by its exact unmerge).

  Both kinds go into one log, replayed in reverse order on failure, *after* the structure is
  restored: an undo step may use only state that existed when the transaction began.

  Writes into tensors created inside the transaction need no log: those tensors go away.

Transactions nest: an inner one restores its own start on failure (so a caller that catches the
inner error keeps a consistent model); when it succeeds its log joins the enclosing one's, so the
outer block can still undo everything.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["Transaction", "before_write", "on_undo", "transaction"]

_state = threading.local()


def _stack() -> list[Transaction]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None


_Contents = dict | list | set


class _ObjectState:
    """An object's class and ``__dict__``, with the contents of its dict/list/set attributes."""

    __slots__ = ("obj", "cls", "attrs", "contents")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.cls = type(obj)
        self.attrs: dict[str, Any] = dict(obj.__dict__)
        self.contents: dict[str, Any] = {}
        for key, value in self.attrs.items():
            if isinstance(value, dict):
                self.contents[key] = list(value.items())
            elif isinstance(value, (list, set)):
                self.contents[key] = list(value)

    def restore(self) -> None:
        obj, d = self.obj, self.obj.__dict__
        if type(obj) is not self.cls:
            object.__setattr__(obj, "__class__", self.cls)
        for key in [k for k in d if k not in self.attrs]:
            del d[key]
        for key, value in self.attrs.items():
            d[key] = value
            saved = self.contents.get(key)
            if saved is None:
                continue
            if isinstance(value, dict):
                value.clear()
                value.update(saved)
            elif isinstance(value, list):
                value[:] = saved
            else:
                value.clear()
                value.update(saved)


class Transaction:
    """The snapshot and undo log of one :func:`transaction` block (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        objects: list[Any] = list(model.modules())
        registry = model.__dict__.get("peftlab")
        if registry is not None:
            objects.append(registry)
            objects.extend(getattr(registry, "adapters", {}).values())
        self._objects = [_ObjectState(o) for o in objects]
        tensors: dict[int, torch.Tensor] = {}
        for m in model.modules():
            for t in [*m._parameters.values(), *m._buffers.values()]:
                if t is not None:
                    tensors.setdefault(id(t), t)
        self._tensors = tensors
        self._flags = {i: (t.requires_grad, _version(t)) for i, t in tensors.items()}
        self._undo: list[Callable[[], None]] = []
        """Undo steps in the order of the writes they reverse (value restores and inverses)."""
        self._kept: set[int] = set()
        """Tensors whose value this transaction's log restores in full (logged once)."""
        self._covered: set[int] = set()
        """Tensors some undo step writes back (for the check that every write was logged)."""

    def tracks(self, t: torch.Tensor) -> bool:
        return id(t) in self._tensors and self._tensors[id(t)] is t

    def keep(self, t: torch.Tensor) -> None:
        """Log ``t``'s current value (once per transaction: the first copy restores the value the
        tensor had before every later write, so later ones would be overwritten anyway)."""
        if id(t) in self._kept:
            return
        with torch.no_grad():
            value = t.detach().clone()
        self._undo.append(lambda: t.copy_(value))
        self._kept.add(id(t))
        self._covered.add(id(t))

    def join(self, outer: Transaction) -> None:
        """Hand this (committed) transaction's log to the enclosing one, in order."""
        outer._undo.extend(self._undo)
        outer._kept |= self._kept
        outer._covered |= self._covered

    def rollback(self) -> list[str]:
        """Restore the state of entry; returns what could not be restored (empty when exact)."""
        problems: list[str] = []
        unlogged = [tuple(t.shape) for i, t in self._tensors.items()
                    if self._flags[i][1] is not None and _version(t) != self._flags[i][1] and i not in self._covered]
        for state in reversed(self._objects):
            state.restore()
        with torch.no_grad():
            for fn in reversed(self._undo):
                try:
                    fn()
                except Exception as e:  # keep restoring the rest; the caller reports it
                    problems.append(f"an undo step failed ({type(e).__name__}: {e})")
        for i, t in self._tensors.items():
            grad, version = self._flags[i]
            if t.requires_grad != grad:
                t.requires_grad_(grad)
            if version is not None and _version(t) != version:
                torch._C._autograd._unsafe_set_version_counter((t,), (version,))
        if unlogged:
            problems.append(f"{len(unlogged)} tensor(s) were written in place without before_write/on_undo "
                            f"(shapes {unlogged[:4]}); their values may differ")
        self._kept.clear()
        self._undo.clear()
        self._covered.clear()
        return problems


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[Transaction]:
    """Run the block as one transaction on ``model``: on any exception the model is restored
    exactly (see the module docstring) and the exception propagates."""
    tx = Transaction(model)
    stack = _stack()
    stack.append(tx)
    try:
        yield tx
    except BaseException as e:
        stack.pop()
        problems = tx.rollback()
        for p in problems:
            e.add_note(f"peftlab could not fully undo the failed operation: {p}")
        raise
    else:
        stack.pop()
        if stack:
            tx.join(stack[-1])


def before_write(tensor: torch.Tensor) -> None:
    """Call before writing into ``tensor`` in place: the innermost open transaction keeps its
    value (a copy of the tensor, once per transaction). A no-op outside a transaction and for
    tensors created inside it."""
    stack = _stack()
    if stack and any(tx.tracks(tensor) for tx in stack):
        stack[-1].keep(tensor)


def on_undo(fn: Callable[[], None], *written: torch.Tensor) -> None:
    """Register ``fn`` as the exact inverse of a write just made into the tensors ``written``
    (a no-op outside a transaction). It runs on rollback, in reverse order, after the structure
    is restored, so it may use only state that existed when the transaction began."""
    stack = _stack()
    if stack:
        stack[-1]._undo.append(fn)
        stack[-1]._covered.update(id(t) for t in written)
