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

``qwen3-vl`` (Qwen3-VL) — the Qwen rule on its tower (every block attends over the whole image; the
last is used), and the branch carries DeepStack: the same ``k`` tokens' features of every DeepStack
level (``deepstack_visual_indexes``), which the model adds after its first decoder layers.

``llava-onevision``, ``paligemma``, ``gemma3``, ``idefics3``, ``smolvlm`` — vsink's adaptation for
SigLIP-style towers without a class token (:func:`received_outliers`): the attention mass each
patch receives in the block that produces the LVLM's features (its columns of the attention
probabilities, summed over the query patches and averaged over heads, padding patches excluded),
summed over the patches each image token holds (Gemma 3's average pool, Idefics3's pixel shuffle);
the top-``k`` image tokens' features as the model itself computes them. The view scored is the one
that shows the whole image: LLaVA-OneVision's base view (tile 0; the tiled view takes no part),
Idefics3's global image (the last square), the one image of PaliGemma and Gemma 3.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from ..errors import VsinkError


@dataclass
class Outliers:
    """One tower pass's outliers for a batch (one image per row).

    Attributes:
        scores: the attention measure per selectable token [B, P] (LLaVA: patches of the base
            image; Qwen: merged tokens; InternVL and the towers without a class token: image
            tokens of the view scored), NaN past a row's last token when the rows' images differ
            in size (Qwen).
        top: the top-``k`` token indices per row [B, k], in descending score (``torch.topk``).
        features: the branch's image-token embeddings per row [B, n, D], in order (``k``, and
            LLaVA-NeXT's newline).
        deepstack: (Qwen3-VL) the same tokens' DeepStack features [B, levels, n, D], else None.
    """

    scores: torch.Tensor
    top: torch.Tensor
    features: torch.Tensor
    deepstack: Optional[torch.Tensor] = None


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


def producing_block(layer: int, num_blocks: int) -> int:
    """The tower block whose output is ``hidden_states[layer]`` (``hidden_states[0]`` is the
    embedding output, ``hidden_states[i]`` block ``i - 1``'s): the block whose attention DAMRO
    reads. −2 (LLaVA's) is block ``num_blocks - 2``; a positive 2 is block 1, not block 2."""
    producer = layer % (num_blocks + 1) - 1
    if producer < 0:
        raise VsinkError(f"damro: vision_feature_layer {layer} is the tower's embedding output, which no "
                         "attention produced; DAMRO needs a block's output")
    return producer


@contextmanager
def _grabbed(attention: torch.nn.Module, query: str = "q_proj", key: str = "k_proj") -> Iterator[dict]:
    """The outputs of an attention module's ``query`` and ``key`` submodules in the pass run inside
    (``q``, ``k``: [B, N, C])."""
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [getattr(attention, query).register_forward_hook(lambda m, a, out: grabbed.__setitem__("q", out)),
             getattr(attention, key).register_forward_hook(lambda m, a, out: grabbed.__setitem__("k", out))]
    try:
        yield grabbed
    finally:
        for h in hooks:
            h.remove()


