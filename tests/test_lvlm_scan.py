"""The LVLM decoder as a site model, and ``vsink scan`` on the demo LVLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vsink.backbones.hf_lvlm import LVLM, load_lvlm
from vsink.cli import main
from vsink.data import demo_llava as DL
from vsink.data.demo_lvlm import build_tiny_llava, build_tiny_qwen2_vl
from vsink.lvlm.scan import scan_lvlm
from vsink.lvlm.sinks import calibrate
from conftest import PHOTOS, skimage_photo
from lvlm_models import decoder_attention_checked


@pytest.fixture(scope="module")
def demo():
    return load_lvlm("demo-llava")


@pytest.fixture(scope="module")
def photos():
    return [skimage_photo(name) for name in PHOTOS[:3]]


@pytest.mark.parametrize("build", [build_tiny_llava, build_tiny_qwen2_vl], ids=["llava", "qwen2_vl"])
def test_decoder_attention_equals_hf_eager_and_probes_change_nothing(build):
    model, processor = build()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    _, inputs, _, probe = decoder_attention_checked(model, processor, images)
    trace = probe.trace()
    assert trace.layout.num_tokens == inputs["input_ids"].shape[1] and trace.layout.kind_of(0) == "bos"
    assert model.config.get_text_config()._attn_implementation == "eager"  # switched back


def test_planted_sink_dimensions_are_recovered(demo, photos):
    inputs = demo.prepare([p.image for p in photos], ["describe the image"] * len(photos))
    assert sorted(calibrate(demo, [inputs]).sink_dims) == sorted(DL.SINK_DIMS)
    # a model with no known dimensions: the scan calibrates them itself
    anonymous = LVLM(demo.model, demo.processor, "hf:somewhere")
    demo.model.config._name_or_path = "somewhere"
    try:
        result = scan_lvlm(anonymous, photos[:2], "describe the image", progress=False)
    finally:
        demo.model.config._name_or_path = "vsink/demo-llava"
    assert result.sink_dims_source == "calibrated" and sorted(result.sink_dims) == sorted(DL.SINK_DIMS)


def test_tower_high_norm_tokens_become_visual_sinks(demo, photos):
    # the truth, read with a plain torch hook: patches on which the tower's planted neurons fire
    tower = demo.model.model.vision_tower
    owner = getattr(tower, "vision_model", tower)
    seen = {}
    handle = owner.encoder.layers[DL.TOWER_PLANTED_BLOCK].mlp.fc2.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("h", a[0]))
    inputs = demo.prepare([p.image for p in photos], ["describe the image"] * len(photos))
    with torch.no_grad():
        demo.model(**inputs, use_cache=False)
    handle.remove()
    on, off = DL.TOWER_NEURONS
    firing = ((seen["h"][:, 1:, on] - seen["h"][:, 1:, off]) > DL.TOWER_STEP / 2).numpy()  # class token dropped

    result = scan_lvlm(demo, photos, "describe the image", progress=False)
    assert result.vision.high_norm.emergence_layer == DL.TOWER_PLANTED_BLOCK
    tower_mask = result.vision.high_norm.mask(DL.TOWER_PLANTED_BLOCK)
    assert np.array_equal(tower_mask, firing)
    link = result.tower_to_llm()
    sinks = np.zeros_like(firing)
    for row in link["images"]:
        sinks[row["image"], row["visual_sinks"]] = True
    assert (sinks <= firing).all()  # every visual sink token is a tower high-norm token
    assert link["both"] >= 0.9 * link["tower_high_norm"]  # ... and nearly all of them arrive
    data = result.to_json()
    layer = data["lvlm"]["layers"][1]
    assert set(layer) >= {"index", "bos_share", "image_attention_share", "visual_sink_tokens", "massive"}
    assert {m["dim"] for m in layer["massive"]} == set(DL.SINK_DIMS)
    assert layer["bos_share"] > 0.05 and 0 < layer["image_attention_share"] < 1
    assert data["vision"]["high_norm"]["emergence_layer"] == DL.TOWER_PLANTED_BLOCK

    # per image: the tower's high-norm tokens are the planted firing patches of that image, and its
    # visual sink tokens those the LLM flags (any layer), read from tower_to_llm above
    for i, entry in enumerate(data["vision"]["per_image"]):
        assert entry["high_norm_tokens"] == int(firing[i].sum())
    for i, entry in enumerate(data["per_image"]):
        assert entry["visual_sink_tokens"] == int(sinks[i].sum())
    # the planted sink heads (keys read the sink dims carried by BOS and the visual sinks) have the
    # largest BOS and visual-sink shares of every layer in the layer x head maps
    shares = result.head_shares()
    others = [h for h in range(shares["bos"].shape[1]) if h not in DL.SINK_HEADS]
    for key in ("bos", "visual_sinks"):
        assert (shares[key][:, list(DL.SINK_HEADS)].min(axis=1) > shares[key][:, others].max(axis=1)).all(), key


def test_cli_scan_on_the_demo_lvlm(tmp_path, capsys):
    assert main(["scan", "--model", "demo-llava", "--prompt", "what is in the picture ?", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "visual sink tokens" in out and "vision tower" in out
    data = json.loads((tmp_path / "scan.json").read_text())
    assert data["synthetic"] is True and data["prompt"] == "what is in the picture ?"
    assert data["lvlm"]["sink_dims"] == list(DL.SINK_DIMS) and data["lvlm"]["tower_to_llm"]["both"] > 0
    assert (tmp_path / "report.html").read_text().count("Synthetic demo LVLM") == 1  # a visible banner
    assert (tmp_path / "vision" / "scan.json").exists() and (tmp_path / "trace.npz").exists()


def test_layer_by_head_maps_name_decoder_layers(demo, photos, monkeypatch):
    """The LVLM report's layer × head heat maps have the LLM's decoder layers as rows, and say so."""
    from vsink.export import lvlm_report
    from vsink.export.layer_figures import heatmap_figure

    labels = []

    def recording(*args, **kwargs):
        figure = heatmap_figure(*args, **kwargs)
        labels.append((figure.axes[0].get_ylabel(), figure.axes[0].get_xlabel()))
        return figure

    monkeypatch.setattr(lvlm_report, "heatmap_figure", recording)
    result = scan_lvlm(demo, photos[:1], "describe the image", progress=False)
    lvlm_report.head_share_section(result)
    assert labels == [("decoder layer", "head")] * 3  # BOS, image tokens, visual sinks
