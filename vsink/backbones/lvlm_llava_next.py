"""The LLaVA-NeXT LVLM family (``LlavaNextForConditionalGeneration``): any-resolution tiling over
the grid pinpoints, so an image's token count depends on its aspect ratio; the base tile's grid
when the count is a square."""

from __future__ import annotations

from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family


@lvlm_family
class LlavaNextLVLM(LVLM):
    """LLaVA-NeXT: one image span per image (base tile, then the tiles with newline tokens)."""

    family = "llava-next"
    title = "LLaVA-NeXT"
    example = "hf:llava-hf/llava-v1.6-mistral-7b-hf"
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"
    verified = "tiny offline models (tests/test_lvlm.py); real weights not verified here"
