"""Figures over all blocks of a scan: the layer × head sink-share heat map, massive activations
in the style of Sun et al. (2024), and norm maps at every block as small multiples."""

from __future__ import annotations

import math
from pathlib import Path
from collections import Counter
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from .axes import DistinctFormatter, colorbar, use_log, value_axis
from .figures import RUN_COLOURS, plain_text, plt
from .scales import flat_note

if TYPE_CHECKING:
    from ..detect import AttentionSink, MassiveActivation
    from .scales import Scale
    from ..probe import Trace


def sink_share_by_head(trace: "Trace", sinks: Sequence["AttentionSink"]) -> np.ndarray:
    """[layers, heads]: the attention (mean over queries and images) each head gives to the tokens
    that are sinks of that layer and image (:func:`vsink.detect.detect_sinks`); 0 without sinks."""
    received = trace.attn_received  # [L, I, H, N]
    out = np.zeros((received.shape[0], received.shape[2]), dtype=np.float64)
    position = {layer: pos for pos, layer in enumerate(trace.layers)}
    chosen = np.zeros(received.shape[:2] + received.shape[3:], dtype=bool)  # [L, I, N]
    for s in sinks:
        chosen[position[s.layer], s.image, s.token] = True
    for pos in range(received.shape[0]):
        out[pos] = (received[pos] * chosen[pos][:, None, :]).sum(axis=-1).mean(axis=0)
    return out


@plain_text
def heatmap_figure(values: np.ndarray, layers: Sequence[int], *, title: str, label: str,
                   cmap: str = "viridis", vmin: Optional[float] = None, vmax: Optional[float] = None,
                   rows_label: str = "block"):
    """Blocks (rows; ``rows_label``, e.g. ``"decoder layer"`` for an LLM) × heads (columns) with a
    colour bar; each cell annotated when the grid is small."""
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(1.2 + 0.45 * cols, 9), min(1.0 + 0.3 * rows, 9)))
    im = ax.imshow(values, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows), [str(l) for l in layers])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel(rows_label)
    ax.set_title(title, fontsize=9)
    if rows * cols <= 16 * 16:
        top = np.nanmax(values) if np.isfinite(values).any() else 0.0
        for r in range(rows):
            for c in range(cols):
                v = values[r, c]
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if top and v > 0.6 * top else "white")
    colorbar(ax, im, label=label)
    return fig


@plain_text
def massive_figure(trace: "Trace", found: Sequence["MassiveActivation"], threshold: float, title: str):
    """Sun et al.'s view: per block the top-1, top-2, top-3 |activation| and the median (mean over
    images; log axis when they span a decade), the top-1 dimension written at each point; right:
    which residual dimensions hold massive activations (>= ``threshold`` × median), per block."""
    values = np.sort(np.abs(trace.massive_values), axis=-1)[..., ::-1]  # [L, I, k]
    layers = list(trace.layers)
    fig, (ax, ax_dims) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    plotted: list[float] = []
    for k, colour in zip(range(min(3, values.shape[-1])), RUN_COLOURS):
        ys = values[:, :, k].mean(axis=1)
        ax.plot(layers, ys, marker="o", ms=4, color=colour, label=f"top {k + 1}")
        plotted += list(ys)
    median = trace.massive_median.mean(axis=1)
    ax.plot(layers, median, marker="s", ms=3, color="gray", linestyle="--", label="median")
    plotted += list(median)
    value_axis(ax, plotted)
    top_index = np.abs(trace.massive_values).argmax(axis=-1)  # [L, I]
    for pos, layer in enumerate(layers):
        dims = trace.massive_dims[pos, np.arange(top_index.shape[1]), top_index[pos]]
        dim = Counter(int(d) for d in dims).most_common(1)[0][0]
        ax.annotate(str(dim), (layer, values[pos, :, 0].mean()), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=6, color=RUN_COLOURS[0])
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel("|activation| (mean over images)")
    ax.set_title(f"{title}: top |activations| (labels: dim of the top 1)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    counts = Counter((m.layer, m.dim) for m in found)
    if counts:
        dims = sorted({d for _, d in counts})
        ys = [dims.index(d) for _, d in counts]
        ax_dims.scatter([l for l, _ in counts], ys, s=[12 + 6 * c for c in counts.values()], color="tab:red")
        ax_dims.set_yticks(range(len(dims)), [str(d) for d in dims])
        ax_dims.set_ylim(-0.7, len(dims) - 0.3)
    else:
        ax_dims.text(0.5, 0.5, f"no activation >= {threshold:g}x median", ha="center", va="center",
                     transform=ax_dims.transAxes, fontsize=8)
        ax_dims.set_yticks([])
    ax_dims.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    ax_dims.set_xlabel("block (0-based)")
    ax_dims.set_ylabel("residual dim")
    ax_dims.set_title(f"massive (>= {threshold:g}x median): dims; size = tokens × images", fontsize=9)
    ax_dims.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@plain_text
def norm_small_multiples_figure(image: Image.Image, grids: Mapping[int, np.ndarray], title: str,
                                vmin: Optional[float] = None, vmax: Optional[float] = None):
    """The image, then the patch-norm map of every block over the image's extent, all on one
    colour scale (default: the range over all blocks; a report passes the range over all images
    too), so growth with depth shows; one colour bar, a flat panel says so in its title."""
    stack = np.stack(list(grids.values()))
    vmin = float(stack.min()) if vmin is None else vmin
    vmax = float(stack.max()) if vmax is None else vmax
    panels = len(grids) + 1
    cols = min(7, panels)
    rows = math.ceil(panels / cols)
    w, h = image.size
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.6, 1.6 * rows * h / w + 0.7), squeeze=False)
    flat = axes.ravel()
    flat[0].imshow(image)
    flat[0].set_title("input", fontsize=7)
    im = None
    for ax, (layer, grid) in zip(flat[1:], grids.items()):
        im = ax.imshow(grid, cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest", extent=(0, w, h, 0))
        median = float(np.median(grid))
        text = f"block {layer}, max/med {grid.max() / median:.1f}" if median > 0 else f"block {layer}"
        note = flat_note(grid)
        ax.set_title(text + (f"\n{note}" if note else ""), fontsize=6 if note else 7)
    for ax in flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9, parse_math=False)
    if im is not None:
        cbar = fig.colorbar(im, ax=list(flat), fraction=0.02, pad=0.01)
        cbar.formatter = DistinctFormatter()
        cbar.update_ticks()
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label("token norm (L2)", fontsize=7)
    return fig


