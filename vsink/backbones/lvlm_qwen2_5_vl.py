"""The Qwen2.5-VL LVLM family (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout and
M-RoPE with a windowed-attention tower."""

from __future__ import annotations

from .lvlm_families import lvlm_family
from .lvlm_qwen2_vl import Qwen2VLLVLM


@lvlm_family
class Qwen25VLLVLM(Qwen2VLLVLM):
    """Qwen2.5-VL: as Qwen2-VL."""

    family = "qwen2.5-vl"
    title = "Qwen2.5-VL"
    example = "hf:Qwen/Qwen2.5-VL-3B-Instruct"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
