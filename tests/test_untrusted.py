"""Untrusted input, round two (issue 20): inputs that used to hang, run a model's own code, or
make ``vsink view`` embed files from elsewhere.

* hangs: a YAML alias bomb in a recipe, a 1 MB CHAIR caption (each run in a subprocess with a
  generous time limit, so a regression fails instead of hanging the suite);
* code shipped with a model: a folder whose ``config.json`` has an ``auto_map`` to a Python file
  that writes a marker; stdin answers ``y``; the marker must never appear;
* folders read back (``vsink view``, traces, checkpoints, POPE/CHAIR image names): object
  arrays, missing keys, wrong shapes, JSON and npz that disagree, names that lead outside the
  folder;
* the viewer's embedded JSON in every HTML tokenizer state, in a real headless Chromium, and
  names, captions and prompts as text in the other pages;
* file names that matplotlib would parse as maths;
* POPE/CHAIR pages: deltas with 2 decimals, the synthetic banner, the protocol as a table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vsink
from vsink.cli import main
from vsink.errors import VsinkError

ROOT = Path(__file__).resolve().parents[1]
RUN_CLI = "import sys; from vsink.cli import main; sys.exit(main(sys.argv[1:]))"
MATH_NAME = "a$\\frac{$b.png"
HOSTILE_NAME = "<!--<script>c.png"


def vsink_subprocess(*argv, stdin: str = "", timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """``vsink ARGV`` in a fresh Python (this worktree's vsink first), killed after ``timeout``
    seconds: a hang fails the test instead of the suite."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", RUN_CLI, *map(str, argv)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=environment)