@plain_text
def norm_histograms_figure(norms: Sequence[np.ndarray], layers: Sequence[int], thresholds: Sequence[Optional[float]],
                           emergence: Optional[int]):
    """Patch-token norm histograms of every block (all images pooled) on one shared norm axis and
    shared bins, the detector's threshold of each block as a dashed red line."""
    pooled = np.concatenate([np.asarray(v, dtype=float).ravel() for v in norms])
    pooled = pooled[np.isfinite(pooled) & (pooled > 0)]
    lo, hi = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.5, 1.5)
    for t in thresholds:
        if t is not None and np.isfinite(t) and t > 0:
            lo, hi = min(lo, t), max(hi, t)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    log = use_log([lo, hi])
    bins = np.logspace(np.log10(lo), np.log10(hi), 50) if log else np.linspace(lo, hi, 50)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.0 * rows + 0.4), squeeze=False, sharex=True)
    for ax, values, layer, threshold in zip(axes.ravel(), norms, layers, thresholds):
        v = np.asarray(values, dtype=float).ravel()
        ax.hist(v[np.isfinite(v) & (v > 0)], bins=bins, color="tab:blue", alpha=0.8)
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1.2)
        value_axis(ax, [lo, hi], which="x")
        ax.set_xlim(lo, hi)
        ax.set_yscale("symlog", linthresh=1)
        ax.yaxis.set_major_formatter(DistinctFormatter())
        ax.tick_params(labelsize=6)
        what = f"block {layer}" + (" (emergence)" if layer == emergence else "")
        ax.set_title(what + (f", threshold {threshold:.3g}" if threshold is not None else ", no threshold"),
                     fontsize=7)
    for ax in axes.ravel()[len(layers):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("patch-token norm (L2)", fontsize=7)
    fig.suptitle("patch-token norms per block, all images (count, symlog); dashed: the detector's threshold",
                 fontsize=8)
    fig.tight_layout()
    return fig


@plain_text
def head_grid_figure(images: Sequence[Image.Image], grids: Sequence[np.ndarray], names: Sequence[str],
                     scale: "Scale", title: str):
    """Images (rows) × heads (columns): each head's map ``grids[i]`` [heads, h, w] over the image,
    all on one ``scale``; one colour bar."""
    heads = grids[0].shape[0]
    w, h = images[0].size
    fig, axes = plt.subplots(len(images), heads + 1, figsize=(1.3 * (heads + 1) + 0.8, 1.3 * len(images) * h / w + 0.6),
                             squeeze=False)
    im = None
    for r, (image, grid, name) in enumerate(zip(images, grids, names)):
        iw, ih = image.size
        axes[r][0].imshow(image)
        label = Path(name).name
        axes[r][0].set_title(label if len(label) < 24 else label[:21] + "…", fontsize=6, parse_math=False)
        for c in range(heads):
            ax = axes[r][c + 1]
            ax.imshow(image)
            im = ax.imshow(grid[c], cmap="viridis", alpha=0.6, vmin=scale.vmin, vmax=scale.vmax,
                           interpolation="nearest", extent=(0, iw, ih, 0))
            if r == 0:
                ax.set_title(f"head {c}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    if im is not None:
        cbar = fig.colorbar(im, ax=list(axes.ravel()), fraction=0.02, pad=0.01)
        cbar.formatter = DistinctFormatter()
        cbar.update_ticks()
        cbar.ax.tick_params(labelsize=6)
        cbar.set_label(scale.label, fontsize=7)
    return fig
