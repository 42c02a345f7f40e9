"""One generation call's context: image positions, visual sinks, FastV's kept tokens, the
attention edits, and the attention function registered in ``transformers.AttentionInterface``.

The model's decoder switches to the ``"vsink_lvlm"`` attention implementation while a
:class:`Session` is bound; each decoder attention module then carries the session in its instance
``__dict__`` (no class or global state), so two models — or the text-only branch of PAI's
guidance, run with the session suspended — never see each other's context. Without a session
the function is the model's own eager attention.

Positions: every key of every layer is identified by its position in the original sequence
(prompt, then generated tokens). Masks are built from those positions (causal) and the prompt's
padding, so layers that FastV pruned get the right mask without the model's help.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..backbones.hf_lvlm import LVLM
from ..backbones.hf_vision import eager_attention_of
from ..errors import VsinkError
from .settings import SHARE_EPS, FastVSettings, PAISettings, VARSettings

ATTN_NAME = "vsink_lvlm"

def hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer's forward pre-hook receives."""
    return args[0] if args else kwargs["hidden_states"]


def sink_flags(h: torch.Tensor, dims: list[int], tau: float) -> torch.Tensor:
    """Sink tokens [B, N] of hidden states [B, N, D]: max over ``dims`` of φ > ``tau``."""
    return rms_phi(h, dims).amax(-1) > tau


def rms_phi(h: torch.Tensor, dims: Optional[list[int]] = None) -> torch.Tensor:
    """φ = |h / sqrt(mean(h²) + 1e-6)| per token (RMS-normalised, no weight), on ``dims`` only
    when given."""
    h = h.float()
    inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return ((h if dims is None else h[..., dims]) * inv).abs()


def vsink_lvlm_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0, **kwargs: Any):
    """The registered attention function: the session's explicit attention, or the model's eager one."""
    session: Optional[Session] = module.__dict__.get("_vsink_session")
    if session is None or session.suspended:
        return eager_attention_of(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                          **kwargs)
    return session.attend(module, query, key, value, scaling)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTN_NAME, vsink_lvlm_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


@dataclass
class Captured:
    """Per forward pass: the last query row's head-mean attention on each row's image tokens,
    per layer ([B, layers, n_image], NaN where FastV pruned the token)."""

    steps: list[torch.Tensor] = field(default_factory=list)


