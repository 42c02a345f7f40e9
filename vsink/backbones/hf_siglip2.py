"""Hugging Face SigLIP2 vision encoder (``Siglip2VisionModel``, fixed-resolution and NaFlex
checkpoints alike): no class token, no registers; the pooled embedding comes from an
attention-pooling head whose learned probe attends over the output tokens (:meth:`hook_pool`).

SigLIP2 takes patches, not images: ``pixel_values`` [B, max_patches, p*p*3] (each patch's pixels
row by row, channels last), ``spatial_shapes`` [B, 2] (each image's patch grid) and
``pixel_attention_mask`` [B, max_patches] (1 on real patches, 0 on padding). Its position
embeddings are resized to each image's grid, so any grid works (NaFlex).

How vsink represents the grid: every forward call has one patch grid, ``H/p x W/p`` of the image
tensor it is given, and :meth:`layout` / :meth:`current_layout` report that grid. vsink cuts the
patches itself, the way SigLIP2's image processor does, with no padding (the mask is all ones, so
it passes none). Images of different aspect ratios therefore run one grid per call: ``vsink maps
--keep-aspect`` gives each image its own grid, as the NaFlex processor would. A padded NaFlex
batch — several grids in one tensor — has a different token layout per row, which one
:class:`~vsink.layout.TokenLayout` cannot describe: inputs that are already patches are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import VsinkError
from .base import to_pair
from .hf_vision import HFVisionBackbone, hf_adapter


def patchify(pixel_values: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, C, H, W] → SigLIP2's patches [B, (H/p)(W/p), p*p*C] (row-major over the grid;
    within a patch, pixel rows, then columns, then channels) and ``spatial_shapes`` [B, 2]."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    patches = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    shapes = torch.tensor([[h // p, w // p]], dtype=torch.long, device=pixel_values.device).expand(b, 2)
    return patches.reshape(b, (h // p) * (w // p), p * p * c), shapes


@hf_adapter("siglip2_vision_model", "siglip2", model_class="Siglip2VisionModel", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            num_cls=0)
class HFSiglip2Backbone(HFVisionBackbone):
    """A Hugging Face ``Siglip2VisionModel``; see the module docstring for patches and grids."""

    @staticmethod
    def _default_size(config: Any) -> tuple[int, int]:
        """The square whose grid is the position-embedding table (``num_patches`` = side², e.g.
        256 patches of 16 px → 256x256)."""
        side = round(int(config.num_patches) ** 0.5)
        ph, pw = to_pair(config.patch_size)
        return side * ph, side * pw

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> Any:
        self._check_images(pixel_values)
        return super().forward(pixel_values)

    def train_forward(self, pixel_values: torch.Tensor, module: nn.Module | None = None) -> Any:
        self._check_images(pixel_values)
        return super().train_forward(pixel_values, module)

    def _check_images(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4:
            raise VsinkError(
                f"{self.spec}: SigLIP2 input must be images [B, 3, H, W], one patch grid per call (vsink cuts "
                f"the patches itself); got a tensor of shape {tuple(pixel_values.shape)}. A padded NaFlex batch "
                "(patches with pixel_attention_mask and spatial_shapes) has a different token layout per image: "
                "run such images one per call, or resized to one size")

    def _call_module(self, module: nn.Module, pixel_values: torch.Tensor) -> Any:
        patches, shapes = patchify(pixel_values, self.patch_size[0])
        return module(pixel_values=patches, pixel_attention_mask=None, spatial_shapes=shapes)
