"""Explicit, query-chunked softmax attention used whenever vsink observes or edits attention.

Fused kernels (``scaled_dot_product_attention``, flash attention) never form the attention
matrix. When a probe or an edit needs it, adapters route a layer's attention through
:func:`explicit_attention` instead, which forms it one block of queries at a time, so memory
stays at ``B*H*chunk*N`` rather than ``B*H*N*N``, and hands each block to the installed
site functions.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

#: ``fn(logits, q_start) -> replacement or None``; ``logits`` is [B, H, q, N_keys] and covers
#: queries ``q_start : q_start + q``.
LogitFn = Callable[[torch.Tensor, int], Optional[torch.Tensor]]
#: ``fn(probs, q_start, logits) -> replacement or None``; ``logits`` are the final logits the
#: probabilities were computed from, or ``None`` once an earlier function replaced the
#: probabilities (they are then no longer ``softmax(logits)``).
ProbFn = Callable[[torch.Tensor, int, Optional[torch.Tensor]], Optional[torch.Tensor]]

DEFAULT_CHUNK_BYTES = 8 * 2**20


def query_chunk_size(batch: int, heads: int, n_keys: int, budget_bytes: Optional[int] = None) -> int:
    """Number of queries per block so one float32 block of logits fits in ``budget_bytes``
    (default :data:`DEFAULT_CHUNK_BYTES`)."""
    budget_bytes = DEFAULT_CHUNK_BYTES if budget_bytes is None else budget_bytes
    per_query = max(1, batch * heads * n_keys * 4)
    return max(1, int(budget_bytes // per_query))


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Union[float, torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    logit_fns: Sequence[LogitFn] = (),
    prob_fns: Sequence[ProbFn] = (),
    chunk_size: Optional[int] = None,
    q_offset: int = 0,
    normalise: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """softmax((q*scale) k^T + mask) v, computed block by block over queries (with ``softcap``:
    the logits capped to ``softcap · tanh(logits / softcap)`` before the mask, as Gemma 2 does).

    Args:
        q, k, v: [B, H, N, d] (keys/values may have their own length, and fewer heads when
            query heads share them: grouped-query attention, H a multiple of k's heads, query
            head h reading key/value head h // (H / k's heads), without copying k and v per head).
        scale: a float or a tensor broadcastable to [H, 1, 1] (per-head scale).
        mask: optional additive float mask broadcastable to [B, H, Nq, Nk].
        logit_fns: called on each block of pre-softmax logits; may return a replacement.
        prob_fns: called on each block of post-softmax probabilities (with the logits, see
            :data:`ProbFn`); may return a replacement.
        chunk_size: queries per block; default from :func:`query_chunk_size`.
        q_offset: index of ``q``'s first row among the layer's queries: the site functions get
            ``q_start`` counted from there (the mask covers ``q``'s rows only).
        normalise: ``normalise(logits, start)`` → weights, instead of the softmax (an attention
            variant, :mod:`vsink.attention_variants`; ``start``: the block's first row of
            ``q``); its rows need not sum to 1 and are passed on as they are, and ``prob_fns``
            get ``None`` for the logits (the weights are not their softmax).

    Returns:
        [B, H, Nq, d] in the dtype of ``v``. Softmax runs in float32 for low-precision inputs.
    """
    B, H, Nq, d = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if H % Hk:
        raise ValueError(f"{H} query heads cannot share {Hk} key/value heads")
    groups = H // Hk
    if chunk_size is None:
        chunk_size = query_chunk_size(B, H, Nk)
    kt = k.transpose(-2, -1)
    if Nq > chunk_size:  # several blocks: contiguous once, or matmul copies a strided k / v per block
        kt, v = kt.contiguous(), v.contiguous()
    if mask is not None and mask.ndim == 2:
        mask = mask[None, None]
    low_precision = v.dtype in (torch.float16, torch.bfloat16)
    out = v.new_empty(B, H, Nq, v.shape[-1])
    for start in range(0, Nq, chunk_size):
        stop = min(Nq, start + chunk_size)
        n = stop - start
        # grouped heads: the g query heads of one key head form one [g·n, d] matrix
        logits = ((q[:, :, start:stop] * scale).reshape(B, Hk, groups * n, d) @ kt).view(B, H, n, Nk)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if mask is not None:
            logits += mask[..., start:stop, :]  # logits is this block's own fresh tensor
        for fn in logit_fns:
            edited = fn(logits, start + q_offset)
            logits = logits if edited is None else edited
        if normalise is not None:
            probs = normalise(logits.float(), start).to(v.dtype) if low_precision else normalise(logits, start)
        else:
            probs = logits.float().softmax(dim=-1).to(v.dtype) if low_precision else logits.softmax(dim=-1)
        # the logits go with the weights only while these are their softmax (an attention variant's
        # weights are not: functions then see None, as after an edit, and use the weights alone)
        source: Optional[torch.Tensor] = logits if normalise is None else None
        for fn in prob_fns:
            edited = fn(probs, start + q_offset, source)
            if edited is not None:
                probs, source = edited, None
        out[:, :, start:stop] = (probs.reshape(B, Hk, groups * n, Nk) @ v).view(B, H, n, -1)
    return out


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype, *, true_means_keep: bool) -> Optional[torch.Tensor]:
    """Convert a boolean or float attention mask to an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        keep = mask if true_means_keep else ~mask
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
    return mask.to(dtype)