def one_error_line(result: subprocess.CompletedProcess, match: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("vsink: error: ") and result.stderr.count("vsink: error:") == 1, result.stderr
    assert re.search(match, last), last
    return last


def refused(capsys, *argv, match: str) -> str:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("vsink: error: ") and err.count("vsink: error:") == 1, err
    assert re.search(match, last), last
    return last


def png(path: Path, seed: int = 0, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path, format="PNG")
    return path


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` levels of ``width`` aliases: a few hundred bytes that expand to width**levels values."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


# --- hangs ----------------------------------------------------------------------------------------

def test_alias_bomb_in_a_recipe_is_refused_quickly(tmp_path):
    """Nine levels of nine aliases in ``model.model_kwargs``: refused with one line, in seconds
    (the time limit is a hang detector, not a speed test)."""
    recipe = tmp_path / "bomb.yaml"
    bomb = "\n".join("    " + line for line in alias_bomb().splitlines())
    recipe.write_text(f"model:\n  spec: timm:vit_tiny_patch16_224\n  model_kwargs:\n{bomb}\n")
    result = vsink_subprocess("finetune", "--config", recipe, f"out={tmp_path / 'run'}", "--no-progress", timeout=120)
    one_error_line(result, r"bomb\.yaml: its aliases \(\*name\) expand it to more than")
    assert not (tmp_path / "run").exists()


def test_alias_bomb_in_an_override_is_refused(tmp_path, capsys):
    flow = "{" + alias_bomb(6, 9).replace("\n", ", ").rstrip(", ") + "}"
    refused(capsys, "finetune", f"model.model_kwargs={flow}", f"out={tmp_path / 'run'}", "--no-progress",
            match=r"model\.model_kwargs=\.\.\.: its aliases")


def test_walks_of_shared_values_are_linear():
    """The checks memoise by identity: a value that repeats one part 9**9 times is measured, shown
    and refused as a mapping without expanding it; a value that contains itself is refused."""
    import yaml

    from vsink.options import MAX_VALUES, Invalid, Mapping_, measure, nesting_depth, shown

    bomb = yaml.safe_load(alias_bomb())
    sizes = [10]  # l0: a list of 9 scalars; l(i): a list of 9 copies of l(i-1)
    for _ in range(8):
        sizes.append(1 + 9 * sizes[-1])
    assert measure(bomb, depth=100, nodes=10**12) == (10, 1 + sum(sizes))
    assert nesting_depth(bomb) == 10
    assert len(shown(bomb)) <= 300
    with pytest.raises(Invalid, match=f"more than {MAX_VALUES:,} values"):
        Mapping_().parse(bomb)
    loop: list = []
    loop.append(loop)
    assert nesting_depth({"a": loop}) > 32
    with pytest.raises(Invalid, match="nested deeper"):
        Mapping_().parse({"a": loop})
    shared = {"k": [1, 2]}
    assert measure([shared, shared]) == (3, 1 + 2 * (1 + 1 + 2))  # counted as often as reached
    assert measure({"a": {"b": 1}}) == (2, 3) and measure(5) == (0, 1)


def test_yaml_aliases_that_stay_small_are_kept():
    from vsink.readers import parse_yaml

    assert parse_yaml("base: &b {lr: 0.1}\nrun: *b\n", "x") == {"base": {"lr": 0.1}, "run": {"lr": 0.1}}


def coco_instances(path: Path, classes=(1,)) -> Path:
    """COCO instances of one image ``img1.png`` holding ``classes`` (1 dog, 2 cat, 3 car, ...)."""
    names = ("dog", "cat", "car", "person", "bus", "train", "boat")
    data = {"images": [{"id": 1, "file_name": "img1.png", "width": 40, "height": 40}],
            "annotations": [{"id": k, "image_id": 1, "category_id": c, "bbox": [2, 2, 20, 20], "iscrowd": 0,
                             "area": 400} for k, c in enumerate(classes, 1)],
            "categories": [{"id": i, "name": n} for i, n in enumerate(names, 1)]}
    path.write_text(json.dumps(data))
    return path


def test_a_1mb_caption_is_scored_and_written(tmp_path):
    """One 1 MB caption with ~100,000 object mentions: results.html is written, every mention
    marked (the marking used to be quadratic: hours)."""
    caption = "A dog sits near a cat and a car. " * 32_000
    assert len(caption) > 10**6
    generated = tmp_path / "generated.jsonl"
    generated.write_text(json.dumps({"image_id": 1, "caption": caption}) + "\n")
    result = vsink_subprocess("eval", "chair", "--generated", generated, "--annotations",
                              coco_instances(tmp_path / "instances.json"), "--out", tmp_path / "out", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "out" / "results.html").read_text()
    assert page.count("<mark class='ok'>dog</mark>") == 32_000
    assert page.count("<mark class='halluc'>cat</mark>") == 32_000
    assert page.count("<mark class='halluc'>car</mark>") == 32_000


def test_locate_marks_a_repeated_word_at_each_unused_occurrence():
    """Hand-checked: a repeated word moves on to its next occurrence; an occurrence inside an
    earlier mark ("hot dog") is not reused; a word with no free occurrence is listed as missing."""
    from vsink.export.hallucination_report import _locate

    text, missing = _locate("Two dogs, a dog and a hot dog.", ["hot dog", "dog", "dog", "dog"],
                            [False, True, False, True])
    assert text == ("Two <mark class='halluc'>dogs</mark>, a <mark class='ok'>dog</mark> and a "
                    "<mark class='ok'>hot dog</mark>.")
    assert missing == ["dog"]


# --- code shipped with a model --------------------------------------------------------------------

@pytest.fixture()
def remote_code_folder(tmp_path):
    """A Hugging Face folder whose config names its own Python (``auto_map``); importing that
    Python writes ``marker``."""
    folder = tmp_path / "custom-model"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom_vit", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "custom_code.CustomConfig", "AutoModel": "custom_code.CustomModel",
                     "AutoImageProcessor": "custom_code.CustomProcessor"}}))
    (folder / "custom_code.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('the folder ran its code')\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom_vit'\n")
    return folder, marker


@pytest.mark.parametrize("argv, flag", [
    (["scan", "--model", "{folder}", "--out", "{out}"], None),
    (["scan", "--model", "hf:{folder}", "--out", "{out}"], None),
    (["generate", "{image}", "--model", "{folder}", "--prompt", "<image> hi"], "--trust-remote-code"),
    (["eval", "pope", "{images}", "--model", "{folder}", "--annotations", "{annotations}", "--out", "{out}"],
     "--trust-remote-code"),
], ids=["scan", "scan-hf-prefix", "generate", "eval-pope"])
def test_a_models_own_code_never_runs_from_the_cli(remote_code_folder, tmp_path, argv, flag):
    folder, marker = remote_code_folder
    image = png(tmp_path / "images" / "img1.png")
    annotations = coco_instances(tmp_path / "instances.json", classes=(1, 2, 3))
    args = [a.format(folder=folder, out=tmp_path / "out", image=image, images=image.parent, annotations=annotations)
            for a in argv]
    result = vsink_subprocess(*args, stdin="y\ny\ny\n", timeout=180)
    assert not marker.exists()
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    if argv[0] == "eval" and result.returncode == 2 and "remote code" not in result.stderr:
        pytest.fail(f"refused for another reason first: {result.stderr[-400:]}")
    last = one_error_line(result, r"ships its own Python code \(auto_map in config\.json\); remote code is refused")
    assert (f"pass {flag}" in last) if flag else ("--trust-remote-code applies to LVLMs" in last)


def test_a_models_own_code_never_runs_from_the_python_api(remote_code_folder, monkeypatch):
    """``vsink.load`` and ``load_lvlm`` with stdin answering yes, ``trust_remote_code`` left out
    or None: refused, never asked."""
    import io

    from vsink.backbones.hf_lvlm import load_lvlm

    folder, marker = remote_code_folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    with pytest.raises(VsinkError, match="remote code is refused: vsink never runs it for vision models"):
        vsink.load(str(folder))
    with pytest.raises(VsinkError, match="remote code is refused"):
        vsink.load(f"hf:{folder}", model_kwargs={"trust_remote_code": True})
    for trust in (False, None, "yes"):
        with pytest.raises(VsinkError, match=r"remote code is refused: pass --trust-remote-code \(trust_remote_code"):
            load_lvlm(str(folder), trust_remote_code=trust)
    assert not marker.exists()
    assert sys.stdin.read() == "y\n" * 10  # nothing asked, nothing read


def test_generate_names_why_a_processor_shipping_its_own_code_was_left_out(tmp_path, capsys, monkeypatch):
    """An LLaVA folder whose image processor is named by ``auto_map`` (its config lifted out of
    processor_config.json into preprocessor_config.json): the model loads, transformers refuses the
    processor, and generate's one line says so and names the flag, with stdin answering yes."""
    import io

    from vsink.data.demo_lvlm import build_tiny_llava

    folder, marker = tmp_path / "llava", tmp_path / "MARKER"
    model, processor = build_tiny_llava()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "processor_config.json").read_text())
    image_processor = config.pop("image_processor")
    (folder / "processor_config.json").write_text(json.dumps(config))
    image_processor.update(image_processor_type="CustomImageProcessor",
                           auto_map={"AutoImageProcessor": "custom_code.CustomImageProcessor"})
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor))
    (folder / "custom_code.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 4))
    last = refused(capsys, "generate", png(tmp_path / "img.png"), "--model", folder, "--prompt", "<image> hi",
                   "--max-new-tokens", "1", "--no-progress",
                   match=r"no processor was loaded \(its processor ships its own Python code .*remote code is refused: "
                         r"pass --trust-remote-code")
    assert "auto_map" in last and not marker.exists()


def test_loaders_that_vsink_does_not_call_directly_cannot_ask(remote_code_folder, monkeypatch):
    """While a library builds a model (open_clip's Hugging Face text towers call AutoConfig
    themselves), a question on stdin becomes a refusal."""
    import io

    from transformers import AutoConfig

    from vsink.backbones.remote_code import no_remote_code_prompt

    folder, marker = remote_code_folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with no_remote_code_prompt(), pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(str(folder))
    assert not marker.exists()


# --- matplotlib maths in file names ---------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    """A folder of two photos named like maths and like markup."""
    root = tmp_path_factory.mktemp("odd") / "images"
    png(root / MATH_NAME, seed=1)
    png(root / HOSTILE_NAME, seed=2)
    return root


@pytest.fixture(scope="module")
def odd_maps(odd_names, tmp_path_factory):
    out = tmp_path_factory.mktemp("odd-maps") / "maps"
    assert main(["maps", str(odd_names), "--kind", "cls,norm", "--layers", "1,5", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_names_with_dollars_do_not_kill_maps(odd_maps):
    meta = json.loads((odd_maps / "maps.json").read_text())
    entry = next(e for e in meta["images"] if e["image"].endswith(MATH_NAME))
    pngs = sorted((odd_maps / entry["stem"]).glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)


def test_names_with_dollars_do_not_kill_scan(odd_names, tmp_path, capsys):
    assert main(["scan", str(odd_names), "--out", str(tmp_path / "scan"), "--no-progress"]) == 0
    capsys.readouterr()
    report = (tmp_path / "scan" / "report.html").read_text()
    assert 'alt="norm maps: ' in report and MATH_NAME in report  # the name, as text beside its figure
    assert "&lt;!--&lt;script&gt;c.png" in report and HOSTILE_NAME not in report


def test_figure_titles_show_dollars_as_written():
    from vsink.export.layer_figures import norm_small_multiples_figure

    image = Image.new("RGB", (32, 32))
    figure = norm_small_multiples_figure(image, {0: np.ones((2, 2)), 1: np.arange(4.0).reshape(2, 2)}, MATH_NAME)
    title = figure._suptitle
    assert title.get_text() == MATH_NAME and title.get_parse_math() is False
    from vsink.export.figures import png_bytes

    assert png_bytes(figure)[:4] == b"\x89PNG"


def test_every_figure_builder_turns_mathtext_off():
    """Every function of vsink.export that makes a matplotlib figure is wrapped in plain_text
    (a new figure without it would break on the first file name with two dollars)."""
    import importlib
    import inspect
    import pkgutil

    import vsink.export

    builders = []
    for info in pkgutil.iter_modules(vsink.export.__path__):
        module = importlib.import_module(f"vsink.export.{info.name}")
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                source = inspect.getsource(inspect.unwrap(fn))
                if "plt.subplots" in source or "plt.figure" in source:
                    builders.append((module.__name__, name, getattr(fn, "plain_text", False)))
    assert len(builders) >= 10
    assert [b for b in builders if not b[2]] == []
    elsewhere = [str(p) for p in (ROOT / "vsink").rglob("*.py") if "export" not in p.parts
                 and re.search(r"plt\.(subplots|figure)\(", p.read_text())]
    assert elsewhere == []  # figures are built in vsink/export only


# --- the viewer: HTML tokenizer states, folders read back -----------------------------------------

def test_viewer_json_has_no_character_that_changes_the_html_or_script():
    from vsink.export.viewer import render_viewer, script_json

    value = {"name": "<!--<script>a</script>&amp;\u2028\u2029-->"}
    text = script_json(value)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == value
    page = render_viewer({"kind": "vision", "images": [], "name": value["name"]}, "t")
    data = page.split("<script id='vsink-data' type='application/json'>", 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["name"] == value["name"]


def test_a_markup_name_renders_as_text_in_chromium(odd_maps):
    """``<!--<script>c.png`` used to leave a blank page (the JSON opened an HTML comment inside
    the script element). The page now runs, and both names show as text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from browser import chrome
    from vsink.export.viewer import write_viewer

    path = write_viewer(odd_maps, odd_maps.parent / "viewer.html")
    driver = chrome()
    try:
        driver.get(path.as_uri())
        time.sleep(0.5)
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        options = [o.text for o in Select(driver.find_element(By.ID, "image-select")).options]
        assert any(HOSTILE_NAME in o for o in options) and any(MATH_NAME in o for o in options), options
        assert driver.execute_script("return document.querySelectorAll('#app canvas').length") > 0
        assert driver.execute_script("return document.querySelectorAll('script').length") == 2
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def maps_dir(tmp_path_factory):
    from vsink.maps import export_maps

    out = tmp_path_factory.mktemp("maps")
    export_maps(vsink.load("demo"), [Image.open(png(out.parent / "src" / "one.png", size=64))], out,
                kinds=["cls", "norm"], layers=[1, 2], heads="all", formats=["npz"], progress=False)
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def rewrite_npz(path: Path, change) -> None:
    with np.load(path, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    change(arrays)
    np.savez(path, **arrays)


def view_refused(capsys, folder: Path, match: str) -> None:
    refused(capsys, "view", folder, match=match)
    assert not (folder / "viewer.html").exists()


def test_view_of_a_sound_folder(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    assert main(["view", str(folder)]) == 0
    assert (folder / "viewer.html").is_file()


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "sub/../../secret"], ids=["dotdot", "absolute", "nested"])
def test_view_refuses_names_outside_the_folder(maps_dir, tmp_path, capsys, name):
    folder = copy_of(maps_dir, tmp_path)
    (tmp_path / "secret.npz").write_bytes((folder / "one.npz").read_bytes())
    meta = json.loads((folder / "maps.json").read_text())
    meta["images"][0]["stem"] = name
    (folder / "maps.json").write_text(json.dumps(meta))
    view_refused(capsys, folder, r"maps\.json: images\[0\]: field 'stem': .* points outside")


def test_view_refuses_a_link_that_leads_outside(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere.npz"
    (folder / "one.npz").rename(elsewhere)
    (folder / "one.npz").symlink_to(elsewhere)
    view_refused(capsys, folder, r"'one' is a link that points outside")


def test_view_refuses_object_arrays(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    rewrite_npz(folder / "one.npz", lambda a: a.update({"norm/layer1": np.array([{"x": 1}], dtype=object)}))
    view_refused(capsys, folder, r"one\.npz: array 'norm/layer1' cannot be read without running code")


def test_view_refuses_missing_arrays(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    rewrite_npz(folder / "one.npz", lambda a: a.pop("norm/layer1/prefix"))
    view_refused(capsys, folder, r"one\.npz: missing array 'norm/layer1/prefix'")


def test_view_refuses_arrays_of_the_wrong_shape(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    rewrite_npz(folder / "one.npz", lambda a: a.update({"norm/layer2": a["norm/layer2"][:3]}))
    view_refused(capsys, folder, r"one\.npz: array 'norm/layer2' has shape \[3, 14\]; expected \[14, 14\] "
                                 r"\(the layout in .*maps\.json\)")


def test_view_refuses_json_and_npz_that_disagree(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    meta = json.loads((folder / "maps.json").read_text())
    meta["images"][0]["layout"]["grid"] = [7, 7]
    (folder / "maps.json").write_text(json.dumps(meta))
    view_refused(capsys, folder, r"has shape \[14, 14\]; expected \[7, 7\]")
    meta["images"][0]["layout"] = "14x14"
    (folder / "maps.json").write_text(json.dumps(meta))
    view_refused(capsys, folder, r"field 'layout': not a token layout")


def test_view_refuses_a_file_that_is_not_an_npz(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    (folder / "one.npz").write_bytes(b"PK\x03\x04 not really a zip")
    view_refused(capsys, folder, r"one\.npz: not a readable \.npz archive")


@pytest.fixture(scope="module")
def scanned(demo_scan):
    """The demo's scan (run once for the suite: conftest.py); the tests change copies of it."""
    return demo_scan


def test_a_scan_whose_json_and_trace_disagree(scanned, tmp_path, capsys):
    folder = copy_of(scanned, tmp_path)
    meta = json.loads((folder / "scan.json").read_text())
    meta["images"] = meta["images"][:1]
    (folder / "scan.json").write_text(json.dumps(meta))
    view_refused(capsys, folder, r"scan\.json lists 1 images but .*trace\.npz holds \d+; the two come from "
                                 r"different runs")


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update({"norms": a["norms"][:, :, :-1]}), r"array 'norms' has shape .*expected"),
    (lambda a: a.update({"header": np.array("[1, 2]")}), r"array 'header' must be a JSON object"),
    (lambda a: a.update({"attn_cls": np.array([None], dtype=object)}), r"array 'attn_cls' cannot be read"),
    (lambda a: a.pop("header"), r"missing array 'header'"),
], ids=["wrong-shape", "header-not-object", "object-array", "no-header"])
def test_a_damaged_trace(scanned, tmp_path, capsys, change, match):
    folder = copy_of(scanned, tmp_path)
    rewrite_npz(folder / "trace.npz", change)
    with pytest.raises(VsinkError, match=match):
        vsink.Trace.load(folder / "trace.npz")
    view_refused(capsys, folder, match)


# --- the hallucination report ---------------------------------------------------------------------

def chair_summary(synthetic: bool) -> dict:
    base = {"chair_s": 0.5, "chair_i": 0.25, "recall": 0.8, "avg_len": 12.0, "n": 2, "mentions": 4,
            "hallucinated_mentions": 1, "captions": []}
    var = {**base, "chair_s": 0.4987654, "chair_i": 0.2112345, "recall": 0.8}
    return {"kind": "chair", "baseline": "none", "skipped": {}, "results": {"none": base, "var": var},
            "protocol": {"prompt": "Describe <this> image.\nIn detail.", "max_new_tokens": 512, "seed": 0,
                         "model": "demo-llava", "synthetic": synthetic, "settings": {"var": {"p": 0.6}},
                         "images": ["a.png", "b.png"]}}


def test_chair_deltas_have_two_decimals():
    """chair_s 49.87654 − 50 = −0.12346 → "−0.12"; chair_i 21.12345 − 25 → "−3.88"; equal → "±0.00"."""
    from vsink.export.hallucination_report import hallucination_html

    page = hallucination_html(chair_summary(False))
    deltas = re.findall(r"<span class='(?:pos|neg|muted)'>([^<]*)</span>", page)
    assert "−0.12" in deltas and "−3.88" in deltas and "±0.00" in deltas
    assert not [d for d in deltas if re.search(r"\.\d{3}", d)]


def test_synthetic_pages_carry_the_banner_and_a_protocol_table():
    from vsink.export.hallucination_report import hallucination_html

    page = hallucination_html(chair_summary(True))
    assert "Synthetic demo LVLM" in page
    assert "<td class='l'>prompt</td><td class='l'><code style='white-space:pre-wrap'>Describe &lt;this&gt; image.\n" \
           "In detail.</code></td>" in page
    assert "<td class='l'>images</td><td class='l'>2 images</td>" in page
    assert '{"' not in page.split("<h2>Scores</h2>")[0].split("<td class='l'>settings</td>")[0]
    assert "Synthetic demo LVLM" not in hallucination_html(chair_summary(False))


def test_captions_and_prompts_are_text_in_results_html():
    from vsink.export.hallucination_report import hallucination_html

    summary = chair_summary(False)
    summary["results"]["none"]["captions"] = [
        {"image_id": 1, "caption": "<!--<script>a dog</script>", "mentioned": ["dog"], "mentioned_words": ["dog"],
         "hallucinated": []}]
    page = hallucination_html(summary)
    assert "&lt;!--&lt;script&gt;a <mark class='ok'>dog</mark>&lt;/script&gt;" in page
    assert "<script" not in page and "<!--" not in page


# --- checkpoints read back -----------------------------------------------------------------------

def test_checkpoint_folders_that_lead_outside_or_are_misnamed(tmp_path):
    from vsink.readers import ReadError
    from vsink.train.checkpoint import list_checkpoints

    run = tmp_path / "run" / "checkpoints"
    for name in ("step_0000002", "step_latest", "step_0000001"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"")
        (run / name / "state.pt").write_bytes(b"")
    assert [p.name for p in list_checkpoints(run)] == ["step_0000001", "step_0000002"]
    elsewhere = tmp_path / "elsewhere"
    (run / "step_0000002").rename(elsewhere)
    (run / "step_0000002").symlink_to(elsewhere)
    with pytest.raises(ReadError, match="step_0000002' is a link that points outside"):
        list_checkpoints(run)


def test_view_refuses_a_kind_listed_in_maps_json_but_not_in_the_npz(maps_dir, tmp_path, capsys):
    folder = copy_of(maps_dir, tmp_path)
    rewrite_npz(folder / "one.npz", lambda a: [a.pop(k) for k in list(a) if k.startswith("cls/layer2")])
    view_refused(capsys, folder, r"one\.npz: missing array 'cls/layer2/prefix'")


def lvlm_row(path: Path, **override) -> Path:
    """A ``vsink generate --export-attention`` row: 3 words, 2 layers, a 2 × 3 grid."""
    arrays = {"attention": np.full((3, 2, 2, 3), 1 / 6, np.float32),
              "layer_mean": np.full((3, 2, 3), 1 / 6, np.float32),
              "tokens": np.array([5, 6, 7]), "words": np.asarray(json.dumps(["a", "<image>", "c"])),
              "grid": np.array([2, 3]), "mitigation": np.asarray("none"), "protocol": np.asarray("default"),
              "settings": np.asarray("{}")}
    arrays.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_view_of_lvlm_rows(tmp_path, capsys):
    lvlm_row(tmp_path / "rows" / "row0.npz")
    assert main(["view", str(tmp_path / "rows")]) == 0
    page = (tmp_path / "rows" / "viewer.html").read_text()
    assert "\\u003cimage\\u003e" in page


@pytest.mark.parametrize("override, match", [
    ({"grid": np.array([3, 3])}, r"row0\.npz: array 'grid' \[3, 3\] disagrees with array 'attention' \[3, 2, 2, 3\]"),
    ({"words": np.asarray(json.dumps(["a"]))}, r"row0\.npz: 1 words but array 'attention' has 3 steps"),
    ({"words": np.array([{"a": 1}], dtype=object)}, r"array 'words' cannot be read without running code"),
    ({"attention": np.zeros((3, 2, 6))}, r"array 'attention' has shape \[3, 2, 6\]; expected \[\*, \*, \*, \*\]"),
    ({"image": np.zeros((4, 4), np.float32)}, r"array 'image' must hold uint8 RGB pixels"),
    ({"mitigation": np.array(3)}, r"array 'mitigation' must be a text"),
], ids=["grid", "words-count", "words-object", "attention-shape", "image", "mitigation"])
def test_view_refuses_lvlm_rows_that_disagree(tmp_path, capsys, override, match):
    lvlm_row(tmp_path / "rows" / "row0.npz", **override)
    view_refused(capsys, tmp_path / "rows", match)


def test_a_chair_run_of_the_demo_lvlm_is_marked_synthetic(tmp_path, capsys):
    png(tmp_path / "images" / "img1.png")
    code = main(["eval", "chair", str(tmp_path / "images"), "--model", "demo-llava", "--annotations",
                 str(coco_instances(tmp_path / "instances.json")), "--max-new-tokens", "2", "--no-progress",
                 "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    page = (tmp_path / "out" / "results.html").read_text()
    assert "Synthetic demo LVLM" in page and "<td class='l'>synthetic</td><td class='l'>true</td>" in page
    assert "Synthetic demo LVLM" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["protocol"]["synthetic"] is True


def test_pope_pages_carry_the_banner_too():
    from vsink.export.hallucination_report import hallucination_html

    split = {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 0.66666, "yes_ratio": 1.0, "n": 6,
             "unparseable": 0}
    summary = {"kind": "pope", "baseline": "none", "skipped": {},
               "results": {"none": {"splits": {"random": split}, "mean": split}},
               "protocol": {"prompt": "{question}", "parser": "first-word", "synthetic": True, "images": ["a"]}}
    page = hallucination_html(summary)
    assert "Synthetic demo LVLM" in page and "<td class='l'>parser</td>" in page


def test_view_refuses_a_trace_that_is_a_link_outside_the_folder(scanned, tmp_path, capsys):
    folder = copy_of(scanned, tmp_path)
    elsewhere = tmp_path / "elsewhere.npz"
    (folder / "trace.npz").rename(elsewhere)
    (folder / "trace.npz").symlink_to(elsewhere)
    view_refused(capsys, folder, r"'trace\.npz' is a link that points outside")


def test_question_images_outside_the_image_folder_are_skipped(tmp_path, capsys):
    """A questions file naming ``../secret.png`` (or an absolute path): that item is skipped and
    reported, the image outside --images is never read."""
    png(tmp_path / "images" / "img1.png")
    png(tmp_path / "secret.png", seed=5)
    rows = [{"question_id": 0, "image": "img1.png", "object": "dog", "split": "random", "label": "yes",
             "text": "Is there a dog in the image?"},
            {"question_id": 1, "image": "../secret.png", "object": "cat", "split": "random", "label": "no",
             "text": "Is there a cat in the image?"},
            {"question_id": 2, "image": str(tmp_path / "secret.png"), "object": "cat", "split": "random",
             "label": "no", "text": "Is there a cat in the image?"}]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["eval", "pope", str(tmp_path / "images"), "--model", "demo-llava", "--questions", str(questions),
                 "--max-new-tokens", "1", "--no-progress", "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    reasons = {s["item"]: s["reason"] for s in results["skipped"]["none"]}
    assert set(reasons) == {"1", "2"} and all("points outside" in r for r in reasons.values()), reasons
    answered = [json.loads(line)["question_id"] for line in (tmp_path / "out" / "none" / "answers.jsonl").open()]
    assert answered == [0]
