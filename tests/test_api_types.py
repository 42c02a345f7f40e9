"""The Python API at its boundary (issue 20, item 5): wrong argument types are one clear error
naming the argument (vsink.arguments), the register cap and model_kwargs bounds hold from Python
too, a model left in train mode is probed in eval mode and handed back as it was, and an image
whose every patch turns high-norm at once is reported as such."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.arguments import ArgumentError
from vsink.errors import VsinkError
from vsink.options import MAX_REGISTERS, OptionError
from vsink.registers import find_register_neurons

TINY = dict(patch_size=8, depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def demo():
    return vsink.load("demo")


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


def calls(demo, photo, out):
    """Each public entry point with one wrong argument: (call, the message it must give)."""
    from vsink.backbones.hf_lvlm import load_lvlm
    from vsink.lvlm.generate import generate
    from vsink.lvlm.scan import scan_lvlm

    good = [str(photo)]
    return [
        (lambda: vsink.scan("demo", good), r"backbone must be a vsink Backbone .*got the str 'demo': load it first, "
                                           r"vsink\.load\('demo'\)"),
        (lambda: vsink.scan(torch.nn.Linear(2, 2), good), r"backbone must be a vsink Backbone .*vsink\.wrap\(model\)"),
        (lambda: vsink.scan(demo, str(photo)), rf"images must be a list of images .*got one path '{photo}': pass "
                                               rf"\['{photo}'\]"),
        (lambda: vsink.scan(demo, str(photo.parent)), r"images must be a list .*pass vsink\.images\.expand_paths"),
        (lambda: vsink.scan(demo, Image.open(photo)), r"images must be a list .*got one PngImageFile: pass \[image\]"),
        (lambda: vsink.scan(demo, []), r"images is empty: no images given"),
        # an array is one image, not a list of rows; entries that are not images are named by index
        (lambda: vsink.scan(demo, np.zeros((8, 8, 3), np.uint8)), r"images must be a list .*got one ndarray: pass "
                                                                  r"\[PIL\.Image\.fromarray\(array\)\]"),
        (lambda: vsink.scan(demo, [np.zeros((8, 8, 3), np.uint8)]), r"images\[0\] must be an image path, a PIL image or "
                                                                    r"a NamedImage, got the ndarray .*PIL\.Image\.fromarray"),
        (lambda: vsink.scan(demo, good + [None]), r"images\[1\] must be an image path, a PIL image or a NamedImage, "
                                                  r"got the NoneType None$"),
        (lambda: vsink.scan(demo, [os.fsencode(photo)]), r"images\[0\] must be an image path, .*got the bytes"),
        (lambda: vsink.scan(demo, good, img_size="224"), r"img_size must be an integer or None, got the str '224'"),
        (lambda: vsink.scan(demo, good, img_size=224.0), r"img_size must be an integer or None, got the float 224\.0"),
        (lambda: vsink.scan(demo, good, layers=[0.5]), r"layers must be a list of integers, got the float 0\.5 in "
                                                       r"\[0\.5\]"),
        (lambda: vsink.scan(demo, good, layers=3), r"layers must be a list of integers, got the int 3"),
        (lambda: vsink.export_maps(demo, good, out, layers=[1.0]), r"layers must be a list of integers, got the float"),
        (lambda: vsink.export_maps("demo", good, out), r"backbone must be a vsink Backbone"),
        (lambda: vsink.export_maps(demo, good, out, kinds="norm"), r"kinds must be a list of names, got the str "
                                                                   r"'norm': pass \['norm'\]"),
        (lambda: vsink.export_maps(demo, good, out, formats="png"), r"formats must be a list of names, got the str "
                                                                    r"'png': pass \['png'\]"),
        (lambda: vsink.export_maps(demo, "x.png", out), r"images must be a list of images .*got one path 'x\.png'"),
        (lambda: find_register_neurons(demo, ()), r"images is empty"),
        (lambda: find_register_neurons("demo", good), r"backbone must be a vsink Backbone"),
        (lambda: find_register_neurons(demo, good, img_size="224"), r"img_size must be an integer"),
        (lambda: vsink.Probe("demo"), r"backbone must be a vsink Backbone"),
        (lambda: vsink.Probe(demo, layers=[True]), r"layers must be a list of integers, got the bool True"),
        (lambda: vsink.load("demo", img_size="224"), r"img_size must be an integer or None, got the str '224'"),
        (lambda: vsink.load(demo), r"spec must be a model spec string; 'demo' is already a loaded Backbone"),
        (lambda: vsink.load(torch.nn.Linear(2, 2)), r"spec must be a model spec string .*vsink\.wrap\(model\)"),
        (lambda: vsink.wrap("timm:vit_tiny_patch16_224"), r"model must be a torch\.nn\.Module, got a str: for a model "
                                                          r"spec, vsink\.load\('timm:vit_tiny_patch16_224'\)"),
        (lambda: scan_lvlm("demo-llava", good, "describe"), r"lvlm must be an LVLM .*load_lvlm\('demo-llava'\)"),
        (lambda: generate("demo-llava", {}), r"lvlm must be an LVLM"),
        (lambda: generate(load_lvlm("demo-llava"), [1, 2]), r"inputs must be the dict LVLM\.prepare"),
        (lambda: scan_lvlm(load_lvlm("demo-llava"), str(photo), "describe"), r"images must be a list .*got one path"),
    ]


def test_each_entry_point_names_the_wrong_argument(demo, photo, tmp_path):
    for call, message in calls(demo, photo, tmp_path / "maps"):
        with pytest.raises(ArgumentError, match=message) as caught:
            call()
        assert isinstance(caught.value, (TypeError, VsinkError))  # both: one except clause catches it either way
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "maps").exists()


def test_numpy_integers_are_integers(demo, photo):
    result = vsink.scan(demo, [str(photo)], layers=np.array([0, -1]), img_size=np.int64(224), progress=False)
    assert result.trace.layers == [0, demo.num_layers - 1]


def test_ranges_are_checked_too_and_name_the_argument(demo, photo):
    with pytest.raises(OptionError, match=r"img_size must be an integer >= 1, got 0"):
        vsink.scan(demo, [str(photo)], img_size=0)
    with pytest.raises(OptionError, match=r"report_images must be an integer >= 0, got -1"):
        vsink.scan(demo, [str(photo)], report_images=-1)


def test_registers_from_the_api_have_the_command_line_cap(demo):
    assert MAX_REGISTERS == 1024  # the cap of registers.n in a finetune recipe
    with pytest.raises(OptionError, match=r"n \(registers\) must be an integer in \[1, 1024\], got 200000"):
        demo.with_registers(200000)
    with pytest.raises(OptionError, match=r"in \[1, 1024\], got 0"):
        demo.with_registers(0)
    with pytest.raises(OptionError, match=r"in \[1, 1024\], got 2\.0"):
        demo.with_registers(2.0)
    assert demo.with_registers(MAX_REGISTERS).layout().num_registers == MAX_REGISTERS
    assert demo.with_registers(np.int64(2)).layout().num_registers == 2  # NumPy integers are integers here too


def test_model_kwargs_sharing_parts_like_an_alias_bomb_are_refused_quickly():
    import time

    level: object = [0] * 9
    for _ in range(8):  # nine levels of nine references to one list: 9**9 values once expanded
        level = [level] * 9
    start = time.perf_counter()
    with pytest.raises(OptionError, match=r"model_kwargs must be a mapping with string keys, or null, got .*more than 100,000 "
                                          r"values once expanded"):
        vsink.load("demo", model_kwargs={"depth": level})
    assert time.perf_counter() - start < 2.0  # measured once per distinct list, not per expanded value
    nested: dict = {}
    for _ in range(40):
        nested = {"a": nested}
    with pytest.raises(OptionError, match=r"nested deeper than 32 levels"):
        vsink.load("demo", model_kwargs=nested)
    with pytest.raises(OptionError, match=r"model_kwargs must be a mapping with string keys, or null, got \[1\]"):
        vsink.load("demo", model_kwargs=[1])


def test_a_model_in_train_mode_is_probed_in_eval_mode_and_left_in_train_mode(photo):
    backbone = vsink.load("timm:vit_tiny_patch16_224", pretrained=False, img_size=32,
                          model_kwargs={**TINY, "drop_rate": 0.5, "proj_drop_rate": 0.5, "attn_drop_rate": 0.5,
                                        "drop_path_rate": 0.5})
    backbone.model.eval()
    reference = vsink.scan(backbone, [str(photo)], progress=False)
    backbone.model.train()
    backbone.model.blocks[0].eval()  # a mixed state is restored module by module
    first = vsink.scan(backbone, [str(photo)], progress=False)
    second = vsink.scan(backbone, [str(photo)], progress=False)
    assert np.array_equal(first.trace.norms, second.trace.norms)
    assert np.array_equal(first.trace.norms, reference.trace.norms)  # dropout was off while probing
    assert backbone.model.training and not backbone.model.blocks[0].training and backbone.model.blocks[1].training
    x = backbone.preprocess([Image.open(photo)])
    with torch.no_grad():  # and the user's own train-mode calls still use dropout
        assert not torch.equal(backbone.model(x), backbone.model(x))


def test_a_uniform_image_is_reported_as_every_patch_high_norm_at_once(demo, tmp_path, capsys):
    from vsink.cli import main
    from vsink.data import demo_model as D

    flat = tmp_path / "flat.png"
    Image.new("RGB", (224, 224), (128, 128, 128)).save(flat)
    result = vsink.scan(demo, [str(flat)], progress=False)
    # the demo's planted neurons fire on flat patches (block PLANTED_BLOCK): on a constant image,
    # on all of them, so none stands out and the gap test rightly flags none
    assert result.high_norm.emergence_layer is None
    assert [(u["image"], u["layer"]) for u in result.high_norm.uniform] == [(0, D.PLANTED_BLOCK)]
    assert result.high_norm.uniform[0]["growth"] > 10
    assert main(["scan", str(flat), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"no high-norm tokens found; every patch token is high-norm at block {D.PLANTED_BLOCK} in {flat}"
            in out and "uniform image?" in out)
    saved = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert saved["high_norm"]["uniform"][0]["image"] == str(flat)
    assert saved["per_image"][0]["uniform_high_norm_block"] == D.PLANTED_BLOCK
    # a photo (the demo images) has no such block
    from vsink.data.demo_images import demo_images

    assert vsink.scan(demo, demo_images(), progress=False).high_norm.uniform == []
