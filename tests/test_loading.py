"""Model specs and checkpoints: every family loads from local files; bad specs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import vsink
from vsink.errors import ModelSpecError, VsinkError
from conftest import hf_call, hf_model, timm_model

REG4 = dict(img_size=42, depth=2, embed_dim=64, num_heads=4)


def test_timm_spec_with_safetensors_and_torch_weights(tmp_path, pixel_values):
    source = timm_model("vit_small_patch14_reg4_dinov2", img_size=42)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": state}, tmp_path / "w.pt")
    x = pixel_values(size=42)
    with torch.no_grad():
        expected = source.forward_features(x)
    for path in ("w.safetensors", "w.pt"):
        backbone = vsink.load("timm:vit_small_patch14_reg4_dinov2", weights=tmp_path / path,
                              model_kwargs={k: v for k, v in REG4.items() if k != "img_size"}, img_size=42)
        assert backbone.family == "timm" and backbone.layout().num_registers == 4
        assert torch.equal(backbone.forward(x), expected)


class NotATensor:
    pass


def test_checkpoints_are_loaded_safely(tmp_path):
    torch.save({"weights": NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(VsinkError, match="cannot read weights file .*pickle.pt: it holds Python objects"):
        vsink.load("timm:vit_small_patch14_dinov2", weights=tmp_path / "pickle.pt", model_kwargs=REG4)
    save_file({"unrelated": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(VsinkError, match="does not match the model: missing"):
        vsink.load("timm:vit_small_patch14_dinov2", weights=tmp_path / "other.safetensors",
                   model_kwargs={k: v for k, v in REG4.items() if k != "img_size"}, img_size=42)
    with pytest.raises(VsinkError, match="weights file not found"):
        vsink.load("demo", weights=tmp_path / "missing.safetensors")


def test_open_clip_spec_from_registered_config(tmp_path, pixel_values):
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "vsink-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "vsink-test-tiny.json")
    torch.manual_seed(0)
    source = open_clip.create_model("vsink-test-tiny").eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "full.safetensors")
    save_file({k: v.contiguous() for k, v in source.visual.state_dict().items()}, tmp_path / "visual.safetensors")
    x = pixel_values()
    with torch.no_grad():
        expected = source.visual(x)
    for name in ("full", "visual"):
        backbone = vsink.load("open_clip:vsink-test-tiny", weights=tmp_path / f"{name}.safetensors")
        assert backbone.family == "open_clip" and backbone.num_heads == 4
        assert torch.equal(backbone.forward(x), expected)
    with pytest.raises(ModelSpecError, match="open_clip has no model named"):
        vsink.load("open_clip:no-such-arch/tag")


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg", "clip", "siglip", "dinov3_reg", "siglip2", "aimv2"])
def test_hf_local_directory(kind, tmp_path, pixel_values):
    from transformers import ViTImageProcessor

    source = hf_model(kind, "eager")
    source.save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    x = pixel_values()
    with torch.no_grad():
        expected = hf_call(source, x).last_hidden_state
    for spec in (f"hf:{tmp_path}", str(tmp_path)):
        backbone = vsink.load(spec, attn_implementation="eager")
        assert backbone.family == "hf" and backbone.model.config._attn_implementation == "eager"
        assert backbone.mean == pytest.approx((0.1, 0.2, 0.3)) and backbone.std == pytest.approx((0.4, 0.5, 0.6))
        assert torch.allclose(backbone.forward(x), expected, atol=1e-6)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    rebuilt = vsink.load(f"hf:{tmp_path}", weights=tmp_path / "w.safetensors")
    assert torch.allclose(rebuilt.forward(x), expected, atol=1e-6)


def test_hf_dynamic_size(tmp_path, pixel_values):
    hf_model("dinov2_reg", "eager").save_pretrained(tmp_path)
    backbone = vsink.load(f"hf:{tmp_path}", img_size=48)
    assert backbone.layout().grid == (6, 6)
    assert backbone.forward(pixel_values(size=48)).shape == (2, 1 + 4 + 36, 64)
    vit = hf_model("vit")
    vit.save_pretrained(tmp_path / "vit")
    wide = vsink.load(f"hf:{tmp_path / 'vit'}")
    assert wide.forward(torch.randn(1, 3, 40, 48)).shape == (1, 1 + 30, 64)


@pytest.mark.parametrize("spec, message", [
    ("resnet50", "unknown form"),
    ("timm:", "unknown form"),
    ("timm:definitely_not_a_model", "timm has no model named"),
    ("hf:/nonexistent/dir", "cannot load"),
    ("", "empty spec"),
])
def test_bad_specs_list_supported_forms(spec, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        vsink.load(spec)
    assert "supported model specs" in str(info.value) and "open_clip:NAME" in str(info.value)


def test_hf_unsupported_model_type(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
              ).save_pretrained(tmp_path)
    with pytest.raises(ModelSpecError, match="model type 'bert' is not supported"):
        vsink.load(f"hf:{tmp_path}")


def test_sizes_devices_dtypes():
    demo = vsink.load("demo")
    with pytest.raises(VsinkError, match="not a multiple of the patch size"):
        demo.layout((100, 100))
    with pytest.raises(VsinkError, match="takes only 224x224"):
        demo.layout((160, 160))
    assert vsink.load("demo", img_size=160).layout().grid == (10, 10)
    with pytest.raises(VsinkError, match="unknown dtype"):
        vsink.load("demo", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(VsinkError, match="CUDA is not available"):
            vsink.load("demo", device="cuda")
    bf16 = vsink.load("demo", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    with vsink.Probe(bf16) as probe:
        probe.run(bf16.preprocess([__import__("PIL.Image").Image.new("RGB", (50, 40))]))
    assert probe.trace().attn_received.sum(-1) == pytest.approx(1.0, abs=2e-2)


def test_wrap_rejects_other_modules():
    with pytest.raises(VsinkError, match="cannot wrap"):
        vsink.wrap(torch.nn.Linear(2, 2))


def test_unsupported_timm_architectures_fail_clearly(pixel_values):
    beit = timm_model("beit_base_patch16_224", patch_size=8)
    with pytest.raises(VsinkError, match="cannot wrap a timm.models.beit.Beit: no model family wraps it"):
        vsink.wrap(beit)
    with pytest.raises(VsinkError, match=r"Beit is not a timm VisionTransformer \(ViT, DeiT, DINOv2\) or Eva"):
        vsink.load("timm:beit_base_patch16_224", pretrained=False,
                   model_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2))
    diff = vsink.wrap(timm_model("vit_tiny_patch16_224", patch_size=8, attn_layer="diff"))
    with pytest.raises(VsinkError, match="not timm's standard Attention"):
        diff.hook("attn_probs", 0, lambda p, s, z: None)
    assert not diff.attention_routed(0)
