"""The context of one generation call on a batch: where every key of every decoder layer came
from in the original sequence, and the masks that follow from it.

Every key is identified by its position in the original sequence (prompt, then generated tokens).
Masks are built from those positions (causal) and the prompt's padding, so layers whose keys FastV
pruned get the right mask without the model's help. Mitigations read the image tokens, the query
positions of the rows being computed and the key positions from here; a
:class:`~vsink.backbones.hf_decoder.DecoderModel` bound to a context takes every routed layer's
mask from it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backbones.hf_lvlm import LVLM


class DecodeContext:
    """Positions and masks of one ``generate`` call (see the module docstring).

    Args:
        lvlm: the model.
        input_ids: the prompt batch [B, N] (left-padded).
        attention_mask: its padding mask [B, N] (1 = real token).
    """

    def __init__(self, lvlm: LVLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        self.lvlm = lvlm
        self.spans = lvlm.image_spans(input_ids)
        self.length = int(input_ids.shape[1])
        device = input_ids.device
        self.valid0 = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool().to(device)
        self.image0 = self.spans.mask(device=device)
        self.image_end = torch.tensor([self.spans.end(b) for b in range(self.spans.batch_size)], device=device)
        self.no_padding = bool(self.valid0.all())
        #: FastV: prompt positions kept from block ``prune_layer`` on [B, n] (None: nothing pruned)
        self.kept: Optional[torch.Tensor] = None
        self.prune_layer: Optional[int] = None
        #: per layer: (queries, keys) of the attention call in progress
        self.shapes: dict[int, tuple[int, int]] = {}

    @property
    def batch_size(self) -> int:
        return self.spans.batch_size

    def key_positions(self, layer: int, kv: int, device: torch.device) -> torch.Tensor:
        """Original positions of a layer's keys [B, kv]."""
        B = self.batch_size
        if self.kept is not None and self.prune_layer is not None and layer >= self.prune_layer:
            n = self.kept.shape[1]
            tail = torch.arange(self.length, self.length + kv - n, device=device).expand(B, -1)
            return torch.cat([self.kept.to(device), tail], dim=1)
        return torch.arange(kv, device=device).expand(B, -1)

    def query_positions(self, layer: int, device: torch.device) -> torch.Tensor:
        """Original positions [B, q] of the queries of the attention call in progress at ``layer``."""
        q, kv = self.shapes[layer]
        return self.key_positions(layer, kv, device)[:, kv - q:]

    def lookup(self, table: torch.Tensor, pos: torch.Tensor, beyond: bool) -> torch.Tensor:
        """``table`` [B, prompt] at positions ``pos`` [B, n]; positions past the prompt get ``beyond``."""
        inside = pos < self.length
        got = table.gather(1, pos.clamp(max=self.length - 1))
        return torch.where(inside, got, torch.full_like(got, beyond))

    def image_keys(self, layer: int, kv: int, device: torch.device) -> torch.Tensor:
        """Which of a layer's keys are image tokens [B, kv]."""
        return self.lookup(self.image0, self.key_positions(layer, kv, device), False)

    def mask(self, layer: int, q: int, kv: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, 1, q, kv] of a layer's attention: causal by original position, the
        prompt's padding masked (``finfo.min``, as the models' own eager masks)."""
        kpos = self.key_positions(layer, kv, device)
        qpos = kpos[:, kv - q:]
        allowed = kpos[:, None, :] <= qpos[:, :, None]
        if not self.no_padding:
            allowed = allowed & self.lookup(self.valid0, kpos, True)[:, None, :]
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
