"""The ``vsink ablate`` outputs: ``results.md`` (the table) and ``report.html`` (the table and one
figure per target x layer: the final patch norms, class-token attention and per-patch cosine to the
clean features of the image with the most selected tokens (``AblationResult.shown``), one row per ablation under the clean row); with dense metrics also
``dense.json``, ``dense.md`` and ``dense.html`` (:class:`vsink.evaluate.dense.DenseResult`'s own
files) and their headline table in ``report.html``; for an LVLM (:mod:`vsink.ablate_lvlm`) the
answers table (answers changed, yes/no flips, POPE with intervals, McNemar) in both."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..ablate import AblationResult, AblationRow
from ..ablate_lvlm import answers_markdown, pope_cell
from ..io import write_text
from ..outputs import OutputSet
from .axes import colorbar
from .figures import plain_text, plt
from .html import banner, esc, fig, fmt, page, table

POPE_KEYS = ("accuracy", "f1", "yes_ratio")
COLUMNS = ("target", "block", "ablation", "tokens", "channels", "cos cls", "cos registers", "cos patches",
           "min cos patch", "cls-attention TV (last block)", "high-norm before", "high-norm after",
           "max/median norm before", "max/median norm after")


def _with_interval(row: AblationRow, key: str) -> str:
    """A measure and, where it has one, its interval over the images: ``0.9812 [0.9750, 0.9871]``."""
    value = getattr(row, key)
    iv = row.intervals.get(key)
    text = str(value) if isinstance(value, int) else fmt(value)
    if iv is None or value is None:
        return text
    return f"{text} [{fmt(iv['low'])}, {fmt(iv['high'])}]"


def _cells(row: AblationRow) -> list[str]:
    channels = "all" if row.channels is None else ",".join(map(str, row.channels)) or "none"
    return [row.target, str(row.layer), row.ablation, str(row.tokens), channels, _with_interval(row, "cos_cls"),
            _with_interval(row, "cos_registers"), _with_interval(row, "cos_patches"), fmt(row.cos_patches_min),
            _with_interval(row, "attn_tv"), str(row.high_norm_before), _with_interval(row, "high_norm_after"),
            fmt(row.max_ratio_before), fmt(row.max_ratio_after)]


def attention_note(result: AblationResult) -> Optional[str]:
    """What the class-attention TV is when the model's attention rows do not sum to 1 (None when they do)."""
    attention = result.settings.get("attention") or {}
    if attention.get("rows_sum_to_one", True):
        return None
    return (f"Attention: {attention['variant']}, whose rows do not sum to 1: the cls-attention TV is half the L1 "
            "distance between the rows as computed (not renormalised), not bounded by 1.")


def interval_note(result: AblationResult) -> str:
    """What the bracketed intervals are (from the result's settings)."""
    iv = result.settings.get("intervals") or {}
    return (f"[low, high]: {iv.get('level', 0.95):.0%} percentile-bootstrap interval over the {len(result.images)} "
            f"image(s) ({iv.get('resamples', 1000)} resamples, seed {iv.get('seed', 0)}); none for minima and "
            "ratios of maxima (docs/ablate.md).")


DENSE_COLUMNS = ("target", "block", "channels", "tokens on the dense images", "high-norm threshold (ablation "
                 "images → dense images)")
#: what the dense-selection table is (HTML and Markdown)
DENSE_NOTE = ("Targets chosen on each dense image's own clean pass by the ablation run's detectors; the high-norm "
              "threshold fitted on the dense images (both splits pooled); means over the dense images, resample "
              "from another image of the same split (docs/ablate.md). results.json: dense_ablation.")


def dense_selection_rows(result: AblationResult) -> list[list[str]]:
    """Per target and block, the dense selection: channels, tokens per split, and (target
    high-norm) the detector's threshold at that block on the ablation images and on the dense images."""
    record = result.dense_ablation or {}
    rows = []
    for s in record.get("selections", []):
        channels = "all" if s["channels"] is None else ",".join(map(str, s["channels"])) or "none"
        per_split = ", ".join(f"{split} {n}" for split, n in s["tokens_per_split"].items())
        threshold = record["high_norm_threshold"].get(str(s["layer"]), {})
        fitted = (f"{fmt(threshold.get('ablation_images'))} → {fmt(threshold.get('dense_images'))}"
                  if s["target"] == "high-norm" else "—")
        rows.append([s["target"], str(s["layer"]), channels, f"{s['tokens']} ({per_split})", fitted])
    return rows


