"""Greedy generation with a mitigation (none, VAR, PAI, FastV), batched, with the KV cache or
without, and optional per-token attention capture over the image grid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..backbones.hf_lvlm import LVLM
from ..errors import VsinkError
from .session import Session
from .settings import MITIGATIONS, FastVSettings, PAISettings, VARSettings, check_protocol

Settings = Union[VARSettings, PAISettings, FastVSettings]


def make_settings(mitigation: str, values: Optional[dict[str, Any]] = None,
                  protocol: str = "paper") -> Optional[Settings]:
    """The settings object of a mitigation with ``values`` (from ``--set key=value``) applied.

    ``protocol`` is ``"paper"`` (the papers' method, vsink's defaults) or ``"official"`` (the
    authors' released scripts: their behaviour, and their defaults — the class's
    ``OFFICIAL_DEFAULTS`` — for every setting not in ``values``). ``None`` for ``"none"``."""
    check_protocol(protocol)
    if mitigation not in MITIGATIONS:
        raise VsinkError(f"unknown mitigation {mitigation!r}; choose one of {', '.join(MITIGATIONS)}")
    cls = MITIGATIONS[mitigation]
    values = dict(values or {})
    if cls is None:
        if values:
            raise VsinkError(f"mitigation 'none' takes no settings, got {sorted(values)}")
        return None
    if "protocol" in values:
        raise VsinkError(f"{mitigation}: the protocol is not a setting; pass protocol= (CLI: --protocol)")
    names = {f.name for f in dataclasses.fields(cls)} - {"protocol"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise VsinkError(f"{mitigation}: unknown setting(s) {unknown}; settings are {sorted(names)}")
    defaults = cls.OFFICIAL_DEFAULTS if protocol == "official" else {}
    return cls(**{**defaults, **values, "protocol": protocol})


class GuidanceProcessor:
    """PAI's classifier-free guidance as a ``LogitsProcessor``: with the image branch's log-probs
    ``l_i`` and the text-only branch's ``l_t`` (the prompt without its image tokens, its own KV
    cache, no amplification), ``out = γ(l_i − l_t) + l_t`` on tokens with ``p_i ≥ β·max p_i``,
    −inf elsewhere. Under the ``official`` protocol it switches the session's α on once the
    text-only branch has run, and with γ = 1 returns ``l_i`` without running that branch (so α
    stays off), as the released scripts do."""

    def __init__(self, lvlm: LVLM, session: Session, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 gamma: float, plausibility: float, protocol: str = "paper"):
        self.lvlm, self.session, self.gamma, self.beta = lvlm, session, gamma, plausibility
        self.official = check_protocol(protocol) == "official"
        keep = (input_ids != lvlm.image_token_id) & attention_mask.bool()
        rows = [ids[k] for ids, k in zip(input_ids, keep)]
        width = max(len(r) for r in rows)
        pad = int(getattr(lvlm.text_config, "pad_token_id", None) or 0)
        self.ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        self.mask = torch.zeros_like(self.ids)
        for b, r in enumerate(rows):  # left padding
            self.ids[b, width - len(r):] = r
            self.mask[b, width - len(r):] = 1
        self.cache = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        image = torch.log_softmax(scores.float(), dim=-1)
        if self.official and self.gamma == 1:
            return image.to(scores.dtype)
        if self.cache is None:  # first step: the text-only prompt
            self.cache = DynamicCache()
            ids = self.ids
        else:  # then the token chosen at the previous step
            ids = input_ids[:, -1:]
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        mask = self.mask
        pos = self.lvlm.text_position_ids(mask, ids.shape[1])
        with self.session.suspend():
            out = self.lvlm.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=self.cache,
                                  use_cache=True)
        if self.official:
            self.session.amplify = True
        text = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        guided = self.gamma * (image - text) + text
        cut = image < (torch.log(torch.tensor(self.beta)) + image.amax(-1, keepdim=True))
        return guided.masked_fill(cut, float("-inf")).to(scores.dtype)


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, prompt + new]
    new_tokens: torch.Tensor  # [B, new]
    texts: list[str]
    mitigation: str
    settings: Optional[dict[str, Any]]  # every setting used, the protocol included (None for none)
    attention: Optional[torch.Tensor] = None  # [steps, B, layers, n_image] (NaN: pruned)
    image_spans: Any = None
    kept: Optional[torch.Tensor] = None  # FastV: prompt positions kept from block k on [B, n] (the last pass's)
    protocol: str = "paper"


def generate(lvlm: LVLM, inputs: dict[str, Any], *, mitigation: str = "none",
             settings: Optional[dict[str, Any]] = None, protocol: str = "paper", max_new_tokens: int = 32,
             use_cache: bool = True, capture_attention: bool = False) -> GenerationResult:
    """Greedy decoding of a batch (``inputs`` from :meth:`LVLM.prepare`, left-padded) with a
    mitigation; ``capture_attention`` records, for every generated token, the attention of its
    query on the image tokens per layer (head mean).

    ``protocol``: ``"paper"`` (default) runs the mitigation as its paper describes it;
    ``"official"`` as the authors' released scripts do, with their defaults for the settings not
    given (see :func:`make_settings` and the settings classes). Recorded in the result."""
    if max_new_tokens < 1:
        raise VsinkError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = make_settings(mitigation, settings, protocol)
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if not all(lvlm.image_spans(input_ids).counts()):
        raise VsinkError("every prompt needs an image (no image tokens found in a row)")
    session = Session(lvlm, input_ids, mask, var=cfg if mitigation == "var" else None,
                      pai=cfg if mitigation == "pai" else None, fastv=cfg if mitigation == "fastv" else None,
                      capture=capture_attention)
    processors = []
    if mitigation == "pai" and cfg.gamma is not None:
        processors.append(GuidanceProcessor(lvlm, session, input_ids, mask, cfg.gamma, cfg.plausibility, protocol))
    with session.bound(), torch.no_grad():
        out = lvlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  use_cache=use_cache, logits_processor=processors or None)
    new = out[:, input_ids.shape[1]:]
    tok = getattr(lvlm.processor, "tokenizer", None) if lvlm.processor is not None else None
    texts = tok.batch_decode(new, skip_special_tokens=True) if tok is not None else [""] * len(new)
    attention = torch.stack(session.capture.steps[-new.shape[1]:]) if capture_attention else None
    return GenerationResult(out, new, texts, mitigation, dataclasses.asdict(cfg) if cfg else None, attention,
                            session.spans, session.kept, protocol)

