"""Hugging Face DINOv3, SigLIP2 and AIMv2 vision encoders (issue 22) on tiny random models built
from their configs: layouts, rotary positions at other grids, appended registers under RoPE, the
attention-pooling probe, NaFlex grids, saving through the libraries' own loaders, and the CLI.

Verified here: tiny offline models (hidden 64, 2 layers, 4 heads, random weights). Not verified:
released checkpoints (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.backbones.base import Backbone
from vsink.cli import main
from vsink.errors import VsinkError

from conftest import capture_probs, hf_call, hf_model, require_hf_class, sharpen

TOL = 1e-5


@pytest.mark.parametrize("kind, layout", [
    ("dinov3", (1, 0, (4, 4))),
    ("dinov3_reg", (1, 2, (4, 4))),  # storage tokens are registers, right after the class token
    ("siglip2", (0, 0, (4, 4))),
    ("aimv2", (0, 0, (4, 4))),
])
def test_layouts_match_the_token_outputs(kind, layout, pixel_values):
    backbone = vsink.wrap(hf_model(kind))
    got = backbone.layout()
    assert (got.num_cls, got.num_registers, got.grid) == layout
    out = backbone.forward(pixel_values())
    assert out.shape == (2, got.num_tokens, 64)
    with torch.no_grad():
        assert torch.allclose(out, hf_call(backbone.model, pixel_values()).last_hidden_state, atol=TOL)


@pytest.mark.parametrize("kind", ["dinov3_reg", "siglip2", "aimv2_native"])
def test_attention_at_another_grid_equals_eager(kind):
    """A 48x40 input: a 6x5 grid, so DINOv3's rotary angles, SigLIP2's resized position table and
    AIMv2's sine-cosine positions all differ from the default size."""
    model = sharpen(hf_model(kind, "eager"))
    backbone = vsink.wrap(model)
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    assert backbone.layout((48, 40)).grid == (6, 5)
    with torch.no_grad():
        ref = hf_call(model, x, output_attentions=True)
    out, probs = capture_probs(backbone, x)
    for p, r in zip(probs, ref.attentions):
        assert p.shape == r.shape == (2, 4, backbone.layout((48, 40)).num_tokens, backbone.layout((48, 40)).num_tokens)
        assert (p - r).abs().max().item() <= TOL
    assert (out - ref.last_hidden_state).abs().max().item() <= TOL


def test_fixed_size_aimv2_refuses_other_sizes():
    backbone = vsink.wrap(hf_model("aimv2"))
    assert not backbone.dynamic_size
    with pytest.raises(VsinkError, match="takes only 32x32 inputs"):
        backbone.forward(torch.zeros(1, 3, 48, 48))
    assert vsink.wrap(hf_model("aimv2_native")).dynamic_size


def _dinov3_with_more_storage(model, n):
    """HF's own DINOv3 with ``n`` more storage tokens, all zero: the reference for appended tokens
    that get no rotary position (HF leaves the prefix tokens unrotated)."""
    import transformers

    cfg = model.config.to_dict()
    cfg["num_register_tokens"] += n
    cfg.pop("model_type", None)
    bigger = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)).eval()
    state = dict(model.state_dict())
    old = state.pop("embeddings.register_tokens")
    state["embeddings.register_tokens"] = torch.cat([old, old.new_zeros(1, n, old.shape[-1])], dim=1)
    bigger.load_state_dict(state)
    bigger.set_attn_implementation(model.config._attn_implementation)
    return bigger


