"""The register-neuron score plot: sorted scores with the chosen cut marked."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from .axes import value_axis
from .figures import plain_text, png_bytes


@plain_text
def neuron_scores_figure(scores: Sequence[float], kept: int, rule: str, title: str):
    """Scores best first against their rank (1-based), the kept neurons in colour and a dashed
    line at rank ``kept + 0.5`` (between the last kept and the first dropped), labelled with
    ``rule`` ("score gap" or "top_k"). Returns the figure."""
    s = np.asarray(scores, dtype=float)
    ranks = np.arange(1, s.size + 1)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(ranks[:kept], s[:kept], "o", ms=5, color="tab:red", label=f"kept ({kept})")
    ax.plot(ranks[kept:], s[kept:], "o", ms=3, color="tab:gray", label="not kept")
    ax.axvline(kept + 0.5, color="black", linestyle="--", label=f"cut ({rule})")
    value_axis(ax, [float(v) for v in s if v > 0] or [1.0], floor=0.0)
    ax.set_xlabel("rank (best first)")
    ax.set_ylabel("score: mean |activation| on outliers")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def neuron_scores_png(scores: Sequence[float], kept: int, rule: str, title: str) -> bytes:
    return png_bytes(neuron_scores_figure(scores, kept, rule, title))
