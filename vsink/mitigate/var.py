"""VAR — visual attention redistribution (Kang et al., ICLR 2025), as edits on the decoder's sites.

Sink tokens are found on each layer's input (``block_input``): φ = |h / rms(h)| on the sink
dimensions above τ. From ``start_layer`` on, the attention probabilities (``attn_probs``) of
image-centric rows after the image are redistributed: the sinks keep ``p`` of their attention and
the rest goes to the non-sink image tokens in proportion to theirs (:func:`redistribute`).

``protocol="official"`` follows the released code (seilk/VisAttnSink): a layer whose prompt has
no visual sink is left unedited, the sinks are those of the prompt pass (generated tokens never
are), and the visual-sink share's denominator adds :data:`SHARE_EPS` per image token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ..detect.visual_sinks import sink_flags
from ..options import Float, Int, ListOf
from .base import Mitigation, Run, below_depth, fresh_rows, register, rows_after_image
from .settings import CheckedSettings, setting

#: VAR ``official``: the visual-sink share's denominator adds this to each image token's attention
SHARE_EPS = 1e-6


@dataclass
class VARSettings(CheckedSettings):
    """VAR's settings; the released configuration (A_exps/lv1.5_7b.yml) uses these defaults."""

    p: float = setting(0.6, Float(0, 1), "share of their attention the sinks keep")
    rho: float = setting(0.5, Float(0, 1), "image-centric rows: visual-sink share of image attention <= rho")
    min_image: float = setting(0.2, Float(0, 1), "image-centric rows: total image attention >= min_image")
    tau: float = setting(20.0, Float(0, min_open=True), "sink threshold on φ = |h / rms(h)|")
    start_layer: int = setting(2, Int(min=0), "first decoder layer edited (below the decoder's depth)")
    sink_dims: Optional[list[int]] = setting(None, ListOf(Int(min=0), nonempty=True),
                                             "hidden dimensions whose φ marks sinks (null: the known or "
                                             "calibrated ones)", nullable=True)
    protocol: str = "paper"

    NAME: ClassVar[str] = "var"
    #: defaults of the released scripts where they differ from the ones above (none)
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}


