"""Uncertainty of evaluation numbers: percentile-bootstrap confidence intervals, paired bootstrap
intervals of differences, and McNemar's exact test.

Every metric vsink reports is a function of **sums over units** (questions or images): POPE
accuracy is Σ correct / Σ questions, CHAIR_i is Σ hallucinated mentions / Σ mentions, mIoU the
mean over classes of Σ intersection / Σ union, a mean of per-image values is Σ value / Σ 1. A
caller gives one row per unit (``units``: ``[n, k]`` counts) and a vectorised ``statistic`` that
maps column sums ``[..., k]`` to metric values ``[..., m]``; the bootstrap then never needs to
know what the metric is.

* **Interval** (:func:`bootstrap`): resample ``n`` units with replacement ``resamples`` times
  (``numpy.random.default_rng(seed).integers(0, n, (resamples, n))``, the draw
  ``scipy.stats.bootstrap`` makes), compute the statistic on each resample, and take the
  ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of those values (numpy's linear
  interpolation). The point estimate is the statistic of the data itself.
* **Paired interval** (:func:`paired_bootstrap`): the same units measured twice (baseline ``a``,
  mitigated ``b``); each resample draws units once and takes the statistic of ``b`` minus that of
  ``a`` on the same draw; the interval is the quantiles of those differences. A difference whose
  interval contains 0 is not a demonstrated change (:func:`excludes_zero`).
* **McNemar's exact test** (:func:`mcnemar_exact`): of items scored right/wrong under both,
  ``b`` = right under baseline and wrong under the mitigation, ``c`` = wrong then right;
  two-sided p = min(1, 2 · P[X ≤ min(b, c)]) with X ~ Binomial(b + c, 1/2); p = 1 when b + c = 0.

A zero denominator in a resample follows the metric's own rule (the callers' statistics use
:func:`ratio`: 0 where the denominator is 0, as the point estimates do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import VsinkError
from ..options import SEED, Float, Int, Option, declare

#: the bootstrap's settings (``vsink eval pope|chair|dense|NAME --ci-level/--resamples/--bootstrap-seed``, NAME a
#: benchmark of :mod:`vsink.evaluate.benchmarks`)
STATS = declare(
    Option("ci_level", Float(0.0, 1.0, min_open=True, max_open=True), 0.95, "confidence level of the bootstrap intervals"),
    Option("resamples", Int(10, 1_000_000), 1000, "bootstrap resamples (intervals and paired differences)"),
    Option("bootstrap_seed", SEED, 0, "seed of the bootstrap resampling (recorded in results.json)"),
)

#: resamples whose unit sums are computed at once (bounds memory at CHUNK × units integers)
CHUNK = 100

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Bootstrap:
    """Settings of the percentile bootstrap: confidence ``level``, ``resamples``, ``seed``."""

    level: float = 0.95
    resamples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        STATS["ci_level"].check(self.level, name="confidence level")
        STATS["resamples"].check(self.resamples, name="resamples")
        STATS["bootstrap_seed"].check(self.seed, name="bootstrap seed")

    @classmethod
    def from_args(cls, args: Any) -> "Bootstrap":
        """From the parsed flags of :data:`STATS`."""
        return cls(args.ci_level, args.resamples, args.bootstrap_seed)

    def to_dict(self, unit: Optional[str] = None) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "percentile bootstrap", "level": self.level, "resamples": self.resamples,
                               "seed": self.seed}
        if unit is not None:
            out["unit"] = unit
        return out


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, 0 where ``den`` is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _counts(n: int, settings: Bootstrap) -> Any:
    """Per resample, how often each unit is drawn: ``[chunk, n]`` blocks, the draw of
    ``rng.integers(0, n, (resamples, n))`` taken in order."""
    rng = np.random.default_rng(settings.seed)
    for start in range(0, settings.resamples, CHUNK):
        rows = min(CHUNK, settings.resamples - start)
        idx = rng.integers(0, n, (rows, n))
        flat = (idx + n * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _quantiles(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def _check(units: np.ndarray, what: str) -> np.ndarray:
    units = np.asarray(units, dtype=np.float64)
    if units.ndim != 2 or not len(units):
        raise VsinkError(f"{what}: the bootstrap needs at least one unit (a [units, columns] array)")
    return units


@dataclass(frozen=True)
class Interval:
    """Point estimates and interval ends, one per metric the statistic returns."""

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int


def bootstrap(units: np.ndarray, statistic: Statistic, settings: Bootstrap = Bootstrap()) -> Interval:
    """Percentile-bootstrap intervals of ``statistic`` (column sums ``[..., k]`` → metrics
    ``[..., m]``) over the rows of ``units`` (``[n, k]``, one per resampled unit)."""
    units = _check(units, "interval")
    samples = np.concatenate([statistic(c @ units) for c in _counts(len(units), settings)])
    low, high = _quantiles(samples, settings.level)
    return Interval(np.asarray(statistic(units.sum(0))), low, high, len(units))


def paired_bootstrap(units_a: np.ndarray, units_b: np.ndarray, statistic: Statistic,
                     settings: Bootstrap = Bootstrap()) -> Interval:
    """Interval of ``statistic(b) − statistic(a)`` where row ``i`` of ``units_a`` and of ``units_b``
    is the same unit measured under the baseline and under the mitigation; each resample draws the
    units once for both."""
    units_a, units_b = _check(units_a, "paired difference"), _check(units_b, "paired difference")
    if units_a.shape != units_b.shape:
        raise VsinkError(f"paired difference: {units_a.shape} and {units_b.shape} units do not pair")
    samples = np.concatenate([statistic(c @ units_b) - statistic(c @ units_a)
                              for c in _counts(len(units_a), settings)])
    low, high = _quantiles(samples, settings.level)
    return Interval(np.asarray(statistic(units_b.sum(0)) - statistic(units_a.sum(0))), low, high, len(units_a))


def excludes_zero(low: Optional[float], high: Optional[float]) -> bool:
    """Whether the interval ``[low, high]`` lies wholly on one side of 0 (a demonstrated change)."""
    return low is not None and high is not None and (low > 0 or high < 0)


def binomial_cdf(k: int, n: int) -> float:
    """P[X ≤ k] for X ~ Binomial(n, 1/2), exactly (integer arithmetic, one division)."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2 ** n


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (module docstring)."""
    if b < 0 or c < 0:
        raise VsinkError(f"McNemar: discordant counts must be >= 0, got {b} and {c}")
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * binomial_cdf(min(b, c), b + c))


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test of paired right/wrong outcomes: ``{"n", "b", "c", "p"}`` (``b``: right
    under ``a`` and wrong under ``b``; ``c``: the reverse)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise VsinkError(f"McNemar: {a.size} and {b.size} outcomes do not pair")
    lost, won = int((a & ~b).sum()), int((~a & b).sum())
    return {"n": int(a.size), "b": lost, "c": won, "p": mcnemar_exact(lost, won)}


def interval_dict(iv: Interval, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{name: {"value", "low", "high"}}`` (JSON-ready) for the metrics of an :class:`Interval`."""
    return {name: {"value": float(iv.value[i]), "low": float(iv.low[i]), "high": float(iv.high[i])}
            for i, name in enumerate(names)}
