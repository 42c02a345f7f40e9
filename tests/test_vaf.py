"""VAF / ClearSight: the pre-softmax scores of rows after the image scaled column-wise (image keys ×
enhance, system keys × suppress) in the layer window, checked by hand against the unedited logits;
scale 1 equals none; batches with left padding, with and without the cache; vaf+fastv composes."""

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from PIL import Image

from vsink.backbones.hf_decoder import decoder_of
from vsink.data.demo_lvlm import build_tiny_llava, build_tiny_llava_next, build_tiny_qwen2_vl
from vsink.lvlm import LVLM, generate
from vsink.lvlm.context import DecodeContext
from vsink.mitigate import FastV, FastVSettings, Run, VAF, VAFSettings
from vsink.mitigate.vaf import layer_window
from vsink.options import OptionError

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")
PROMPTS = ["is there a cat ?", "describe this image please , what color is the sky ?"]


def _image(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


BUILDERS = {"llava": build_tiny_llava, "llava_next": build_tiny_llava_next, "qwen2_vl": build_tiny_qwen2_vl,
            "qwen2_5_vl": lambda: build_tiny_qwen2_vl(version="2.5")}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def lvlm(request):
    model, processor = BUILDERS[request.param]()
    return LVLM(model, processor, f"tiny-{request.param}")


def test_layer_window_is_the_7b_window_scaled_to_depth():
    assert layer_window(32) == (9, 15)  # the released window, LLaVA-1.5-7B
    assert layer_window(40) == (11, 19)  # 13B: round(9·40/32) = 11, round(15·40/32) = 19
    assert layer_window(4) == (1, 2)  # at least one layer
    assert layer_window(4, 0, 3) == (0, 3)
    with pytest.raises(OptionError, match="end_layer"):
        VAFSettings(start_layer=3, end_layer=2)


def _logits_after_edits(lvlm, inputs, mitigations, layer):
    """The logits of ``layer`` as the softmax sees them (mask added, edits applied), per query row."""
    decoder = decoder_of(lvlm)
    seen = []

    def grab(probs, q_start, logits):
        seen.append(logits.clone())

    ctx = DecodeContext(lvlm, inputs["input_ids"], inputs["attention_mask"])
    run = Run(lvlm, decoder, ctx, inputs["input_ids"], inputs["attention_mask"], inputs=inputs)
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(decoder.bound(ctx))
        for m in mitigations:
            stack.enter_context(m.installed(run))
        handle = decoder.hook("attn_probs", layer, grab)
        stack.callback(handle.remove)
        lvlm.model(**inputs, position_ids=lvlm.prompt_positions(inputs)[0])  # generate's positions
    return torch.cat(seen, dim=2), ctx


def test_scores_are_scaled_column_wise_in_rows_after_the_image(lvlm):
    inputs = lvlm.prepare([_image(), _image(1)], PROMPTS)
    vaf = VAF(VAFSettings(enhance=1.5, suppress=0.5, start_layer=1, end_layer=3))
    plain, ctx = _logits_after_edits(lvlm, inputs, [], 1)
    edited, _ = _logits_after_edits(lvlm, inputs, [vaf], 1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b in range(2):
        image = ids[b] == lvlm.image_token_id
        first_image = int(image.nonzero()[0])
        end_image = int(image.nonzero()[-1]) + 1
        for row in range(ids.shape[1]):
            for col in range(row + 1):
                if not mask[b, col]:
                    continue
                factor = 1.0
                if row >= end_image:  # by hand: image columns × 1.5, real columns before the image × 0.5
                    factor = 1.5 if image[col] else (0.5 if col < first_image else 1.0)
                want = plain[b, :, row, col] * factor
                assert torch.allclose(edited[b, :, row, col], want, atol=1e-5), (b, row, col)
    assert vaf.stats[1]["rows_scaled"] > 0 and vaf.stats[2]["rows_scaled"] > 0 and 3 not in vaf.stats


@pytest.mark.parametrize("use_cache", [True, False])
def test_scale_one_equals_none_and_batches_equal_single_rows(lvlm, use_cache):
    images = [_image(), _image(1)]
    inputs = lvlm.prepare(images, PROMPTS)
    none = generate(lvlm, inputs, max_new_tokens=4, use_cache=use_cache)
    one = generate(lvlm, inputs, mitigation="vaf", settings={"enhance": 1.0, "suppress": 1.0}, max_new_tokens=4,
                   use_cache=use_cache)
    assert torch.equal(one.new_tokens, none.new_tokens)
    strong = {"enhance": 3.0, "suppress": 0.2, "start_layer": 0, "end_layer": 4}
    batch = generate(lvlm, inputs, mitigation="vaf", settings=strong, max_new_tokens=4, use_cache=use_cache)
    for b in range(2):
        alone = generate(lvlm, lvlm.prepare([images[b]], [PROMPTS[b]]), mitigation="vaf", settings=strong,
                         max_new_tokens=4, use_cache=use_cache)
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b, :alone.new_tokens.shape[1]])


def test_vaf_plus_fastv_applies_both_edits():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny-llava")
    inputs = lvlm.prepare([_image(), _image(1)], PROMPTS)
    vaf = VAF(VAFSettings(enhance=1.5, suppress=0.5, start_layer=3, end_layer=4))  # layer 3 only: its input is unedited
    fastv = FastV(FastVSettings(k=2, ratio=0.5))
    edited, ctx = _logits_after_edits(lvlm, inputs, [fastv, vaf], 3)
    plain, _ = _logits_after_edits(lvlm, inputs, [FastV(FastVSettings(k=2, ratio=0.5))], 3)
    # FastV pruned half the image keys from layer 2 on; on the kept keys VAF's factors apply
    assert edited.shape[-1] == plain.shape[-1] < inputs["input_ids"].shape[1]
    kpos = ctx.kept
    ids = inputs["input_ids"]
    for b in range(2):
        image = (ids[b] == lvlm.image_token_id)[kpos[b]]
        real = inputs["attention_mask"][b].bool()[kpos[b]]
        first = int((ids[b] == lvlm.image_token_id).nonzero()[0])
        system = real & (kpos[b] < first) & ~image
        last = edited.shape[2] - 1  # the last prompt row is after the image
        factor = torch.ones(len(kpos[b])).masked_fill(image, 1.5).masked_fill(system, 0.5)
        assert torch.allclose(edited[b, :, last], plain[b, :, last] * factor, atol=1e-5)
    out = generate(lvlm, inputs, mitigation="vaf+fastv", max_new_tokens=2)
    assert [r["mitigation"] for r in out.report] == ["vaf", "fastv"]
