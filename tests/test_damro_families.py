"""DAMRO beyond LLaVA-1.5: LLaVA-NeXT's base tile (the released code's rule); Qwen2-VL /
Qwen2.5-VL / Qwen3-VL (vsink's adaptation: attention mass received in the last full-attention
block; Qwen3-VL's branch with its DeepStack features); LLaVA-OneVision, PaliGemma, Gemma 3,
Idefics3 and SmolVLM (vsink's adaptation for SigLIP towers: attention mass received, per image
token, on the view that shows the whole image). The outlier tokens are checked against the
tower's own computation (transformers' eager attention weights, the CLIP block's q/k
projections) and on a planted sink; the branch prompt holds exactly the selected tokens'
features as the model's own get_image_features gives them. Generation (strength zero, batches,
the cache) is in tests/test_contrastive.py."""

import math
import sys

import pytest
import torch

from vsink.lvlm import LVLM
from vsink.mitigate.damro import outlier_patches, outlier_prompt
from vsink.mitigate.damro_outliers import attention_block

from lvlm_models import BUILDERS, PROMPTS, random_image


class Run:
    """What the outlier rule reads of a generation call."""

    def __init__(self, lvlm, inputs):
        self.lvlm, self.inputs = lvlm, inputs
        self.input_ids, self.attention_mask = inputs["input_ids"], inputs["attention_mask"]


def fresh(name):
    from vsink.backbones.hf_lvlm import UnavailableFamily

    model, processor = BUILDERS[name]()
    try:
        return LVLM(model, processor, f"tiny-{name}")
    except UnavailableFamily as e:  # PaliGemma under transformers 4.x: refused in one line, reported
        assert "\n" not in str(e) and str(e).startswith(f"tiny-{name}: the ")
        pytest.skip(str(e))


# --- LLaVA-NeXT --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_next():
    return fresh("llava_next")


def test_llava_next_outliers_are_the_base_tiles_class_attention_top_patches(llava_next):
    # a wide and a tall image: each row has a base tile and two tiles (1×2 / 2×1 pinpoints)
    inputs = llava_next.prepare([random_image(0, (64, 30)), random_image(1, (30, 64))], PROMPTS)
    assert inputs["pixel_values"].shape[1] == 3
    core, cfg = llava_next.model.model, llava_next.model.config
    layer = cfg.vision_feature_layer
    base = inputs["pixel_values"][:, 0]  # tile 0: the whole image at the tower's resolution
    with torch.no_grad():
        hidden = core.vision_tower(base, output_hidden_states=True).hidden_states
        blocks = llava_next.vision_backbone().blocks
        block = blocks[layer]
        x = block.layer_norm1(hidden[layer % len(blocks)])  # hidden_states[i] enters block i
        q, k = block.self_attn.q_proj(x), block.self_attn.k_proj(x)
        # the released rule: one head over the full width, the class token's row over the patches
        cls = torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)[:, 0, 1:]
        top = cls.argsort(dim=1, descending=True)[:, :3]
        patches = hidden[layer][:, 1:]
        picked = core.multi_modal_projector(torch.stack([patches[b, top[b]] for b in range(2)]))
    got, got_top = outlier_patches(Run(llava_next, inputs), 3)
    assert torch.allclose(got, cls, atol=1e-5) and torch.equal(got_top, top)
    # the other tiles do not take part: replacing them changes nothing
    other = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    other["pixel_values"][:, 1:] = torch.randn_like(other["pixel_values"][:, 1:])
    assert torch.equal(outlier_patches(Run(llava_next, other), 3)[1], top)
    # the branch: the three features in attention order, then the model's newline embedding
    prompt = outlier_prompt(Run(llava_next, inputs), 3)
    image = prompt["input_ids"] == llava_next.image_token_id
    assert (image.sum(1) == 4).all()
    embeds = prompt["inputs_embeds"][image].reshape(2, 4, -1)
    assert torch.allclose(embeds[:, :3], picked, atol=1e-6)
    assert torch.equal(embeds[:, 3], core.image_newline.expand(2, -1))
    # the text around the image is the prompt's own, left-padded
    for b in range(2):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        ids = ids[ids != llava_next.image_token_id]
        kept = prompt["input_ids"][b][prompt["attention_mask"][b].bool()]
        assert torch.equal(kept[kept != llava_next.image_token_id], ids)


