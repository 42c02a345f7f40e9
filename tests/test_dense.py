"""The dense evaluation end to end on the demo model: one forward per image per variant, results
consistent with the building blocks, bad items skipped and reported, variants, CLI."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.cli import main
from vsink.data import demo_model
from vsink.data.synthetic import synthetic_dataset, write_voc
from vsink.errors import VsinkError
from vsink.evaluate.datasets import read_voc
from vsink.evaluate.dense import LostSettings, evaluate_dense
from vsink.evaluate.lost import lost
from vsink.evaluate.segmentation import ProbeSettings
from vsink.evaluate.variants import Variant, parse_variants
from vsink.features import FeatureSpec, extract_features
from vsink.registers import NeuronSpec, RegisterNeuron


@pytest.fixture(scope="module")
def demo():
    return vsink.load("demo")


@pytest.fixture(scope="module")
def planted_neurons(tmp_path_factory):
    """The demo's planted register neurons, written by hand (independent of the neuron finder)."""
    path = tmp_path_factory.mktemp("ttr") / "neurons.json"
    NeuronSpec("demo", [RegisterNeuron(demo_model.PLANTED_BLOCK, n, 1.0) for n in demo_model.PLANTED_NEURONS]).save(path)
    return path


@pytest.fixture(scope="module")
def result(demo, planted_neurons):
    train = synthetic_dataset("train", num_images=6)
    val = synthetic_dataset("val", num_images=4)
    counted = []
    handle = demo.blocks[0].register_forward_pre_hook(lambda m, a: counted.append(a[0].shape[0]))
    try:
        res = evaluate_dense(demo, val, train_set=train, variants=parse_variants([f"ttr={planted_neurons}"]),
                             lost_settings=LostSettings(layers=(-1, 3), kinds=("k", "v")),
                             probe_settings=ProbeSettings(epochs=2), batch_size=3, progress=False)
    finally:
        handle.remove()
    return res, counted, val


def test_backbone_runs_once_per_image_per_variant(result):
    res, counted, _ = result
    assert sum(counted) == 2 * (6 + 4)  # 2 variants x (train + val), whatever the sweep size
    assert [r["timing"]["forward_images"] for r in res.variants.values()] == [10, 10]


def test_lost_boxes_equal_lost_on_extracted_features(result, demo):
    res, _, val = result
    base = res.variants["baseline"]["lost"]
    assert base["setting"] == {"layer": 5, "kind": "k", "bias": 0.0, "normalize": False}
    assert len(base["sweep"]) == 4 and base["n"] == 4
    for sample, row in zip(val.samples, base["images"]):
        item = sample.load()
        feats = extract_features(demo, demo.preprocess([item.image]), [FeatureSpec(-1, "k")])
        found = lost(feats[FeatureSpec(-1, "k")][0])
        np.testing.assert_allclose(row["box"], found.to_pixels((14, 14), item.image.size), atol=0.01)
        assert row["seed"] == list(found.seed)
    hits = sum(r["correct"] for r in base["images"])
    assert base["corloc"] == hits / 4


def test_artifacts_see_the_planted_outliers_and_their_removal(result):
    res, _, _ = result
    base, ttr = res.variants["baseline"]["artifacts"], res.variants["ttr"]["artifacts"]
    assert base["emergence_layer"] == demo_model.PLANTED_BLOCK and base["outlier_fraction"] > 0.02
    assert ttr["outlier_fraction_max"] == 0.0 and ttr["emergence_layer"] is None
    assert base["norm_ratio"] > 4 * ttr["norm_ratio"]
    assert 0 <= base["cls_foreground_share"] <= 1 and -1 <= base["neighbour_cosine"] <= 1
    assert "appended" in res.variants["ttr"]["layout"]


def test_linear_seg_and_saved_outputs(result, tmp_path):
    res, _, _ = result
    seg = res.variants["baseline"]["linear_seg"]
    assert seg["num_classes"] == 4 and len(seg["per_class_iou"]) == 4 and 0 <= seg["miou"] <= 1
    assert seg["n_train"] == 6 and seg["n_eval"] == 4 and len(seg["train_loss"]) == 2
    paths = res.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["baseline"] == "baseline" and data["synthetic_model"]
    delta = data["deltas"]["ttr"]["lost.corloc"]
    assert delta == pytest.approx(data["variants"]["ttr"]["lost"]["corloc"] - data["variants"]["baseline"]["lost"]["corloc"])
    md = paths["markdown"].read_text()
    assert "| LOST CorLoc (%) |" in md and "Δ vs baseline" in md and "upper bound" in md
    assert "<table>" in paths["html"].read_text()


