"""timm's Eva models (EVA-02, RoPE ViTs, DINOv3): layouts, rotary positions in the captured queries
and keys, unrotated appended registers, maps and rollout, registers (native, test-time, fine-tuned),
save and load through vsink and timm. Attention against timm's own: tests/test_attention_exact.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.cli import main
from vsink.maps import export_maps
from vsink.train import load_config, run_finetune
from conftest import ROPE_CASES, capture_probs, sharpen, timm_case, timm_reference
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
def test_layout_matches_timm_prefix_and_spatial_tokens(case):
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


@pytest.mark.parametrize("case, roles", [
    ("dinov3", {"registers": ["reg_token"], "cls_token": ["cls_token"], "pos_embed": []}),
    ("eva02", {"registers": [], "cls_token": ["cls_token"], "pos_embed": ["pos_embed"]}),
    ("rope_reg1_gap", {"registers": ["reg_token"], "cls_token": [], "pos_embed": []}),
    ("rope_mixed", {"registers": [], "cls_token": ["cls_token"], "pos_embed": ["rope.freqs"]}),  # learned frequencies
])
def test_parameter_roles_for_fine_tuning(case, roles):
    backbone = vsink.wrap(timm_case(case))
    names = {id(p): n for n, p in backbone.model.named_parameters()}
    got = {role: [names[id(p)] for p in params] for role, params in backbone.parameter_roles().items()}
    assert {role: got[role] for role in roles} == roles
    assert got["patch_embed"] == [n for n in names.values() if n.startswith("patch_embed.")]


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


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_probes_leave_outputs_unchanged(case):
    """Observation only (norms, MLP activations): bit for bit; with attention routed through
    vsink's explicit attention: within 1e-6 of the output's scale; afterwards timm's own again."""
    model = sharpen(timm_case(case))
    backbone = vsink.wrap(model)
    x = _x(backbone)
    plain = backbone.forward(x)
    with vsink.Probe(backbone, attention=False) as probe:
        observed = probe.run(x)
    assert torch.equal(observed, plain)
    with vsink.Probe(backbone) as probe:
        routed = probe.run(x)
    assert (routed - plain).abs().max().item() <= 1e-6 * plain.abs().max().item()
    assert probe.trace().attn_received.sum(-1) == pytest.approx(1.0, abs=1e-5)
    assert not any(backbone.attention_routed(i) for i in range(backbone.num_layers))
    assert torch.equal(backbone.forward(x), plain)


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



@pytest.mark.parametrize("case", ["dinov3", "rope_reg1_gap"])
def test_rollout_and_maps_equal_timms_attention(case, tmp_path):
    """Rollout (class-token row for DINOv3, mean patch row without a class token) and the cls /
    received maps against timm's own attention (fused off, attn_drop hooked)."""
    model = sharpen(timm_case(case))
    backbone = vsink.wrap(model)
    layout = backbone.layout()
    img = _image()
    _, attentions = timm_reference(model, backbone.preprocess([img]))
    ref = reference_rollout(attentions, layout.num_cls, layout.num_prefix)
    export_maps(backbone, [img], tmp_path, kinds=["rollout", "received"] + (["cls"] if layout.num_cls else []),
                heads="all", formats=["npz"], progress=False)
    with np.load(tmp_path / "image-0.npz") as d:
        np.testing.assert_allclose(d["rollout"], layout.patch_grid(ref, dim=0).numpy(), atol=1e-5)
        assert d["rollout/prefix"].shape == (layout.num_prefix,)
        for i, a in enumerate(attentions):
            a = a[0]
            np.testing.assert_allclose(d[f"received/layer{i}"], layout.patch_grid(a.mean(1), dim=1).numpy(), atol=1e-5)
            if layout.num_cls:
                np.testing.assert_allclose(d[f"cls/layer{i}"], layout.patch_grid(a[:, 0], dim=1).numpy(), atol=1e-5)