# --- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SQUARE = (32, 32)  # 8 × 8 patches, 4 × 4 merged tokens
#: the merged token (row-major over the 4 × 4 grid of a 32 × 32 image: patch 4, merge 2) at each
#: merged position of the blocks' order. Qwen2-VL: the processor's order itself. Qwen2.5-VL
#: (window 16 px = 2 merged tokens a side): the four 2 × 2 windows in raster order, each in raster
#: order, as its tower permutes the tokens before its blocks.
BLOCK_ORDER = {"qwen2_vl": list(range(16)),
               "qwen2_5_vl": [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
               "qwen3_vl": list(range(16))}  # no windows: every block attends over the whole image


@pytest.mark.parametrize("name", QWEN)
def test_qwen_outlier_scores_are_the_towers_own_attention_mass(name, monkeypatch):
    lvlm = fresh(name)
    visual = lvlm.model.model.visual
    visual.config._attn_implementation = "eager"
    module = sys.modules[type(visual.blocks[0].attn).__module__]
    own = module.eager_attention_forward
    seen = []

    def recording(*args, **kwargs):
        out, weights = own(*args, **kwargs)
        seen.append(weights)
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    inputs = lvlm.prepare([random_image(0, SQUARE), random_image(1, SQUARE)], PROMPTS)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    scores, top = outlier_patches(Run(lvlm, inputs), 3)
    assert attention_block(visual) == len(visual.blocks) - 1  # the tiny towers' full-attention block is the last
    last = seen[-2:]  # the last block attends over each image alone: one call per image, [1, heads, 64, 64]
    assert [tuple(w.shape) for w in last] == [(1, 2, 64, 64)] * 2
    order = torch.tensor(BLOCK_ORDER[name])
    for b, weights in enumerate(last):
        received = weights[0].sum(1).mean(0)  # each patch's column summed over the queries, head mean
        merged = received.reshape(16, 4).sum(1)  # the four patches of a merged token are consecutive
        expected = torch.empty(16)
        expected[order] = merged
        assert torch.allclose(scores[b], expected, atol=1e-4)
        assert torch.equal(top[b], expected.argsort(descending=True)[:3])


@pytest.mark.parametrize("name", QWEN)
def test_qwen_planted_sink_is_selected_and_its_features_fill_the_branch(name):
    lvlm = fresh(name)
    visual = lvlm.model.model.visual
    attention = visual.blocks[attention_block(visual)].attn
    width = attention.qkv.in_features  # 32: two heads of 16
    with torch.no_grad():  # q = 1 for every token (bias only); k = the token's input (identity); v unchanged
        attention.qkv.weight[:2 * width].zero_()
        attention.qkv.weight[width:2 * width] += torch.eye(width)
        attention.qkv.bias[:width] = 1.0
        attention.qkv.bias[width:2 * width] = 0.0
    planted = [2, 13]  # merged token of image 0, of image 1 (original order)
    order = BLOCK_ORDER[name]

    def plant(module, args, kwargs):
        # the block's attention input: zero but the four patches of each planted merged token, set
        # to 1; no rotation (cos 1, sin 0). Each head's score on a planted patch: 16 · 16^-1/2 = 4;
        # on any other: 0.
        x = torch.zeros_like(args[0])
        for b, m in enumerate(planted):
            at = 64 * b + 4 * order.index(m)
            x[at:at + 4] = 1.0
        cos, sin = kwargs["position_embeddings"]
        return (x, *args[1:]), {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}

    handle = attention.register_forward_pre_hook(plant, with_kwargs=True)
    try:
        inputs = lvlm.prepare([random_image(0, SQUARE), random_image(1, SQUARE)], PROMPTS)
        scores, top = outlier_patches(Run(lvlm, inputs), 1)
        prompt = outlier_prompt(Run(lvlm, inputs), 1)
        with torch.no_grad():
            merged = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            # transformers 4.x returns the tensor itself (Qwen3-VL: with its DeepStack features)
            merged = merged[0] if isinstance(merged, tuple) else getattr(merged, "pooler_output", merged)
    finally:
        handle.remove()
    # each of the 64 queries of an image puts e^4 / (4e^4 + 60) on each planted patch, 1 / (4e^4 + 60) on
    # each other: a merged token receives 4 · 64 times that
    e = math.exp(4)
    sink, rest = 256 * e / (4 * e + 60), 256 / (4 * e + 60)
    for b, m in enumerate(planted):
        expected = torch.full((16,), rest)
        expected[m] = sink
        assert torch.allclose(scores[b], expected, rtol=1e-4)
    assert top.flatten().tolist() == planted
    # the branch: one image token per row, holding the merger's feature of the planted token
    image = prompt["input_ids"] == lvlm.image_token_id
    assert (image.sum(1) == 1).all()
    got = prompt["inputs_embeds"][image]
    assert torch.allclose(got, torch.stack([merged[16 * b + m] for b, m in enumerate(planted)]), atol=1e-6)


def test_a_plugin_family_gets_the_paper_rule_only_by_declaring_one_token_per_patch():
    from vsink.mitigate.damro_outliers import clip_outliers, qwen_outliers, rule_for

    plugin = type("Plugin", (), {"family": "my-vlm", "patches_one_to_one": False})
    assert rule_for(plugin) is None
    plugin.patches_one_to_one = True
    assert rule_for(plugin) is clip_outliers
    assert rule_for(type(fresh("qwen2_5_vl"))) is qwen_outliers


@pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")
def test_qwen_images_of_different_sizes_in_one_batch_equal_their_rows_alone():
    from vsink.lvlm import generate

    lvlm = fresh("qwen2_5_vl")
    processor = lvlm.processor.image_processor  # native sizes, not one (transformers 5.x: size; 4.x: min/max_pixels)
    processor.size = {"shortest_edge": 256, "longest_edge": 4096}
    if hasattr(processor, "min_pixels"):
        processor.min_pixels, processor.max_pixels = 256, 4096
    images = [random_image(0, SQUARE), random_image(1, (64, 32))]
    inputs = lvlm.prepare(images, PROMPTS)
    counts = [t * h * w // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    assert counts[0] == 16 and counts[1] > 16  # 5.x: 8 × 16 patches, 32 merged tokens in 2 × 4 windows
    scores, top = outlier_patches(Run(lvlm, inputs), 3)
    assert scores.shape == (2, counts[1]) and scores[0, 16:].isnan().all() and not scores[0, :16].isnan().any()
    settings = {"alpha": 3.0, "beta": 0.0, "k": 3}
    batch = generate(lvlm, inputs, mitigation="damro", settings=settings, max_new_tokens=3)
    for b in range(2):
        one = lvlm.prepare([images[b]], [PROMPTS[b]])
        alone_scores, alone_top = outlier_patches(Run(lvlm, one), 3)
        count = alone_scores.shape[1]
        assert torch.allclose(scores[b, :count], alone_scores[0], atol=1e-5) and torch.equal(top[b], alone_top[0])
        alone = generate(lvlm, one, mitigation="damro", settings=settings, max_new_tokens=3)
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b])


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_more_images_than_prompts_is_one_line(name):
    from vsink.errors import VsinkError

    lvlm = fresh(name)
    inputs = lvlm.prepare([random_image(0, SQUARE), random_image(1, SQUARE)], PROMPTS)
    one_row = dict(inputs, input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1])
    field = "pixel_values" if name == "llava" else "image_grid_thw"
    with pytest.raises(VsinkError, match=f"^damro needs one image per prompt; {field} has 2 images for 1 prompts$"):
        outlier_patches(Run(lvlm, one_row), 2)


