"""The LLaVA-1.5 LVLM family (``LlavaForConditionalGeneration``): a CLIP (or SigLIP) tower whose
selected layer's patches reach the language model one to one through the projector."""

from __future__ import annotations

from typing import Any, Sequence

from ..viewbox import ViewBox, clip_processor_box
from .hf_lvlm import LVLM
from .lvlm_families import known_sink_dims, lvlm_family

#: sink dimensions of LLaVA-1.5's language models (VAR, Kang et al. 2025)
known_sink_dims("llava-1.5-7b", [1415, 2533])
known_sink_dims("llava-1.5-13b", [2100, 4743])


@lvlm_family
class LlavaLVLM(LVLM):
    """LLaVA-1.5: one image span of (image / patch)² tokens, a square grid."""

    family = "llava"
    title = "LLaVA-1.5"
    example = "hf:llava-hf/llava-1.5-7b-hf"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    patches_one_to_one = True
    verified = ("tiny offline models (tests/test_lvlm.py) and the planted demo-llava; real LLaVA-1.5 weights: "
                "examples/llava15_gpu.py, not run here")

    def view_box(self, size: Sequence[int]) -> ViewBox:
        """LLaVA's CLIP processor resizes the shortest edge and centre-crops (after padding to a
        square where ``do_pad`` is set)."""
        image_processor = getattr(self.processor, "image_processor", None)
        return clip_processor_box(image_processor, size) if image_processor is not None else ViewBox.full(size)

    def tower_patches_are_image_tokens(self, layout: Any) -> bool:
        """The projector maps each patch of the selected layer, the class token dropped."""
        if getattr(self.model.config, "vision_feature_select_strategy", "default") != "default":
            return False
        return self.vision_backbone().layout().grid == tuple(layout.grid)
