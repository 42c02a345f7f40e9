"""InternVL (``InternVLForConditionalGeneration``) on tiny models built offline from its config
(random weights): its InternViT tower as a vision backbone (attention equal to transformers' eager
attention, outputs unchanged), the pixel shuffle's token grid, dynamic tiles plus thumbnail as
one image span per image in left-padded batches, the view box, ``vision_feature_layer``.

The checks every family shares (``none`` = HF greedy ``generate`` on one tile per image, every
mitigation batched and cached, every coverage cell, ``vsink scan --prompt``, decoder attention
equal to eager) run on the same tiny model in tests/test_lvlm.py, tests/test_lvlm_registry.py and
tests/test_lvlm_families.py. Not verified: released checkpoints (no network).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.backbones.hf_lvlm import LVLM
from vsink.backbones.lvlm_families import lvlm_families
from vsink.cli import main
from vsink.data.demo_lvlm import build_tiny_internvl
from vsink.errors import VsinkError
from vsink.lvlm import generate
from vsink.registers.neurons import NeuronSpec, RegisterNeuron
from vsink.viewbox import ViewBox

from conftest import capture_probs, sharpen
from test_view_box import BLUE, RED, close_to, denormalised, has_colour, margin_photo

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")

TOL = 1e-5
PROMPTS = ["is there a cat ?", "describe this image please , what color is the sky ?"]


def _skip_if_unavailable() -> None:
    why = lvlm_families()["internvl"].unavailable()
    if why is not None:
        pytest.skip(why)  # absent from this transformers: reported, not failed


def _tiny(**kwargs) -> LVLM:
    _skip_if_unavailable()
    model, processor = build_tiny_internvl(**kwargs)
    return LVLM(model, processor, "tiny-internvl")


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _tower(norm_type: str, use_qk_norm: bool):
    import transformers

    _skip_if_unavailable()
    torch.manual_seed(0)
    config = transformers.InternVLVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8,
                                               norm_type=norm_type, use_qk_norm=use_qk_norm,
                                               layer_scale_init_value=1.0, use_mean_pooling=False)
    model = sharpen(transformers.InternVLVisionModel(config))
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("norm_type, use_qk_norm", [("layer_norm", False), ("rms_norm", True)])
@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_tower_attention_equals_eager_and_outputs_are_unchanged(norm_type, use_qk_norm, size):
    """InternViT-300M's blocks (LayerNorm) and InternViT-6B's (RMSNorm, query/key norm over the
    full width); 48 × 40: a 6 × 5 grid, the position table resized by the model."""
    model = _tower(norm_type, use_qk_norm)
    backbone = vsink.wrap(model)
    assert type(backbone).__name__ == "HFInternVLVisionBackbone"
    layout = backbone.layout(size)
    assert (layout.num_cls, layout.num_registers, layout.grid) == (1, 0, (size[0] // 8, size[1] // 8))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    # the eager attention's own probabilities: each attention module returns them (transformers
    # 4.57's InternVLVisionModel does not take output_attentions)
    attentions: list[torch.Tensor] = []
    hooks = [layer.attention.register_forward_hook(lambda m, a, o: attentions.append(o[1]))
             for layer in model.encoder.layer]
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    for h in hooks:
        h.remove()
    out, probs = capture_probs(backbone, x)
    assert len(probs) == len(attentions) == 2
    for p, r in zip(probs, attentions):
        assert p.shape == r.shape == (2, 4, layout.num_tokens, layout.num_tokens)
        assert (p - r).abs().max().item() <= TOL
    assert (out - ref).abs().max().item() <= TOL
    assert probs[1].max() > 0.3  # far from uniform (1/17): an indexing mistake would show


def test_tower_saves_and_loads_through_transformers(tmp_path):
    import transformers

    backbone = vsink.wrap(_tower("layer_norm", False))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = backbone.forward(x)
    backbone.save(tmp_path / "tower")
    loaded = transformers.InternVLVisionModel.from_pretrained(tmp_path / "tower", local_files_only=True,
                                                               trust_remote_code=False).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).last_hidden_state, expected, atol=TOL)
    assert torch.allclose(vsink.load(str(tmp_path / "tower")).forward(x), expected, atol=TOL)


def test_the_lvlms_tower_is_a_vision_backbone_on_its_tiles(tmp_path):
    lvlm = _tiny()
    tower = lvlm.vision_backbone()
    assert type(tower).__name__ == "HFInternVLVisionBackbone" and tower.spec == "tiny-internvl#vision_tower"
    lvlm.model.save_pretrained(tmp_path / "m")
    lvlm.processor.save_pretrained(tmp_path / "m")
    loaded = vsink.load(f"{tmp_path / 'm'}#vision_tower")  # a saved InternVL's tower by spec
    assert type(loaded).__name__ == "HFInternVLVisionBackbone" and loaded.layout().num_cls == 1
    inputs = lvlm.prepare([_photo((96, 32))], ["describe"])
    tiles = inputs["pixel_values"]
    assert tiles.shape == (4, 3, 32, 32)  # 3 tiles and the thumbnail
    with torch.no_grad():
        expected = lvlm.model.model.vision_tower(pixel_values=tiles).last_hidden_state
    assert torch.allclose(tower.forward(tiles), expected, atol=TOL)
    assert tower.layout().num_cls == 1 and tower.layout().grid == (4, 4)


def test_pixel_shuffle_puts_each_2x2_block_of_patches_on_one_token_of_the_grid():
    """By hand from transformers' ``pixel_shuffle`` (two views and two transposes of the
    [rows, cols, C] patch grid): image token (r, c) of a tile is the concatenation of patches
    (2r, 2c), (2r, 2c + 1), (2r + 1, 2c), (2r + 1, 2c + 1) — so the (rows/2) × (cols/2) grid that
    vsink reports for a tile's tokens lies over the tile as the patches do."""
    lvlm = _tiny()
    inputs = lvlm.prepare([_photo((40, 40))], ["describe"])
    seen: dict[str, torch.Tensor] = {}
    core = lvlm.model.model
    handles = [core.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])),
               core.vision_tower.register_forward_hook(lambda m, a, o: seen.__setitem__("tower", o.last_hidden_state))]
    with torch.no_grad():
        lvlm.model(**inputs)
    for h in handles:
        h.remove()
    patches = seen["tower"][0, 1:].reshape(4, 4, -1)  # class token dropped, 4 × 4 patches
    tokens = seen["in"][0]
    assert lvlm.image_spans(inputs["input_ids"]).counts() == [4]
    assert lvlm.image_grid(inputs, 0, 4) == (2, 2)
    for r in range(2):
        for c in range(2):
            block = torch.cat([patches[2 * r, 2 * c], patches[2 * r, 2 * c + 1],
                               patches[2 * r + 1, 2 * c], patches[2 * r + 1, 2 * c + 1]])
            assert torch.equal(tokens[r * 2 + c], block)


