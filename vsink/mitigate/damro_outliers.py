"""DAMRO's outlier tokens per LVLM family: which of the vision tower's tokens are the "outliers"
and the image-token embeddings the contrastive branch keeps for them (:mod:`vsink.mitigate.damro`).

``llava`` (LLaVA-1.5) — the paper's rule (coder-gx/DAMRO ``modeling_llava.py``): the class token's
attention on the patches at the tower's feature layer (``vision_feature_layer``), one head over the
full width, ``softmax(q·kᵀ/√C)`` from that layer's ``q_proj`` / ``k_proj``; the top-``k`` patches'
features of that layer, through the projector.

``llava-next`` (LLaVA-NeXT) — the same rule on the base tile (the whole image resized to the
tower's resolution, tile 0 of each row), and the model's ``image_newline`` embedding after the
``k`` features, as the released ``modeling_llava_next.py`` does (it scores every tile but its
``pack_image_features_damro`` keeps the first, the base tile, and appends one newline).

``qwen2-vl`` / ``qwen2.5-vl`` — vsink's adaptation (the tower has no class token): the attention
mass each patch receives, summed over the query patches of its image and averaged over heads, in
the tower's last full-attention block (Qwen2.5-VL: the last of ``fullatt_block_indexes``; its
other blocks attend within windows), summed over the ``merge²`` patches of each merged token; the
top-``k`` merged tokens' features of the merger (what the language model reads).

``internvl`` (InternVL) — vsink's adaptation of the LLaVA-NeXT rule (no released code): the paper's
class-token attention (one head over the full width, from the feature layer's queries and keys
after InternViT's query/key norm) on the tile that shows the whole image — the thumbnail, or the
only tile — summed over the 2 × 2 patches each image token holds after the pixel shuffle; the
top-``k`` tokens' projected features of that tile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..errors import VsinkError


@dataclass
class Outliers:
    """One tower pass's outliers for a batch (one image per row).

    Attributes:
        scores: the attention measure per selectable token [B, P] (LLaVA: patches of the base
            image; Qwen: merged tokens), NaN past a row's last token when the rows' images differ
            in size.
        top: the top-``k`` token indices per row [B, k], in descending score (``torch.topk``).
        features: the branch's image-token embeddings per row [B, n, D], in order (``k``, and
            LLaVA-NeXT's newline).
    """

    scores: torch.Tensor
    top: torch.Tensor
    features: torch.Tensor


def _core(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    return inner if inner is not None and (hasattr(inner, "vision_tower") or hasattr(inner, "visual")) else model


def _check_k(k: int, count: int) -> None:
    if k > count:
        raise VsinkError(f"damro setting 'k' ({k}) exceeds the tower's {count} tokens of an image")


def _one_image_per_prompt(images: int, rows: int, field: str) -> None:
    if images != rows:
        raise VsinkError(f"damro needs one image per prompt; {field} has {images} images for {rows} prompts")


def _class_token_feature_layer(cfg: Any) -> int:
    """The one tower layer whose features reach the language model, for a tower whose class token
    is dropped from them (the class-token rules need its attention, not its feature)."""
    if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
        raise VsinkError("damro: the tower's class token must be dropped from the features "
                         "(vision_feature_select_strategy 'default')")
    if not isinstance(cfg.vision_feature_layer, int):
        raise VsinkError("damro needs one vision feature layer")
    return int(cfg.vision_feature_layer)


def clip_outliers(run: Any, k: int) -> Outliers:
    """LLaVA-1.5 and LLaVA-NeXT (base tile): see the module docstring."""
    lvlm = run.lvlm
    core = _core(lvlm.model)
    layer = _class_token_feature_layer(lvlm.model.config)
    pixels = run.inputs["pixel_values"]
    _one_image_per_prompt(len(pixels), int(run.inputs["input_ids"].shape[0]), "pixel_values")
    tiled = lvlm.family == "llava-next"
    if tiled:
        pixels = pixels[:, 0] if pixels.dim() == 5 else pixels  # the base tile of each row
    tower = lvlm.vision_backbone()
    layout = tower.layout(tuple(pixels.shape[-2:]))
    attention = tower.blocks[layer].self_attn
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [attention.q_proj.register_forward_hook(lambda m, a, out: grabbed.__setitem__("q", out)),
             attention.k_proj.register_forward_hook(lambda m, a, out: grabbed.__setitem__("k", out))]
    try:
        with torch.no_grad():
            hidden = core.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
    finally:
        for h in hooks:
            h.remove()
    q, key = grabbed["q"].float(), grabbed["k"].float()
    weights = torch.softmax(layout.split(q)["cls"] @ key.transpose(-2, -1) * hidden.shape[-1] ** -0.5, dim=-1)
    cls = layout.patches(weights[:, 0], dim=1)  # [B, P]
    _check_k(k, cls.shape[1])
    top = torch.topk(cls, k, dim=1).indices
    patches = layout.patches(hidden)
    with torch.no_grad():
        features = core.multi_modal_projector(patches.gather(1, top[..., None].expand(-1, -1, patches.shape[-1])))
        if tiled and getattr(core, "image_newline", None) is not None:
            newline = core.image_newline.to(features.dtype)[None, None].expand(features.shape[0], 1, -1)
            features = torch.cat([features, newline], dim=1)
    return Outliers(cls, top, features)


def attention_block(visual: torch.nn.Module) -> int:
    """The Qwen tower's last full-attention block (Qwen2.5-VL attends within windows elsewhere)."""
    full = getattr(visual, "fullatt_block_indexes", None) or getattr(visual.config, "fullatt_block_indexes", None)
    return int(max(full)) if full else len(visual.blocks) - 1


