"""Matplotlib figures rendered to PNG bytes (Agg backend, no display needed).

Every value axis goes through :mod:`vsink.export.axes` (log only over a decade or more, full-value
tick labels, colour bars without offset text). Figures that compare runs take one series per
run and draw them on one shared axis.
"""

from __future__ import annotations

import base64
import functools
import io
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .axes import colorbar, value_axis  # noqa: E402
from .scales import Scale, flat_note  # noqa: E402

#: colours of compared runs, in order
RUN_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


F = TypeVar("F", bound=Callable[..., Any])


def plain_text(build: F) -> F:
    """Build a figure with mathtext off: its titles, labels and legends show file names, model
    specs, prompts and generated words as written (``a$\\frac{$b.png`` is not a formula that
    fails to parse once all the work is done). Every figure builder of vsink is wrapped in it."""

    @functools.wraps(build)
    def built(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return build(*args, **kwargs)

    built.plain_text = True  # type: ignore[attr-defined]
    return built  # type: ignore[return-value]


def png_bytes(fig) -> bytes:
    """Render ``fig`` to PNG and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_axes(ax, image: Image.Image, grid: np.ndarray, title: str, *, cmap: str = "inferno",
                 alpha: float = 0.55, vmin: Optional[float] = None, vmax: Optional[float] = None,
                 scale: Optional[Scale] = None, colour_bar: bool = True):
    """Draw ``image`` (the region the model saw, :mod:`vsink.viewbox`) with ``grid`` [h, w]
    upsampled (bilinear) over all of it and a colour bar. With a :class:`Scale` the colours span
    its range, the bar carries its label and marks, and a panel whose own range is tiny says so
    in its title (:func:`flat_note`)."""
    w, h = image.size
    if scale is not None:
        vmin, vmax = scale.vmin, scale.vmax
        note = flat_note(grid)
        title = f"{title} ({note})" if note else title
    ax.imshow(image)
    im = ax.imshow(grid, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear",
                   vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=8, parse_math=False)  # titles hold file names: "$" is not maths
    ax.axis("off")
    if colour_bar:
        cbar = colorbar(ax, im, label=scale.label if scale is not None else None, fraction=0.046 * min(1.0, h / w))
        if scale is not None:
            mark_scale(cbar, scale)
    return im


def mark_scale(cbar, scale: Scale) -> None:
    """Draw ``scale``'s marks (thresholds) as lines across a colour bar, named in its label."""
    for name, value in scale.marks.items():
        cbar.ax.axhline(value, color="cyan", linewidth=1.5)
    if scale.marks:
        marks = ", ".join(f"{name} = {value:.3g}" for name, value in scale.marks.items())
        cbar.set_label(f"{scale.label}; line: {marks}", fontsize=7)


@plain_text
def overlay_png(image: Image.Image, grid: np.ndarray, title: str, **kwargs) -> bytes:
    fig, ax = plt.subplots(figsize=(4, 4 * image.size[1] / image.size[0] + 0.3))
    overlay_axes(ax, image, grid, title, **kwargs)
    return png_bytes(fig)


@plain_text
def layer_curves_figure(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], *, ylabel: str, title: str,
                        floor: Optional[float] = None, marks: Optional[Mapping[str, Optional[int]]] = None):
    """One line per run over blocks on one shared value axis; ``marks``: a dashed vertical line per
    run (e.g. its emergence layer). Returns the figure."""
    fig, ax = plt.subplots(figsize=(6, 3))
    values: list[float] = []
    for (label, (layers, ys)), colour in zip(series.items(), RUN_COLOURS):
        ax.plot(layers, ys, marker="o", ms=4, color=colour, label=label if len(series) > 1 else None)
        values += [float(v) for v in ys]
    for (label, layer), colour in zip((marks or {}).items(), RUN_COLOURS):
        if layer is not None:
            ax.axvline(layer, color=colour, linestyle="--", alpha=0.8, label=f"{label} (block {layer})")
    value_axis(ax, values, floor=floor)
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def ratio_curve_png(layers: Sequence[int], ratios: Sequence[float], emergence: Optional[int], title: str) -> bytes:
    """max / median patch norm per block (linear unless it spans a decade; 1 always in view)."""
    marks = {"emergence": emergence} if emergence is not None else None
    return png_bytes(layer_curves_figure({"ratio": (layers, ratios)}, ylabel="max / median patch norm",
                                         title=title, floor=1.0, marks=marks))


@plain_text
def norm_histogram_figure(norms: Mapping[str, np.ndarray], thresholds: Mapping[str, Optional[float]], title: str):
    """Patch-norm histograms of one or more runs on shared bins and axes."""
    fig, ax = plt.subplots(figsize=(6, 3))
    pooled = np.concatenate([np.asarray(v, dtype=float).ravel() for v in norms.values()])
    pooled = pooled[np.isfinite(pooled) & (pooled > 0)]
    scale = value_axis(ax, [pooled.min(), pooled.max()], which="x") if pooled.size else "linear"
    lo, hi = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.logspace(np.log10(lo), np.log10(hi), 60) if scale == "log" else np.linspace(lo, hi, 60)
    for (label, values), colour in zip(norms.items(), RUN_COLOURS):
        v = np.asarray(values, dtype=float).ravel()
        ax.hist(v[np.isfinite(v) & (v > 0)], bins=bins, color=colour, alpha=0.6 if len(norms) > 1 else 0.8,
                label=label if len(norms) > 1 else None)
    for (label, thr), colour in zip(thresholds.items(), RUN_COLOURS):
        if thr is not None:
            ax.axvline(thr, color=colour if len(norms) > 1 else "tab:red", linestyle="--",
                       label=f"{label} threshold {thr:.3g}" if len(norms) > 1 else f"threshold {thr:.3g}")
    ax.set_xlabel("patch-token norm")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def norm_histogram_png(norms: np.ndarray, threshold: Optional[float], title: str) -> bytes:
    return png_bytes(norm_histogram_figure({"norms": norms}, {"norms": threshold}, title))