def attention_received(q: torch.Tensor, key: torch.Tensor, scale: float,
                       keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention mass [B, N] each token receives: its column of ``softmax(q·kᵀ·scale)`` summed
    over the queries and averaged over heads (``q``, ``key``: [B, H, N, d]); ``keep`` [B, N] (True:
    a real patch) leaves padding out as keys and as queries."""
    logits = q.float() @ key.float().transpose(-2, -1) * scale
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if keep is not None:
        probs = probs * keep[:, None, :, None]
    return probs.sum(2).mean(1)


def block_sums(scores: torch.Tensor, rows: int, cols: int, side: int) -> torch.Tensor:
    """Per-patch scores [B, rows·cols] (row-major) summed over each ``side × side`` block of patches,
    [B, (rows/side)·(cols/side)] in row-major order of the blocks: the image tokens of a pixel
    shuffle or an average pool."""
    return scores.reshape(-1, rows // side, side, cols // side, side).sum(dim=(2, 4)).flatten(1)


def _top(scores: torch.Tensor, features: torch.Tensor, k: int) -> Outliers:
    """The top-``k`` of ``scores`` [B, T] and those tokens' rows of ``features`` [B, T, D]."""
    _check_k(k, scores.shape[1])
    top = torch.topk(scores, k, dim=1).indices
    picked = features.gather(1, top.to(features.device)[..., None].expand(-1, -1, features.shape[-1]))
    return Outliers(scores, top, picked)


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
    block = tower.blocks[producing_block(layer, len(tower.blocks))]
    with _grabbed(block.self_attn) as grabbed, torch.no_grad():
        hidden = core.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
    q, key = grabbed["q"].float(), grabbed["k"].float()
    weights = torch.softmax(layout.split(q)["cls"] @ key.transpose(-2, -1) * hidden.shape[-1] ** -0.5, dim=-1)
    cls = layout.patches(weights[:, 0], dim=1)  # [B, P]
    with torch.no_grad():
        found = _top(cls, core.multi_modal_projector(layout.patches(hidden)), k)
        if tiled and getattr(core, "image_newline", None) is not None:
            newline = core.image_newline.to(found.features.dtype)[None, None].expand(found.features.shape[0], 1, -1)
            found.features = torch.cat([found.features, newline], dim=1)
    return found


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
    """The attention mass [N] each of a Qwen tower block's tokens receives (:func:`attention_received`
    within each segment of ``cu_seqlens``); ``x`` is the block's attention input [N, C] (after its norm)."""
    n = x.shape[0]
    q, key, _ = attention.qkv(x).reshape(n, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, key = _rotary(attention)(q, key, cos, sin)
    q, key = q.transpose(0, 1)[None], key.transpose(0, 1)[None]  # [1, H, N, d]
    scale = getattr(attention, "scaling", q.shape[-1] ** -0.5)
    bounds = [int(v) for v in cu_seqlens]
    return torch.cat([attention_received(q[:, :, start:end], key[:, :, start:end], scale)[0]
                      for start, end in zip(bounds[:-1], bounds[1:])])


def _tower_outputs(out: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A Qwen tower's merged tokens [tokens, D] and DeepStack features (Qwen3-VL; else none), from
    what its forward returns in this transformers (an output object, a tensor, or 4.x Qwen3-VL's
    ``(merged, deepstack)`` pair)."""
    if isinstance(out, tuple):
        return out[0], list(out[1])
    return getattr(out, "pooler_output", out), list(getattr(out, "deepstack_features", None) or [])


def qwen_outliers(run: Any, k: int) -> Outliers:
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL (vsink's adaptation): see the module docstring."""
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
            merged, deepstack = _tower_outputs(visual(run.inputs["pixel_values"].type(visual.dtype), grid_thw=grid))
            mass = received_mass(attention, grabbed["x"], grabbed["cu"], grabbed["pe"])
    finally:
        handle.remove()
    unit = int(visual.config.spatial_merge_size) ** 2
    per_token = mass.reshape(-1, unit).sum(-1)  # the blocks' order
    if hasattr(visual, "fullatt_block_indexes") or getattr(visual.config, "fullatt_block_indexes", None):
        ordered = torch.empty_like(per_token)
        ordered[window_order(visual, grid).to(per_token.device)] = per_token
        per_token = ordered
    counts = [int(t * h * w) // unit for t, h, w in grid.tolist()]
    _check_k(k, min(counts))
    scores = torch.full((rows, max(counts)), float("nan"), device=per_token.device)
    tops, features, stacks = [], [], []
    levels = [level.split(counts) for level in deepstack]
    for b, (row, feats) in enumerate(zip(per_token.split(counts), merged.split(counts))):
        scores[b, :len(row)] = row
        top = torch.topk(row, k).indices
        tops.append(top)
        features.append(feats[top.to(feats.device)])
        if levels:
            stacks.append(torch.stack([level[b][top.to(level[b].device)] for level in levels]))
    return Outliers(scores, torch.stack(tops), torch.stack(features), torch.stack(stacks) if stacks else None)


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
    block = tower.blocks[producing_block(layer, len(tower.blocks))]
    with _grabbed(block.attention, "q_norm", "k_norm") as grabbed, torch.no_grad():
        out = core.get_image_features(pixel_values=whole, vision_feature_layer=layer,
                                      vision_feature_select_strategy="default")
    features = getattr(out, "pooler_output", out)  # [B, tokens, D] (transformers 4.x: the tensor itself)
    q, key = grabbed["q"].float(), grabbed["k"].float()
    weights = torch.softmax(layout.split(q)["cls"] @ key.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    rows, cols = layout.grid
    side = int(round(1 / float(cfg.downsample_ratio)))
    # each token's block of side × side patches
    return _top(block_sums(layout.patches(weights[:, 0], dim=1), rows, cols, side), features, k)


# --- towers without a class token ----------------------------------------------------------------
@dataclass
class View:
    """What :func:`received_outliers` scores for a family: one tower pass over the view of each
    row's image that shows all of it.

    Attributes:
        attention: the attention module of the block that produces the LVLM's features (``q_proj``,
            ``k_proj``, ``num_heads``, ``scale``).
        encode: runs the tower once on the view and returns the image tokens' features [B, T, D]
            as the model gives them to its language model.
        block: patches along one side of an image token (pooling, pixel shuffle; 1: one per patch).
        keep: [B, P] the real patches (False: padding), or None: all.
    """

    attention: torch.nn.Module
    encode: Callable[[], torch.Tensor]
    block: int = 1
    keep: Optional[torch.Tensor] = None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # [B, N, C] → [B, H, N, d]


def _pooled(out: Any) -> torch.Tensor:
    """``get_image_features``' features [B, T, D] (transformers 5.x: its ``pooler_output``, Idefics3's
    a list of one image per row; 4.x: the tensor)."""
    out = getattr(out, "pooler_output", out)
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def received_outliers(run: Any, k: int) -> Outliers:
    """LLaVA-OneVision, PaliGemma, Gemma 3, Idefics3, SmolVLM (vsink's adaptation): see the module docstring."""
    lvlm = run.lvlm
    view = VIEWS[lvlm.family](run)
    with _grabbed(view.attention) as grabbed, torch.no_grad():
        features = view.encode()
    heads = int(view.attention.num_heads)
    mass = attention_received(_heads(grabbed["q"], heads), _heads(grabbed["k"], heads), float(view.attention.scale),
                              view.keep)
    side = int(round(mass.shape[1] ** 0.5))
    if side * side != mass.shape[1]:
        raise VsinkError(f"damro: the {lvlm.family} view scored has {mass.shape[1]} patches, not a square grid")
    return _top(block_sums(mass, side, side, view.block), features, k)


def _last_block_attention(lvlm: Any) -> torch.nn.Module:
    return lvlm.vision_backbone().blocks[-1].self_attn


def _single_image(run: Any) -> torch.Tensor:
    pixels = run.inputs["pixel_values"]
    _one_image_per_prompt(len(pixels), int(run.inputs["input_ids"].shape[0]), "pixel_values")
    return pixels


def paligemma_view(run: Any) -> View:
    """PaliGemma: the one image, one token per patch of the tower's last block (its
    ``last_hidden_state`` is what the projector reads)."""
    core, pixels = _core(run.lvlm.model), _single_image(run)
    return View(_last_block_attention(run.lvlm), lambda: _pooled(core.get_image_features(pixel_values=pixels)))


def gemma3_view(run: Any) -> View:
    """Gemma 3: the one image; each image token is the average pool of a block of patches."""
    view = paligemma_view(run)
    vision = run.lvlm.model.config.vision_config
    per_side = int(vision.image_size) // int(vision.patch_size)
    view.block = per_side // int(round(int(run.lvlm.model.config.mm_tokens_per_image) ** 0.5))
    return view


def onevision_view(run: Any) -> View:
    """LLaVA-OneVision: the base view (tile 0, the whole image at the tower's resolution), at the
    tower layer ``vision_feature_layer``; its features are the first ``side²`` of the image's
    packed features (no newline in the base view)."""
    lvlm = run.lvlm
    core, cfg = _core(lvlm.model), lvlm.model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int) or getattr(cfg, "vision_feature_select_strategy", "full") != "full":
        raise VsinkError("damro needs one vision feature layer and the tower's full features "
                         "(vision_feature_select_strategy 'full') on llava-onevision")
    pixels = _single_image(run)
    base = pixels[:, 0] if pixels.dim() == 5 else pixels
    blocks = lvlm.vision_backbone().blocks
    producer = producing_block(layer, len(blocks))

    def encode() -> torch.Tensor:
        hidden = core.vision_tower(base, output_hidden_states=True).hidden_states[layer]
        return core.multi_modal_projector(hidden)

    return View(blocks[producer].self_attn, encode)


def idefics3_view(run: Any) -> View:
    """Idefics3 / SmolVLM: each row's global image (its last real square: the whole image resized;
    the only square without image splitting); each image token is the pixel shuffle of a
    ``scale_factor × scale_factor`` block of patches; padding patches take no part."""
    lvlm = run.lvlm
    core, cfg = _core(lvlm.model), lvlm.model.config
    pixels = _single_image(run)
    real = (pixels != 0).flatten(2).any(-1)  # [B, squares]: padding squares are all zero
    last = (real.long() * torch.arange(1, real.shape[1] + 1, device=real.device)).argmax(1)
    rows = torch.arange(len(pixels), device=pixels.device)
    squares = pixels[rows, last][:, None]
    mask = run.inputs.get("pixel_attention_mask")
    mask = torch.ones(squares.shape[0], 1, *squares.shape[-2:], dtype=torch.bool, device=pixels.device) \
        if mask is None else mask[rows, last][:, None].bool()
    patch = int(cfg.vision_config.patch_size)
    keep = mask[:, 0].unfold(1, patch, patch).unfold(2, patch, patch).flatten(-2).any(-1).flatten(1)
    encode = lambda: _pooled(core.get_image_features(pixel_values=squares, pixel_attention_mask=mask))  # noqa: E731
    return View(_last_block_attention(lvlm), encode, int(cfg.scale_factor), keep)


#: the view each family without a class token is scored on (:func:`received_outliers`)
VIEWS: dict[str, Callable[[Any], View]] = {
    "llava-onevision": onevision_view, "paligemma": paligemma_view, "gemma3": gemma3_view,
    "idefics3": idefics3_view, "smolvlm": idefics3_view}

#: the outlier rule of each built-in family DAMRO runs on (``LVLM.family``)
RULES: dict[str, Callable[[Any, int], Outliers]] = {
    "llava": clip_outliers, "llava-next": clip_outliers, "qwen2-vl": qwen_outliers, "qwen2.5-vl": qwen_outliers,
    "qwen3-vl": qwen_outliers, "internvl": internvl_outliers, **{family: received_outliers for family in VIEWS}}


def rule_for(family: type) -> Optional[Callable[[Any, int], Outliers]]:
    """The outlier rule of an LVLM family class: its entry in :data:`RULES`, else the paper's rule
    for a family (a plugin's) that declares ``patches_one_to_one`` (a class token, one image token
    per patch, as LLaVA-1.5), else None."""
    rule = RULES.get(family.family)
    if rule is None and getattr(family, "patches_one_to_one", False):
        return clip_outliers
    return rule
