"""What the contrastive decoders share (VCD, DAMRO, M3ID): the adaptive plausibility cutoff and
the contrast of the image branch's logits against a weakened branch's, and the per-branch edit
choice they expose as a setting."""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch

from .base import Mitigation

#: ``branch_edits``: ``all`` runs every composed mitigation's edits in the contrastive branch too
#: (the released code runs one patched model for both), ``none`` runs it as the plain model
BRANCH_EDITS = ("all", "none")


def plausible(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Tokens [B, V] that pass the adaptive plausibility cutoff: ``l >= log β + max l`` (the same
    on logits as on log-probabilities; β = 0 keeps every token)."""
    if beta <= 0:
        return torch.ones_like(logits, dtype=torch.bool)
    return logits >= math.log(beta) + logits.amax(-1, keepdim=True)


def contrast(logits: torch.Tensor, weak: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``(1 + α)·l − α·l_weak`` on the plausible tokens of ``l``, −∞ elsewhere (VCD's
    ``vcd_sample.py``; DAMRO's ``sample.py`` is the same rule)."""
    out = (1 + alpha) * logits - alpha * weak
    return out.masked_fill(~plausible(logits, beta), float("-inf"))


def branch_edits(choice: str) -> Optional[tuple[str, ...]]:
    """A ``branch_edits`` setting as :attr:`~vsink.mitigate.branch.Branch.edits` (``None``: every
    composed edit that can run in a branch)."""
    return None if choice == "all" else ()


def changed(before: torch.Tensor, after: torch.Tensor) -> int:
    """Rows [B, V] whose greedy choice the rule changed."""
    return int((before.argmax(-1) != after.argmax(-1)).sum())


class ContrastiveDecoder(Mitigation):
    """A mitigation that decodes with :func:`contrast` of the main logits against its branch
    :attr:`weak`'s, with the ``alpha`` and ``beta`` of its settings (VCD, DAMRO)."""

    #: the name of the weakened branch that :meth:`branches` returns
    weak: ClassVar[str]

    def decodes(self) -> bool:
        return True

    def combine(self, step: int, logits: torch.Tensor, branches: dict[str, torch.Tensor]) -> torch.Tensor:
        alpha, beta = self.settings.alpha, self.settings.beta
        if alpha == 0 and beta == 0:
            return logits
        out = contrast(logits, branches[self.weak], alpha, beta)
        self.count_step(step, tokens_changed=changed(logits, out), rows_contrasted=logits.shape[0] if alpha else 0)
        return out

    def nothing_edited_hint(self) -> str:
        return "alpha = 0 contrasts nothing"