def redistribution(probs: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor, rows: torch.Tensor,
                   s: VARSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAR on probabilities [B, H, q, kv]; returns (edited probabilities, selected rows [B, H, q],
    attention mass moved per row [B, H, q]). See :func:`redistribute`."""
    target = image & ~sinks
    visual_sinks = image & sinks
    classes = torch.stack([image, visual_sinks, sinks, target], dim=-1).to(probs.dtype)  # [B, kv, 4]
    a_img, a_vsink, sink_mass, a_target = (probs @ classes[:, None]).unbind(-1)  # one pass: [B, H, q] each
    denominator = a_img
    if s.protocol == "official":
        rows = rows & visual_sinks.any(-1, keepdim=True)
        denominator = a_img + SHARE_EPS * image.sum(-1).to(probs.dtype)[:, None, None]
    select = (rows[:, None, :] & (a_vsink <= s.rho * denominator) & (a_img >= s.min_image) & (a_target > 0)
              & (sink_mass > 0))
    sink_factor = torch.where(select, torch.full_like(a_img, s.p), torch.ones_like(a_img))
    moved = (1 - s.p) * sink_mass
    gain = moved / a_target.clamp_min(1e-30)
    target_factor = torch.where(select, 1 + gain, torch.ones_like(a_img))
    snk = sinks[:, None, None, :].to(probs.dtype)
    tgt = target[:, None, None, :].to(probs.dtype)
    weight = 1 + snk * (sink_factor - 1)[..., None] + tgt * (target_factor - 1)[..., None]
    return probs * weight, select, torch.where(select, moved, torch.zeros_like(moved))


def redistribute(probs: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor, rows: torch.Tensor,
                 s: VARSettings) -> torch.Tensor:
    """VAR on probabilities [B, H, q, kv]: in image-centric rows (``rows`` [B, q] allowed, visual-sink
    share of image attention <= rho, image attention >= min_image) the sinks (``sinks`` [B, kv],
    visual and text) keep ``p`` of their attention and the rest goes to the non-sink image tokens
    in proportion to their attention. Other rows are returned bit-identical (multiplied by 1).

    ``s.protocol == "official"``: a batch row whose keys hold no visual sink is not edited, and
    the share's denominator is the image attention plus :data:`SHARE_EPS` per image key."""
    return redistribution(probs, image, sinks, rows, s)[0]


@register
class VAR(Mitigation):
    """VAR as a composable mitigation (see the module docstring)."""

    name = "var"
    settings_class = VARSettings

    @classmethod
    def calibration_settings(cls, calibration: Any) -> dict[str, Any]:
        """VAR's sink dimensions from a calibration."""
        return {"sink_dims": list(calibration.sink_dims)}

    def _install(self, run: Run, handles: list) -> None:
        s: VARSettings = self.settings
        decoder = run.decoder
        below_depth(run, self.name, "start_layer", s.start_layer)
        self.sink_dims = run.lvlm.sink_dimensions(s.sink_dims)
        #: per generation context (the call's, and each branch's that runs VAR): per layer, the
        #: flags of each pass's new tokens
        self.sinks_by_context: dict[int, dict[int, list[torch.Tensor]]] = {id(run.context): {}}
        #: the main pass's flags (the call's own context)
        self.sinks = self.sinks_by_context[id(run.context)]
        for layer in range(decoder.num_layers):
            handles.append(decoder.hook("block_input", layer, self._find_sinks(run, layer)))
        for layer in range(s.start_layer, decoder.num_layers):
            handles.append(decoder.hook("attn_probs", layer, self._edit(run, layer), rows=rows_after_image(run, layer)))

    def sinks_of(self, run: Run) -> dict[int, list[torch.Tensor]]:
        """The sink flags found so far in the context ``run`` is in (the call's or a branch's)."""
        return self.sinks_by_context.setdefault(id(run.context), {})

    def _find_sinks(self, run: Run, layer: int):
        official = self.settings.protocol == "official"

        def fn(h: torch.Tensor) -> None:
            sinks = self.sinks_of(run)
            if official and layer in sinks:
                return  # official: the sinks are fixed by the prompt pass
            flags = sink_flags(h, self.sink_dims, self.settings.tau)
            if h.shape[1] > 1:  # a pass over the whole sequence so far starts afresh
                sinks[layer] = []
            sinks.setdefault(layer, []).append(flags)

        return fn

    def layer_sinks(self, run: Run, layer: int, kpos: torch.Tensor) -> torch.Tensor:
        """Sink flags [B, kv] of a layer's keys (original positions ``kpos``): the flags of every
        token seen so far (``paper``), or those of the prompt pass, generated tokens never being
        sinks (``official``)."""
        if self.settings.protocol == "official":
            return run.context.lookup(self.sinks_of(run)[layer][0], kpos, False)
        return torch.cat(self.sinks_of(run)[layer], dim=1)

    def _edit(self, run: Run, layer: int):
        def fn(probs: torch.Tensor, q_start: int, logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            ctx = run.context
            q, kv = probs.shape[2], probs.shape[3]
            qpos = ctx.query_positions(layer, probs.device)[:, q_start:q_start + q]
            rows = qpos >= ctx.image_end[:, None].to(probs.device)  # queries after the image
            if not rows.any():
                return None
            kpos = ctx.key_positions(layer, kv, probs.device)
            image = ctx.lookup(ctx.image0, kpos, False)
            sinks = self.layer_sinks(run, layer, kpos)
            edited, select, moved = redistribution(probs, image, sinks, rows, self.settings)
            fresh = fresh_rows(run, layer, q_start, q, probs.device)[:, None, :]  # counted once without the cache
            self.count(layer, rows_edited=int((select & fresh).sum()), mass_moved=float((moved * fresh).sum()))
            return edited

        return fn

    def nothing_edited_hint(self) -> str:
        s = self.settings
        return (f"no image-centric row after the image had sinks to redistribute (tau={s.tau:g}, rho={s.rho:g}, "
                f"min_image={s.min_image:g}, sink dims {getattr(self, 'sink_dims', s.sink_dims)}): check the sink "
                "dimensions ('vsink lvlm calibrate') and tau")
