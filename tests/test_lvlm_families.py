"""The newer LVLM families on tiny models built offline from their configs (random weights):
loaded from a saved directory by model type, ``vsink scan --prompt`` on them, the decoder's
attention through vsink equal to transformers' eager attention, probes leaving the logits unchanged.
``none`` = HF greedy ``generate``, image spans under left padding, every mitigation batched and
cached: tests/test_lvlm.py; every mitigation runs or is refused: tests/test_lvlm_registry.py.

A family whose class this transformers lacks (an older 4.x) is reported as such, by the family's
own one-line error, instead of failing.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vsink.backbones.hf_decoder import DecoderModel
from vsink.backbones.hf_lvlm import LVLM, load_lvlm
from vsink.backbones.lvlm_families import lvlm_families
from vsink.cli import main
from vsink.data.demo_lvlm import (build_tiny_gemma3, build_tiny_idefics3, build_tiny_internvl, build_tiny_llava_onevision,
                                  build_tiny_paligemma, build_tiny_qwen3_vl)
from vsink.errors import VsinkError
from vsink.lvlm.context import DecodeContext

from lvlm_models import decoder_attention_checked, marked

#: family → tiny builder
NEW = {"llava-onevision": build_tiny_llava_onevision, "paligemma": build_tiny_paligemma, "gemma3": build_tiny_gemma3,
       "internvl": build_tiny_internvl, "qwen3-vl": build_tiny_qwen3_vl, "idefics3": build_tiny_idefics3,
       "smolvlm": lambda: build_tiny_idefics3(smolvlm=True)}


def _tiny(family: str):
    why = lvlm_families()[family].unavailable()
    if why is not None:
        pytest.skip(why)  # absent from (or not followed in) this transformers: reported, not failed
    return NEW[family]()


def _images(n: int, size=(40, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("family", sorted(NEW))
def test_a_saved_tiny_model_loads_by_type_and_scans_with_a_prompt(family, tmp_path, capsys):
    model, processor = _tiny(family)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    lvlm = load_lvlm(str(tmp_path / "model"))
    assert lvlm.family == family
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(_images(2)):
        image.save(images / f"{i}.png")
    code = main(["scan", str(images), "--model", str(tmp_path / "model"), "--prompt", "describe the image",
                 "--out", str(tmp_path / "scan"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"({family} family)" in captured.err
    scan = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert len(scan["images"]) == 2


@pytest.mark.parametrize("family", sorted(NEW))
def test_decoder_attention_equals_eager_and_probes_change_nothing(family):
    model, processor = _tiny(family)
    lvlm, inputs, reference, probe = decoder_attention_checked(model, processor, _images(2))
    with torch.no_grad():
        probed = model(**inputs, use_cache=False).logits  # nothing left installed
    assert torch.equal(probed, reference.logits)
    layout = probe.trace().layout
    spans = lvlm.image_spans(inputs["input_ids"])
    assert layout.patch_slice == slice(spans.spans[0][0][0], spans.end(0))  # the row's image tokens, every span


def test_paligemma_prefix_is_bidirectional_and_sliding_windows_are_followed_during_generation():
    """PaliGemma 2 with a 16-token window: its sliding layers' cache drops keys during decoding.
    What vsink captures at every generated token equals transformers' eager attention of that
    token's row on the image tokens, in a left-padded batch; and in the prompt the image tokens
    attend to the text after them (the prefix is bidirectional)."""
    _tiny("paligemma")
    model, processor = build_tiny_paligemma(sliding_window=16)
    lvlm = LVLM(model, processor, "tiny")
    inputs = lvlm.prepare(_images(2), ["is there a cat ?", "describe this image please , what color is the sky ?"])
    assert int(inputs["attention_mask"][0].sum()) < inputs["input_ids"].shape[1] and inputs["input_ids"].shape[1] > 16
    from vsink.lvlm import generate

    result = generate(lvlm, inputs, max_new_tokens=3, capture_attention=True)
    with torch.no_grad():
        assert torch.equal(result.sequences, model.generate(**inputs, max_new_tokens=3, do_sample=False))
    spans = lvlm.image_spans(inputs["input_ids"])
    dropped = 0
    model.set_attn_implementation("eager")  # Gemma 2 runs eager anyway (no SDPA with soft-capping)
    for step in range(3):
        sequence = result.sequences[:, : inputs["input_ids"].shape[1] + step]
        extra = torch.ones(2, step, dtype=inputs["attention_mask"].dtype)
        with torch.no_grad():
            reference = model(input_ids=sequence, pixel_values=inputs["pixel_values"],
                              attention_mask=torch.cat([inputs["attention_mask"], extra], 1),
                              token_type_ids=torch.cat([inputs["token_type_ids"], extra.long()], 1),
                              output_attentions=True, use_cache=False).attentions
        for layer, attention in enumerate(reference):
            for b in range(2):
                expected = attention[b, :, -1, spans.positions(b)].mean(0)
                got = result.attention[step, b, layer]
                absent = got.isnan()  # keys the window dropped from the cache: the model gives them nothing
                dropped += int(absent.sum())
                assert bool((expected[absent] == 0).all())
                torch.testing.assert_close(got[~absent], expected[~absent], atol=1e-5, rtol=0)
    assert dropped > 0  # the window did drop image keys
    first_image, last_text = spans.positions(1)[0], inputs["input_ids"].shape[1] - 1
    assert bool((reference[0][1, :, first_image, last_text] > 0).all())  # a key after the query: bidirectional


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_generation_masks_have_the_models_bidirectional_blocks(family):
    """In a bound generation context every row computed by vsink (all rows here) equals eager
    attention only with the family's groups: without them the image tokens (Gemma 3) or the
    prefix (PaliGemma) would attend causally."""
    model, processor = _tiny(family)
    lvlm = LVLM(model, processor, "tiny")
    inputs = lvlm.prepare(_images(2), ["is there a cat ?", "describe this image please , what color is the sky ?"])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True, use_cache=False).attentions
    real = inputs["attention_mask"].bool()
    keep = real[:, None, :, None] & real[:, None, None, :]  # padded rows and columns are not compared
    upper = torch.ones(real.shape[1], real.shape[1], dtype=torch.bool).triu(1)
    assert bool((torch.where(keep & upper, reference[0], 0) > 0).any())  # keys after the query: not causal

    def captured(groups):
        decoder = DecoderModel(lvlm)
        context = DecodeContext(lvlm, inputs["input_ids"], inputs["attention_mask"], groups)
        got: dict[int, list[torch.Tensor]] = {}
        with decoder.bound(context):
            handles = [decoder.hook("attn_probs", layer, lambda p, s, z, layer=layer: got.setdefault(layer, []).append(p))
                       for layer in range(decoder.num_layers)]
            with torch.no_grad():
                model(**inputs, use_cache=False)
            for h in handles:
                h.remove()
        return [torch.cat(got[layer], dim=2) for layer in range(decoder.num_layers)]

    for ours, theirs in zip(captured(lvlm.attention_groups(inputs)), reference):
        torch.testing.assert_close(torch.where(keep, ours, 0), torch.where(keep, theirs, 0), atol=1e-5, rtol=0)
    causal = captured(None)[0]
    assert not torch.allclose(torch.where(keep, causal, 0), torch.where(keep, reference[0], 0), atol=1e-3)


def test_a_scan_of_a_row_with_several_image_runs_is_one_line():
    from vsink.data.demo_lvlm import build_tiny_llava

    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny")
    inputs = lvlm.prepare(_images(1, (32, 32)), ["describe the image"])
    ids = inputs["input_ids"].clone()
    image = lvlm.image_spans(ids).positions(0)
    ids[0, image[5]] = processor.tokenizer.convert_tokens_to_ids("the")  # one run cut in two
    with pytest.raises(VsinkError, match=r"^tiny#decoder: a prompt row holds 2 runs of image tokens; a scan's layout "):
        DecoderModel(lvlm).prompt_layout({**inputs, "input_ids": ids})


# --- Qwen3-VL: DeepStack and interleaved M-RoPE ----------------------------------------------------
@pytest.fixture(scope="module")
def qwen3():
    why = lvlm_families()["qwen3-vl"].unavailable()
    if why is not None:
        pytest.skip(why)
    model, processor = build_tiny_qwen3_vl()
    return LVLM(model, processor, "tiny-qwen3-vl")


def test_qwen3_vl_scan_reports_what_deepstack_adds_after_each_layer(qwen3, tmp_path, capsys):
    """The scan's DeepStack norms against the model's own pieces, read here without vsink: the
    injected features from ``get_image_features`` (its ``deepstack_features``), and the residual
    stream they are added to as layer i + 1's input minus that feature (a plain pre-hook)."""
    from vsink.lvlm.scan import scan_lvlm

    model = qwen3.model
    assert qwen3.deepstack_layers() == [0, 1] and qwen3.deepstack_tower_blocks() == [0, 1]
    images = _images(2, (32, 32))
    result = scan_lvlm(qwen3, images, "describe the image", progress=False)
    inputs = qwen3.prepare(images, ["describe the image"] * 2)
    inputs_of: dict[int, torch.Tensor] = {}
    hooks = [qwen3.layers[i + 1].register_forward_pre_hook(
        lambda m, args, kwargs, i=i: inputs_of.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True) for i in range(2)]
    with torch.no_grad():
        model(**inputs, use_cache=False)
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    # transformers 5: per level a tuple of per-image tensors; 4.x returns (embeddings, one tensor per level)
    levels = encoded.deepstack_features if hasattr(encoded, "deepstack_features") else encoded[1]
    features = [level if isinstance(level, torch.Tensor) else torch.cat(level) for level in levels]
    for h in hooks:
        h.remove()
    image = inputs["input_ids"] == qwen3.image_token_id
    summary = result.deepstack_summary()
    assert [row["layer"] for row in summary["layers"]] == [0, 1]
    assert [row["tower_block"] for row in summary["layers"]] == [0, 1]
    for i in range(2):
        injected = features[i].reshape(2, -1, qwen3.hidden_size)
        residual = inputs_of[i][image].reshape(2, -1, qwen3.hidden_size) - injected
        torch.testing.assert_close(torch.from_numpy(result.deepstack["deepstack_injected"][i]), injected.norm(dim=-1),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(result.deepstack["deepstack_residual"][i]), residual.norm(dim=-1),
                                   atol=1e-5, rtol=1e-5)
        assert summary["layers"][i]["injected_norm_mean"] == pytest.approx(float(injected.norm(dim=-1).mean()), rel=1e-5)
        assert float(injected.norm(dim=-1).min()) > 0  # the tiny model does inject
    result.save(tmp_path / "scan")
    written = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert written["lvlm"]["deepstack"]["layers"][1]["tower_block"] == 1
    assert len(written["per_image"][0]["deepstack_injected_norm"]) == 2
    assert np.load(tmp_path / "scan" / "trace.npz")["deepstack_injected"].shape == (2, 2, 16)
    report = (tmp_path / "scan" / "report.html").read_text()
    assert "<h2>DeepStack</h2>" in report and f"{summary['layers'][1]['injected_norm_mean']:.4g}" in report


