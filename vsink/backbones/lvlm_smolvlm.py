"""The SmolVLM LVLM family (``SmolVLMForConditionalGeneration``): Idefics3's architecture (tower,
pixel-shuffle connector, image splitting with row/column tokens) under its own model type and
processor; everything is shared with :class:`~vsink.backbones.lvlm_idefics3.Idefics3LVLM`."""

from __future__ import annotations

import importlib.util
from typing import Optional

from .lvlm_families import lvlm_family
from .lvlm_idefics3 import Idefics3LVLM


@lvlm_family
class SmolVLMLVLM(Idefics3LVLM):
    """SmolVLM: as Idefics3 (one image span per square, pixel-shuffled)."""

    family = "smolvlm"
    title = "SmolVLM"
    example = "hf:HuggingFaceTB/SmolVLM-256M-Instruct"
    model_types = ("smolvlm",)
    model_class = "SmolVLMForConditionalGeneration"

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """As every family; also refused without ``num2words``, which transformers'
        ``SmolVLMProcessor`` imports (it writes video frame times in words)."""
        why = super().unavailable()
        if why is None and importlib.util.find_spec("num2words") is None:
            return ("the smolvlm family needs the num2words package, which transformers' SmolVLMProcessor imports: "
                    "pip install num2words")
        return why
