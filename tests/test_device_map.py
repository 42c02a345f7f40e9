"""An LVLM loaded with an accelerate device map that offloads decoder layers to disk (their
weights sit on the meta device and accelerate's hooks load them for each forward) generates,
mitigates and captures exactly as the same model loaded whole."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vsink.backbones.device_map import device_map_arg, device_map_kwargs, device_map_main
from vsink.backbones.hf_lvlm import load_lvlm
from vsink.data.demo_lvlm import build_tiny_llava
from vsink.errors import VsinkError
from vsink.lvlm import generate
from vsink.manifest import weights_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")

PROMPTS = ["is there a cat ?", "describe this image please , what color is the sky ?"]
LM = "model.language_model"
#: layers 1 and 3 on disk, the rest on cpu: hooks on layers 1 and 3 run while their weights move
SPLIT = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{LM}.embed_tokens": "cpu",
         f"{LM}.layers.0": "cpu", f"{LM}.layers.1": "disk", f"{LM}.layers.2": "cpu", f"{LM}.layers.3": "disk",
         f"{LM}.norm": "cpu", f"{LM}.rotary_emb": "cpu", "lm_head": "cpu"}
#: settings under which VAR and PAI edit layer 1, which sits on disk (tau low enough for this
#: random model's sink dimensions to pass as sinks)
CASES = {"none": {}, "var": {"sink_dims": [3, 7], "tau": 1.0, "min_image": 0.0, "start_layer": 0},
         "pai": {"alpha": 0.5, "gamma": 1.1, "start_layer": 1}}


def _image(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("devmap")
    model, processor = build_tiny_llava()
    model.save_pretrained(root / "m")
    processor.save_pretrained(root / "m")
    whole = load_lvlm(str(root / "m"))
    split = load_lvlm(str(root / "m"), device_map=SPLIT, offload_folder=root / "offload")
    return whole, split


def test_layers_are_offloaded(pair):
    whole, split = pair
    layers = split.model.model.language_model.layers
    assert {p.device.type for p in layers[1].parameters()} == {"meta"}  # on disk between forwards
    assert {p.device.type for p in layers[0].parameters()} == {"cpu"}
    assert split.device == torch.device("cpu")
    # the run record's weights fingerprint reads the offloaded weights, so it names the same model
    assert weights_fingerprint(split.model) == weights_fingerprint(whole.model)


@pytest.mark.parametrize("mitigation", sorted(CASES))
def test_split_generation_and_attention_equal_the_whole_model(pair, mitigation):
    whole, split = pair
    images = [_image(0), _image(1)]
    runs = [generate(lvlm, lvlm.prepare(images, PROMPTS), mitigation=mitigation, settings=CASES[mitigation],
                     max_new_tokens=5, capture_attention=True) for lvlm in (whole, split)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].attention.shape[2] == 4
    torch.testing.assert_close(runs[1].attention, runs[0].attention, rtol=0, atol=1e-6, equal_nan=True)
    assert runs[0].report == runs[1].report
    if mitigation != "none":  # the mitigation edited rows of layer 1, whose weights come from disk
        layer1 = next(entry for entry in runs[1].report[0]["layers"] if entry["layer"] == 1)
        assert max(v for k, v in layer1.items() if k.startswith("rows_")) > 0


def test_device_map_arguments(tmp_path):
    assert device_map_arg("auto") == "auto"
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"lm_head": 0, "model": "disk"}))
    assert device_map_arg(path) == {"lm_head": 0, "model": "disk"}
    with pytest.raises(VsinkError, match="'model': 'gpu' is not a device"):
        device_map_arg({"lm_head": "cpu", "model": "gpu"})
    with pytest.raises(VsinkError, match="neither auto, balanced"):
        device_map_arg(str(tmp_path / "missing.json"))
    with pytest.raises(VsinkError, match="on disk: give --offload-folder"):
        device_map_kwargs({"model": "disk"}, None, "x")
    with pytest.raises(VsinkError, match="--offload-folder is used only with --device-map"):
        device_map_kwargs(None, tmp_path, "x")
    assert device_map_main({"a": "cpu", "b": 1, "c": "disk"}) == torch.device("cuda:1")
    assert device_map_main({"a": "cpu", "b": "disk"}) == torch.device("cpu")
    with pytest.raises(VsinkError, match="built in memory"):
        load_lvlm("demo-llava", device_map="cpu")


def test_missing_accelerate_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(VsinkError, match="--device-map needs the 'accelerate' package"):
        device_map_kwargs("auto", None, "x")


def test_cli_generate_and_scan_with_a_device_map_file_equal_the_whole_model(pair, tmp_path, capsys):
    from vsink.cli import main

    whole, _ = pair
    directory = whole.spec.removeprefix("hf:")
    _image(0).save(tmp_path / "a.png")
    (tmp_path / "map.json").write_text(json.dumps(SPLIT))
    run = ["generate", str(tmp_path / "a.png"), "--model", directory, "--prompt", PROMPTS[0],
           "--mitigation", "pai", "--set", "start_layer=1", "--max-new-tokens", "4"]
    assert main(run) == 0
    alone = capsys.readouterr().out
    assert main(run + ["--device-map", str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "off")]) == 0
    assert capsys.readouterr().out == alone
    assert main(run + ["--device-map", str(tmp_path / "map.json")]) == 2
    assert "on disk: give --offload-folder" in capsys.readouterr().err
    scan = ["scan", str(tmp_path / "a.png"), "--model", directory, "--prompt", PROMPTS[1]]
    assert main(scan + ["--out", str(tmp_path / "whole")]) == 0
    assert main(scan + ["--out", str(tmp_path / "split"), "--device-map", str(tmp_path / "map.json"),
                        "--offload-folder", str(tmp_path / "off")]) == 0
    assert (tmp_path / "split/scan.json").read_bytes() == (tmp_path / "whole/scan.json").read_bytes()
    with np.load(tmp_path / "whole/trace.npz") as a, np.load(tmp_path / "split/trace.npz") as b:
        assert a.files == b.files and all(a[k].tobytes() == b[k].tobytes() for k in a.files)
    records = [json.loads((tmp_path / run / "vsink-run.json").read_text()) for run in ("whole", "split")]
    assert records[0]["determining"] == records[1]["determining"]  # the weights fingerprint included
    capsys.readouterr()
    assert main(["scan", str(tmp_path / "a.png"), "--model", "demo", "--device-map", "auto",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--device-map applies to LVLM scans" in capsys.readouterr().err


def test_vcd_stacked_with_the_main_pass_equals_the_whole_model(pair):
    # the noised image rides in the main pass's forward (stacked_main replaces the model's forward
    # for the call, accelerate's own hooked forward included, and puts back what was there)
    whole, split = pair
    images = [_image(0), _image(1)]
    before = [vars(lvlm.model).get("forward") for lvlm in (whole, split)]
    assert before[0] is None and before[1] is not None  # accelerate's dispatch: an instance forward
    settings = {"alpha": 3.0, "beta": 0.0, "noise_step": 900}
    runs = [generate(lvlm, lvlm.prepare(images, PROMPTS), mitigation="vcd", settings=settings, max_new_tokens=5)
            for lvlm in (whole, split)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].report[0]["stacked_with_main"] == runs[1].report[0]["stacked_with_main"] == ["noised"]
    assert [vars(lvlm.model).get("forward") for lvlm in (whole, split)] == before
