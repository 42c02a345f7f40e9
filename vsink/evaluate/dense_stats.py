"""Intervals and paired differences of the dense evaluation's numbers (:mod:`vsink.evaluate.stats`
over images).

Each evaluated image is a unit; its row holds what the metric sums:

* linear-seg: per class, the image's intersection and union pixel counts (the union is additive
  over images: predicted + true − intersection), then correct and counted pixels. mIoU of a
  resample = mean over the classes whose union is non-zero of Σ intersection / Σ union; pixel
  accuracy = Σ correct / Σ pixels (as :func:`vsink.evaluate.segmentation.seg_metrics`).
* LOST CorLoc: 1 where the stated setting's box is correct, and 1.
* artifacts: per image, the flagged share of its patches at the last block and at the worst block
  (the detector's flags and the worst block are those of the whole set, held fixed: the interval
  is conditional on them), the attention entropy (head mean), the CLS attention share on the
  foreground (images with a mask or box) and the neighbour-patch cosine, each averaged over images.
  The max/median norm ratio, a statistic of the pooled set, has no interval.

Paired differences use the images evaluated under both variants (matched by id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .stats import Bootstrap, bootstrap, interval_dict, paired_bootstrap, ratio


@dataclass
class Units:
    """One metric's units: image ids, rows ``[n, k]``, the statistic (sums → ``[..., 1]``)."""

    ids: list[str]
    rows: np.ndarray
    statistic: Callable[[np.ndarray], np.ndarray]


def _mean(sums: np.ndarray) -> np.ndarray:
    return ratio(sums[..., 0], sums[..., 1])[..., None]


def seg_units(ids: Sequence[str], confusions: Sequence[np.ndarray]) -> dict[str, Units]:
    """mIoU and pixel accuracy units from per-image ``[C, C]`` confusion matrices."""
    c = confusions[0].shape[0]
    rows = []
    for conf in confusions:
        inter = np.diag(conf).astype(np.float64)
        union = conf.sum(0) + conf.sum(1) - inter
        rows.append(np.concatenate([inter, union, [inter.sum(), conf.sum()]]))
    rows = np.array(rows)

    def miou(sums: np.ndarray) -> np.ndarray:
        inter, union = sums[..., :c], sums[..., c:2 * c]
        present = union > 0
        return ratio((ratio(inter, union) * present).sum(-1), present.sum(-1))[..., None]

    def accuracy(sums: np.ndarray) -> np.ndarray:
        return ratio(sums[..., 2 * c], sums[..., 2 * c + 1])[..., None]

    return {"linear_seg.miou": Units(list(ids), rows, miou),
            "linear_seg.pixel_accuracy": Units(list(ids), rows, accuracy)}


def mean_units(key: str, ids: Sequence[str], values: Sequence[Optional[float]]) -> dict[str, Units]:
    """Units of a mean over images of per-image ``values`` (None or NaN: the image has none)."""
    kept = [(i, v) for i, v in zip(ids, values) if v is not None and np.isfinite(v)]
    if not kept:
        return {}
    return {key: Units([i for i, _ in kept], np.array([[v, 1.0] for _, v in kept]), _mean)}


def intervals(units: dict[str, Units], settings: Bootstrap) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "low", "high"}}`` for one variant."""
    return {key: interval_dict(bootstrap(u.rows, u.statistic, settings), [key])[key] for key, u in units.items()}


def comparisons(base: dict[str, Units], other: dict[str, Units], settings: Bootstrap) -> dict[str, dict[str, Any]]:
    """``{metric: {"value", "low", "high", "n"}}``: the variant minus the baseline, paired by image."""
    out: dict[str, dict[str, Any]] = {}
    for key, u in other.items():
        if key not in base:
            continue
        at = {i: n for n, i in enumerate(base[key].ids)}
        common = [(at[i], n) for n, i in enumerate(u.ids) if i in at]
        if not common:
            continue
        a = base[key].rows[[i for i, _ in common]]
        b = u.rows[[j for _, j in common]]
        iv = paired_bootstrap(a, b, u.statistic, settings)
        out[key] = {**interval_dict(iv, [key])[key], "n": len(common)}
    return out