def test_bad_items_are_skipped_and_reported(tmp_path, demo):
    data = synthetic_dataset("val", num_images=4, size=64)
    root = write_voc(data, tmp_path / "VOC")
    (root / "JPEGImages" / "val_0001.jpg").write_bytes(b"broken")
    mask = np.array(Image.open(root / "SegmentationClass" / "val_0002.png"))
    mask[0, 0] = 30
    Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / "val_0002.png")
    small = vsink.load("demo", img_size=64)
    res = evaluate_dense(small, read_voc(root, "val"), tasks=["lost", "artifacts"], progress=False)
    reasons = {s["item"]: s["reason"] for s in res.skipped}
    assert set(reasons) == {"val_0001", "val_0002"}
    assert "val_0001.jpg" in reasons["val_0001"] and "labels [30]" in reasons["val_0002"]
    assert res.variants["baseline"]["lost"]["n"] == 2
    assert [r["id"] for r in res.variants["baseline"]["lost"]["images"]] == ["val_0000", "val_0003"]
    assert (res.dataset["images"], res.dataset["images_evaluated"]) == (4, 2)


def test_skipped_items_are_reported_once_and_the_header_counts_what_was_evaluated(tmp_path, planted_neurons,
                                                                                    capsys):
    root = write_voc(synthetic_dataset("train", num_images=3, size=64), tmp_path / "VOC")
    write_voc(synthetic_dataset("val", num_images=6, size=64), root)
    for i in (1, 2):
        (root / "JPEGImages" / f"val_000{i}.jpg").write_bytes(b"broken")
    for i in (3, 4):
        (root / "SegmentationClass" / f"val_000{i}.png").write_bytes(b"broken")
    (root / "JPEGImages" / "train_0002.jpg").write_bytes(b"broken")
    out = tmp_path / "eval"
    assert main(["eval", "dense", "--format", "voc", "--data", str(root), "--img-size", "64", "--epochs", "1",
                 "--variant", f"ttr={planted_neurons}", "--no-progress", "--out", str(out)]) == 0
    skips = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(skips) == 5  # two variants, one line per bad item
    for name in ("val_0001.jpg", "val_0002.jpg", "val_0003.png", "val_0004.png", "train_0002.jpg"):
        assert sum(name in line for line in skips) == 1
    data = json.loads((out / "results.json").read_text())
    assert [(s["split"], s["item"]) for s in data["skipped"]] == [
        ("train", "train_0002"), ("val", "val_0001"), ("val", "val_0002"), ("val", "val_0003"), ("val", "val_0004")]
    assert data["dataset"]["images_evaluated"] == 2 and data["dataset"]["train_images_used"] == 2
    md = (out / "results.md").read_text()
    assert ("split `val`: 2 of 6 images (4 skipped), linear head trained on `train`: 2 of 3 images (1 skipped)"
            in md)
    assert "on 2 images" in md and "(6 images)" not in md


def test_weights_variant_uses_a_copy(tmp_path, demo):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in demo.model.state_dict().items()}
    state["norm.weight"] = state["norm.weight"] * 2
    save_file(state, tmp_path / "ft.safetensors")
    before = demo.model.norm.weight.clone()
    variant = Variant.parse(f"ft={tmp_path / 'ft.safetensors'}")
    assert variant.kind == "weights"
    with variant.open(demo) as ft:
        assert ft is not demo and torch.equal(ft.model.norm.weight, 2 * before)
    assert torch.equal(demo.model.norm.weight, before)


def test_a_saved_models_weights_file_that_does_not_fit_names_its_directory(tmp_path, demo):
    saved = demo.with_registers(4, init_std=0.1).save(tmp_path / "final")
    with pytest.raises(VsinkError) as info:
        with Variant.parse(f"ft={saved / 'model.safetensors'}").open(demo):
            pass
    message = str(info.value)
    assert "wrong shape pos_embed" in message and "\n" not in message
    assert message.endswith(f"{saved} holds a saved model (vsink.json): pass the directory instead "
                            f"(--variant ft={saved})")
    (saved / "vsink.json").unlink()
    with pytest.raises(VsinkError, match="wrong shape pos_embed") as info:
        with Variant.parse(f"ft={saved / 'model.safetensors'}").open(demo):
            pass
    assert "saved model" not in str(info.value)


