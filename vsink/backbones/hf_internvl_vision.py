"""Hugging Face InternViT (``InternVLVisionModel``, the vision tower of InternVL's native
transformers class): one class token before the patches, learned absolute positions (resized
bicubically for other grids inside the model, so any size runs), layer scales ``lambda_1`` /
``lambda_2`` on both residual branches, an optional RMS query/key norm over the full width
(``use_qk_norm``, as InternViT-6B) and ``layer_norm`` or ``rms_norm`` blocks (``norm_type``).

The tower's output keeps the class token; InternVL drops it (``vision_feature_select_strategy``
"default"), reads ``vision_feature_layer`` (-1: the final output after ``layernorm``, which is the
identity when ``use_mean_pooling``; else that layer's hidden state) and pixel-shuffles the patches
2×2 into one image token each before the projector (:mod:`vsink.backbones.lvlm_internvl`).
Attention reaches vsink after the query/key norm (the router receives the normed queries and
keys), so captured attention is the model's own.
"""

from __future__ import annotations

from .block_parts import BlockParts, HiddenOf
from .hf_vision import IMAGENET_MEAN, IMAGENET_STD, HFVisionBackbone, hf_adapter


@hf_adapter("internvl_vision", model_class="InternVLVisionModel", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_cls=1)
class HFInternVLVisionBackbone(HFVisionBackbone):
    """A Hugging Face ``InternVLVisionModel`` (InternViT)."""

    def block_parts(self, layer: int) -> BlockParts:
        """Its pre-norm layer (``layernorm_before`` / ``layernorm_after``), the attention's value
        projection and ``projection_layer``, the gains ``lambda_1`` / ``lambda_2``, the MLP."""
        block = self.blocks[layer]
        attn = block.attention
        return BlockParts(norm1=block.layernorm_before, value=attn.v_proj.weight, proj=attn.projection_layer.weight,
                          ls1=block.lambda_1, norm2=block.layernorm_after, hidden=HiddenOf(block.mlp, block.mlp.fc2),
                          out=block.mlp.fc2.weight, ls2=block.lambda_2)