def test_a_scan_of_a_family_without_deepstack_reports_none():
    from vsink.lvlm.scan import scan_lvlm

    model, processor = build_tiny_gemma3()
    result = scan_lvlm(LVLM(model, processor, "tiny"), _images(1, (32, 32)), "describe the image", progress=False)
    assert result.deepstack_summary() is None and result.to_json()["lvlm"]["deepstack"] is None


@pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")  # ratio 0 prunes nothing, on purpose
def test_qwen3_vl_fastv_before_the_last_deepstack_layer_injects_into_the_kept_tokens(qwen3):
    """FastV at k = 1 prunes before DeepStack's last injection (after layer 1): vsink then adds each
    level itself. Read with plain hooks installed before FastV's (so they see layer 1's output
    before the injection and layer 2's pruned input): the input of layer 2 is layer 1's output plus,
    at each kept image token, that token's own feature of level 1 (``get_image_features``), and
    nothing elsewhere. Ratio 0 (every token kept) gives none's tokens; a left-padded batch gives
    each row its tokens alone."""
    from vsink.lvlm import generate

    model = qwen3.model
    prompts = ["is there a cat ?", "describe this image please , what color is the sky ?"]
    images = _images(2, (32, 32))
    inputs = qwen3.prepare(images, prompts)
    seen: dict[str, torch.Tensor] = {}

    def output_of_1(module, args, out) -> None:
        seen.setdefault("out1", (out[0] if isinstance(out, tuple) else out).clone())  # the prompt pass

    def input_of_2(module, args, kwargs) -> None:
        seen.setdefault("in2", (args[0] if args else kwargs["hidden_states"]).clone())

    hooks = [qwen3.layers[1].register_forward_hook(output_of_1),
             qwen3.layers[2].register_forward_pre_hook(input_of_2, with_kwargs=True)]
    try:
        result = generate(qwen3, inputs, mitigation="fastv", settings={"k": 1, "ratio": 0.5}, max_new_tokens=3)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    levels = encoded.deepstack_features if hasattr(encoded, "deepstack_features") else encoded[1]
    level1 = (levels[1] if isinstance(levels[1], torch.Tensor) else torch.cat(levels[1])).reshape(2, -1, qwen3.hidden_size)
    kept = result.kept  # prompt positions kept from layer 1 on
    assert seen["in2"].shape[1] == kept.shape[1] < inputs["input_ids"].shape[1]
    image = inputs["input_ids"] == qwen3.image_token_id
    expected = seen["out1"].clone()
    for b in range(2):
        first = int(image[b].nonzero()[0])
        for j, position in enumerate(kept[b].tolist()):
            if image[b, position]:
                expected[b, j] += level1[b, position - first]
    torch.testing.assert_close(seen["in2"], expected, atol=1e-6, rtol=0)
    none = generate(qwen3, inputs, max_new_tokens=3)
    assert torch.equal(generate(qwen3, inputs, mitigation="fastv", settings={"k": 1, "ratio": 0.0},
                                max_new_tokens=3).new_tokens, none.new_tokens)
    for b in range(2):
        alone = generate(qwen3, qwen3.prepare([images[b]], [prompts[b]]), mitigation="fastv",
                         settings={"k": 1, "ratio": 0.5}, max_new_tokens=3)
        assert torch.equal(alone.new_tokens[0], result.new_tokens[b]), b


