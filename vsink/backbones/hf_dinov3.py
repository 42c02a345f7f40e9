"""Hugging Face DINOv3 (``DINOv3ViTModel``): one class token, ``num_register_tokens`` storage
tokens (registers, right after the class token) and rotary positions (RoPE) on the patches.

How HF positions the tokens: ``apply_rotary_pos_emb`` rotates the *last* ``grid`` tokens of the
sequence by the patch centres' rotary angles and leaves the tokens before them (class and storage
tokens) unrotated. Attention reaches vsink after the rotation (the router receives the rotated
queries and keys), so captured attention includes the rotary positions.

Appended registers (test-time registers, :meth:`append_tokens`) sit after the patches. Unhandled,
HF would rotate the last ``grid`` tokens — the appended ones included — and shift every patch's
angle onto its neighbour. The adapter therefore extends the rotary table by identity rows (cos 1,
sin 0) for them: appended registers get no rotary position, exactly like the class and storage
tokens, and every patch keeps its own. ``with_registers(n)`` is native: a ``DINOv3ViTModel`` with
``num_register_tokens`` grown by ``n``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .hf_vision import IMAGENET_MEAN, IMAGENET_STD, HFVisionBackbone, hf_adapter
from .sites import SiteHandle


@hf_adapter("dinov3_vit", model_class="DINOv3ViTModel", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_cls=1)
class HFDinov3Backbone(HFVisionBackbone):
    """A Hugging Face ``DINOv3ViTModel`` (storage tokens as registers, RoPE on the patches)."""

    def append_tokens(self, n: int) -> SiteHandle:
        """:meth:`Backbone.append_tokens`, with identity rotary rows for the appended tokens."""
        handle = super().append_tokens(n)

        def extend(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]):
            cos, sin = output
            ones = cos.new_ones(*cos.shape[:-2], n, cos.shape[-1])
            return torch.cat([cos, ones], dim=-2), torch.cat([sin, torch.zeros_like(ones)], dim=-2)

        rope = self.owner.rope_embeddings.register_forward_hook(extend)

        def remove() -> None:
            rope.remove()
            handle.remove()

        return SiteHandle(remove)

    def _state_for_model(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints name the layers ``layer.N`` (the released files, transformers 4.x and
        ``save_pretrained`` in 5.x); transformers 5 nests them as ``model.layer.N``."""
        keys = self.model.state_dict().keys()
        if any(k.startswith("model.layer.") for k in keys):
            return {f"model.{k}" if k.startswith("layer.") else k: v for k, v in state.items()}
        return state

    def _with_native_registers(self, tokens: torch.Tensor) -> Optional[HFVisionBackbone]:
        import transformers

        return self._with_more_registers(transformers.DINOv3ViTConfig, transformers.DINOv3ViTModel, tokens)
