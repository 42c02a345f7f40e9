"""Detectors: pure functions from a :class:`~vsink.probe.Trace` to findings. No model code."""

from .attention import AttentionSink, detect_sinks, layer_attention_summary
from .norms import HighNormResult, LayerNormStats, OutlierToken, adaptive_threshold, detect_high_norm

__all__ = [
    "AttentionSink", "HighNormResult", "LayerNormStats", "OutlierToken",
    "adaptive_threshold", "detect_high_norm", "detect_sinks", "layer_attention_summary",
]
