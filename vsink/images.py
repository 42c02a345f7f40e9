"""Reading images robustly: any PIL-readable file becomes an upright 8-bit RGB image or a clear error."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, VsinkError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}

ImageSource = Union[str, os.PathLike, Image.Image]


@dataclass
class NamedImage:
    """An RGB image and the name it is reported under (path or demo name)."""

    name: str
    image: Image.Image


def _to_uint8(img: Image.Image) -> Image.Image:
    """High bit-depth and float modes → 8-bit, scaled by the mode's range (not clipped)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0):
        scaled = arr.astype(np.float64) / 65535.0 if arr.max(initial=0) > 255 else arr / 255.0
    else:
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        scaled = (arr.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros_like(arr, dtype=np.float64)
    return Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-rotate and convert any mode (CMYK, 16-bit, palette, grey, alpha) to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_uint8(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open an image file as upright RGB, or raise :class:`ImageError` naming the file and reason."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.load()
                return to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image file (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{p}: too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{p}: corrupt or truncated image ({e})") from None


def expand_paths(paths: Iterable[Union[str, os.PathLike]],
                 exclude: Iterable[Union[str, os.PathLike]] = ()) -> list[Path]:
    """Files as given; directories walked (sorted) for image files. Missing paths and empty
    directories raise :class:`VsinkError`.

    vsink's own outputs are never inputs (the one rule for every command that reads an image
    folder): a walk skips the folders in ``exclude`` (the command's output folders), every
    folder under the walked one that holds a run record (``vsink-run.json``) and vsink's staging
    folders, so ``vsink maps DIR --out DIR/maps`` run twice reads only the images of DIR."""
    from .outputs import MANIFEST, STAGE_DIR

    skip = {Path(os.path.abspath(e)) for e in exclude}
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            root = Path(os.path.abspath(p))
            found = []
            for folder, dirs, files in os.walk(p, followlinks=False):
                here = Path(os.path.abspath(folder))
                if here in skip or (here != root and (MANIFEST in files or STAGE_DIR.fullmatch(here.name))):
                    dirs[:] = []
                    continue
                found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
            found = sorted(f for f in found if f.is_file())
            if not found:
                raise VsinkError(f"{p}: directory contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                 "outside vsink's own output folders")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise VsinkError(f"{p}: no such file or directory")
    return out


def source_name(item: Union[ImageSource, NamedImage], index: int) -> str:
    """The name an input is reported under: its path, its demo name, or ``image-<index>``."""
    if isinstance(item, NamedImage):
        return item.name
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"image-{index}"
    return str(item)


def open_image(item: Union[ImageSource, NamedImage]) -> Image.Image:
    """Any accepted input (path, PIL image, :class:`NamedImage`) as upright RGB; bad files raise
    :class:`ImageError`."""
    if isinstance(item, NamedImage):
        return to_rgb(item.image)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    return load_image(item)


def load_batch(items: Sequence[Union[ImageSource, NamedImage]], start: int = 0
               ) -> tuple[list[Image.Image], list[str], list[dict[str, str]]]:
    """Open a batch of inputs: (images, their names, skipped ``{"image", "reason"}`` entries).
    ``start`` is the index of ``items[0]`` in the whole run (for unnamed PIL inputs)."""
    loaded, names, skipped = [], [], []
    for i, item in enumerate(items, start=start):
        name = source_name(item, i)
        try:
            loaded.append(open_image(item))
            names.append(name)
        except ImageError as e:
            skipped.append({"image": name, "reason": str(e)})
    return loaded, names, skipped
