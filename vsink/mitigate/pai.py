"""PAI — paying more attention to images (Liu et al., ECCV 2024), as edits on the decoder's sites.

In layers ``[start_layer, end_layer)`` the pre-softmax logits (``attn_logits``) of the last query
row on image keys become ``z + α|z|``. With ``gamma`` set, classifier-free guidance runs as a
``LogitsProcessor``: the text-only branch (the prompt without its image tokens, its own KV cache,
every edit suspended) gives ``l_t``, the image branch ``l_i``, and the next token is chosen from
``γ(l_i − l_t) + l_t`` over tokens with ``p_i >= plausibility · max p_i``.

``protocol="official"`` follows the released scripts (LALBJ/PAI): with guidance on, the prompt
pass runs without α (the first token gets guidance only) and α is switched on once the text-only
branch has run; with ``gamma == 1`` the guidance returns before that, so α never applies.
Official defaults: γ = 1.1 and layers [2, 32) (the README's commands).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ..options import Float, Int, OptionError
from .base import Mitigation, Run, below_depth, register
from .settings import CheckedSettings, check_protocol, setting


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
        #: branch has run once)
        self.amplify = not (s.protocol == "official" and s.gamma is not None)
        for layer in range(s.start_layer, end):  # only the last query row is edited
            handles.append(run.decoder.hook("attn_logits", layer, self._amplify(run, layer),
                                            rows=lambda queries, keys: queries - 1))

    def _amplify(self, run: Run, layer: int):
        alpha = self.settings.alpha

        def fn(logits: torch.Tensor, q_start: int) -> Optional[torch.Tensor]:
            queries, kv = run.context.shapes[layer]
            if not self.amplify or q_start + logits.shape[2] != queries:  # only the block with the last row
                return None
            image = run.context.image_keys(layer, kv, logits.device)
            last = logits[:, :, -1, :]
            logits[:, :, -1, :] = torch.where(image[:, None, :], last + alpha * last.abs(), last)
            self.count(layer, rows_amplified=logits.shape[0] * logits.shape[1])
            return logits

        return fn

    def logits_processors(self, run: Run) -> list:
        s: PAISettings = self.settings
        if s.gamma is None:
            return []
        return [GuidanceProcessor(run, self, s.gamma, s.plausibility, s.protocol)]

    def decodes(self) -> bool:
        return self.settings.gamma is not None

    def nothing_edited_hint(self) -> str:
        s = self.settings
        if s.protocol == "official" and s.gamma is not None and not getattr(self, "amplify", True):
            return ("under the official protocol with guidance, alpha applies only once the text-only branch has "
                    "run, and with gamma = 1 it never runs")
        return f"the layer range [{s.start_layer}, {s.end_layer}) holds no decoder layer"


class GuidanceProcessor:
    """PAI's classifier-free guidance as a ``LogitsProcessor`` (see the module docstring)."""

    def __init__(self, run: Run, pai: PAI, gamma: float, plausibility: float, protocol: str = "paper"):
        self.run, self.pai, self.gamma, self.beta = run, pai, gamma, plausibility
        self.official = check_protocol(protocol) == "official"
        lvlm = run.lvlm
        keep = (run.input_ids != lvlm.image_token_id) & run.attention_mask.bool()
        rows = [ids[k] for ids, k in zip(run.input_ids, keep)]
        width = max(len(r) for r in rows)
        pad = int(getattr(lvlm.text_config, "pad_token_id", None) or 0)
        self.ids = torch.full((len(rows), width), pad, dtype=run.input_ids.dtype, device=run.input_ids.device)
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
        lvlm = self.run.lvlm
        pos = lvlm.text_position_ids(self.mask, ids.shape[1])
        with self.run.decoder.suspend():
            out = lvlm.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                             **{lvlm.cache_argument: self.cache})
        if self.official:
            self.pai.amplify = True
        text = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        guided = self.gamma * (image - text) + text
        cut = image < (torch.log(torch.tensor(self.beta)) + image.amax(-1, keepdim=True))
        return guided.masked_fill(cut, float("-inf")).to(scores.dtype)
