"""Registers added to pretrained models of every family: exact when masked out, saved in formats
the libraries' own loaders read."""

import json

import pytest
import torch

import vsink
from vsink.errors import VsinkError

from conftest import HF_CASES, hf_model, open_clip_visual, sharpen, timm_case

TOL = dict(atol=1e-5, rtol=1e-5)
CASES = ([("timm", c) for c in ("deit", "dinov2", "dinov2_reg4", "vit_dynamic")]
         + [("hf", k) for k in HF_CASES] + [("open_clip", None), ("open_clip", "custom")])


def _model(family, case):
    """Sharpened (layer scale 1, larger weights) so the registers' effect is visible when unmasked."""
    if family == "timm":
        return sharpen(timm_case(case))
    if family == "hf":
        return sharpen(hf_model(case))
    return sharpen(open_clip_visual(block_type=case))


def _masked_forward(backbone, x, columns):
    """Forward with every query's attention to ``columns`` removed (logits -inf) in every block."""
    def mask(logits, q_start):
        logits = logits.clone()
        logits[..., columns] = float("-inf")
        return logits

    handles = [backbone.hook("attn_logits", i, mask) for i in range(backbone.num_layers)]
    try:
        return backbone.forward(x)
    finally:
        for h in handles:
            h.remove()


def _without(tokens, layout, columns):
    keep = [i for i in range(layout.num_tokens) if i not in columns]
    return tokens[:, keep]


@pytest.mark.parametrize("family, case", CASES)
def test_masked_registers_reproduce_the_original(family, case, pixel_values):
    backbone = vsink.wrap(_model(family, case))
    size = backbone.img_size[0]
    x = pixel_values(size=size)
    before = backbone.forward(x)
    old = backbone.layout()
    student = backbone.with_registers(3, init_std=0.5)
    layout = student.layout()
    assert layout.num_registers == old.num_registers + 3 and layout.grid == old.grid
    new = layout.register_indices()[-3:]
    masked = _masked_forward(student, x, new)
    plain = student.forward(x)
    if masked.shape != before.shape:  # native registers stay in the token output
        masked, plain = _without(masked, layout, new), _without(plain, layout, new)
    assert torch.allclose(masked, before, **TOL)
    assert (plain - before).abs().max() > 1e-3  # unmasked, the registers take part
    assert torch.equal(backbone.forward(x), before)  # the original is untouched


def test_register_parameters_are_named_and_small():
    from vsink.registers import add_registers

    backbone = vsink.wrap(timm_case("deit"))
    student = add_registers(backbone, 4)
    assert student.register_parameter_names == ["reg_token"]
    assert student.model.reg_token.abs().max() < 1e-4  # ~N(0, 1e-6^2) as in the references
    hooked = vsink.wrap(hf_model("vit")).with_registers(2, init_std=0.02)
    assert hooked.register_parameter_names == ["vsink_registers"]
    with pytest.raises(VsinkError, match="distilled DeiT"):
        vsink.wrap(timm_case("deit_distilled")).with_registers(1)
    with pytest.raises(VsinkError, match=r"n \(registers\) must be an integer in \[1, 1024\], got 0"):
        backbone.with_registers(0)
    with pytest.raises(VsinkError, match="already has hooked registers"):
        hooked.with_registers(1)


def test_timm_registers_load_with_timm_own_loader(tmp_path, pixel_values):
    import timm

    kwargs = dict(img_size=42, depth=2, embed_dim=64, num_heads=4)
    backbone = vsink.load("timm:vit_small_patch14_dinov2", pretrained=False, model_kwargs=dict(kwargs))
    student = backbone.with_registers(2, init_std=0.1)
    student.save(tmp_path)
    meta = json.loads((tmp_path / "vsink.json").read_text())
    assert meta["model_kwargs"]["reg_tokens"] == 2 and meta["architecture"] == "vit_small_patch14_dinov2"
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=True, num_classes=0, reg_tokens=2,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")), **kwargs)
    x = pixel_values(size=42)
    expected = student.forward(x)
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_features(x), expected, **TOL)
    assert torch.allclose(vsink.load(str(tmp_path)).forward(x), expected, **TOL)


def test_dinov2_becomes_dinov2_with_registers(tmp_path, pixel_values):
    import transformers

    student = vsink.wrap(hf_model("dinov2")).with_registers(4, init_std=0.1)
    assert type(student.model).__name__ == "Dinov2WithRegistersModel"
    student.save(tmp_path)
    x = pixel_values(size=32)
    loaded = transformers.Dinov2WithRegistersModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).last_hidden_state, student.forward(x), **TOL)
    assert loaded.config.num_register_tokens == 4


