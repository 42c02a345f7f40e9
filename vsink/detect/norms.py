"""High-norm (outlier) tokens: per-layer patch-norm statistics, thresholds and the emergence layer.

Thresholds (``method``):

``auto`` (default)
    a 2-component Gaussian mixture on the log patch norms of a layer (all images pooled) that
    must beat a 1-component fit by ``bic_margin`` BIC points, with well-separated components
    (Ashman's D >= ``min_separation``), the upper component a minority (weight <=
    ``max_fraction``) and the threshold at least ``min_ratio`` x the median patch norm. If any
    condition fails the layer has no outliers: a unimodal distribution never gets split in
    half. The threshold sits in the widest gap of the sorted log norms between the two component means (the geometric middle
    of that gap), so it follows the data rather than the mixture's tails.
``sigma``
    mean + ``k`` standard deviations of the layer's patch norms (always flags the upper tail).
``absolute``
    a fixed ``threshold`` (e.g. 150 for DINOv2 ViT-g; it does not carry over to other models).

Class tokens and registers are excluded from the statistics and reported separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..errors import VsinkError
from ..probe import Trace

METHODS = ("auto", "sigma", "absolute")


@dataclass
class LayerNormStats:
    index: int
    median: float
    max: float
    ratio: float
    threshold: Optional[float]
    outlier_fraction: float
    cls: Optional[float]
    registers: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutlierToken:
    image: int
    layer: int
    token: int
    row: int
    col: int
    norm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HighNormResult:
    method: str
    settings: dict
    layers: list[LayerNormStats]
    tokens: list[OutlierToken]
    emergence_layer: Optional[int]

    def tokens_at(self, layer: int) -> list[OutlierToken]:
        return [t for t in self.tokens if t.layer == layer]


def adaptive_threshold(
    norms: np.ndarray,
    *,
    min_ratio: float = 4.0,
    bic_margin: float = 10.0,
    min_separation: float = 2.0,
    max_fraction: float = 0.5,
    max_samples: int = 20000,
    seed: int = 0,
) -> Optional[float]:
    """Norm threshold separating outliers from the bulk, or ``None`` if there is no real separation."""
    from sklearn.mixture import GaussianMixture

    values = np.asarray(norms, dtype=np.float64).ravel()
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 8:
        return None
    median = float(np.median(values))
    if values.max() < min_ratio * median:
        return None
    x = np.log(values)
    if x.size > max_samples:
        x = np.random.default_rng(seed).choice(x, size=max_samples, replace=False)
    x = x[:, None]
    one = GaussianMixture(1, random_state=seed).fit(x)
    two = GaussianMixture(2, random_state=seed, n_init=3).fit(x)
    if one.bic(x) - two.bic(x) < bic_margin:
        return None
    means = two.means_.ravel()
    sds = np.sqrt(two.covariances_.ravel())
    lo, hi = int(np.argmin(means)), int(np.argmax(means))
    separation = np.sqrt(2.0) * (means[hi] - means[lo]) / np.sqrt(sds[lo] ** 2 + sds[hi] ** 2)
    if separation < min_separation or two.weights_[hi] > max_fraction:
        return None
    logs = np.sort(np.log(values))
    between = logs[(logs >= means[lo]) & (logs <= means[hi])]
    if between.size >= 2:
        gap = int(np.argmax(np.diff(between)))
        split = 0.5 * (between[gap] + between[gap + 1])
    else:
        split = 0.5 * (means[lo] + means[hi])
    threshold = max(float(np.exp(split)), min_ratio * median)
    return threshold if (values > threshold).any() else None


def detect_high_norm(
    trace: Trace,
    *,
    method: str = "auto",
    threshold: Optional[float] = None,
    k: float = 3.0,
    min_ratio: float = 4.0,
    bic_margin: float = 10.0,
    min_separation: float = 2.0,
    max_fraction: float = 0.5,
    seed: int = 0,
) -> HighNormResult:
    """Find high-norm patch tokens in every traced layer (see the module docstring for methods)."""
    if trace.norms is None:
        raise VsinkError("the trace holds no token norms (probe with norms=True)")
    if method not in METHODS:
        raise VsinkError(f"unknown threshold method {method!r}; use one of {', '.join(METHODS)}")
    if method == "absolute" and (threshold is None or threshold <= 0):
        raise VsinkError("method 'absolute' needs a positive threshold")
    layout = trace.layout
    cls_idx, reg_idx = layout.cls_indices(), layout.register_indices()
    layers: list[LayerNormStats] = []
    tokens: list[OutlierToken] = []
    emergence: Optional[int] = None
    for pos, layer in enumerate(trace.layers):
        norms = trace.norms[pos]  # [I, N]
        patches = norms[:, layout.patch_slice]
        median = float(np.median(patches))
        if method == "auto":
            thr = adaptive_threshold(patches, min_ratio=min_ratio, bic_margin=bic_margin,
                                     min_separation=min_separation, max_fraction=max_fraction, seed=seed)
        elif method == "sigma":
            thr = float(patches.mean() + k * patches.std())
        else:
            thr = float(threshold)
        found = np.argwhere(patches > thr) if thr is not None else np.empty((0, 2), dtype=int)
        for image, p in found:
            token = layout.num_prefix + int(p)
            row, col = layout.patch_position(token)
            tokens.append(OutlierToken(int(image), int(layer), token, row, col, float(patches[image, p])))
        if len(found) and emergence is None:
            emergence = int(layer)
        layers.append(LayerNormStats(
            index=int(layer),
            median=median,
            max=float(patches.max()),
            ratio=float(patches.max() / median) if median > 0 else float("inf"),
            threshold=thr,
            outlier_fraction=float(len(found) / patches.size),
            cls=float(norms[:, cls_idx].mean()) if cls_idx else None,
            registers=[float(v) for v in norms[:, reg_idx].mean(axis=0)] if reg_idx else [],
        ))
    settings = {"method": method, "min_ratio": min_ratio, "bic_margin": bic_margin,
                "min_separation": min_separation, "max_fraction": max_fraction}
    if method == "sigma":
        settings = {"method": method, "k": k}
    elif method == "absolute":
        settings = {"method": method, "threshold": threshold}
    return HighNormResult(method=method, settings=settings, layers=layers, tokens=tokens, emergence_layer=emergence)
