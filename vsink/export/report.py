"""The self-contained HTML report of a scan (inline PNGs, no external assets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .figures import overlay_png, ratio_curve_png
from .html import banner, esc, fig, fmt, img, page, table
from .layer_figures import (head_grid_figure, heatmap_figure, massive_figure, norm_histograms_figure,
                            norm_small_multiples_figure, sink_share_by_head)
from .scales import shared_scale

from ..detect import AttentionSink
from .views import ScanView

SYNTHETIC_NOTE = ("**Synthetic demo model.** Its high-norm tokens are planted by construction (see docs/demo.md); "
                  "the numbers say nothing about any real model.")


@dataclass
class SinkGroup:
    """One token of one image that is a sink in one or more blocks."""

    image: int
    token: int
    kind: str
    row: "int | None"
    col: "int | None"
    layers: list[int]
    peak_layer: int
    peak_share: float
    peak_ratio: float


def group_sinks(sinks: Sequence["AttentionSink"], limit: int = 30, per_image: int = 4) -> tuple[list[SinkGroup], int]:
    """Sinks grouped by (image, token) over blocks, strongest peak share first, at most
    ``per_image`` tokens of one image and ``limit`` rows; returns the rows and how many groups
    were left out."""
    groups: dict[tuple[int, int], SinkGroup] = {}
    for s in sinks:
        g = groups.get((s.image, s.token))
        if g is None:
            groups[(s.image, s.token)] = SinkGroup(s.image, s.token, s.kind, s.row, s.col, [s.layer], s.layer,
                                                   s.share, s.ratio)
            continue
        g.layers.append(s.layer)
        if s.share > g.peak_share:
            g.peak_layer, g.peak_share, g.peak_ratio = s.layer, s.share, s.ratio
    ordered = sorted(groups.values(), key=lambda g: -g.peak_share)
    shown: list[SinkGroup] = []
    per: dict[int, int] = {}
    for g in ordered:
        if len(shown) < limit and per.get(g.image, 0) < per_image:
            shown.append(g)
            per[g.image] = per.get(g.image, 0) + 1
    return shown, len(ordered) - len(shown)


def layer_ranges(layers: Sequence[int]) -> str:
    """``[3, 4, 5, 8]`` → ``"3–5, 8"``."""
    out: list[str] = []
    values = sorted(set(layers))
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def sinks_table(result: ScanView) -> str:
    shown, left_out = group_sinks(result.sinks)
    if not shown:
        return "<p>No attention sink in any block.</p>"
    rows = [[esc(result.images[g.image]), str(g.token), g.kind, f"{g.row},{g.col}" if g.row is not None else "—",
             layer_ranges(g.layers), str(g.peak_layer), f"{g.peak_share:.4f}", f"{g.peak_ratio:.1f}"] for g in shown]
    note = (f"<p class='muted'>{len(result.sinks)} (image, token, block) entries in {len(shown) + left_out} "
            f"tokens; shown: the strongest, at most 4 tokens per image"
            + (f"; {left_out} more tokens in scan.json" if left_out else "") + ".</p>")
    return table(["image", "token", "kind", "row,col", "sink in blocks", "peak block", "peak share", "× median"],
                 rows) + note


def massive_section(result: ScanView) -> list[str]:
    trace, threshold = result.trace, result.settings.get("massive_ratio", 100.0)
    if trace.massive_values is None:
        return []
    parts = ["<h2>Massive activations</h2>",
             f"<p>Top |activations| of each block output (Sun et al. 2024); an activation is massive at "
             f"≥ {threshold:g}× the block output's median |activation|. {len(result.massive)} massive entries.</p>",
             fig(massive_figure(trace, result.massive, threshold, "all images"), "massive activations", "wide")]
    by_dim: dict[int, list] = {}
    for m in result.massive:
        by_dim.setdefault(m.dim, []).append(m)
    if by_dim:
        rows = []
        for dim, found in sorted(by_dim.items(), key=lambda kv: -max(m.ratio for m in kv[1])):
            kinds = sorted({m.kind for m in found})
            rows.append([str(dim), layer_ranges([m.layer for m in found]), ", ".join(kinds),
                         str(len({(m.image, m.token) for m in found})), f"{max(m.ratio for m in found):.0f}",
                         f"{max(found, key=lambda m: m.ratio).value:.4g}"])
        parts.append(table(["dim", "blocks", "token kinds", "(image, token) pairs", "max × median", "value"], rows))
    return parts


def per_head_section(result: ScanView) -> list[str]:
    trace = result.trace
    if trace.attn_received is None:
        return []
    layers = list(trace.layers)
    share = sink_share_by_head(trace, result.sinks)
    parts = ["<h2>Per head</h2>",
             "<p>Left: the attention each head gives to the sinks of its block (mean over queries and images). "
             "Right: attention entropy per head (nats, mean over queries and images).</p><div class='grid'>",
             fig(heatmap_figure(share, layers, title="sink share, block × head", label="attention on sinks",
                                vmin=0.0, vmax=max(float(share.max()), 1e-6)), "sink share per head")]
    if trace.attn_entropy is not None:
        parts.append(fig(heatmap_figure(trace.attn_entropy.mean(axis=1), layers, title="attention entropy",
                                        label="nats", cmap="cividis"), "entropy per head"))
    parts.append("</div>")
    return parts


def _subset(result: ScanView) -> str:
    """A sentence naming the images drawn ("Shown: the first 12 of 40 images ...") when the report
    draws fewer images than it scanned, else nothing."""
    shown, total = len(result.thumbnails), len(result.images)
    if shown >= total:
        return ""
    return (f" Shown: the first {shown} of {total} images (every image is in the per-image table; "
            "<code>vsink maps</code> draws all of them).")


#: images in the per-head grid
HEAD_GRID_IMAGES = 4


def norm_maps_section(result: ScanView) -> list[str]:
    trace, layout = result.trace, result.layout
    if trace.norms is None or not result.thumbnails:
        return []
    grids = [{layer: layout.patch_grid(trace.norms[pos, i], dim=0) for pos, layer in enumerate(trace.layers)}
             for i in range(len(result.thumbnails))]
    scale = shared_scale([g for per in grids for g in per.values()], zero=False, label="token norm (L2)")
    parts = ["<h2>Norm maps at every block</h2>",
             f"<p>Patch-token norms on one colour scale for every block and image ({scale.vmin:.4g}–"
             f"{scale.vmax:.4g}), so growth with depth and differences between images show; a panel whose own "
             "range is under 1 % of its values says <i>flat</i>. Each map covers the region of the image the "
             "model saw. Class tokens and registers are not on the grid (their norms are in the table above)."
             + _subset(result) + "</p>"]
    for i, thumb in enumerate(result.thumbnails):
        parts.append(fig(norm_small_multiples_figure(thumb, grids[i], result.images[i], scale.vmin, scale.vmax),
                         f"norm maps: {result.images[i]}", "wide"))
    return parts


def head_grid_section(result: ScanView) -> list[str]:
    """Per head, the last block's class-token attention (received attention without a class
    token) for the first images, on one scale from 0."""
    trace, layout = result.trace, result.layout
    source, what = ((trace.attn_cls, "attention from the class token (share)") if trace.attn_cls is not None
                    and layout.num_cls else (trace.attn_received, "attention received (share, mean over queries)"))
    if source is None or not result.thumbnails:
        return []
    shown = min(HEAD_GRID_IMAGES, len(result.thumbnails))
    pos, layer = len(trace.layers) - 1, trace.layers[-1]
    grids = [layout.patch_grid(source[pos, i], dim=1) for i in range(shown)]
    scale = shared_scale(grids, zero=True, label=what)
    more = (f" (the first {shown} of {len(result.images)} images)" if shown < len(result.images) else "")
    return [f"<h2>Per-head attention, block {layer}</h2>",
            f"<p>{esc(what.capitalize())}, each head on its own; one scale from 0 for all heads and "
            f"images{more}.</p>",
            fig(head_grid_figure(result.thumbnails[:shown], grids, result.images[:shown], scale,
                                 f"block {layer}: {what} per head"), "attention per head", "wide")]


def per_image_section(result: ScanView) -> list[str]:
    rows = []
    for entry in result.per_image():
        box = entry.get("view_box")
        rows.append([esc(entry["image"]), "×".join(str(v) for v in entry["size"]) if "size" in entry else "—",
                     ", ".join(f"{v:g}" for v in box) if box else "—", str(entry["high_norm_tokens"]),
                     str(entry["high_norm_entries"]), layer_ranges(entry["high_norm_layers"])
                     if entry["high_norm_layers"] else "—", fmt(entry["max_norm"]), str(entry["sink_tokens"]),
                     str(entry["sink_entries"])])
    return ["<h2>Per image</h2>",
            "<p>High-norm tokens: distinct tokens at the emergence block; entries: (token, block) pairs over "
            "all blocks. Sinks likewise. View box: the region of the image the model saw (x0, y0, x1, y1 in "
            "its pixels).</p>",
            table(["image", "size", "view box", "high-norm tokens", "entries", "in blocks", "max norm",
                   "sink tokens", "sink entries"], rows)]


def defect_section(comparison: Any) -> list[str]:
    """``scan --defect``: per block the |cos| of the weight-only defect direction with the observed
    high-norm direction, the tokens that direction was averaged over, the verdict and the
    linearised map's top singular value (none without a comparison)."""
    if comparison is None:
        return []
    d = comparison.defect
    rows = [[fmt(i), fmt(c), fmt(n), esc(comparison.verdict(i)), fmt(float(d.singular_values[i]))]
            for i, (c, n) in enumerate(zip(comparison.cosines, comparison.tokens))]
    disagreeing = comparison.disagreeing
    note = (f"Disagrees at blocks {', '.join(map(str, disagreeing))}: the artifacts there are not written along the "
            "linearised weights' direction (a gated or thresholded mechanism; docs/defect.md)." if disagreeing
            else "No block with high-norm tokens disagrees.")
    return [f"<h2>Weight-only defect direction (SINDER)</h2><p>{d.samples} Gaussian samples per block, seed "
            f"{d.seed}{', cached' if d.cached else ''}; |cos| with the observed high-norm direction (unit mean of the "
            f"flagged tokens' unit residuals), agreement at |cos| ≥ {comparison.threshold:g}. {esc(note)}</p>"
            + table(["block", "|cos|", "high-norm tokens", "verdict", "top singular value"], rows, left=3)]


