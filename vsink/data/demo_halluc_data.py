"""The planted-hallucination demo's images and annotations, written in the official layouts that
``vsink eval pope`` and ``vsink eval chair`` read: a folder with ``images/NNNN.png`` (4×4 cells of
16 px, each an object class's, the background's or a sink cell's Walsh texture over a flat colour),
``instances.json`` (COCO instances: one annotation per object cell) and ``cells.json`` (each image's
grid of cell types, the construction the expected answers are computed from). SYNTHETIC and
deterministic: image i has ``i % (MAX_SINKS + 1)`` sink cells and three object classes of one or
two cells each.

``python -m vsink.data.demo_halluc_data OUT`` writes it (offline).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..io import atomic_path
from .demo_halluc import BACKGROUND, CELL, CLASSES, GRID, SINK, walsh_pattern

NUM_IMAGES = 20
MAX_SINKS = 4
OBJECTS_PER_IMAGE = 3
AMPLITUDE = 50
#: each cell type's flat colour under its texture (the tower's zero-mean filters do not see it)
COLOURS = ((200, 80, 80), (150, 110, 70), (90, 90, 90), (70, 110, 190), (80, 170, 90), (190, 180, 70),
           (140, 90, 160), (70, 170, 170), (128, 128, 128), (200, 200, 200))


def grids(num_images: int = NUM_IMAGES, seed: int = 0) -> list[list[int]]:
    """Each image's cell types, row-major (class index, ``BACKGROUND`` or ``SINK``)."""
    rng = random.Random(seed)
    out = []
    for i in range(num_images):
        cells = [SINK] * (i % (MAX_SINKS + 1))
        for c in rng.sample(range(len(CLASSES)), OBJECTS_PER_IMAGE):
            cells += [c] * rng.choice((1, 2))
        cells += [BACKGROUND] * (GRID * GRID - len(cells))
        rng.shuffle(cells)
        out.append(cells)
    return out


def render(cells: list[int]) -> Image.Image:
    """The image of a grid of cell types."""
    img = np.zeros((GRID * CELL, GRID * CELL, 3), dtype=np.int16)
    for k, kind in enumerate(cells):
        r, c = divmod(k, GRID)
        texture = walsh_pattern(kind).numpy().astype(np.int16)[..., None] * AMPLITUDE
        img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = np.asarray(COLOURS[kind], dtype=np.int16) + texture
    return Image.fromarray(img.astype(np.uint8))


def write_dataset(root: Union[str, Path], num_images: int = NUM_IMAGES, seed: int = 0) -> Path:
    """Write the images, ``instances.json`` and ``cells.json`` under ``root``; returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    layout = grids(num_images, seed)
    for i, cells in enumerate(layout):
        name = f"{i:04d}.png"
        with atomic_path(root / "images" / name) as tmp:
            render(cells).save(tmp, format="PNG")
        images.append({"id": i, "file_name": name, "width": GRID * CELL, "height": GRID * CELL})
        for k, kind in enumerate(cells):
            if kind < len(CLASSES):
                r, c = divmod(k, GRID)
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": kind + 1,
                                    "bbox": [c * CELL, r * CELL, CELL, CELL], "area": CELL * CELL, "iscrowd": 0})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": c + 1, "name": name} for c, name in enumerate(CLASSES)]}
    with atomic_path(root / "instances.json") as tmp:
        tmp.write_text(json.dumps(instances))
    construction = {"classes": list(CLASSES), "background": BACKGROUND, "sink": SINK, "grid": GRID,
                    "images": {img["file_name"]: cells for img, cells in zip(images, layout)}}
    with atomic_path(root / "cells.json") as tmp:
        tmp.write_text(json.dumps(construction))
    return root


def main(argv: Union[list[str], None] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsink.data.demo_halluc_data",
                                     description="write the planted-hallucination demo's images and annotations")
    parser.add_argument("out", help="output folder")
    out = parser.parse_args(argv).out
    try:
        root = write_dataset(out)
    except OSError as e:
        print(f"vsink: cannot write the demo data to {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {NUM_IMAGES} images, {root / 'instances.json'} and {root / 'cells.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
