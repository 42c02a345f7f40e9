"""``vsink view``: the payload against the npz it was read from, the page self-contained, and the
page itself in a real headless Chromium: clicking a patch shows that patch's attention row, with
the numbers of the npz; norms toggle; registers and class tokens sit apart; LVLM words."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

import vsink
from browser import chrome
from vsink.cli import main
from vsink.data.demo_images import demo_images
from vsink.errors import VsinkError
from vsink.export.viewer import encode, load_viewer_data, write_viewer
from vsink.layout import TokenLayout
from vsink.maps import export_maps
from conftest import timm_model

LAYER, HEAD = 5, 1


@pytest.fixture(scope="module")
def maps_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("maps")
    with pytest.warns(UserWarning, match="kind 'full' writes about"):
        export_maps(vsink.load("demo"), demo_images(), out, kinds=["full", "norm", "cls"], layers=[2, LAYER],
                    heads="all", formats=["npz"], progress=False)
    return out


@pytest.fixture(scope="module")
def register_maps(tmp_path_factory):
    """A model with 2 registers after the class token: 1 cls + 2 reg + 3x3 patches."""
    out = tmp_path_factory.mktemp("reg")
    model = timm_model("vit_small_patch14_reg4_dinov2", img_size=42, reg_tokens=2)
    rng = np.random.default_rng(0)
    from PIL import Image

    img = Image.fromarray(rng.integers(0, 255, (42, 42, 3), dtype=np.uint8))
    with pytest.warns(UserWarning, match="kind 'full' writes about"):
        export_maps(vsink.wrap(model), [img], out, kinds=["full", "norm"], layers=[1], heads="all",
                    formats=["npz"], progress=False)
    return out


def decoded(enc) -> np.ndarray:
    dtype = "<f2" if enc["dtype"] == "f16" else "<f4"
    import base64

    return np.frombuffer(base64.b64decode(enc["data"]), dtype=dtype).astype(np.float32).reshape(enc["shape"])


def test_payload_holds_the_npz_values(maps_dir):
    payload = load_viewer_data(maps_dir, precision="float32")
    image = payload["images"][0]
    with np.load(maps_dir / "china.npz") as d:
        full, norm, prefix = d[f"full/layer{LAYER}"], d[f"norm/layer{LAYER}"], d[f"norm/layer{LAYER}/prefix"]
        # the 640 x 427 photo the model saw whole, at its aspect with the longer side 448 (not squashed to 224²)
        assert d["image"].dtype == np.uint8 and d["image"].shape == (299, 448, 3)
        np.testing.assert_allclose(d["view_box"], [0, 0, 640, 427])
    rows = image["layers"][str(LAYER)]["rows"]
    np.testing.assert_array_equal(decoded(rows["values"]), full)
    norms = decoded(image["layers"][str(LAYER)]["norm"])
    np.testing.assert_array_equal(norms[1:], norm.ravel())
    np.testing.assert_array_equal(norms[:1], prefix)
    half = decoded(load_viewer_data(maps_dir)["images"][0]["layers"][str(LAYER)]["rows"]["values"])
    np.testing.assert_allclose(half, full, rtol=1e-3, atol=6e-8)  # float16: ~3 significant digits, 2**-24 steps


def test_registers_are_listed_apart_from_the_grid(register_maps):
    image = load_viewer_data(register_maps)["images"][0]
    assert image["grid"] == [3, 3] and image["patch_start"] == 3 and image["tokens"] == 12
    assert [(p["token"], p["kind"], p["label"]) for p in image["prefix"]] == [
        (0, "cls", "cls"), (1, "register", "reg 0"), (2, "register", "reg 1")]


def test_page_is_self_contained(maps_dir, tmp_path):
    path = write_viewer(maps_dir, tmp_path / "v.html")
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text, re.I)
    assert "<link" not in text and "import(" not in text and "fetch(" not in text
    data = re.search(r"<script id='vsink-data' type='application/json'>(.*?)</script>", text, re.S).group(1)
    assert json.loads(data)["kind"] == "vision"


def test_bad_directory_and_layers(tmp_path, maps_dir):
    with pytest.raises(VsinkError, match="no vsink output to view"):
        load_viewer_data(tmp_path)
    with pytest.raises(VsinkError, match=r"block 3 is not in this export \(it has blocks \[2, 5\]\)"):
        load_viewer_data(maps_dir, layers=[3])
    assert list(load_viewer_data(maps_dir, layers=[-1])["images"][0]["layers"]) == [str(LAYER)]
    with pytest.raises(VsinkError, match="precision must be one of"):
        encode(np.zeros(2), "int8")
    assert main(["view", str(tmp_path)]) == 2


def click_patch(driver, row: int, col: int, grid) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    x = (col + 0.5) * w / grid[1] - w / 2  # selenium 4: offsets from the element's centre
    y = (row + 0.5) * h / grid[0] - h / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(x), int(y)).click().perform()


def shown(driver) -> np.ndarray:
    return np.asarray(driver.execute_script("return Array.from(window.vsinkViewer.shown)"), dtype=np.float32)


def number(text: str) -> float:
    return float(text.split(":")[-1].strip())


def severe(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.parametrize("precision, rtol, atol", [("float32", 1e-6, 1e-12), ("float16", 1e-3, 6e-8)])
def test_clicking_a_patch_shows_its_attention_row_in_chromium(maps_dir, precision, rtol, atol):
    """float16 keeps ~3 significant digits, and steps of 2**-24 (6e-8) below 6e-5."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    path = write_viewer(maps_dir, maps_dir / f"viewer-{precision}.html", precision=precision)
    with np.load(maps_dir / "china.npz") as d:
        full = d[f"full/layer{LAYER}"]  # [heads, N, N]
        norm, norm_prefix = d[f"norm/layer{LAYER}"], d[f"norm/layer{LAYER}/prefix"]
    layout = TokenLayout(1, 0, (14, 14))
    driver = chrome()
    try:
        driver.get(path.as_uri())
        time.sleep(0.5)
        Select(driver.find_element(By.ID, "layer-select")).select_by_value(str(LAYER))
        Select(driver.find_element(By.ID, "head-select")).select_by_value(str(HEAD))
        for row, col in ((2, 9), (11, 3)):
            click_patch(driver, row, col, layout.grid)
            time.sleep(0.2)
            token = layout.patch_token(row, col)
            state = driver.execute_script("return window.vsinkViewer.state")
            assert (state["query"], state["map"], state["layer"], state["head"]) == (token, "rows", str(LAYER), str(HEAD))
            expected = full[HEAD, token]
            np.testing.assert_allclose(shown(driver), expected, rtol=rtol, atol=atol)
            # the visible numbers: the class token's share (apart from the grid) and the largest value
            cls_text = driver.find_element(By.CSS_SELECTOR, "#prefix button[data-token='0']").text
            assert cls_text.startswith("cls:") and number(cls_text) == pytest.approx(expected[0], rel=2e-3, abs=atol)
            top = driver.find_elements(By.CSS_SELECTOR, "#top tr[data-token] td.value")
            assert float(top[0].text) == pytest.approx(expected.max(), rel=2e-3, abs=atol)
            assert f"row of token {token} (patch row {row}, col {col})" in driver.find_element(By.ID, "what").text
        Select(driver.find_element(By.ID, "head-select")).select_by_value("mean")
        np.testing.assert_allclose(shown(driver), full[:, token].mean(axis=0), rtol=2 * rtol, atol=atol)
        driver.find_element(By.ID, "norm-toggle").click()
        expected_norm = np.concatenate([norm_prefix, norm.ravel()])
        np.testing.assert_allclose(shown(driver), expected_norm, rtol=rtol)
        assert number(driver.find_element(By.CSS_SELECTOR, "#prefix button[data-token='0']").text) == \
            pytest.approx(norm_prefix[0], rel=2e-3)
        assert not severe(driver)
    finally:
        driver.quit()