def render_scan_report(result: ScanView) -> str:
    """Return the report as one HTML string."""
    trace, hn, layout = result.trace, result.high_norm, result.layout
    parts = [f"<h1>vsink scan — <code>{esc(result.model)}</code></h1>"]
    if result.synthetic:
        parts.append(banner(SYNTHETIC_NOTE))
    emergence = (f"first outliers at block <b>{hn.emergence_layer}</b>" if hn.emergence_layer is not None
                 else "<b>no outlier token in any block</b>")
    parts.append(f"<p>Layout: {esc(layout.describe())}; input {result.input_size[0]}×{result.input_size[1]}; "
                 f"{len(result.images)} image{'s' if len(result.images) != 1 else ''} scanned, "
                 f"{len(result.skipped)} skipped. Threshold method: <code>{esc(hn.method)}</code>; {emergence}. "
                 f"Outlier tokens (all blocks): {len(hn.outliers)}. Sink entries: {len(result.sinks)}. "
                 f"Massive activations: {len(result.massive)}.</p>")
    if result.settings.get("edits"):
        parts.append("<p>Forward edits applied: " + ", ".join(f"<code>{esc(x)}</code>" for x in result.settings["edits"])
                     + ". Appended registers are excluded from the patch statistics and maps.</p>")

    layers = [s.index for s in hn.layers]
    parts.append("<h2>Norm ratio per block</h2>")
    parts.append(img(ratio_curve_png(layers, [s.ratio for s in hn.layers], hn.emergence_layer,
                                     "max / median patch norm"), "ratio curve"))
    parts.append("<h2>Patch-norm histograms at every block</h2>")
    parts.append(fig(norm_histograms_figure([layout.patches(trace.norms[pos], dim=1) for pos in range(len(layers))],
                                            layers, [n.threshold for n in hn.layers], hn.emergence_layer),
                     "histograms", "wide"))

    rows = []
    for n, a in zip(hn.layers, result.attention):
        rows.append([fmt(v) for v in (
            n.index, n.median, n.max, n.ratio, n.threshold, n.outliers, 100 * n.outlier_fraction, n.cls,
            max(n.registers) if n.registers else None,
            a["cls_received"], a["register_received"], a["max_patch_received"], a["entropy"])])
    parts.append("<h2>Blocks</h2>" + table(
        ["block", "median", "max", "ratio", "threshold", "outliers", "outlier %", "cls norm", "max reg norm",
         "cls recv", "reg recv", "max patch recv", "entropy"], rows, left=0))

    parts += defect_section(getattr(result, "defect", None))
    parts += per_image_section(result)
    parts += massive_section(result)
    parts += per_head_section(result)
    parts += norm_maps_section(result)
    parts += head_grid_section(result)

    if trace.attn_received is not None and result.thumbnails:
        last = list(range(max(0, len(layers) - 2), len(layers)))
        shares = {(i, pos): trace.attn_received[pos, i].mean(axis=0)
                  for i in range(len(result.thumbnails)) for pos in last}
        scale = shared_scale([layout.patch_grid(v, dim=0) for v in shares.values()], zero=True,
                             label="attention received (share, mean over queries)")
        parts.append("<h2>Attention received (head mean), last blocks</h2>"
                     f"<p>One colour scale from 0 for every panel.{_subset(result)}</p><div class='grid'>")
        for (i, pos), share in shares.items():
            grid = layout.patch_grid(share, dim=0)
            prefix = share[layout.non_patch_indices()].sum()
            parts.append(img(overlay_png(result.thumbnails[i], grid, f"{Path(result.images[i]).name} — received, block "
                                         f"{layers[pos]} (cls+registers: {prefix:.2f})", cmap="viridis",
                                         scale=scale), f"received, block {layers[pos]}: {result.images[i]}"))
        parts.append("</div>")

    parts.append("<h2>Strongest sinks</h2>" + sinks_table(result))
    if result.skipped:
        parts.append("<h2>Skipped</h2><ul>" + "".join(
            f"<li><code>{esc(s['image'])}</code>: {esc(s['reason'])}</li>" for s in result.skipped) + "</ul>")
    return page(f"vsink scan: {result.model}", parts)

