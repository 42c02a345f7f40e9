"""The PaliGemma LVLM family (``PaliGemmaForConditionalGeneration``): PaliGemma and PaliGemma 2 —
a SigLIP tower, a Gemma (PaliGemma 2: Gemma 2) decoder, and a prefix-LM mask.

The prompt is ``image tokens, BOS, text`` (the image before BOS); the processor marks the whole
prompt as the prefix (``token_type_ids`` 0) and the model attends over the prefix in both
directions, causally after it (generated tokens). vsink follows the model's own mask: in a scan
the explicit attention takes the mask the model built; during generation the
:class:`~vsink.lvlm.context.DecodeContext` gets the prefix as one bidirectional group
(:meth:`attention_groups`), so mitigations and capture see the same attention as the model.
Gemma 2's attention-logit soft-capping and sliding-window layers are applied by vsink's explicit
attention and masks as the model applies them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..viewbox import ViewBox
from .hf_lvlm import LVLM
from .lvlm_families import lvlm_family


@lvlm_family
class PaliGemmaLVLM(LVLM):
    """PaliGemma / PaliGemma 2: one image span before BOS, a bidirectional prefix."""

    family = "paligemma"
    title = "PaliGemma 2"
    example = "hf:google/paligemma2-3b-pt-224"
    model_types = ("paligemma",)
    model_class = "PaliGemmaForConditionalGeneration"
    min_transformers = "5.0"
    min_transformers_reason = ("transformers 4.x builds PaliGemma's mask otherwise (every pass of several tokens "
                               "attends in both directions, generated tokens included; Gemma 2's windows on its "
                               "own 4-D mask), which vsink's generation masks do not follow")
    verified = ("tiny offline PaliGemma 2 and PaliGemma models (tests/test_lvlm.py, tests/test_lvlm_families.py); "
                "real weights not verified here")

    def attention_groups(self, inputs: dict[str, Any]) -> Optional[torch.Tensor]:
        """The prefix (``token_type_ids`` 0 on a real token) as group 0, as the model's mask has it."""
        types = inputs.get("token_type_ids")
        if types is None:
            return None
        valid = inputs.get("attention_mask")
        prefix = types == 0 if valid is None else (types == 0) & valid.bool()
        return torch.where(prefix, 0, -1)

    def prompt_positions(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """As the model's own generation: PaliGemma's position ids count from 1."""
        positions, offset = super().prompt_positions(inputs)
        return positions + 1, offset + 1

    def view_box(self, size: Sequence[int]) -> ViewBox:
        """SigLIP's processor resizes the whole image to a square: all of it is seen."""
        return ViewBox.full(size)