def test_variant_parsing(tmp_path, planted_neurons):
    assert Variant.parse("baseline") == Variant("baseline")
    assert Variant.parse(f"reg=ttr:{planted_neurons}").kind == "ttr"
    assert Variant.parse("other=timm:vit_small_patch14_dinov2") == Variant("other", "model", "timm:vit_small_patch14_dinov2")
    with pytest.raises(VsinkError, match="missing.json: file not found"):
        Variant.parse("x=missing.json")
    with pytest.raises(VsinkError, match="use baseline or NAME=VALUE"):
        Variant.parse("ttr")
    with pytest.raises(VsinkError, match="repeated: a"):
        parse_variants(["a=baseline", "a=model:demo"])
    assert [v.name for v in parse_variants(["b=model:demo"])] == ["baseline", "b"]
    ref = parse_variants([f"r=ttr:{planted_neurons}", "m=model:demo"], {"shift": "reference", "scale": 2.0})
    assert ref[1].ttr_options == (("scale", 2.0), ("shift", "reference")) and ref[2].ttr_options == ()
    assert ref[1].describe() == f"r (ttr: {planted_neurons}, scale=2.0, shift=reference)"
    assert ref[1].test_time_registers().shift == "reference"
    with pytest.raises(VsinkError, match="unknown shift 'bogus'"):  # at parse time, before any model runs
        parse_variants([f"r=ttr:{planted_neurons}"], {"shift": "bogus"})


def test_task_and_data_errors(demo):
    val = synthetic_dataset("val", num_images=2, size=64)
    with pytest.raises(VsinkError, match="unknown task"):
        evaluate_dense(demo, val, tasks=["segment"])
    with pytest.raises(VsinkError, match="linear-seg needs a training split"):
        evaluate_dense(demo, val, tasks=["linear-seg"])


def test_cli_eval_dense(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "dense", "--synthetic-images", "3", "--img-size", "64", "--epochs", "1",
                 "--lost-kinds", "k,q", "--lost-biases", "0,0.5", "--lost-iou", "reference", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["lost"]["ties"] == "stable" and data["settings"]["lost"]["iou"] == "reference"
    assert data["variants"]["baseline"]["lost"]["iou"] == "reference"
    assert data["tasks"] == ["linear-seg", "lost", "artifacts"]
    assert len(data["variants"]["baseline"]["lost"]["sweep"]) == 4
    assert data["settings"]["input_size"] == [64, 64]
    assert "LOST CorLoc" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--format", "voc", "--data", "/nonexistent"], "--data: must be an existing file or directory, got '/nonexistent'"),
    (["--format", "voc", "--data", "TMP"], "VOC JPEGImages directory not found"),
    (["--data", "TMP"], "--data is not used with --format synthetic"),
    (["--tasks", "lost,segment"], "--tasks: must be a non-empty list of distinct entries, each one of linear-seg, lost, "
                                  "artifacts, got 'lost,segment' (entry 'segment' is not one of"),
    (["--lost-biases", "zero"], "--lost-biases: must be a non-empty list, each a finite number, got 'zero'"),
    (["--lost-normalize", "maybe"], "--lost-normalize: must be one of no, yes, both, got 'maybe'"),
    (["--variant", "x=missing.safetensors"], "missing.safetensors: file not found"),
    (["--lost-ties", "reference"], "--lost-ties: must be one of stable, got 'reference'"),
    (["--lost-iou", "strict"], "--lost-iou: must be one of exact, reference, got 'strict'"),
])
def test_cli_eval_errors(argv, message, capsys, tmp_path):
    argv = [str(tmp_path) if a == "TMP" else a for a in argv]
    assert main(["eval", "dense", "--no-progress", "--synthetic-images", "2", "--img-size", "64"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("variant, message", [
    ("x=nonexistent", r"variant 'x': cannot load model 'nonexistent': unknown form"),
    ("m=timm:no_such_model", r"variant 'm': cannot load model 'timm:no_such_model': timm has no model named"),
    ("ft={tmp}/garbage.safetensors", r"cannot read weights file .*garbage\.safetensors"),
    ("ft={tmp}/other.safetensors", r"weights file .*other\.safetensors does not match the model: missing cls_token"),
])
def test_a_bad_variant_fails_before_the_baseline_runs(variant, message, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    import vsink.evaluate.dense as dense

    (tmp_path / "garbage.safetensors").write_text("not a checkpoint")
    save_file({"x": torch.zeros(3)}, tmp_path / "other.safetensors")

    def baseline_ran(*args, **kwargs):
        raise AssertionError("a variant ran before every variant was checked")

    monkeypatch.setattr(dense, "_evaluate_variant", baseline_ran)
    out = tmp_path / "out"
    code = main(["eval", "dense", "--variant", variant.format(tmp=tmp_path), "--synthetic-images", "4",
                 "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vsink: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()  # nothing written
