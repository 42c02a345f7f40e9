"""Training images: decoded and resized once, held as uint8; normalised and flipped per batch
(the flip of a sample is a function of its stream position, so resumed and distributed runs
see the same augmentations)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import VsinkError
from ..images import IMAGE_SUFFIXES, expand_paths, load_batch
from .config import DataConfig


@dataclass
class TrainImages:
    pixels: torch.Tensor  # uint8 [N, 3, H, W]
    eval_pixels: torch.Tensor  # uint8 [M, 3, H, W]
    labels: Optional[torch.Tensor] = None
    eval_labels: Optional[torch.Tensor] = None
    class_names: Optional[list[str]] = None
    skipped: Optional[list[dict[str, str]]] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names or [])


def _stack(images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    arrays = [np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _synthetic(data: DataConfig, size: tuple[int, int], seed: int, classification: bool) -> TrainImages:
    from ..data.synthetic import CLASSES, synthetic_dataset

    def split(name: str, n: int):
        data = synthetic_dataset(name, num_images=n, size=size[0], seed=seed, max_objects=1 if classification else 2)
        loaded = [s.load() for s in data.samples]
        labels = None
        if classification:  # the class of the one object
            labels = torch.tensor([int(np.bincount(x.mask[(x.mask > 0) & (x.mask < 255)]).argmax()) - 1
                                   for x in loaded])
        return _stack([x.image for x in loaded], size), labels

    pixels, labels = split("train", data.num_images)
    eval_pixels, eval_labels = split("val", max(1, data.eval_images))
    return TrainImages(pixels, eval_pixels, labels, eval_labels, list(CLASSES[1:]) if classification else None)


def _folder(data: DataConfig, size: tuple[int, int], seed: int, classification: bool) -> TrainImages:
    if data.path is None:
        raise VsinkError("'data.path' is required when 'data.source' is folder")
    root = Path(data.path)
    if not root.is_dir():
        raise VsinkError(f"{root}: data.path directory not found")
    if classification:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise VsinkError(f"{root}: a classification folder needs one subdirectory per class (found {len(classes)})")
        items = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).rglob("*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        classes, items = None, [(p, -1) for p in expand_paths([root])]
    images, names, skipped = load_batch([p for p, _ in items])
    for s in skipped:
        print(f"vsink: skipped {s['reason']}", file=sys.stderr)
    label_of = {str(p): y for p, y in items}
    labels = [label_of[n] for n in names]
    if len(images) < 2:
        raise VsinkError(f"{root}: need at least 2 readable images (one for evaluation), found {len(images)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(1, data.eval_images), len(images) - 1)
    ev, tr = order[:n_eval], order[n_eval:][: data.num_images]
    pixels, eval_pixels = _stack([images[i] for i in tr], size), _stack([images[i] for i in ev], size)
    lab = torch.tensor(labels)
    return TrainImages(pixels, eval_pixels, lab[tr] if classification else None, lab[ev] if classification else None,
                       classes, skipped)


def load_training_images(data: DataConfig, size: tuple[int, int], seed: int, classification: bool) -> TrainImages:
    """The ``data`` section of a recipe → resized uint8 images (+ labels for classification)."""
    if data.source == "synthetic":
        return _synthetic(data, size, seed, classification)
    if data.source == "folder":
        return _folder(data, size, seed, classification)
    if classification:
        raise VsinkError("data.source demo has no labels; use synthetic or folder for the scratch recipe")
    from ..data.demo_images import demo_images

    stacked = _stack([im.image for im in demo_images()], size)
    return TrainImages(stacked, stacked)


def to_input(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device,
             dtype: torch.dtype, flips: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] → normalised float input; ``flips[i]`` mirrors image i horizontally."""
    x = pixels.to(device=device, dtype=torch.float32) / 255.0
    if flips is not None and any(flips):
        f = torch.tensor(list(flips), device=device)
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def flips_for(positions: Sequence[int], seed: int, enabled: bool) -> Optional[list[bool]]:
    """Deterministic horizontal flips for stream positions."""
    if not enabled:
        return None
    return [bool(np.random.default_rng([seed, 7, p]).random() < 0.5) for p in positions]
