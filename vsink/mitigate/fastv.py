"""FastV (Chen et al., ECCV 2024): from block ``k`` on, the decoder sees only the image tokens the
last prompt token attended to most in block ``k − 1``; the original position ids are kept.

The pruning is an edit of block ``k``'s call (hidden states, position ids and embeddings) and of the
calls of the blocks after it (their masks, built from original positions by the generation
context, so that every block runs its own attention implementation — eager, SDPA or flash — on the
pruned keys). The scores come from an ``attn_probs`` observer on block ``k − 1``.

``protocol="official"`` follows the released llava-hf ``fastv_forward`` (pkunlp-icler/FastV): the
kept count is ``round(n(1 − R))`` (vsink's paper protocol: ``n − round(nR)``), ties go to
``torch.topk``, and without the KV cache every forward re-prunes by the newest token's attention
(the paper protocol prunes once, at the prompt). Official default k = 3 (with R = 0.5: the
lmms-eval script ``fastv_kvcache.py`` behind the README's LLaVA-1.5-7B table).

A model that adds DeepStack features to the image positions after its first decoder layers
(Qwen3-VL, :meth:`~vsink.backbones.hf_lvlm.LVLM.deepstack_layers`): with ``k`` at or below the
last such layer the model's own injection (one mask over the unpruned sequence) cannot follow the
pruned one, so FastV takes it over (:meth:`~vsink.backbones.hf_lvlm.LVLM.observe_deepstack`) and
adds each level after its layer, as the model does — at every image position before ``k``, at the
kept image tokens, each with its own feature, from ``k`` on (the pruned tokens' features are dropped
with them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ..backbones.hooks import hidden_states_arg
from ..backbones.sites import is_muted
from ..errors import VsinkError
from ..options import Float, Int
from .base import Mitigation, Run, below_depth, register
from .settings import CheckedSettings, setting


@dataclass
class FastVSettings(CheckedSettings):
    """FastV's settings (see the module docstring)."""

    k: int = setting(2, Int(min=1), "decoder layer from which pruned image tokens are dropped (below the depth)")
    ratio: float = setting(0.5, Float(0, 1, max_open=True), "R: fraction of image tokens pruned")
    protocol: str = "paper"

    NAME: ClassVar[str] = "fastv"
    #: lmms-eval-with-kvcache/fastv_kvcache.py: K = 3, ratio = 0.5
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {"k": 3}


