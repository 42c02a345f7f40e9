"""One side-by-side report of several scans of the same images (before / after a fix, an original
and a fine-tuned model): every per-block curve of all runs on one shared axis, maps of all runs
on one colour scale, PCA of patch features, and a table of deltas against the first run."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from .figures import layer_curves_figure, norm_histogram_figure
from .html import banner, delta, esc, fig, fmt, page, table
from .layer_figures import heatmap_figure, norm_small_multiples_figure, sink_share_by_head
from .pca import pca_figure
from .report import SYNTHETIC_NOTE
from .scales import shared_scale
from .views import ScanView

#: images shown as norm-map rows and PCA rows
MAX_IMAGES = 4


def summary(result: ScanView) -> dict[str, Optional[float]]:
    """The headline numbers of one scan (the comparison table's rows)."""
    hn = result.high_norm
    regs = [a["register_received"] for a in result.attention]
    return {"emergence block": hn.emergence_layer, "outlier tokens": len(hn.outliers),
            "max outlier % (a block)": max(100 * s.outlier_fraction for s in hn.layers),
            "max / median patch norm (max over blocks)": max(s.ratio for s in hn.layers),
            "attention on registers (max over blocks)": max(regs) if regs else None,
            "attention on class token (last block)": result.attention[-1]["cls_received"] if result.attention else None,
            "sink entries": len(result.sinks), "massive activations": len(result.massive)}


def _curves(runs: Mapping[str, ScanView], key, ylabel: str, title: str, floor: Optional[float] = None,
            marks: bool = False) -> str:
    series = {label: ([s.index for s in r.high_norm.layers], [key(r, i) for i in range(len(r.high_norm.layers))])
              for label, r in runs.items()}
    mark = {label: r.high_norm.emergence_layer for label, r in runs.items()} if marks else None
    return fig(layer_curves_figure(series, ylabel=ylabel, title=title, floor=floor, marks=mark), title)


def comparison_sections(runs: Mapping[str, ScanView],
                        pca: Optional[Mapping[str, Mapping[int, np.ndarray]]] = None,
                        pca_images: Optional[Sequence[Image.Image]] = None) -> list[str]:
    """The HTML sections comparing ``runs`` (label → scan of the same images, the first is the
    reference of the deltas); ``pca``: label → {block: features [images, h, w, D]} of ``pca_images``."""
    labels = list(runs)
    first = runs[labels[0]]
    parts: list[str] = []
    if any(r.synthetic for r in runs.values()):
        parts.append(banner(SYNTHETIC_NOTE))
    rows = []
    sums = {label: summary(r) for label, r in runs.items()}
    for metric in sums[labels[0]]:
        cells = [esc(metric), fmt(sums[labels[0]][metric])]
        for label in labels[1:]:
            value = sums[label][metric]
            cells.append(fmt(value))
            if "emergence" not in metric:
                cells.append(delta(value, sums[labels[0]][metric], lower_is_better="registers" not in metric))
            else:
                cells.append("<span class='muted'>—</span>")
        rows.append(cells)
    header = ["metric", esc(labels[0])] + [h for label in labels[1:] for h in (esc(label), f"Δ vs {esc(labels[0])}")]
    parts.append("<h2>Summary</h2>" + table(header, rows))
    parts.append("<p>" + "; ".join(f"<b>{esc(label)}</b>: <code>{esc(r.model)}</code>, {esc(r.layout.describe())}"
                                   + (f", edits {esc(', '.join(r.settings.get('edits', [])))}"
                                      if r.settings.get("edits") else "") for label, r in runs.items())
                 + f"; {len(first.images)} images.</p>")

    parts.append("<h2>Per block, all runs on one axis</h2><div class='grid'>")
    parts.append(_curves(runs, lambda r, i: r.high_norm.layers[i].ratio, "max / median patch norm",
                         "norm ratio per block", floor=1.0, marks=True))
    parts.append(_curves(runs, lambda r, i: 100 * r.high_norm.layers[i].outlier_fraction, "outlier patches (%)",
                         "outlier patches per block", floor=0.0))
    if first.trace.attn_received is not None:
        parts.append(_curves(runs, lambda r, i: r.attention[i]["register_received"] + r.attention[i]["cls_received"],
                             "attention share", "attention on class token + registers", floor=0.0))
        parts.append(_curves(runs, lambda r, i: r.attention[i]["max_patch_received"], "attention share",
                             "attention on the top patch", floor=0.0))
    parts.append("</div>")

    focus = first.high_norm.emergence_layer if first.high_norm.emergence_layer is not None else first.trace.layers[-1]
    norms, thresholds = {}, {}
    for label, r in runs.items():
        pos = r.trace.layers.index(focus)
        norms[label] = r.layout.patches(r.trace.norms[pos], dim=1)
        thresholds[label] = r.high_norm.layers[pos].threshold
    parts.append(f"<h2>Patch-norm histogram, block {focus}</h2>")
    parts.append(fig(norm_histogram_figure(norms, thresholds, f"block {focus}, shared bins"), "histograms"))

    if first.trace.attn_received is not None:
        shares = {label: sink_share_by_head(r.trace, r.sinks) for label, r in runs.items()}
        top = max(max(float(s.max()) for s in shares.values()), 1e-6)
        parts.append("<h2>Sink share per block and head (one colour scale)</h2><div class='grid'>")
        for label, share in shares.items():
            parts.append(fig(heatmap_figure(share, runs[label].trace.layers, title=f"{label}: sink share",
                                            label="attention on sinks", vmin=0.0, vmax=top), f"{label} sink share"))
        parts.append("</div>")

    parts += _per_image_table(runs)
    shown = min(MAX_IMAGES, len(first.thumbnails))
    subset = (f"the first {shown} of {len(first.images)} images (every image is in the per-image table above)"
              if shown < len(first.images) else f"all {len(first.images)} images")
    grids = {(i, label): {layer: r.layout.patch_grid(r.trace.norms[pos, i], dim=0)
                          for pos, layer in enumerate(r.trace.layers)}
             for i in range(shown) for label, r in runs.items()}
    scale = shared_scale([g for per in grids.values() for g in per.values()], zero=False, label="token norm (L2)")
    parts.append("<h2>Norm maps at every block</h2>"
                 f"<p>One colour scale for every run, block and image ({scale.vmin:.4g}–{scale.vmax:.4g}); shown: "
                 f"{subset}.</p>")
    for (i, label), g in grids.items():
        parts.append(fig(norm_small_multiples_figure(first.thumbnails[i], g, f"{label}: {first.images[i]}",
                                                     vmin=scale.vmin, vmax=scale.vmax),
                         f"{label} norm maps", "wide"))
    if pca and pca_images:
        shown_blocks = list(next(iter(pca.values())))
        blocks = ", ".join(str(b) for b in shown_blocks)
        parts.append(f"<h2>PCA of patch features as RGB, block{'s' if len(shown_blocks) != 1 else ''} {blocks}</h2>"
                     "<p>First three principal components of each image's patch features (block output through "
                     "the final norm), fitted per image and run; saturated dots are high-norm artifacts. Shown: "
                     f"{'the first ' if len(pca_images) < len(first.images) else ''}{len(pca_images)} of "
                     f"{len(first.images)} images.</p>")
        parts.append(fig(pca_figure(pca_images, pca, "PCA of patch features"), "PCA", "wide"))
    return parts


def _per_image_table(runs: Mapping[str, ScanView]) -> list[str]:
    """Every image (not only those drawn): each run's high-norm tokens at its emergence block and
    its sink tokens."""
    labels = list(runs)
    per = {label: r.per_image() for label, r in runs.items()}
    rows = []
    for i, name in enumerate(runs[labels[0]].images):
        cells = [esc(name)]
        for label in labels:
            entry = per[label][i]
            cells += [str(entry["high_norm_tokens"]), str(entry["sink_tokens"])]
        rows.append(cells)
    header = ["image"] + [h for label in labels for h in (f"{esc(label)}: high-norm tokens",
                                                          f"{esc(label)}: sink tokens")]
    return ["<h2>Per image</h2><p>High-norm tokens: distinct tokens at each run's emergence block; sink tokens: "
            "distinct tokens that are a sink in any block.</p>", table(header, rows)]


def render_scan_comparison(runs: Mapping[str, ScanView], title: str,
                           pca: Optional[Mapping[str, Mapping[int, np.ndarray]]] = None,
                           pca_images: Optional[Sequence[Image.Image]] = None) -> str:
    """The comparison as one HTML page (see :func:`comparison_sections`)."""
    return page(title, [f"<h1>{esc(title)}</h1>", *comparison_sections(runs, pca, pca_images)])


def pca_layers(result: ScanView) -> list[int]:
    """The blocks a PCA figure shows by default: the first with outliers (if any) and the last."""
    last = result.trace.layers[-1]
    first = result.high_norm.emergence_layer
    return [last] if first is None or first == last else [first, last]
