"""A mitigation from outside vsink with two branches, in one file: tests/test_branch_plugin.py
installs this directory as a distribution whose ``vsink.mitigations`` entry point names this
module.

``grounded``: besides the model's own pass, a branch with the image blanked (pixel values set to
the processor's mean, i.e. zero after normalisation) and a text-only branch; each step decodes
from ``l + w·(l − (l_blank + l_text) / 2)``: tokens the image itself supports gain, tokens the
prompt alone would give lose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vsink.plugin import CheckedSettings, Float, Mitigation, Run, image_branch, register, setting, text_branch


@dataclass
class GroundedSettings(CheckedSettings):
    w: float = setting(1.0, Float(0), "weight of the contrast against the blank and text-only branches")

    NAME: ClassVar[str] = "grounded"


@register
class Grounded(Mitigation):
    name = "grounded"
    settings_class = GroundedSettings

    def _install(self, run: Run, handles: list) -> None:
        pass  # no site function: the branches are all it needs

    def branches(self, run: Run) -> list:
        return [image_branch("blank", torch.zeros_like), text_branch("text")]

    def decodes(self) -> bool:
        return True

    def combine(self, step: int, logits: torch.Tensor, branches: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.settings.w
        if w:
            self.count_step(step, rows_contrasted=logits.shape[0])
        out = logits + w * (logits - (branches["blank"] + branches["text"]) / 2)
        return out.masked_fill(torch.isinf(logits), float("-inf"))  # tokens the model's processors suppressed
