"""A block's weights as the weight-only defect direction reads them (:mod:`vsink.defect`).

A pre-norm transformer block computes ``x + ls1 ⊙ proj(attn(V·norm1(x)))`` and then
``x + ls2 ⊙ out(hidden(norm2(x)))``. :class:`BlockParts` holds the pieces of that formula for one
block, in the model's own tensors: the two normalisations (LayerNorm or RMSNorm modules), the value
and output projections of the attention (every head's value rows, grouped key/value heads
repeated per query head), an optional normalisation between attention and output projection
(EVA-02's sub-LN), the layer scales (None where the block has none), the MLP's nonlinear part
(norm2's output to the input of the MLP output projection) and that projection. Each adapter
builds it in :meth:`vsink.backbones.base.Backbone.block_parts`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import VsinkError


class HiddenOf(nn.Module):
    """The input of ``out_proj`` when ``mlp`` runs (an MLP's nonlinear part, whatever its kind:
    GELU, SwiGLU packed or not, an inner norm)."""

    def __init__(self, mlp: nn.Module, out_proj: nn.Module):
        super().__init__()
        self.mlp = mlp
        self.out_proj = out_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = self.out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.mlp(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise VsinkError(f"{type(self.mlp).__name__}: its output projection ran {len(seen)} times, expected once")
        return seen[0]


@dataclass
class BlockParts:
    """One block's weights for the linearisation (see the module docstring)."""

    norm1: nn.Module
    value: torch.Tensor
    proj: torch.Tensor
    ls1: Optional[torch.Tensor]
    norm2: nn.Module
    hidden: nn.Module
    out: torch.Tensor
    ls2: Optional[torch.Tensor]
    inner_norm: Optional[nn.Module] = None

    def hidden64(self) -> nn.Module:
        """A float64 copy of :attr:`hidden` on the CPU (the model is left as it is)."""
        return copy.deepcopy(self.hidden).to(device="cpu", dtype=torch.float64).eval()


def norm_matrix(norm: Optional[nn.Module], dim: int, where: str) -> torch.Tensor:
    """The linear part the reference gives a normalisation, float64 [dim, dim]: ``diag(w)·(I − 11ᵀ/dim)``
    for a LayerNorm (scale and centring; the division by the token's spread is left out, as in
    the reference), ``diag(w)`` for an RMSNorm (no centring), the identity for ``nn.Identity``."""
    if norm is None or isinstance(norm, nn.Identity):
        return torch.eye(dim, dtype=torch.float64)
    name = type(norm).__name__.lower()
    weight = getattr(norm, "weight", None)
    w = torch.ones(dim, dtype=torch.float64) if weight is None else weight.detach().to("cpu", torch.float64)
    if w.shape != (dim,):
        raise VsinkError(f"{where}: {type(norm).__name__} weight has shape {tuple(w.shape)}, expected ({dim},)")
    if "rms" in name:
        return torch.diag(w)
    if "layernorm" in name or isinstance(norm, nn.LayerNorm):
        return torch.diag(w) @ (torch.eye(dim, dtype=torch.float64) - torch.full((dim, dim), 1.0 / dim,
                                                                                  dtype=torch.float64))
    raise VsinkError(f"{where}: normalisation {type(norm).__name__} is neither a LayerNorm nor an RMSNorm")


def repeat_kv(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """Value rows [kv_heads·d, D] → [heads·d, D]: each query head reads its group's value head."""
    if kv_heads == heads:
        return weight
    d = weight.shape[0] // kv_heads
    return weight.reshape(kv_heads, d, -1).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * d, -1)


def layer_scale(module: Optional[object]) -> Optional[torch.Tensor]:
    """A layer scale's gains: a tensor as it is, timm's / open_clip's ``gamma``, HF's ``lambda1``,
    None for no scale (None or ``nn.Identity``)."""
    if module is None or isinstance(module, nn.Identity):
        return None
    if isinstance(module, torch.Tensor):
        return module
    for name in ("gamma", "lambda1", "scale"):
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise VsinkError(f"layer scale {type(module).__name__}: no gamma / lambda1 / scale parameter")
