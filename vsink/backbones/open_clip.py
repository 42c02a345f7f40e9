"""Adapter for open_clip ``VisionTransformer`` towers.

Supports both block types open_clip ships: ``ResidualAttentionBlock`` (``nn.MultiheadAttention``)
and ``CustomResidualAttentionBlock`` (open_clip's own ``Attention``); both keep
``in_proj_weight`` / ``in_proj_bias``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import additive_mask
from ..errors import VsinkError
from .base import Backbone, module_parameters, to_pair
from .block_parts import BlockParts, HiddenOf, layer_scale
from .families import family

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@family
class OpenClipBackbone(Backbone):
    """The vision tower of an open_clip model (``model.visual``)."""

    family = "open_clip"
    spec_forms = "open_clip:NAME[/PRETRAINED_TAG]   an open_clip vision tower, e.g. open_clip:ViT-B-16/laion2b_s34b_b88k"
    saved_spec = r"open_clip:[^\s/\\].*"
    saved_spec_help = "open_clip:NAME[/TAG]"

    @classmethod
    def can_wrap(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip.") or (
            hasattr(model, "visual") and hasattr(getattr(model, "visual"), "conv1"))

    @classmethod
    def from_spec(cls, name: str, *, weights, img_size, pretrained, attn_implementation,
                  model_kwargs) -> "OpenClipBackbone":
        arch, _, tag = name.partition("/")
        model, mean, std = load_open_clip(arch, tag=tag or None, weights=weights, img_size=img_size,
                                          model_kwargs=model_kwargs)
        return cls(model, f"open_clip:{name}", mean=mean, std=std)

    def __init__(self, visual: nn.Module, spec: str = "open_clip:<module>",
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD):
        if hasattr(visual, "visual"):
            visual = visual.visual
        if not (hasattr(visual, "transformer") and hasattr(visual, "conv1")):
            raise VsinkError(f"{spec}: not an open_clip VisionTransformer tower")
        self.seq_first = not getattr(visual.transformer, "batch_first", False)
        super().__init__(visual, spec, mean=mean, std=std,
                         img_size=to_pair(visual.image_size), patch_size=to_pair(visual.patch_size))

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.transformer.resblocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.transformer.resblocks[0].attn.num_heads)

    @property
    def dynamic_size(self) -> bool:
        return False

    def _token_counts(self) -> tuple[int, int]:
        return 1, 0

    def _run_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.ln_post

    def _parameter_roles(self) -> dict[str, list[Optional[nn.Parameter]]]:
        m = self.model
        return {"cls_token": [m.class_embedding], "pos_embed": [m.positional_embedding],
                "patch_embed": module_parameters(m.conv1)}

    def _state_for_model(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full CLIP checkpoint (``visual.*`` keys) → the vision tower's part of it."""
        if any(k.startswith("visual.") for k in state):
            return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        return state

    def _register_points(self) -> tuple[nn.Module, str, nn.Module, str]:
        """Registers enter after the class token and position embedding (at ``ln_pre``'s input)
        and leave at the transformer's output, before ``ln_post`` and pooling."""
        return self.model.ln_pre, "pre", self.model.transformer, "post"

    def _mlp_out_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.c_proj

    def block_parts(self, layer: int) -> BlockParts:
        """open_clip's ``ResidualAttentionBlock``: ``ln_1``, the value third of ``in_proj_weight``,
        ``out_proj``, ``ls_1`` / ``ls_2``, ``ln_2``, the MLP up to ``c_proj``."""
        block = self.blocks[layer]
        attn = block.attn
        if not hasattr(attn, "in_proj_weight") or attn.in_proj_weight is None or not hasattr(attn, "out_proj"):
            raise VsinkError(f"{self.spec}: block {layer} attention ({type(attn).__name__}) has no fused in_proj_weight; "
                             "no weight-only defect direction")
        if getattr(block, "ln_attn", None) is not None and not isinstance(block.ln_attn, nn.Identity):
            raise VsinkError(f"{self.spec}: block {layer} normalises inside its attention (scale_attn); "
                             "no weight-only defect direction")
        out = self._mlp_out_proj(layer)
        return BlockParts(norm1=block.ln_1, value=attn.in_proj_weight.chunk(3, dim=0)[2], proj=attn.out_proj.weight,
                          ls1=layer_scale(getattr(block, "ls_1", None)), norm2=block.ln_2,
                          hidden=HiddenOf(block.mlp, out), out=out.weight, ls2=layer_scale(getattr(block, "ls_2", None)))

    def _install_attention(self, layer: int) -> Callable[[], None]:
        attn = self.blocks[layer].attn
        if isinstance(attn, nn.MultiheadAttention):
            forward = self._mha_forward(layer, attn)
        elif hasattr(attn, "in_proj_weight") and hasattr(attn, "out_proj"):
            forward = self._custom_forward(layer, attn)
        else:
            raise VsinkError(f"{self.spec}: block {layer} attention ({type(attn).__name__}) is not supported")
        attn.forward = forward

        def undo() -> None:
            del attn.forward

        return undo

    def _qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return tuple(t.reshape(B, N, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))

    def _mha_forward(self, layer: int, mha: nn.MultiheadAttention):
        if not mha._qkv_same_embed_dim:
            raise VsinkError(f"{self.spec}: block {layer} uses separate q/k/v projections, not supported")
        backbone = self

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if not (key is query and value is query):
                raise VsinkError("vsink routes self-attention only (query, key and value must be the same tensor)")
            x = query if mha.batch_first else query.transpose(0, 1)
            B, N, C = x.shape
            q, k, v = backbone._qkv(mha, x)
            mask = additive_mask(attn_mask, q.dtype, true_means_keep=False)
            if key_padding_mask is not None:
                pad = additive_mask(key_padding_mask, q.dtype, true_means_keep=False)[:, None, None, :]
                mask = pad if mask is None else mask + pad
            out = backbone._attention(layer, q, k, v, scale=(C // mha.num_heads) ** -0.5, mask=mask)
            out = F.linear(out.transpose(1, 2).reshape(B, N, C), mha.out_proj.weight, mha.out_proj.bias)
            return (out if mha.batch_first else out.transpose(0, 1)), None

        return forward

    def _custom_forward(self, layer: int, attn: nn.Module):
        backbone = self

        def forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            B, N, C = x.shape
            q, k, v = backbone._qkv(attn, x)
            mask = additive_mask(attn_mask, q.dtype, true_means_keep=False)
            if mask is not None and mask.ndim == 3:
                mask = mask.reshape(B, attn.num_heads, N, N)
            if getattr(attn, "logit_scale", None) is not None:
                q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
                scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp()
            else:
                q, k = attn.ln_q(q), attn.ln_k(k)
                scale = attn.scale
            out = backbone._attention(layer, q, k, v, scale=scale, mask=mask)
            if getattr(attn, "head_scale", None) is not None:
                out = out * attn.head_scale
            out = attn.ln_inner(out.transpose(1, 2).reshape(B, N, C))
            return attn.out_drop(attn.out_proj(out))

        return forward


def load_open_clip(name: str, *, tag: Optional[str], weights: Optional[str], img_size: Optional[int],
                   model_kwargs: dict[str, Any]) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    """Build an open_clip model; return (visual tower, mean, std)."""
    import open_clip

    if name not in open_clip.list_models():
        raise VsinkError(f"open_clip has no model named {name!r} (see open_clip.list_models())")
    kwargs = dict(model_kwargs)
    if img_size is not None:
        kwargs["force_image_size"] = img_size
    pretrained = tag if weights is None else None
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
    visual = model.visual
    mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
    return model, mean, std
