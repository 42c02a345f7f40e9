"""The vision tower of Idefics3 and SmolVLM (``Idefics3VisionTransformer``,
``SmolVLMVisionTransformer``) as a vsink vision backbone: a SigLIP encoder without a class token
or registers (every token a patch) whose position embeddings are looked up by each patch's
fractional place in the image, so any size whose sides are multiples of the patch runs.

In the LVLM each sub-image (and the global image) is one row of the tower's batch, a square of
``max_image_size``; the pixel-shuffle connector after the tower is not part of the backbone.
transformers does not load these towers on their own from a hub id (no such checkpoints): they are
reached as ``LVLM_SPEC#vision_tower`` (:mod:`vsink.backbones.lvlm_tower`).

The tower passes its layers a padding mask over the patches (transformers 4.x always builds a
4-D one); appended tokens (test-time registers) get mask entries of their own, attending and
attended to wherever a patch is (:meth:`append_tokens`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .hf_vision import HFVisionBackbone, hf_adapter
from .sites import SiteHandle


def grown_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """A 4-D mask [B, 1, N, N] (boolean, or additive) grown to ``tokens`` keys and queries: the new
    keys open to every query, the new queries with the first query's keys (a real patch's)."""
    extra = tokens - mask.shape[-1]
    keep = True if mask.dtype == torch.bool else 0.0
    mask = nn.functional.pad(mask, (0, extra), value=keep)
    return torch.cat([mask, mask[:, :, :1].expand(-1, -1, extra, -1)], dim=2)


@hf_adapter("idefics3_vision", model_class="Idefics3VisionTransformer", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            num_cls=0)
@hf_adapter("smolvlm_vision", model_class="SmolVLMVisionTransformer", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            num_cls=0)
class HFIdefics3VisionBackbone(HFVisionBackbone):
    """Idefics3's / SmolVLM's SigLIP tower: patches only, any patch-multiple size."""

    def append_tokens(self, n: int) -> SiteHandle:
        """As :meth:`Backbone.append_tokens`, with every layer's patch mask grown over the tokens."""
        appended = super().append_tokens(n)

        def grow(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] >= x.shape[1]:
                return None
            mask = grown_mask(mask, x.shape[1])
            if len(args) > 1:
                return (args[0], mask, *args[2:]), kwargs
            return args, {**kwargs, "attention_mask": mask}

        handles = [block.register_forward_pre_hook(grow, with_kwargs=True) for block in self.blocks]

        def remove() -> None:
            for handle in handles:
                handle.remove()
            appended.remove()

        return SiteHandle(remove)
