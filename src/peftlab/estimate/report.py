"""Estimates for people: a terminal table, JSON, and a stacked-bar PNG comparing methods.

The table lists each term at its own maximum, then the total of every phase of the step and the
peak (the largest phase); the PNG stacks what is allocated at each method's peak, by component.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftlab.estimate.core import COMPONENT_LABELS, TERM_LABELS, TERMS, Estimate, Fit
from peftlab.estimate.phases import COMPONENTS

UNITS = {"GB": (10**9, 10**6, "GB", "MB"), "GiB": (2**30, 2**20, "GiB", "MiB")}
COLORS = {"weights": "#4C72B0", "quant_constants": "#8172B3", "gradients": "#DD8452", "optimizer": "#C44E52",
          "activations": "#55A868", "kv_cache": "#937860", "overhead": "#8C8C8C", "transients": "#DA8BC3"}


def size(n: float, units: str = "GB") -> str:
    """``13.48 GB`` / ``312.5 MB`` (or GiB/MiB); ``-`` for zero."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {list(UNITS)} (got {units!r})")
    big, small, big_name, small_name = UNITS[units]
    if n == 0:
        return "-"
    if abs(n) >= big:
        return f"{n / big:.2f} {big_name}"
    return f"{n / small:.1f} {small_name}"


def count_text(n: int) -> str:
    """``6.74B``, ``20.0M``, ``12.3K``."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{2 if suffix == 'B' else 1}f}{suffix}"
    return str(n)


def _percent(e: Estimate) -> str:
    """Trainable parameters as a percentage of the base model's, readable at any size."""
    pct = 100 * e.params["trainable"] / max(1, e.params["base"])
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def describe(e: Estimate) -> str:
    """One line with the model and the setting."""
    s = e.settings
    precision = s["dtype"] + (" + mixed precision" if s["mixed_precision"] else "")
    if s["mode"] == "inference":
        what = f"inference: batch {s['batch']}, prefill {s['seq']}, KV cache {s['context'] or s['seq']} positions"
        return f"{e.model} ({count_text(e.params['total'])} params) | {what}, {precision}, {s['device']}"
    shard = (f"FSDP over {s['devices']}" if s["fsdp"] else f"ZeRO-{s['zero']} over {s['devices']}" if s["zero"]
             else f"{s['devices']} device" + ("s (DDP)" if s["devices"] > 1 else ""))
    return (f"{e.model} ({count_text(e.params['total'])} params) | train: batch {s['batch']} x seq {s['seq']}, "
            f"{precision}, {s['optimizer']}, checkpointing {s['checkpointing']}, {shard}, {s['device']}")


def table(estimates: Sequence[Estimate], units: str = "GB", fits: Sequence[Fit] | None = None,
          errors: dict[str, str] | None = None) -> str:
    """Methods side by side: terms, total, and (with ``fits``) the budget verdicts."""
    errors = dict(errors or {})
    columns = [e.method for e in estimates] + [m for m in errors if m not in {e.method for e in estimates}]
    by_method = {e.method: e for e in estimates}
    label_w = max(len(v) for v in TERM_LABELS.values()) + 8
    col_w = max(14, *(len(c) + 2 for c in columns)) if columns else 14
    lines = []
    if estimates:
        lines.append(describe(estimates[0]))
        lines.append("")
    lines.append(" " * label_w + "".join(f"{c:>{col_w}}" for c in columns))

    def row(label: str, cell: Any) -> None:
        cells = [cell(by_method[c]) if c in by_method else "n/a" for c in columns]
        lines.append(f"{label:<{label_w}}" + "".join(f"{x:>{col_w}}" for x in cells))

    row("trainable params", lambda e: f"{count_text(e.params['trainable'])} ({_percent(e)})")
    for t in TERMS:
        row(TERM_LABELS[t], lambda e, t=t: size(getattr(e, t), units))
    lines.append("-" * (label_w + col_w * len(columns)))
    row("sum of terms (all at once)", lambda e: size(e.sum_of_terms, units))
    phase_names = list(dict.fromkeys(k for e in estimates for k in e.phases))
    if len(phase_names) > 1:
        for ph in phase_names:
            row(f"phase: {ph}", lambda e, ph=ph: size(e.phase_totals().get(ph, 0), units)
                + ("*" if e.peak_phase == ph else " "))
    row("total per device (peak)", lambda e: size(e.total, units))
    if fits:
        by_fit = {f.method: f for f in fits}
        budget = size(fits[0].budget, units)
        s = estimates[0].settings if estimates else {"seq": "?", "batch": "?"}
        for label, cell in ((f"fits {budget}", lambda f: "yes" if f.fits else "no"),
                            (f"max batch @ seq {s['seq']}", lambda f: str(f.max_batch)),
                            (f"max seq @ batch {s['batch']}",
                             lambda f: f"{f.max_seq}" + ("+" if f.seq_capped else ""))):
            lines.append(f"{label:<{label_w}}" + "".join(
                f"{(cell(by_fit[c]) if c in by_fit and by_fit[c].estimate else 'n/a'):>{col_w}}" for c in columns))
    notes = _notes(estimates)
    if notes or errors:
        lines.append("")
        lines.append("notes:")
        lines += [f"  - {n}" for n in notes]
        lines += [f"  - {m}: n/a: {msg}" for m, msg in errors.items()]
    if len(phase_names) > 1:
        lines.append("  - '*': the phase holding the peak; terms are each at their own maximum, which no "
                     "moment of the step reaches at once")
    if fits and any(f.seq_capped for f in fits):
        lines.append("  - '+': fits up to the model's max_position_embeddings")
    return "\n".join(lines)


