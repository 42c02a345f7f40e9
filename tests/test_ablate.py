"""Causal ablations (vsink/ablate.py, `vsink ablate`): planted answers on the demo, hand-computed
replacements on a tiny case, identity of an empty ablation, the command and its report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.ablate import (INTERVAL_MEASURES, Selection, ablate, derangement, image_units, interval_statistic,
                          replacement, run_pass)
from vsink.evaluate.stats import Bootstrap, bootstrap, interval_dict
from vsink.cli import main
from vsink.data import demo_model as D
from vsink.data.demo_images import demo_images
from vsink.images import load_batch
from vsink.detect.norms import detect_high_norm, flag_at_reference
from vsink.layout import TokenLayout
from vsink.probe import Trace
from vsink.registers import NeuronSpec, RegisterNeuron

LAST = 5  # the demo's last block
#: a non-planted MLP unit may move the planted high-norm tokens' final norms by at most this fraction
NON_PLANTED_BOUND = 0.01


@pytest.fixture(scope="module")
def demo():
    backbone = vsink.load("demo")
    images, _, _ = load_batch(demo_images())
    return backbone, [backbone.preprocess(images, backbone.img_size)]


def _final_norms(backbone, batches, ablation=None):
    """Final-block token norms by the test's own capture (not the measures under test)."""
    out = run_pass(backbone, batches, capture=[("block_output", LAST)], ablation=ablation)
    return out.sites[("block_output", LAST)].norm(dim=-1)


def _neurons(backbone, batches, units):
    layout = backbone.layout()
    tokens = np.ones((batches[0].shape[0], layout.num_tokens), dtype=bool)
    return (Selection("neurons", D.PLANTED_BLOCK, "mlp_hidden", tokens, list(units)),
            torch.zeros(tokens.shape[0], layout.num_tokens, len(units)))


def test_zeroing_the_planted_neurons_removes_the_high_norm_tokens(demo):
    backbone, batches = demo
    layout = backbone.layout()
    before = _final_norms(backbone, batches)[:, layout.patch_slice]
    high = before > 5 * before.median()  # the planted write makes flat patches ~10x the median
    assert high.sum() >= 10
    after = _final_norms(backbone, batches, _neurons(backbone, batches, D.PLANTED_NEURONS))[:, layout.patch_slice]
    assert (after[high] / after.median()).max() < 1.0  # every former high-norm token is now below the median


def test_a_non_planted_neuron_changes_the_high_norm_tokens_by_less_than_the_bound(demo):
    backbone, batches = demo
    layout = backbone.layout()
    before = _final_norms(backbone, batches)[:, layout.patch_slice]
    high = before > 5 * before.median()
    for unit in (4, 10, 100):
        after = _final_norms(backbone, batches, _neurons(backbone, batches, [unit]))[:, layout.patch_slice]
        assert ((after - before).abs() / before)[high].max() < NON_PLANTED_BOUND


def test_the_api_reports_the_planted_neurons_removing_the_detected_tokens(demo):
    backbone, _ = demo
    spec = {D.PLANTED_BLOCK: list(D.PLANTED_NEURONS)}
    result = ablate(backbone, demo_images(), targets=["neurons", "high-norm"], ablations=["zero"], neurons=spec,
                    layers=[D.PLANTED_BLOCK], progress=False)
    rows = {r.target: r for r in result.rows}
    assert rows["neurons"].channels == list(D.PLANTED_NEURONS)
    assert rows["neurons"].high_norm_before > 0 and rows["neurons"].high_norm_after == 0
    assert rows["high-norm"].tokens == rows["high-norm"].high_norm_before  # detected at block 2, still at the last
    assert rows["high-norm"].high_norm_after == 0
    assert rows["neurons"].cos_patches < 0.99 and rows["neurons"].attn_tv > 0.1


