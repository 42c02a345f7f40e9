"""Hugging Face AIMv2 vision encoder (``Aimv2VisionModel``): no class token, no registers, RMS
norms and a SwiGLU MLP (``ffn``); learned position embeddings for a fixed input size, or 2-D
sine-cosine ones for any size (``is_native``). Its attention-pooling head (``use_head``) is a
learned query (``head.cls_token``) attending over the output tokens (:meth:`hook_pool`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .hf_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, HFVisionBackbone, hf_adapter


@hf_adapter("aimv2_vision_model", model_class="Aimv2VisionModel", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
            num_cls=0)
class HFAimv2Backbone(HFVisionBackbone):
    """A Hugging Face ``Aimv2VisionModel``."""

    @property
    def dynamic_size(self) -> bool:
        """Native-resolution AIMv2 (sine-cosine positions) takes any size; the others take one."""
        return bool(getattr(self.config, "is_native", False))

    @property
    def pool_head(self) -> Optional[nn.Module]:
        return getattr(self.owner, "head", None)

    def _pool_probs(self, head: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d))`` of the head's query ``cls_token`` over ``k_proj`` of the
        tokens (the head calls SDPA with its default scale and no mask)."""
        x = args[0] if args else kwargs["hidden_states"]
        b, n, d = x.shape
        heads = head.num_heads
        q = head.cls_token.to(x.dtype).expand(b, -1, -1).reshape(b, 1, heads, d // heads).transpose(1, 2)
        k = head.k_proj(x).reshape(b, n, heads, d // heads).transpose(1, 2)
        return (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(dim=-1)
