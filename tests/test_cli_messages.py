"""What the CLI says when a newcomer takes a wrong turn: each message names the real problem and
what to do, in one line with exit code 2 (found by trying the CLI as a stranger would)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import skimage_photo
from vsink.cli import main
from vsink.layout import TokenLayout


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("args", [
    ["generate", "{photo}", "--model", "demo", "--prompt", "x", "--max-new-tokens", "1"],
    ["lvlm", "calibrate", "{photo}", "--model", "timm:vit_tiny_patch16_224", "--out", "{tmp}/s.json"],
    ["scan", "{photo}", "--prompt", "describe", "--out", "{tmp}/o"],  # the default model is the vision demo
])
def test_a_vision_model_where_an_lvlm_is_needed_is_named_not_fetched(args, photo, tmp_path, capsys):
    code, _, err = run(capsys, *[a.format(photo=photo, tmp=tmp_path) for a in args])
    assert code == 2 and "is a vision model; an LVLM is needed here: demo-llava" in err
    assert "huggingface.co" not in err and "Traceback" not in err


def test_old_image_flags_on_commands_that_never_had_them_point_to_positional_images(photo, tmp_path, capsys):
    code, _, err = run(capsys, "scan", "--image", str(photo), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("vsink: error: vsink scan: unrecognized arguments: --image")  # the subcommand, once
    assert "images are positional arguments" in err and "(see 'vsink scan --help')" in err


def test_ttr_without_neurons_names_commands_that_exist(photo, capsys):
    code, _, err = run(capsys, "generate", str(photo), "--model", "demo-llava", "--prompt", "x",
                       "--mitigation", "ttr", "--max-new-tokens", "1", "--no-progress")
    assert code == 2 and "'vsink registers find --model TOWER'" in err and "--vision-tower" not in err


def test_a_neuron_spec_from_another_model_warns(tmp_path, capsys):
    spec = tmp_path / "tower.json"
    spec.write_text(json.dumps({"model": "demo-llava", "neurons": [{"layer": 1, "neuron": 3, "score": 1.0}]}))
    code, _, err = run(capsys, "scan", "--test-time-registers", str(spec), "--out", str(tmp_path / "o"),
                       "--no-progress")
    assert code == 0
    assert "vsink: warning: the neuron spec was found on 'demo-llava' and is applied to 'demo'" in err


def test_a_neuron_spec_of_an_lvlm_tower_fits_that_tower_silently():
    from vsink.registers import NeuronSpec, RegisterNeuron

    class Tower:
        spec, num_layers = "hf:llava-hf/llava-1.5-7b-hf#vision_tower", 2

        def mlp_width(self, layer):
            return 8

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeuronSpec("hf:llava-hf/llava-1.5-7b-hf", [RegisterNeuron(0, 1, 1.0)]).check(Tower())


def test_ttr_flags_without_a_spec_say_they_did_nothing(photo, tmp_path, capsys):
    code, _, err = run(capsys, "scan", str(photo), "--ttr-registers", "4", "--ttr-mode", "mean",
                       "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 0
    assert "vsink: warning: --ttr-registers, --ttr-mode did nothing: test-time registers apply only with " \
           "--test-time-registers" in err


@pytest.mark.parametrize("command", [["scan"], ["maps"], ["registers", "find"]])
def test_only_unreadable_images_fail_once_with_the_reason(command, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"")
    out_flag = str(tmp_path / ("n.json" if command[0] == "registers" else "o"))
    code, out, err = run(capsys, *command, str(tmp_path / "x.png"), "--out", out_flag, "--no-progress")
    assert code == 2
    assert err.count("vsink: skipped") == 1 and "x.png: empty file" in err
    assert err.rstrip().splitlines()[-1].startswith("vsink: error: no image could be")
    assert "exported maps" not in out


def test_registers_find_reports_the_files_it_skips(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"")
    skimage_photo("astronaut").image.save(tmp_path / "astronaut.png")
    code, _, err = run(capsys, "registers", "find", str(tmp_path / "x.png"), str(tmp_path / "astronaut.png"), "--out",
                       str(tmp_path / "n.json"), "--no-progress")
    assert code == 0 and "vsink: skipped" in err and "x.png: empty file" in err


def test_an_offline_hub_failure_names_the_flags_and_not_every_spec_form(photo, tmp_path, capsys, monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub.\nCheck your connection.")

    monkeypatch.setattr(timm, "create_model", offline)
    code, _, err = run(capsys, "scan", str(photo), "--model", "timm:vit_small_patch16_224", "--out",
                       str(tmp_path / "o"), "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "OSError: We couldn't connect to the hub. Check your connection" in err
    assert "--weights PATH" in err and "--no-pretrained" in err and "supported model specs" not in err


def test_a_file_where_a_directory_is_needed_says_so(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    code, _, err = run(capsys, "view", str(tmp_path / "f.txt"))
    assert code == 2 and "(not a directory)" in err and "no such" not in err


def test_an_empty_weights_file_says_it_is_empty(photo, tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(b"")
    code, _, err = run(capsys, "scan", str(photo), "--weights", str(tmp_path / "w.pt"), "--out",
                       str(tmp_path / "o"), "--no-progress")
    assert code == 2 and "w.pt: the file is empty" in err


@pytest.mark.parametrize("layers, message", [
    ("99", "layers [99] out of range: indices in [-6, 5] for 6 layers"),
    ("1,-5", "layers [1] given more than once"),
])
def test_maps_layer_selection(layers, message, tmp_path, capsys):
    code, _, err = run(capsys, "maps", f"--layers={layers}", "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and message in err


@pytest.mark.parametrize("command", [["generate", "{photo}", "--model", "demo-llava"],
                                     ["lvlm", "calibrate", "{photo}", "--model", "demo-llava"]])
def test_an_empty_prompt_is_refused(command, photo, capsys):
    code, _, err = run(capsys, *[a.format(photo=photo) for a in command], "--prompt", " ")
    assert code == 2 and "must be a non-empty prompt" in err


def test_layout_counts_its_tokens_in_words():
    assert TokenLayout(1, 1, (2, 2), 1).describe() == "1 cls + 1 register + 2x2 patches + 1 appended register"
    assert TokenLayout(1, 0, (2, 2), 2).describe() == "1 cls + 0 registers + 2x2 patches + 2 appended registers"


def test_finetune_overrides_may_follow_resume(tmp_path, capsys):
    """KEY=VALUE after --resume is an override like the ones before it (here a misspelt one, so
    nothing trains): refused for its key, not as an unrecognised argument."""
    code, _, err = run(capsys, "finetune", f"out={tmp_path / 'run'}", "--resume", "train.stepz=3", "--no-progress")
    assert code == 2 and "override: unknown key 'train.stepz'; did you mean 'train.steps'?" in err
    assert "unrecognized" not in err and not (tmp_path / "run").exists()


def test_every_demo_model_says_it_is_synthetic_and_its_outputs_record_it(photo, tmp_path, capsys):
    """The flag comes from the model (its builder), not from its spec's name: the demo LVLM's
    tower is synthetic too, and a copy with registers stays synthetic."""
    import vsink

    code, _, err = run(capsys, "maps", str(photo), "--model", "demo-llava", "--layers", "0", "--out",
                       str(tmp_path / "m"), "--no-progress")
    assert code == 0 and "vsink: model 'demo-llava' is SYNTHETIC: the vision tower of the demo LVLM" in err
    assert json.loads((tmp_path / "m" / "maps.json").read_text())["synthetic"] is True
    assert vsink.load("demo").with_registers(2).synthetic
    real = vsink.load("timm:vit_tiny_patch16_224", pretrained=False, img_size=32,
                      model_kwargs={"patch_size": 8, "depth": 1})
    assert real.synthetic is None and vsink.scan(real, [str(photo)], progress=False).synthetic is False


def test_a_setting_of_a_mitigation_not_chosen_says_so(photo, capsys):
    # issue 20: "--set ttr.neurons=... without ttr" used to say "name one, e.g. pai.ttr.neurons"
    code, _, err = run(capsys, "generate", str(photo), "--model", "demo-llava", "--prompt", "describe",
                       "--mitigation", "pai+var", "--set", "ttr.neurons=n.json", "--max-new-tokens", "1")
    assert code == 2 and err.count("vsink: error:") == 1, err
    assert ("setting 'ttr.neurons': ttr is not among the chosen mitigations (pai+var); add it (e.g. pai+var+ttr) "
            "or leave the setting out") in err
    assert "pai.ttr.neurons" not in err


def test_finetune_summary_lists_its_report(tmp_path, capsys):
    out = tmp_path / "run"
    code, text, err = run(capsys, "finetune", "recipe=scratch", "model.spec=timm:vit_tiny_patch16_224", "model.img_size=32",
                          "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "registers.n=1",
                          "data.num_images=4", "data.eval_images=2", "train.steps=1", "train.batch_size=2",
                          "train.warmup_steps=1", f"out={out}", "--no-progress")
    assert code == 0, err
    assert f"{out}/report.html (training curves" in text and (out / "report.html").is_file()