def test_scan_output_is_viewable_in_chromium(tmp_path, demo_scan):
    import shutil

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    folder = shutil.copytree(demo_scan, tmp_path / "scan")  # the demo's scan (conftest.py), copied
    trace = vsink.Trace.load(folder / "trace.npz")
    path = write_viewer(folder, precision="float32")
    driver = chrome()
    try:
        driver.get(path.as_uri())
        time.sleep(0.5)
        Select(driver.find_element(By.ID, "image-select")).select_by_value("1")
        Select(driver.find_element(By.ID, "layer-select")).select_by_value("3")
        Select(driver.find_element(By.ID, "map-select")).select_by_value("cls")
        Select(driver.find_element(By.ID, "head-select")).select_by_value("2")
        time.sleep(0.2)
        np.testing.assert_allclose(shown(driver), trace.attn_cls[3, 1, 2], rtol=1e-6)
        assert "vsink maps --kind full" in driver.find_element(By.ID, "message").text
        assert not severe(driver)
    finally:
        driver.quit()


def test_lvlm_words_show_their_attention_per_layer_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from PIL import Image

    from vsink.backbones.hf_lvlm import LVLM
    from vsink.data.demo_lvlm import build_tiny_llava
    from vsink.lvlm import generate
    from vsink.lvlm.export import export_attention

    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    inputs = lvlm.prepare([image], ["describe this image"])
    torch.manual_seed(0)
    result = generate(lvlm, inputs, max_new_tokens=3, capture_attention=True)
    export_attention(lvlm, result, inputs, tmp_path, images=[image], png=False)
    with np.load(tmp_path / "row0.npz") as d:
        att, words = d["attention"], json.loads(str(d["words"]))
        assert d["image"].shape == (32, 32, 3)
    assert words == [processor.tokenizer.decode([t]) for t in result.new_tokens[0].tolist()]
    path = write_viewer(tmp_path, precision="float32")
    driver = chrome()
    try:
        driver.get(path.as_uri())
        time.sleep(0.5)
        spans = driver.find_elements(By.CSS_SELECTOR, "#words span")
        assert [s.get_attribute("data-step") for s in spans] == ["0", "1", "2"]
        assert [s.text for s in spans] == [w.strip() or json.dumps(w) for w in words]
        spans[1].click()
        Select(driver.find_element(By.ID, "layer-select")).select_by_value("2")
        np.testing.assert_allclose(shown(driver), att[1, 2].ravel(), rtol=1e-6)
        Select(driver.find_element(By.ID, "layer-select")).select_by_value("mean")
        np.testing.assert_allclose(shown(driver), att[1].mean(axis=0).ravel(), rtol=1e-5)
        # one scale for every word and layer: from 0 to the largest share any of them has
        drawn = driver.execute_script("return window.vsinkViewer.drawn")
        assert drawn == [0.0, pytest.approx(float(np.nanmax(att)), rel=1e-6)]
        assert not severe(driver)
    finally:
        driver.quit()


