"""Colour scales a reader can trust: one scale per quantity, shared by every panel that shows it.

* Maps of one quantity (token norms, attention shares, φ) share one :class:`Scale` over blocks and
  images, so a flat map looks flat and growth with depth shows.
* Attention and φ scales start at 0 (``zero=True``): a share of 0.0045–0.0055 is drawn near the
  bottom of the scale, not stretched over all of it.
* A scale carries its units (the colour bar label) and threshold marks (drawn on the colour bar).
* :func:`flat_note` says when a panel's own range is tiny next to its values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

#: a panel whose (max − min) / max is below this is called flat in its title
FLAT_SPAN = 0.01


@dataclass(frozen=True)
class Scale:
    """``vmin``–``vmax`` with a colour bar ``label`` (quantity and units) and ``marks``
    (``{name: value}``, e.g. a threshold), drawn as lines on the colour bar."""

    vmin: float
    vmax: float
    label: str
    marks: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"vmin": self.vmin, "vmax": self.vmax, "label": self.label, "marks": dict(self.marks)}


def shared_scale(arrays: Iterable[np.ndarray], *, zero: bool, label: str,
                 marks: Optional[dict[str, Optional[float]]] = None) -> Scale:
    """One scale over every finite value of ``arrays`` (and the marks, so they are in view);
    ``zero``: start at 0 (attention, φ)."""
    lo, hi = np.inf, -np.inf
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        finite = a[np.isfinite(a)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    kept = {k: float(v) for k, v in (marks or {}).items() if v is not None and np.isfinite(v)}
    for v in kept.values():
        lo, hi = min(lo, v), max(hi, v)
    if not np.isfinite(lo):
        lo, hi = 0.0, 1.0
    if zero:
        lo = min(0.0, lo)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    return Scale(lo, hi, label, kept)


def flat_note(values: np.ndarray) -> str:
    """``"flat: 13.72–13.95 (1.6 % of max)"``-style text when (max − min) / |max| of the finite
    values is below :data:`FLAT_SPAN`, else ``""``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return ""
    lo, hi = float(v.min()), float(v.max())
    top = max(abs(lo), abs(hi))
    if top == 0:
        return "flat: all 0"
    span = (hi - lo) / top
    if span >= FLAT_SPAN:
        return ""
    return f"flat: {lo:.4g}–{hi:.4g} ({100 * span:.2g} % of max)"
