"""PAI — paying more attention to images (Liu et al., ECCV 2024), as edits on the decoder's sites.

In layers ``[start_layer, end_layer)`` the pre-softmax logits (``attn_logits``) of the prompt's
last query row and of every generated token's row on image keys become ``z + α|z|`` (with the KV
cache: the last row of each pass; without it, a pass recomputes those rows with the same edit).
With ``gamma`` set, classifier-free guidance: a text-only branch (:mod:`vsink.mitigate.branch`: the prompt without its image tokens, its own KV cache, no
edits) gives ``l_t``, the image branch ``l_i``, and the next token is chosen from
``γ(l_i − l_t) + l_t`` over tokens with ``p_i >= plausibility · max p_i``.

``protocol="official"`` follows the released scripts (LALBJ/PAI): with guidance on, the prompt
pass runs without α (the first token gets guidance only) and α is switched on once the text-only
branch has run (from the first generated token's row on); with ``gamma == 1`` the guidance returns
before that, so α never applies.
Official defaults: γ = 1.1 and layers [2, 32) (the README's commands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from ..options import Float, Int, OptionError
from .branch import text_branch
from .base import Mitigation, Run, below_depth, fresh_rows, register, rows_from
from .settings import CheckedSettings, setting

if TYPE_CHECKING:
    from ..lvlm.context import DecodeContext


@dataclass
class PAISettings(CheckedSettings):
    """PAI's settings (see the module docstring)."""

    alpha: float = setting(0.2, Float(0), "amplification α of the last query's attention logits on image tokens")
    start_layer: int = setting(2, Int(min=0), "first decoder layer amplified (below the decoder's depth)")
    end_layer: Optional[int] = setting(None, Int(min=1), "layer where amplification stops (exclusive, above "
                                       "start_layer; null: all layers)", nullable=True)
    gamma: Optional[float] = setting(None, Float(0), "classifier-free guidance strength γ (1.1 suggested; "
                                     "null: off)", nullable=True)
    plausibility: float = setting(0.1, Float(0, 1), "guidance keeps tokens with p >= plausibility · max p")
    protocol: str = "paper"

    NAME: ClassVar[str] = "pai"
    #: the README's POPE/CHAIR commands: --alpha 0.2 --gamma 1.1 --start-layer 2 --end-layer 32
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {"gamma": 1.1, "end_layer": 32}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise OptionError(f"pai setting 'end_layer' must be above start_layer ({self.start_layer}), "
                              f"got {self.end_layer}")


@register
class PAI(Mitigation):
    """PAI as a composable mitigation (see the module docstring)."""

    name = "pai"
    settings_class = PAISettings

    def _install(self, run: Run, handles: list) -> None:
        s: PAISettings = self.settings
        n = run.decoder.num_layers
        end = n if s.end_layer is None else min(s.end_layer, n)
        below_depth(run, self.name, "start_layer", s.start_layer)
        #: whether α applies in the current pass (official + guidance: off until the text-only
        #: branch has run once, and then from the first generated token on)
        self.amplify = not (s.protocol == "official" and s.gamma is not None)
        self.delayed = not self.amplify
        for layer in range(s.start_layer, end):
            handles.append(run.decoder.hook("attn_logits", layer, self._amplify(run, layer),
                                            rows=rows_from(run, layer, self.first_position)))

    def first_position(self, ctx: "DecodeContext") -> Optional[int]:
        """The first query position amplified in ``ctx`` (the call's or a branch's): the prompt's last
        token (each generated token's row follows), ``None`` while α is off. A cached pass computes
        exactly the last of these rows; a pass without the cache recomputes all of them, edited alike."""
        if not self.amplify:
            return None
        return ctx.length - 1 + (1 if self.delayed else 0)  # official: switched on after the prompt pass

    def _amplify(self, run: Run, layer: int):
        alpha = self.settings.alpha

        def fn(logits: torch.Tensor, q_start: int) -> Optional[torch.Tensor]:
            ctx = run.context
            first = self.first_position(ctx)
            if first is None:
                return None
            q, kv = logits.shape[2], logits.shape[3]
            rows = ctx.query_positions(layer, logits.device)[:, q_start:q_start + q] >= first
            rows = rows.expand(logits.shape[0], -1)  # [B, q] (a beam context's one row: every beam's)
            if not rows.any():
                return None
            image = ctx.image_keys(layer, kv, logits.device)
            edit = rows[:, None, :, None] & image[:, None, None, :]
            self.count(layer, rows_amplified=int((rows & fresh_rows(run, layer, q_start, q, logits.device)).sum())
                       * logits.shape[1])
            return torch.where(edit, logits + alpha * logits.abs(), logits)

        return fn

    def branches(self, run: Run) -> list:
        s: PAISettings = self.settings
        if s.gamma is None or (s.protocol == "official" and s.gamma == 1):
            return []  # official with gamma = 1: the released guidance returns before its text-only pass
        return [text_branch("text")]

    def combine(self, step: int, logits: torch.Tensor, branches: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classifier-free guidance against the text-only branch (see the module docstring)."""
        s: PAISettings = self.settings
        if s.protocol == "official":
            self.amplify = True  # the released scripts switch α on once the text-only branch has run
        image = torch.log_softmax(logits.float(), dim=-1)
        text = torch.log_softmax(branches["text"].float(), dim=-1)
        guided = s.gamma * (image - text) + text
        cut = image < math.log(s.plausibility) + image.amax(-1, keepdim=True)
        out = guided.masked_fill(cut, float("-inf"))
        self.count_step(step, tokens_changed=int((out.argmax(-1) != logits.argmax(-1)).sum()))
        return out

    def decodes(self) -> bool:
        return self.settings.gamma is not None

    def nothing_edited_hint(self) -> str:
        s = self.settings
        if s.protocol == "official" and s.gamma is not None and not getattr(self, "amplify", True):
            return ("under the official protocol with guidance, alpha applies only once the text-only branch has "
                    "run, and with gamma = 1 it never runs")
        return f"the layer range [{s.start_layer}, {s.end_layer}) holds no decoder layer"

