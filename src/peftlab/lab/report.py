"""Bench report: terminal table, report.md, a self-contained report.html, and PNG plots."""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

MB = 1024 * 1024

COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("method", "method", lambda a: a["label"]),
    ("trainable", "trainable params", lambda a: f"{a['trainable']:,.0f}"),
    ("% base", "% of base", lambda a: f"{a['percent']:.3f}"),
    ("s/step", "s / step", lambda a: _pm(a, "seconds_per_step", "{:.3f}")),
    ("tok/s", "tokens / s", lambda a: _pm(a, "tokens_per_second", "{:,.0f}")),
    ("train MB", "peak train memory (MB)", lambda a: _pm(a, "peak_train_rss", "{:,.0f}", MB)),
    ("score", "score", lambda a: _pm(a, "score", "{:.4f}")),
    ("vs full", "score / full", lambda a: f"{a['relative']:.3f}" if a.get("relative") is not None else "-"),
    ("b1 ms", "latency b1 (ms) unmerged / merged", lambda a: _lat(a, 1)),
    ("b8 ms", "latency b8 (ms) unmerged / merged", lambda a: _lat(a, 8)),
    ("infer MB", "peak inference memory (MB)", lambda a: _pm(a, "peak_infer_rss", "{:,.0f}", MB)),
    ("ckpt MB", "checkpoint (MB)", lambda a: f"{a['checkpoint_bytes'] / MB:,.2f}"),
]


def _pm(a: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    vals = a["values"].get(key) or []
    if not vals:
        return "-"
    mean = statistics.fmean(vals) / scale
    if len(vals) > 1:
        return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(vals) / scale)}"
    return fmt.format(mean)


def _lat(a: dict[str, Any], b: int) -> str:
    un = a["values"].get(f"latency_ms_b{b}_unmerged") or a["values"].get(f"latency_ms_b{b}")
    me = a["values"].get(f"latency_ms_b{b}_merged")
    if not un:
        return "-"
    text = f"{statistics.fmean(un):.1f}"
    return f"{text} / {statistics.fmean(me):.1f}" if me else text


NUMERIC = ("trainable", "percent", "seconds_per_step", "tokens_per_second", "peak_train_rss", "score",
           "latency_ms_b1", "latency_ms_b8", "latency_ms_b1_unmerged", "latency_ms_b8_unmerged",
           "latency_ms_b1_merged", "latency_ms_b8_merged", "peak_infer_rss", "checkpoint_bytes", "train_rss_over_start")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, implementation): values over seeds, score relative to full."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[(r["method"], r["impl"])].append(r)
    full = [r["score"] for r in groups.get(("full", "peftlab"), [])]
    full_score = statistics.fmean(full) if full else None
    out = []
    for (method, impl), rs in groups.items():
        values = {k: [r[k] for r in rs if r.get(k) is not None] for k in NUMERIC}
        score = statistics.fmean(values["score"])
        out.append({
            "method": method, "impl": impl, "label": method if impl == "peftlab" else f"{method} (peft)",
            "seeds": [r["seed"] for r in rs], "values": values,
            "trainable": statistics.fmean(values["trainable"]), "percent": statistics.fmean(values["percent"]),
            "checkpoint_bytes": statistics.fmean(values["checkpoint_bytes"]),
            "score": score, "relative": score / full_score if full_score else None,
            "metric": rs[0].get("metric"), "history": rs[0].get("history", []), "evals": rs[0].get("evals", []),
            "overfitting": any(r.get("overfitting") for r in rs),
        })
    order = {"full": 0}
    return sorted(out, key=lambda a: (order.get(a["method"], 1), a["method"], a["impl"] != "peftlab"))


