"""DAMRO — dive into the attention mechanism of LVLMs to reduce object hallucination (Gong et
al., EMNLP 2024) on vsink's branches.

The vision tower's "outlier" tokens are the top-``k`` patches by the class token's attention at
the tower's feature layer (the layer whose output the LVLM reads, ``vision_feature_layer``): a
single-head, full-width attention ``softmax(q·kᵀ/√C)`` from that layer's ``q_proj`` / ``k_proj``
outputs. The contrastive branch is the prompt with the image reduced to those ``k`` patches'
projected features (in the order of their attention, as ``torch.topk`` returns them); each step
decodes from ``(1 + α)·l − α·l_outlier`` over the tokens that pass VCD's plausibility cutoff β.
Defaults: the released POPE script (α 0.5, β 0.1, k 4); its CHAIR script uses α 1.5.

Per family (:mod:`vsink.mitigate.damro_outliers`): LLaVA-1.5 as above; LLaVA-NeXT on its base
tile with the model's newline embedding after the ``k`` features (as the released code);
Qwen2-VL / Qwen2.5-VL / Qwen3-VL, whose towers have no class token, by vsink's adaptation: the
merged tokens that receive the most attention mass in the tower's last full-attention block
(Qwen3-VL: with the same tokens' DeepStack features); InternVL by vsink's adaptation: the class
token's attention on its whole-image tile, summed per pixel-shuffled token; LLaVA-OneVision,
PaliGemma, Gemma 3, Idefics3 and SmolVLM (SigLIP towers, no class token) by vsink's adaptation:
the attention mass each patch receives in the block that produces the features, summed per image
token, on the view that shows the whole image (OneVision's base view, Idefics3's global image).
Idefics3's branch holds the image as the processor writes it without splitting (the global
image's introduction, then the ``k`` tokens). A plugin family without a rule is refused in one line.
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
from .damro_outliers import Outliers, rule_for
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


#: why DAMRO does not apply to a family without an outlier rule (:func:`rule_for`)
NEEDS = ("damro needs a tower whose outlier tokens vsink can select: an outlier rule for the family "
         "(vsink.mitigate.damro_outliers.RULES), or a class token and one image token per patch "
         "(patches_one_to_one, as LLaVA-1.5)")


def check_family(lvlm: Any) -> None:
    """Refuse, in one line, a model whose family has no outlier rule (:func:`rule_for`)."""
    if rule_for(type(lvlm)) is None:
        raise VsinkError(f"{NEEDS}; {lvlm.spec} is {lvlm.model_type}")


def outliers(run: Run, k: int) -> Outliers:
    """One tower pass: the outlier scores, the top-``k`` tokens and the branch's image-token
    embeddings (:mod:`vsink.mitigate.damro_outliers`)."""
    check_family(run.lvlm)
    return rule_for(type(run.lvlm))(run, k)


def outlier_patches(run: Run, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the outlier score of each selectable token [B, P], the top-``k`` indices [B, k] in
    descending score): LLaVA's class-token attention on the patches, the attention mass received
    per image token on towers without a class token."""
    found = outliers(run, k)
    return found.scores, found.top


def image_block(lvlm: Any, ids: torch.Tensor, row: int) -> tuple[int, int, int, int]:
    """Where one prompt row's (padding removed) image lies, for the branch: ``(cut, head, first,
    last)``: the tokens ``[cut, head)`` are dropped, ``[head, first)`` kept before the image's
    ``k`` tokens, which replace ``[first, last)``. One run of image tokens: ``cut = head = first``.
    Idefics3 / SmolVLM (sub-images then the global image, each introduced by
    ``<fake_token_around_image>`` and its tag): the sub-images and their tags are dropped, the
    global image's introduction kept, so the branch holds the image as the processor writes it
    without splitting."""
    image = (ids == lvlm.image_token_id).nonzero().flatten()
    starts = [int(image[0])] + [int(b) for a, b in zip(image[:-1], image[1:]) if b != a + 1]
    first, last = starts[-1], int(image[-1]) + 1
    if len(starts) == 1:
        return first, first, first, last
    if not lvlm.splits_images:
        raise VsinkError(f"damro needs one image per prompt; row {row}'s image tokens are not one run")
    fake = getattr(lvlm.processor, "fake_image_token", None)
    if fake is None:
        raise VsinkError(f"damro on a split {lvlm.family} image needs its processor's <fake_token_around_image> "
                         f"(row {row}); load the model with its processor")
    intro = (ids == int(lvlm.processor.tokenizer.convert_tokens_to_ids(fake))).nonzero().flatten().tolist()
    if not intro or intro[0] > starts[0]:
        raise VsinkError(f"damro: row {row}'s sub-images are not introduced by {fake}")
    before = lambda at: max(i for i in intro if i < at)  # noqa: E731  the square's <fake_token_around_image>
    return before(starts[0]), before(first), first, last


def outlier_prompt(run: Run, k: int) -> dict[str, Any]:
    """The prompt with each row's image reduced to its outlier tokens (see the module docstring):
    ``input_ids``, ``attention_mask``, ``inputs_embeds``; ``token_type_ids`` where the prompt has
    them (the image's tokens keep the image's type); Qwen3-VL's ``deepstack_embeds``."""
    lvlm = run.lvlm
    found = outliers(run, k)
    features = found.features  # [B, n, D]
    count, image_id = features.shape[1], lvlm.image_token_id
    types = run.inputs.get("token_type_ids")
    rows, type_rows = [], []
    for b in range(run.input_ids.shape[0]):
        real = run.attention_mask[b].bool()
        ids = run.input_ids[b][real]
        cut, head, first, last = image_block(lvlm, ids, b)
        rows.append(torch.cat([ids[:cut], ids[head:first], torch.full((count,), image_id, dtype=ids.dtype,
                                                                      device=ids.device), ids[last:]]))
        if types is not None:
            t = types[b][real]
            type_rows.append(torch.cat([t[:cut], t[head:first], t[first].repeat(count), t[last:]]))
    ids, mask = left_pad(run, rows)
    embeds = lvlm.model.get_input_embeddings()(ids)
    image = ids == image_id
    embeds = embeds.masked_scatter(image[..., None], features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    prompt = {"input_ids": ids, "attention_mask": mask, "inputs_embeds": embeds}
    if types is not None:
        padded = torch.zeros_like(ids, dtype=types.dtype)
        for b, t in enumerate(type_rows):
            padded[b, ids.shape[1] - len(t):] = t
        prompt["token_type_ids"] = padded
    if found.deepstack is not None:
        prompt["deepstack_embeds"] = found.deepstack
    return prompt


@register
class DAMRO(ContrastiveDecoder):
    """DAMRO as a mitigation with an outlier-patch branch (see the module docstring)."""

    name = "damro"
    settings_class = DAMROSettings
    weak = "outliers"

    @classmethod
    def refusal(cls, family: Any) -> Optional[str]:
        """DAMRO needs an outlier rule for the family's tower (:func:`rule_for`)."""
        return None if rule_for(family) is not None else NEEDS

    def _install(self, run: Run, handles: list) -> None:
        check_family(run.lvlm)

    def branches(self, run: Run) -> list:
        s: DAMROSettings = self.settings
        return [Branch("outliers", "tokens", lambda r: outlier_prompt(r, s.k), edits=branch_edits(s.branch_edits))]
