"""The Qwen2-VL LVLM family (``Qwen2VLForConditionalGeneration``): a native-resolution tower whose
patches are merged 2×2, and 3-row M-RoPE position ids (time, height, width)."""

from __future__ import annotations

from typing import Any

from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family


@lvlm_family
class Qwen2VLLVLM(LVLM):
    """Qwen2-VL: the image grid from ``image_grid_thw`` and the merge size; M-RoPE positions."""

    family = "qwen2-vl"
    title = "Qwen2-VL"
    example = "hf:Qwen/Qwen2-VL-2B-Instruct"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    verified = "tiny offline models (tests/test_lvlm.py); real weights not verified here"
    mrope = True
    tower_is_backbone = False  # its tower (``visual``: packed patches, 2×2 merge) has no vsink adapter

    def image_grid(self, inputs: dict[str, Any], row: int, count: int) -> tuple[int, int]:
        """(t·h/merge, w/merge) from the row's ``image_grid_thw`` when it matches ``count``."""
        grids = inputs.get("image_grid_thw")
        if grids is not None:
            t, h, w = (int(v) for v in grids[min(row, len(grids) - 1)])
            merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 1))
            if t * (h // merge) * (w // merge) == count:
                return (t * h // merge, w // merge)
        return super().image_grid(inputs, row, count)
