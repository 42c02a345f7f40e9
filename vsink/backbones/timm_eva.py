"""Adapter for timm's ``Eva`` models: EVA-02 (``eva02_*``), timm's RoPE ViTs (``vit_*_rope*``:
timm's SBB ViTs with registers and Naver's RoPE-ViT, axial or mixed), DINOv3 (``vit_*_dinov3``: a
class token and 4 storage tokens, i.e. registers) and the other models timm builds on ``Eva``.

Rotary positions. timm hands every block the rotary table of the patch grid (``rope``: sin and
cos concatenated on the last axis, one row per patch) and rotates the queries and keys of the
patch tokens only; the prefix tokens (class token, registers) get no rotation. While an attention
site is installed, vsink computes that attention from the module's own projections with timm's
own ``apply_rot_embed_cat`` on the same rows, so the rotation is the library's.

Tokens appended after the patches (test-time registers, :meth:`TimmEvaBackbone.append_tokens`)
get no rotation either, like the prefix tokens: while they are present, the table each block
receives is extended by one identity row per appended token (sin 0, cos 1), which leaves their
queries and keys as they are and lets timm's own attention (fused or not) run on the longer
sequence. Registers added with :meth:`~vsink.backbones.base.Backbone.with_registers` are timm's
own ``reg_token`` (prefix tokens: no rotation, no position embedding).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VsinkError
from .base import module_parameters
from .block_parts import BlockParts, HiddenOf, layer_scale, repeat_kv
from .families import family
from .sites import SiteHandle
from .timm import TimmBackbone


@family
class TimmEvaBackbone(TimmBackbone):
    """A timm ``Eva`` model (``EvaAttention`` or ``AttentionRope`` blocks, rotary or absolute
    positions, class token and registers optional)."""

    family = "timm-eva"
    spec_forms = ("timm:NAME                         a timm RoPE ViT (timm's Eva): EVA-02, e.g. "
                  "timm:eva02_small_patch14_224;\n"
                  "                                    timm:vit_*_rope*, e.g. "
                  "timm:vit_base_patch16_rope_reg1_gap_256;\n"
                  "                                    DINOv3 (4 storage tokens = registers), e.g. "
                  "timm:vit_small_patch16_dinov3")
    saved_spec = r"timm:[^\s/\\].*"
    saved_spec_help = "timm:NAME"
    scratch_registers = True
    register_kwarg = "num_reg_tokens"

    @classmethod
    def model_class(cls) -> type[nn.Module]:
        from timm.models.eva import Eva

        return Eva

    def _parameter_roles(self) -> dict[str, list[Optional[nn.Parameter]]]:
        roles = super()._parameter_roles()
        # RoPE-Mixed learns its rotary frequencies: position parameters too
        roles["pos_embed"] = [self.model.pos_embed, *module_parameters(self.model.rope)]
        return roles

    def _grow_prefix(self, model: nn.Module, n: int) -> None:
        """``num_prefix_tokens`` of the model, of every block's attention (the rows the rotary
        table skips) and of patch dropout."""
        model.num_prefix_tokens += n
        for blk in model.blocks:
            blk.attn.num_prefix_tokens += n
        if model.patch_drop is not None:
            model.patch_drop.num_prefix_tokens += n

    def append_tokens(self, n: int) -> SiteHandle:
        """Append ``n`` zero tokens after the patches (see the base class); they get no rotary
        position: each block's rotary table is extended by identity rows while they are present."""
        appended = super().append_tokens(n)
        handles = [blk.register_forward_pre_hook(_cover_appended, with_kwargs=True) for blk in self.blocks]

        def remove() -> None:
            for h in handles:
                h.remove()
            appended.remove()

        return SiteHandle(remove)

    def block_parts(self, layer: int) -> BlockParts:
        """timm's pre-norm ``EvaBlock``: ``norm1``, the value rows (of the fused ``qkv`` or of
        ``v_proj``, grouped key/value heads repeated per query head), the sub-LN ``attn.norm``
        (identity unless EVA-02's), ``proj``, ``gamma_1`` / ``gamma_2``, ``norm2``, the MLP up to ``fc2``."""
        block = self.blocks[layer]
        if type(block).__name__ != "EvaBlock":
            raise VsinkError(f"{self.spec}: block {layer} ({type(block).__name__}) is not timm's pre-norm EvaBlock; "
                             "no weight-only defect direction")
        attn = block.attn
        heads = int(attn.num_heads)
        if getattr(attn, "qkv", None) is not None:
            value = attn.qkv.weight.chunk(3, dim=0)[2]
        else:
            value = repeat_kv(attn.v_proj.weight, int(getattr(attn, "num_kv_heads", heads)), heads)
        out = self._mlp_out_proj(layer)
        return BlockParts(norm1=block.norm1, value=value, proj=attn.proj.weight, ls1=layer_scale(block.gamma_1),
                          norm2=block.norm2, hidden=HiddenOf(block.mlp, out), out=out.weight,
                          ls2=layer_scale(block.gamma_2), inner_norm=getattr(attn, "norm", None))

    def _install_attention(self, layer: int) -> Callable[[], None]:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention

        attn = self.blocks[layer].attn
        if type(attn) not in (EvaAttention, AttentionRope):
            raise VsinkError(f"{self.spec}: block {layer} attention ({type(attn).__name__}) is not timm's EvaAttention "
                             "or AttentionRope; vsink cannot compute its attention explicitly")
        backbone = self

        def forward(x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                    is_causal: bool = False) -> torch.Tensor:
            B, N, _ = x.shape
            gate = attn.gate(x).sigmoid() if attn.gate is not None else None
            q, k, v = _project(attn, x)
            q, k = attn.q_norm(q), attn.k_norm(k)
            if rope is not None:
                q, k = _rotate(attn, q, v, rope), _rotate(attn, k, v, rope)
            groups = getattr(attn, "num_kv_groups", 1)
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = backbone._attention(layer, q, k, v, scale=attn.scale, mask=_additive(attn_mask, is_causal, N, q))
            out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
            if gate is not None:
                out = out * gate
            return attn.proj_drop(attn.proj(out))

        attn.forward = forward

        def undo() -> None:
            del attn.forward

        return undo


