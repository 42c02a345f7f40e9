"""Axis scales and tick labels a reader can trust.

* A log scale only where the data span at least :data:`LOG_MIN_SPAN` (one decade); a narrow
  range is drawn on a linear axis, so 1.98491 → 1.98492 is a flat line, not a cliff.
* Log axes get plain labels (``2``, ``5``, ``10``) on major ticks only; minor ticks carry no
  label, so ``3×10⁰4×10⁰`` cannot run together.
* Tick labels never use an offset or a ``×10ⁿ`` multiplier text: each label is the full value,
  with just enough significant digits that neighbouring labels differ.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from matplotlib import ticker

#: max / min of the data at which an axis becomes logarithmic
LOG_MIN_SPAN = 10.0


class DistinctFormatter(ticker.Formatter):
    """Full values (no offset, no multiplier) with the fewest significant digits (at least 2, at
    most 8) that keep every label of the axis distinct."""

    def __init__(self) -> None:
        self.digits = 3

    def format_ticks(self, values: Sequence[float]) -> list[str]:
        values = list(values)
        for digits in range(2, 9):
            labels = [_number(v, digits) for v in values]
            if len(set(labels)) == len(labels):
                break
        self.digits = digits
        return labels

    def __call__(self, x: float, pos: Optional[int] = None) -> str:
        return _number(x, self.digits)

    def get_offset(self) -> str:
        return ""


def _number(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits, plain notation between 1e-4 and 1e6."""
    if value == 0:
        return "0"
    if 1e-4 <= abs(value) < 1e6:
        decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
        text = f"{value:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    return f"{mantissa}e{int(exponent)}"


def use_log(values: Sequence[float]) -> bool:
    """Whether positive data span at least :data:`LOG_MIN_SPAN` (a log axis is then readable)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    v = v[v > 0]
    return v.size > 1 and v.max() / v.min() >= LOG_MIN_SPAN


def plain_log_axis(axis, lo: float, hi: float) -> None:
    """Major ticks at 1, 2, 5 × 10ⁿ (at 10ⁿ only beyond four decades) with plain labels; minor
    ticks unlabelled."""
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = (1.0,) if decades > 4 else (1.0, 2.0, 5.0)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(DistinctFormatter())
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(2, 10)))
    axis.set_minor_formatter(ticker.NullFormatter())


def plain_linear_axis(axis) -> None:
    """A linear axis with :class:`DistinctFormatter` labels."""
    axis.set_major_locator(ticker.MaxNLocator(nbins=6))
    axis.set_major_formatter(DistinctFormatter())


def value_axis(ax, values: Sequence[float], *, which: str = "y", floor: Optional[float] = None) -> str:
    """Set the scale of ``ax``'s ``which`` axis for ``values``: log when they span a decade, else
    linear; ``floor`` (e.g. 1 for a max/median ratio, which cannot be lower) is always in view on
    a linear axis, so a small change stays small on the page. Returns the scale."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    if use_log(finite):
        pos = [v for v in finite if v > 0]
        (ax.set_yscale if which == "y" else ax.set_xscale)("log")
        plain_log_axis(axis, min(pos), max(pos))
        return "log"
    (ax.set_yscale if which == "y" else ax.set_xscale)("linear")
    plain_linear_axis(axis)
    if floor is not None and finite:
        lo, hi = min(min(finite), floor), max(max(finite), floor)
        pad = 0.05 * (hi - lo) if hi > lo else 0.5 * max(abs(hi), 1.0)
        (ax.set_ylim if which == "y" else ax.set_xlim)(lo - pad, hi + pad)
    return "linear"


def colorbar(ax, mappable, label: Optional[str] = None, fraction: float = 0.046, **kwargs):
    """A colour bar beside ``ax`` whose labels are full values (no offset text above it, which
    would sit on the title of the axes next to it); ``label``: the quantity and its units;
    ``fraction``: its share of the axes' width (0.046 × height / width of an image keeps it as tall
    as the image)."""
    cbar = ax.figure.colorbar(mappable, ax=ax, fraction=fraction, pad=0.02, **kwargs)
    if label:
        cbar.set_label(label, fontsize=7)
    cbar.formatter = DistinctFormatter()
    cbar.locator = ticker.MaxNLocator(nbins=5)
    cbar.update_ticks()
    cbar.ax.tick_params(labelsize=7)
    return cbar