def test_dinov3_appended_registers_get_no_rotary_position(pixel_values):
    """Appended registers sit after the patches but are positioned like DINOv3's own prefix
    tokens (unrotated), and every patch keeps its rotary angle: the outputs equal HF's DINOv3
    with the same zero tokens as extra storage tokens, reordered."""
    model = sharpen(hf_model("dinov3_reg"))
    backbone = vsink.wrap(model)
    x = pixel_values()
    n = 2
    with torch.no_grad():
        ref = _dinov3_with_more_storage(model, n)(pixel_values=x).last_hidden_state
    prefix = 1 + 2  # class + the model's own storage tokens
    handle = backbone.append_tokens(n)
    layout = backbone.layout()
    out = backbone.forward(x)
    assert layout.appended_indices() == [prefix + 16, prefix + 17] and out.shape[1] == layout.num_tokens
    assert torch.allclose(layout.patches(out), ref[:, prefix + n:], atol=TOL)
    assert torch.allclose(out[:, layout.appended_indices()], ref[:, prefix:prefix + n], atol=TOL)
    assert torch.allclose(out[:, :prefix], ref[:, :prefix], atol=TOL)
    handle.remove()
    assert backbone.forward(x).shape[1] == backbone.layout().num_tokens == prefix + 16
    # without the identity rotary rows, HF rotates the last 16 tokens: the patches' angles shift
    plain = Backbone.append_tokens(backbone, n)
    shifted = backbone.forward(x)
    plain.remove()
    assert (layout.patches(shifted) - ref[:, prefix + n:]).abs().max() > 1e-2


def test_dinov3_with_registers_is_native_and_loads_with_transformers(tmp_path, pixel_values):
    import transformers

    backbone = vsink.wrap(sharpen(hf_model("dinov3_reg")))
    student = backbone.with_registers(3, init_std=0.1)
    assert type(student).__name__ == "HFDinov3Backbone" and student.model.config.num_register_tokens == 5
    assert student.layout().num_registers == 5 and student.register_parameter_names == ["embeddings.register_tokens"]
    x = pixel_values()
    expected = student.forward(x)
    student.save(tmp_path)
    loaded = transformers.DINOv3ViTModel.from_pretrained(tmp_path, local_files_only=True,
                                                          trust_remote_code=False).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).last_hidden_state, expected, atol=TOL)
    again = vsink.load(str(tmp_path))
    assert again.layout().num_registers == 5 and torch.allclose(again.forward(x), expected, atol=TOL)


@pytest.mark.parametrize("kind, model_class", [("siglip2", "Siglip2VisionModel"), ("aimv2", "Aimv2VisionModel")])
def test_save_and_load_through_the_library_loader(kind, model_class, tmp_path, pixel_values):
    import transformers

    backbone = vsink.wrap(sharpen(hf_model(kind)))
    x = pixel_values()
    expected = backbone.forward(x)
    backbone.save(tmp_path / "plain")
    loaded = getattr(transformers, model_class).from_pretrained(tmp_path / "plain", local_files_only=True,
                                                                trust_remote_code=False).eval()
    with torch.no_grad():
        assert torch.allclose(hf_call(loaded, x).last_hidden_state, expected, atol=TOL)
    assert torch.allclose(vsink.load(str(tmp_path / "plain")).forward(x), expected, atol=TOL)
    student = backbone.with_registers(2, init_std=0.1)  # no native registers: hooked ones
    assert student.register_parameter_names == ["vsink_registers"] and student.layout().num_registers == 2
    student.save(tmp_path / "reg")
    reloaded = vsink.load(str(tmp_path / "reg"))
    assert reloaded.layout().num_registers == 2
    assert torch.allclose(reloaded.forward(x), student.forward(x), atol=TOL)


def test_siglip2_cuts_patches_like_its_processor_and_refuses_padded_batches():
    from vsink.backbones.hf_siglip2 import patchify

    from conftest import siglip2_patches

    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    patches, shapes = patchify(x, 8)
    assert torch.equal(patches, siglip2_patches(x, 8))
    assert shapes.tolist() == [[6, 5], [6, 5]]
    # by hand: patch (row 2, col 3), pixel (row 1, col 4), channel 2
    assert patches[1, 2 * 5 + 3, (1 * 8 + 4) * 3 + 2] == x[1, 2, 2 * 8 + 1, 3 * 8 + 4]
    backbone = vsink.wrap(hf_model("siglip2"))
    assert backbone.img_size == (32, 32)  # num_patches 16 = a 4x4 grid of 8 px patches
    with pytest.raises(VsinkError, match="one patch grid per call.*different token layout per image"):
        backbone.forward(patches)