def test_hooked_registers_round_trip_through_vsink_load(tmp_path, pixel_values):
    import open_clip
    from safetensors.torch import save_file

    student = vsink.wrap(hf_model("clip")).with_registers(2, init_std=0.1)
    student.save(tmp_path / "clip")
    x = pixel_values(size=32)
    reloaded = vsink.load(str(tmp_path / "clip"))
    assert reloaded.layout().num_registers == 2
    assert torch.allclose(reloaded.forward(x), student.forward(x), **TOL)

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "vsink-reg-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "vsink-reg-tiny.json")
    source = open_clip.create_model("vsink-reg-tiny").eval()
    save_file({k: v.contiguous() for k, v in source.visual.state_dict().items()}, tmp_path / "visual.safetensors")
    base = vsink.load("open_clip:vsink-reg-tiny", weights=tmp_path / "visual.safetensors")
    student = base.with_registers(3, init_std=0.1)
    student.save(tmp_path / "oc")
    reloaded = vsink.load(str(tmp_path / "oc"))
    assert reloaded.layout().num_registers == 3
    assert torch.allclose(reloaded.forward(x), student.forward(x), **TOL)


@pytest.mark.parametrize("family, case, expected", [
    ("timm", "dinov2_reg4", {"registers": ["reg_token"], "cls_token": ["cls_token"], "pos_embed": ["pos_embed"],
                             "patch_embed": ["patch_embed.proj.weight", "patch_embed.proj.bias"]}),
    ("hf", "vit", {"registers": [], "cls_token": ["embeddings.cls_token"],
                   "pos_embed": ["embeddings.position_embeddings"],
                   "patch_embed": ["embeddings.patch_embeddings.projection.weight",
                                   "embeddings.patch_embeddings.projection.bias"]}),
    ("hf", "dinov2_reg", {"registers": ["embeddings.register_tokens"], "cls_token": ["embeddings.cls_token"],
                          "pos_embed": ["embeddings.position_embeddings"],
                          "patch_embed": ["embeddings.patch_embeddings.projection.weight",
                                          "embeddings.patch_embeddings.projection.bias"]}),
    ("hf", "clip", {"registers": [], "cls_token": ["embeddings.class_embedding"],
                    "pos_embed": ["embeddings.position_embedding.weight"],
                    "patch_embed": ["embeddings.patch_embedding.weight"]}),
    ("hf", "siglip", {"registers": [], "cls_token": [], "pos_embed": ["embeddings.position_embedding.weight"],
                      "patch_embed": ["embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias"]}),
    # DINOv3's positions are rotary (no parameter); AIMv2's patches enter through a conv "patch_embed"
    ("hf", "dinov3_reg", {"registers": ["embeddings.register_tokens"], "cls_token": ["embeddings.cls_token"],
                          "pos_embed": [], "patch_embed": ["embeddings.patch_embeddings.weight",
                                                           "embeddings.patch_embeddings.bias"]}),
    ("hf", "siglip2", {"registers": [], "cls_token": [], "pos_embed": ["embeddings.position_embedding.weight"],
                       "patch_embed": ["embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias"]}),
    ("hf", "aimv2", {"registers": [], "cls_token": [], "pos_embed": ["embeddings.position_embedding.weight"],
                     "patch_embed": ["embeddings.patch_embed.weight", "embeddings.patch_embed.bias"]}),
    ("open_clip", None, {"registers": [], "cls_token": ["class_embedding"], "pos_embed": ["positional_embedding"],
                         "patch_embed": ["conv1.weight"]}),
])
def test_parameter_roles_name_the_embeddings(family, case, expected):
    backbone = vsink.wrap(_model(family, case))
    # transformers 4.x nests CLIP/SigLIP vision models one level deeper (vision_model.*); 5.x does not
    names = {id(p): n.removeprefix("vision_model.") for n, p in backbone.model.named_parameters()}
    got = {role: [names[id(p)] for p in params] for role, params in backbone.parameter_roles().items()}
    assert got == expected
    def tokens(b):
        return sum(p.shape[1] for p in b.parameter_roles()["registers"])

    assert tokens(backbone.with_registers(2)) == tokens(backbone) + 2  # native or hooked, they join the role
