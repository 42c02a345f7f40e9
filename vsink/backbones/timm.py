"""Adapter for timm ``VisionTransformer`` models (ViT, DeiT, DINOv2 with and without registers).

timm's ``Eva`` models (EVA-02, RoPE ViTs, DINOv3) have their own adapter, a subclass of this one
(:mod:`vsink.backbones.timm_eva`); a ``timm:NAME`` spec is wrapped by whichever timm adapter
accepts the built model.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..attention import additive_mask
from ..errors import VsinkError
from .base import Backbone, module_parameters, to_pair
from .block_parts import BlockParts, HiddenOf, layer_scale
from .families import families, family


@family
class TimmBackbone(Backbone):
    """A timm ``VisionTransformer`` (or subclass such as ``VisionTransformerDistilled``)."""

    family = "timm"
    spec_forms = "timm:NAME                         a timm ViT, e.g. timm:vit_small_patch14_reg4_dinov2.lvd142m"
    saved_spec = r"demo|timm:[^\s/\\].*"

    @classmethod
    def name_problem(cls, name: str) -> Optional[str]:
        """Why ``timm:NAME`` cannot be built (timm knows no such model), or None."""
        import timm

        return None if timm.is_model(name) else f"timm has no model named {name!r} (see timm.list_models())"
    saved_spec_help = "demo, timm:NAME"
    scratch_registers = True
    register_kwarg = "reg_tokens"

    @classmethod
    def model_class(cls) -> type[nn.Module]:
        """The timm model class this adapter wraps."""
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer

    @classmethod
    def can_wrap(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_class())

    @classmethod
    def from_spec(cls, name: str, *, weights, img_size, pretrained, attn_implementation, model_kwargs) -> "TimmBackbone":
        model = load_timm(name, weights=weights, img_size=img_size, pretrained=pretrained, model_kwargs=model_kwargs)
        adapters = [c for c in families().values() if issubclass(c, TimmBackbone) and c.can_wrap(model)]
        if not adapters:
            raise VsinkError(f"timm:{name}: {type(model).__name__} is not a timm VisionTransformer (ViT, DeiT, "
                             "DINOv2) or Eva (EVA-02, RoPE ViTs, DINOv3); other timm architectures are not supported")
        return adapters[0](model, f"timm:{name}")

    def __init__(self, model: nn.Module, spec: str = "timm:<module>"):
        if not self.can_wrap(model):
            raise VsinkError(f"{spec}: {type(model).__name__} is not a timm {self.model_class().__name__}")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(
            model,
            spec,
            mean=cfg.get("mean", (0.485, 0.456, 0.406)),
            std=cfg.get("std", (0.229, 0.224, 0.225)),
            img_size=to_pair(model.patch_embed.img_size),
            patch_size=to_pair(model.patch_embed.patch_size),
        )

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @property
    def dynamic_size(self) -> bool:
        return bool(getattr(self.model, "dynamic_img_size", False))

    def _token_counts(self) -> tuple[int, int]:
        reg = self.model.reg_token
        n_reg = 0 if reg is None else int(reg.shape[1])
        return int(self.model.num_prefix_tokens) - n_reg, n_reg

    def _run_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixel_values)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def _parameter_roles(self) -> dict[str, list[Optional[nn.Parameter]]]:
        m = self.model
        return {"registers": [m.reg_token], "cls_token": [m.cls_token, getattr(m, "dist_token", None)],
                "pos_embed": [m.pos_embed], "patch_embed": module_parameters(m.patch_embed)}

    def _with_native_registers(self, tokens: torch.Tensor) -> "TimmBackbone":
        """timm's own ``reg_token``: the state dict equals that of the same architecture built
        with :attr:`register_kwarg` ``=n`` (position rows for the registers are zero when the
        position embedding covers the prefix tokens)."""
        if getattr(self.model, "dist_token", None) is not None:
            raise VsinkError(f"{self.spec}: adding registers to distilled DeiT is not supported")
        model = copy.deepcopy(self.model)
        n = tokens.shape[1]
        with torch.no_grad():
            old = model.reg_token
            model.reg_token = nn.Parameter(tokens if old is None else torch.cat([old, tokens], dim=1))
            if model.pos_embed is not None and not model.no_embed_class:
                pe, p = model.pos_embed, model.num_prefix_tokens
                model.pos_embed = nn.Parameter(torch.cat([pe[:, :p], pe.new_zeros(1, n, pe.shape[-1]), pe[:, p:]], dim=1))
        self._grow_prefix(model, n)
        new = type(self)(model, self.spec)
        new.mean, new.std, new.img_size = self.mean, self.std, self.img_size
        return new

    def _grow_prefix(self, model: nn.Module, n: int) -> None:
        """Count ``n`` more registers in the model's own attributes."""
        model.num_reg_tokens = int(getattr(model, "num_reg_tokens", 0)) + n
        model.num_prefix_tokens += n

    def _save_weights(self, directory, meta: dict[str, Any]) -> dict[str, Any]:
        """``model.safetensors`` is timm's state dict: ``timm.create_model(arch, reg_tokens=n,
        pretrained=True, pretrained_cfg_overlay=dict(file=...))`` (``num_reg_tokens=n`` for Eva;
        with the same size arguments) or ``load_state_dict`` reads it."""
        super()._save_weights(directory, meta)
        kwargs = dict(meta["model_kwargs"])
        n_reg = self._token_counts()[1]
        if n_reg:
            kwargs[self.register_kwarg] = n_reg
        arch = (getattr(self.model, "pretrained_cfg", None) or {}).get("architecture")
        return {"model_kwargs": kwargs, "architecture": arch}

    def _mlp_out_proj(self, layer: int) -> nn.Module:
        mlp = self.blocks[layer].mlp
        if not hasattr(mlp, "fc2"):
            raise VsinkError(f"{self.spec}: block {layer} MLP ({type(mlp).__name__}) has no fc2 projection")
        return mlp.fc2

    def block_parts(self, layer: int) -> BlockParts:
        """timm's pre-norm ``Block``: ``norm1``, the value third of the fused ``qkv``, ``proj``,
        ``ls1`` / ``ls2`` (LayerScale or identity), ``norm2``, the MLP up to ``fc2``."""
        from timm.layers import Attention

        block = self.blocks[layer]
        attn = getattr(block, "attn", None)
        if type(block).__name__ != "Block" or type(attn) is not Attention:
            raise VsinkError(f"{self.spec}: block {layer} ({type(block).__name__}) is not timm's pre-norm Block with "
                             "its standard Attention; no weight-only defect direction")
        if getattr(attn, "gate", None) is not None:
            raise VsinkError(f"{self.spec}: block {layer} has gated attention, which is not linear in the values; "
                             "no weight-only defect direction")
        value = attn.qkv.weight.chunk(3, dim=0)[2]
        out = self._mlp_out_proj(layer)
        return BlockParts(norm1=block.norm1, value=value, proj=attn.proj.weight, ls1=layer_scale(block.ls1),
                          norm2=block.norm2, hidden=HiddenOf(block.mlp, out), out=out.weight,
                          ls2=layer_scale(block.ls2), inner_norm=getattr(attn, "norm", None))

    def _install_attention(self, layer: int) -> Callable[[], None]:
        from timm.layers import Attention

        attn = self.blocks[layer].attn
        backbone = self
        if getattr(attn, "variant", None) is not None and hasattr(attn, "normaliser"):  # attention_variants

            def route(q, k, v, *, scale, mask, normalise):
                return backbone._attention(layer, q, k, v, scale=scale, mask=mask, normalise=normalise)

            def variant_forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                                is_causal: bool = False) -> torch.Tensor:
                return type(attn).forward(attn, x, attn_mask, is_causal, route=route)

            attn.forward = variant_forward

            def undo_variant() -> None:
                del attn.forward

            return undo_variant
        if type(attn) is not Attention:
            raise VsinkError(
                f"{self.spec}: block {layer} attention ({type(attn).__name__}) is not timm's standard Attention; "
                "vsink cannot compute its attention explicitly"
            )

        def forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
            B, N, _ = x.shape
            head_dim = attn.qkv.out_features // (3 * attn.num_heads)
            gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
            qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            mask = additive_mask(attn_mask, q.dtype, true_means_keep=True)
            if is_causal:
                causal = torch.full((N, N), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
                mask = causal if mask is None else mask + causal
            out = backbone._attention(layer, q, k, v, scale=attn.scale, mask=mask)
            out = out.transpose(1, 2).reshape(B, N, attn.num_heads * head_dim)
            out = getattr(attn, "norm", nn.Identity())(out)
            if gate is not None:
                out = out * gate
            return attn.proj_drop(attn.proj(out))

        attn.forward = forward

        def undo() -> None:
            del attn.forward

        return undo


def load_timm(name: str, *, weights: Optional[str], img_size: Optional[int], pretrained: bool,
              model_kwargs: dict[str, Any]) -> nn.Module:
    """Build a timm model by name (pretrained through timm's own loader unless ``weights``)."""
    import timm

    kwargs = dict(model_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs.setdefault("num_classes", 0)
    try:
        return timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise VsinkError(f"timm has no model named {name!r} (see timm.list_models())") from e
        raise
