"""Attention rollout (Abnar & Zuidema 2020) and full-attention capture, streamed from query blocks.

Rollout per image: each block's attention is fused over heads (mean, max or min), optionally
the lowest ``discard_ratio`` of its entries are zeroed (never those pointing at a class token),
then ``A' = 0.5 A + 0.5 I`` with rows re-normalised (``keepdim=True``), and
``R = A'_L ... A'_2 A'_1``. The map is the class-token row of ``R`` (the mean of the patch rows
for models without a class token), read over every key through the :class:`TokenLayout`, so
registers and class tokens are kept apart rather than dropped or mixed into the grid.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .backbones.base import Backbone, SiteHandle
from .errors import VsinkError
from .layout import TokenLayout

FUSIONS = ("mean", "max", "min")


def fuse_heads(probs: torch.Tensor, fusion: str) -> torch.Tensor:
    """[B, H, q, N] → [B, q, N]."""
    if fusion == "mean":
        return probs.mean(dim=1)
    if fusion == "max":
        return probs.amax(dim=1)
    if fusion == "min":
        return probs.amin(dim=1)
    raise VsinkError(f"unknown head fusion {fusion!r}; use one of {', '.join(FUSIONS)}")


def rollout_step(fused: torch.Tensor, layout: TokenLayout, discard_ratio: float = 0.0) -> torch.Tensor:
    """One block's rollout factor ``A'`` from its head-fused attention [B, N, N]."""
    a = fused.clone()
    if discard_ratio > 0:
        B, N, _ = a.shape
        protected = torch.zeros(N, N, dtype=torch.bool, device=a.device)
        protected[:, layout.cls_slice] = True
        flat = a.view(B, -1)
        candidates = flat.masked_fill(protected.view(1, -1), float("inf"))
        k = int(N * N * discard_ratio)
        if k:
            lowest = candidates.topk(k, dim=-1, largest=False).indices
            flat.scatter_(1, lowest, 0.0)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = 0.5 * a + 0.5 * eye
    return a / a.sum(dim=-1, keepdim=True)


def rollout_row(joint: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The rollout map over all keys [B, N]: the class-token row, or the mean of patch rows."""
    if layout.cls_token is not None:
        return joint[:, layout.cls_token]
    return layout.patches(joint, dim=1).mean(dim=1)


class RolloutObserver:
    """Accumulates the rollout product over all blocks while the model runs."""

    def __init__(self, fusion: str = "mean", discard_ratio: float = 0.0):
        if fusion not in FUSIONS:
            raise VsinkError(f"unknown head fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        if not 0.0 <= discard_ratio < 1.0:
            raise VsinkError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        self.fusion, self.discard_ratio = fusion, discard_ratio
        self.layout: Optional[TokenLayout] = None
        self.joint: Optional[torch.Tensor] = None
        self._fused: Optional[torch.Tensor] = None
        self._seen = 0

    def install(self, backbone: Backbone, layout: TokenLayout) -> list[SiteHandle]:
        self.layout, self.joint = layout, None
        return [backbone.hook("attn_probs", layer, self._on_probs) for layer in range(backbone.num_layers)]

    def _on_probs(self, probs: torch.Tensor, start: int, logits: Optional[torch.Tensor]) -> None:
        B, _, q, N = probs.shape
        if start == 0:
            self._fused, self._seen = probs.new_empty(B, N, N, dtype=torch.float32), 0
        self._fused[:, start:start + q] = fuse_heads(probs.detach().float(), self.fusion)
        self._seen += q
        if self._seen == N:
            step = rollout_step(self._fused, self.layout, self.discard_ratio)
            self.joint = step if self.joint is None else step @ self.joint
            self._fused = None

    def row(self) -> torch.Tensor:
        if self.joint is None:
            raise VsinkError("rollout has seen no forward pass")
        return rollout_row(self.joint, self.layout)


class FullAttentionObserver:
    """Hands each chosen block's full attention [B, heads, N, N] to ``sink`` as soon as the block
    is done, so at most one block's matrix is held at a time."""

    def __init__(self, layers: list[int], heads: Optional[list[int]],
                 sink: Callable[[int, torch.Tensor], None]):
        self.layers, self.heads, self.sink = layers, heads, sink
        self._buf: Optional[torch.Tensor] = None
        self._seen = 0

    def install(self, backbone: Backbone) -> list[SiteHandle]:
        return [backbone.hook("attn_probs", layer, self._fn(layer)) for layer in self.layers]

    def _fn(self, layer: int):
        def on_probs(probs: torch.Tensor, start: int, logits: Optional[torch.Tensor]) -> None:
            p = probs.detach().float()
            if self.heads is not None:
                p = p[:, self.heads]
            B, H, q, N = p.shape
            if start == 0:
                self._buf, self._seen = p.new_empty(B, H, N, N), 0
            self._buf[:, :, start:start + q] = p
            self._seen += q
            if self._seen == N:
                full, self._buf = self._buf, None
                self.sink(layer, full)

        return on_probs
