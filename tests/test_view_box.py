"""Maps drawn on what the model saw: the view box of each family equals its processor's own crop
(checked against the processor's pixel values, de-normalised), and the exported images, report
images and maps hold exactly that region of a non-square photo — never its cropped-away margins."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.backbones.hf_lvlm import LVLM
from vsink.data.demo_lvlm import build_tiny_llava, build_tiny_llava_next, build_tiny_qwen2_vl
from vsink.lvlm import generate
from vsink.lvlm.export import export_attention
from vsink.lvlm.scan import scan_lvlm
from vsink.maps import export_maps
from vsink.scan import scan
from vsink.viewbox import ViewBox, clip_processor_box

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 150, 60)


def margin_photo(width: int = 300, height: int = 200) -> Image.Image:
    """A wide photo whose left and right margins (the part a centre crop of the shortest edge
    drops: 50 px each side at 300 × 200) are pure red and pure blue; the centre is green with a
    white square as a marker."""
    arr = np.zeros((height, width, 3), np.uint8)
    side = (width - height) // 2
    arr[:, :side] = RED
    arr[:, width - side:] = BLUE
    arr[:, side:width - side] = GREEN
    arr[height // 2 - 10:height // 2 + 10, width // 2 - 10:width // 2 + 10] = 255
    return Image.fromarray(arr)


def has_colour(picture: np.ndarray, colour, inset: int = 2) -> bool:
    """Whether any pixel (``inset`` px from the edges, where resampling blends) is near ``colour``."""
    inner = np.asarray(picture, dtype=np.int32)[inset:-inset, inset:-inset]
    return bool((np.abs(inner - np.asarray(colour)).max(axis=-1) < 60).any())


def denormalised(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """The processor's [3, H, W] pixel values back to uint8-range [H, W, 3]."""
    mean = np.asarray(processor.image_mean)[:, None, None]
    std = np.asarray(processor.image_std)[:, None, None]
    return ((pixel_values.numpy() * std + mean) * 255).transpose(1, 2, 0)


def close_to(crop: Image.Image, seen: np.ndarray) -> float:
    """Mean absolute difference (0–255) between ``crop`` resized to ``seen``'s size and ``seen``."""
    h, w = seen.shape[:2]
    ref = np.asarray(crop.resize((w, h), Image.BICUBIC), dtype=np.float64)
    return float(np.abs(ref - seen).mean())


def test_llava_view_box_is_the_processors_centre_crop(tmp_path):
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    photo = margin_photo()
    box = lvlm.view_box(photo.size)
    assert box == ViewBox(50.0, 0.0, 250.0, 200.0)
    seen = denormalised(lvlm.prepare([photo], ["describe"])["pixel_values"][0], processor.image_processor)
    assert close_to(box.crop(photo), seen) < 6  # the crop is what the model got
    assert close_to(photo, seen) > 30  # the squashed whole photo is not
    assert not has_colour(seen, RED) and not has_colour(seen, BLUE)

    inputs = lvlm.prepare([photo], ["describe"])
    result = generate(lvlm, inputs, max_new_tokens=2, capture_attention=True)
    export_attention(lvlm, result, inputs, tmp_path, images=[photo], names=["margins.png"])
    with np.load(tmp_path / "row0.npz") as data:
        stored, stored_box = data["image"], data["view_box"]
        assert str(data["name"]) == "margins.png"
    np.testing.assert_allclose(stored_box, [50, 0, 250, 200])
    assert stored.shape[0] == stored.shape[1]  # the square crop, not the 3:2 photo
    assert not has_colour(stored, RED) and not has_colour(stored, BLUE) and has_colour(stored, GREEN)


def test_llava_view_box_for_other_shapes_follows_the_processors_rounding():
    import transformers as tr

    processor = tr.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for size in [(451, 300), (300, 451), (640, 427), (33, 32), (32, 32)]:
        box = clip_processor_box(processor, size)
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        seen = denormalised(processor(images=[photo], return_tensors="pt")["pixel_values"][0], processor)
        wrong = ViewBox(box.x0 + box.width * 0.1, box.y0, box.x1 + box.width * 0.1, box.y1)
        assert close_to(box.crop(photo), seen) < close_to(wrong.crop(photo), seen), size