def test_siglip2_runs_each_aspect_ratio_on_its_own_grid(tmp_path):
    """maps --keep-aspect: a wide and a tall image each get their own grid (NaFlex-like), and
    each map has that image's grid."""
    backbone = vsink.wrap(hf_model("siglip2"))
    images = []
    for name, size in (("wide", (64, 32)), ("tall", (24, 48))):
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    result = vsink.export_maps(backbone, images, tmp_path / "maps", kinds=["received", "norm"], keep_aspect=True,
                               formats=["npz"], progress=False)
    grids = [m.layout.grid for m in result.images]
    assert grids == [(2, 4), (4, 2)]
    with np.load(tmp_path / "maps" / "wide.npz") as arrays:
        assert arrays["received/layer0/mean"].shape == (2, 4)


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "aimv2"])
def test_pooling_probe_attention(kind, pixel_values):
    """The attention-pooling head's probe over the output tokens: equal to the library's own
    computation, and the outputs are unchanged while it is observed."""
    model = sharpen(hf_model(kind))
    backbone = vsink.wrap(model)
    x = pixel_values()
    seen, inputs = [], {}
    head = backbone.pool_head
    with torch.no_grad():  # a longer probe: attention far from uniform
        (head.cls_token if kind == "aimv2" else head.probe).mul_(8.0)
    handle_in = head.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0]))
    with torch.no_grad():
        plain = hf_call(model, x)
    handle = backbone.hook_pool(lambda p: seen.append(p.clone()))
    observed = backbone.forward(x)
    handle.remove()
    handle_in.remove()
    probs = seen[0]
    n = backbone.layout().num_tokens
    assert probs.shape == (2, 4, 1, n)
    assert torch.equal(observed, plain.last_hidden_state)
    if kind == "aimv2":
        # the head's own output rebuilt from these probabilities: output_proj(probs @ v_proj(x))
        with torch.no_grad():
            v = head.v_proj(inputs["x"].clone()).reshape(2, n, 4, 16).transpose(1, 2)
            rebuilt = head.output_proj((probs.clone() @ v).transpose(1, 2).reshape(2, 64))
        assert torch.allclose(rebuilt, plain.pooler_output, atol=TOL)
    else:  # nn.MultiheadAttention's own per-head weights
        h = inputs["x"].clone()
        probe = head.probe.expand(2, -1, -1)
        with torch.no_grad():
            _, ref = head.attention(probe, h, h, need_weights=True, average_attn_weights=False)
        assert (probs - ref).abs().max() <= TOL
    assert probs.max() > 0.2


def test_models_without_a_pooling_head_say_so():
    with pytest.raises(VsinkError, match="has no attention-pooling head"):
        vsink.wrap(hf_model("dinov3")).hook_pool(lambda p: None)


def _planted_dinov3():
    """A DINOv3 whose block-0 MLP neuron 7 fires on bright patches and writes a large value into
    channel 5: a planted register neuron (high-norm tokens from block 0 on)."""
    model = hf_model("dinov3")
    d = 64
    with torch.no_grad():
        emb = model.embeddings.patch_embeddings
        emb.weight.zero_()
        emb.bias.zero_()
        emb.weight[3] = 1.0 / emb.weight[3].numel()  # channel 3: the patch's mean brightness
        emb.weight[4] = torch.randn(emb.weight[4].shape, generator=torch.Generator().manual_seed(0)) * 0.05
        block = model.model.layer[0] if hasattr(model, "model") else model.layer[0]
        block.mlp.up_proj.weight.zero_()
        block.mlp.up_proj.bias.fill_(-3.0)
        block.mlp.up_proj.weight[7, 3] = 4.0
        block.mlp.down_proj.weight.zero_()
        block.mlp.down_proj.weight[5, 7] = 50.0
        block.layer_scale2.lambda1.fill_(1.0)
    assert block.mlp.up_proj.weight.shape == (128, d)
    return model


def _bright_spot_images(root, count=3):
    root.mkdir()
    paths = []
    rng = np.random.default_rng(1)
    for i in range(count):
        arr = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        r, c = 8 * (i % 4), 8 * ((i + 1) % 4)
        arr[r:r + 8, c:c + 8] = 255  # one bright patch
        Image.fromarray(arr).save(root / f"img{i}.png")
        paths.append(str(root / f"img{i}.png"))
    return paths


