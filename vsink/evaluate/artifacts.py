"""Artifact metrics of patch features and attention (per image; the dense evaluation averages).

* ``neighbour_cosine``: mean cosine similarity between the feature vectors of horizontally and
  vertically adjacent patches (all such pairs of the grid) — high-norm artifacts break it.
* ``foreground_share``: of the class token's attention on patches (head mean), the share that
  lands on the foreground: Σ_p a_p·fg_p / Σ_p a_p, where fg_p is the fraction of patch p's
  pixels that are foreground (mask label not background 0 and not ignore; or inside a box).
* Outlier fraction, norm ratio and entropy come from the spine's probe and detector.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .datasets import IGNORE_INDEX


def neighbour_cosine(grid: torch.Tensor) -> float:
    """Mean cosine similarity of adjacent patches of one feature grid ``[h, w, C]``."""
    g = grid.float()
    pairs = []
    if g.shape[1] > 1:
        pairs.append(F.cosine_similarity(g[:, :-1], g[:, 1:], dim=-1).flatten())
    if g.shape[0] > 1:
        pairs.append(F.cosine_similarity(g[:-1], g[1:], dim=-1).flatten())
    return float(torch.cat(pairs).mean()) if pairs else float("nan")


def foreground_grid(grid: tuple[int, int], image_size: tuple[int, int], mask: Optional[np.ndarray] = None,
                    boxes: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Foreground fraction of each patch ``[h, w]`` for an image of ``(width, height)`` resized
    onto the patch grid (area average); from the mask if given, else from the boxes, else None."""
    width, height = image_size
    if mask is not None:
        fg = ((mask != 0) & (mask != IGNORE_INDEX)).astype(np.float32)
    elif boxes is not None and len(boxes):
        fg = np.zeros((height, width), dtype=np.float32)
        for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
            fg[int(np.floor(max(y0, 0))):int(np.ceil(y1)), int(np.floor(max(x0, 0))):int(np.ceil(x1))] = 1.0
    else:
        return None
    h, w = grid
    return np.asarray(Image.fromarray(fg, mode="F").resize((w, h), Image.BOX), dtype=np.float64).clip(0, 1)


def foreground_share(cls_attention: np.ndarray, fg: np.ndarray) -> float:
    """Share of the class token's patch attention (``[h, w]``, head-averaged) on the foreground."""
    a = np.asarray(cls_attention, dtype=np.float64)
    total = a.sum()
    return float((a * fg).sum() / total) if total > 0 else float("nan")
