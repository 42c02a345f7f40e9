"""Detectors: pure functions from a :class:`~vsink.probe.Trace` to findings. No model code."""

from .attention import AttentionSink, detect_sinks, layer_attention_summary
from .massive import MassiveActivation, detect_massive, massive_summary
from .norms import HighNormResult, LayerNormStats, OutlierToken, adaptive_threshold, detect_high_norm

__all__ = [
    "AttentionSink", "HighNormResult", "LayerNormStats", "MassiveActivation", "OutlierToken",
    "adaptive_threshold", "detect_high_norm", "detect_massive", "detect_sinks", "layer_attention_summary",
    "massive_summary",
]