def test_zero_ablation_of_nothing_is_the_identity_bit_for_bit(demo):
    backbone, batches = demo
    layout = backbone.layout()
    clean = run_pass(backbone, batches)
    nothing = np.zeros((2, layout.num_tokens), dtype=bool)
    for selection in (Selection("high-norm", 2, "block_output", nothing),
                      Selection("massive", 3, "block_output", nothing, [5, 7]),
                      Selection("neurons", 2, "mlp_hidden", ~nothing, [])):
        width = len(selection.channels) if selection.channels is not None else backbone.embed_dim
        ablated = run_pass(backbone, batches, ablation=(selection, torch.zeros(2, layout.num_tokens, width)))
        assert torch.equal(ablated.features, clean.features)
        assert np.array_equal(ablated.trace.attn_cls, clean.trace.attn_cls)


def test_replacements_by_hand_on_a_tiny_case():
    layout = TokenLayout(num_cls=1, num_registers=1, grid=(1, 2))  # tokens: cls, register, patch, patch
    clean = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)  # value = 8 i + 2 t + c
    tokens = np.zeros((3, 4), dtype=bool)
    tokens[0, 2] = tokens[1, 3] = True
    sel = Selection("high-norm", 0, "block_output", tokens)
    # mean over images at the same position: mean_i (8 i + 2 t + c) = 8 + 2 t + c
    expected = torch.tensor([[8 + 2 * t + c for c in range(2)] for t in range(4)], dtype=torch.float32)
    assert torch.equal(replacement(sel, "mean-images", clean, layout), expected.expand(3, 4, 2))
    # mean over the patches the target does not select: (0,3) (1,2) (2,2) (2,3) -> 6, 12, 20, 22 (+c)
    patch = torch.tensor([(6 + 12 + 20 + 22) / 4 + c for c in range(2)])
    cls = torch.tensor([8.0 + c for c in range(2)])    # all cls tokens: (0 + 8 + 16) / 3
    reg = torch.tensor([10.0 + c for c in range(2)])  # all registers
    got = replacement(sel, "mean-kind", clean, layout)
    assert torch.allclose(got[:, 2], patch.expand(3, 2)) and torch.allclose(got[:, 3], patch.expand(3, 2))
    assert torch.allclose(got[:, 0], cls.expand(3, 2)) and torch.allclose(got[:, 1], reg.expand(3, 2))
    perm = derangement(3, seed=7)
    assert sorted(perm.tolist()) == [0, 1, 2] and not np.any(perm == np.arange(3))
    assert np.array_equal(perm, derangement(3, seed=7))
    assert torch.equal(replacement(sel, "resample", clean, layout, seed=7), clean[torch.as_tensor(perm)])
    assert torch.equal(replacement(sel, "zero", clean, layout), torch.zeros(3, 4, 2))
    channel = Selection("massive", 0, "block_output", tokens, [1])
    assert torch.equal(replacement(channel, "mean-images", clean, layout), expected[:, [1]].expand(3, 4, 1))


def test_installed_ablation_replaces_exactly_the_selected_entries(demo):
    backbone, batches = demo
    layout = backbone.layout()
    site = ("block_output", 1)
    clean = run_pass(backbone, batches, capture=[site]).sites[site]
    tokens = np.zeros((2, layout.num_tokens), dtype=bool)
    tokens[0, [0, 5, 9]] = True
    tokens[1, [3]] = True
    for channels in (None, [0, 17]):
        sel = Selection("massive", 1, "block_output", tokens, channels)
        values = replacement(sel, "resample", clean, layout, seed=1)
        got = run_pass(backbone, [batches[0][:1], batches[0][1:]], capture=[site], ablation=(sel, values)).sites[site]
        ch = list(range(clean.shape[-1])) if channels is None else channels
        expected = clean.clone()
        mask = torch.as_tensor(tokens)
        expected[:, :, ch] = torch.where(mask[..., None], clean[[1, 0]][:, :, ch], clean[:, :, ch])
        assert torch.equal(got, expected)


