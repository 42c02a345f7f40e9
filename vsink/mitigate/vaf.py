"""VAF — visual amplification fusion, ClearSight (Yin et al., CVPR 2025), as an edit of the
decoder's pre-softmax attention logits.

In the middle layers (LLaVA-1.5-7B: layers 9–14 of 32) the scaled scores ``q·k/√d`` of the
query rows after the image are multiplied column-wise: image keys × ``enhance`` (1.15), the
system-prompt keys — every real token before the image, BOS included — × ``suppress`` (0.95).
In the prompt pass only the rows after the image are edited; every generated token's row is.
The spans come from the prompt's layout (the released ``AttnAdapter.py`` hard-codes 35 system
and 576 image tokens). On a model of another depth the default layer window is the 7B window
scaled to that depth: ``[round(9·n/32), round(15·n/32))``, at least one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ..options import Float, Int, OptionError
from .base import Mitigation, Run, below_depth, fresh_rows, register, rows_after_image
from .settings import CheckedSettings, setting

#: the released window on LLaVA-1.5-7B: layers 9..14 of 32
REFERENCE_WINDOW = (9, 15, 32)


@dataclass
class VAFSettings(CheckedSettings):
    """VAF's settings (see the module docstring); the defaults are the README's / infer_pope.sh's."""

    enhance: float = setting(1.15, Float(0, min_open=True), "factor on the image keys' pre-softmax scores")
    suppress: float = setting(0.95, Float(0, min_open=True), "factor on the system-prompt keys' pre-softmax scores")
    start_layer: Optional[int] = setting(None, Int(min=0), "first decoder layer edited (null: 9 of 32 scaled to "
                                         "the model's depth)", nullable=True)
    end_layer: Optional[int] = setting(None, Int(min=1), "layer where the edit stops, exclusive (null: 15 of 32 "
                                       "scaled to the model's depth)", nullable=True)
    protocol: str = "paper"

    NAME: ClassVar[str] = "vaf"
    #: infer_pope.sh passes the README's values, the defaults above (argparse's own default is 1 / 1)
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_layer is not None and self.end_layer is not None and self.end_layer <= self.start_layer:
            raise OptionError(f"vaf setting 'end_layer' must be above start_layer ({self.start_layer}), "
                              f"got {self.end_layer}")


def layer_window(n: int, start: Optional[int] = None, end: Optional[int] = None) -> tuple[int, int]:
    """The layers ``[start, end)`` VAF edits on a decoder of ``n`` layers (see the module docstring)."""
    first, stop, depth = REFERENCE_WINDOW
    lo = round(first * n / depth) if start is None else start
    hi = max(lo + 1, round(stop * n / depth)) if end is None else end
    return lo, min(hi, n)


def column_factors(image: torch.Tensor, system: torch.Tensor, enhance: float, suppress: float) -> torch.Tensor:
    """Per key [B, kv]: ``enhance`` on image keys, ``suppress`` on system keys, 1 elsewhere."""
    ones = torch.ones(image.shape, dtype=torch.float32, device=image.device)
    return ones.masked_fill(image, enhance).masked_fill(system, suppress)


@register
class VAF(Mitigation):
    """VAF as a composable mitigation (see the module docstring)."""

    name = "vaf"
    settings_class = VAFSettings

    def _install(self, run: Run, handles: list) -> None:
        s: VAFSettings = self.settings
        if s.start_layer is not None:
            below_depth(run, self.name, "start_layer", s.start_layer)
        self.window = layer_window(run.decoder.num_layers, s.start_layer, s.end_layer)
        for layer in range(*self.window):
            handles.append(run.decoder.hook("attn_logits", layer, self._scale(run, layer), rows=rows_after_image(run, layer)))

    def _scale(self, run: Run, layer: int):
        s: VAFSettings = self.settings

        def fn(logits: torch.Tensor, q_start: int) -> Optional[torch.Tensor]:
            ctx = run.context
            q, kv = logits.shape[2], logits.shape[3]
            qpos = ctx.query_positions(layer, logits.device)[:, q_start:q_start + q]
            rows = qpos >= ctx.image_end[:, None].to(logits.device)  # [B, q]: queries after the image
            if not rows.any():
                return None
            kpos = ctx.key_positions(layer, kv, logits.device)
            image = ctx.lookup(ctx.image0, kpos, False)
            start = torch.tensor([ctx.spans.positions(b)[0] if ctx.spans.counts()[b] else 0
                                  for b in range(ctx.batch_size)], device=logits.device)
            system = ctx.lookup(ctx.valid0, kpos, False) & (kpos < start[:, None]) & ~image
            factor = column_factors(image, system, s.enhance, s.suppress).to(logits.dtype)  # [B, kv]
            scale = torch.where(rows[:, None, :, None], factor[:, None, None, :], torch.ones_like(factor)[:, None, None, :])
            fresh = fresh_rows(run, layer, q_start, q, logits.device)  # counted once without the cache
            self.count(layer, rows_scaled=int((rows & fresh).sum()) * logits.shape[1])
            return logits * scale

        return fn

    def nothing_edited_hint(self) -> str:
        return f"no query after the image reached the layers {list(range(*getattr(self, 'window', (0, 0))))}"
