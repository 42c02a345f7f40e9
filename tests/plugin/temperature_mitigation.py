"""A mitigation from outside vsink, in one file: tests/test_mitigate.py installs this directory as a
distribution whose ``vsink.mitigations`` entry point names this module.

``temperature``: in decoder layer ``layer`` the attention logits of every generated token's query
row (and the prompt's last, which predicts the first) are divided by ``t`` (t > 1 flattens those
rows' attention, t < 1 sharpens it). Rows are chosen by position, so a run without the KV cache,
which recomputes the earlier tokens, tempers the rows a cached run tempered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from vsink.plugin import (CheckedSettings, Float, Int, Mitigation, Run, below_depth, fresh_rows, register, rows_from,
                          setting)


@dataclass
class TemperatureSettings(CheckedSettings):
    layer: int = setting(1, Int(0), "decoder layer whose generated rows are tempered")
    t: float = setting(2.0, Float(0, min_open=True), "temperature dividing the logits")

    NAME: ClassVar[str] = "temperature"


@register
class Temperature(Mitigation):
    name = "temperature"
    settings_class = TemperatureSettings

    def _install(self, run: Run, handles: list) -> None:
        s: TemperatureSettings = self.settings
        below_depth(run, self.name, "layer", s.layer)

        def first(ctx) -> int:  # the prompt's last row: it predicts the first generated token
            return ctx.length - 1

        def temper(logits: torch.Tensor, q_start: int) -> Optional[torch.Tensor]:
            q = logits.shape[2]
            rows = run.context.query_positions(s.layer, logits.device)[:, q_start:q_start + q] >= first(run.context)
            fresh = rows & fresh_rows(run, s.layer, q_start, q, logits.device)
            self.count(s.layer, rows_tempered=int(fresh.sum()) * logits.shape[1])
            return torch.where(rows[:, None, :, None], logits / s.t, logits)

        handles.append(run.decoder.hook("attn_logits", s.layer, temper, rows=rows_from(run, s.layer, first)))
