"""Captured patch features equal the libraries' own tensors (tokens, final norm, keys/queries/values)."""

import pytest
import torch
import torch.nn.functional as F

import vsink
from vsink.errors import VsinkError
from vsink.features import FeatureCapture, FeatureSpec, extract_features

from conftest import HF_CASES, TIMM_CASES, hf_call, hf_model, open_clip_visual, timm_case

TOL = dict(atol=1e-5, rtol=1e-5)


def _grid(backbone, tokens):
    return backbone.layout(backbone.img_size).patch_grid(tokens)


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_tokens_and_qkv_equal_library(case, pixel_values):
    model = timm_case(case)
    backbone = vsink.wrap(model)
    x = pixel_values(size=backbone.img_size[0])
    seen = {}
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    with torch.no_grad():
        final = model.forward_features(x)
    handle.remove()
    attn = model.blocks[0].attn
    B, N, D = seen["in"].shape
    qkv = attn.qkv(seen["in"]).reshape(B, N, 3, D)
    specs = [FeatureSpec(-1), FeatureSpec(0, "q"), FeatureSpec(0, "k"), FeatureSpec(0, "v")]
    feats = extract_features(backbone, x, specs)
    assert torch.allclose(feats[specs[0]], _grid(backbone, final), **TOL)
    for i, spec in enumerate(specs[1:]):
        assert torch.allclose(feats[spec], _grid(backbone, qkv[:, :, i]), **TOL), spec


@pytest.mark.parametrize("kind", HF_CASES)
def test_hf_tokens_and_keys_equal_library(kind, pixel_values):
    model = hf_model(kind)
    backbone = vsink.wrap(model)
    x = pixel_values(size=32)
    proj = next(m for name, m in model.named_modules() if name.endswith(("k_proj", "attention.key")))
    seen = {}
    handle = proj.register_forward_hook(lambda m, a, o: seen.setdefault("k", o))
    with torch.no_grad():
        out = hf_call(model, x, output_hidden_states=True)
    handle.remove()
    if kind.startswith("dinov3"):  # keys as attention uses them: rotated by HF's own rotary code
        seen["k"] = _dinov3_rotated(model, x, seen["k"])
    specs = [FeatureSpec(0, norm=False), FeatureSpec(-1), FeatureSpec(0, "k")]
    feats = extract_features(backbone, x, specs)
    assert torch.allclose(feats[specs[0]], _grid(backbone, out.hidden_states[1]), **TOL)
    last = out.last_hidden_state
    if kind == "clip":  # HF applies CLIP's post_layernorm to the pooled token only
        last = getattr(model, "vision_model", model).post_layernorm(last)  # nested under transformers 4.x
    assert torch.allclose(feats[specs[1]], _grid(backbone, last), **TOL)
    assert torch.allclose(feats[specs[2]], _grid(backbone, seen["k"]), **TOL)


def _dinov3_rotated(model, x, keys):
    """``k_proj`` output [B, N, D] → the keys DINOv3's attention uses: its ``apply_rotary_pos_emb``
    with its ``rope_embeddings`` (patches rotated, class and storage tokens not)."""
    import sys

    modeling = sys.modules[type(model).__module__]
    b, n, d = keys.shape
    heads = keys.reshape(b, n, 4, d // 4).transpose(1, 2)
    with torch.no_grad():
        cos, sin = model.rope_embeddings(x)
        _, rotated = modeling.apply_rotary_pos_emb(heads, heads, cos, sin)
    assert not torch.allclose(rotated, heads)
    return rotated.transpose(1, 2).reshape(b, n, d)


def test_open_clip_keys_and_final_norm_equal_library(pixel_values):
    visual = open_clip_visual()
    backbone = vsink.wrap(visual)
    x = pixel_values(size=32)
    seen = {}
    blk = visual.transformer.resblocks[1]
    handle = blk.ln_1.register_forward_hook(lambda m, a, o: seen.setdefault("ln", o))
    tokens_handle = visual.transformer.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        visual(x)
    handle.remove()
    tokens_handle.remove()
    ln = seen["ln"] if not backbone.seq_first else seen["ln"].transpose(0, 1)
    out = seen["out"] if not backbone.seq_first else seen["out"].transpose(0, 1)
    _, k, _ = F.linear(ln, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    specs = [FeatureSpec(1, "k"), FeatureSpec(-1)]
    feats = extract_features(backbone, x, specs)
    assert torch.allclose(feats[specs[0]], _grid(backbone, k), **TOL)
    assert torch.allclose(feats[specs[1]], _grid(backbone, visual.ln_post(out)), **TOL)


def test_capture_leaves_outputs_unchanged_and_removes_hooks(pixel_values):
    model = timm_case("dinov2_reg4")
    backbone = vsink.wrap(model)
    x = pixel_values(size=42)
    plain = backbone.forward(x)
    with FeatureCapture(backbone, [FeatureSpec(-1), FeatureSpec(1, "k")]) as capture:
        captured = backbone.forward(x)
        feats = capture.pop()
        assert backbone.attention_routed(1)
    assert torch.allclose(plain, captured, **TOL)
    assert not backbone.attention_routed(1)
    assert torch.equal(backbone.forward(x), plain)
    assert feats[FeatureSpec(-1)].shape == (2, 3, 3, 64)  # registers and class token removed


def test_spec_errors():
    backbone = vsink.wrap(timm_case("deit"))
    with pytest.raises(VsinkError, match="out of range"):
        FeatureCapture(backbone, [FeatureSpec(5)])
    with pytest.raises(VsinkError, match="unknown feature kind"):
        FeatureCapture(backbone, [FeatureSpec(0, "x")])
    with FeatureCapture(backbone, [FeatureSpec()]) as capture, pytest.raises(VsinkError, match="run backbone.forward"):
        capture.pop()