class Session:
    """Context of one ``generate`` call on a batch (see the module docstring)."""

    def __init__(self, lvlm: LVLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 var: Optional[VARSettings] = None, pai: Optional[PAISettings] = None,
                 fastv: Optional[FastVSettings] = None, capture: bool = False):
        self.lvlm, self.var, self.pai, self.fastv = lvlm, var, pai, fastv
        self.spans = lvlm.image_spans(input_ids)
        self.length = int(input_ids.shape[1])
        dev = input_ids.device
        self.valid0 = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool().to(dev)
        self.image0 = self.spans.mask(device=dev)
        self.image_end = torch.tensor([self.spans.end(b) for b in range(self.spans.batch_size)], device=dev)
        self.suspended = False
        self._no_padding = bool(self.valid0.all())
        self._needs_image = var is not None or pai is not None or capture
        self.kept: Optional[torch.Tensor] = None  # FastV: prompt positions kept from block k on [B, n]
        self._gather: Optional[torch.Tensor] = None
        self._total = 0
        self._fastv_scores: Optional[torch.Tensor] = None
        self.sinks: dict[int, list[torch.Tensor]] = {}  # per layer: flags of each pass's new tokens
        self.sink_dims: list[int] = []
        # PAI: whether α applies in the current pass (official + guidance: off until the text-only
        # branch has run once, see PAISettings)
        self.amplify = not (pai is not None and pai.protocol == "official" and pai.gamma is not None)
        if var is not None:
            from .sinks import sink_dimensions

            self.sink_dims = sink_dimensions(lvlm, var.sink_dims)
        self.capture = Captured() if capture else None
        self._step_capture: Optional[torch.Tensor] = None
        for name, cfg, key in (("var", var, "start_layer"), ("pai", pai, "start_layer"), ("fastv", fastv, "k")):
            if cfg is not None and getattr(cfg, key) >= lvlm.num_layers:
                raise VsinkError(f"{name} setting '{key}' must be below the {lvlm.num_layers} decoder layers of "
                                 f"{lvlm.spec}, got {getattr(cfg, key)}")
        if fastv is not None:
            if len(set(self.spans.counts())) > 1:
                raise VsinkError(f"FastV needs the same number of image tokens in every row, got {self.spans.counts()}")

    # --- binding ------------------------------------------------------------------------
    @contextmanager
    def bound(self) -> Iterator["Session"]:
        """Switch the decoder to vsink's attention and attach this session and its hooks."""
        _register()
        model = self.lvlm.model
        text_cfg = self.lvlm.text_config
        original = text_cfg._attn_implementation
        modules = self.lvlm.attention_modules()
        handles = []
        try:
            model.set_attn_implementation({"text_config": ATTN_NAME})
            for m in modules:
                m.__dict__["_vsink_session"] = self
            if self.fastv is not None:
                for i in range(self.fastv.k, self.lvlm.num_layers):
                    handles.append(self.lvlm.layers[i].register_forward_pre_hook(self._prune_hook(i), with_kwargs=True))
            if self.var is not None:
                for i, layer in enumerate(self.lvlm.layers):
                    handles.append(layer.register_forward_pre_hook(self._sink_hook(i), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            for m in modules:
                m.__dict__.pop("_vsink_session", None)
            model.set_attn_implementation({"text_config": original})

    @contextmanager
    def suspend(self) -> Iterator[None]:
        """Run the model without this session's edits (PAI's text-only branch)."""
        self.suspended = True
        try:
            yield
        finally:
            self.suspended = False

    # --- positions ----------------------------------------------------------------------
    def key_positions(self, layer: int, kv: int, device: torch.device) -> torch.Tensor:
        """Original positions of a layer's keys [B, kv]."""
        B = self.spans.batch_size
        if self.kept is not None and layer >= self.fastv.k:
            n = self.kept.shape[1]
            tail = torch.arange(self.length, self.length + kv - n, device=device).expand(B, -1)
            return torch.cat([self.kept.to(device), tail], dim=1)
        return torch.arange(kv, device=device).expand(B, -1)

    def _lookup(self, table: torch.Tensor, pos: torch.Tensor, beyond: bool) -> torch.Tensor:
        inside = pos < self.length
        got = table.gather(1, pos.clamp(max=self.length - 1))
        return torch.where(inside, got, torch.full_like(got, beyond))

    # --- hooks --------------------------------------------------------------------------
    def _sink_hook(self, layer: int):
        official = self.var.protocol == "official"

        def pre(module, args, kwargs):
            if official and layer in self.sinks:
                return  # official: the sinks are fixed by the prompt pass
            h = hidden_states_arg(args, kwargs)
            flags = sink_flags(h, self.sink_dims, self.var.tau)
            if h.shape[1] > 1:  # a pass over the whole sequence so far starts afresh
                self.sinks[layer] = []
            self.sinks.setdefault(layer, []).append(flags)

        return pre

    def layer_sinks(self, layer: int, kpos: torch.Tensor) -> torch.Tensor:
        """Sink flags [B, kv] of a layer's keys (original positions ``kpos``): the flags of every
        token seen so far (``paper``), or those of the prompt pass, generated tokens never being
        sinks (``official``)."""
        if self.var.protocol == "official":
            return self._lookup(self.sinks[layer][0], kpos, False)
        return torch.cat(self.sinks[layer], dim=1)

    def _prune_hook(self, layer: int):
        def pre(module, args, kwargs):
            h = hidden_states_arg(args, kwargs)
            if h.shape[1] == 1 and self.kept is not None:
                return None  # a cached decode step: nothing to prune
            if layer == self.fastv.k:
                if self.kept is None or self.fastv.protocol == "official":  # official: every full pass
                    self.kept = self._choose_kept()
                self._total = total = h.shape[1]
                tail = torch.arange(self.length, total, device=h.device).expand(h.shape[0], -1)
                self._gather = torch.cat([self.kept.to(h.device), tail], dim=1)
                h = h.gather(1, self._gather[..., None].expand(-1, -1, h.shape[-1]))
            idx = self._gather
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(
                    t.gather(-2, idx.expand(t.shape[0], -1)[..., None].expand(-1, -1, t.shape[-1])) for t in pe)
            pos = kwargs.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.shape[-1] == self._total:
                kwargs["position_ids"] = pos.gather(-1, idx.expand(*pos.shape[:-1], -1))
            kwargs["attention_mask"] = None  # the session builds this layer's mask from positions
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return pre

    def _choose_kept(self) -> torch.Tensor:
        """Prompt positions kept from block k on: every non-image token and the top (1 − R)
        image tokens of each row by the last token's head-mean attention in block k − 1
        (``paper``: n − round(nR) tokens, ties to the earlier position; ``official``:
        round(n(1 − R)) tokens by ``torch.topk``)."""
        scores = self._fastv_scores
        if scores is None:
            raise VsinkError("FastV: no attention was captured in the block before k")
        rows = []
        for b in range(self.spans.batch_size):
            img = self.spans.positions(b)
            if self.fastv.protocol == "official":
                order = torch.topk(scores[b, img], round(len(img) * (1 - self.fastv.ratio))).indices
            else:
                keep_n = len(img) - int(round(self.fastv.ratio * len(img)))
                order = torch.sort(scores[b, img], descending=True, stable=True).indices[:keep_n]
            chosen = {img[i] for i in order.tolist()}
            rows.append([p for p in range(self.length) if not self.image0[b, p] or p in chosen])
        return torch.tensor(rows, device=scores.device)

    # --- attention ----------------------------------------------------------------------
    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        layer = int(module.layer_idx)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        B, H, q, _ = query.shape
        kv = key.shape[2]
        kpos = self.key_positions(layer, kv, query.device)
        qpos = kpos[:, -q:]
        allowed = kpos[:, None, :] <= qpos[:, :, None]
        if not self._no_padding:
            allowed = allowed & self._lookup(self.valid0, kpos, True)[:, None, :]
        image = self._lookup(self.image0, kpos, False) if self._needs_image else None  # [B, kv]
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        if (self.pai is not None and self.amplify
                and self.pai.start_layer <= layer < (self.pai.end_layer or self.lvlm.num_layers)):
            last = logits[:, :, -1, :]
            logits[:, :, -1, :] = torch.where(image[:, None, :], last + self.pai.alpha * last.abs(), last)
        min_value = torch.finfo(logits.dtype).min
        logits = logits.masked_fill(~allowed[:, None], min_value)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.var is not None and layer >= self.var.start_layer:
            rows = qpos >= self.image_end[:, None]  # queries after the image
            eligible = rows.any(0).nonzero()
            if len(eligible):  # only that tail of the query block can change
                first = int(eligible[0])
                sinks = self.layer_sinks(layer, kpos)
                probs[:, :, first:] = redistribute(probs[:, :, first:], image, sinks, rows[:, first:], self.var)
        if self.fastv is not None and layer == self.fastv.k - 1 and q > 1:
            self._fastv_scores = probs[:, :, -1, :].mean(1)
        if self.capture is not None:
            self._record(layer, probs[:, :, -1, :].mean(1), kpos)
        probs = probs.to(query.dtype)
        out = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return out, probs

    def _record(self, layer: int, row: torch.Tensor, kpos: torch.Tensor) -> None:
        n_img = max(self.spans.counts())
        if layer == 0:
            self._step_capture = torch.full((row.shape[0], self.lvlm.num_layers, n_img), float("nan"))
        for b in range(row.shape[0]):
            positions = torch.tensor(self.spans.positions(b), device=kpos.device)
            hit = (kpos[b][:, None] == positions[None, :])  # [kv, n_img]
            present = hit.any(0)
            values = (row[b][:, None] * hit).sum(0)
            self._step_capture[b, layer, : len(positions)][present.cpu()] = values[present].float().cpu()
        if layer == self.lvlm.num_layers - 1:
            self.capture.steps.append(self._step_capture)


def redistribute(probs: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor, rows: torch.Tensor,
                 s: VARSettings) -> torch.Tensor:
    """VAR on probabilities [B, H, q, kv]: in image-centric rows (``rows`` [B, q] allowed, visual-sink
    share of image attention <= rho, image attention >= min_image) the sinks (``sinks`` [B, kv],
    visual and text) keep ``p`` of their attention and the rest goes to the non-sink image tokens
    in proportion to their attention. Other rows are returned bit-identical (multiplied by 1).

    ``s.protocol == "official"``: a batch row whose keys hold no visual sink is not edited, and
    the share's denominator is the image attention plus :data:`SHARE_EPS` per image key."""
    target = image & ~sinks
    visual_sinks = image & sinks
    classes = torch.stack([image, visual_sinks, sinks, target], dim=-1).to(probs.dtype)  # [B, kv, 4]
    a_img, a_vsink, sink_mass, a_target = (probs @ classes[:, None]).unbind(-1)  # one pass: [B, H, q] each
    denominator = a_img
    if s.protocol == "official":
        rows = rows & visual_sinks.any(-1, keepdim=True)
        denominator = a_img + SHARE_EPS * image.sum(-1).to(probs.dtype)[:, None, None]
    select = (rows[:, None, :] & (a_vsink <= s.rho * denominator) & (a_img >= s.min_image) & (a_target > 0)
              & (sink_mass > 0))
    sink_factor = torch.where(select, torch.full_like(a_img, s.p), torch.ones_like(a_img))
    gain = (1 - s.p) * sink_mass / a_target.clamp_min(1e-30)
    target_factor = torch.where(select, 1 + gain, torch.ones_like(a_img))
    snk = sinks[:, None, None, :].to(probs.dtype)
    tgt = target[:, None, None, :].to(probs.dtype)
    weight = 1 + snk * (sink_factor - 1)[..., None] + tgt * (target_factor - 1)[..., None]
    return probs * weight