def test_tiles_and_thumbnail_are_one_span_per_image_in_a_left_padded_batch():
    """A 96 × 32 photo (aspect 3): of the tile grids of 1 to 4 tiles, 3 × 1 matches exactly, so 3
    tiles plus the thumbnail, 4 × 4 = 16 tokens. A 40 × 40 photo: 1 × 1 and 2 × 2 tie on aspect,
    and the larger grid is taken only when the photo's area exceeds half of its canvas (1600 <
    0.5 · 64 · 64): one tile, no thumbnail, 4 tokens. Each image: ``<img>``, its tokens, ``</img>``."""
    lvlm = _tiny()
    tok = lvlm.processor.tokenizer
    inputs = lvlm.prepare([_photo((96, 32)), _photo((40, 40), 1)], PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert inputs["pixel_values"].shape[0] == 5
    assert lvlm.pixel_counts(inputs) == [4, 1]
    spans = lvlm.image_spans(ids)
    assert spans.counts() == [16, 4]
    assert [len(spans.spans[b]) for b in range(2)] == [1, 1]
    assert lvlm.image_grid(inputs, 0, 16) == (1, 16) and lvlm.image_grid(inputs, 1, 4) == (2, 2)
    start, end = tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")
    for b in range(2):
        first, last = spans.positions(b)[0], spans.positions(b)[-1]
        assert int(ids[b, first - 1]) == start and int(ids[b, last + 1]) == end
        assert bool(mask[b, first - 1:last + 2].all())
    assert int((mask[1] == 0).sum()) > 0 or int((mask[0] == 0).sum()) > 0  # rows of different length: padded

    # none = HF greedy generate on this batch, token for token
    with torch.no_grad():
        ref = lvlm.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(generate(lvlm, inputs, max_new_tokens=5).sequences, ref)
    # FastV prunes the same number of image tokens in every row: this batch is refused in one line
    with pytest.raises(VsinkError, match=r"^FastV needs the same number of image tokens in every row, got \[16, 4\]$"):
        generate(lvlm, inputs, mitigation="fastv", max_new_tokens=2)


def test_lvlm_scan_of_tiled_images():
    """Two 96 × 32 photos (3 tiles and the thumbnail each): the decoder's layout is the 16 image
    tokens as 1 × 16 after BOS and ``<img>``; the tower is scanned on its tiles."""
    from vsink.lvlm.scan import scan_lvlm

    lvlm = _tiny()
    result = scan_lvlm(lvlm, [_photo((96, 32)), _photo((96, 32), 1)], "describe", progress=False)
    assert result.layout.grid == (1, 16) and result.layout.num_cls == 2  # BOS and <img> before the image
    assert result.trace.norms.shape[:2] == (4, 2)  # decoder layers × rows: the two prompts
    assert result.vision.trace.norms.shape[:2] == (2, 8) and result.vision.layout.grid == (4, 4)  # 2 × 4 tiles


@pytest.mark.parametrize("name, settings", [
    ("none", {}), ("var", {"sink_dims": [3, 7], "tau": 2.5}), ("pai", {"alpha": 0.5}), ("vcd", {}), ("m3id", {}),
    ("vaf", {}), ("opera", {}), ("damro", {"k": 2}),
])
def test_a_batch_of_tiled_and_single_tile_images_equals_each_row_alone(name, settings):
    """Rows with 4 and 1 tiles (16 and 4 image tokens): VCD noises each image's tiles as at batch
    size 1 and OPERA cuts each row's tiles out of ``pixel_values`` (:meth:`pixel_counts`)."""
    lvlm = _tiny()
    images = [_photo((96, 32)), _photo((40, 40), 1)]
    batch = generate(lvlm, lvlm.prepare(images, PROMPTS), mitigation=name, settings=settings, max_new_tokens=4)
    for b in range(2):
        alone = generate(lvlm, lvlm.prepare([images[b]], [PROMPTS[b]]), mitigation=name, settings=settings,
                         max_new_tokens=4)
        n = alone.new_tokens.shape[1]
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b, :n]), (name, b)


