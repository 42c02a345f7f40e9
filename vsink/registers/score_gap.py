"""How many register neurons to keep: the cut at the score gap.

Register neurons stand apart from the bulk of MLP units: their scores (mean |activation| on
high-norm tokens) sit above a gap in the sorted scores, and the bulk below is dense. The rule,
over the ``window`` best scores ``s_1 >= s_2 >= ...`` with gaps ``g_k = s_k - s_{k+1}``:

* the *widest* gap ``G = max g_k`` is the score gap;
* a gap is *wide* when ``g_k >= wide * G`` (default a quarter of the widest);
* the cut is below the **lowest wide gap**: every neuron above it is kept.

With one dominant gap this is the cut at the largest gap. It goes below the largest gap only
when a second gap comparable to it follows: a weaker register neuron between the strongest and
the bulk. On the demo LVLM's tower (``demo-llava``, seven scikit-image photos) the planted
neurons score 6.01 and 3.25 and the next unit 2.35: the largest gap alone (2.76) would keep only
the first; the second gap (0.90, a third of it) is wide, and every gap below it is at most 0.22,
so both planted neurons are kept, alone.

A ranking without register neurons has no clear gap: when the widest gap is less than ``clear``
(default 20) times the median gap of the window, the cut keeps the ``fallback`` best (10, the
count the paper's OpenCLIP-B/16 list has) and :attr:`Cut.clear` is false, so the caller can warn.
On seven photos the demo LVLM's tower gives 268 with the default threshold and 10.4 with
``--threshold sigma:3``, whose outliers are not the planted ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

#: scores the gap test looks at (the best first)
WINDOW = 64
#: a gap at least this fraction of the widest counts as wide
WIDE = 0.25
#: the widest gap is clear when at least this many times the window's median gap
CLEAR = 20.0
#: neurons kept when there is no clear gap
FALLBACK = 10


@dataclass(frozen=True)
class Cut:
    """Keep the ``count`` best neurons; ``gap`` is the score gap just below them (``s_count -
    s_{count+1}``), ``widest`` the widest gap among the ``window`` best scores and ``clear`` whether
    it stands out (else ``count`` is the fallback)."""

    count: int
    gap: float
    widest: float
    clear: bool = True

    def to_dict(self) -> dict:
        return {"count": self.count, "gap": self.gap, "widest_gap": self.widest, "clear_gap": self.clear}


def cut_at_gap(scores: Sequence[float], *, window: int = WINDOW, wide: float = WIDE, clear: float = CLEAR,
               fallback: int = FALLBACK) -> Cut:
    """The :class:`Cut` of ``scores`` (sorted best first). Fewer than two scores keep them all."""
    s = [float(x) for x in scores[:window]]
    if len(s) < 2:
        return Cut(len(s), 0.0, 0.0)
    gaps = [s[k] - s[k + 1] for k in range(len(s) - 1)]
    widest = max(gaps)
    typical = sorted(gaps)[len(gaps) // 2]
    if widest <= 0 or widest < clear * typical:
        kept = min(fallback, len(s))
        return Cut(kept, gaps[kept - 1] if kept < len(s) else 0.0, widest, clear=False)
    lowest = max(k for k, g in enumerate(gaps) if g >= wide * widest)
    return Cut(lowest + 1, gaps[lowest], widest)
