"""Attention sinks: tokens whose share of received attention is far above the typical token's.

A token's *share* at a layer is the attention it receives averaged over heads and queries
(shares of one image sum to 1). A token is a sink when its share is at least ``ratio`` times
the image's median share (the baseline is never taken below 1e-3 of uniform). The median, not
the uniform 1/N, is the baseline because several sinks split the attention they soak up: with
50 high-norm tokens each may hold only ~2x uniform while holding 8x the typical token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import VsinkError
from ..probe import Trace


@dataclass
class AttentionSink:
    image: int
    layer: int
    token: int
    kind: str
    share: float
    ratio: float
    row: Optional[int] = None
    col: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _shares(trace: Trace) -> np.ndarray:
    if trace.attn_received is None:
        raise VsinkError("the trace holds no attention statistics (probe with attention=True)")
    return trace.attn_received.mean(axis=2)  # [L, I, N]


def detect_sinks(trace: Trace, *, ratio: float = 5.0, max_per_image: int = 16) -> list[AttentionSink]:
    """Attention sinks per layer and image, strongest first within each (layer, image)."""
    shares = _shares(trace)
    layout = trace.layout
    sinks: list[AttentionSink] = []
    for pos, layer in enumerate(trace.layers):
        for image in range(shares.shape[1]):
            s = shares[pos, image]
            baseline = max(float(np.median(s)), 1e-3 / s.size)
            order = np.argsort(-s)[:max_per_image]
            for token in order:
                if float(s[token]) < ratio * baseline:  # in float64: a huge ratio is no float32 overflow
                    break
                kind = layout.kind_of(int(token))
                row, col = layout.patch_position(int(token)) if kind == "patch" else (None, None)
                sinks.append(AttentionSink(image, int(layer), int(token), kind, float(s[token]),
                                           float(s[token] / baseline), row, col))
    return sinks


def layer_attention_summary(trace: Trace) -> list[dict]:
    """Per layer: attention share received by class tokens, by registers, by the top patch; entropy."""
    shares = _shares(trace)
    layout = trace.layout
    cls_idx, reg_idx = layout.cls_indices(), layout.register_indices()
    out = []
    for pos, layer in enumerate(trace.layers):
        s = shares[pos]  # [I, N]
        out.append({
            "index": int(layer),
            "cls_received": float(s[:, cls_idx].sum(axis=1).mean()) if cls_idx else 0.0,
            "register_received": float(s[:, reg_idx].sum(axis=1).mean()) if reg_idx else 0.0,
            "max_patch_received": float(s[:, layout.patch_slice].max(axis=1).mean()),
            "entropy": float(trace.attn_entropy[pos].mean()) if trace.attn_entropy is not None else None,
        })
    return out