def test_viewer_names_images_draws_them_at_their_aspect_and_marks_the_image_token(tmp_path):
    """A 300 × 200 photo: the scan viewer's canvas keeps 3:2 (the whole photo, no padding from the
    stacked thumbnails); an LVLM export is named by its file and drawn on LLaVA's square crop; a
    generated image placeholder is an image-span marker, not a word."""
    from selenium.webdriver.common.by import By
    from PIL import Image

    from vsink.backbones.hf_lvlm import LVLM
    from vsink.data.demo_lvlm import build_tiny_llava
    from vsink.io import NpzWriter
    from vsink.lvlm import generate
    from vsink.lvlm.export import export_attention

    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(wide)
    Image.fromarray(rng.integers(0, 255, (300, 150, 3), dtype=np.uint8)).save(tall)
    scan_dir = tmp_path / "scan"
    assert main(["scan", str(wide), str(tall), "--no-progress", "--out", str(scan_dir)]) == 0
    payload = load_viewer_data(scan_dir)
    assert [im["name"] for im in payload["images"]] == [str(wide), str(tall)]

    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    photo = Image.open(wide).convert("RGB")
    inputs = lvlm.prepare([photo], ["describe this image"])
    result = generate(lvlm, inputs, max_new_tokens=3, capture_attention=True)
    rows = tmp_path / "rows"
    export_attention(lvlm, result, inputs, rows, images=[photo], names=["wide.png"], png=False)
    with np.load(rows / "row0.npz") as d:
        arrays = {k: d[k] for k in d.files}
    words = json.loads(str(arrays["words"]))
    words[1] = str(arrays["image_token"])
    arrays["words"] = np.asarray(json.dumps(words))
    with NpzWriter(rows / "row0.npz") as w:
        for key, value in arrays.items():
            w.add(key, value)
    driver = chrome()
    try:
        driver.get(write_viewer(scan_dir).as_uri())
        time.sleep(0.5)
        canvas = driver.find_element(By.TAG_NAME, "canvas")
        assert int(canvas.get_attribute("width")) / int(canvas.get_attribute("height")) == pytest.approx(1.5, abs=0.01)
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "image-select")).select_by_value("1")
        time.sleep(0.3)
        canvas = driver.find_element(By.TAG_NAME, "canvas")
        assert int(canvas.get_attribute("width")) / int(canvas.get_attribute("height")) == pytest.approx(0.5, abs=0.01)
        driver.get(write_viewer(rows).as_uri())
        time.sleep(0.5)
        assert Select(driver.find_element(By.ID, "image-select")).first_selected_option.text == "wide.png"
        canvas = driver.find_element(By.TAG_NAME, "canvas")
        assert canvas.get_attribute("width") == canvas.get_attribute("height")  # LLaVA's centre crop
        assert driver.find_element(By.ID, "legend-min").text == "0"  # attention is coloured from 0
        spans = driver.find_elements(By.CSS_SELECTOR, "#words span")
        assert spans[1].text == "[image]" and "image-span" in spans[1].get_attribute("class")
        assert "image-span" not in spans[0].get_attribute("class")
        assert not severe(driver)
    finally:
        driver.quit()