def test_qwen3_vl_positions_are_those_of_the_models_own_generation(qwen3):
    """The M-RoPE (interleaved) position ids vsink gives branches (prompt, then each step) equal the
    ones transformers' ``generate`` passes to the language model, read by a plain pre-hook, on the
    real tokens of a left-padded batch. The prompts wrap the image as Qwen's chat template does
    (transformers 4.x finds images for M-RoPE by the vision-start token)."""
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    inputs = qwen3.prepare(_images(2, (48, 32)), [f"{image} is there a cat ?",
                                                  f"{image} describe this image please , what color is the sky ?"])
    seen: list[torch.Tensor] = []
    hook = qwen3.model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["position_ids"][-3:].clone()), with_kwargs=True)
    with torch.no_grad():
        out = qwen3.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hook.remove()
    positions, offset = qwen3.prompt_positions(inputs)
    real = inputs["attention_mask"].bool()
    assert torch.equal(positions[:, real], seen[0][:, real])
    assert int(positions[1:, real].ne(positions[0, real]).sum()) > 0  # height and width differ on the image
    mask = inputs["attention_mask"]
    for step in (1, 2):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        assert torch.equal(qwen3.step_positions(mask, offset), seen[step]), step
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_qwen3_vl_opera_without_penalty_is_hf_beam_search(qwen3):
    """OPERA's own beam loop with penalty 0 and every token a candidate equals transformers' beam
    search per row: its prompt pass runs once for a prompt's beams and takes the first copy of
    every encoded image tensor, each DeepStack level's included."""
    from vsink.lvlm import generate

    images = _images(2, (32, 32))
    # the images marked as Qwen's chat template marks them: transformers 4.x's beam search counts
    # a row's images by the marks
    prompts = marked(qwen3, ["is there a cat ?", "describe this image please , what color is the sky ?"])
    plain = {"beams": 3, "candidates": None, "penalty": 0, "threshold": 10_000}
    ours = generate(qwen3, qwen3.prepare(images, prompts), mitigation="opera", settings=plain, max_new_tokens=4)
    for b in range(2):
        one = qwen3.prepare([images[b]], [prompts[b]])
        with torch.no_grad():
            ref = qwen3.model.generate(**one, max_new_tokens=4, num_beams=3, do_sample=False)
        assert torch.equal(ours.new_tokens[b], ref[0, one["input_ids"].shape[1]:]), b


