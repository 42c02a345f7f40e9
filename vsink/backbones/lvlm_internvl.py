"""The InternVL LVLM family (``InternVLForConditionalGeneration``, transformers' native class for
the ``-hf`` checkpoints: InternVL2.5 / InternVL3): an InternViT tower
(:mod:`vsink.backbones.hf_internvl_vision`), a pixel shuffle and an MLP projector, a Qwen2 (or
Llama) decoder with 1-D positions and a causal mask.

How the image tokens lie, as transformers builds them: the image processor cuts an image into
1 to ``max_patches`` tiles over the grid closest to its aspect ratio (the image resized to fill
it, nothing cropped away) and adds a thumbnail of the whole image when there are several; each
tile runs through the tower alone (class token dropped) and its p × p patches are pixel-shuffled
by ``downsample_ratio`` 0.5 into (p/2)² tokens (``image_seq_length``, 256 in the released
models). The processor expands ``<IMG_CONTEXT>`` to ``<img>``, the tiles' tokens one tile after
the other (thumbnail last), ``</img>``: one contiguous run per image, so one span per image in
:class:`~vsink.layout.ImageSpans`. A single tile is a (p/2) × (p/2) grid; several tiles plus the
thumbnail fit no rectangle in token order, so their grid is ``1 × count``. ``pixel_values`` holds
the tiles of every image of the batch in a row ([tiles, 3, H, W]), counted per row by
:meth:`pixel_counts`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family


@lvlm_family
class InternVLLVLM(LVLM):
    """InternVL: one image span per image (tiles then thumbnail), pixel-shuffled patches."""

    family = "internvl"
    title = "InternVL"
    example = "hf:OpenGVLab/InternVL3-1B-hf"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    verified = ("tiny offline models (tests/test_lvlm.py, tests/test_lvlm_families.py, tests/test_internvl.py); "
                "real weights not verified here")

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(rows, cols) of one tile's image tokens: the tower's patch grid after the pixel shuffle."""
        vision = self.model.config.vision_config
        ratio = float(self.model.config.downsample_ratio)
        rows, cols = (int(int(s) // int(p) * ratio) for s, p in zip(vision.image_size, vision.patch_size))
        return rows, cols

    def tower_inputs(self, inputs: dict[str, Any]) -> Optional[list[torch.Tensor]]:
        """Each row's tiles (thumbnail last), as the tower reads them: ``pixel_values`` [tiles, 3, H,
        W] cut by :meth:`pixel_counts`; None when the counts do not add up to its rows."""
        pixels = inputs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
            return None
        counts = self.pixel_counts(inputs)
        if counts is None or sum(counts) != pixels.shape[0]:
            return None
        return list(torch.split(pixels, counts))

    def image_grid(self, inputs: dict[str, Any], row: int, count: int) -> tuple[int, int]:
        """One tile: its shuffled patch grid; tiles and thumbnail: ``1 × count``."""
        rows, cols = self.tile_grid
        return (rows, cols) if count == rows * cols else (1, count)

    def pixel_counts(self, inputs: dict[str, Any]) -> Optional[list[int]]:
        """Tiles per batch row: the row's image tokens over a tile's (:attr:`tile_grid`)."""
        ids = inputs["input_ids"]
        rows, cols = self.tile_grid
        return [int(n) // (rows * cols) for n in (ids == self.image_token_id).sum(-1).tolist()]
