"""Matplotlib figures rendered to PNG bytes (Agg backend, no display needed)."""

from __future__ import annotations

import base64
import io
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_axes(ax, image: Image.Image, grid: np.ndarray, title: str, *, cmap: str = "inferno",
                 alpha: float = 0.55, vmin: Optional[float] = None, vmax: Optional[float] = None):
    """Draw ``image`` with ``grid`` [h, w] upsampled (bilinear) over it and a colour bar."""
    w, h = image.size
    ax.imshow(image)
    im = ax.imshow(grid, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear",
                   vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return im


def overlay_png(image: Image.Image, grid: np.ndarray, title: str, **kwargs) -> bytes:
    fig, ax = plt.subplots(figsize=(4, 4 * image.size[1] / image.size[0] + 0.3))
    overlay_axes(ax, image, grid, title, **kwargs)
    return png_bytes(fig)


def ratio_curve_png(layers: Sequence[int], ratios: Sequence[float], emergence: Optional[int], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(layers, ratios, marker="o")
    if emergence is not None:
        ax.axvline(emergence, color="tab:red", linestyle="--", label=f"emergence (block {emergence})")
        ax.legend(fontsize=8)
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel("max / median patch norm")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def norm_histogram_png(norms: np.ndarray, threshold: Optional[float], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3))
    values = norms[norms > 0].ravel()
    bins = np.logspace(np.log10(values.min()), np.log10(values.max()), 60)
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    ax.set_xscale("log")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("patch-token norm")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    return png_bytes(fig)