def test_cli_on_dinov3_scan_maps_neurons_and_test_time_registers(tmp_path, capsys):
    require_hf_class("dinov3")
    saved = vsink.wrap(_planted_dinov3()).save(tmp_path / "dinov3")
    images = _bright_spot_images(tmp_path / "images")
    assert main(["scan", *images, "--model", str(saved), "--out", str(tmp_path / "scan"), "--no-progress"]) == 0
    scan = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert scan["layout"]["grid"] == [4, 4] and scan["layout"]["cls"] == 1
    # the bright patch of each of the 3 images, at both blocks (the write stays in the residual stream)
    assert scan["high_norm"]["emergence_layer"] == 0 and scan["high_norm"]["tokens_total"] == 3 * 2
    assert main(["maps", *images, "--model", str(saved), "--format", "npz", "--out", str(tmp_path / "maps"),
                 "--no-progress"]) == 0
    assert "kinds: cls, received, norm, rollout; left out pool (no attention-pooling head)" in capsys.readouterr().out
    with np.load(tmp_path / "maps" / "img0.npz") as arrays:
        assert {"cls/layer0/mean", "rollout", "norm/layer1"} <= set(arrays.files)
        assert not any(name.startswith("pool") for name in arrays.files)
        assert arrays["norm/layer1"].shape == (4, 4) and np.argmax(arrays["norm/layer1"]) == 0 * 4 + 1
    assert main(["registers", "find", *images, "--model", str(saved), "--out", str(tmp_path / "neurons.json"),
                 "--no-progress"]) == 0
    found = json.loads((tmp_path / "neurons.json").read_text())
    assert (found["neurons"][0]["layer"], found["neurons"][0]["neuron"]) == (0, 7)
    assert main(["scan", *images, "--model", str(saved), "--test-time-registers", str(tmp_path / "neurons.json"),
                 "--ttr-registers", "1", "--out", str(tmp_path / "fixed"), "--no-progress"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "scan.json").read_text())
    assert fixed["layout"]["registers_appended"] == 1
    assert fixed["high_norm"]["tokens_total"] == 0  # the planted write moved onto the appended register


