"""The LLaVA-OneVision LVLM family (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower,
any-resolution tiles ("anyres_max_9").

How the image tokens lie, as transformers builds them: one image is one contiguous run of image
tokens — the base view's patches, then the tiles' patches row by row (unpadded to the image's
aspect), each row closed by the learned ``image_newline`` feature, which sits on an image-token
position too; past nine tiles' worth the tile features are pooled down. The several views of an
image (base view and tiles) are therefore one span per image in :class:`~vsink.layout.ImageSpans`,
with ``1 × count`` as its grid (no rectangle holds base view, tiles and newlines together).
"""

from __future__ import annotations

from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family


@lvlm_family
class LlavaOnevisionLVLM(LVLM):
    """LLaVA-OneVision: one image span per image (base view, tiles, newline features)."""

    family = "llava-onevision"
    title = "LLaVA-OneVision"
    example = "hf:llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    verified = "tiny offline models (tests/test_lvlm.py, tests/test_lvlm_families.py); real weights not verified here"