def test_pad_to_square_view_box_reaches_outside_the_image():
    import transformers as tr

    processor = tr.LlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       do_pad=True)
    photo = margin_photo()
    box = clip_processor_box(processor, photo.size)
    assert box == ViewBox(0.0, -50.0, 300.0, 250.0)
    seen = denormalised(processor(images=[photo], return_tensors="pt")["pixel_values"][0], processor)
    fill = tuple(int(m * 255) for m in processor.image_mean)
    assert close_to(box.crop(photo, fill), seen) < 8
    assert has_colour(seen, RED) and has_colour(seen, BLUE)  # padded, nothing cropped away


def test_llava_next_view_box_is_the_whole_photo_its_processor_tiles(tmp_path):
    """LLaVA-NeXT's processor keeps every pixel: a base image (the whole photo resized to the
    32 × 32 crop size) and any-resolution tiles of the photo at its aspect, padded. By hand for the
    300 × 200 photo and the tiny model's pinpoints (h × w) 32 × 32, 32 × 64, 64 × 32: the best fit
    is 32 × 64 (the photo scaled by min(64/300, 32/200) = 0.16 covers 48 × 32 = 1536 pixels there,
    683 in the others); the photo is resized to 48 × 32, centred on the 64 × 32 canvas with
    (64 − 48) / 2 = 8 columns of padding each side, and cut into two 32 × 32 tiles. So the recorded
    box is the whole photo, not LLaVA's centre crop."""
    model, processor = build_tiny_llava_next()
    lvlm = LVLM(model, processor)
    photo = margin_photo()
    box = lvlm.view_box(photo.size)
    assert box == ViewBox.full((300, 200))
    inputs = lvlm.prepare([photo], ["describe"])
    patches = inputs["pixel_values"][0]
    assert patches.shape == (3, 3, 32, 32)  # the base image, then the left and right tiles
    base = denormalised(patches[0], processor.image_processor)
    canvas = np.concatenate([denormalised(t, processor.image_processor) for t in patches[1:]], axis=1)
    content, padding = canvas[:, 8:56], np.concatenate([canvas[:, :8], canvas[:, 56:]], axis=1)
    for seen in (base, content):
        assert close_to(box.crop(photo), seen) < 8  # the whole photo is what the model got
        assert close_to(ViewBox(50, 0, 250, 200).crop(photo), seen) > 30  # LLaVA's centre crop is not
        assert has_colour(seen, RED) and has_colour(seen, BLUE)
    assert np.abs(padding).max() < 1  # the padding (black) holds no photo pixel: the box is no wider

    result = generate(lvlm, inputs, max_new_tokens=2, capture_attention=True)
    export_attention(lvlm, result, inputs, tmp_path, images=[photo], png=False)
    with np.load(tmp_path / "row0.npz") as data:
        stored = data["image"]
        np.testing.assert_allclose(data["view_box"], [0, 0, 300, 200])
    assert stored.shape[1] / stored.shape[0] == pytest.approx(1.5, abs=0.01)
    assert has_colour(stored, RED) and has_colour(stored, BLUE) and has_colour(stored, GREEN)


def qwen_image(pixel_values: torch.Tensor, grid_thw, processor) -> np.ndarray:
    """Undo Qwen2-VL's patch flattening: [t·h·w, C·T·P·P] → the resized image [h·P, w·P, 3]."""
    t, h, w = (int(v) for v in grid_thw)
    m, p, tp = processor.merge_size, processor.patch_size, processor.temporal_patch_size
    x = pixel_values.reshape(t, h // m, w // m, m, m, 3, tp, p, p)[0, ..., 0, :, :]  # first frame
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)
    return denormalised(x, processor)


