"""Training curves from a fine-tuning run's ``metrics.jsonl``, and the run's HTML report."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence, Union

from ..io import read_jsonl
from .axes import value_axis
from .figures import plain_text, plt
from .html import esc, fig, fmt, page, table


def metric_series(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` for every numeric metric of the records, in first-seen order
    (training metrics, then ``lr``, then ``eval/...``)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        step = rec.get("step")
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(step))
            values.append(float(value))
    order = lambda k: (2 if k.startswith("eval/") else 1 if k == "lr" else 0)  # noqa: E731
    return {k: series[k] for k in sorted(series, key=order)}


@plain_text
def training_curves_figure(records: Sequence[dict[str, Any]], title: str):
    """One panel per metric over steps (log only where a metric spans a decade); evaluation
    metrics, measured every few steps, are drawn with markers."""
    series = metric_series(records)
    if not series:
        raise ValueError("no numeric metric in the records")
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (key, (steps, values)) in zip(axes.ravel(), series.items()):
        evaluation = key.startswith("eval/")
        ax.plot(steps, values, marker="o" if evaluation or len(steps) < 30 else None, ms=3,
                color="tab:orange" if evaluation else "tab:blue")
        value_axis(ax, values)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(series):]:
        ax.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def training_sections(out_dir: Union[str, os.PathLike], summary: dict[str, Any]) -> list[str]:
    """The summary table and the curves of the run in ``out_dir``."""
    records = read_jsonl(Path(out_dir) / "metrics.jsonl")
    parts = ["<h2>Run</h2>" + table(["field", "value"], [[esc(k), fmt(v)] for k, v in summary.items()
                                                         if not isinstance(v, (dict, list))])]
    final = summary.get("final_eval") or {}
    if final:
        parts.append("<h2>Final evaluation</h2>" + table(["metric", "value"], [[esc(k), fmt(v)] for k, v in final.items()]))
    if records:
        parts.append("<h2>Training curves (metrics.jsonl)</h2>")
        parts.append(fig(training_curves_figure(records, str(out_dir)), "training curves", "wide"))
    return parts


def render_training_report(out_dir: Union[str, os.PathLike], summary: dict[str, Any],
                           comparison: Sequence[str] = (), compared: Sequence[str] = ()) -> str:
    """The run's page: summary, curves, then ``comparison`` sections of the ``compared`` models
    (their labels, e.g. original and fine-tuned)."""
    title = f"vsink finetune — {summary.get('recipe', '')} {Path(out_dir).name}".strip()
    body = [f"<h1>{esc(title)}</h1>", *training_sections(out_dir, summary)]
    if comparison:
        names = list(compared) or ["the models"]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        body += [f"<h2>{esc(listed[0].upper() + listed[1:])}, side by side</h2>", *comparison]
    return page(title, body)