def test_two_image_runs_in_a_row_are_one_line():
    from vsink.errors import VsinkError

    lvlm = fresh("llava")
    inputs = lvlm.prepare([random_image(0, SQUARE), random_image(1, SQUARE)], PROMPTS)
    ids = inputs["input_ids"].clone()
    image = (ids[1] == lvlm.image_token_id).nonzero().flatten()
    ids[1, image[len(image) // 2]] = ids[1, -1]  # a text token splits row 1's image tokens into two runs
    with pytest.raises(VsinkError, match="^damro needs one image per prompt; row 1's image tokens are not one run$"):
        outlier_prompt(Run(lvlm, dict(inputs, input_ids=ids)), 2)


# --- SigLIP towers without a class token -------------------------------------------------------
#: per family: the image tokens along one side of the view scored, and the patches along one side
#: of an image token (tiny towers: 32 px images, 8 px patches, 4 × 4 patches)
SIGLIP = {"llava_onevision": (4, 1),  # base view: one token per patch
          "paligemma2": (4, 1),  # one token per patch
          "gemma3": (2, 2),  # mm_tokens_per_image 4: each token the average pool of 2 × 2 patches
          "idefics3": (2, 2), "smolvlm": (2, 2)}  # global image: pixel shuffle, scale_factor 2


def _own_features(lvlm, inputs):
    """The image tokens the model itself gives its language model for the view DAMRO scores, per
    row [B, T, D], from its own get_image_features on every view of the image."""
    core, rows = lvlm.model.model, inputs["input_ids"].shape[0]
    with torch.no_grad():
        if lvlm.family == "llava-onevision":  # each image's packed features: base view (16) first, then tiles
            out = core.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                          vision_feature_layer=lvlm.model.config.vision_feature_layer,
                                          vision_feature_select_strategy="full")
            packed = getattr(out, "pooler_output", out)
            return torch.stack([packed[b][:16] for b in range(rows)])
        if lvlm.family in ("idefics3", "smolvlm"):  # every square of every row; the global image is each row's last
            out = core.get_image_features(pixel_values=inputs["pixel_values"],
                                          pixel_attention_mask=inputs["pixel_attention_mask"])
            feats = getattr(out, "pooler_output", out)
            per_row = [f.reshape(-1, 4, f.shape[-1]) for f in feats] if isinstance(feats, (list, tuple)) \
                else feats.reshape(rows, -1, 4, feats.shape[-1])
            return torch.stack([r[-1] for r in per_row])
        out = core.get_image_features(pixel_values=inputs["pixel_values"])
        return getattr(out, "pooler_output", out)


def _own_attention(lvlm, inputs):
    """transformers' own eager attention probabilities [B, H, P, P] of the block that produces the
    features, on the view that shows the whole image."""
    core, pixels = lvlm.model.model, inputs["pixel_values"]
    lvlm.model.set_attn_implementation("eager")
    with torch.no_grad():
        if lvlm.family == "llava-onevision":
            layer = lvlm.model.config.vision_feature_layer  # -1: hidden_states[-1] is the last block's output
            return core.vision_tower(pixels[:, 0], output_attentions=True).attentions[layer]
        if lvlm.family in ("idefics3", "smolvlm"):
            return core.vision_model(pixels[:, -1], output_attentions=True).attentions[-1]
        return core.vision_tower(pixels, output_attentions=True).attentions[-1]  # last_hidden_state's block


@pytest.mark.parametrize("name", sorted(SIGLIP))
def test_siglip_outliers_are_the_patches_receiving_the_towers_attention(name):
    lvlm = fresh(name)
    side, block = SIGLIP[name]
    inputs = lvlm.prepare([random_image(0), random_image(1)], PROMPTS)
    own = _own_features(lvlm, inputs)
    probs = _own_attention(lvlm, inputs)  # [2, heads, 16, 16]
    assert probs.shape[-1] == 16
    received = probs.sum(2).mean(1)  # each patch's column summed over the query patches, head mean: [2, 16]
    expected = torch.zeros(2, side * side)
    for r in range(4):  # patch (r, c) of the 4 × 4 grid belongs to image token (r // block, c // block)
        for c in range(4):
            expected[:, (r // block) * side + c // block] += received[:, 4 * r + c]
    scores, top = outlier_patches(Run(lvlm, inputs), 2)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.equal(top, expected.argsort(dim=1, descending=True)[:, :2])
    # the branch: the two tokens' features as the model computes them, in score order
    prompt = outlier_prompt(Run(lvlm, inputs), 2)
    image = prompt["input_ids"] == lvlm.image_token_id
    assert (image.sum(1) == 2).all()
    picked = torch.stack([own[b, top[b]] for b in range(2)])
    assert torch.allclose(prompt["inputs_embeds"][image].reshape(2, 2, -1), picked, atol=1e-5)
    # the views that do not show the whole image take no part (OneVision's tiles, Idefics3's sub-images)
    if inputs["pixel_values"].dim() == 5:
        other = dict(inputs, pixel_values=inputs["pixel_values"].clone())
        other["pixel_values"][:, 1:-1] = torch.randn_like(other["pixel_values"][:, 1:-1])
        if name == "llava_onevision":
            other["pixel_values"][:, -1] = torch.randn_like(other["pixel_values"][:, -1])
        else:
            other["pixel_values"][:, 0] = torch.randn_like(other["pixel_values"][:, 0])
        assert torch.equal(outlier_patches(Run(lvlm, other), 2)[1], top)


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics3_branch_is_the_unsplit_prompt_with_k_image_tokens(name):
    lvlm = fresh(name)
    inputs = lvlm.prepare([random_image(0), random_image(1)], PROMPTS)
    assert len(lvlm.image_spans(inputs["input_ids"]).spans[0]) == 5  # four sub-images and the global image
    unsplit = lvlm.prepare([random_image(0), random_image(1)], PROMPTS, options={"do_image_splitting": False})
    prompt = outlier_prompt(Run(lvlm, inputs), 3)
    image_id = lvlm.image_token_id
    for b in range(2):
        ids = unsplit["input_ids"][b][unsplit["attention_mask"][b].bool()].tolist()
        at = ids.index(image_id)  # the processor's own layout of one square: <fake><global-img>, 4 tokens, <fake>
        expected = ids[:at] + [image_id] * 3 + ids[at + 4:]
        assert ids[at:at + 4] == [image_id] * 4 and image_id not in ids[at + 4:]
        assert prompt["input_ids"][b][prompt["attention_mask"][b].bool()].tolist() == expected


def test_idefics3_rows_with_different_square_counts_equal_their_rows_alone():
    # a wide image splits into 2 × 1 squares, a square one into 2 × 2: the batch pads row 0 with
    # two all-zero squares, and each row's global image is its own last real square
    from vsink.lvlm import generate

    lvlm = fresh("idefics3")
    images = [random_image(0, (64, 24)), random_image(1, (40, 40))]
    inputs = lvlm.prepare(images, PROMPTS)
    assert not inputs["pixel_values"][0, -2:].any() and inputs["pixel_values"][0, 2].any()  # 3 real squares, 2 pads
    scores, top = outlier_patches(Run(lvlm, inputs), 2)
    settings = {"alpha": 3.0, "beta": 0.0, "k": 2}
    batch = generate(lvlm, inputs, mitigation="damro", settings=settings, max_new_tokens=3)
    for b in range(2):
        one = lvlm.prepare([images[b]], [PROMPTS[b]])
        alone_scores, alone_top = outlier_patches(Run(lvlm, one), 2)
        assert torch.allclose(alone_scores[0], scores[b], atol=1e-5) and torch.equal(alone_top[0], top[b])
        alone = generate(lvlm, one, mitigation="damro", settings=settings, max_new_tokens=3)
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b])


def test_idefics3_padding_patches_take_no_part():
    # the processor's squares are whole, so the padding is planted: the global image's last patch
    # row masked in pixel_attention_mask, which the tower honours (keys masked); vsink leaves those
    # patches out as keys and as queries, so they receive nothing and are never selected
    lvlm = fresh("idefics3")
    inputs = lvlm.prepare([random_image(0), random_image(1)], PROMPTS)
    inputs["pixel_attention_mask"] = inputs["pixel_attention_mask"].clone()
    inputs["pixel_attention_mask"][:, -1, 24:] = 0  # rows 24-31 of the 32 px global image: patch row 3
    scores, top = outlier_patches(Run(lvlm, inputs), 4)
    lvlm.model.set_attn_implementation("eager")
    patches = torch.ones(2, 4, 4, dtype=torch.bool)
    patches[:, 3] = False
    with torch.no_grad():
        probs = lvlm.model.model.vision_model(inputs["pixel_values"][:, -1], patch_attention_mask=patches,
                                              output_attentions=True).attentions[-1]  # [2, heads, 16, 16]
    received = probs[:, :, :12].sum(2).mean(1)  # summed over the 12 real query patches (rows 0-2 of 4 × 4)
    assert torch.allclose(received[:, 12:], torch.zeros(2, 4), atol=1e-6)
    expected = received.reshape(2, 2, 2, 2, 2).sum(dim=(2, 4)).flatten(1)  # 2 × 2 patches per token
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.equal(top, expected.argsort(dim=1, descending=True))


@pytest.mark.parametrize("name", ["gemma3", "paligemma2"])
def test_branch_token_types_follow_the_prompts(name):
    # Gemma 3: the k image tokens are one bidirectional image group (type 1); PaliGemma: all the prefix (type 0)
    lvlm = fresh(name)
    inputs = lvlm.prepare([random_image(0), random_image(1)], PROMPTS)
    prompt = outlier_prompt(Run(lvlm, inputs), 3)
    image = prompt["input_ids"] == lvlm.image_token_id
    expected = image.long() if name == "gemma3" else torch.zeros_like(image, dtype=torch.long)
    assert torch.equal(prompt["token_type_ids"].long(), expected)


# --- Qwen3-VL's DeepStack in the branch --------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_qwen3_vl_branch_adds_the_kept_tokens_deepstack_features(use_cache):
    from vsink.lvlm import generate

    lvlm = fresh("qwen3_vl")
    core = lvlm.model.model
    inputs = lvlm.prepare([random_image(0, SQUARE), random_image(1, SQUARE)], PROMPTS)
    _, top = outlier_patches(Run(lvlm, inputs), 2)
    with torch.no_grad():  # the model's own DeepStack features: per level, each image's 16 merged tokens
        out = core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        levels = out.deepstack_features if hasattr(out, "deepstack_features") else [f.split(16) for f in out[1]]
    assert len(levels) == 2  # deepstack_visual_indexes (0, 1): added after decoder layers 0 and 1
    expected = [torch.stack([level[b][top[b]] for b in range(2)]) for level in levels]  # [2 rows, 2 tokens, D]
    prompt = outlier_prompt(Run(lvlm, inputs), 2)
    width = prompt["input_ids"].shape[1]
    image = prompt["input_ids"] == lvlm.image_token_id
    layers = lvlm.layers
    outs, ins = [], []  # a copy of each output: transformers 4.x adds DeepStack to it in place
    hooks = [layers[i].register_forward_hook(
        lambda m, a, o, i=i: outs.append((i, (o[0] if isinstance(o, tuple) else o).clone()))) for i in range(2)]
    hooks += [layers[i + 1].register_forward_pre_hook(lambda m, a, kw, i=i: ins.append((i, (a or (kw["hidden_states"],))[0])),
                                                      with_kwargs=True) for i in range(2)]
    try:
        generate(lvlm, inputs, mitigation="damro", settings={"alpha": 1.0, "beta": 0.0, "k": 2}, max_new_tokens=2,
                 use_cache=use_cache)
    finally:
        for h in hooks:
            h.remove()
    # the branch's passes over its prompt: its width at the first step, one more without the cache
    seen = 0
    for (i, o), (j, x) in zip(outs, ins):
        assert i == j
        if o.shape[1] not in (width, width + 1):
            continue  # the main pass (24 tokens and more), a cached decode step (1)
        added = (x - o)[:, :width]
        assert torch.allclose(added[image].reshape(2, 2, -1), expected[i], atol=1e-5)
        assert torch.allclose(added[~image], torch.zeros(()), atol=1e-6)  # nothing elsewhere
        seen += 1
    assert seen == (2 if use_cache else 4)


def test_idefics3_split_image_without_its_processor_is_one_line():
    from vsink.errors import VsinkError

    lvlm = fresh("idefics3")
    inputs = lvlm.prepare([random_image(0), random_image(1)], PROMPTS)
    lvlm.processor = None  # inputs prepared elsewhere: the sub-images' introductions cannot be found
    with pytest.raises(VsinkError, match="^damro on a split idefics3 image needs its processor's "
                                         "<fake_token_around_image> \\(row 0\\); load the model with its processor$"):
        outlier_prompt(Run(lvlm, inputs), 2)