def peer_ratios(agg: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """peftlab / peft for every method measured both ways (lower is better except score)."""
    by = {(a["method"], a["impl"]): a for a in agg}
    out = []
    for (method, impl), a in by.items():
        peer = by.get((method, "peft"))
        if impl != "peftlab" or peer is None:
            continue

        def ratio(key: str) -> float | None:
            x, y = a["values"].get(key), peer["values"].get(key)
            return statistics.fmean(x) / statistics.fmean(y) if x and y and statistics.fmean(y) else None

        out.append({"method": method, "step_time": ratio("seconds_per_step"), "peak_memory": ratio("peak_train_rss"),
                    "score": ratio("score"), "latency_b1_unmerged": ratio("latency_ms_b1_unmerged"),
                    "latency_b1_merged": ratio("latency_ms_b1_merged"),
                    "latency_b8_unmerged": ratio("latency_ms_b8_unmerged")})
    return out


def guidance(agg: list[dict[str, Any]]) -> list[str]:
    """Plain-language picks drawn from the measured numbers."""
    ours = [a for a in agg if a["impl"] == "peftlab"]
    if not ours:
        return []
    lines = []
    best = max(ours, key=lambda a: a["score"])
    lines.append(f"Best score: **{best['label']}** ({best['metric']} {best['score']:.4f}).")
    peft_like = [a for a in ours if a["method"] != "full" and a.get("relative") is not None]
    good = [a for a in peft_like if a["relative"] >= 0.97]
    if good:
        cheap = min(good, key=lambda a: a["trainable"])
        lines.append(f"Fewest trainable parameters within 3% of full fine-tuning: **{cheap['label']}** "
                     f"({cheap['percent']:.3f}% of base, score {cheap['relative']:.3f}x full).")
    elif peft_like:
        top = max(peft_like, key=lambda a: a["relative"])
        lines.append(f"No method reached 97% of full fine-tuning at this budget; closest: **{top['label']}** "
                     f"({top['relative']:.3f}x). Train longer (`--profile full`) before concluding.")
    mem = [a for a in ours if a["values"].get("peak_train_rss")]
    if mem:
        low = min(mem, key=lambda a: statistics.fmean(a["values"]["peak_train_rss"]))
        lines.append(f"Lowest peak training memory: **{low['label']}** "
                     f"({statistics.fmean(low['values']['peak_train_rss']) / MB:,.0f} MB).")
    merged = [a for a in ours if a["values"].get("latency_ms_b1_merged")]
    if merged:
        lines.append("Mergeable methods (" + ", ".join(a["label"] for a in merged) + ") add no inference "
                     "latency once merged; serving many tasks from one base favours small checkpoints and "
                     "switching adapters unmerged.")
    over = [a["label"] for a in ours if a["overfitting"]]
    if over:
        lines.append("Overfitting flagged (training loss falling while validation loss rose) for: "
                     + ", ".join(over) + ".")
    return lines


def terminal_table(rows: list[dict[str, Any]]) -> str:
    agg = aggregate(rows)
    if not agg:
        return "(no finished methods yet)"
    header = [c[0] for c in COLUMNS]
    body = [[fn(a) for _, _, fn in COLUMNS] for a in agg]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    ratios = peer_ratios(agg)
    if ratios:
        lines.append("\npeftlab / peft (same run; < 1 is better for time, memory and latency):")
        for r in ratios:
            lines.append(f"  {r['method']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                          if k != "method" and v is not None))
    return "\n".join(lines)


def _budget(row: dict[str, Any]) -> str:
    b = row.get("budget")
    if not b:
        return ""
    return (f" ({b['steps']} steps x batch {b['batch_size']}, {b['max_length']} tokens, "
            f"{b['test_examples'] or 'all'} test examples, {len(b['seeds'])} seed(s))")


def _markdown(agg: list[dict[str, Any]], rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    first = next((r for r in rows if "error" not in r), rows[0] if rows else {})
    env = first.get("env", {})
    out = [f"# peftlab bench: {first.get('model', '?')} on {first.get('task', '?')}", "",
           f"Profile `{first.get('profile', '?')}`{_budget(first)}; machine: {env.get('device', '?')}, {env.get('cpus', '?')} CPUs, "
           f"{env.get('threads', '?')} threads, torch {env.get('torch', '?')}. Score is the test-split "
           f"`{agg[0]['metric'] if agg else '?'}`; full fine-tuning is the 1.0 reference. Times and memory are from "
           "this machine; compare methods by their ratios in this run.", ""]
    out.append("| " + " | ".join(c[1] for c in COLUMNS) + " |")
    out.append("|" + "---|" * len(COLUMNS))
    for a in agg:
        out.append("| " + " | ".join(fn(a) for _, _, fn in COLUMNS) + " |")
    ratios = peer_ratios(agg)
    if ratios:
        out += ["", "## peftlab / peft (same run)", "",
                "| method | step time | peak memory | score | latency b1 unmerged | latency b1 merged | latency b8 unmerged |",
                "|---|---|---|---|---|---|---|"]
        for r in ratios:
            out.append(f"| {r['method']} | " + " | ".join("-" if r[k] is None else f"{r[k]:.3f}" for k in
                       ("step_time", "peak_memory", "score", "latency_b1_unmerged", "latency_b1_merged",
                        "latency_b8_unmerged")) + " |")
    g = guidance(agg)
    if g:
        out += ["", "## Guidance", ""] + [f"- {line}" for line in g]
    errors = [r for r in rows if "error" in r]
    if skipped or errors:
        out += ["", "## Not measured", ""]
        out += [f"- {m}: does not apply ({why})" for m, why in skipped.items()]
        out += [f"- {r['method']} ({r['impl']}, seed {r['seed']}): failed: {r['error'].splitlines()[-1]}"
                for r in errors]
    out += ["", "## Plots", "", "![score vs trainable parameters](score_vs_params.png)",
            "![score vs peak memory](score_vs_memory.png)", "![inference latency](latency.png)",
            "![loss curves](loss_curves.png)", ""]
    return "\n".join(out)


def _plots(run_dir: Path, agg: list[dict[str, Any]]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    colors = {a["label"]: f"C{i}" for i, a in enumerate(agg)}

    def scatter(name: str, xkey: Callable[[dict[str, Any]], float], xlabel: str, logx: bool) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for a in agg:
            ax.scatter(xkey(a), a["score"], s=60, color=colors[a["label"]], label=a["label"])
            ax.annotate(a["label"], (xkey(a), a["score"]), textcoords="offset points", xytext=(6, 4), fontsize=9)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {agg[0]['metric']}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        paths.append(run_dir / name)

    scatter("score_vs_params.png", lambda a: max(a["trainable"], 1), "trainable parameters (log)", True)
    mem = [a for a in agg if a["values"].get("peak_train_rss")]
    if mem:
        scatter("score_vs_memory.png", lambda a: statistics.fmean(a["values"]["peak_train_rss"]) / MB
                if a["values"].get("peak_train_rss") else 0.0, "peak training memory (MB)", False)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(agg) + 2), 4.2))
    kinds = [("b1 unmerged", "latency_ms_b1_unmerged", "latency_ms_b1"), ("b1 merged", "latency_ms_b1_merged", None),
             ("b8 unmerged", "latency_ms_b8_unmerged", "latency_ms_b8"), ("b8 merged", "latency_ms_b8_merged", None)]
    width = 0.8 / len(kinds)
    for j, (label, key, alt) in enumerate(kinds):
        vals = []
        for a in agg:
            v = a["values"].get(key) or (a["values"].get(alt) if alt else None)
            vals.append(statistics.fmean(v) if v else 0.0)
        ax.bar([i + j * width for i in range(len(agg))], vals, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(agg))], [a["label"] for a in agg], rotation=20)
    ax.set_ylabel("forward latency (ms, median)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "latency.png", dpi=110)
    plt.close(fig)
    paths.append(run_dir / "latency.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in agg:
        h = a["history"]
        if h:
            ax1.plot([x["step"] for x in h], [x["loss"] for x in h], color=colors[a["label"]], label=a["label"],
                     alpha=0.8)
        ev = [e for e in a["evals"] if "val_loss" in e]
        if ev:
            ax2.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", color=colors[a["label"]],
                     label=a["label"])
    ax1.set_title("training loss")
    ax2.set_title("validation loss")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=110)
    plt.close(fig)
    paths.append(run_dir / "loss_curves.png")
    return paths