def test_interval_units_and_statistic_by_hand():
    """Two images of the demo layout (1 class token, 196 patches): per-token cosines 0.8 / 0.5 on
    image 0 and 1.0 / 0.9 on image 1, last-block TV 0.2 / 0.4, output cosine 1 / 0.5, 3 / 0
    high-norm tokens left. Point estimates: means over the images (0.9, 0.7, 0.3, 0.75) and the
    total 3. With 2 units each extreme resample (both draws the same image) has probability 1/4,
    more than the 2.5 % tail, so the 95 % interval runs from one image's value to the other's
    (for the total: 0 to 2·3 = 6)."""
    layout = vsink.load("demo").layout()
    cos = torch.empty(2, layout.num_tokens)
    cos[0], cos[1] = 0.5, 0.9
    cos[0, layout.cls_token], cos[1, layout.cls_token] = 0.8, 1.0
    units = image_units(cos, layout, np.array([0.2, 0.4]), torch.tensor([1.0, 0.5]), np.array([3, 0]))
    assert units.shape == (2, 10) and units[0, 6] == layout.num_patches == 196 and units[0, 4] == 0
    iv = interval_dict(bootstrap(units, interval_statistic, Bootstrap(0.95, 1000, 0)), INTERVAL_MEASURES)
    expected = {"cos_cls": (0.9, 0.8, 1.0), "cos_patches": (0.7, 0.5, 0.9), "attn_tv": (0.3, 0.2, 0.4),
                "output_cos": (0.75, 0.5, 1.0), "high_norm_after": (3.0, 0.0, 6.0)}
    for key, (value, low, high) in expected.items():
        assert iv[key]["value"] == pytest.approx(value) and iv[key]["low"] == pytest.approx(low), key
        assert iv[key]["high"] == pytest.approx(high), key
    assert iv["cos_registers"] == {"value": 0.0, "low": 0.0, "high": 0.0}  # no registers: the ratio's 0


def test_rows_carry_intervals_over_the_images(demo):
    """On the demo's two images the patch-cosine interval is [min, max] of the two images' own mean
    patch cosines (computed here from the passes' features, see the hand case above); with one image
    given twice every resample is the same, so every interval collapses onto its value."""
    backbone, batches = demo
    layout = backbone.layout()
    result = ablate(backbone, demo_images(), targets=["high-norm"], ablations=["zero"], layers=[2], progress=False)
    row = result.rows[0]
    # the demo's output is not one vector per image, so it has no output cosine (nor its interval)
    assert row.output_cos is None
    assert set(row.intervals) == {"cos_cls", "cos_patches", "attn_tv", "high_norm_after"}
    clean = run_pass(backbone, batches)
    sel = result.selections[0]
    zeros = torch.zeros(2, layout.num_tokens, backbone.embed_dim)
    ablated = run_pass(backbone, batches, ablation=(sel, zeros))
    per_image = torch.nn.functional.cosine_similarity(clean.features.double(), ablated.features.double(),
                                                      dim=-1)[:, layout.patch_slice].mean(1)
    iv = row.intervals["cos_patches"]
    assert iv["value"] == pytest.approx(row.cos_patches) and float(per_image.min()) < float(per_image.max())
    assert iv["low"] == pytest.approx(float(per_image.min())) and iv["high"] == pytest.approx(float(per_image.max()))
    assert result.settings["intervals"] == {"method": "percentile bootstrap", "level": 0.95, "resamples": 1000,
                                            "seed": 0, "unit": "image"}
    one = demo_images()[:1] * 2
    twice = ablate(backbone, one, targets=["high-norm"], ablations=["zero"], layers=[2], progress=False).rows[0]
    for key, v in twice.intervals.items():
        assert v["low"] == pytest.approx(v["value"]) and v["high"] == pytest.approx(v["value"]), key


def test_registers_target_with_fix_reg_mean():
    backbone = vsink.load("demo").with_registers(2)
    result = ablate(backbone, demo_images(), targets=["registers"], ablations=["mean-images", "resample"],
                    layers=[1, 3], progress=False)
    assert [(r.layer, r.ablation) for r in result.rows] == [(1, "mean-images"), (1, "resample"),
                                                              (3, "mean-images"), (3, "resample")]
    assert all(r.tokens == 2 * 2 and r.cos_registers is not None for r in result.rows)
    with pytest.raises(vsink.VsinkError, match="no registers"):
        ablate(vsink.load("demo"), demo_images(), targets=["registers"], progress=False)


