"""Per generated token, the attention of its query on each row's image tokens, per decoder layer
(head mean), captured from the decoder's ``attn_probs`` site. Capturing computes the last query row
of every layer explicitly (its probabilities are needed); the other rows keep the model's own
attention kernel."""

from __future__ import annotations

from typing import Optional

import torch

from ..backbones.hooks import HookSet
from .context import DecodeContext


class AttentionCapture(HookSet):
    """``steps``: one [B, layers, n_image] tensor per forward pass (NaN where FastV pruned a token)."""

    def __init__(self, decoder, context: DecodeContext):
        super().__init__()
        self.decoder, self.context = decoder, context
        self.steps: list[torch.Tensor] = []
        self._step: Optional[torch.Tensor] = None

    def _install(self) -> None:
        for layer in range(self.decoder.num_layers):
            self._handles.append(self.decoder.hook("attn_probs", layer, self._observer(layer),
                                                   rows=lambda queries, keys: queries - 1))

    def _observer(self, layer: int):
        def fn(probs: torch.Tensor, q_start: int, logits: Optional[torch.Tensor]) -> None:
            queries, kv = self.context.shapes[layer]
            if q_start + probs.shape[2] == queries:  # the block holding the last query row
                self._record(layer, probs[:, :, -1, :].mean(1), self.context.key_positions(layer, kv, probs.device))

        return fn

    def _record(self, layer: int, row: torch.Tensor, kpos: torch.Tensor) -> None:
        spans = self.context.spans
        n_img = max(spans.counts())
        if layer == 0:
            self._step = torch.full((row.shape[0], self.decoder.num_layers, n_img), float("nan"))
        for b in range(row.shape[0]):
            positions = torch.tensor(spans.positions(b), device=kpos.device)
            hit = kpos[b][:, None] == positions[None, :]  # [kv, n_img]
            present = hit.any(0)
            values = (row[b][:, None] * hit).sum(0)
            self._step[b, layer, : len(positions)][present.cpu()] = values[present].float().cpu()
        if layer == self.decoder.num_layers - 1:
            self.steps.append(self._step)