def test_damro_outliers_are_the_whole_image_tiles_class_attention_per_token():
    """vsink's DAMRO rule for InternVL, written out from the model's own modules: the class
    token's single-head, full-width attention (queries and keys of the feature layer's block after
    its query/key norm) over the patches of each row's whole-image tile (the wide photo's
    thumbnail, tile 3; the square photo's only tile, tile 4), summed over the 2 × 2 patches of each
    pixel-shuffled token; the branch holds those tokens' projected features."""
    from vsink.mitigate.damro import outlier_patches, outlier_prompt

    lvlm = _tiny()
    inputs = lvlm.prepare([_photo((96, 32)), _photo((40, 40), 1)], PROMPTS)

    class Run:  # what the outlier rule reads of a generation call
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]

    Run.lvlm, Run.inputs = lvlm, inputs
    core = lvlm.model.model
    block = core.vision_tower.encoder.layer[-1]  # vision_feature_layer -1
    with torch.no_grad():  # larger queries and keys: the class token's attention far from uniform
        block.attention.q_proj.weight.mul_(40.0)
        block.attention.k_proj.weight.mul_(40.0)
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    whole = inputs["pixel_values"][[3, 4]]
    with torch.no_grad():
        features = core.get_image_features(pixel_values=inputs["pixel_values"])
        features = getattr(features, "pooler_output", features)[[3, 4]]  # [2, 4 tokens, D]
        core.vision_tower(pixel_values=whole)
        handle.remove()
        x = block.layernorm_before(seen["x"])
        attention = block.attention
        q, k = attention.q_norm(attention.q_proj(x)), attention.k_norm(attention.k_proj(x))
    cls = torch.softmax(q[:, :1] @ k.transpose(1, 2) / 32 ** 0.5, -1)[:, 0, 1:].reshape(2, 4, 4)
    expected = torch.stack([cls[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].sum((1, 2)) for r in range(2) for c in range(2)], 1)
    scores, top = outlier_patches(Run, 2)
    assert cls.max() > 0.3  # far from uniform (1/17): a wrong grouping of the patches would show
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.equal(top, expected.argsort(dim=1, descending=True)[:, :2])
    prompt = outlier_prompt(Run, 2)
    image = prompt["input_ids"] == lvlm.image_token_id
    assert (image.sum(1) == 2).all()
    picked = torch.stack([features[b, top[b]] for b in range(2)])
    assert torch.allclose(prompt["inputs_embeds"][image].reshape(2, 2, -1), picked, atol=1e-6)
    # the wide photo's three tiles take no part: replacing them changes nothing
    other = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    other["pixel_values"][:3] = torch.randn_like(other["pixel_values"][:3])
    Run.inputs = other
    assert torch.equal(outlier_patches(Run, 2)[1], top)