def test_cli_writes_results_and_the_html_report(tmp_path, capsys):
    spec = tmp_path / "neurons.json"
    NeuronSpec("demo", [RegisterNeuron(D.PLANTED_BLOCK, n, 1.0) for n in D.PLANTED_NEURONS]).save(spec)
    out = tmp_path / "abl"
    assert main(["ablate", "--targets", "neurons,high-norm", "--neurons", str(spec), "--ablations",
                 "zero,mean-kind", "--layers", "2", "--out", str(out), "--no-progress", "--ci-level", "0.9",
                 "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "neurons        2 zero" in printed and "wrote" in printed
    data = json.loads((out / "results.json").read_text())
    assert [(r["target"], r["ablation"]) for r in data["rows"]] == [
        ("neurons", "zero"), ("neurons", "mean-kind"), ("high-norm", "zero"), ("high-norm", "mean-kind")]
    assert data["rows"][0]["high_norm_after"] == 0
    assert data["settings"]["intervals"]["level"] == 0.9 and data["settings"]["intervals"]["resamples"] == 200
    assert data["rows"][0]["intervals"]["cos_patches"]["low"] <= data["rows"][0]["cos_patches"]
    html = (out / "report.html").read_text()
    assert "90% percentile-bootstrap interval over the 2 image(s) (200 resamples, seed 0)" in html
    assert html.count("<h2>") == 2 and html.count("<img") == 2 and "Synthetic demo model" in html
    assert (out / "results.md").read_text().count("\n| neurons | 2 |") == 2
    record = json.loads((out / "vsink-run.json").read_text())
    assert record["command"] == "vsink ablate"


@pytest.mark.parametrize("argv, message", [
    (["--targets", "neurons"], "--targets neurons needs --neurons"),
    (["--layers", "9"], "layers [9] out of range"),
    (["--targets", "registers"], "target registers: the model has no registers"),
    (["--ablations", "zero,blur"], "--ablations"),
], ids=["neurons-without-spec", "layer-out-of-range", "no-registers", "unknown-ablation"])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert main(["ablate", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vsink: error: ") and message in err[-1]
    assert not (tmp_path / "o").exists()


def _two_level_trace(outlier: float) -> Trace:
    """One block, 3 images of 16 patches (input norms 1): images 0 and 1 a bulk at 1.00-1.15 with 3
    tokens at ``outlier``; image 2 uniform at 10.00-10.15 (a flat image: every patch raised, none
    standing out)."""
    norms = np.ones((1, 3, 17))
    norms[0, :, 1:] = 1 + 0.01 * np.arange(16)
    norms[0, 0, 1:4] = norms[0, 1, 5:8] = outlier
    norms[0, 2, 1:] = 10 + 0.01 * np.arange(16)
    return Trace(layout=TokenLayout(num_cls=1, num_registers=0, grid=(4, 4)), layers=[0], norms=norms,
                 input_norms=np.ones((3, 17)))


def test_tokens_left_are_judged_at_the_clean_thresholds_held_fixed():
    """Clean: the 6 tokens at 50 are the outliers (the pooled gap lies between 10 and 50: image 2's
    flat patches are below it). Removing them (set to the bulk) leaves a pool whose own gap lies
    between 1 and 10: a detector refitted on the changed pass flags image 2's 16 patches, which did
    not change. Held at the clean thresholds they stay unflagged: 6 -> 0, not 6 -> 16."""
    clean, ablated = _two_level_trace(50.0), _two_level_trace(1.0)
    assert detect_high_norm(clean).mask(0).sum(axis=1).tolist() == [3, 3, 0]
    assert detect_high_norm(ablated).mask(0).sum(axis=1).tolist() == [0, 0, 16]  # the refit's verdict
    assert np.array_equal(flag_at_reference(clean, clean, -1), detect_high_norm(clean).mask(0))
    assert flag_at_reference(clean, ablated, -1).sum() == 0
    raised = _two_level_trace(50.0)
    raised.norms[0, 2, 1:3] = 60.0  # two of image 2's patches pushed above the clean threshold
    assert flag_at_reference(clean, raised, -1).sum(axis=1).tolist() == [3, 3, 2]
    for kwargs in ({"method": "sigma", "k": 1.0}, {"method": "absolute", "threshold": 5.0}):
        assert np.array_equal(flag_at_reference(clean, clean, -1, **kwargs), detect_high_norm(clean, **kwargs).mask(0))
    assert flag_at_reference(ablated, ablated, -1, method="sigma", k=1.0).sum() == 16  # sigma of ablated itself
    assert flag_at_reference(clean, ablated, -1, method="sigma", k=1.0).sum() == 0  # held: clean's mean + std


def test_ablation_rows_count_the_tokens_left_at_the_clean_thresholds(demo):
    """The demo's two images and a flat grey one (every patch fires the planted neurons: uniformly
    high, not flagged clean). Removing the flagged tokens used to report more high-norm tokens after
    than before (62 -> 203 zeroed, 62 -> 256 mean-kind): the refitted detector flagged the grey
    image's unchanged patches."""
    backbone, _ = demo
    images = [*demo_images(), Image.new("RGB", (1, 1), (200, 200, 200))]
    result = ablate(backbone, images, ablations=["zero", "mean-kind"], layers=[D.PLANTED_BLOCK], progress=False)
    for row in result.rows:
        assert row.tokens == row.high_norm_before > 0
        assert row.high_norm_after == 0 and row.intervals["high_norm_after"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    # the demo's two images alone: mean-images of the flagged tokens barely changes the features (their
    # positions are flat, so high-norm, in both images); a refitted detector reported 69 -> 6
    row = ablate(backbone, demo_images(), ablations=["mean-images"], layers=[D.PLANTED_BLOCK], progress=False).rows[0]
    assert row.cos_patches > 0.99 and row.high_norm_after > 0.9 * row.high_norm_before


def test_the_figure_shows_the_input_image_in_the_clean_row(demo):
    """The clean pass kept image 0's thumbnail for the figure but no panel drew it: a stranger saw
    norm maps of an image the report never showed."""
    from vsink.export.ablation_report import ablation_figure

    backbone, _ = demo
    result = ablate(backbone, demo_images(), ablations=["zero"], layers=[D.PLANTED_BLOCK], progress=False)
    figure = ablation_figure(result, "high-norm", D.PLANTED_BLOCK)
    titled = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    assert sorted(titled) == ["cls attention, last block", "cosine to clean", "final patch norm", "input image"]
    clean_cell = titled["input image"]  # row 0 (clean), the column of the ablation rows' cosine
    top = lambda name: titled[name].get_position().y1  # noqa: E731
    assert top("input image") == top("final patch norm") > top("cosine to clean")  # clean row above the ablation's
    assert np.array_equal(clean_cell.images[0].get_array(), result.clean_maps["image"])
    assert result.clean_maps["image"].shape == (224, 224, 3)


def test_attention_rows_that_do_not_sum_to_one_are_reported(tmp_path, capsys):
    """A sigmoid-attention model (vsink finetune's model.attention): its class-attention rows do not
    sum to 1, so the "total variation" is half the L1 distance of the rows as computed, not bounded
    by 1. scan and maps say so; ablate did not (nothing in its settings, output or report)."""
    from vsink.attention_variants import apply_attention
    from vsink.export.ablation_report import render_ablation_markdown

    from conftest import sharpen

    torch.manual_seed(0)
    backbone = vsink.load("timm:deit_tiny_patch16_224", img_size=32, pretrained=False,
                          model_kwargs=dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=0))
    sharpen(backbone.model, std=0.2)
    apply_attention(backbone.model, "sigmoid")
    backbone.save(tmp_path / "m")
    assert main(["ablate", "--model", str(tmp_path / "m"), "--layers", "0", "--out", str(tmp_path / "o"),
                 "--no-progress", "--resamples", "10"]) == 0
    assert "whose rows do not sum to 1" in capsys.readouterr().out
    settings = json.loads((tmp_path / "o" / "results.json").read_text())["settings"]
    assert settings["attention"] == {"variant": "sigmoid", "rows_sum_to_one": False}
    for name in ("results.md", "report.html"):
        assert "sigmoid, whose rows do not sum to 1" in (tmp_path / "o" / name).read_text()
    softmax = ablate(vsink.load("demo"), demo_images(), layers=[1], progress=False, stats=Bootstrap(resamples=10))
    assert softmax.settings["attention"] == {"variant": "softmax", "rows_sum_to_one": True}
    assert "do not sum to 1" not in render_ablation_markdown(softmax)


def test_auto_layer_that_gives_a_target_nothing_warns_where_it_has_entries(demo):
    """--layers auto picks the high-norm emergence block (2 on the demo); the demo's sinks sit in
    blocks 3-5 (docs/demo.md), so `vsink ablate --targets sinks` silently ablated nothing and
    reported a table of identities."""
    from vsink.detect.attention import detect_sinks

    backbone, batches = demo
    sink_blocks = sorted({s.layer for s in detect_sinks(run_pass(backbone, batches).trace, ratio=5.0)})
    assert sink_blocks and D.PLANTED_BLOCK not in sink_blocks
    with pytest.warns(vsink.errors.VsinkWarning, match=f"target sinks selects nothing at block {D.PLANTED_BLOCK}.*"
                      f"entries at block\\(s\\) {', '.join(map(str, sink_blocks))}: pass --layers"):
        result = ablate(backbone, demo_images(), targets=["sinks"], progress=False)
    assert result.rows[0].tokens == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ablate(backbone, demo_images(), targets=["sinks"], layers=[D.PLANTED_BLOCK], progress=False)  # explicit: no warning


def test_layers_as_the_option_pattern_allows_them():
    """--layers accepted ' 2 , 3 ,' and ' auto ' by its pattern, then refused them in the parser
    ("layers must be auto or a comma list of integers, got '2,'")."""
    from vsink.ablate import ABLATE
    from vsink.maps import parse_selection

    for text, expected in ((" 2 , 3 ,", [2, 3]), ("2,", [2]), (" auto ", "auto"), ("-1", [5])):
        ABLATE["layers"].check(text)
        assert parse_selection(text, 6, "layers", ("auto",)) == expected
    with pytest.raises(vsink.errors.VsinkError, match="comma list"):
        parse_selection("2,,", 6, "layers", ("auto",))


def test_neurons_found_on_another_model_warn_in_ablation_terms(demo):
    """The warning spoke of test-time registers only, confusing in an ablation."""
    backbone, _ = demo
    spec = NeuronSpec(model="timm:vit_small_patch16_224", neurons=[RegisterNeuron(D.PLANTED_BLOCK, 0, 1.0)])
    with pytest.warns(vsink.errors.VsinkWarning, match="found on 'timm:vit_small_patch16_224' and is applied to "
                      "'demo': register neurons are units of the model they were found on, so test-time registers "
                      "and ablations of them"):
        ablate(backbone, demo_images(), targets=["neurons"], neurons=spec, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"images": "/tmp"}, "images must be a list of images"),
    ({"targets": "high-norm"}, "targets must be a list of names, got the str 'high-norm'"),
    ({"ablations": "zero"}, "ablations must be a list of names"),
    ({"targets": ["neurons"], "neurons": {2: [99999]}}, "neurons[2]: unit must be an integer in [0, 767]"),
    ({"targets": ["neurons"], "neurons": {2: [-1]}}, "neurons[2]: unit must be an integer in [0, 767], got -1"),
    ({"targets": ["neurons"], "neurons": {17: [0]}}, "neurons: block must be an integer in [0, 5]"),
    ({"targets": ["neurons"], "neurons": [0, 1]}, "neurons must be a NeuronSpec or {block: [unit, ...]}"),
    ({"img_size": 0}, "img_size must be an integer >= 1"),
    ({"stats": None}, "stats must be a vsink.evaluate.stats.Bootstrap"),
    ({"dense": ("val", "train")}, "dense must be (eval_set, train_set or None)"),
], ids=["one-path", "targets-str", "ablations-str", "unit-too-large", "unit-negative", "block-out-of-range",
        "neurons-list", "img-size-0", "stats-none", "dense-strings"])
def test_api_wrong_arguments_are_one_error_naming_them(demo, kwargs, message):
    """Each of these used to reach deep code: a string iterated per character, a unit or block out of
    range indexing a tensor (IndexError; -1 silently the last unit), img_size 0 taken as the default."""
    backbone, _ = demo
    kwargs = {"images": demo_images(), **kwargs}
    with pytest.raises(vsink.errors.VsinkError) as info:
        ablate(backbone, progress=False, **kwargs)
    assert message in str(info.value)


def test_dense_metrics_under_ablation_planted(tmp_path, capsys):
    """--dense on synthetic dense images: zeroing the four planted neurons (block 2, units 0-3, which
    write the demo's high-norm tokens) leaves no outlier patch in any block, where the clean demo
    has some; the files and the report section are written."""
    spec = tmp_path / "neurons.json"
    NeuronSpec("demo", [RegisterNeuron(D.PLANTED_BLOCK, n, 1.0) for n in D.PLANTED_NEURONS]).save(spec)
    out = tmp_path / "abl"
    assert main(["ablate", "--targets", "neurons", "--neurons", str(spec), "--ablations", "zero", "--dense",
                 "--dense-images", "4", "--out", str(out), "--no-progress"]) == 0
    assert "| linear-seg mIoU (%) |" in capsys.readouterr().out
    dense = json.loads((out / "dense.json").read_text())
    clean, ablated = dense["variants"]["clean"], dense["variants"]["neurons@2:zero"]
    assert clean["artifacts"]["outlier_fraction_max"] > 0 and ablated["artifacts"]["outlier_fraction_max"] == 0
    assert "linear_seg" in ablated and "lost" in ablated
    assert set(dense["comparisons"]["neurons@2:zero"]) >= {"linear_seg.miou", "lost.corloc"}
    assert json.loads((out / "results.json").read_text())["dense"] == "dense.json"
    html = (out / "report.html").read_text()
    assert "Dense metrics under ablation" in html and 'href="dense.html"' in html and (out / "dense.html").exists()


def test_dense_metrics_non_planted_neuron(demo):
    """A non-planted unit (block 2, unit 10) leaves the outlier fraction of the dense images as it
    was (its planted-test bound: under 1 % change of the high-norm tokens' norms)."""
    from vsink.evaluate.open import open_dataset

    backbone, _ = demo
    sets = tuple(open_dataset("synthetic", None, s, synthetic_images=4, synthetic_size=224) for s in ("val", "train"))
    result = ablate(backbone, demo_images(), targets=["neurons"], ablations=["zero", "mean-images"],
                    neurons={D.PLANTED_BLOCK: [10]}, layers=[D.PLANTED_BLOCK], dense=(sets[0], None),
                    dense_tasks=["artifacts"], progress=False)
    variants = result.dense.variants
    assert list(variants) == ["clean", "neurons@2:zero", "neurons@2:mean-images"]
    base = variants["clean"]["artifacts"]["outlier_fraction"]
    assert base > 0 and all(v["artifacts"]["outlier_fraction"] == base for v in list(variants.values())[1:])


def test_the_figures_show_the_image_with_the_most_selected_tokens(demo):
    """The figures showed image 0 whatever the selection: with sinks on images that have none, a
    reader saw a cosine of 1 everywhere and an image the ablation never touched. Noise has no flat
    patch, so the demo's planted neurons fire on none of it: the demo photo, second, must be shown."""
    backbone, _ = demo
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    photo = demo_images()[0]
    result = ablate(backbone, [noise, photo], ablations=["zero"], layers=[D.PLANTED_BLOCK], progress=False)
    tokens = result.selections[0].tokens
    assert tokens[0].sum() == 0 < tokens[1].sum()  # the planted mechanism: flat patches in the photo only
    assert result.shown == 1 and result.to_json()["figure_image"] == result.images[1]
    expected = np.asarray(load_batch([photo])[0][0].convert("RGB").resize((224, 224)))
    assert np.array_equal(result.clean_maps["image"], expected)
    alone = ablate(backbone, [photo], ablations=["zero"], layers=[D.PLANTED_BLOCK], progress=False)
    np.testing.assert_allclose(result.rows[0].maps["cos"], alone.rows[0].maps["cos"], atol=1e-5)
    np.testing.assert_allclose(result.clean_maps["norms"], alone.clean_maps["norms"], rtol=1e-5)
    assert (result.rows[0].maps["cos"] < 0.999).any()  # the shown image is one the ablation changed
