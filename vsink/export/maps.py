"""The maps of one image (:class:`ImageMaps`), their PNG overlays and the per-image contact sheet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..io import atomic_path
from ..layout import TokenLayout
from .figures import overlay_axes, plain_text, plt


@dataclass
class ImageMaps:
    """Maps of one image. ``arrays`` holds every exported array except the streamed ``full``
    while the image is processed; :func:`export_maps` empties it once the files are written,
    so memory stays flat over many images (read the arrays back from ``<stem>.npz``)."""

    name: str
    stem: str
    image: Image.Image
    layout: TokenLayout
    arrays: dict[str, np.ndarray]
    files: list[str] = field(default_factory=list)

GRID_KINDS = ("cls", "received", "norm")
CMAPS = {"cls": "inferno", "received": "viridis", "norm": "magma", "rollout": "inferno", "pool": "inferno"}
#: where a map of no single block comes from (its overlay title)
WHERE = {"rollout": "all blocks", "pool": "pooling head"}


def _prefix_note(kind: str, prefix: np.ndarray, layout) -> str:
    """What class tokens and registers hold, shown next to every map."""
    if prefix.size == 0:
        return ""
    if kind == "norm":
        parts = []
        if layout.num_cls:
            parts.append(f"cls norm {prefix[: layout.num_cls].mean():.3g}")
        if layout.total_registers:
            parts.append(f"reg norm {prefix[layout.num_cls:].mean():.3g}")
        return ", ".join(parts)
    cls_mass = float(prefix[..., : layout.num_cls].sum(axis=-1).mean()) if layout.num_cls else 0.0
    reg_mass = float(prefix[..., layout.num_cls:].sum(axis=-1).mean()) if layout.total_registers else 0.0
    parts = [f"on cls {cls_mass:.2f}"] if layout.num_cls else []
    if layout.total_registers:
        parts.append(f"on registers {reg_mass:.2f}")
    return ", ".join(parts)


def _panels(maps: ImageMaps, kinds, layers, heads):
    """(file name, grid, title, kind) for every overlay to draw."""
    a, layout = maps.arrays, maps.layout
    for kind in (k for k in GRID_KINDS if k in kinds):
        for layer in layers:
            key = f"{kind}/layer{layer}"
            if kind == "norm":
                yield f"norm_layer{layer}.png", a[key], kind, layer, "-", _prefix_note(kind, a[f"{key}/prefix"], layout)
                continue
            prefix = a[f"{key}/prefix"]
            yield (f"{kind}_layer{layer}_mean.png", a[f"{key}/mean"], kind, layer, "head mean",
                   _prefix_note(kind, prefix, layout))
            if heads != "mean":
                chosen = list(range(prefix.shape[0])) if heads == "all" else heads
                for grid, h in zip(a[key], chosen):
                    yield (f"{kind}_layer{layer}_head{h}.png", grid, kind, layer, f"head {h}",
                           _prefix_note(kind, prefix[h], layout))
    if "rollout" in kinds:
        yield "rollout.png", a["rollout"], "rollout", None, "-", _prefix_note("rollout", a["rollout/prefix"], layout)
    if "pool" in kinds:
        prefix = a["pool/prefix"]
        yield "pool_mean.png", a["pool/mean"], "pool", None, "head mean", _prefix_note("pool", prefix, layout)
        if heads != "mean":
            chosen = list(range(prefix.shape[0])) if heads == "all" else heads
            for grid, h in zip(a["pool"], chosen):
                yield f"pool_head{h}.png", grid, "pool", None, f"head {h}", _prefix_note("pool", prefix[h], layout)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


@plain_text
def render_image_pngs(maps: ImageMaps, out: Union[str, Path], model: str, kinds, layers, heads) -> list[str]:
    """Write ``<stem>/<kind>_layer<L>_<head>.png`` overlays and ``<stem>/contact.png``; return
    the paths relative to ``out``."""
    folder = Path(out) / maps.stem
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    w, h = maps.image.size
    for fname, grid, kind, layer, head, note in _panels(maps, kinds, layers, heads):
        fig, ax = plt.subplots(figsize=(4.2, 4.2 * h / w + 0.6))
        where = f"block {layer}" if layer is not None else WHERE[kind]
        title = f"{model} | {kind} | {where} | {head}" + (f"\n{note}" if note else "")
        overlay_axes(ax, maps.image, grid, title, cmap=CMAPS[kind])
        _save(fig, folder / fname)
        written.append(f"{maps.stem}/{fname}")
    sheet = _contact_sheet(maps, model, kinds, layers)
    if sheet is not None:
        _save(sheet, folder / "contact.png")
        written.append(f"{maps.stem}/contact.png")
    return written


@plain_text
def _contact_sheet(maps: ImageMaps, model: str, kinds, layers):
    """Layers (rows) x grid kinds (columns), head mean, plus rollout and the pooling map on a row
    of their own."""
    cols = [k for k in GRID_KINDS if k in kinds]
    rows = len(layers) if cols else 0
    last = [k for k in ("rollout", "pool") if k in kinds]
    extra = 1 if last else 0
    if rows + extra == 0:
        return None
    ncols = max(1, len(cols), len(last))
    w, h = maps.image.size
    fig, axes = plt.subplots(rows + extra, ncols, figsize=(3.2 * ncols, (3.2 * h / w + 0.4) * (rows + extra)),
                             squeeze=False)
    a = maps.arrays
    for r, layer in enumerate(layers[:rows]):
        for c, kind in enumerate(cols):
            key = f"{kind}/layer{layer}" + ("" if kind == "norm" else "/mean")
            overlay_axes(axes[r][c], maps.image, a[key], f"{kind}, block {layer}", cmap=CMAPS[kind])
    for c, kind in enumerate(last):
        key = "rollout" if kind == "rollout" else "pool/mean"
        title = "rollout" if kind == "rollout" else "pooling probe"
        overlay_axes(axes[rows][c], maps.image, a[key], title, cmap=CMAPS[kind])
    for c in range(len(last), ncols if extra else 0):
        axes[rows][c].axis("off")
    fig.suptitle(f"{model} — {maps.name}", fontsize=10)
    fig.tight_layout()
    return fig
