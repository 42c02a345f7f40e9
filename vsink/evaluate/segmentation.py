"""Linear-probe semantic segmentation on frozen patch features, and its metrics.

Head (DINOv2 / mmseg "BNHead"): optional BatchNorm over channels, then a 1x1 convolution to the
classes. Logits on the patch grid are upsampled bilinearly to each mask's full size; loss is
cross-entropy with ignore index 255. Metrics come from one confusion matrix accumulated over the
whole evaluation set:

* IoU_c = TP_c / (TP_c + FP_c + FN_c); classes whose union is empty (absent from the labels and
  never predicted) get no IoU and are left out of the mean (mIoU = mean over the rest);
* pixel accuracy = correct pixels / labelled pixels (ignore pixels excluded).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VsinkError
from ..options import BATCH, SEED, Bool, Float, Int, Option, declare
from .datasets import IGNORE_INDEX

#: the linear head's training settings (``vsink eval dense`` flags; :class:`ProbeSettings` checks them)
PROBE = declare(
    BATCH,
    Option("epochs", Int(1), 20, "linear head epochs"),
    Option("lr", Float(0, min_open=True), 1e-3, "linear head learning rate"),
    Option("no_batchnorm", Bool(), False, "linear head without BatchNorm"),
    Option("seed", SEED, 0, "seed for the head and the synthetic data"),
)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``[C, C]`` counts, rows = true class, columns = predicted class; ignore pixels skipped."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    target = np.asarray(target).ravel().astype(np.int64)
    if pred.shape != target.shape:
        raise VsinkError(f"prediction has {pred.size} pixels but the mask has {target.size}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise VsinkError(f"mask label {int(target.max())} is outside 0..{num_classes - 1} (and not {ignore_index})")
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


@dataclass
class SegMetrics:
    """mIoU, per-class IoU (None where the class has an empty union) and pixel accuracy, as
    fractions in [0, 1]."""

    miou: float
    pixel_accuracy: float
    per_class_iou: list[Optional[float]]
    labelled_pixels: int

    def to_dict(self) -> dict:
        return asdict(self)


def seg_metrics(conf: np.ndarray) -> SegMetrics:
    """Metrics from an accumulated confusion matrix."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    total = conf.sum()
    return SegMetrics(
        miou=float(np.mean(present)) if present else math.nan,
        pixel_accuracy=float(tp.sum() / total) if total > 0 else math.nan,
        per_class_iou=iou,
        labelled_pixels=int(total),
    )


class LinearHead(nn.Module):
    """BatchNorm (optional) + 1x1 convolution on a [B, D, h, w] feature grid."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim) if batchnorm else nn.Identity()
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(feats))


@dataclass
class ProbeSettings:
    """Training of the linear head (AdamW, constant learning rate, seeded)."""

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    batchnorm: bool = True
    seed: int = 0

    def check(self) -> None:
        for key in ("epochs", "batch_size", "lr", "seed"):
            PROBE[key].check(getattr(self, key), name=f"linear probe {key}")
        Option("weight_decay", Float(0)).check(self.weight_decay, name="linear probe weight_decay")


def upsampled_logits(head: LinearHead, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits [1, C, H, W] for one image's feature grid [D, h, w], upsampled bilinearly."""
    return F.interpolate(head(feats[None]), size=size, mode="bilinear", align_corners=False)


def train_linear_probe(feats: torch.Tensor, masks: Sequence[np.ndarray], num_classes: int,
                       settings: Optional[ProbeSettings] = None, progress: bool = False) -> tuple[LinearHead, list[float]]:
    """Train a :class:`LinearHead` on cached features ``[N, D, h, w]`` against full-size masks.

    Returns the head (eval mode) and the mean training loss of each epoch. A minibatch's loss is
    the mean cross-entropy over all its labelled pixels.
    """
    from tqdm.auto import tqdm

    settings = settings or ProbeSettings()
    settings.check()
    if len(feats) != len(masks) or not len(masks):
        raise VsinkError(f"linear probe needs one mask per feature grid, got {len(feats)} grids and {len(masks)} masks")
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    head = LinearHead(feats.shape[1], num_classes, settings.batchnorm)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    targets = [torch.from_numpy(m.astype(np.int64)) for m in masks]
    losses = []
    for _ in tqdm(range(settings.epochs), desc="linear probe", unit="epoch", disable=not progress):
        head.train()
        order = torch.randperm(len(feats), generator=g).tolist()
        total, pixels = 0.0, 0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            logits = head(feats[idx])
            loss_sum = logits.new_zeros(())
            count = 0
            by_size: dict[tuple[int, ...], list[int]] = {}
            for row, i in enumerate(idx):  # masks of one size are upsampled and scored together
                by_size.setdefault(tuple(targets[i].shape), []).append(row)
            for size, rows in by_size.items():
                t = torch.stack([targets[idx[r]] for r in rows])
                up = F.interpolate(logits[rows], size=size, mode="bilinear", align_corners=False)
                loss_sum = loss_sum + F.cross_entropy(up, t, ignore_index=IGNORE_INDEX, reduction="sum")
                count += int((t != IGNORE_INDEX).sum())
            if count == 0:
                continue
            loss = loss_sum / count
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss_sum.item()
            pixels += count
        losses.append(total / max(pixels, 1))
    return head.eval(), losses


@torch.no_grad()
def predict(head: LinearHead, feats: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Predicted class per pixel [H, W] for one feature grid [D, h, w]."""
    return upsampled_logits(head, feats, size)[0].argmax(0).numpy()


def evaluate_linear_probe(head: LinearHead, feats: torch.Tensor, masks: Sequence[np.ndarray],
                          num_classes: int, per_image: Optional[list[np.ndarray]] = None) -> SegMetrics:
    """mIoU and pixel accuracy of the head over a whole set (one accumulated confusion matrix);
    ``per_image``: a list that receives each image's confusion matrix (for intervals)."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for f, m in zip(feats, masks):
        one = confusion_matrix(predict(head, f, m.shape), m, num_classes)
        conf += one
        if per_image is not None:
            per_image.append(one)
    return seg_metrics(conf)
