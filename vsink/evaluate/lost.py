"""LOST unsupervised single-object discovery (Siméoni et al. 2021) and CorLoc.

On the patch features F [n, C] of one image (class tokens and registers already removed):

1. A = F Fᵀ + b (F optionally L2-normalised per patch first);
2. degree d_i = #{j ≠ i : A_ij > 0} (diagonal zeroed and negatives clipped, for the degree only);
3. patches sorted by increasing degree (``ties="stable"``: equal degrees keep patch order);
   seed = the first;
4. candidates = the k lowest-degree patches; S = candidates j with A[seed, j] > 0 (raw A);
5. M = Σ_{j∈S} A[j, :]; the box is the bounding box of the 4-connected component of M > 0
   on the patch grid that contains the seed (the seed patch alone if M[seed] ≤ 0, which only a
   strongly negative bias can cause), scaled from patches to pixels and clipped to the image.

CorLoc = fraction of images whose box has IoU ≥ 0.5 with at least one ground-truth box
(``iou="exact"``; ``iou="reference"`` is the IoU of LOST's ``bbox_iou`` on floating-point boxes).

Against the released code (valeoai/LOST ``object_discovery.py``): the reference sorts with an
unstable descending argsort of −degree, so the order among equal degrees — and with it the seed
and the candidates — is whatever torch's sort yields on that device and version. No rule
reproduces it, so only the stable order is offered. See docs/fidelity.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from ..errors import VsinkError

CORLOC_IOU = 0.5
TIES = ("stable",)
IOU_RULES = ("exact", "reference")
REFERENCE_IOU_EPS = 1e-7  # LOST's bbox_iou (from YOLOv5): added to each box height and to the union


@dataclass(frozen=True)
class LostBox:
    """A LOST result: the box in patch units ``(x0, y0, x1, y1)`` (exclusive ends) and the seed."""

    box: tuple[int, int, int, int]
    seed: tuple[int, int]

    def to_pixels(self, grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
        """Pixel box for an image of ``(width, height)`` whose resized input had this patch grid."""
        h, w = grid
        width, height = image_size
        x0, y0, x1, y1 = self.box
        sx, sy = width / w, height / h
        return np.array([max(0.0, x0 * sx), max(0.0, y0 * sy), min(float(width), x1 * sx),
                         min(float(height), y1 * sy)])


def check_ties(ties: str) -> None:
    """Raise unless ``ties`` names a defined tie order."""
    if ties not in TIES:
        raise VsinkError(f"ties: only {', '.join(map(repr, TIES))} is defined, got {ties!r} (the reference's "
                         "unstable argsort orders equal degrees by no rule; see docs/fidelity.md)")


def check_iou_rule(iou: str) -> None:
    """Raise unless ``iou`` names an IoU rule."""
    if iou not in IOU_RULES:
        raise VsinkError(f"iou: use one of {', '.join(IOU_RULES)}, got {iou!r}")


def lost(features: torch.Tensor, *, k: int = 100, bias: float = 0.0, normalize: bool = False,
         ties: str = "stable") -> LostBox:
    """Run LOST on one image's feature grid ``[h, w, C]`` (see the module docstring).

    ``ties="stable"`` (the only order defined): patches of equal degree keep their row-major order.
    """
    if features.ndim != 3:
        raise VsinkError(f"LOST needs a [h, w, C] feature grid, got shape {tuple(features.shape)}")
    if k < 1:
        raise VsinkError(f"LOST needs k >= 1 candidate patches, got {k}")
    check_ties(ties)
    h, w, _ = features.shape
    f = features.reshape(h * w, -1).double()
    if normalize:
        f = torch.nn.functional.normalize(f, dim=-1)
    a = f @ f.T + bias
    positive = a > 0
    positive.fill_diagonal_(False)
    degree = positive.sum(dim=1)
    order = torch.sort(degree, stable=True).indices
    seed = int(order[0])
    candidates = order[:k]
    similar = candidates[a[seed, candidates] > 0]
    m = a[similar].sum(dim=0).reshape(h, w).numpy()
    sr, sc = divmod(seed, w)
    if m[sr, sc] <= 0:
        return LostBox((sc, sr, sc + 1, sr + 1), (sr, sc))
    labels, _ = ndimage.label(m > 0)
    rows, cols = np.nonzero(labels == labels[sr, sc])
    return LostBox((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1), (sr, sc))


def box_iou(box: np.ndarray, boxes: np.ndarray, iou: str = "exact") -> np.ndarray:
    """IoU of one ``(x0, y0, x1, y1)`` box with each of ``boxes [K, 4]`` (exclusive-end coordinates).

    ``iou="exact"`` (default): intersection / union. ``iou="reference"``: LOST's ``bbox_iou`` on
    floating-point boxes, intersection / (w₁(h₁+ε) + w₂(h₂+ε) − intersection + ε) with
    ε = 1e-7, slightly below the exact IoU whenever the boxes overlap (so an IoU of exactly 0.5
    falls below 0.5). Computed in float64.
    """
    check_iou_rule(iou)
    box = np.asarray(box, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    eps = REFERENCE_IOU_EPS if iou == "reference" else 0.0
    area = (box[2] - box[0]) * (box[3] - box[1] + eps)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1] + eps)
    union = area + areas - inter + eps
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def is_correct(box: np.ndarray, gt_boxes: np.ndarray, threshold: float = CORLOC_IOU, iou: str = "exact") -> bool:
    """Whether ``box`` overlaps any ground-truth box with IoU ≥ ``threshold`` (IoU rule ``iou``)."""
    gt = np.asarray(gt_boxes).reshape(-1, 4)
    return bool(gt.size and (box_iou(box, gt, iou) >= threshold).any())


def corloc(pred_boxes: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], threshold: float = CORLOC_IOU,
           iou: str = "exact") -> float:
    """Fraction of images whose predicted box has IoU ≥ ``threshold`` with any of its ground truth."""
    if len(pred_boxes) != len(gt_boxes) or not len(pred_boxes):
        raise VsinkError(f"corloc needs one prediction per image, got {len(pred_boxes)} and {len(gt_boxes)}")
    return sum(is_correct(p, g, threshold, iou) for p, g in zip(pred_boxes, gt_boxes)) / len(pred_boxes)
