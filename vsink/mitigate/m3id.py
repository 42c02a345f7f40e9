"""M3ID — multi-modal mutual-information decoding (Favero et al., CVPR 2024) on vsink's branches.

There is no released code: this is the paper's formula. A text-only branch (the prompt without
its image tokens, the plain model) gives the unconditioned log-probabilities ``l_u``; with the
image branch's ``l_c``, the ``t``-th generated token (t = 1, 2, …) is decoded from

    l_c + ((1 − γ_t) / γ_t)·(l_c − l_u),   γ_t = exp(−λ·t),

when the conditioned distribution is unsure (max p_c < ``threshold``), from ``l_c`` otherwise:
the correction grows as generation goes on, as the image's influence fades. λ and the threshold
are not given as defaults by a released script; vsink's (λ = 0.02, threshold 0.95) are its own
choice, unverified against the paper's runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .branch import text_branch
from ..options import Float
from .base import Mitigation, Run, register
from .contrastive import changed
from .settings import CheckedSettings, setting


@dataclass
class M3IDSettings(CheckedSettings):
    """M3ID's settings (see the module docstring)."""

    lam: float = setting(0.02, Float(0), "λ of γ_t = exp(−λ·t) (0: plain decoding)")
    threshold: float = setting(0.95, Float(0, 1), "the rule applies while the image branch's max probability "
                               "is below this")
    protocol: str = "paper"

    NAME: ClassVar[str] = "m3id"
    #: no released scripts
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}


def m3id_scores(conditioned: torch.Tensor, unconditioned: torch.Tensor, t: int, lam: float,
                threshold: float) -> torch.Tensor:
    """The paper's rule on logits [B, V] (see the module docstring); returns log-probabilities."""
    lc = torch.log_softmax(conditioned.float(), dim=-1)
    lu = torch.log_softmax(unconditioned.float(), dim=-1)
    gamma = math.exp(-lam * t)
    weight = (1 - gamma) / gamma
    unsure = lc.amax(-1, keepdim=True).exp() < threshold
    if weight == 0:
        return lc
    return torch.where(unsure, lc + weight * (lc - lu), lc)


@register
class M3ID(Mitigation):
    """M3ID as a mitigation with a text-only branch (see the module docstring)."""

    name = "m3id"
    settings_class = M3IDSettings

    def _install(self, run: Run, handles: list) -> None:
        pass

    def branches(self, run: Run) -> list:
        return [text_branch("unconditioned")]

    def decodes(self) -> bool:
        return True

    def combine(self, step: int, logits: torch.Tensor, branches: dict[str, torch.Tensor]) -> torch.Tensor:
        s: M3IDSettings = self.settings
        out = m3id_scores(logits, branches["unconditioned"], step + 1, s.lam, s.threshold)
        unsure = int((torch.softmax(logits.float(), -1).amax(-1) < s.threshold).sum()) if s.lam else 0
        self.count_step(step, tokens_changed=changed(logits, out), rows_corrected=unsure)
        return out

    def nothing_edited_hint(self) -> str:
        return "lam = 0 (or a model sure of every token) corrects nothing"
