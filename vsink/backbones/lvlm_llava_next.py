"""The LLaVA-NeXT LVLM family (``LlavaNextForConditionalGeneration``): any-resolution tiling over
the grid pinpoints, so an image's token count depends on its aspect ratio; the base tile's grid
when the count is a square.

The tower encodes each image as tiles, each one ``[3, H, W]`` tower input: first the base tile (the
whole image resized to one tile), then the crops of the best pinpoint grid. The processor pads a
batch's ``pixel_values`` [B, T, 3, H, W] to the longest image; the model keeps each row's first
``image_size_to_num_patches(image_sizes[row])`` tiles and encodes them row after row.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

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

    def tower_inputs(self, inputs: dict[str, Any]) -> Optional[list[torch.Tensor]]:
        """Each row's tiles as the model encodes them: ``pixel_values[row]`` cut to the row's tile
        count, which transformers' own ``image_size_to_num_patches`` gives from ``image_sizes``."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = anyres_tower_inputs(self, inputs, image_size_to_num_patches)
        return super().tower_inputs(inputs) if tiles is None else tiles


def anyres_tower_inputs(lvlm: LVLM, inputs: dict[str, Any], num_patches: Any) -> Optional[list[torch.Tensor]]:
    """The tiles of an any-resolution ``pixel_values`` [B, T, 3, H, W] (padded to the batch's
    longest image), each row cut to ``num_patches(image_size=..., grid_pinpoints=...,
    patch_size=...)`` of its ``image_sizes`` as the model cuts it; None for any other input."""
    pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5 or sizes is None:
        return None
    config = lvlm.model.config
    counts = [num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                          patch_size=config.vision_config.image_size) for size in sizes]
    return [pixels[row, :count] for row, count in enumerate(counts)]