def test_computed_scales_span_every_shown_value_from_zero(maps_dir):
    """An npz-only export records no scales: the viewer's is one per quantity over the patch values
    of every image, block and head it shows (attention from 0; norms their own range)."""
    payload = load_viewer_data(maps_dir)
    grids = {"rows": [], "cls": [], "norm": []}
    for stem in ("china", "flower"):
        with np.load(maps_dir / f"{stem}.npz") as d:
            for layer in (2, LAYER):
                grids["rows"].append(d[f"full/layer{layer}"][..., 1:])  # one class token, then the patches
                grids["cls"].append(d[f"cls/layer{layer}"])
                grids["norm"].append(d[f"norm/layer{layer}"])
    scales = payload["scales"]
    assert set(scales) == {"rows", "cls", "norm"}
    for quantity in ("rows", "cls"):
        assert scales[quantity]["vmin"] == 0.0
        assert scales[quantity]["vmax"] == pytest.approx(max(float(g.max()) for g in grids[quantity]), rel=1e-6)
    assert scales["norm"]["vmin"] == pytest.approx(min(float(g.min()) for g in grids["norm"]), rel=1e-6)
    assert scales["norm"]["vmax"] == pytest.approx(max(float(g.max()) for g in grids["norm"]), rel=1e-6)
    assert scales["norm"]["vmin"] > 0  # norms are not pinned to 0


@pytest.fixture(scope="module")
def drawn_maps(tmp_path_factory):
    """A png + npz export: maps.json records the scales its PNGs were drawn on."""
    out = tmp_path_factory.mktemp("drawn")
    export_maps(vsink.load("demo"), demo_images(), out, kinds=["cls", "norm"], layers=[2, LAYER], progress=False)
    return out


