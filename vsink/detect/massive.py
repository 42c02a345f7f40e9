"""Massive activations (Sun et al. 2024): a few residual dimensions holding values hundreds to
thousands of times the median |activation|, at a few tokens; they act as fixed attention biases.

Works on the top-k |activations| a probe keeps per block output (``Probe(massive=k)``): an entry
is massive when ``|value| >= min_ratio x median |activation|`` of that image's block output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import VsinkError
from ..probe import Trace


@dataclass
class MassiveActivation:
    image: int
    layer: int
    token: int
    kind: str
    dim: int
    value: float
    ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def detect_massive(trace: Trace, *, min_ratio: float = 100.0) -> list[MassiveActivation]:
    """Every kept top activation at least ``min_ratio`` times its block output's median |activation|."""
    if trace.massive_values is None:
        raise VsinkError("the trace holds no massive-activation statistics (probe with massive=k)")
    found = []
    for pos, layer in enumerate(trace.layers):
        for image in range(trace.massive_values.shape[1]):
            median = max(float(trace.massive_median[pos, image]), 1e-12)
            for value, token, dim in zip(trace.massive_values[pos, image], trace.massive_tokens[pos, image],
                                         trace.massive_dims[pos, image]):
                ratio = abs(float(value)) / median
                if ratio >= min_ratio:
                    found.append(MassiveActivation(image, int(layer), int(token), trace.layout.kind_of(int(token)),
                                                   int(dim), float(value), ratio))
    return found


def massive_summary(trace: Trace, found: list[MassiveActivation]) -> list[dict[str, Optional[object]]]:
    """Per layer: mean median |activation|, the largest top/median ratio, and the massive dims."""
    out = []
    for pos, layer in enumerate(trace.layers):
        ratios = np.abs(trace.massive_values[pos]).max(axis=1) / np.maximum(trace.massive_median[pos], 1e-12)
        dims = sorted({m.dim for m in found if m.layer == layer})
        out.append({"index": int(layer), "median_abs": float(trace.massive_median[pos].mean()),
                    "max_ratio": float(ratios.max()), "dims": dims})
    return out