def render_ablation_markdown(result: AblationResult) -> str:
    """The results table as Markdown (and, with dense metrics, the targets on the dense images)."""
    lines = [f"# vsink ablate: {result.model}", "", f"{len(result.images)} image(s); layout {result.layout.describe()}",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("—", "-") for c in _cells(r)) + " |" for r in result.rows]
    lines += ["", interval_note(result)]
    if attention_note(result):
        lines += ["", attention_note(result)]
    if result.dense_ablation is not None:
        lines += ["", "## Targets on the dense images", "", DENSE_NOTE, "",
                  "| " + " | ".join(DENSE_COLUMNS) + " |", "|" + "---|" * len(DENSE_COLUMNS)]
        lines += ["| " + " | ".join(c.replace("—", "-") for c in row) + " |" for row in dense_selection_rows(result)]
        lines += ["", "Dense metrics: dense.md."]
    if result.answers is not None:
        lines += ["", "## LVLM answers", "", answers_note(result), "", answers_markdown(result.answers).rstrip("\n")]
    return "\n".join(lines) + "\n"


def answers_note(result: AblationResult) -> str:
    """What the answers table holds (from the answers' settings and statistics)."""
    answers = result.answers
    st = answers.statistics
    return (f"{answers.model}: {answers.questions} question(s), answered clean and with each ablation in its vision "
            f"tower (prompt {answers.settings['prompt']!r}, parser {answers.settings['parser']}). Answers changed: "
            "the answer text differs from the clean one; yes/no flips: the parsed answer does. POPE (mean over "
            f"splits, %): value [{st['level']:.0%} {st['method']} interval over {st['unit']}s, {st['resamples']} "
            f"resamples, seed {st['seed']}]; Δ: paired difference from the clean run [paired interval]; McNemar's "
            "exact test on the paired right/wrong outcomes (b: right only clean, c: right only ablated).")


