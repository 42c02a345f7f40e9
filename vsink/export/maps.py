"""The maps of one image (:class:`ImageMaps`), their PNG overlays and the per-image contact sheet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from matplotlib import ticker

from ..io import atomic_path
from ..layout import TokenLayout
from ..viewbox import ViewBox
from .axes import DistinctFormatter
from .figures import mark_scale, overlay_axes, plain_text, plt
from .scales import Scale, flat_note, shared_scale


@dataclass
class ImageMaps:
    """Maps of one image. ``arrays`` holds every exported array except the streamed ``full``
    while the image is processed; :func:`export_maps` empties it (and ``image``) once the files
    are written, so memory stays flat over many images (read the arrays back from ``<stem>.npz``)."""

    name: str
    stem: str
    #: the region the model saw, as drawn (None once the image's files are written)
    image: Optional[Image.Image]
    layout: TokenLayout
    arrays: dict[str, np.ndarray]
    files: list[str] = field(default_factory=list)
    #: the region of the original image the model saw; ``image`` is that region
    view_box: Optional[ViewBox] = None
    #: the original image's (width, height)
    size: Optional[tuple[int, int]] = None

GRID_KINDS = ("cls", "received", "norm")
CMAPS = {"cls": "inferno", "received": "viridis", "norm": "magma", "rollout": "inferno", "pool": "inferno"}
#: maps of no single block, drawn on the contact sheet's last row
LAST_ROW = ("rollout", "pool")
#: colour bar label (quantity and units) of each kind; attention kinds start at 0
UNITS = {"cls": "attention from the class token (share)", "received": "attention received (share, mean over queries)",
         "norm": "token norm (L2)", "rollout": "rollout attention (share)",
         "pool": "attention of the pooling probe (share)"}
#: PNG compression: level 1 writes in a fraction of the default's time, files ~1.3× larger
PNG_OPTIONS = {"compress_level": 1}


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


def panels(maps: ImageMaps, kinds, layers, heads):
    """(file name, grid, kind, title, note) for every overlay to draw."""
    a, layout = maps.arrays, maps.layout
    for kind in (k for k in GRID_KINDS if k in kinds):
        for layer in layers:
            key = f"{kind}/layer{layer}"
            if kind == "norm":
                yield (f"norm_layer{layer}.png", a[key], kind, f"norm | block {layer}",
                       _prefix_note(kind, a[f"{key}/prefix"], layout))
                continue
            prefix = a[f"{key}/prefix"]
            yield (f"{kind}_layer{layer}_mean.png", a[f"{key}/mean"], kind, f"{kind} | block {layer} | head mean",
                   _prefix_note(kind, prefix, layout))
            if heads != "mean":
                chosen = list(range(prefix.shape[0])) if heads == "all" else heads
                for grid, h in zip(a[key], chosen):
                    yield (f"{kind}_layer{layer}_head{h}.png", grid, kind, f"{kind} | block {layer} | head {h}",
                           _prefix_note(kind, prefix[h], layout))
    if "rollout" in kinds:
        yield ("rollout.png", a["rollout"], "rollout", "rollout | all blocks",
               _prefix_note("rollout", a["rollout/prefix"], layout))
    if "pool" in kinds:
        prefix = a["pool/prefix"]
        yield ("pool_mean.png", a["pool/mean"], "pool", "pool | pooling head | head mean",
               _prefix_note("pool", prefix, layout))
        if heads != "mean":
            chosen = list(range(prefix.shape[0])) if heads == "all" else heads
            for grid, h in zip(a["pool"], chosen):
                yield (f"pool_head{h}.png", grid, "pool", f"pool | pooling head | head {h}",
                       _prefix_note("pool", prefix[h], layout))


def map_scales(all_maps: Sequence[ImageMaps], kinds, layers, heads,
               earlier: Optional[dict[str, Scale]] = None) -> dict[str, Scale]:
    """One :class:`Scale` per kind over every panel of every image (attention kinds from 0),
    widened to cover ``earlier`` scales (so images can be added one at a time)."""
    return fold_scales([panel_extents(maps, kinds, layers, heads) for maps in all_maps], earlier)


def panel_extents(maps: ImageMaps, kinds, layers, heads) -> dict[str, np.ndarray]:
    """The smallest and largest finite value of an image's panels, per kind (``[inf, -inf]``
    when a kind has none): all a colour scale needs of them."""
    out: dict[str, np.ndarray] = {}
    for _, grid, kind, _, _ in panels(maps, kinds, layers, heads):
        a = np.asarray(grid, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = out.get(kind, (np.inf, -np.inf))
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        out[kind] = np.asarray([lo, hi])
    return out


def fold_scales(extents: Sequence[dict[str, np.ndarray]], earlier: Optional[dict[str, Scale]] = None
                ) -> dict[str, Scale]:
    """:func:`map_scales` from :func:`panel_extents` (rank 0 of a sharded export has only those
    of the other ranks' images)."""
    values: dict[str, list[np.ndarray]] = {}
    for kind, scale in (earlier or {}).items():
        values[kind] = [np.asarray([scale.vmin, scale.vmax])]
    for extent in extents:
        for kind, pair in extent.items():
            values.setdefault(kind, []).append(pair)
    return {kind: shared_scale(grids, zero=kind != "norm", label=UNITS[kind]) for kind, grids in values.items()}


def reload(maps: ImageMaps, npz: Path) -> None:
    """Read an image's drawn arrays and its image back from its npz (written by export_maps)."""
    with np.load(npz, allow_pickle=False) as data:
        maps.arrays = {k: data[k] for k in data.files if k not in ("image", "view_box") and not k.startswith("full/")}
        maps.image = Image.fromarray(data["image"])


class OverlayCanvas:
    """One figure per (image, kind) with a fixed layout. The image, the colour bar and its scale
    are drawn once (and kept as the background); each panel draws only its overlay and title over
    that background and is encoded straight from the canvas."""

    @plain_text
    def __init__(self, image: Image.Image, scale: Scale, cmap: str):
        w, h = image.size
        side = 3.6
        iw, ih = (side, side * h / w) if w >= h else (side * w / h, side)
        fw, fh = iw + 1.3, ih + 0.65
        self.fig = plt.figure(figsize=(fw, fh), dpi=100)
        self.ax = self.fig.add_axes((0.08 / fw, 0.08 / fh, iw / fw, ih / fh))
        cax = self.fig.add_axes(((0.08 + iw + 0.1) / fw, 0.08 / fh, 0.14 / fw, ih / fh))
        self.overlay = overlay_axes(self.ax, image, np.zeros((1, 1)), "", cmap=cmap, vmin=scale.vmin,
                                    vmax=scale.vmax, colour_bar=False)
        cbar = self.fig.colorbar(self.overlay, cax=cax)
        cbar.formatter = DistinctFormatter()
        cbar.locator = ticker.MaxNLocator(nbins=5)
        cbar.update_ticks()
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label(scale.label, fontsize=7)
        mark_scale(cbar, scale)
        self.overlay.set_visible(False)
        self.fig.canvas.draw()
        self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)
        self.overlay.set_visible(True)

    def save(self, grid: np.ndarray, title: str, path: Path) -> Image.Image:
        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        self.overlay.set_data(grid)
        note = flat_note(grid)
        self.ax.set_title(title + (f"\n({note})" if note else ""), fontsize=8, parse_math=False)
        self.ax.draw_artist(self.overlay)
        self.ax.draw_artist(self.ax.title)
        picture = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
        _save_png(picture, path)
        return picture

    def close(self) -> None:
        plt.close(self.fig)


