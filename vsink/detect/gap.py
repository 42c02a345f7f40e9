"""Is there a separated upper cluster in a set of norms? A gap test on sorted log norms.

The question the high-norm detector asks of one layer is not "where would a mixture split these
norms" (a mixture splits any heavy tail) but "is there a group of tokens sitting above a real
gap, far above the bulk". This module answers it with a statistic that a continuous tail, however
heavy, does not produce.

Notation: ``x_1 >= x_2 >= ... >= x_n`` are the sorted log norms. For a candidate cluster of the
``k`` largest values the *gap* is ``x_k - x_{k+1}``.

**Gap statistic.** For a continuous distribution the normalised spacings ``j (x_j - x_{j+1})`` of
the upper order statistics are, to a good approximation, independent exponentials with one
common scale (exactly so for a power-law tail, whose log is exponential: Rényi's
representation; slowly varying for log-normal-like tails). So ``k * gap`` divided by the local
scale of the spacings just below the gap — the median of ``j (x_j - x_{j+1})`` over the next
``window`` ranks, divided by ln 2 — has a unit-exponential-like distribution when there is no
cluster, and is large when the ``k`` values stand apart::

    T_k = k (x_k - x_{k+1}) / (median_{j=k+1..k+window} j (x_j - x_{j+1}) / ln 2)

A heavy tail has large spacings at its top, but its local scale is large there too, so ``T``
stays small; a real cluster leaves a gap many times the spacings of the bulk below it.

**Decision.** Candidate ``k`` range over ``min_count <= k <= max_fraction * n`` (a cluster is a
minority of at least ``min_count`` tokens) whose lowest member is at least ``min_ratio`` times the
median of the values below the gap (far from the bulk). Many ``k`` are tried, so the critical
value is Bonferroni-corrected: with ``K`` candidates, ``T`` must reach
``window * ((K / alpha)^(1 / window) - 1)``, the level a scale estimated from ``window`` spacings
exceeds with probability about ``alpha / K`` under the null. Among the candidates that pass (and,
when ``written`` is given, whose cluster is mostly written tokens), the one with the largest
``T`` wins, and the threshold is the geometric middle of its gap.

Everything is computed on sorted values with prefix sums and one sliding median: O(n log n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: defaults of :func:`find_gap`, documented in docs/detection.md
ALPHA = 1e-5
MIN_RATIO = 3.0
MAX_FRACTION = 0.5
MIN_COUNT = 2
WINDOW = 64
#: candidate gaps whose local scale is computed at once (bounds memory to CHUNK x WINDOW values)
CHUNK = 4096


@dataclass(frozen=True)
class Gap:
    """A separated upper cluster: every value above :attr:`threshold` belongs to it.

    Attributes:
        threshold: geometric middle of the gap (a norm).
        size: ``k``, how many values lie above the gap.
        separation: the gap statistic ``T_k``.
        critical: the value ``T_k`` had to reach (Bonferroni over the candidates).
        bulk_median: median of the values below the gap.
    """

    threshold: float
    size: int
    separation: float
    critical: float
    bulk_median: float


def find_gap(
    values: np.ndarray,
    written: Optional[np.ndarray] = None,
    *,
    alpha: float = ALPHA,
    min_ratio: float = MIN_RATIO,
    max_fraction: float = MAX_FRACTION,
    min_count: int = MIN_COUNT,
    window: int = WINDOW,
) -> Optional[Gap]:
    """The most significant separated upper cluster of ``values`` (positive norms), or ``None``.

    Args:
        values: norms, any shape (pooled).
        written: optional boolean array of the same shape; a candidate cluster must be at least
            half ``True`` (used for the mechanistic check of :mod:`vsink.detect.norms`).
        alpha: family-wise false-positive level of the gap test.
        min_ratio: the cluster's lowest member must be this many times the bulk's median.
        max_fraction: largest cluster, as a fraction of all values.
        min_count: smallest cluster.
        window: ranks below the gap whose spacings give the local scale (at most a third of the
            values are used; fewer than 8 means too few values to test).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones(v.size, dtype=bool) if written is None else np.asarray(written, dtype=bool).ravel()
    keep = np.isfinite(v) & (v > 0)
    v, w = v[keep], w[keep]
    n = v.size
    window = min(window, n // 3)
    k_max = min(int(max_fraction * n), n - 1 - window)
    if window < 8 or k_max < min_count:
        return None
    order = np.argsort(-v, kind="stable")
    x = np.log(v[order])  # descending
    written_above = np.concatenate([[0], np.cumsum(w[order])])  # written among the k largest
    spacing = x[:-1] - x[1:]  # spacing[j - 1] = x_j - x_{j+1}
    normalised = np.arange(1, n) * spacing
    ks = np.arange(min_count, k_max + 1)
    bulk_median = x[ks + (n - ks) // 2]
    far = (x[ks - 1] - bulk_median >= np.log(min_ratio)) & (2 * written_above[ks] >= ks)
    if not far.any():
        return None
    ks, bulk_median = ks[far], bulk_median[far]
    windows = sliding_window_view(normalised, window)
    scale = np.concatenate([np.median(windows[ks[i:i + CHUNK]], axis=1)  # chunks bound the memory
                            for i in range(0, len(ks), CHUNK)]) / np.log(2.0)
    separation = ks * spacing[ks - 1] / np.maximum(scale, 1e-300)
    critical = window * ((len(ks) / alpha) ** (1.0 / window) - 1.0)
    if separation.max() < critical:
        return None
    best = int(np.argmax(separation))
    k = int(ks[best])
    return Gap(threshold=float(np.exp(0.5 * (x[k - 1] + x[k]))), size=k, separation=float(separation[best]),
               critical=float(critical), bulk_median=float(np.exp(bulk_median[best])))