@plain_text
def ablation_figure(result: AblationResult, target: str, layer: int):
    """One figure for ``target`` at ``layer``: a row for the clean pass, then one per ablation;
    columns final patch norms, class-token attention (last block), cosine to the clean features
    (the clean row's cell: the input image); one colour scale per quantity over the rows (norms
    and attention from 0, cosine -1 to 1)."""
    rows = [r for r in result.rows if r.target == target and r.layer == layer]
    grid = result.layout.grid
    clean = result.clean_maps
    has_attention = "cls_attention" in clean
    columns = ["final patch norm", *(["cls attention, last block"] if has_attention else []), "cosine to clean"]
    fig_, axes = plt.subplots(len(rows) + 1, len(columns), figsize=(3.2 * len(columns), 2.8 * (len(rows) + 1)),
                              squeeze=False)
    norm_max = max([float(clean["norms"].max())] + [float(r.maps["norms"].max()) for r in rows])
    attn_max = max([float(clean["cls_attention"].max())] + [float(r.maps["cls_attention"].max()) for r in rows]) \
        if has_attention else 1.0
    norm = ("viridis", "token norm (L2)")
    attention = ("magma", "attention share")
    panels: list[list[Optional[tuple[np.ndarray, float, float, tuple[str, str]]]]] = [
        [(clean["norms"], 0.0, norm_max, norm),
         *([(clean["cls_attention"], 0.0, attn_max, attention)] if has_attention else []), None]]
    for r in rows:
        panels.append([(r.maps["norms"], 0.0, norm_max, norm),
                       *([(r.maps["cls_attention"], 0.0, attn_max, attention)] if has_attention else []),
                       (r.maps["cos"], -1.0, 1.0, ("RdBu", "cosine"))])
    labels = ["clean"] + [r.ablation for r in rows]
    for i, (label, line) in enumerate(zip(labels, panels)):
        for j, panel in enumerate(line):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            free = panels[0][j] is None  # the clean row has no cosine: its cell shows the input image
            if i == 0:
                ax.set_title("input image" if free and "image" in clean else columns[j], fontsize=9)
            elif i == 1 and free:
                ax.set_title(columns[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            if panel is None:
                if "image" in clean:  # the clean row's free cell shows the input image
                    ax.imshow(clean["image"])
                else:
                    ax.axis("off")
                continue
            values, vmin, vmax, (cmap, quantity) = panel
            im = ax.imshow(np.asarray(values, dtype=float).reshape(grid), vmin=vmin, vmax=vmax, cmap=cmap)
            colorbar(ax, im, label=quantity)
    fig_.suptitle(f"{result.model}: {target} at block {layer} (image {result.images[result.shown]})", fontsize=10)
    return fig_


def render_ablation_report(result: AblationResult) -> str:
    """The HTML report: settings, the table, a figure per target x layer."""
    body = [f"<h1>vsink ablate: {esc(result.model)}</h1>"]
    if result.synthetic:
        body.append(banner("**Synthetic demo model.** Its register neurons and sinks are planted by construction "
                           "(docs/demo.md); the numbers say nothing about any real model."))
    body.append(f"<p>{len(result.images)} image(s), layout {esc(result.layout.describe())}; every ablation is "
                "compared with the clean pass over the same images (docs/ablate.md).</p>")
    body.append(table(COLUMNS, ([esc(c) for c in _cells(r)] for r in result.rows), left=3))
    body.append(f"<p>{esc(interval_note(result))}</p>")
    if attention_note(result):
        body.append(f"<p>{esc(attention_note(result))}</p>")
    seen: list[tuple[str, int]] = []
    for r in result.rows:
        if (r.target, r.layer) not in seen:
            seen.append((r.target, r.layer))
    if result.dense is not None:
        body += dense_section(result)
    if result.answers is not None:
        body += answers_section(result)
    for target, layer in seen:
        body.append(f"<h2>{esc(target)} at block {layer}</h2>")
        body.append(fig(ablation_figure(result, target, layer), f"{target} at block {layer}", "wide"))
    return page(f"vsink ablate {result.model}", body)


def dense_section(result: AblationResult) -> list[str]:
    """The dense metrics of the clean and each ablated model: headline values with their intervals
    and each ablation's paired difference from the clean model (the full page is dense.html)."""
    dense = result.dense
    names = list(dense.variants)
    rows = []
    for (label, values, decimals), (ivs, diffs) in zip(dense.headline(), dense.headline_intervals()):
        cells = [esc(label)]
        for i, value in enumerate(values):
            iv, diff = ivs[i], diffs[i]
            text = "—" if value is None else f"{value:.{decimals}f}"
            if iv is not None and value is not None:
                text += f" [{iv['low']:.{decimals}f}, {iv['high']:.{decimals}f}]"
            if diff is not None:
                text += f"; Δ {diff['value']:+.{decimals}f} [{diff['low']:+.{decimals}f}, {diff['high']:+.{decimals}f}]"
            cells.append(esc(text))
        rows.append(cells)
    return [f"<h2>Dense metrics under ablation</h2><p>{esc(dense.dataset['name'])}, "
            f"{dense.dataset['images_evaluated']} evaluation image(s); each ablated model is probed as a model of its "
            "own (docs/ablate.md). Value [interval]; Δ: paired difference from the clean model [interval]. All "
            "numbers: <a href=\"dense.html\">dense.html</a>.</p>",
            table(["metric", *names], rows, left=1),
            f"<p>{esc(DENSE_NOTE)}</p>",
            table(DENSE_COLUMNS, ([esc(c) for c in row] for row in dense_selection_rows(result)), left=3)]


def answers_section(result: AblationResult) -> list[str]:
    """The LVLM's answers clean and under each ablation: changes, flips, POPE with intervals, McNemar."""
    answers = result.answers
    head = ["target", "block", "ablation", "answers changed", "yes/no flips", "accuracy (%)", "F1 (%)",
            "yes-ratio (%)", "McNemar (b, c, p)"]
    rows = [["clean", "", "", "", "", *(esc(pope_cell(answers.clean, None, k)) for k in POPE_KEYS), ""]]
    for r in answers.rows:
        test = r.comparison.get("mcnemar", {}).get("all")
        rows.append([esc(r.target), str(r.layer), esc(r.ablation), f"{r.answers_changed}/{answers.questions}",
                     str(r.yes_no_flips), *(esc(pope_cell(r.pope, r.comparison, k)) for k in POPE_KEYS),
                     f"{test['b']}, {test['c']}, {test['p']:.3g}" if test else "—"])
    return ["<h2>LVLM answers under ablation</h2>", f"<p>{esc(answers_note(result))}</p>", table(head, rows, left=3)]


def save_ablation(result: AblationResult, out_dir: Union[str, os.PathLike]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``report.html`` into ``out_dir`` as one set with its
    ``vsink-run.json`` (:class:`vsink.outputs.OutputSet`): a failure leaves the earlier set as it was."""
    report = render_ablation_report(result)  # before anything is written
    markdown = render_ablation_markdown(result)
    summary = json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n"
    dense: dict[str, str] = {}
    if result.dense is not None:
        from ..evaluate.report import dense_html

        dense = {"dense.json": json.dumps(result.dense.to_json(), indent=2, allow_nan=False) + "\n",
                 "dense.md": result.dense.to_markdown(), "dense.html": dense_html(result.dense)}
    determining = {"model": result.model, "images": result.images, "settings": result.settings}
    with OutputSet(out_dir, "vsink ablate", {"determining": determining}) as stage:
        write_text(stage / "results.json", summary)
        write_text(stage / "results.md", markdown)
        write_text(stage / "report.html", report)
        for name, text in dense.items():
            write_text(stage / name, text)
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "report": out / "report.html"}
    if dense:
        paths.update({"dense": out / "dense.json", "dense_markdown": out / "dense.md", "dense_report": out / "dense.html"})
    return {**paths, "record": out / "vsink-run.json"}