def test_vsink_models_lists_qwen3_vl_with_what_was_verified(capsys):
    assert main(["models"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "qwen3-vl Qwen3-VL: qwen3_vl (Qwen3VLForConditionalGeneration, built-in" in out
    assert "tiny offline models with DeepStack" in out and "real weights not verified here" in out


def test_qwen3_vl_tower_attention_equals_the_librarys_eager_and_probes_change_nothing(qwen3):
    """Each image's tower attention captured through vsink's sites equals the probabilities of
    transformers' own eager function (recorded through its public AttentionInterface), block by
    block and image by image; the logits agree with probes on and are bit-identical after."""
    from transformers import AttentionInterface
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    model = qwen3.model
    inputs = qwen3.prepare(_images(2, (48, 32)), ["is there a cat ?", "describe this image please , what color is the sky ?"])
    recorded: list[torch.Tensor] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = modeling_qwen3_vl.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        recorded.append(weights.clone())
        return out, weights

    AttentionInterface.register("test_recording_eager", recording)
    before = model.config.vision_config._attn_implementation
    model.set_attn_implementation({"vision_config": "test_recording_eager"})
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        model.set_attn_implementation({"vision_config": before})
    with torch.no_grad():
        plain = model(**inputs, use_cache=False).logits
    tower = qwen3.tower_sites()
    captured: list[tuple[int, torch.Tensor]] = []
    handles = [tower.hook("attn_probs", layer, lambda p, s, z, layer=layer: captured.append((layer, p.clone())))
               for layer in range(tower.num_layers)]
    with torch.no_grad():
        probed = model(**inputs, use_cache=False).logits
    for h in handles:
        h.remove()
    blocks = len(model.config.vision_config.deepstack_visual_indexes) + 1
    assert len(recorded) == len(captured) == 2 * blocks  # one call per block and image
    assert [layer for layer, _ in captured] == [b for b in range(blocks) for _ in range(2)]
    assert [p.shape[-1] for _, p in captured[:2]] == [int(g.prod()) for g in inputs["image_grid_thw"]]
    for (_, ours), theirs in zip(captured, recorded):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(**inputs, use_cache=False).logits, plain)  # nothing left installed
    with pytest.raises(VsinkError, match=r"^tiny-qwen3-vl#vision_tower: only the attention sites "):
        tower.hook("block_output", 0, lambda h: None)


@pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")  # random weights: VAR may find no row
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_split_images_are_one_span_per_square_between_their_row_and_column_tokens(family):
    """Tiles of 32 px, images resized to a longest edge of 64: a 48×40 image becomes 64×64 (2×2
    sub-images), an 80×40 one 64×32 (1×2); each square gives (32 / 8 / 2)² = 4 image tokens after
    the pixel shuffle, introduced by ``<fake_token_around_image><row_i_col_j>`` and the global image
    last by ``<fake_token_around_image><global-img>``. In a left-padded batch of both (5 and 3
    squares: the second row's pixel tensor padded with two zero images) every row's tokens are
    those it gets alone — none, VAR, PAI, VCD, M3ID, VAF, OPERA (OPERA runs row by row: each row's
    slice keeps the padding images, which the model drops) — and ``none`` is HF greedy ``generate``."""
    from vsink.lvlm import generate
    from vsink.mitigate import mitigation_registry
    from vsink.viewbox import ViewBox

    model, processor = _tiny(family)
    lvlm = LVLM(model, processor, "tiny")
    images = [_images(1, (48, 40))[0], _images(1, (80, 40))[0]]
    prompts = ["is there a cat ?", "describe this image please , what color is the sky ?"]
    inputs = lvlm.prepare(images, prompts)
    spans = lvlm.image_spans(inputs["input_ids"])
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in inputs["input_ids"].tolist()]
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    assert pads[0] == 0 and pads[1] > 0  # the first row's two more squares outweigh the second's longer prompt
    for b, grid in enumerate([(2, 2), (1, 2)]):
        runs = spans.spans[b]
        heads = [f"<row_{i + 1}_col_{j + 1}>" for i in range(grid[0]) for j in range(grid[1])] + ["<global-img>"]
        assert len(runs) == len(heads) and all(e - s == 4 for s, e in runs)
        for (s, e), head in zip(runs, heads):
            assert tokens[b][s - 2:s] == ["<fake_token_around_image>", head]
        assert tokens[b][runs[-1][1]] == "<fake_token_around_image>"
        assert lvlm.image_grid(inputs, b, 4) == (2, 2) and lvlm.image_grid(inputs, b, 4 * len(runs)) == (1, 4 * len(runs))
    assert [row[0][0] for row in spans.spans] == [pad + 3 for pad in pads]  # padding, BOS, the square's two tokens
    assert tuple(inputs["pixel_values"].shape) == (2, 5, 3, 32, 32)
    assert bool((inputs["pixel_values"][1, 3:] == 0).all()) and not bool((inputs["pixel_values"][1, :3] == 0).all())
    assert lvlm.view_box(images[0].size) == ViewBox.full(images[0].size)  # resized whole, never cropped
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(generate(lvlm, inputs, max_new_tokens=4).sequences, reference)
    for name, settings in [("none", {}), ("var", {"sink_dims": [3, 7], "tau": 2.5}), ("pai", {"alpha": 0.5}),
                           ("vcd", {}), ("m3id", {}), ("vaf", {}), ("opera", {})]:
        registered = mitigation_registry().get(name)  # none is no registered mitigation
        missing = registered.unavailable() if registered is not None else None  # libraries it lacks: its one line
        if missing is not None:
            with pytest.raises(VsinkError, match=f"^{re.escape(missing)}$"):
                generate(lvlm, inputs, mitigation=name, settings=settings, max_new_tokens=4)
            continue
        batch = generate(lvlm, inputs, mitigation=name, settings=settings, max_new_tokens=4)
        for b in range(2):
            alone = generate(lvlm, lvlm.prepare([images[b]], [prompts[b]]), mitigation=name, settings=settings,
                             max_new_tokens=4)
            n = alone.new_tokens.shape[1]
            assert torch.equal(alone.new_tokens[0], batch.new_tokens[b, :n]), (name, b)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_tower_attention_equals_eager_and_probes_change_nothing(family):
    """The SigLIP tower (no class token: a 4×4 grid of patches per 32-px square) as a vsink vision
    backbone: the attention it captures — on the squares alone, and inside the LVLM's forward on
    the split image's squares with their patch mask — equals transformers' eager attention to 1e-5,
    and the model's outputs are unchanged while it is captured."""
    from conftest import capture_probs, sharpen
    from vsink.probe import Probe

    model, processor = _tiny(family)
    tower_module = model.model.vision_model
    sharpen(tower_module)  # attention far from uniform, so a misplaced index cannot hide
    model.set_attn_implementation("eager")
    lvlm = LVLM(model, processor, "tiny")
    tower = lvlm.vision_backbone()
    assert tower.layout().num_cls == 0 and tower.layout().grid == (4, 4)
    inputs = lvlm.prepare(_images(2, (48, 40)), ["describe the image"] * 2)
    squares = inputs["pixel_values"].flatten(0, 1)  # 2 images × (2×2 sub-images + global), none padded
    with torch.no_grad():
        reference = tower_module(pixel_values=squares, output_attentions=True)
        logits = model(**inputs, use_cache=False).logits
    out, probs = capture_probs(tower, squares)
    for got, expected in zip(probs, reference.attentions):
        assert got.shape == expected.shape == (10, 2, 16, 16)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert expected.max() > 0.3
    torch.testing.assert_close(out, reference.last_hidden_state, atol=1e-5, rtol=0)
    captured: dict[int, torch.Tensor] = {}
    handles = [tower.hook("attn_probs", layer, lambda p, s, z, layer=layer: captured.setdefault(layer, p.clone()))
               for layer in range(tower.num_layers)]
    with torch.no_grad():
        probed = model(**inputs, use_cache=False).logits
    for h in handles:
        h.remove()
    for layer, expected in enumerate(reference.attentions):
        torch.testing.assert_close(captured[layer], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(probed, logits, atol=1e-5, rtol=0)
    with Probe(tower) as probe, torch.no_grad():
        assert torch.equal(model(**inputs, use_cache=False).logits, logits)
    assert probe.trace().layout.num_cls == 0


def test_smolvlm_without_num2words_is_one_line(monkeypatch):
    import importlib.util

    cls = lvlm_families()["smolvlm"]
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "num2words" else found(name, *a))
    assert cls.unavailable() == ("the smolvlm family needs the num2words package, which transformers' "
                                 "SmolVLMProcessor imports: pip install num2words")
    assert lvlm_families()["idefics3"].unavailable() is None


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_appended_tokens_on_the_tower_follow_its_patch_mask(family):
    """Test-time registers append a token the tower's padding mask does not cover (transformers
    4.x passes a 4-D mask even without padding): with the right patch column masked, no query —
    the appended one included — attends to a masked patch, and every query attends to the
    appended token; the outputs of the real patches stay finite."""
    model, processor = _tiny(family)
    tower = LVLM(model, processor, "tiny").vision_backbone()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    patches = torch.ones(2, 4, 4, dtype=torch.bool)
    patches[:, :, 3] = False  # the image's right quarter is padding
    got: dict[int, torch.Tensor] = {}
    handles = [tower.append_tokens(1)] + [
        tower.hook("attn_probs", layer, lambda p, s, z, layer=layer: got.setdefault(layer, p.clone()))
        for layer in range(tower.num_layers)]
    try:
        with torch.no_grad():
            out = model.model.vision_model(pixel_values=x, patch_attention_mask=patches).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    masked = [row * 4 + 3 for row in range(4)]
    for probs in got.values():
        assert probs.shape == (2, 2, 17, 17)
        assert bool((probs[..., masked] == 0).all())
        assert bool((probs[..., 16] > 0).all())
    assert bool(out.isfinite().all()) and tower.layout().num_appended == 0


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_a_squares_image_tokens_are_its_patch_grid_pixel_shuffled_row_major(family):
    """What ``image_grid``'s side × side means, by hand: the connector's pixel shuffle (scale 2) of
    a 4×4 patch grid whose features are the patch numbers puts the 2×2 patch block at rows 2r, 2r+1
    and columns 2c, 2c+1 into image token r·2 + c."""
    model, processor = _tiny(family)
    lvlm = LVLM(model, processor, "tiny")
    side = lvlm.square_side()
    assert side == 2 and lvlm.image_grid({}, 0, 4) == (2, 2)
    patches = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1).repeat(1, 1, 8)  # feature = patch number
    shuffled = model.model.connector.pixel_shuffle(patches, 2)  # [1, 4, 8 · 4]
    for r in range(side):
        for c in range(side):
            block = {(2 * r + i) * 4 + 2 * c + j for i in range(2) for j in range(2)}
            assert set(shuffled[0, r * side + c].tolist()) == block


