"""``peftlab.summary``: what trains, how much, and where."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftlab.core import slots
from peftlab.core.layer import adapter_layers


@dataclass(frozen=True)
class Row:
    module: str
    kind: str
    adapters: tuple[str, ...]
    trainable: int
    extra: dict[str, float | str] = field(default_factory=dict)
    """Columns the module itself reports (``summary_columns()``, e.g. a quantized layer's
    relative quantization error)."""


@dataclass(frozen=True)
class Summary:
    """Parameter counts of a model with adapters.

    ``base`` counts the base model's parameters (adapter tensors excluded), so ``percent`` is the
    trainable share *of the base model*, the figure papers report. Weights a module stores
    outside ``nn.Parameter`` (quantized codes) count by their logical size (``stored_parameters()``).
    """

    total: int
    base: int
    trainable: int
    adapters: dict[str, int]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What each adapter's method says about itself (``Method.describe``: AdaLoRA's rank allocation)."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def table(self, max_rows: int = 40) -> str:
        extra = list(dict.fromkeys(k for r in self.rows for k in r.extra))
        lines = [f"{'module':<60} {'kind':<24} {'adapters':<16} {'trainable':>12}" + "".join(f" {k:>14}" for k in extra)]
        lines.append("-" * len(lines[0]))
        for r in self.rows[:max_rows]:
            cells = "".join(f" {_cell(r.extra.get(k, '')):>14}" for k in extra)
            lines.append(f"{r.module[-60:]:<60} {r.kind[:24]:<24} {','.join(r.adapters)[:16]:<16} {r.trainable:>12,}"
                         + cells)
        if len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more modules")
        return "\n".join(lines)

    def __str__(self) -> str:
        per = ", ".join(f"{n}: {c:,}" for n, c in self.adapters.items()) or "none"
        return (f"trainable params: {self.trainable:,} of {self.base:,} base params ({self.percent:.4f}%); "
                f"total with adapters: {self.total:,}; per adapter: {per}\n"
                + "".join(f"{line}\n" for line in self.notes) + self.table())


def _cell(v: float | str) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary(model: nn.Module) -> Summary:
    """Count trainable, base and adapter parameters, with a per-module table."""
    from peftlab.api import adapter_parameters

    names = list(slots.registry(model).adapters) if slots.has_adapters(model) else []
    per_adapter = {n: adapter_parameters(model, n) for n in names}
    new_tensors = {id(t) for n in names for k, t in per_adapter[n].items()
                   if k not in slots.slot(model, n).base_keys}
    params = {id(p): p for p in model.parameters()}  # shared (tied) parameters once
    total = sum(p.numel() for p in params.values())
    stored = sum(int(m.stored_parameters()) for m in model.modules() if callable(getattr(m, "stored_parameters", None)))
    total += stored
    base = stored + sum(p.numel() for i, p in params.items() if i not in new_tensors)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    rows: dict[str, Row] = {}
    for path, layer in adapter_layers(model):
        here = layer.adapter_names()
        count = sum(p.numel() for n in here for p in layer.adapter_parameters(n).values() if p.requires_grad)
        rows[path] = Row(path, type(layer).__name__, tuple(here), count)
    for path, module in model.named_modules():
        columns = getattr(module, "summary_columns", None)
        if callable(columns):
            old = rows.get(path) or Row(path, type(module).__name__, (), 0)
            rows[path] = Row(old.module, old.kind, old.adapters, old.trainable, {**old.extra, **columns()})
    for n in names:
        for key in slots.slot(model, n).base_keys:
            path = key.rpartition(".")[0]
            t = per_adapter[n][key]
            old = rows.get(path) or Row(path, type(model.get_submodule(path)).__name__, (), 0)
            rows[path] = Row(path, old.kind, tuple(dict.fromkeys((*old.adapters, n))),
                             old.trainable + (t.numel() if t.requires_grad else 0), old.extra)
    notes = [line for n in names for line in slots.slot(model, n).method.describe(model, n)]
    return Summary(total, base, trainable, {n: sum(t.numel() for t in ts.values()) for n, ts in per_adapter.items()},
                   list(rows.values()), notes)