def _gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` [..., B, N, d] at token positions ``idx`` [B, n] (per row): rotary embeddings are
    [B, N, d], or [3, B, N, d] for M-RoPE under transformers 4.x."""
    lead = (1,) * (t.ndim - 3)
    index = idx.reshape(*lead, idx.shape[0], idx.shape[1], 1).expand(*t.shape[:-2], idx.shape[1], t.shape[-1])
    return t.gather(-2, index)


@register
class FastV(Mitigation):
    """FastV as a composable mitigation (see the module docstring)."""

    name = "fastv"
    settings_class = FastVSettings
    #: the pruning state (kept positions) belongs to the main pass's context
    in_branches = False

    def _install(self, run: Run, handles: list) -> None:
        s: FastVSettings = self.settings
        n = run.decoder.num_layers
        below_depth(run, self.name, "k", s.k)
        counts = run.context.spans.counts()
        if len(set(counts)) > 1:
            raise VsinkError(f"FastV needs the same number of image tokens in every row, got {counts}")
        run.context.prune_layer = s.k
        self._scores: Optional[torch.Tensor] = None
        self._gather: Optional[torch.Tensor] = None
        self._total = 0
        # the last prompt row's scores; a cached decode step (one row) needs none
        handles.append(run.decoder.hook("attn_probs", s.k - 1, self._observe(run),
                                        rows=lambda queries, keys: queries - 1 if queries > 1 else queries))
        for layer in range(s.k, n):  # first of the block's pre-hooks: every site sees the pruned sequence
            handles.append(run.decoder.blocks[layer].register_forward_pre_hook(self._prune(run, layer),
                                                                               with_kwargs=True, prepend=True))
        injected = run.lvlm.deepstack_layers()
        self._deepstack: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None
        if injected and s.k <= max(injected):  # DeepStack after a pruned layer: vsink injects (see the docstring)
            handle = run.lvlm.observe_deepstack(self._take_deepstack(run))
            if handle is None:
                raise VsinkError(f"fastv: {run.lvlm.spec} names DeepStack layers {injected} but cannot hand them over")
            handles.append(handle)
            for i, layer in enumerate(injected):
                handles.append(run.decoder.blocks[layer].register_forward_hook(self._inject(run, i, layer)))

    def _observe(self, run: Run):
        layer = self.settings.k - 1

        def fn(probs: torch.Tensor, q_start: int, logits: Optional[torch.Tensor]) -> None:
            queries, _ = run.context.shapes[layer]
            if queries > 1 and q_start + probs.shape[2] == queries:  # a full pass: the last prompt row
                self._scores = probs[:, :, -1, :].mean(1)

        return fn

    def _prune(self, run: Run, layer: int):
        ctx = run.context

        def pre(module, args, kwargs):
            if run.decoder.suspended or is_muted(self.name):
                return None
            h = hidden_states_arg(args, kwargs)
            if h.shape[1] == 1 and ctx.kept is not None:  # a cached decode step: nothing to prune
                kwargs["attention_mask"] = self._mask(run, layer, 1, kwargs, h)
                return args, kwargs
            if layer == self.settings.k:
                if ctx.kept is None or self.settings.protocol == "official":  # official: every full pass
                    ctx.kept = self._choose_kept(run)
                    pruned = ctx.length - ctx.kept.shape[1]
                    self.count(layer, tokens_pruned=pruned * ctx.batch_size)
                self._total = total = h.shape[1]
                tail = torch.arange(ctx.length, total, device=h.device).expand(h.shape[0], -1)
                self._gather = torch.cat([ctx.kept.to(h.device), tail], dim=1)
                h = h.gather(1, self._gather[..., None].expand(-1, -1, h.shape[-1]))
            idx = self._gather
            for key in [k for k in kwargs if k.startswith("position_embeddings")]:  # Gemma 3 (4.x): _global, _local
                if kwargs[key] is not None:
                    kwargs[key] = tuple(_gather_tokens(t, idx) for t in kwargs[key])
            pos = kwargs.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.shape[-1] == self._total:
                kwargs["position_ids"] = pos.gather(-1, idx.expand(*pos.shape[:-1], -1))
            kwargs["attention_mask"] = self._mask(run, layer, h.shape[1], kwargs, h)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return pre

    def _take_deepstack(self, run: Run):
        def take(masks: Optional[torch.Tensor], features: list[torch.Tensor]) -> bool:
            active = masks is not None and not (run.decoder.suspended or is_muted(self.name))
            self._deepstack = (masks, features) if active else None
            return active

        return take

    def _inject(self, run: Run, i: int, layer: int):
        """Block ``layer``'s output plus DeepStack level ``i`` at the image positions the block saw
        (all of them before k; from k on, the kept ones, each with its own feature)."""

        def hook(module, args, output):
            if self._deepstack is None:
                return None
            masks, features = self._deepstack
            h = output[0] if isinstance(output, tuple) else output
            masks, feats = masks.to(h.device), features[i].to(h.device, h.dtype)
            if layer >= self.settings.k:
                order = (masks.flatten().long().cumsum(0) - 1).reshape(masks.shape)  # feature row of each position
                masks = masks.gather(1, self._gather)
                feats = feats[order.gather(1, self._gather)[masks]]
            h = h.clone()
            h[masks] = h[masks] + feats
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    @staticmethod
    def _mask(run: Run, layer: int, q: int, kwargs: dict, h: torch.Tensor) -> torch.Tensor:
        """The mask of a pruned block's keys, from original positions (any implementation reads it)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length(layer)) if cache is not None else 0
        return run.context.mask(layer, q, past + q, h.device, h.dtype)

    def _choose_kept(self, run: Run) -> torch.Tensor:
        """Prompt positions kept from block k on: every non-image token and the top (1 − R)
        image tokens of each row by the last token's head-mean attention in block k − 1
        (``paper``: n − round(nR) tokens, ties to the earlier position; ``official``:
        round(n(1 − R)) tokens by ``torch.topk``)."""
        scores, ctx, s = self._scores, run.context, self.settings
        if scores is None:
            raise VsinkError("FastV: no attention was captured in the block before k")
        rows = []
        for b in range(ctx.batch_size):
            img = ctx.spans.positions(b)
            if s.protocol == "official":
                order = torch.topk(scores[b, img], round(len(img) * (1 - s.ratio))).indices
            else:
                keep_n = len(img) - int(round(s.ratio * len(img)))
                order = torch.sort(scores[b, img], descending=True, stable=True).indices[:keep_n]
            chosen = {img[i] for i in order.tolist()}
            rows.append([p for p in range(ctx.length) if not ctx.image0[b, p] or p in chosen])
        return torch.tensor(rows, device=scores.device)

    def nothing_edited_hint(self) -> str:
        return f"ratio {self.settings.ratio:g} keeps every image token"
