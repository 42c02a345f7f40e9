"""Markdown and HTML tables of a dense evaluation: every variant, with deltas against the baseline."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .dense import DenseResult


def _value(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def _delta(v: Optional[float], base: Optional[float]) -> str:
    if v is None or base is None:
        return ""
    d = v - base
    return f" ({'+' if d >= 0 else '−'}{_value(abs(d))})"


def _rows(result: "DenseResult") -> tuple[list[str], list[list[str]]]:
    names = list(result.variants)
    header = ["metric"] + [names[0]] + [f"{n} (Δ vs {names[0]})" for n in names[1:]]
    rows = []
    for label, values in result.headline():
        rows.append([label] + [_value(values[0])] + [_value(v) + _delta(v, values[0]) for v in values[1:]])
    return header, rows


def _lost_lines(result: "DenseResult") -> list[str]:
    lines = []
    for name, res in result.variants.items():
        lost = res.get("lost")
        if not lost:
            continue
        s = lost["setting"]
        lines.append(f"- **{name}**: stated setting block {s['layer']} {s['kind']}, bias {s['bias']:g}, "
                     f"normalize {s['normalize']}, k {lost['k']} → CorLoc {100 * lost['corloc']:.2f}% "
                     f"on {lost['n']} images")
        if len(lost["sweep"]) > 1:
            b = lost["best_on_eval_set"]
            lines.append(f"  - sweep ({len(lost['sweep'])} settings): best on the evaluation set block {b['layer']} "
                         f"{b['kind']}, bias {b['bias']:g}, normalize {b['normalize']} → {100 * b['corloc']:.2f}% "
                         "(chosen on the evaluation data: an upper bound, not a result)")
    return lines


def dense_markdown(result: "DenseResult") -> str:
    ds = result.dataset
    parts = [f"# vsink dense evaluation — `{result.model}`", ""]
    if result.model == "demo":
        parts += ["**Synthetic demo model** (planted high-norm tokens, see docs/demo.md): the numbers say "
                  "nothing about any real model.", ""]
    parts.append(f"Dataset: {ds['name']} [{ds['format']}], split `{ds['split']}` ({ds['images']} images)"
                 + (f", linear head trained on `{ds['train_split']}` ({ds['train_images']} images)"
                    if ds.get("train_split") and "linear-seg" in result.tasks else "")
                 + f"; input {result.settings['input_size'][0]}×{result.settings['input_size'][1]}; "
                 f"{len(result.skipped)} items skipped.")
    parts.append("")
    header, rows = _rows(result)
    parts.append("| " + " | ".join(header) + " |")
    parts.append("|" + "---|" * len(header))
    parts += ["| " + " | ".join(r) + " |" for r in rows]
    lost = _lost_lines(result)
    if lost:
        parts += ["", "LOST:"] + lost
    parts += ["", "Variants:"] + [f"- **{n}**: {r['description']}; layout {r.get('layout')}"
                                  for n, r in result.variants.items()]
    return "\n".join(parts) + "\n"


def dense_html(result: "DenseResult") -> str:
    from ..export.html import STYLE

    e = html.escape
    header, rows = _rows(result)
    table = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        table.append("<tr><th style='text-align:left'>" + e(r[0]) + "</th>"
                     + "".join(f"<td>{e(c)}</td>" for c in r[1:]) + "</tr>")
    table.append("</table>")
    md = dense_markdown(result).splitlines()
    notes = [line for line in md if line.startswith(("- ", "  - ", "Dataset:", "**Synthetic"))]
    body = "".join(f"<p>{e(line.lstrip('- ').replace('**', ''))}</p>" for line in notes)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vsink dense: {e(result.model)}</title>"
            f"<style>{STYLE}</style></head><body><h1>vsink dense evaluation — <code>{e(result.model)}</code></h1>"
            + "".join(table) + body + "</body></html>")
