"""A mitigation from outside vsink, in one file: tests/test_mitigate.py installs this directory as a
distribution whose ``vsink.mitigations`` entry point names this module.

``temperature``: in decoder layer ``layer`` the last query row's attention logits are divided by
``t`` (t > 1 flattens that row's attention, t < 1 sharpens it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from vsink.plugin import CheckedSettings, Float, Int, Mitigation, Run, below_depth, register, setting


@dataclass
class TemperatureSettings(CheckedSettings):
    layer: int = setting(1, Int(0), "decoder layer whose last query row is tempered")
    t: float = setting(2.0, Float(0, min_open=True), "temperature dividing the logits")

    NAME: ClassVar[str] = "temperature"


@register
class Temperature(Mitigation):
    name = "temperature"
    settings_class = TemperatureSettings

    def _install(self, run: Run, handles: list) -> None:
        s: TemperatureSettings = self.settings
        below_depth(run, self.name, "layer", s.layer)

        def temper(logits: torch.Tensor, q_start: int) -> Optional[torch.Tensor]:
            queries, _ = run.context.shapes[s.layer]
            if q_start + logits.shape[2] != queries:  # only the block holding the last row
                return None
            logits[:, :, -1, :] /= s.t
            self.count(s.layer, rows_tempered=logits.shape[0] * logits.shape[1])
            return logits

        handles.append(run.decoder.hook("attn_logits", s.layer, temper, rows=lambda queries, keys: queries - 1))