def _onevision(most_tiles: int = 9) -> LVLM:
    """The tiny LLaVA-OneVision (32-pixel tiles of 8-pixel patches: a 4 × 4 base view; pinpoints
    1×1 to 2×2 tiles) with ``anyres_max_<most_tiles>`` on the model and its processor."""
    model, processor = _tiny("llava-onevision")
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = f"anyres_max_{most_tiles}"
    return LVLM(model, processor, "tiny")


def _image_features(lvlm: LVLM, inputs: dict) -> torch.Tensor:
    """transformers' own image features of the first image, in the order they fill its image tokens."""
    config = lvlm.model.config
    with torch.no_grad():
        out = lvlm.model.model.get_image_features(inputs["pixel_values"][:1], inputs["image_sizes"][:1],
                                                  vision_feature_layer=config.vision_feature_layer,
                                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                                  vision_aspect_ratio=config.vision_aspect_ratio)
    features = getattr(out, "pooler_output", out)  # transformers 5: an output object; 4.x: the list
    return features[0]


# A 48 × 40 (width × height) image on the tiny model. Base view: the image resized to one 32-pixel
# tile, (32 / 8)² = 16 tokens, a 4 × 4 grid. Tiled view: of the pinpoints (h, w) 32×32, 32×64,
# 64×32, 64×64 only 64×64 holds the image at full resolution (scale min(64/48, 64/40) = 4/3 keeps
# all 1920 pixels; the others shrink it), so 2 × 2 tiles, an 8 × 8 patch map. The image is wider
# than that map (48/40 > 8/8): resized to width 8 its height is round(40 · 8/48) = 6 (6.67
# truncated), so (8 - 6) // 2 = 1 padding row is cut at the top and at the bottom: 6 × 8 features.
# anyres_max_9: sqrt(6 · 8 / (9 · 16)) = 0.58 <= 1.1, no pooling. One newline per row: a 6 × 9
# grid, 54 tokens. anyres_max_1: sqrt(48 / 16) = 1.73 > 1.1, pooled to int(6 // 1.73) = 3 by
# int(8 // 1.73) = 4, plus the newline column: a 3 × 5 grid, 15 tokens.
@pytest.mark.parametrize("most_tiles, tiled", [(9, (6, 9)), (1, (3, 5))])
def test_onevision_spans_are_the_base_view_then_the_tiled_view(most_tiles, tiled):
    lvlm = _onevision(most_tiles)
    inputs = lvlm.prepare(_images(1, (48, 40)), ["describe the image"])
    ids = inputs["input_ids"][0]
    image = (ids == lvlm.image_token_id).nonzero().flatten().tolist()
    start = image[0]
    assert image == list(range(start, start + 16 + tiled[0] * tiled[1]))  # the processor's count, one run
    spans = lvlm.image_spans(inputs["input_ids"])
    assert spans.spans == (((start, start + 16), (start + 16, start + 16 + tiled[0] * tiled[1])),)
    assert lvlm.view_grids(inputs, 0) == [(4, 4), tiled]
    assert [lvlm.image_grid(inputs, 0, e - s) for s, e in spans.spans[0]] == [(4, 4), tiled]
    assert lvlm.span_grids(inputs, 0, spans) == [(4, 4), tiled]
    assert lvlm.image_grid(inputs, 0, len(image)) == (1, len(image))  # both views: no rectangle
    # transformers' own features: the base view, then the tiled view whose last column is the newline
    features = _image_features(lvlm, inputs)
    assert features.shape[0] == len(image)
    grid = features[16:].reshape(*tiled, -1)
    newline = lvlm.model.model.image_newline.to(features.dtype)
    is_newline = (grid == newline).all(-1)
    assert is_newline[:, -1].all() and not is_newline[:, :-1].any()
    assert not (features[:16] == newline).all(-1).any()


def test_onevision_spans_of_a_left_padded_batch_are_each_rows_alone_shifted_by_its_padding():
    lvlm = _onevision()
    images, prompts = _images(1, (48, 40)) + _images(1, (40, 90)), ["describe the image", "is it a cat ?"]
    inputs = lvlm.prepare(images, prompts)
    spans = lvlm.image_spans(inputs["input_ids"])
    pad = (inputs["attention_mask"] == 0).sum(1).tolist()
    assert sorted(pad)[0] == 0 and max(pad) > 0
    for b in range(2):
        alone = lvlm.prepare(images[b:b + 1], prompts[b:b + 1])
        row = lvlm.image_spans(alone["input_ids"]).spans[0]
        assert len(row) == 2
        assert spans.spans[b] == tuple((s + pad[b], e + pad[b]) for s, e in row)
        assert lvlm.view_grids(inputs, b) == lvlm.view_grids(alone, 0)
        assert [lvlm.image_grid(inputs, b, e - s) for s, e in spans.spans[b]] == lvlm.view_grids(inputs, b)
        assert lvlm.span_grids(inputs, b, spans) == lvlm.view_grids(inputs, b)
