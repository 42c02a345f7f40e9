"""timm's Eva models (EVA-02, RoPE ViTs, DINOv3): layouts, rotary positions in the captured queries
and keys, unrotated appended registers, maps and rollout, registers (native, test-time, fine-tuned),
save and load through vsink and timm. Attention against timm's own: tests/test_attention_exact.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.cli import main
from vsink.maps import export_maps
from vsink.train import load_config, run_finetune
from conftest import ROPE_CASES, capture_probs, sharpen, timm_case, timm_model, timm_reference
from test_maps import reference_rollout

TOL = 1e-5
TINY = dict(depth=2, embed_dim=64, num_heads=4, num_classes=0)

#: (class tokens, registers, patch grid) of each case, read off timm's configs by hand
LAYOUTS = {
    "eva02": (1, 0, (2, 2)),
    "eva02_qkv_separate": (1, 0, (2, 2)),
    "rope_reg1_gap": (0, 1, (4, 4)),
    "dinov3": (1, 4, (4, 4)),
    "rope_axial": (1, 0, (4, 4)),
    "rope_mixed": (1, 0, (4, 4)),
    "rope_gqa": (1, 0, (4, 4)),
}


def _image(size=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _x(backbone, batch=2, seed=1):
    h, w = backbone.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def hand_rotate(x: torch.Tensor, table: torch.Tensor, half: bool) -> torch.Tensor:
    """The rotary formula written out: each pair (a, b) of channels becomes (a cos − b sin,
    b cos + a sin); pairs are neighbours (interleaved) or i and i + d/2 (half); ``table`` holds
    sin then cos on its last axis, one row per token."""
    d = x.shape[-1]
    sin, cos = table[..., :d], table[..., d:]
    if half:
        a, b = x[..., : d // 2], x[..., d // 2:]
        partner = torch.cat([-b, a], dim=-1)
    else:
        pairs = x.unflatten(-1, (d // 2, 2))
        partner = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + partner * sin


def library_qk(model, layer, x, backbone=None, appended=0):
    """timm's own queries and keys before rotation (the outputs of its q_norm / k_norm) and the
    rotary table the block received, from plain torch hooks; with ``appended``, the tokens are
    appended by vsink (the capture hook runs before vsink's own hooks)."""
    seen = {}
    blk = model.blocks[layer]
    hooks = [blk.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("rope", kw["rope"]), with_kwargs=True),
             blk.attn.q_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             blk.attn.k_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))]
    handle = backbone.append_tokens(appended) if appended else None
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        if handle is not None:
            handle.remove()
    return seen["q"], seen["k"], seen["rope"]


def expected_qk(model, layer, q, k, rope, n_patches):
    """Prefix tokens and tokens after the patches unrotated, patch rows rotated by hand."""
    attn = model.blocks[layer].attn
    npt, half = attn.num_prefix_tokens, attn.rotate_half
    out = []
    for t in (q, k):
        t = t.clone()
        t[:, :, npt:npt + n_patches] = hand_rotate(t[:, :, npt:npt + n_patches], rope, half)
        out.append(t)
    groups = getattr(attn, "num_kv_groups", 1)
    return out[0], out[1].repeat_interleave(groups, dim=1)


def site_qk(backbone, layer, x):
    got = {}
    handle = backbone.hook("attn_qkv", layer, lambda q, k, v: got.update(q=q.clone(), k=k.clone()))
    probs = []
    h2 = backbone.hook("attn_probs", layer, lambda p, s, z: probs.append(p.clone()))
    try:
        backbone.forward(x)
    finally:
        handle.remove()
        h2.remove()
    return got["q"], got["k"], torch.cat(probs, dim=2)


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_layout_matches_timm_prefix_and_spatial_tokens(case, pixel_values):
    model = timm_case(case)
    backbone = vsink.wrap(model)
    assert backbone.family == "timm-eva"
    layout = backbone.layout()
    assert (layout.num_cls, layout.num_registers, layout.grid) == LAYOUTS[case]
    assert layout.num_prefix == model.num_prefix_tokens
    x = _x(backbone)
    final = backbone.forward(x)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x, indices=[1], norm=True, output_fmt="NLC", return_prefix_tokens=True)
    spatial, prefix = inter[0]
    torch.testing.assert_close(layout.patches(final), spatial, atol=0, rtol=0)
    parts = layout.split(final)
    torch.testing.assert_close(torch.cat([parts["cls"], parts["registers"]], dim=1), prefix, atol=0, rtol=0)


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_captured_queries_and_keys_carry_timms_rotary_positions(case):
    """The attn_qkv site sees timm's q/k with the patch rows rotated by the table the block
    received and the prefix rows unrotated; the captured attention is softmax of exactly those."""
    model = sharpen(timm_case(case))
    backbone = vsink.wrap(model)
    x = _x(backbone)
    n_patches = backbone.layout().num_patches
    q0, k0, rope = library_qk(model, 1, x)
    q_ref, k_ref = expected_qk(model, 1, q0, k0, rope, n_patches)
    assert (q_ref - q0).abs().max() > 1e-2, "the rotation must move the patch queries for this test to mean anything"
    q, k, probs = site_qk(backbone, 1, x)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=0)
    scale = model.blocks[1].attn.scale
    torch.testing.assert_close(probs, ((q_ref * scale) @ k_ref.transpose(-1, -2)).softmax(-1), atol=TOL, rtol=0)
    groups = getattr(model.blocks[1].attn, "num_kv_groups", 1)
    unrotated = ((q0 * scale) @ k0.repeat_interleave(groups, dim=1).transpose(-1, -2)).softmax(-1)
    assert (probs - unrotated).abs().max() > 1e-2, "attention without rotary positions must differ"


@pytest.mark.parametrize("case", ["dinov3", "rope_reg1_gap", "eva02", "rope_mixed"])
def test_appended_registers_get_no_rotary_position(case):
    """Test-time registers appended after the patches: their queries and keys are the plain
    projections (like the prefix tokens), the patches keep their rotation; timm's own attention
    (fused) and vsink's explicit attention agree on the longer sequence."""
    model = sharpen(timm_case(case))
    backbone = vsink.wrap(model)
    x = _x(backbone)
    layout = backbone.layout()
    q0, k0, rope = library_qk(model, 1, x, backbone, appended=2)
    assert q0.shape[2] == layout.num_tokens + 2 and rope.shape[-2] == layout.num_patches
    q_ref, k_ref = expected_qk(model, 1, q0, k0, rope, layout.num_patches)
    handle = backbone.append_tokens(2)
    try:
        assert backbone.layout().appended_indices() == [layout.num_tokens, layout.num_tokens + 1]
        fused = backbone.forward(x)
        q, k, probs = site_qk(backbone, 1, x)
        routed, _ = capture_probs(backbone, x)
    finally:
        handle.remove()
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(q[:, :, -2:], q0[:, :, -2:], atol=0, rtol=0)  # bit for bit unrotated
    scale = model.blocks[1].attn.scale
    torch.testing.assert_close(probs, ((q_ref * scale) @ k_ref.transpose(-1, -2)).softmax(-1), atol=TOL, rtol=0)
    assert (routed - fused).abs().max() <= TOL * max(1.0, fused.abs().max().item())
    assert backbone.layout().num_appended == 0
    assert torch.equal(backbone.forward(x), model.forward_features(x))

