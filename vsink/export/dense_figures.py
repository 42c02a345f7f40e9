"""Figures of a dense evaluation, all variants on shared axes: per-class IoU bars, predicted masks
next to the ground truth, LOST boxes on the images."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.patches import Rectangle

from .axes import plain_linear_axis
from .figures import RUN_COLOURS, plain_text, plt

from .views import Previews

#: classes shown in the per-class IoU figure (the rest are in results.json)
MAX_CLASSES = 40


@plain_text
def per_class_iou_figure(variants: dict[str, list[Optional[float]]], class_names: Optional[Sequence[str]]):
    """Grouped bars: per class, one bar per variant (IoU in %, one axis from 0 to 100); classes
    with an empty union (None) get no bar."""
    n = max(len(v) for v in variants.values())
    shown = min(n, MAX_CLASSES)
    names = list(class_names or [])[:n] + [str(i) for i in range(len(class_names or []), n)]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * shown * max(1, len(variants)) ** 0.5 + 1.5), 3.2))
    x = np.arange(shown)
    for k, ((label, ious), colour) in enumerate(zip(variants.items(), RUN_COLOURS)):
        values = [np.nan if v is None else 100 * v for v in ious[:shown]]
        ax.bar(x + (k - (len(variants) - 1) / 2) * width, values, width, color=colour, label=label)
    ax.set_xticks(x, names[:shown], rotation=60 if shown > 8 else 0, ha="right" if shown > 8 else "center", fontsize=7)
    ax.set_ylim(0, 100)
    plain_linear_axis(ax.yaxis)
    ax.set_ylabel("IoU (%)")
    title = "per-class IoU" + (f" (first {shown} of {n} classes)" if shown < n else "")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if len(variants) > 1:
        ax.legend(fontsize=7)
    return fig


def _mask_rgb(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices → colours (tab20, cycling); ignore (255) black."""
    cmap = colormaps["tab20"]
    rgb = np.asarray([cmap(i % 20)[:3] for i in range(max(num_classes, 1))])
    out = np.zeros((*mask.shape, 3))
    valid = mask != 255
    out[valid] = rgb[np.clip(mask[valid], 0, len(rgb) - 1)]
    return out


def _class_legend(fig, previews: Previews, num_classes: int, class_names: Optional[Sequence[str]]) -> int:
    """A legend of the mask colours of every class that appears in the shown masks (ground truth
    or predicted), named by ``class_names`` where given; returns its number of rows."""
    present: set[int] = set()
    for mask in [*previews.masks, *(m for masks in previews.predicted.values() for m in masks)]:
        if mask is not None:
            values = np.unique(mask)
            present |= {int(v) for v in values if v != 255}
    if not present:
        return 0
    cmap = colormaps["tab20"]
    names = list(class_names or [])
    handles = [Rectangle((0, 0), 1, 1, color=cmap(c % 20)) for c in sorted(present)]
    labels = [names[c] if c < len(names) else f"class {c}" for c in sorted(present)]
    if num_classes > 20:
        labels = [f"{label} ({c})" for label, c in zip(labels, sorted(present))]
    ncol = min(6, len(handles))
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=6, title="mask colours (tab20; "
               "colours repeat every 20 classes)" if num_classes > 20 else "mask colours", title_fontsize=6)
    return -(-len(handles) // ncol)


@plain_text
def previews_figure(previews: Previews, num_classes: int, class_names: Optional[Sequence[str]] = None):
    """Rows: the first evaluation images. Columns: the image with the ground-truth boxes (white)
    and each variant's LOST box (its colour); the ground-truth mask; each variant's predicted mask;
    above them a legend of the classes in those masks (``class_names`` where given)."""
    variants = list(previews.predicted)
    cols = 1 + (1 + len(variants) if variants else 0)
    rows = len(previews.ids)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + 0.4), squeeze=False)
    for i in range(rows):
        ax = axes[i][0]
        ax.imshow(previews.images[i])
        for box in (previews.boxes[i] if previews.boxes[i] is not None else []):
            x0, y0, x1, y1 = [float(v) for v in box[:4]]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
        for (label, boxes), colour in zip(previews.lost.items(), RUN_COLOURS):
            if i < len(boxes):
                x0, y0, x1, y1 = boxes[i]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5,
                                       linestyle="--", label=f"LOST {label}" if i == 0 else None))
        ax.set_title(previews.ids[i] if not previews.lost else f"{previews.ids[i]}: GT (white), LOST (dashed)",
                     fontsize=7)
        if variants:
            mask = previews.masks[i]
            if mask is not None:
                axes[i][1].imshow(_mask_rgb(mask, num_classes), interpolation="nearest")
            axes[i][1].set_title("ground truth", fontsize=7)
            for k, label in enumerate(variants):
                axes[i][2 + k].imshow(_mask_rgb(previews.predicted[label][i], num_classes), interpolation="nearest")
                axes[i][2 + k].set_title(f"predicted: {label}", fontsize=7)
        for a in axes[i]:
            a.axis("off")
    if previews.lost:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    legend_rows = _class_legend(fig, previews, num_classes, class_names) if variants else 0
    top = 1 - (0.03 + 0.018 * legend_rows) * 8 / max(fig.get_size_inches()[1], 1) if legend_rows else 1
    fig.tight_layout(rect=(0, 0.04 if previews.lost else 0, 1, top))
    return fig
