"""The LLaVA-OneVision LVLM family (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower,
any-resolution tiles ("anyres_max_9").

How the image tokens lie, as transformers builds them: one image is one contiguous run of image
tokens holding two views of the whole image. First the base view: the image resized to one tile,
its ``side × side`` patches (``side`` = tower image size / patch size; SigLIP has no class token).
Then the tiled view: the image resized into the best grid of tiles of the pinpoints (aspect kept,
padded), the tiles' patches joined into one ``rows·side × cols·side`` map, the padding rows or
columns cut away again (unpadded to the image's aspect), pooled down bilinearly when it holds more
than ``anyres_max_N``'s N tiles' worth (by over 1.1 in side), and each of its rows closed by the
learned ``image_newline`` feature, which sits on an image-token position too.

In :class:`~vsink.layout.ImageSpans` an image is therefore two spans of the same row: the base view
(grid ``side × side``) and the tiled view (grid ``rows × (cols + 1)``: its last column is the
newline feature). Both views show the whole image (nothing is cropped): the view box is the whole
image. A scan's layout (:class:`~vsink.layout.PromptLayout`) takes the image's one contiguous run
of tokens, ``1 × count``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..layout import ImageSpans
from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family
from .lvlm_llava_next import anyres_tower_inputs


@lvlm_family
class LlavaOnevisionLVLM(LVLM):
    """LLaVA-OneVision: two image spans per image, the base view then the tiled view (newline
    feature closing each of its rows)."""

    family = "llava-onevision"
    title = "LLaVA-OneVision"
    example = "hf:llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    verified = "tiny offline models (tests/test_lvlm.py, tests/test_lvlm_families.py); real weights not verified here"

    @property
    def base_side(self) -> int:
        """Image tokens along one side of the base view: the tower's patches per side."""
        vision = self.model.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def image_spans(self, input_ids: torch.Tensor) -> ImageSpans:
        """Per row, each image's run of image tokens cut into its base view (the first
        ``base_side²`` tokens) and its tiled view (the rest)."""
        runs = super().image_spans(input_ids)
        base = self.base_side ** 2
        rows = tuple(tuple(part for s, e in row for part in (((s, s + base), (s + base, e)) if e - s > base
                                                             else ((s, e),)))
                     for row in runs.spans)
        return ImageSpans(rows, runs.length)

    def tiled_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the tiled view's features of a ``height × width`` image, before the
        newline column: the pinpoint grid's patch map, unpadded to the image's aspect, pooled when
        it is more than ``vision_aspect_ratio``'s tiles' worth."""
        from transformers.image_processing_utils import select_best_resolution

        config = self.model.config
        tile = int(config.vision_config.image_size)
        best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
        side = self.base_side
        rows, cols = side * (best_h // tile), side * (best_w // tile)
        # the image was resized to fit (rows, cols) with its aspect kept and padded evenly on the
        # other axis; the padding's rows (or columns) are cut away
        if width * rows > height * cols:
            kept = int(round(height * cols / width, 7))
            rows -= 2 * ((rows - kept) // 2)
        else:
            kept = int(round(width * rows / height, 7))
            cols -= 2 * ((cols - kept) // 2)
        most = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).rsplit("_", 1)[-1])
        ratio = math.sqrt(rows * cols / (most * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def view_grids(self, inputs: dict[str, Any], row: int) -> Optional[list[tuple[int, int]]]:
        """The grids of row ``row``'s two views, ``[(side, side), (rows, cols + 1)]``, from its
        ``image_sizes``; None without them."""
        sizes = inputs.get("image_sizes")
        if sizes is None or row >= len(sizes):
            return None
        height, width = (int(v) for v in sizes[row])
        rows, cols = self.tiled_grid(height, width)
        return [(self.base_side, self.base_side), (rows, cols + 1)]

    def span_grids(self, inputs: dict[str, Any], row: int, spans: ImageSpans) -> list[tuple[int, int]]:
        """Each image's base view ``side × side`` and tiled view ``rows × (cols + 1)`` by their
        place (a count alone can fit both), from :meth:`view_grids`; without ``image_sizes``, by
        count (:meth:`image_grid`)."""
        grids = self.view_grids(inputs, row)
        runs = spans.spans[row]
        if grids is None or len(runs) != 2 or [e - s for s, e in runs] != [r * c for r, c in grids]:
            return super().span_grids(inputs, row, spans)
        return grids

    def overview_span(self, inputs: dict[str, Any], row: int, spans: ImageSpans) -> Optional[int]:
        """The base view (the first span): the whole image on a ``side × side`` grid."""
        return 0 if spans.spans[row] else None

    def image_grid(self, inputs: dict[str, Any], row: int, count: int) -> tuple[int, int]:
        """The base view's ``side × side``, the tiled view's ``rows × (cols + 1)`` (newline column
        last) for a span of that count; both views together (or an unknown count): ``1 × count``."""
        for grid in self.view_grids(inputs, row) or [(self.base_side, self.base_side)]:
            if grid[0] * grid[1] == count:
                return grid
        return 1, count

    def tower_inputs(self, inputs: dict[str, Any]) -> Optional[list[torch.Tensor]]:
        """Each row's tiles as the tower reads them (base tile, then the crops): ``pixel_values[row]``
        cut to transformers' own ``image_size_to_num_patches`` of its ``image_sizes``, one image per
        row (``batch_num_images`` all 1: a row of several images is not tiled, and refused here)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        per_row = inputs.get("batch_num_images")
        if per_row is not None and any(int(n) != 1 for n in per_row):
            return None
        return anyres_tower_inputs(self, inputs, image_size_to_num_patches)