@pytest.mark.parametrize("kind", ["siglip2", "aimv2"])
def test_cli_on_models_without_a_class_token(kind, tmp_path, capsys):
    saved = vsink.wrap(sharpen(hf_model(kind))).save(tmp_path / kind)
    images = _bright_spot_images(tmp_path / "images", count=2)
    if kind == "siglip2":  # the CLI scan once (its report takes most of the time), the library's for AIMv2
        assert main(["scan", *images, "--model", str(saved), "--out", str(tmp_path / "scan"), "--no-progress"]) == 0
        scan = json.loads((tmp_path / "scan" / "scan.json").read_text())
    else:
        scan = vsink.scan(vsink.load(str(saved)), images, progress=False).to_json()
    assert scan["layout"]["cls"] == 0 and scan["layout"]["tokens"] == 16 and len(scan["layers"]) == 2
    # the default kinds follow the layout: no class token, so no cls map; the pooling probe's map instead
    capsys.readouterr()
    assert main(["maps", *images, "--model", str(saved), "--format", "npz", "--out", str(tmp_path / "default"),
                 "--no-progress"]) == 0
    assert "kinds: received, norm, rollout, pool; left out cls (no class token)" in capsys.readouterr().out
    assert json.loads((tmp_path / "default" / "maps.json").read_text())["settings"]["kinds"] == [
        "received", "norm", "rollout", "pool"]
    with np.load(tmp_path / "default" / "img0.npz") as arrays:
        assert {"received/layer1/mean", "norm/layer1", "rollout", "pool/mean"} <= set(arrays.files)
        assert not any(name.startswith("cls/") for name in arrays.files)
    code = main(["maps", *images, "--model", str(saved), "--kind", "cls", "--out", str(tmp_path / "m"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no class token: kind 'cls' is not available (its attention-pooling head's probe: kind 'pool')" in err
    formats = "png,npz" if kind == "siglip2" else "npz"  # the overlays once (they take most of the time)
    assert main(["maps", images[0], "--model", str(saved), "--kind", "received,norm,rollout,pool", "--heads", "all",
                 "--layers", "-1", "--format", formats, "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    with np.load(tmp_path / "m" / "img0.npz") as arrays:
        # without a class token, rollout is the mean of the patch rows (docs/maps.md)
        assert arrays["rollout"].shape == (4, 4) and arrays["rollout/prefix"].shape == (0,)
        # the probe's attention: one distribution per head over the 16 output tokens
        assert arrays["pool"].shape == (4, 4, 4) and arrays["pool/prefix"].shape == (4, 0)
        assert np.allclose(arrays["pool"].sum(axis=(1, 2)), 1.0, atol=1e-5)
        assert np.allclose(arrays["pool/mean"], arrays["pool"].mean(axis=0), atol=1e-6)
    if kind == "siglip2":
        assert (tmp_path / "m" / "img0" / "pool_mean.png").is_file()
        assert (tmp_path / "m" / "img0" / "pool_head3.png").is_file()


def test_pool_maps_equal_the_pooling_probe_and_are_refused_without_a_head(tmp_path):
    backbone = vsink.wrap(sharpen(hf_model("siglip2")))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    seen = []
    handle = backbone.hook_pool(lambda p: seen.append(p.clone()))
    backbone.forward(backbone.preprocess([image]))
    handle.remove()
    vsink.export_maps(backbone, [image], tmp_path / "m", kinds=["pool"], heads="all", formats=["npz"], progress=False)
    with np.load(next((tmp_path / "m").glob("*.npz"))) as arrays:
        assert np.allclose(arrays["pool"], seen[0][0, :, 0].reshape(4, 4, 4).numpy(), atol=1e-6)
    # hooked registers leave before the final norm: the head attends over the 16 patches only
    student = backbone.with_registers(2, init_std=0.1)
    assert student.layout().num_tokens == 18 and student.pool_layout().num_tokens == 16
    vsink.export_maps(student, [image], tmp_path / "r", kinds=["pool", "norm"], formats=["npz"], progress=False)
    with np.load(next((tmp_path / "r").glob("*.npz"))) as arrays:
        assert arrays["pool/mean"].shape == (4, 4) and arrays["pool/prefix"].shape == (4, 0)
        assert arrays["norm/layer0/prefix"].shape == (2,)  # the blocks do see them
        assert np.isclose(arrays["pool/mean"].sum(), 1.0, atol=1e-5)
    with pytest.raises(VsinkError, match="no attention-pooling head: kind 'pool' is not available"):
        vsink.export_maps(vsink.wrap(hf_model("dinov3")), [image], tmp_path / "d", kinds=["pool"], progress=False)


def test_siglip2_loads_from_a_full_checkpoint_and_full_aimv2_is_refused(tmp_path, pixel_values):
    """A full SigLIP2 checkpoint (text and vision, model type 'siglip2') loads its vision tower;
    transformers' Aimv2VisionModel does not read a full AIMv2 checkpoint's vision weights, so
    model type 'aimv2' is refused rather than run with random weights."""
    import transformers

    require_hf_class("siglip2")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=8,
                  num_patches=16)
    torch.manual_seed(0)
    full = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision)).eval()
    full.save_pretrained(tmp_path / "siglip2")
    backbone = vsink.load(f"hf:{tmp_path / 'siglip2'}")
    assert type(backbone).__name__ == "HFSiglip2Backbone"
    x = pixel_values()
    with torch.no_grad():
        expected = hf_call(full.vision_model, x).last_hidden_state
    assert torch.allclose(backbone.forward(x), expected, atol=TOL)
    require_hf_class("aimv2")
    transformers.Aimv2Model(transformers.Aimv2Config(
        text_config=dict(text, eos_token_id=2), vision_config=dict(vision, image_size=32))).save_pretrained(
        tmp_path / "aimv2")
    with pytest.raises(vsink.errors.ModelSpecError, match="model type 'aimv2' is not supported"):
        vsink.load(f"hf:{tmp_path / 'aimv2'}")


def test_vsink_models_lists_the_new_encoders(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("DINOv3ViTModel", "Siglip2VisionModel", "Aimv2VisionModel", "verified on tiny offline models only"):
        assert name in out
