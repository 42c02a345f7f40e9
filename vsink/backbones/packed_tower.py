"""The packed vision tower of Qwen3-VL (``model.visual``) with vsink's attention sites, for capture.

The tower takes every image's patches as one packed sequence [patches of all images, C] (no
batch axis), with 2-D rotary positions, and attends within each image: transformers calls the
attention function once per image on [1, heads, n, d]. :class:`PackedTowerSites` routes those
calls through vsink's explicit attention (the router of :mod:`vsink.backbones.hf_router`, as for
the decoder), so ``attn_logits`` / ``attn_probs`` / ``attn_qkv`` observe and edit each image's
attention; ``q_start`` counts within the image. It is not a vision backbone: the patches come in
the 2 × 2 merge windows' order, not a raster, and blocks read [N, C] without a batch axis, so the
block and MLP sites, a token layout, scans and test-time registers are refused.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import VsinkError
from ..layout import TokenLayout
from .hf_router import Router
from .sites import SiteModel

#: sites this adapter serves
ATTENTION_ONLY = ("attn_logits", "attn_probs", "attn_qkv")


class PackedTowerSites(SiteModel):
    """The attention sites of a packed Qwen-VL tower (see the module docstring)."""

    family = "packed-vl-tower"

    def __init__(self, model: nn.Module, tower: nn.Module, spec: str):
        super().__init__(tower, spec)
        config = model.config.vision_config
        self._blocks = list(tower.blocks)
        self._heads = int(getattr(config, "num_heads", 0) or config.num_attention_heads)
        self._router = Router(model, config, [block.attn for block in self._blocks], sub_config="vision_config",
                              label=spec)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    @property
    def num_heads(self) -> int:
        return self._heads

    def hook(self, site: str, layer: int, fn: Any, *, rows: Optional[Any] = None):
        if site not in ATTENTION_ONLY:
            raise VsinkError(f"{self.spec}: only the attention sites ({', '.join(ATTENTION_ONLY)}) of this packed tower "
                             f"are served, not {site!r} (its blocks read all images' patches without a batch axis)")
        return super().hook(site, layer, fn, rows=rows)

    def _mlp_out_proj(self, layer: int) -> nn.Module:
        raise VsinkError(f"{self.spec}: the packed tower's MLP site is not served")

    def layout(self) -> TokenLayout:
        raise VsinkError(f"{self.spec}: a packed tower has no token layout (its patches come in merge-window order)")

    def current_layout(self) -> TokenLayout:
        return self.layout()

    @torch.inference_mode()
    def forward(self, inputs: dict[str, Any]) -> Any:
        """The tower's output for prepared LVLM ``inputs`` (``pixel_values``, ``image_grid_thw``)."""
        pixels = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        return self.model(pixels, grid_thw=inputs["image_grid_thw"])

    def _install_attention(self, layer: int) -> Callable[[], None]:
        def routed(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                   **kwargs: Any):
            if self.suspended:
                original = module.__dict__["_vsink_router"].original
                return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            if attention_mask is not None:
                raise VsinkError(f"{self.spec}: block {layer} got an attention mask; the packed tower attends "
                                 "within each image without one")
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = self._attention(layer, query, key, value, scale=scale)
            return out.transpose(1, 2).contiguous(), None

        return self._router.route(layer, routed)
