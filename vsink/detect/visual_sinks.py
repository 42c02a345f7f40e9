"""Visual sink tokens of an LVLM's language model (Kang et al. 2025): φ = |h / rms(h)| on the
hidden states entering a decoder layer, on the model's sink dimensions; a token is a sink when the
largest φ over those dimensions exceeds τ (20 in the paper)."""

from __future__ import annotations

from typing import Optional

import torch


def rms_phi(h: torch.Tensor, dims: Optional[list[int]] = None) -> torch.Tensor:
    """φ = |h / sqrt(mean(h²) + 1e-6)| per token (RMS-normalised, no weight), on ``dims`` only
    when given."""
    h = h.float()
    inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return ((h if dims is None else h[..., dims]) * inv).abs()


def sink_flags(h: torch.Tensor, dims: list[int], tau: float) -> torch.Tensor:
    """Sink tokens [B, N] of hidden states [B, N, D]: max over ``dims`` of φ > ``tau``."""
    return rms_phi(h, dims).amax(-1) > tau