def test_vcd_noises_each_images_tiles_together():
    """One image's tiles get one draw of noise, as at batch size 1: the noised tiles of the wide
    image equal the noise of its 4 tiles drawn at once, not 4 draws from the same seed."""
    from vsink.mitigate.vcd import add_diffusion_noise, per_image

    lvlm = _tiny()
    inputs = lvlm.prepare([_photo((96, 32)), _photo((40, 40), 1)], PROMPTS)
    parts = per_image(inputs["pixel_values"], lvlm.pixel_counts(inputs))
    assert [p.shape[0] for p in parts] == [4, 1]
    once = add_diffusion_noise(parts[0], 500, torch.Generator().manual_seed(42))
    per_tile = torch.cat([add_diffusion_noise(t, 500, torch.Generator().manual_seed(42)) for t in parts[0].split(1)])
    assert not torch.allclose(once, per_tile)


def test_another_vision_feature_layer_runs_with_test_time_registers(tmp_path):
    """``vision_feature_layer`` -2: InternVL reads that layer's hidden state (not the final
    output); test-time registers appended on the tower are stripped from every hidden state, so
    the pixel shuffle still gets its square grid of patches."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5"):
        pytest.skip("transformers 4.x's InternVL reads a vision_feature_layer other than -1 from a "
                    "'vision_model' attribute it does not have (its own bug): only -1 runs there")
    lvlm = _tiny(vision_feature_layer=-2)
    inputs = lvlm.prepare([_photo((96, 32)), _photo((40, 40), 1)], PROMPTS)
    with torch.no_grad():
        ref = lvlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(generate(lvlm, inputs, max_new_tokens=4).sequences, ref)
    neurons = NeuronSpec("", [RegisterNeuron(layer=0, neuron=0, score=1.0)]).save(tmp_path / "neurons.json")
    result = generate(lvlm, inputs, mitigation="ttr", settings={"neurons": str(neurons), "registers": 2},
                      max_new_tokens=4)
    assert result.new_tokens.shape == (2, 4)


def test_view_box_is_the_whole_photo_its_processor_tiles():
    """By hand for the 300 × 200 photo (aspect 1.5) and 1 to 4 tiles of 32 × 32: 1 × 1, 2 × 1 and
    2 × 2 are 0.5 from its aspect; on a tie the larger grid wins while the photo's area (60000)
    exceeds half of the canvas, so 2 × 2. The photo is resized to 64 × 64 (no crop, no padding),
    cut into 4 tiles, and the whole photo resized to 32 × 32 is the thumbnail: every pixel is seen."""
    lvlm = _tiny()
    photo = margin_photo()
    assert lvlm.view_box(photo.size) == ViewBox.full(photo.size)
    inputs = lvlm.prepare([photo], ["describe"])
    tiles = inputs["pixel_values"]
    assert tiles.shape == (5, 3, 32, 32)
    ip = lvlm.processor.image_processor
    seen = [denormalised(t, ip) for t in tiles]
    mosaic = np.concatenate([np.concatenate(seen[0:2], axis=1), np.concatenate(seen[2:4], axis=1)], axis=0)
    for picture in (mosaic, seen[4]):
        assert close_to(photo, picture) < 8  # the whole photo is what the model got
        assert close_to(ViewBox(50, 0, 250, 200).crop(photo), picture) > 30  # a centre crop is not
        assert has_colour(picture, RED) and has_colour(picture, BLUE)


def test_vsink_models_lists_internvl_with_what_was_verified(capsys):
    assert main(["models"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "internvl InternVL: internvl (InternVLForConditionalGeneration, built-in" in out
    assert "tests/test_internvl.py); real weights not verified here" in out
    assert "InternVLVisionModel" in out