def test_dynamic_size_dinov3_attention_and_probe_outputs(pixel_values):
    """DINOv3 takes any multiple of the patch size (the rotary table follows the grid); a probe
    without attention leaves the output bit for bit, with attention within float tolerance."""
    model = sharpen(timm_case("dinov3"))
    backbone = vsink.wrap(model)
    assert backbone.dynamic_size and backbone.layout((48, 40)).grid == (6, 5)
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    _, ref = timm_reference(model, x)
    _, probs = capture_probs(backbone, x)
    assert probs[0].shape[-1] == 5 + 30
    assert max((p - r).abs().max().item() for p, r in zip(probs, ref)) <= TOL
    plain = backbone.forward(x)
    with vsink.Probe(backbone, attention=False) as probe:
        observed = probe.run(x)
    assert torch.equal(observed, plain)
    with vsink.Probe(backbone) as probe:
        routed = probe.run(x)
    assert (routed - plain).abs().max().item() <= 1e-6 * plain.abs().max().item()
    assert probe.trace().attn_received.shape[-1] == backbone.layout((48, 40)).num_tokens
    assert torch.equal(backbone.forward(x), plain)


@pytest.mark.parametrize("case", ["dinov3", "eva02", "rope_reg1_gap"])
def test_with_registers_is_timms_architecture_with_more_registers(case, tmp_path):
    """The copy with 2 more registers has the state dict of timm's model built with
    num_reg_tokens + 2, and that model (loaded with it, through timm's own loader from the saved
    file too) computes the same output; vsink.load(DIR) rebuilds it."""
    import timm

    name, kwargs = ROPE_CASES[case]
    kwargs = dict(kwargs)
    base = vsink.load(f"timm:{name}", pretrained=False, img_size=kwargs.pop("img_size", 32),
                      model_kwargs={**TINY, **kwargs})
    sharpen(base.model)
    n_cls, n_reg, grid = LAYOUTS[case]
    grown = base.with_registers(2, init_std=0.5)
    assert type(grown) is type(base) and base.layout().num_registers == n_reg
    layout = grown.layout()
    assert (layout.num_cls, layout.num_registers, layout.grid) == (n_cls, n_reg + 2, grid)
    x = _x(grown)
    out = grown.forward(x)
    assert out.shape[1] == layout.num_tokens
    saved = grown.save(tmp_path / "grown")
    meta = json.loads((saved / "vsink.json").read_text())
    assert meta["family"] == "timm-eva" and meta["model_kwargs"]["num_reg_tokens"] == n_reg + 2
    overlay = dict(file=str(saved / "model.safetensors"))
    library = timm.create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                img_size=meta["img_size"][0], **meta["model_kwargs"]).eval()
    assert library.num_prefix_tokens == layout.num_prefix
    with torch.no_grad():
        assert torch.equal(library.forward_features(x), out)
    reloaded = vsink.load(str(saved))
    assert reloaded.family == "timm-eva" and reloaded.layout() == layout
    assert torch.equal(reloaded.forward(x), out)
    # the registers are prefix tokens: attention over them equals timm's, and they get no rotation
    _, ref = timm_reference(reloaded.model, x)
    _, probs = capture_probs(reloaded, x)
    assert max((p - r).abs().max().item() for p, r in zip(probs, ref)) <= TOL
    assert all(blk.attn.num_prefix_tokens == layout.num_prefix for blk in reloaded.model.blocks)


PLANTED = 7