def test_panels_of_one_quantity_share_the_recorded_scale_in_chromium(drawn_maps):
    """Two blocks and two images: each panel's own range differs, the colour scale does not; it is
    the one maps.json records for the PNGs (attention from 0)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    recorded = json.loads((drawn_maps / "maps.json").read_text())["scales"]
    assert recorded["cls"]["vmin"] == 0.0 and recorded["norm"]["vmin"] > 0
    driver = chrome()
    try:
        driver.get(write_viewer(drawn_maps, precision="float32").as_uri())
        time.sleep(0.5)
        for quantity in ("cls", "norm"):
            seen, panel_max = set(), []
            for image, layer in (("0", "2"), ("0", str(LAYER)), ("1", str(LAYER))):
                Select(driver.find_element(By.ID, "image-select")).select_by_value(image)
                time.sleep(0.3)
                Select(driver.find_element(By.ID, "layer-select")).select_by_value(layer)
                box = driver.find_element(By.ID, "norm-toggle")
                if box.is_selected() != (quantity == "norm"):
                    box.click()
                time.sleep(0.2)
                scale = driver.execute_script("return window.vsinkViewer.scale")
                drawn = tuple(driver.execute_script("return window.vsinkViewer.drawn"))  # the colours' range
                legend = (float(driver.find_element(By.ID, "legend-min").text),
                          float(driver.find_element(By.ID, "legend-max").text))
                assert drawn == (scale["vmin"], scale["vmax"])
                seen.add((scale["vmin"], scale["vmax"], legend))
                panel_max.append(float(shown(driver)[1:].max()))
            assert len(seen) == 1, quantity  # one scale for the three panels
            (vmin, vmax, legend), = seen
            assert (vmin, vmax) == (recorded[quantity]["vmin"], recorded[quantity]["vmax"])
            assert legend == (pytest.approx(vmin, rel=1e-3), pytest.approx(vmax, rel=1e-3))
            # per-panel min-max would have given three different ranges
            assert len({round(m, 6) for m in panel_max}) == 3 and max(panel_max) <= vmax * (1 + 1e-6)
        assert not severe(driver)
    finally:
        driver.quit()


def test_recorded_scales_must_hold_the_arrays(drawn_maps, tmp_path):
    import shutil

    from vsink.readers import ReadError

    copy = tmp_path / "copy"
    shutil.copytree(drawn_maps, copy)
    meta = json.loads((copy / "maps.json").read_text())
    meta["scales"]["cls"]["vmax"] /= 2
    (copy / "maps.json").write_text(json.dumps(meta))
    disagree = r"scales.cls \[0, .*\] in maps.json disagrees with .*(china|flower)\.npz: array 'cls/layer\d'"
    with pytest.raises(ReadError, match=disagree):
        load_viewer_data(copy)
    meta["scales"]["cls"]["vmax"] = "high"
    (copy / "maps.json").write_text(json.dumps(meta))
    with pytest.raises(ReadError, match="scales.cls: field 'vmax' must be a finite number"):
        load_viewer_data(copy)


def test_pool_maps_are_shown_in_chromium(tmp_path):
    """SigLIP2 has no class token and an attention-pooling head: its pool map (per head, of no
    block) is a map of the viewer; registers hooked in by with_registers never reach the head."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from conftest import hf_model, sharpen

    backbone = vsink.wrap(sharpen(hf_model("siglip2")))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    export_maps(backbone, [image], tmp_path / "m", kinds=["pool", "norm", "rollout"], heads="all", formats=["npz"],
                progress=False)
    with np.load(next((tmp_path / "m").glob("*.npz"))) as d:
        pool, rollout = d["pool"], d["rollout"]  # [heads, 4, 4], [4, 4]
    payload = load_viewer_data(tmp_path / "m", precision="float32")
    entry = payload["images"][0]["pool"]
    assert entry["heads"] == [0, 1, 2, 3]
    np.testing.assert_array_equal(decoded(entry["values"]), pool.reshape(4, 16))
    assert payload["scales"]["pool"]["vmin"] == 0 and payload["scales"]["pool"]["vmax"] == pytest.approx(pool.max())

    student = backbone.with_registers(2, init_std=0.1)
    export_maps(student, [image], tmp_path / "r", kinds=["pool"], formats=["npz"], progress=False)
    with np.load(next((tmp_path / "r").glob("*.npz"))) as d:
        mean = d["pool/mean"]
    values = decoded(load_viewer_data(tmp_path / "r", precision="float32")["images"][0]["pool"]["values"])
    assert values.shape == (1, 18) and np.isnan(values[0, :2]).all()  # the two hooked registers
    np.testing.assert_array_equal(values[0, 2:], mean.ravel())

    driver = chrome()
    try:
        driver.get(write_viewer(tmp_path / "m", precision="float32").as_uri())
        time.sleep(0.5)
        Select(driver.find_element(By.ID, "map-select")).select_by_value("pool")
        Select(driver.find_element(By.ID, "head-select")).select_by_value("2")
        time.sleep(0.2)
        np.testing.assert_allclose(shown(driver), pool[2].ravel(), rtol=1e-6)
        assert driver.find_element(By.ID, "what").text.startswith("pool (the pooling head")
        Select(driver.find_element(By.ID, "head-select")).select_by_value("mean")
        np.testing.assert_allclose(shown(driver), pool.mean(axis=0).ravel(), rtol=1e-5)
        assert driver.execute_script("return window.vsinkViewer.scale")["vmax"] == pytest.approx(pool.max())
        # the rollout (of no block either) is a map too, on its own scale
        Select(driver.find_element(By.ID, "map-select")).select_by_value("rollout")
        time.sleep(0.2)
        np.testing.assert_allclose(shown(driver), rollout.ravel(), rtol=1e-6)
        assert driver.execute_script("return window.vsinkViewer.drawn") == [0, pytest.approx(rollout.max())]
        assert not severe(driver)
    finally:
        driver.quit()