def window_order(visual: torch.nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL: the merged token (original order) at each merged position of the blocks' order."""
    own = getattr(visual, "get_window_index", None)
    if own is not None:  # transformers 4.x
        return own(grid)[0]
    from transformers.vision_utils import get_vision_window_index

    cfg = visual.config
    return get_vision_window_index(grid, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size,
                                   patch_size=cfg.patch_size)[0]


def _rotary(attention: torch.nn.Module) -> Callable:
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision


def received_mass(attention: torch.nn.Module, x: torch.Tensor, cu_seqlens: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention mass [N] each of a Qwen tower block's tokens receives: its column of the
    block's attention probabilities summed over the queries of its segment (``cu_seqlens``),
    averaged over heads; ``x`` is the block's attention input [N, C] (after its norm)."""
    n = x.shape[0]
    q, key, _ = attention.qkv(x).reshape(n, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, key = _rotary(attention)(q, key, cos, sin)
    q, key = q.float().transpose(0, 1), key.float().transpose(0, 1)  # [H, N, d]
    scale = getattr(attention, "scaling", q.shape[-1] ** -0.5)
    bounds = [int(v) for v in cu_seqlens]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        probs = torch.softmax(q[:, start:end] @ key[:, start:end].transpose(-2, -1) * scale, dim=-1)
        out.append(probs.sum(1).mean(0))
    return torch.cat(out)


def qwen_outliers(run: Any, k: int) -> Outliers:
    """Qwen2-VL and Qwen2.5-VL (vsink's adaptation): see the module docstring."""
    lvlm = run.lvlm
    core = _core(lvlm.model)
    visual = core.visual
    grid = run.inputs.get("image_grid_thw")
    rows = int(run.inputs["input_ids"].shape[0])
    _one_image_per_prompt(0 if grid is None else len(grid), rows, "image_grid_thw")
    attention = visual.blocks[attention_block(visual)].attn
    grabbed: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grabbed["x"] = args[0] if args else kwargs["hidden_states"]
        grabbed["cu"] = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        pe = kwargs.get("position_embeddings")
        if pe is None:  # transformers releases that pass the rotary angles instead
            angles = torch.cat([kwargs["rotary_pos_emb"]] * 2, dim=-1)
            pe = (angles.cos(), angles.sin())
        grabbed["pe"] = pe

    handle = attention.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = visual(run.inputs["pixel_values"].type(visual.dtype), grid_thw=grid)
            mass = received_mass(attention, grabbed["x"], grabbed["cu"], grabbed["pe"])
    finally:
        handle.remove()
    merged = getattr(out, "pooler_output", out)  # [tokens, D] in the language model's order
    unit = int(visual.config.spatial_merge_size) ** 2
    per_token = mass.reshape(-1, unit).sum(-1)  # the blocks' order
    if hasattr(visual, "fullatt_block_indexes") or getattr(visual.config, "fullatt_block_indexes", None):
        ordered = torch.empty_like(per_token)
        ordered[window_order(visual, grid).to(per_token.device)] = per_token
        per_token = ordered
    counts = [int(t * h * w) // unit for t, h, w in grid.tolist()]
    _check_k(k, min(counts))
    scores = torch.full((rows, max(counts)), float("nan"), device=per_token.device)
    tops, features = [], []
    for b, (row, feats) in enumerate(zip(per_token.split(counts), merged.split(counts))):
        scores[b, :len(row)] = row
        top = torch.topk(row, k).indices
        tops.append(top)
        features.append(feats[top.to(feats.device)])
    return Outliers(scores, torch.stack(tops), torch.stack(features))


def internvl_outliers(run: Any, k: int) -> Outliers:
    """InternVL (vsink's adaptation): see the module docstring."""
    lvlm = run.lvlm
    core = _core(lvlm.model)
    cfg = lvlm.model.config
    layer = _class_token_feature_layer(cfg)
    counts = lvlm.pixel_counts(run.inputs)
    ends = torch.tensor(counts).cumsum(0) - 1  # each row's last tile: its thumbnail, or its only tile
    whole = run.inputs["pixel_values"][ends.to(run.inputs["pixel_values"].device)]
    tower = lvlm.vision_backbone()
    layout = tower.layout(tuple(whole.shape[-2:]))
    attention = tower.blocks[layer].attention
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [attention.q_norm.register_forward_hook(lambda m, a, out: grabbed.__setitem__("q", out)),
             attention.k_norm.register_forward_hook(lambda m, a, out: grabbed.__setitem__("k", out))]
    try:
        with torch.no_grad():
            out = core.get_image_features(pixel_values=whole, vision_feature_layer=layer,
                                          vision_feature_select_strategy="default")
    finally:
        for h in hooks:
            h.remove()
    features = getattr(out, "pooler_output", out)  # [B, tokens, D] (transformers 4.x: the tensor itself)
    q, key = grabbed["q"].float(), grabbed["k"].float()
    weights = torch.softmax(layout.split(q)["cls"] @ key.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    rows, cols = layout.grid
    side = int(round(1 / float(cfg.downsample_ratio)))
    cls = layout.patches(weights[:, 0], dim=1).reshape(-1, rows // side, side, cols // side, side)
    scores = cls.sum(dim=(2, 4)).flatten(1)  # [B, tokens]: each token's block of side × side patches
    _check_k(k, scores.shape[1])
    top = torch.topk(scores, k, dim=1).indices
    return Outliers(scores, top, features.gather(1, top[..., None].expand(-1, -1, features.shape[-1])))


#: the outlier rule of each built-in family DAMRO runs on (``LVLM.family``)
RULES: dict[str, Callable[[Any, int], Outliers]] = {
    "llava": clip_outliers, "llava-next": clip_outliers, "qwen2-vl": qwen_outliers, "qwen2.5-vl": qwen_outliers,
    "internvl": internvl_outliers}


def rule_for(family: type) -> Optional[Callable[[Any, int], Outliers]]:
    """The outlier rule of an LVLM family class: its entry in :data:`RULES`, else the paper's rule
    for a family (a plugin's) that declares ``patches_one_to_one`` (a class token, one image token
    per patch, as LLaVA-1.5), else None."""
    rule = RULES.get(family.family)
    if rule is None and getattr(family, "patches_one_to_one", False):
        return clip_outliers
    return rule
