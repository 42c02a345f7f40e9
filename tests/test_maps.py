"""Attention / norm maps: rollout against a direct matrix product, equality with the library's
attention, rows summing to 1, planted outliers, streaming, files and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.cli import main
from vsink.data import demo_model as D
from vsink.data.demo_images import demo_images
from vsink.maps import export_maps
from vsink.layout import TokenLayout
from vsink.rollout import FullAttentionObserver, rollout_step
from conftest import hf_model, planted_firing, sharpen, timm_model, timm_reference


def image(size=(42, 42), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def reference_rollout(attentions, num_cls, num_prefix, fusion="mean", discard_ratio=0.0):
    """Abnar & Zuidema written out directly (fuse heads, 0.5 A + 0.5 I, renormalise, multiply) with
    vsink's discard rule, which is neither theirs (they have none) nor vit-explain's."""
    n = attentions[0].shape[-1]
    joint = torch.eye(n, dtype=torch.float64)
    for a in attentions:
        a = a[0].double()
        fused = {"mean": a.mean(0), "max": a.max(0).values, "min": a.min(0).values}[fusion]
        if discard_ratio:
            values = fused.clone()
            values[:, :num_cls] = float("inf")  # never drop attention to class tokens
            k = int(n * n * discard_ratio)
            drop = values.flatten().argsort()[:k]
            fused = fused.flatten().clone()
            fused[drop] = 0
            fused = fused.view(n, n)
        step = 0.5 * fused + 0.5 * torch.eye(n, dtype=torch.float64)
        step = step / step.sum(dim=-1, keepdim=True)
        joint = step @ joint
    row = joint[0] if num_cls else joint[num_prefix:].mean(0)
    return row.float()


def test_discard_spares_attention_to_the_class_token_by_hand():
    """1 class token + 2 patches, discard ratio 0.25: int(9 * 0.25) = 2 entries go. The two lowest
    of the whole matrix are patch -> class (0.01 and 0.02); vit-explain would drop them (it spares
    only entry [0, 0]). vsink never drops attention to a class token, so it drops the two lowest of
    the rest, 0.08 at (1, 2) and 0.1 at (0, 2); then 0.5 A + 0.5 I with rows renormalised:
    row 0 [0.8, 0.15, 0] / 0.95, row 1 [0.01, 0.95, 0] / 0.96, row 2 [0.005, 0.095, 0.9] / 1."""
    fused = torch.tensor([[[0.6, 0.3, 0.1], [0.02, 0.9, 0.08], [0.01, 0.19, 0.8]]], dtype=torch.float64)
    step = rollout_step(fused, TokenLayout(1, 0, (1, 2)), discard_ratio=0.25)[0]
    expected = torch.tensor([[0.8 / 0.95, 0.15 / 0.95, 0.0], [0.01 / 0.96, 0.95 / 0.96, 0.0],
                             [0.005, 0.095, 0.9]], dtype=torch.float64)
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("registers", [0, 1, 4])
@pytest.mark.parametrize("fusion, discard", [("mean", 0.0), ("max", 0.3)])
def test_rollout_equals_direct_product(registers, fusion, discard, tmp_path):
    model = sharpen(timm_model("vit_small_patch14_reg4_dinov2", img_size=42, reg_tokens=registers))
    backbone = vsink.wrap(model)
    layout = backbone.layout()
    assert layout.num_registers == registers
    img = image()
    x = backbone.preprocess([img])
    _, attentions = timm_reference(model, x)
    ref = reference_rollout(attentions, 1, layout.num_prefix, fusion, discard)
    export_maps(backbone, [img], tmp_path, kinds=["rollout"], formats=["npz"], fusion=fusion,
                discard_ratio=discard, progress=False)
    with np.load(tmp_path / "image-0.npz") as d:
        assert d["rollout"].shape == layout.grid
        np.testing.assert_allclose(d["rollout"], layout.patch_grid(ref, dim=0).numpy(), atol=1e-5)
        np.testing.assert_allclose(d["rollout/prefix"], ref[:layout.num_prefix].numpy(), atol=1e-5)
        assert d["rollout/prefix"].shape == (1 + registers,)
        if fusion == "mean":
            assert d["rollout"].sum() + d["rollout/prefix"].sum() == pytest.approx(1.0, abs=1e-5)


def test_rollout_without_class_token_uses_patch_rows(tmp_path):
    model = sharpen(hf_model("siglip"))
    backbone = vsink.wrap(model)
    img = image((32, 32))
    with torch.no_grad():
        ref = model(pixel_values=backbone.preprocess([img]), output_attentions=True).attentions
    expected = reference_rollout(ref, 0, 0)
    export_maps(backbone, [img], tmp_path, kinds=["rollout", "received"], formats=["npz"], progress=False)
    with np.load(tmp_path / "image-0.npz") as d:
        np.testing.assert_allclose(d["rollout"].ravel(), expected.numpy(), atol=1e-5)
    with pytest.raises(vsink.VsinkError, match="no class token"):
        export_maps(backbone, [img], tmp_path, kinds=["cls"], progress=False)


def test_maps_equal_library_attention_and_rows_sum_to_one(tmp_path):
    model = sharpen(timm_model("vit_small_patch14_reg4_dinov2", img_size=42))
    backbone = vsink.wrap(model)
    layout = backbone.layout()
    img = image()
    _, attentions = timm_reference(model, backbone.preprocess([img]))
    with pytest.warns(UserWarning, match=r"MiB per image"):
        export_maps(backbone, [img], tmp_path, kinds=["cls", "received", "full"], heads="all", formats=["npz"],
                    progress=False)
    with np.load(tmp_path / "image-0.npz") as d:
        for layer, a in enumerate(attentions):
            a = a[0]  # [H, N, N]
            full = d[f"full/layer{layer}"]
            assert full.shape == (backbone.num_heads, layout.num_tokens, layout.num_tokens)
            np.testing.assert_allclose(full, a.numpy(), atol=1e-5)
            np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)
            cls, received = d[f"cls/layer{layer}"], d[f"received/layer{layer}"]
            assert cls.shape == (backbone.num_heads, *layout.grid)
            np.testing.assert_allclose(cls, layout.patch_grid(a[:, 0], dim=1).numpy(), atol=1e-5)
            np.testing.assert_allclose(d[f"cls/layer{layer}/prefix"], a[:, 0, :5].numpy(), atol=1e-5)
            np.testing.assert_allclose(received, layout.patch_grid(a.mean(1), dim=1).numpy(), atol=1e-5)
            np.testing.assert_allclose(d[f"cls/layer{layer}/mean"], cls.mean(0), atol=1e-6)
            for kind in ("cls", "received"):
                rows = d[f"{kind}/layer{layer}"].sum(axis=(1, 2)) + d[f"{kind}/layer{layer}/prefix"].sum(-1)
                np.testing.assert_allclose(rows, 1.0, atol=1e-5)


def test_full_attention_is_streamed_block_by_block():
    backbone = vsink.wrap(timm_model("vit_small_patch14_reg4_dinov2", img_size=42))
    events = []
    observer = FullAttentionObserver([0, 1], None, lambda layer, a: events.append(("full", layer, a.shape)))
    handles = observer.install(backbone)
    handles += [backbone.hook("block_output", i, lambda x, i=i: events.append(("block", i))) for i in range(2)]
    backbone.forward(torch.randn(1, 3, 42, 42))
    for h in handles:
        h.remove()
    n = backbone.layout().num_tokens
    assert events == [("full", 0, (1, 4, n, n)), ("block", 0), ("full", 1, (1, 4, n, n)), ("block", 1)]


def test_demo_norm_maps_show_planted_outliers(tmp_path):
    backbone = vsink.load("demo")
    images = demo_images()
    firing = planted_firing(backbone, images)  # [B, P]
    export_maps(backbone, images, tmp_path, kinds=["norm"], layers=[1, D.PLANTED_BLOCK], formats=["npz"],
                progress=False)
    layout = backbone.layout()
    for i, stem in enumerate(["china", "flower"]):
        with np.load(tmp_path / f"{stem}.npz") as d:
            planted = firing[i].reshape(layout.grid).numpy()  # firing is over patches only
            after = d[f"norm/layer{D.PLANTED_BLOCK}"]
            assert planted.any() and after[planted].min() > 2 * after[~planted].max()
            before = d["norm/layer1"]  # before the write the flat patches are the quiet ones
            assert before[planted].max() < np.median(before[~planted])
            assert d[f"norm/layer{D.PLANTED_BLOCK}/prefix"].shape == (1,)


def test_cli_maps_files_heads_and_bad_input(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    image((70, 50)).save(folder / "wide.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "out"
    code = main(["maps", str(folder), "--out", str(out), "--layers", "1,-1", "--heads", "all", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    index = json.loads((out / "maps.json").read_text())
    assert [s["image"] for s in index["skipped"]] == [str(folder / "broken.jpg")]
    assert index["synthetic"] is True and index["settings"]["layers"] == [1, 5]
    files = set(index["images"][0]["files"])
    assert {"wide.npz", "wide/contact.png", "wide/rollout.png", "wide/norm_layer5.png",
            "wide/cls_layer1_mean.png", "wide/cls_layer1_head2.png", "wide/received_layer5_head0.png"} <= files
    assert all((out / f).is_file() for f in files)
    with np.load(out / "wide.npz") as d:
        assert d["cls/layer5"].shape == (3, 14, 14) and "cls/layer0/mean" not in d.files
    png = Image.open(out / "wide" / "cls_layer1_mean.png")
    assert png.size[0] > 200


def test_keep_aspect_on_dynamic_models(tmp_path):
    dynamic = vsink.wrap(timm_model("vit_tiny_patch16_224", patch_size=8, img_size=32, dynamic_img_size=True))
    result = export_maps(dynamic, [image((80, 40))], tmp_path, kinds=["norm", "rollout"], formats=["npz"],
                         img_size=48, keep_aspect=True, progress=False)
    assert result.images[0].layout.grid == (3, 6)
    with np.load(tmp_path / "image-0.npz") as d:
        assert d["rollout"].shape == (3, 6) and d["norm/layer0"].shape == (3, 6)
    fixed = vsink.load("demo")
    with pytest.raises(vsink.VsinkError, match="fixed-size inputs"):
        export_maps(fixed, [image()], tmp_path, keep_aspect=True, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"kinds": ["heat"]}, "unknown map kind"),
    ({"kinds": ["full"], "formats": ["png"]}, "npz only"),
    ({"layers": "0,9"}, "out of range"),
    ({"heads": "first"}, "mean | all or a comma list"),
    ({"fusion": "median"}, "unknown head fusion"),
])
def test_bad_options(kwargs, message, tmp_path):
    with pytest.raises(vsink.VsinkError, match=message):
        export_maps(vsink.load("demo"), [image()], tmp_path, progress=False, **kwargs)


def test_no_warning_without_full(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_maps(vsink.load("demo"), [image()], tmp_path, kinds=["norm"], formats=["npz"], progress=False)
