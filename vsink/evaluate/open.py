"""Opening a dense-evaluation dataset by format name: the readers of :mod:`vsink.evaluate.datasets`
and the built-in synthetic dataset (:mod:`vsink.data.synthetic`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..data import synthetic  # the module, not its names: data.synthetic itself imports this package
from .datasets import FORMATS, DatasetError, DenseDataset, PathLike, read_ade, read_coco, read_folder, read_voc


DEFAULT_SPLITS = {"voc": ("train", "val"), "ade": ("training", "validation"), "folder": ("train", "val"),
                  "synthetic": ("train", "val"), "coco": (None, None)}


def open_dataset(fmt: str, path: Optional[PathLike] = None, split: Optional[str] = None, *,
                 images: Optional[PathLike] = None, image_set: str = "auto",
                 synthetic_images: int = 32, synthetic_size: int = 224, seed: int = 0) -> DenseDataset:
    """Open a dataset by format name (see :data:`FORMATS`); ``split`` defaults to the format's
    evaluation split."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; formats: {', '.join(FORMATS)}")
    split = split or DEFAULT_SPLITS[fmt][1]
    if fmt == "synthetic":
        return synthetic.synthetic_dataset(split, num_images=synthetic_images, size=synthetic_size, seed=seed)
    if path is None:
        raise DatasetError(f"format {fmt!r} needs a data path")
    if fmt == "voc":
        return read_voc(path, split, image_set=image_set)
    if fmt == "ade":
        return read_ade(path, split)
    if fmt == "coco":
        return read_coco(path, images)
    root = Path(path)
    return read_folder(root, split if (root / "images" / split).is_dir() else None)
