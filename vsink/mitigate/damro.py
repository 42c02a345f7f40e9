"""DAMRO — dive into the attention mechanism of LVLMs to reduce object hallucination (Gong et
al., EMNLP 2024) on vsink's branches.

The vision tower's "outlier" tokens are the top-``k`` patches by the class token's attention at
the tower's feature layer (the layer whose output the LVLM reads, ``vision_feature_layer``): a
single-head, full-width attention ``softmax(q·kᵀ/√C)`` from that layer's ``q_proj`` / ``k_proj``
outputs. The contrastive branch is the prompt with the image reduced to those ``k`` patches'
projected features (in the order of their attention, as ``torch.topk`` returns them); each step
decodes from ``(1 + α)·l − α·l_outlier`` over the tokens that pass VCD's plausibility cutoff β.
Defaults: the released POPE script (α 0.5, β 0.1, k 4); its CHAIR script uses α 1.5.

The class token and the one-to-one patch-to-token path exist in LLaVA-1.5's tower only: other
families (LLaVA-NeXT's tiles, Qwen2-VL's merged patches without a class token) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ..errors import VsinkError
from .branch import Branch, left_pad
from ..options import Choice, Float, Int
from .base import Run, register
from .contrastive import BRANCH_EDITS, ContrastiveDecoder, branch_edits
from .settings import CheckedSettings, setting


@dataclass
class DAMROSettings(CheckedSettings):
    """DAMRO's settings (see the module docstring)."""

    alpha: float = setting(0.5, Float(0), "contrast strength α (POPE 0.5, CHAIR 1.5; 0: plain decoding)")
    beta: float = setting(0.1, Float(0, 1), "plausibility cutoff β: tokens with p < β·max p are dropped")
    k: int = setting(4, Int(min=1), "outlier patches kept in the contrastive branch")
    branch_edits: str = setting("all", Choice(BRANCH_EDITS), "edits of the composed mitigations in the outlier "
                                "branch: all, or none (the plain model)")
    protocol: str = "paper"

    NAME: ClassVar[str] = "damro"
    #: the released POPE script's values are the defaults above
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}


def _core(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "model", model) if hasattr(getattr(model, "model", None), "vision_tower") else model


#: why DAMRO does not apply to a family without :attr:`LVLM.patches_one_to_one`
NEEDS = "damro needs a vision tower with a class token whose patches reach the language model one to one (LLaVA-1.5)"


def check_family(lvlm: Any) -> None:
    """Refuse, in one line, a model whose tower has no class token feeding patches one to one."""
    if not type(lvlm).patches_one_to_one:
        raise VsinkError(f"{NEEDS}; {lvlm.spec} is {lvlm.model_type}")


def outlier_patches(run: Run, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention of the class token on each patch [B, P], the top-``k`` patch indices [B, k] in
    descending attention) at the tower's feature layer."""
    cls, top, _ = _tower_outliers(run, k)
    return cls, top


def _tower_outliers(run: Run, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of the tower: the class token's attention on the patches [B, P], the top-``k``
    patch indices [B, k] and the patch features of the feature layer [B, P, C] (tokens sliced by
    the tower's :class:`~vsink.layout.TokenLayout`)."""
    lvlm = run.lvlm
    check_family(lvlm)
    core = _core(lvlm.model)
    cfg = lvlm.model.config
    if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
        raise VsinkError("damro: the tower's class token must be dropped from the features "
                         "(vision_feature_select_strategy 'default')")
    layer = int(cfg.vision_feature_layer) if isinstance(cfg.vision_feature_layer, int) else None
    if layer is None:
        raise VsinkError("damro needs one vision feature layer")
    tower = lvlm.vision_backbone()
    layout = tower.layout(tuple(run.inputs["pixel_values"].shape[-2:]))
    attention = tower.blocks[layer].self_attn
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [attention.q_proj.register_forward_hook(lambda m, a, out: grabbed.__setitem__("q", out)),
             attention.k_proj.register_forward_hook(lambda m, a, out: grabbed.__setitem__("k", out))]
    try:
        with torch.no_grad():
            hidden = core.vision_tower(run.inputs["pixel_values"], output_hidden_states=True).hidden_states[layer]
    finally:
        for h in hooks:
            h.remove()
    q, key = grabbed["q"].float(), grabbed["k"].float()
    width = hidden.shape[-1]
    weights = torch.softmax(layout.split(q)["cls"] @ key.transpose(-2, -1) * width ** -0.5, dim=-1)  # [B, 1, N]
    cls = layout.patches(weights[:, 0], dim=1)  # [B, P]
    if k > cls.shape[1]:
        raise VsinkError(f"damro setting 'k' ({k}) exceeds the tower's {cls.shape[1]} patches")
    return cls, torch.topk(cls, k, dim=1).indices, layout.patches(hidden)


def outlier_prompt(run: Run, k: int) -> dict[str, Any]:
    """The prompt with each row's image reduced to its ``k`` outlier patches (see the module docstring)."""
    lvlm = run.lvlm
    core = _core(lvlm.model)
    _, top, hidden = _tower_outliers(run, k)
    with torch.no_grad():
        picked = hidden.gather(1, top[..., None].expand(-1, -1, hidden.shape[-1]))
        features = core.multi_modal_projector(picked)  # [B, k, D]
    spans, image_id = run.context.spans, lvlm.image_token_id
    rows = []
    for b in range(spans.batch_size):
        ids = run.input_ids[b][run.attention_mask[b].bool()]
        image = (ids == image_id).nonzero().flatten()
        first, last = int(image[0]), int(image[-1]) + 1
        rows.append(torch.cat([ids[:first], torch.full((k,), image_id, dtype=ids.dtype, device=ids.device), ids[last:]]))
    ids, mask = left_pad(run, rows)
    embeds = lvlm.model.get_input_embeddings()(ids)
    image = ids == image_id
    embeds = embeds.masked_scatter(image[..., None], features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    return {"input_ids": ids, "attention_mask": mask, "inputs_embeds": embeds}


@register
class DAMRO(ContrastiveDecoder):
    """DAMRO as a mitigation with an outlier-patch branch (see the module docstring)."""

    name = "damro"
    settings_class = DAMROSettings
    weak = "outliers"

    @classmethod
    def refusal(cls, family: Any) -> Optional[str]:
        """DAMRO reads the tower's class-token attention on patches that are the image tokens."""
        return None if family.patches_one_to_one else NEEDS

    def _install(self, run: Run, handles: list) -> None:
        check_family(run.lvlm)

    def branches(self, run: Run) -> list:
        s: DAMROSettings = self.settings
        return [Branch("outliers", "tokens", lambda r: outlier_prompt(r, s.k), edits=branch_edits(s.branch_edits))]