def planted_dinov3(images):
    """A tiny DINOv3 (layer scale 1) whose block-0 MLP neuron ``PLANTED`` fires on the ~10% of
    patches of ``images`` where its input projects most on a fixed direction and then writes a
    large fixed vector: high-norm patches made by one register neuron. Returns the backbone and
    the neuron's pre-activation minus its threshold on the patches [B, P], read with a plain
    torch hook (> 0: it fires; the write grows with the margin)."""
    backbone = vsink.load("timm:vit_small_patch16_dinov3", pretrained=False, img_size=32,
                          model_kwargs={**TINY, "patch_size": 8})
    model, layout = backbone.model, backbone.layout()
    seen = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
        mlp = model.blocks[0].mlp
        hook = model.blocks[0].norm2.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o))
        model.forward_features(backbone.preprocess(images))
        hook.remove()
        g = torch.Generator().manual_seed(1)
        read, write = torch.randn(64, generator=g), torch.randn(64, generator=g)
        pre = layout.patches(seen["x"]) @ read
        threshold = torch.quantile(pre.flatten(), 0.9)
        mlp.fc1.weight[PLANTED] = read * 10
        mlp.fc1.bias[PLANTED] = -threshold * 10
        mlp.fc2.weight[:, PLANTED] = write / write.norm() * 5
    return backbone, pre - threshold


def test_cli_registers_find_scan_maps_and_test_time_registers_on_a_saved_rope_model(tmp_path, capsys):
    """A saved tiny DINOv3 with a planted register neuron through the command line: scan finds
    the planted high-norm patches (every strongly firing one, none where the neuron is silent;
    layout with the 4 storage tokens as registers),
    registers find ranks the planted neuron first, maps with rollout, and a scan with test-time
    registers (appended after the patches, no rotary position) finds no high-norm token."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        _image(40, seed=i).save(folder / f"r{i}.png")
    images = [Image.open(path).convert("RGB") for path in sorted(folder.iterdir())]
    backbone, margin = planted_dinov3(images)
    model_dir = str(backbone.save(tmp_path / "dinov3"))
    assert main(["scan", str(folder), "--model", model_dir, "--out", str(tmp_path / "scan"), "--no-progress"]) == 0
    before = json.loads((tmp_path / "scan" / "scan.json").read_text())
    layout = before["layout"]
    assert (layout["cls"], layout["registers_after_cls"], layout["grid"]) == (1, 4, [4, 4])
    names = [path.name for path in sorted(folder.iterdir())]
    found = {(Path(before["images"][t["image"]]).name, t["token"] - 5) for t in before["high_norm"]["tokens"]
             if t["layer"] == 0}
    fires, strong = ({(names[i], int(p)) for i, p in torch.nonzero(m)} for m in (margin > 0, margin > 0.5))
    assert len(strong) >= 5 and strong <= found <= fires
    neurons = tmp_path / "neurons.json"
    assert main(["registers", "find", str(folder), "--model", model_dir, "--out", str(neurons), "--top-k", "3",
                 "--no-progress"]) == 0
    assert [(n["layer"], n["neuron"]) for n in json.loads(neurons.read_text())["neurons"]][0] == (0, PLANTED)
    assert main(["maps", str(folder / "r0.png"), "--model", model_dir, "--kind", "rollout,cls,norm", "--format",
                 "npz", "--out", str(tmp_path / "maps"), "--no-progress"]) == 0
    with np.load(tmp_path / "maps" / "r0.npz") as d:
        assert d["rollout"].shape == (4, 4) and d["rollout/prefix"].shape == (5,)
        assert d["cls/layer1/mean"].shape == (4, 4) and d["cls/layer1/prefix"].shape == (4, 5)  # per head
    assert main(["scan", str(folder), "--model", model_dir, "--test-time-registers", str(neurons),
                 "--out", str(tmp_path / "ttr"), "--no-progress"]) == 0
    after = json.loads((tmp_path / "ttr" / "scan.json").read_text())
    assert after["layout"]["register_position"] == "after_cls+end" and after["layout"]["registers_appended"] == 1
    assert before["high_norm"]["tokens"] and after["high_norm"]["tokens"] == []
    capsys.readouterr()
    assert main(["models"]) == 0 and "timm:vit_small_patch16_dinov3" in capsys.readouterr().out


def test_posthoc_finetune_adds_trained_registers_to_a_rope_model(tmp_path):
    """A few posthoc steps on a tiny DINOv3: the student (4 storage tokens + 2 new registers, all in
    timm's reg_token) trains, its new registers move, and the result loads through vsink and timm."""
    import timm

    cfg = load_config(None, [
        "recipe=posthoc", f"out={tmp_path}", "model.spec=timm:vit_small_patch16_dinov3", "model.img_size=32",
        "model.pretrained=false", "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 4}",
        "registers.n=2", "registers.init_std=1.0e-6", "teacher.kind=original", "student.unlock=[]",
        "student.last_blocks=1", "data.num_images=8", "data.eval_images=4", "train.steps=4", "train.batch_size=4",
        "train.warmup_steps=1", "train.lr=1.0e-2", "train.eval_every=4", "train.checkpoint_every=4",
        "train.log_every=1"])
    run_finetune(cfg, progress=False)
    student = vsink.load(str(tmp_path / "final"))
    assert student.family == "timm-eva"
    assert (student.layout().num_cls, student.layout().num_registers) == (1, 6)
    new = student.model.reg_token[0, 4:]
    assert new.abs().max() > 1e-4, "the new registers did not move from their ~1e-6 start"
    meta = json.loads((tmp_path / "final" / "vsink.json").read_text())
    overlay = dict(file=str(tmp_path / "final" / "model.safetensors"))
    library = timm.create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                img_size=32, **meta["model_kwargs"]).eval()
    x = _x(student)
    with torch.no_grad():
        assert torch.equal(library.forward_features(x), student.forward(x))


