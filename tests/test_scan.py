"""vsink.scan over every family: random models report no outliers; registers are reported apart."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vsink
from vsink.data.demo_images import demo_images
from conftest import hf_model, open_clip_visual, sharpen, timm_case


def images():
    # the two demo photographs plus crops, so each layer pools a few thousand patch norms
    out = []
    for im in demo_images():
        w, h = im.image.size
        out += [im.image, im.image.crop((0, 0, w // 2, h // 2)), im.image.crop((w // 2, h // 2, w, h))]
    return out


RANDOM_MODELS = {
    "timm_deit": lambda: timm_case("deit"),
    "timm_dinov2_reg4": lambda: timm_case("dinov2_reg4"),
    "open_clip": lambda: open_clip_visual(),
    "open_clip_custom": lambda: open_clip_visual("custom"),
    "hf_vit": lambda: hf_model("vit"),
    "hf_dinov2_reg": lambda: hf_model("dinov2_reg"),
    "hf_clip": lambda: hf_model("clip"),
    "hf_siglip": lambda: hf_model("siglip"),
}


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
@pytest.mark.parametrize("sharp", [False, True])
def test_random_models_report_no_outliers(name, sharp):
    model = RANDOM_MODELS[name]()
    if sharp:
        sharpen(model)
    backbone = vsink.wrap(model)
    size = backbone.img_size[0] * 2 if backbone.dynamic_size else None
    result = vsink.scan(backbone, images(), img_size=size, progress=False)
    assert result.high_norm.emergence_layer is None
    assert result.high_norm.tokens == []
    assert all(layer.threshold is None for layer in result.high_norm.layers)


def test_register_model_reports_registers_apart():
    backbone = vsink.wrap(sharpen(hf_model("dinov2_reg")))
    result = vsink.scan(backbone, images()[:2], progress=False)
    data = result.to_json()
    assert data["layout"]["registers"] == 4 and data["layout"]["register_position"] == "after_cls"
    for layer in data["layers"]:
        assert len(layer["norm"]["registers"]) == 4 and layer["norm"]["cls"] is not None
        assert 0 < layer["attention"]["register_received"] < 1
    shares = result.trace.attn_received.mean(axis=2)  # [L, I, N]
    expected = shares[:, :, 1:5].sum(-1).mean(-1)
    assert [layer["attention"]["register_received"] for layer in data["layers"]] == pytest.approx(expected.tolist())


def test_api_accepts_paths_and_pil_and_saves(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (80, 60), (30, 60, 90)).save(path)
    backbone = vsink.load("demo")
    result = vsink.scan(backbone, [path, Image.new("L", (40, 40), 128), tmp_path / "missing.png"],
                        batch_size=2, progress=False)
    assert result.images == [str(path), "image-1"]
    assert result.skipped[0]["image"] == str(tmp_path / "missing.png")
    paths = result.save(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["images"] == result.images
    with pytest.raises(vsink.NothingScanned):
        vsink.scan(backbone, [tmp_path / "missing.png"], progress=False)
    with pytest.raises(vsink.VsinkError, match="no images"):
        vsink.scan(backbone, [], progress=False)


def test_sinks_are_strongest_first():
    result = vsink.scan(vsink.load("demo"), demo_images(), progress=False)
    shares = [s.share for s in result.sinks]
    assert len({s.layer for s in result.sinks}) > 1 and shares == sorted(shares, reverse=True)
    received = result.trace.attn_received.mean(axis=2)  # [L, I, N], the shares the detector ranks
    top = result.sinks[0]
    assert top.share == pytest.approx(float(received[list(result.trace.layers).index(top.layer)].max()))
    assert [s["share"] for s in result.to_json()["sinks"]] == shares  # scan.json keeps the order


def test_scan_layers_subset_and_siglip_without_cls():
    backbone = vsink.wrap(hf_model("siglip"))
    result = vsink.scan(backbone, images()[:1], layers=[1], progress=False)
    data = result.to_json()
    assert [layer["index"] for layer in data["layers"]] == [1]
    assert data["layout"]["cls"] == 0 and data["layers"][0]["norm"]["cls"] is None
    assert result.trace.attn_cls is None
    assert torch.is_grad_enabled()
