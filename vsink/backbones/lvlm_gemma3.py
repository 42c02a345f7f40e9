"""The Gemma 3 LVLM family (``Gemma3ForConditionalGeneration``): a SigLIP tower average-pooled to
a fixed number of image tokens per image (256 in the released models), a Gemma 3 decoder with
sliding-window layers between full ones, and bidirectional attention inside each image.

The processor expands the ``<start_of_image>`` placeholder to start, image tokens, end, and marks
the image tokens (``token_type_ids`` 1); the model's mask lets the tokens of one image attend to
each other in both directions, causally elsewhere. vsink follows it: a scan uses the model's own
mask, and during generation each image's tokens are one bidirectional group of the
:class:`~vsink.lvlm.context.DecodeContext` (:meth:`attention_groups`), so VAR, PAI, FastV and the
captured attention see the attention the model computes (a FastV-pruned image token is gone from
its group too).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from PIL import Image

from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family


@lvlm_family
class Gemma3LVLM(LVLM):
    """Gemma 3: one image span per image, bidirectional inside it; a square grid of pooled tokens."""

    family = "gemma3"
    title = "Gemma 3"
    example = "hf:google/gemma-3-4b-it"
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"
    verified = "tiny offline models (tests/test_lvlm.py, tests/test_lvlm_families.py); real weights not verified here"
    #: a generated token is text (0); transformers 4.57's mask reads a type for every key position
    generated_token_type = 0

    def attention_groups(self, inputs: dict[str, Any]) -> Optional[torch.Tensor]:
        """Each run of image tokens (``token_type_ids`` 1) its own group, as the model's mask has it."""
        types = inputs.get("token_type_ids")
        if types is None:
            return None
        image = types == 1
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, starts.long().cumsum(1) - 1, -1)

    def placeholder(self) -> str:
        """``<start_of_image>`` (the processor's ``boi_token``; transformers 4.x names the image
        soft token its ``image_token``)."""
        return getattr(self.processor, "boi_token", None) or super().placeholder()

    def processor_images(self, images: Sequence[Image.Image]) -> Any:
        """Gemma 3's processor takes a list of images per prompt."""
        return [[image] for image in images]