def test_scratch_recipe_builds_a_rope_model_with_timms_register_argument(tmp_path):
    """The scratch recipe on a DINOv3 spec: timm's Eva takes num_reg_tokens (not reg_tokens); the
    model trains a few steps and loads with timm's loader."""
    import timm

    cfg = load_config(None, [
        "recipe=scratch", f"out={tmp_path}", "model.spec=timm:vit_small_patch16_dinov3", "model.img_size=32",
        "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 4}", "registers.n=2",
        "data.num_images=8", "data.eval_images=4", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
        "train.eval_every=2", "train.checkpoint_every=2"])
    run_finetune(cfg, progress=False)
    model = vsink.load(str(tmp_path / "final"))
    assert model.family == "timm-eva" and (model.layout().num_cls, model.layout().num_registers) == (1, 2)
    meta = json.loads((tmp_path / "final" / "vsink.json").read_text())
    assert meta["model_kwargs"]["num_reg_tokens"] == 2 and "reg_tokens" not in meta["model_kwargs"]
    overlay = dict(file=str(tmp_path / "final" / "model.safetensors"), num_classes=meta["model_kwargs"]["num_classes"])
    library = timm.create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, img_size=32,
                                **meta["model_kwargs"]).eval()
    x = _x(model)
    with torch.no_grad():
        assert torch.equal(library(x), model.model(x))


@pytest.mark.parametrize("case", ["dinov3", "rope_gqa"])
def test_masks_and_causal_attention_follow_timm(case):
    """timm's attn_mask (boolean: True keeps; float: added) and is_causal reach vsink's explicit
    attention as in timm's own unfused path."""
    model = sharpen(timm_case(case))
    backbone = vsink.wrap(model)
    x = _x(backbone)
    n = backbone.layout().num_tokens
    g = torch.Generator().manual_seed(0)
    masks = [dict(attn_mask=(torch.rand(2, 1, n, n, generator=g) > 0.3) | torch.eye(n, dtype=torch.bool)),
             dict(attn_mask=torch.randn(2, 1, n, n, generator=g)), dict(is_causal=True)]
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        refs = [model.forward_features(x, **m) for m in masks]
    handles = [backbone.hook("attn_probs", i, lambda p, s, z: None) for i in range(backbone.num_layers)]
    try:
        with torch.no_grad():
            got = [model.forward_features(x, **m) for m in masks]
    finally:
        for h in handles:
            h.remove()
    for g_, r in zip(got, refs):
        assert (g_ - r).abs().max().item() <= 1e-6 * r.abs().max().item()
    assert not torch.allclose(refs[2], model.forward_features(x)), "the causal mask must matter"
