"""Dense metrics under ablation with per-image targets and resample (vsink/ablate_dense.py,
`vsink ablate --dense`): the targets chosen again on each dense image against images whose
high-norm tokens are known by construction, the resample pairing, the identity of an empty zero
ablation, the installed per-image replacement, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.ablate import ablate, run_pass, select
from vsink.ablate_dense import DenseImages, dense_clean_pass, dense_pairing, dense_selection, dense_variant
from vsink.cli import main
from vsink.data import demo_model as D
from vsink.data.demo_images import demo_images
from vsink.evaluate.datasets import DenseDataset, DenseSample
from vsink.images import NamedImage
from conftest import planted_firing

GRID, PATCH = 14, 16  # the demo's 14x14 grid of 16x16 patches


def planted_images(split: str, count: int, seed: int) -> tuple[DenseDataset, np.ndarray]:
    """Dense images whose high-norm tokens are known by construction: every 16x16 patch is either
    one flat colour or uniform noise (0-255 per pixel), a different random set of flat patches in
    each image (10-30 %). The demo's patch embedding is zero-mean, so a flat patch embeds to about 0
    and its constant feature fires the planted neurons of block 2 in full (docs/demo.md); a noise
    patch has a large texture response and none. The mask marks the flat patches (class 1), the box
    bounds them. Returns the dataset and the flat patches [images, 196]."""
    rng = np.random.default_rng(seed)
    samples, flats = [], []
    for i in range(count):
        flat = rng.random((GRID, GRID)) < rng.uniform(0.1, 0.3)
        pixels = rng.integers(0, 256, size=(GRID * PATCH, GRID * PATCH, 3)).astype(np.uint8)
        cells = np.kron(flat, np.ones((PATCH, PATCH), dtype=bool))
        pixels[cells] = rng.integers(0, 256, size=3)
        ys, xs = np.nonzero(cells)
        box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
        samples.append(DenseSample(f"{split}_{i}", Image.fromarray(pixels), cells.astype(np.uint8), box))
        flats.append(flat.reshape(-1))
    return DenseDataset("planted", "synthetic", split, samples, num_classes=2), np.array(flats)


@pytest.fixture(scope="module")
def backbone():
    return vsink.load("demo")


@pytest.fixture(scope="module")
def planted_run(backbone):
    """One ablation run on the planted dense images (2 training + 3 evaluation images, every task):
    high-norm and sinks at block 1 (before the planted block: nothing to select) and block 3."""
    (val, val_flat), (train, train_flat) = planted_images("val", 3, 0), planted_images("train", 2, 1)
    result = ablate(backbone, demo_images(), targets=["high-norm", "sinks"], ablations=["zero"], layers=[1, 3],
                    dense=(val, train), progress=False)
    return result, np.concatenate([train_flat, val_flat]), train.samples + val.samples  # pass order: train, val


def test_planted_images_are_what_the_model_sees(backbone, planted_run):
    # the construction's answer agrees with the planted neurons themselves (a plain hook on fc2)
    _, flat, samples = planted_run
    firing = planted_firing(backbone, [NamedImage(s.id, s.image) for s in samples]).numpy()
    assert np.array_equal(firing, flat) and 0 < flat.mean() < 0.5


def test_per_image_targets_are_chosen_on_each_dense_image(backbone, planted_run):
    result, flat, samples = planted_run
    layout = backbone.layout()
    chosen = {(s.target, s.layer): s for s in result.dense_selections}
    high = chosen[("high-norm", 3)].tokens
    assert np.array_equal(high[:, layout.patch_slice], flat)  # each image's own flat patches, no other token
    assert not high[:, :layout.num_prefix].any()
    assert len({row.tobytes() for row in high}) == len(samples)  # a different selection per image
    sinks = chosen[("sinks", 3)].tokens[:, layout.patch_slice]
    assert sinks.any(axis=1).all() and not (sinks & ~flat).any()  # the sink heads attend to the planted write
    assert chosen[("high-norm", 1)].count == 0 and chosen[("sinks", 1)].count == 0
    record = result.to_json()["dense_ablation"]
    assert record["images"] == {"train": ["train_0", "train_1"], "val": ["val_0", "val_1", "val_2"]}
    threshold = record["high_norm_threshold"]["3"]
    assert threshold["ablation_images"] is not None and threshold["dense_images"] is not None
    assert threshold["dense_images"] != threshold["ablation_images"]  # fitted on the dense images
    assert {(s["target"], s["layer"]): s["tokens_per_split"] for s in record["selections"]}[("high-norm", 3)] == {
        "train": int(flat[:2].sum()), "val": int(flat[2:].sum())}
    assert record["rules"]["high_norm_threshold"].startswith("fitted on the dense images")


def test_zeroing_the_planted_tokens_removes_the_dense_outliers(planted_run):
    result, _, _ = planted_run
    clean, ablated = result.dense.variants["clean"], result.dense.variants["high-norm@3:zero"]
    assert clean["artifacts"]["outlier_fraction"] > 0 and ablated["artifacts"]["outlier_fraction"] == 0
    # the probe's training images are ablated too: its training losses are computed on their features only
    assert ablated["linear_seg"]["train_loss"] != clean["linear_seg"]["train_loss"]


def test_zero_ablation_selecting_nothing_leaves_the_dense_metrics_equal(planted_run):
    result, _, _ = planted_run
    variants = result.dense.variants
    clean = variants["clean"]
    for name in ("high-norm@1:zero", "sinks@1:zero"):
        for task in ("linear_seg", "lost", "artifacts"):
            assert variants[name][task] == clean[task], (name, task)  # the probe's training losses included
        assert all(c["value"] == 0 for c in result.dense.statistics()["comparisons"][name].values())


def _keys(splits: dict[str, int]) -> DenseImages:
    return DenseImages([(s, f"{s}_{i}") for s, n in splits.items() for i in range(n)], clean=None, high_norm=None)


def test_resample_pairing_is_a_reproducible_derangement_within_each_split():
    images = _keys({"train": 4, "val": 5})
    pairing = dense_pairing(images, seed=3)
    assert np.array_equal(pairing, dense_pairing(images, seed=3))
    assert sorted(pairing[:4].tolist()) == [0, 1, 2, 3] and sorted(pairing[4:].tolist()) == [4, 5, 6, 7, 8]
    assert not np.any(pairing == np.arange(9))
    assert any(not np.array_equal(pairing, dense_pairing(images, seed=s)) for s in range(4, 10))
    with pytest.raises(vsink.VsinkError, match="split val has 1 usable image"):
        dense_pairing(_keys({"train": 3, "val": 1}), seed=0)


def test_resample_on_a_one_image_split_is_refused_before_any_pass(backbone, monkeypatch):
    val, _ = planted_images("val", 1, 0)
    monkeypatch.setattr("vsink.ablate.run_pass", lambda *a, **k: pytest.fail("a pass ran"))
    with pytest.raises(vsink.VsinkError, match="split val has 1 image"):
        ablate(backbone, demo_images(), ablations=["resample"], dense=(val, None), dense_tasks=["artifacts"],
               progress=False)


def test_installed_dense_ablation_replaces_each_images_selected_entries(backbone):
    """The hook applies the selection and values of the images the evaluation says it runs, in the
    batch's order: resample puts the partner's clean values (the dense clean pass) at exactly the
    selected tokens; mean-kind the mean, over all dense images, of the patches not selected;
    mean-images the mean over the dense images at the same position."""
    val, flat = planted_images("val", 3, 2)
    site = ("block_output", D.PLANTED_BLOCK)
    images = dense_clean_pass(backbone, val, None, tasks=["artifacts"], sites=[site], size=backbone.img_size,
                              batch_size=2, threshold={"method": "auto"})
    clean = images.clean.sites[site]
    probe = select("high-norm", D.PLANTED_BLOCK, images.clean.trace, high_norm=images.high_norm, sink_ratio=5.0,
                   massive_ratio=100.0)
    chosen = dense_selection(probe, images, sink_ratio=5.0, massive_ratio=100.0)
    layout = backbone.layout()
    assert np.array_equal(chosen.tokens[:, layout.patch_slice], flat)
    partner = dense_pairing(images, seed=0)
    order = [2, 0]  # a batch of two images, not in pass order
    pixels = backbone.preprocess([val.samples[i].image for i in order], backbone.img_size)
    mask = torch.as_tensor(chosen.tokens[order])[..., None]
    patches = clean[:, layout.patch_slice][~torch.as_tensor(flat)].mean(0)
    for ablation, expected in (("resample", clean[partner[order]]), ("mean-kind", patches),
                               ("mean-images", clean.mean(0))):
        variant = dense_variant("v", chosen, ablation, images, partner)
        with variant.open(backbone):
            variant.before_batch("val", [f"val_{i}" for i in order])
            got = run_pass(backbone, [pixels], capture=[site]).sites[site]
        assert torch.allclose(got, torch.where(mask, expected, clean[order]), atol=1e-5), ablation
    with pytest.raises(vsink.VsinkError, match="val/val_9 was not in the clean pass"):
        variant.before_batch("val", ["val_9"])


def test_cli_dense_with_per_image_targets_and_resample(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--dense", "--targets", "high-norm,sinks", "--ablations", "zero,resample", "--layers", "3",
                 "--dense-images", "3", "--seed", "4", "--out", str(out), "--no-progress", "--resamples", "100"]) == 0
    assert "| linear-seg mIoU (%) |" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    record = data["dense_ablation"]
    pairing = record["resample_pairing"]
    assert set(pairing) == {"train", "val"}
    for split, partners in pairing.items():
        assert sorted(partners) == sorted(partners.values()) == record["images"][split]
        assert all(a != b for a, b in partners.items())
    assert [s["target"] for s in record["selections"]] == ["high-norm", "sinks"]
    dense = json.loads((out / "dense.json").read_text())
    assert list(dense["variants"]) == ["clean", "high-norm@3:zero", "high-norm@3:resample", "sinks@3:zero",
                                       "sinks@3:resample"]
    html = (out / "report.html").read_text()
    assert "Dense metrics under ablation" in html and "chosen on each dense image" in html
    assert "high-norm@3:resample" in html and (out / "dense.html").exists()
    markdown = (out / "results.md").read_text()
    assert "## Targets on the dense images" in markdown
    tokens = {s["target"]: s for s in record["selections"]}["sinks"]["tokens_per_split"]
    assert f"| sinks | 3 | all | {sum(tokens.values())} (train {tokens['train']}, val {tokens['val']}) | - |" in markdown


def test_cli_dense_on_a_one_patch_grid_writes_no_nan(tmp_path, capsys):
    """--img-size 16 on the demo: one patch per image, so no adjacent patches. The neighbour cosine
    was NaN and the run died at the very end, writing dense.json (ValueError: Out of range float
    values are not JSON compliant: nan); it is None, shown as not measured."""
    out = tmp_path / "o"
    assert main(["ablate", "--img-size", "16", "--dense", "--dense-images", "2", "--out", str(out), "--no-progress",
                 "--resamples", "10"]) == 0
    dense = json.loads((out / "dense.json").read_text())
    assert all(v["artifacts"]["neighbour_cosine"] is None for v in dense["variants"].values())
    assert "neighbour patch cosine" not in (out / "dense.md").read_text()
