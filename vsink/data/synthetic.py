"""A seeded synthetic segmentation/detection dataset: shapes of several classes on textured
backgrounds, with class masks (255 on a thin ignore band around each object, as in VOC) and
boxes. For tests and the offline demo; deterministic for a given (split, seed, size).

Classes (index: shape, base colour): 1 ellipse (red), 2 rectangle (blue), 3 triangle (yellow);
0 is background. Objects are nearly flat-coloured; backgrounds carry stripes and noise.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..evaluate.datasets import IGNORE_INDEX, DatasetError, DenseDataset, DenseSample
from ..io import atomic_path

CLASSES = ("background", "ellipse", "rectangle", "triangle")
COLOURS = {1: (200, 40, 40), 2: (40, 70, 200), 3: (220, 200, 40)}
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}
IGNORE_BAND = 2


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(6, 14)
    stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    base = rng.uniform(60, 160, size=3)
    tint = rng.uniform(20, 50, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    img = base + tint * stripes[..., None] + noise
    return np.clip(img, 0, 255)


def _shape_mask(cls: int, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    if cls == 1:
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=1)
    elif cls == 2:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=1)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=1)
    return np.asarray(canvas, dtype=bool)


def make_sample(rng: np.random.Generator, size: int, max_objects: int = 2) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One image, its class mask and its object boxes (exclusive-end pixel coordinates)."""
    img = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            w, h = (int(v) for v in rng.integers(size // 4, size // 2 + 1, size=2))
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(1, len(CLASSES)))
        shape = _shape_mask(cls, box, size)
        colour = np.asarray(COLOURS[cls], dtype=np.float64) + rng.normal(0, 12, size=3)
        img[shape] = np.clip(colour + rng.normal(0, 3, size=(int(shape.sum()), 3)), 0, 255)
        mask[shape] = cls
        ys, xs = np.nonzero(shape)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    objects = mask > 0
    band = ndimage.binary_dilation(objects, iterations=IGNORE_BAND) & ~ndimage.binary_erosion(
        objects, iterations=IGNORE_BAND)
    mask[band] = IGNORE_INDEX
    return Image.fromarray(img.round().astype(np.uint8)), mask, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def synthetic_dataset(split: str = "val", *, num_images: int = 32, size: int = 224, seed: int = 0,
                      max_objects: int = 2) -> DenseDataset:
    """Generate the synthetic dataset in memory (``split``: train, val or test draw different images)."""
    if split not in SPLIT_OFFSETS:
        raise DatasetError(f"synthetic split must be one of {', '.join(SPLIT_OFFSETS)}, got {split!r}")
    if num_images < 1 or size < 16:
        raise DatasetError(f"synthetic dataset needs at least 1 image of at least 16 px, got {num_images} of {size}")
    rng = np.random.default_rng([seed, SPLIT_OFFSETS[split]])
    samples = []
    for i in range(num_images):
        image, mask, boxes = make_sample(rng, size, max_objects)
        samples.append(DenseSample(f"{split}_{i:04d}", image, mask, boxes))
    return DenseDataset("synthetic", "synthetic", split, samples, num_classes=len(CLASSES),
                        class_names=list(CLASSES), info={"seed": seed, "size": size, "max_objects": max_objects})


def _palette() -> list[int]:
    pal = [0] * 768
    for cls, rgb in COLOURS.items():
        pal[3 * cls: 3 * cls + 3] = rgb
    pal[3 * IGNORE_INDEX: 3 * IGNORE_INDEX + 3] = (224, 224, 192)
    return pal


def write_voc(dataset: DenseDataset, root: Union[str, Path]) -> Path:
    """Write an in-memory dataset in Pascal VOC layout (JPEG images, palette masks, XML boxes,
    ``ImageSets/{Segmentation,Main}/<split>.txt``); other splits already there are kept."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in dataset.samples:
        loaded = s.load()
        with atomic_path(root / "JPEGImages" / f"{s.id}.jpg") as tmp:
            loaded.image.save(tmp, format="JPEG", quality=95)
        if loaded.mask is not None:
            m = Image.fromarray(loaded.mask, mode="P")
            m.putpalette(_palette())
            with atomic_path(root / "SegmentationClass" / f"{s.id}.png") as tmp:
                m.save(tmp, format="PNG")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{s.id}.jpg"
        for box in (loaded.boxes if loaded.boxes is not None else []):
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "difficult").text = "0"
            bb = ET.SubElement(obj, "bndbox")
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0 + 1, y0 + 1, x1, y1)):
                ET.SubElement(bb, key).text = str(value)
        with atomic_path(root / "Annotations" / f"{s.id}.xml") as tmp:
            ET.ElementTree(ann).write(tmp)
    ids = "".join(f"{s.id}\n" for s in dataset.samples)
    for sub in ("Segmentation", "Main"):
        with atomic_path(root / "ImageSets" / sub / f"{dataset.split}.txt") as tmp:
            tmp.write_text(ids)
    return root