def test_qwen2_vl_sees_the_whole_photo(tmp_path):
    model, processor = build_tiny_qwen2_vl()
    lvlm = LVLM(model, processor)
    photo = margin_photo()
    box = lvlm.view_box(photo.size)
    assert box == ViewBox.full(photo.size)
    inputs = lvlm.prepare([photo], ["describe"])
    seen = qwen_image(inputs["pixel_values"], inputs["image_grid_thw"][0], processor.image_processor)
    assert close_to(photo, seen) < 8  # smart_resize keeps the whole photo
    assert close_to(ViewBox(50, 0, 250, 200).crop(photo), seen) > 30
    assert has_colour(seen, RED) and has_colour(seen, BLUE)
    result = generate(lvlm, inputs, max_new_tokens=2, capture_attention=True)
    export_attention(lvlm, result, inputs, tmp_path, images=[photo])
    with np.load(tmp_path / "row0.npz") as data:
        stored, grid = data["image"], tuple(data["grid"])
        np.testing.assert_allclose(data["view_box"], [0, 0, 300, 200])
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert grid == (h // 2, w // 2)
    assert stored.shape[1] / stored.shape[0] == pytest.approx(1.5, abs=0.01)  # the photo's aspect, not the grid's


def test_lvlm_scan_records_and_draws_the_view_box():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    result = scan_lvlm(lvlm, [margin_photo()], "describe", progress=False)
    entry = result.to_json()["per_image"][0]
    assert entry["view_box"] == [50.0, 0.0, 250.0, 200.0] and entry["size"] == [300, 200]
    assert result.vision.to_json()["per_image"][0]["view_box"] == [50.0, 0.0, 250.0, 200.0]
    for picture in (result.thumbnails[0], result.vision.thumbnails[0]):
        arr = np.asarray(picture)
        assert arr.shape[0] == arr.shape[1] and not has_colour(arr, RED) and not has_colour(arr, BLUE)


def test_vision_maps_and_scan_draw_the_whole_photo_at_its_aspect(tmp_path):
    """vsink's vision preprocessing resizes the whole image: the view box is the whole photo, and
    the maps and report images keep its aspect instead of squashing it to the square input."""
    backbone = vsink.load("demo")
    photo = margin_photo()
    box = backbone.view_box(photo.size)
    assert box == ViewBox.full((300, 200))
    seen = backbone.preprocess([photo])[0].permute(1, 2, 0).numpy() * np.asarray(backbone.std) + np.asarray(backbone.mean)
    assert close_to(box.crop(photo), seen * 255) < 6
    result = export_maps(backbone, [photo], tmp_path, kinds=["norm"], layers=[0], progress=False)
    index = json.loads((tmp_path / "maps.json").read_text())
    assert index["images"][0]["view_box"] == [0.0, 0.0, 300.0, 200.0] and index["images"][0]["size"] == [300, 200]
    with np.load(tmp_path / "image-0.npz") as data:
        stored = data["image"]
    assert stored.shape[1] / stored.shape[0] == pytest.approx(1.5, abs=0.01)
    assert has_colour(stored, RED) and has_colour(stored, BLUE)
    assert result.images[0].view_box == box
    scanned = scan(backbone, [photo], progress=False)
    assert scanned.thumbnails[0].size[0] / scanned.thumbnails[0].size[1] == pytest.approx(1.5, abs=0.01)
    assert scanned.to_json()["per_image"][0]["view_box"] == [0.0, 0.0, 300.0, 200.0]


def test_cli_scan_prints_per_image_findings(tmp_path, capsys):
    from vsink.cli import main

    photo = tmp_path / "margins.png"
    margin_photo().save(photo)
    assert main(["scan", str(photo), "--no-progress", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    entry = json.loads((tmp_path / "out" / "scan.json").read_text())["per_image"][0]
    assert entry["view_box"] == [0.0, 0.0, 300.0, 200.0]
    line = next(line for line in out.splitlines() if line.strip().startswith("margins.png:"))
    assert f"{entry['high_norm_tokens']} high-norm token" in line and f"{entry['sink_tokens']} sink token" in line
