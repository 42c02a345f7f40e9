"""Detectors: pure functions from a :class:`~vsink.probe.Trace` to findings. No model code."""

from .attention import AttentionSink, detect_sinks, layer_attention_summary
from .massive import MassiveActivation, detect_massive, massive_summary
from .gap import Gap, find_gap
from .norms import HighNormResult, LayerNormStats, OutlierTable, OutlierToken, detect_high_norm

__all__ = [
    "AttentionSink", "Gap", "HighNormResult", "LayerNormStats", "MassiveActivation", "OutlierTable", "OutlierToken",
    "detect_high_norm", "find_gap", "detect_massive", "detect_sinks", "layer_attention_summary",
    "massive_summary",
]