def _project(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, heads, N, head_dim] as timm's ``EvaAttention`` / ``AttentionRope`` project them
    (one fused ``qkv`` with EVA's separate q/v biases, or ``q_proj``/``k_proj``/``v_proj`` with
    fewer key/value heads under grouped-query attention)."""
    B, N, _ = x.shape
    H = attn.num_heads
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, weight=attn.qkv.weight, bias=bias)
        return qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    kv_heads = getattr(attn, "num_kv_heads", H)
    q = attn.q_proj(x).reshape(B, N, H, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    return q, k, v


def _rotate(attn: nn.Module, t: torch.Tensor, v: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """timm's rotation of the rows after the prefix tokens (queries or keys)."""
    from timm.layers import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(v)


def _additive(attn_mask: Optional[torch.Tensor], is_causal: bool, n: int, q: torch.Tensor) -> Optional[torch.Tensor]:
    """timm's self-attention bias: causal first, a boolean mask keeps True, a float mask is added."""
    if is_causal:
        return torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))


def _cover_appended(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple[tuple, dict[str, Any]]]:
    """Forward pre-hook: extend the block's rotary table by identity rows (sin 0, cos 1) for the
    tokens after the patches, so they pass unrotated."""
    rope = kwargs.get("rope")
    if rope is None:
        return None
    x = args[0] if args else kwargs["x"]
    missing = x.shape[1] - block.attn.num_prefix_tokens - rope.shape[-2]
    if missing <= 0:
        return None
    half = rope.shape[-1] // 2
    shape = (*rope.shape[:-2], missing, half)
    identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
    return args, {**kwargs, "rope": torch.cat([rope, identity], dim=-2)}