def _save_png(picture: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", **PNG_OPTIONS)


def render_image_pngs(maps: ImageMaps, out: Union[str, Path], model: str, kinds, layers, heads,
                      scales: dict[str, Scale]) -> list[str]:
    """Write ``<stem>/<kind>_layer<L>_<head>.png`` overlays and ``<stem>/contact.png`` (the head-mean
    panels tiled: blocks down, kinds across, rollout and pooling map last) on the shared ``scales``
    (:func:`map_scales`); return the paths relative to ``out``."""
    folder = Path(out) / maps.stem
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    canvases: dict[str, OverlayCanvas] = {}
    tiles: dict[tuple[str, object], Image.Image] = {}
    try:
        for fname, grid, kind, what, note in panels(maps, kinds, layers, heads):
            if kind not in canvases:
                canvases[kind] = OverlayCanvas(maps.image, scales[kind], CMAPS[kind])
            title = f"{model} | {Path(maps.name).name}\n{what}" + (f" | {note}" if note else "")
            picture = canvases[kind].save(grid, title, folder / fname)
            if "_head" not in fname:
                tiles[(kind, fname)] = picture
            written.append(f"{maps.stem}/{fname}")
    finally:
        for canvas in canvases.values():
            canvas.close()
    if tiles:
        _save_png(_contact_sheet(tiles, kinds, layers), folder / "contact.png")
        written.append(f"{maps.stem}/contact.png")
    return written


def _contact_sheet(tiles: dict, kinds, layers) -> Image.Image:
    """The head-mean panels of one image as one picture: a row per block, a column per grid kind,
    the rollout and pooling panels on a last row."""
    cols = [k for k in GRID_KINDS if k in kinds]
    by_kind = {kind: [p for (k, _), p in tiles.items() if k == kind] for kind in cols + list(LAST_ROW)}
    rows = [[by_kind[k][r] for k in cols] for r in range(len(layers))] if cols else []
    last = [p for kind in LAST_ROW for p in by_kind[kind]]
    if last:
        rows.append(last)
    tw = max(p.size[0] for p in tiles.values())
    th = max(p.size[1] for p in tiles.values())
    sheet = Image.new("RGB", (tw * max(len(r) for r in rows), th * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            sheet.paste(picture, (c * tw, r * th))
    return sheet
