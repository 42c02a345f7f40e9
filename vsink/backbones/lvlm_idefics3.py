"""The Idefics3 LVLM family (``Idefics3ForConditionalGeneration``): a SigLIP tower without a class
token, a pixel-shuffle connector and a Llama decoder; SmolVLM (``lvlm_smolvlm.py``) is the same
model and subclasses this one.

How the image tokens lie, as transformers builds them. With image splitting (the processor's
``do_image_splitting``, on in the released models) an image is resized so that its sides are
multiples of ``max_image_size``, cut into a grid of ``max_image_size`` squares, and the whole image
resized to one square is added last (the global image). Each square passes the tower on its own
(a tower batch row; the tower has no class token: every token is a patch), then the connector's
pixel shuffle folds each ``scale_factor × scale_factor`` block of patches into one token, so a
square gives ``(max_image_size / patch / scale_factor)²`` image tokens. In the prompt each square's
tokens are one run, introduced by ``<fake_token_around_image>`` and ``<row_i_col_j>`` (sub-images)
or ``<global-img>`` (the global image), with a line break after each grid row: several image
spans per image in :class:`~vsink.layout.ImageSpans`, text tokens between them. Without splitting
an image is one square (the global image alone), one span.

A scan's layout holds one image span per row, so ``vsink scan --prompt`` runs these models with
image splitting off (:meth:`scan_options`): each image is then its global square, a
``side × side`` grid of image tokens. Generation and every mitigation run with the processor's own
setting.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from PIL import Image

from ..viewbox import ViewBox
from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family


@lvlm_family
class Idefics3LVLM(LVLM):
    """Idefics3: one image span per square (sub-images, then the global image), pixel-shuffled."""

    family = "idefics3"
    splits_images = True
    title = "Idefics3"
    example = "hf:HuggingFaceM4/Idefics3-8B-Llama3"
    model_types = ("idefics3",)
    model_class = "Idefics3ForConditionalGeneration"
    verified = ("tiny offline models with image splitting (tests/test_lvlm.py, tests/test_lvlm_families.py); "
                "real weights not verified here")

    def vision_tower(self) -> Any:
        """The SigLIP tower (``model.vision_model``), without the pixel-shuffle connector."""
        return getattr(getattr(self.model, "model", self.model), "vision_model", None)

    def square_side(self) -> int:
        """Image tokens along one side of a square (a sub-image or the global image): the tower's
        patches per side divided by the pixel shuffle's ``scale_factor``."""
        config = self.model.config
        patches = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        return patches // int(config.scale_factor)

    def image_grid(self, inputs: dict[str, Any], row: int, count: int) -> tuple[int, int]:
        """One square's tokens as its ``side × side`` grid; the several squares of a split image
        (text tokens between them) as ``1 × count``: no rectangle holds them together."""
        side = self.square_side()
        return (side, side) if count == side * side else (1, count)

    def scan_options(self) -> dict[str, Any]:
        """Image splitting off: one span per image (the global square), as a scan's layout needs."""
        return {"do_image_splitting": False}

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str], *,
                options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """As :meth:`LVLM.prepare`; ``do_image_splitting`` in ``options`` is set on the image
        processor for this call (transformers 4.x's processor call does not take it as a keyword)."""
        options = dict(options or {})
        split = options.pop("do_image_splitting", None)
        image_processor = getattr(self.processor, "image_processor", None)
        if split is None or image_processor is None:
            return super().prepare(images, prompts, options=options)
        before = image_processor.do_image_splitting
        image_processor.do_image_splitting = split
        try:
            return super().prepare(images, prompts, options=options)
        finally:
            image_processor.do_image_splitting = before

    def view_box(self, size: Sequence[int]) -> ViewBox:
        """The processor resizes the whole image (tiles and global image alike, or the one square
        without splitting): nothing is cropped."""
        return ViewBox.full(size)

    def tower_inputs(self, inputs: dict[str, Any]) -> Optional[list[torch.Tensor]]:
        """Each row's real squares (the sub-images, then the global image) as the tower reads them:
        ``pixel_values`` [B, N, 3, H, W] without the padding squares, which transformers drops by
        its own rule (every value exactly 0), kept here. None where ``pixel_attention_mask`` pads
        inside a real square: the tower then reads a patch mask that vsink's tower pass lacks."""
        pixels = inputs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5:
            return None
        flat = pixels.reshape(-1, *pixels.shape[2:])
        real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        mask = inputs.get("pixel_attention_mask")
        if mask is not None and not bool(mask.reshape(-1, *mask.shape[2:])[real].all()):
            return None
        real = real.view(pixels.shape[:2])
        return [pixels[row][real[row]] for row in range(pixels.shape[0])]

    def processor_images(self, images: Sequence[Image.Image]) -> Any:
        """One list of images per prompt (SmolVLM's processor takes only nested lists)."""
        return [[image] for image in images]