def _notes(estimates: Sequence[Estimate]) -> list[str]:
    """Notes shared by every estimate once; the others prefixed with their method."""
    if not estimates:
        return []
    common = set(estimates[0].notes)
    for e in estimates[1:]:
        common &= set(e.notes)
    out = [n for n in estimates[0].notes if n in common]
    for e in estimates:
        out += [f"{e.method}: {n}" for n in e.notes if n not in common]
    return out


def to_json(estimates: Sequence[Estimate], fits: Sequence[Fit] | None = None,
            errors: dict[str, str] | None = None) -> str:
    """All estimates (and fits) as one JSON document; sizes in bytes."""
    doc: dict[str, Any] = {"estimates": [e.to_dict() for e in estimates]}  # each with its phases and peak
    if fits is not None:
        doc["fits"] = [{"method": f.method, "budget": f.budget, "fits": f.fits, "max_batch": f.max_batch,
                        "max_seq": f.max_seq, "seq_capped": f.seq_capped, "error": f.error} for f in fits]
    if errors:
        doc["errors"] = dict(errors)
    return json.dumps(doc, indent=2, default=str)


def png(estimates: Sequence[Estimate], path: str | Path, budget: int | None = None, units: str = "GB",
        errors: dict[str, str] | None = None) -> Path:
    """A stacked bar per method: what is allocated at its peak, one colour per component (the peak
    phase under the bar), the total on top, the budget as a line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    big, _, big_name, _ = UNITS[units]
    errors = dict(errors or {})
    names = [e.method for e in estimates] + [m for m in errors if m not in {e.method for e in estimates}]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.5 * len(names) + 4.5), 5.6), dpi=130)
    bottoms = [0.0] * len(names)
    def at_peak(e: Estimate) -> dict[str, int]:
        return e.phases.get(e.peak_phase) or e.terms()

    used = [t for t in COMPONENTS if any(at_peak(e).get(t, 0) for e in estimates)]
    for t in used:
        values = [at_peak(e).get(t, 0) / big for e in estimates] + [0.0] * (len(names) - len(estimates))
        ax.bar(names, values, bottom=bottoms, color=COLORS[t], label=COMPONENT_LABELS[t], width=0.62,
               edgecolor="white", linewidth=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    top = max([*bottoms, (budget or 0) / big, 1e-9])
    for i, e in enumerate(estimates):
        ax.text(i, bottoms[i] + top * 0.012, f"{e.total / big:.1f} {big_name}", ha="center", va="bottom",
                fontsize=10, fontweight="bold")
    for i, m in enumerate(names[len(estimates):], start=len(estimates)):
        ax.text(i, top * 0.02, "n/a", ha="center", va="bottom", fontsize=10, color="#555555")
    if budget:
        ax.axhline(budget / big, color="#222222", linestyle="--", linewidth=1.2)
        ax.text(len(names) - 0.5, budget / big, f"  budget {budget / big:.1f} {big_name}", va="bottom", ha="right",
                fontsize=9, color="#222222")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n({by.peak_phase})" if (by := {e.method: e for e in estimates}.get(n)) and by.peak_phase
                        else n for n in names], fontsize=8.5)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel(f"peak memory per device ({big_name})")
    if estimates:
        title = describe(estimates[0])
        head, _, rest = title.partition(" | ")
        ax.set_title(f"{head}\n{rest}", fontsize=9.5)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
