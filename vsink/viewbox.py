"""The region of an original image that a model saw (:class:`ViewBox`), and the image drawn on it.

Preprocessing decides which pixels reach the patch grid: vsink's own vision preprocessing
resizes the whole image; a CLIP image processor (LLaVA) resizes the shortest edge and centre-
crops, so the margins of a non-square photo never reach the model; a LLaVA processor with
``do_pad`` first pads the image to a square; Qwen2-VL's ``smart_resize`` resizes the whole image
to multiples of patch × merge. A map is drawn on :meth:`ViewBox.crop` of the original, so each
grid cell lies over the pixels it came from. Boxes are in original pixel coordinates
``(x0, y0, x1, y1)``; a box may reach outside the image where the processor padded it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

#: longer side of the images vsink stores for reports and the viewer
DISPLAY_SIDE = 448


@dataclass(frozen=True)
class ViewBox:
    """``(x0, y0, x1, y1)`` in the original image's pixels: what the model's input covers."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def full(cls, size: Sequence[int]) -> "ViewBox":
        """The whole ``(width, height)`` image."""
        return cls(0.0, 0.0, float(size[0]), float(size[1]))

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def to_list(self) -> list[float]:
        return [round(float(v), 3) for v in (self.x0, self.y0, self.x1, self.y1)]

    def crop(self, image: Image.Image, fill: Sequence[int] = (0, 0, 0), side: int = 0) -> Image.Image:
        """The part of ``image`` inside the box (``fill`` where it reaches outside), at the box's
        aspect ratio; with ``side`` > 0 scaled so that its longer side is at most ``side``."""
        image = image.convert("RGB")
        w, h = max(1, round(self.width)), max(1, round(self.height))
        if side and max(w, h) > side:
            scale = side / max(w, h)
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
        iw, ih = image.size
        left, top = max(0, math.ceil(-self.x0)), max(0, math.ceil(-self.y0))
        right, bottom = max(0, math.ceil(self.x1 - iw)), max(0, math.ceil(self.y1 - ih))
        if left or top or right or bottom:
            canvas = Image.new("RGB", (iw + left + right, ih + top + bottom), tuple(int(c) for c in fill))
            canvas.paste(image, (left, top))
            image = canvas
        box = (self.x0 + left, self.y0 + top, self.x1 + left, self.y1 + top)
        return image.resize((w, h), Image.BICUBIC, box=box)


def display_image(image: Image.Image, box: ViewBox, fill: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """The crop a report or the viewer shows: the box's pixels, longer side at most
    :data:`DISPLAY_SIDE`."""
    return box.crop(image, fill, DISPLAY_SIDE)


def _edges(size: Any) -> dict[str, Any]:
    """A transformers ``SizeDict`` or plain dict as a dict."""
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k, None) for k in ("height", "width", "shortest_edge", "longest_edge")}


def clip_processor_box(processor: Any, size: Sequence[int]) -> ViewBox:
    """The view box of a CLIP-style image processor (LLaVA's) for a ``(width, height)`` image:
    optional pad to a square (``do_pad``), resize (shortest edge, or a fixed height × width),
    optional centre crop — the processor's own settings and its own rounding."""
    w, h = float(size[0]), float(size[1])
    ox, oy = 0.0, 0.0  # where the processed canvas's origin lies in original pixels
    if getattr(processor, "do_pad", False):
        side = max(w, h)
        ox, oy = -((side - w) // 2), -((side - h) // 2)
        w = h = side
    rw, rh = w, h
    edges = _edges(getattr(processor, "size", None))
    if getattr(processor, "do_resize", True) and edges:
        if edges.get("shortest_edge") and not edges.get("longest_edge"):
            short = int(edges["shortest_edge"])
            if w <= h:
                rw, rh = short, int(short * h / w)
            else:
                rw, rh = int(short * w / h), short
        elif edges.get("height") and edges.get("width"):
            rw, rh = int(edges["width"]), int(edges["height"])
    x0, y0, x1, y1 = 0.0, 0.0, float(rw), float(rh)
    crop = _edges(getattr(processor, "crop_size", None))
    if getattr(processor, "do_center_crop", False) and crop.get("height") and crop.get("width"):
        cw, ch = int(crop["width"]), int(crop["height"])
        left = int((rw - cw) / 2.0) if cw <= rw else -((cw - rw) // 2)
        top = int((rh - ch) / 2.0) if ch <= rh else -((ch - rh) // 2)
        x0, y0, x1, y1 = left, top, left + cw, top + ch
    sx, sy = w / rw, h / rh
    return ViewBox(ox + x0 * sx, oy + y0 * sy, ox + x1 * sx, oy + y1 * sy)


def pad_colour(processor: Any) -> tuple[int, int, int]:
    """The colour a processor pads with (LLaVA: its mean, as bytes), else black."""
    mean = getattr(processor, "image_mean", None)
    if getattr(processor, "do_pad", False) and mean is not None and len(mean) == 3:
        return tuple(int(m * 255) for m in mean)
    return (0, 0, 0)
