"""DoLa — decoding by contrasting layers (Chuang et al., ICLR 2024), for LVLMs, on readout branches.

Each candidate ("premature") layer ``j`` is read out from the main pass: the residual stream
entering block ``j`` (transformers' ``hidden_states[j]``) through the LM head, without the final
norm, as transformers' own DoLa did. At each step the premature layer is the candidate whose
distribution is furthest from the final layer's by the Jensen–Shannon-type divergence of
transformers 4.46.3 (``_dola_select_contrast``: ``F.kl_div`` of each against their mean, averaged
over the vocabulary); the step's scores are ``log p_final − log p_premature`` on the tokens with
``p_final >= relative_top · max p_final`` (the premature side set to −1e-3 there, −∞ elsewhere on
the final side: ``_relative_top_filter``). ``paper`` picks the premature layer per batch row;
``official`` takes transformers' batch mean (one layer for the whole batch). Candidates: ``even``
(layers 0, 2, …, below the final: HALC's LVLM script), ``low`` / ``high`` (transformers' buckets),
or ``candidate_layers``. Recent transformers (4.57, 5.x) fetch DoLa from the Hub; vsink's works
offline on every transformers it supports and composes with the attention edits (their edits
shape every layer's readout, as they shape the final one). One pass per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import VsinkError
from ..options import Bool, Choice, Float, Int, ListOf
from .base import Mitigation, Run, register
from .branch import readout_branch
from .contrastive import changed
from .settings import CheckedSettings, setting

BUCKETS = ("even", "low", "high")


@dataclass
class DoLaSettings(CheckedSettings):
    """DoLa's settings (see the module docstring)."""

    candidates: str = setting("even", Choice(BUCKETS), "premature candidates: even (0, 2, ... below the final "
                              "layer, HALC), low / high (transformers' buckets)")
    candidate_layers: Optional[list[int]] = setting(None, ListOf(Int(min=0), nonempty=True), "explicit candidate "
                                                    "layers (hidden_states index, below the depth; null: candidates)",
                                                    nullable=True)
    relative_top: float = setting(0.1, Float(0, 1, min_open=True), "keep tokens with p >= relative_top · max p "
                                  "of the final layer")
    premature_norm: bool = setting(False, Bool(), "apply the final norm to the premature layers (transformers: no)")
    protocol: str = "paper"

    NAME: ClassVar[str] = "dola"
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}


def candidate_layers(n: int, bucket: str, tied: bool, layers: Optional[Sequence[int]] = None) -> list[int]:
    """The premature candidates of a decoder of ``n`` layers (transformers 4.46.3's rule for ``low`` /
    ``high``: with tied embeddings the buckets start at 2, or 1 for a 2-layer model)."""
    if layers is not None:
        bad = [j for j in layers if j >= n]
        if bad:
            raise VsinkError(f"dola setting 'candidate_layers': {bad} not below the {n} decoder layers")
        return list(layers)
    if bucket == "even":
        return list(range(0, n, 2))
    start = 0 if not tied else (2 if n > 2 else 1 if n == 2 else 0)
    if bucket == "low":
        if start == n // 2:
            return [start]
        return list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
    return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))


def relative_top_filter(final: torch.Tensor, base: torch.Tensor, relative_top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of both; tokens below ``log relative_top + max`` of the final one: final −∞,
    base −1e-3 (``_relative_top_filter`` with one token kept at least)."""
    final, base = final.log_softmax(-1), base.log_softmax(-1)
    top = final.amax(-1, keepdim=True)
    thresh = torch.minimum(top, top + math.log(relative_top))
    low = final < thresh
    return final.masked_fill(low, float("-inf")), base.masked_fill(low, -1e-3)


def divergences(final: torch.Tensor, premature: torch.Tensor) -> torch.Tensor:
    """[layers, B]: ``0.5·(KL(m ‖ final) + KL(m ‖ premature))`` per token averaged over the vocabulary,
    ``m`` their mean distribution (``F.kl_div`` as transformers 4.46.3 calls it)."""
    mean = 0.5 * (F.softmax(final, -1)[None] + F.softmax(premature, -1))
    kl1 = F.kl_div(F.log_softmax(final, -1)[None], mean, reduction="none").mean(-1)
    kl2 = F.kl_div(F.log_softmax(premature, -1), mean, reduction="none").mean(-1)
    return 0.5 * (kl1 + kl2)


def dola_scores(final: torch.Tensor, premature: torch.Tensor, relative_top: float,
                batch_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B, V], the chosen candidate per row [B]) from the final logits [B, V] and the
    candidates' [layers, B, V]."""
    if premature.shape[0] == 1:
        chosen = torch.zeros(final.shape[0], dtype=torch.long, device=final.device)
    else:
        js = divergences(final, premature)
        chosen = js.mean(-1).argmax().expand(final.shape[0]) if batch_mean else js.argmax(0)
    base = premature[chosen, torch.arange(final.shape[0], device=final.device)]
    final_n, base_n = relative_top_filter(final, base, relative_top)
    return final_n - base_n, chosen


@register
class DoLa(Mitigation):
    """DoLa as a mitigation on readout branches (see the module docstring)."""

    name = "dola"
    settings_class = DoLaSettings

    def _install(self, run: Run, handles: list) -> None:
        pass

    def branches(self, run: Run) -> list:
        s: DoLaSettings = self.settings
        n = run.decoder.num_layers
        tied = bool(getattr(run.lvlm.model.config, "tie_word_embeddings", False))
        self.layers = candidate_layers(n, s.candidates, tied, s.candidate_layers)
        return [readout_branch("final", n),
                *(readout_branch(f"layer{j}", j, norm=s.premature_norm) for j in self.layers)]

    def decodes(self) -> bool:
        return True

    def combine(self, step: int, logits: torch.Tensor, branches: dict[str, torch.Tensor]) -> torch.Tensor:
        s: DoLaSettings = self.settings
        premature = torch.stack([branches[f"layer{j}"] for j in self.layers])
        out, chosen = dola_scores(branches["final"], premature, s.relative_top, s.protocol == "official")
        out = out.masked_fill(torch.isinf(logits) & (logits < 0), float("-inf"))  # the model's own suppressions
        for j in chosen.tolist():
            self.count_step(step, **{f"premature_layer_{self.layers[j]}": 1})
        self.count_step(step, tokens_changed=changed(logits, out))
        return out

    def nothing_edited_hint(self) -> str:
        return "no candidate layer"
