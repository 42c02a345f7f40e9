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
        groups: the prompt's bidirectional blocks [B, N] (:meth:`LVLM.attention_groups`): two prompt
            tokens of the same group ``>= 0`` see each other whatever their order (PaliGemma's
            prefix, Gemma 3's images); ``-1`` and generated tokens: causal only.
    """

    def __init__(self, lvlm: LVLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 groups: Optional[torch.Tensor] = None):
        self.lvlm = lvlm
        self.spans = lvlm.image_spans(input_ids)
        self.length = int(input_ids.shape[1])
        device = input_ids.device
        self.valid0 = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool().to(device)
        self.image0 = self.spans.mask(device=device)
        self.image_end = torch.tensor([self.spans.end(b) for b in range(self.spans.batch_size)], device=device)
        self.no_padding = bool(self.valid0.all())
        self.groups0 = groups.to(device).long() if groups is not None else None
        #: FastV: prompt positions kept from block ``prune_layer`` on [B, n] (None: nothing pruned)
        self.kept: Optional[torch.Tensor] = None
        self.prune_layer: Optional[int] = None
        #: per layer: (queries, keys) of the attention call in progress
        self.shapes: dict[int, tuple[int, int]] = {}
        #: positions in the sequence so far, as of the forward pass in progress (:meth:`begin_pass`)
        self.seen: Optional[int] = None
        #: the first position the pass in progress computes for the first time: 0 in the prompt
        #: pass, then the newest token's (a pass without the cache recomputes the rows before it)
        self.fresh = 0

    def begin_pass(self, queries: int) -> None:
        """A forward pass of ``queries`` new positions starts: the whole sequence (prompt pass, or
        any pass without the cache) or one more token (a cached decoding step)."""
        self.fresh = self.seen or 0
        self.seen = queries if queries > 1 or self.seen is None else self.seen + 1

    @property
    def batch_size(self) -> int:
        return self.spans.batch_size

    def key_positions(self, layer: int, kv: int, device: torch.device) -> torch.Tensor:
        """Original positions of a layer's keys [B, kv]."""
        B = self.batch_size
        if self.kept is not None and self.prune_layer is not None and layer >= self.prune_layer:
            n = self.kept.shape[1]
            end = self.length + kv - n if self.seen is None else max(self.seen, self.length + kv - n)
            tail = torch.arange(self.length, end, device=device).expand(B, -1)
            return torch.cat([self.kept.to(device), tail], dim=1)[:, -kv:]  # a sliding window keeps the last
        if self.seen is not None and kv < self.seen:  # a sliding-window layer's cache keeps the last keys only
            return torch.arange(self.seen - kv, self.seen, device=device).expand(B, -1)
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

    def mask(self, layer: int, q: int, kv: int, device: torch.device, dtype: torch.dtype,
             window: Optional[int] = None) -> torch.Tensor:
        """Additive mask [B, 1, q, kv] of a layer's attention: causal by original position (within
        ``window`` positions back for a sliding-window layer), bidirectional inside the prompt's
        groups, the prompt's padding masked (``finfo.min``, as the models' own eager masks)."""
        kpos = self.key_positions(layer, kv, device)
        qpos = kpos[:, kv - q:]
        allowed = kpos[:, None, :] <= qpos[:, :, None]
        if window is not None:
            allowed = allowed & (qpos[:, :, None] - kpos[:, None, :] < window)
        if self.groups0 is not None:
            kg, qg = self.lookup(self.groups0, kpos, -1), self.lookup(self.groups0, qpos, -1)
            allowed = allowed | ((qg[:, :, None] == kg[:, None, :]) & (qg[:, :, None] >= 0))
        if not self.no_padding:
            allowed = allowed & self.lookup(self.valid0, kpos, True)[:, None, :]
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
