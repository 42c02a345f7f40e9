"""One command-line grammar (issue 16, item 4): images are positional in every command (the old
spellings still work, with one deprecation line), list options take negative numbers, --device,
--dtype and --no-progress mean the same everywhere, --help shows every default, `vsink models`
lists every spec form, and the messages read as sentences (`registers apply`'s: tests/test_registers.py)."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from vsink.cli import build_parser, main
from vsink.option_docs import command_parsers, declared
from conftest import printed

#: the commands that load a model
MODEL_COMMANDS = ("vsink scan", "vsink maps", "vsink registers find", "vsink registers apply", "vsink eval dense",
                  "vsink eval pope", "vsink eval chair", "vsink generate", "vsink lvlm calibrate")
DEPRECATION = "is deprecated and will be removed in the next release; "


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def parse(*args) -> argparse.Namespace:
    return build_parser().parse_args([str(a) for a in args])


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (30, 120, 200)).save(path)
    return path


@pytest.fixture
def coco(tmp_path, image):
    """COCO instances of the one image: a dog."""
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": image.name}],
                                "annotations": [{"image_id": 1, "category_id": 18, "bbox": [0, 0, 10, 10]}],
                                "categories": [{"id": 18, "name": "dog"}]}))
    return path


# --- images: positional everywhere, old spellings deprecated ------------------------------------------

def test_lvlm_commands_take_images_as_positional_files_and_directories(tmp_path, image, capsys):
    folder = tmp_path / "more"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "red.png")
    code, out, err = run(capsys, "generate", image, folder, "--model", "demo-llava", "--prompt", "Describe it.",
                         "--max-new-tokens", "2", "--no-progress")
    assert code == 0, err
    assert f"[{image}] " in out and f"[{folder / 'red.png'}] " in out and "SYNTHETIC" in err
    code, out, err = run(capsys, "lvlm", "calibrate", folder, "--model", "demo-llava", "--no-progress",
                         "--out", tmp_path / "sinks.json")
    assert code == 0, err
    assert "(layers [1, 2, 3], 1 prompt)" in out


def test_calibrate_skips_and_reports_unreadable_images(tmp_path, capsys):
    # a batch run skips a bad file and says so, as scan and generate do; only bad files: one line
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "red.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    code, out, err = run(capsys, "lvlm", "calibrate", folder, "--model", "demo-llava", "--no-progress",
                         "--out", tmp_path / "sinks.json")
    assert code == 0, err
    assert "vsink: skipped" in err and "broken.jpg" in err
    assert "(layers [1, 2, 3], 1 prompt, 1 unreadable image(s) skipped)" in out
    (folder / "red.png").unlink()
    code, out, err = run(capsys, "lvlm", "calibrate", folder, "--model", "demo-llava", "--no-progress",
                         "--out", tmp_path / "none.json")
    assert code == 2 and "no image could be read (1 skipped" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("argv, flag, key", [
    (["generate", "--model", "demo-llava", "--prompt", "x", "--image", "{image}", "--image", "{image}"], "--image",
     "image"),
    (["lvlm", "calibrate", "--model", "demo-llava", "--image", "{image}"], "--image", "image"),
    (["eval", "pope", "--images", "{dir}"], "--images", "images_dir"),
    (["eval", "chair", "--images", "{dir}"], "--images", "images_dir"),
    (["eval", "dense", "--images", "{dir}"], "--images", "coco_images"),
], ids=["generate", "calibrate", "pope", "chair", "dense"])
def test_old_spellings_parse_with_one_deprecation_line(image, capsys, argv, flag, key):
    args = parse(*[a.format(image=image, dir=image.parent) for a in argv])
    err = capsys.readouterr().err
    assert err.startswith(f"vsink: warning: {flag} {DEPRECATION}") and err.count("\n") == 1
    assert getattr(args, key) in ([str(image)] * 2, [str(image)], str(image.parent))


def test_old_spellings_still_run(tmp_path, image, capsys):
    code, out, err = run(capsys, "generate", "--image", image, "--model", "demo-llava", "--prompt", "x",
                         "--max-new-tokens", "1", "--no-progress")
    assert code == 0, err
    assert f"[{image}] " in out and f"vsink: warning: --image {DEPRECATION}" in err
    # the old --images DIR reaches the command: refused for what the command says, not for the flag
    code, _, err = run(capsys, "eval", "dense", "--images", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "an image directory is given with --format coco only" in err
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "image": image.name, "object": "dog", "split": "random",
                                     "label": "yes", "text": "Is there a dog in the image?"}) + "\n")
    code, _, err = run(capsys, "eval", "pope", "--images", tmp_path, "--questions", questions, "--out", tmp_path / "o")
    assert code == 2 and err.endswith("vsink: error: running the model needs --model\n")


@pytest.mark.parametrize("argv", [
    ["generate", "{image}", "--image", "{image}", "--model", "demo-llava", "--prompt", "x"],
    ["eval", "pope", "{dir}", "--images", "{dir}", "--annotations", "{image}", "--model", "demo-llava", "--out",
     "{dir}/o"],
], ids=["generate", "pope"])
def test_both_spellings_at_once_are_refused(tmp_path, image, capsys, argv):
    code, _, err = run(capsys, *[a.format(image=image, dir=tmp_path) for a in argv])
    assert code == 2 and "positional argument" in err.splitlines()[-1] and "SYNTHETIC" not in err


def test_missing_image_dir_is_named_as_positional(tmp_path, coco, capsys):
    code, _, err = run(capsys, "eval", "chair", "--model", "demo-llava", "--annotations", coco,
                       "--out", tmp_path / "o")
    assert code == 2 and "running the model needs IMAGE_DIR" in err


# --- negative numbers in list options --------------------------------------------------------------------

@pytest.mark.parametrize("argv, key, value", [
    (["maps", "--layers", "-2,-1"], "layers", "-2,-1"),
    (["maps", "--heads", "-1"], "heads", "-1"),
    (["eval", "dense", "--lost-layers", "-1,-2"], "lost_layers", [-1, -2]),
    (["eval", "dense", "--lost-biases", "-0.5,1e-3"], "lost_biases", [-0.5, 0.001]),
    (["eval", "dense", "--seg-layer", "-2"], "seg_layer", -2),
    (["registers", "find", "--detection-layer", "-3"], "detection_layer", -3),
    (["view", ".", "--layers", "-1,-3"], "layers", [-1, -3]),
], ids=["maps-layers", "maps-heads", "lost-layers", "lost-biases", "seg-layer", "detection-layer", "view-layers"])
def test_negative_numbers_in_list_options(argv, key, value):
    assert getattr(parse(*argv), key) == value


def test_a_negative_value_is_still_checked(capsys):
    code, _, err = run(capsys, "eval", "dense", "--lost-layers", "-1,x")
    assert code == 2 and "--lost-layers: must be a non-empty list, each an integer, got '-1,x'" in err


def test_maps_negative_layers_and_a_one_line_size_warning(tmp_path, image, capsys):
    code, out, err = run(capsys, "maps", image, "--layers", "-2,-1", "--kind", "full", "--heads", "0",
                         "--format", "npz", "--no-progress", "--out", tmp_path / "maps")
    assert code == 0, err
    assert json.loads((tmp_path / "maps" / "maps.json").read_text())["settings"]["layers"] == [4, 5]
    warning = [line for line in err.splitlines() if "kind 'full'" in line]
    assert warning == ["vsink: warning: kind 'full' writes about 0.3 MiB per image (2 blocks x 1 head x 197^2 "
                       "float32), 0.3 MiB for all images"]
    assert "UserWarning" not in err and "warnings.warn" not in err
    assert "exported maps for 1 image (0 skipped)" in out and "photo.png: 1 file," in out


# --- the same --device, --dtype, --no-progress everywhere -----------------------------------------------

def test_device_dtype_and_no_progress_are_one_declaration_each():
    commands = dict(command_parsers(build_parser()))
    for key in ("device", "dtype", "no_progress"):
        found = {name: [o for o in declared(commands[name]) if o.key == key] for name in MODEL_COMMANDS}
        assert all(len(options) == 1 for options in found.values()), (key, found)
        assert len({options[0] for options in found.values()}) == 1, key  # the same help everywhere
    assert [o.key for o in declared(commands["vsink finetune"])].count("no_progress") == 1
    device = next(o for o in declared(commands["vsink generate"]) if o.key == "device")
    assert device.kind.from_text("auto") == "auto"


def test_device_auto_and_progress_bars_for_lvlm_commands(image, tmp_path, capsys):
    code, out, err = run(capsys, "generate", image, "--model", "demo-llava", "--device", "auto", "--prompt", "x",
                         "--max-new-tokens", "2")
    assert code == 0, err
    assert "generate: 100%" in err and "token/s" in err
    code, _, err = run(capsys, "lvlm", "calibrate", image, "--model", "demo-llava", "--device", "auto",
                       "--out", tmp_path / "sinks.json")
    assert code == 0 and "calibrate: 100%" in err
    code, _, err = run(capsys, "generate", image, "--model", "demo-llava", "--prompt", "x", "--max-new-tokens", "2",
                       "--no-progress")
    assert code == 0 and "%|" not in err


# --- --help shows every default ---------------------------------------------------------------------------

def test_help_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per flag, so a default is never cut by wrapping
    builtin = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    for name, parser in command_parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, builtin):
                continue
            option = action.option
            tail = "required" if option.required else f"default: {option.default_shown()}"
            assert tail in action.help, (name, action.dest, action.help)
            assert " ".join(action.help.replace("%%", "%").split()) in " ".join(text.split()), (name, action.dest)
    scan = dict(command_parsers(build_parser()))["vsink scan"].format_help()
    assert "hide progress bars (default: off)" in scan and "(an integer >= 1; default: 8)" in scan


# --- vsink models ---------------------------------------------------------------------------------------

def test_models_lists_every_spec_form_and_what_it_is_for(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    vision, _, lvlms = out.partition("LVLMs")
    for form in ("demo ", "timm:NAME", "open_clip:NAME", "hf:REPO_OR_LOCAL_DIR", "vsink.json", "LOCAL_DIR"):
        assert form in vision, form
    for form in ("demo-llava", "hf:REPO ", "hf:llava-hf/llava-1.5-7b-hf", "LLaVA-NeXT", "Qwen2-VL", "LOCAL_DIR"):
        assert form in lvlms, form
    assert "vsink scan, maps, registers, eval dense and finetune" in vision
    assert ("vsink generate, lvlm calibrate, eval pope|chair|mme|hallusionbench|object-halbench|amber, "
            "scan --prompt and ablate --questions") in lvlms


# --- messages -------------------------------------------------------------------------------------------

def test_scan_messages_count_and_say_when_nothing_was_found(tmp_path, image, capsys, demo_scan):
    code, out, err = run(capsys, "scan", image, "--threshold", "1e9", "--device", "auto", "--no-progress",
                         "--out", tmp_path)
    assert code == 0, err
    assert "scanned 1 image (0 skipped) with demo" in out
    assert "no high-norm tokens found" in out and "None" not in out
    out, _ = printed(demo_scan)  # "vsink scan" with every default, run once for the suite (conftest.py)
    assert "scanned 2 images (0 skipped)" in out and "high-norm tokens: emergence layer 2, " in out


def test_warnings_of_other_libraries_are_one_line_too(monkeypatch, capsys):
    import warnings

    import vsink.cli as cli

    def models(args):
        warnings.warn("first line\nsecond line", FutureWarning)
        return 0

    monkeypatch.setattr(cli, "_cmd_models", models)
    code, _, err = run(capsys, "models")
    assert code == 0 and err == "vsink: warning: FutureWarning: first line second line\n"