def _html(markdown_text: str, run_dir: Path, agg: list[dict[str, Any]]) -> str:
    """A self-contained page: the tables as HTML, the plots inlined as base64 PNG."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>peftlab bench</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}",
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}",
             "img{max-width:100%;border:1px solid #eee;margin:8px 0}code{background:#f5f5f5}</style></head><body>"]
    in_table = False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                parts.append("<table>")
                parts.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
                in_table = True
                continue
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            parts.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            path = run_dir / name
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        elif line.startswith("# "):
            parts.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            parts.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            parts.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            parts.append(f"<p>{_inline(line)}</p>")
    if in_table:
        parts.append("</table>")
    parts.append("<script type='application/json' id='results'>"
                 + html.escape(json.dumps([{k: v for k, v in a.items() if k not in ('history', 'evals')}
                                           for a in agg])) + "</script></body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    out = html.escape(text)
    while "**" in out:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    while "`" in out:
        out = out.replace("`", "<code>", 1).replace("`", "</code>", 1)
    return out


def write(run_dir: Path, rows: list[dict[str, Any]], skipped: dict[str, str] | None = None,
          plots: bool = True) -> None:
    """(Re)write report.md, and with ``plots`` report.html and the PNGs, from the rows so far.

    The bench refreshes report.md after every method (cheap) and draws the plots once at the
    end or on interruption (about 2 s each time).
    """
    run_dir = Path(run_dir)
    agg = aggregate(rows)
    if not agg:
        return
    md = _markdown(agg, rows, skipped or {})
    (run_dir / "report.md").write_text(md)
    if not plots:
        return
    _plots(run_dir, agg)
    (run_dir / "report.html").write_text(_html(md, run_dir, agg))
