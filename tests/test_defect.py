"""Weight-only defect directions (vsink/defect.py): golden cases computed by hand from the
reference's definitions (haoqiwang/sinder @ 3b5cd45, ``singular_defect.py``), a planted linear
defect, the demo's disagreement, the cache, every family's block weights and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vsink
from vsink.cli import main
from vsink.defect import defect_directions, gaussian_samples
from vsink.errors import VsinkError

from conftest import hf_model, open_clip_visual, sharpen, timm_case, timm_model

SAMPLES = 600


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VSINK_CACHE_DIR", str(tmp_path / "cache"))


def _randomise_scales(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """LayerScale gains and LayerNorm weights drawn away from 1, so a missing or transposed diag()
    in the linearisation changes the answer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def _centring(d: int) -> torch.Tensor:
    # the reference's A0 = I − 11ᵀ/N: the centring of a LayerNorm, applied on the input side
    return torch.eye(d, dtype=torch.float64) - torch.full((d, d), 1.0 / d, dtype=torch.float64)


def _hand_directions(model: torch.nn.Module, hidden, seed: int = 0) -> list[torch.Tensor]:
    """The reference's computation, written out with plain torch ops for a timm ViT:

    attention  A = diag(ls1.γ)·proj.W·V.W·diag(norm1.w), V = the last third of qkv.W
               (``blk.attn.qkv.weight.chunk(3, dim=0)[-1]``), then ``A @ A0`` (centred), then ``+ I``;
    MLP        Y = the MLP's hidden activations of N(0, I) samples X, A2 = lstsq(X, Y).solution.T
               (no intercept: ``bias_ls=False``), C = diag(ls2.γ)·fc2.W·A2·diag(norm2.w)·A0 + I;
    block      C @ A; cumulative ``aaa = a @ aaa`` from I; direction = ``svd(aaa)[0][:, 0]``.

    The samples are vsink's documented per-block draws (gaussian_samples), so both sides fit the
    same X; the reference draws them from torch's global generator in float32 on the GPU."""
    d = model.embed_dim
    eye = torch.eye(d, dtype=torch.float64)
    cumulative, out = eye.clone(), []
    for i, blk in enumerate(model.blocks):
        f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
        A = (torch.diag(f64(blk.ls1.gamma)) @ f64(blk.attn.proj.weight) @ f64(blk.attn.qkv.weight.chunk(3, dim=0)[-1])
             @ torch.diag(f64(blk.norm1.weight)) @ _centring(d) + eye)
        X = gaussian_samples(d, SAMPLES, seed, i)
        Y = hidden(blk.mlp, X)
        A2 = torch.linalg.lstsq(X, Y).solution.T
        C = (torch.diag(f64(blk.ls2.gamma)) @ f64(blk.mlp.fc2.weight) @ A2 @ torch.diag(f64(blk.norm2.weight))
             @ _centring(d) + eye)
        cumulative = C @ A @ cumulative
        out.append(torch.linalg.svd(cumulative)[0][:, 0])
    return out


def _gelu_hidden(mlp, X):
    # timm Mlp: fc1 → GELU (erf) → (dropout, identity norm) → fc2; the hidden is fc2's input
    w, b = mlp.fc1.weight.detach().double(), mlp.fc1.bias.detach().double()
    return F.gelu(X @ w.T + b)


def _swiglu_hidden(mlp, X):
    # the reference's w12: ``x1, x2 = w12(x).chunk(2, dim=-1); silu(x1) * x2``; timm's packed
    # SwiGLU (GluMlp, gate_last=False) holds w12 as fc1
    w, b = mlp.fc1.weight.detach().double(), mlp.fc1.bias.detach().double()
    x1, x2 = (X @ w.T + b).chunk(2, dim=-1)
    return F.silu(x1) * x2


def _abs_cos(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a @ b).abs() / (a.norm() * b.norm()))


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_golden_equals_the_reference_linearisation(mlp):
    from timm.layers import SwiGLUPacked

    kwargs = dict(img_size=28, patch_size=14, depth=2, embed_dim=32, num_heads=4, init_values=1.0)
    if mlp == "swiglu":
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    model = _randomise_scales(sharpen(timm_model("vit_small_patch14_dinov2", **kwargs), std=0.1))
    backbone = vsink.wrap(model)
    got = defect_directions(backbone, samples=SAMPLES, seed=0, progress=False)
    want = _hand_directions(model, _gelu_hidden if mlp == "gelu" else _swiglu_hidden)
    assert got.directions.shape == (2, 32)
    for i, w in enumerate(want):
        assert _abs_cos(got.directions[i], w) >= 0.999, i
    # the two blocks' directions differ, so agreement is not the same vector twice
    assert _abs_cos(want[0], want[1]) < 0.99


def test_planted_linear_defect_is_recovered():
    """Block 0's value/output path is 40·u·bᵀ by construction (V = p·bᵀ, proj = 40·u·pᵀ), every
    other weight small: the linearised map is I + 40·u·(centred b)ᵀ + small, whose top left
    singular vector is u; later blocks are near the identity and keep it."""
    model = timm_model("deit_tiny_patch16_224", patch_size=8, depth=3, embed_dim=64, num_heads=4)
    sharpen(model, std=0.02)
    g = torch.Generator().manual_seed(7)
    d = 64
    u, b, p = (v / v.norm() for v in torch.randn(3, d, generator=g))
    with torch.no_grad():
        attn = model.blocks[0].attn
        attn.qkv.weight[2 * d:] = torch.outer(p, b)
        attn.proj.weight.copy_(40.0 * torch.outer(u, p))
    found = defect_directions(vsink.wrap(model), samples=SAMPLES, progress=False)
    for i in range(3):
        assert _abs_cos(found.directions[i], u) >= 0.99, i
    # a random direction is far from u at this width: the recovery is not luck
    assert _abs_cos(torch.randn(d, generator=g), u) < 0.5


def test_demo_disagreement_is_reported(tmp_path, capsys):
    """The demo's high-norm tokens come from MLP neurons that fire only on flat patches (threshold
    far above what N(0, I) inputs reach) and sink heads that change only queries and keys: the
    weight-only direction cannot see u. ``scan --defect`` reports the disagreement per block, while
    the observed direction is the planted one."""
    from vsink.data.demo_model import PLANTED_BLOCK, planted_direction

    out = tmp_path / "scan"
    assert main(["scan", "--defect", "--defect-samples", "400", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "disagrees with the observed one at blocks" in printed
    report = json.loads((out / "scan.json").read_text())["defect"]
    blocks = report["blocks"]
    assert report["samples"] == 400
    assert [b["verdict"] for b in blocks[:PLANTED_BLOCK]] == ["no high-norm tokens"] * PLANTED_BLOCK
    for b in blocks[PLANTED_BLOCK:]:
        assert b["high_norm_tokens"] > 0 and b["verdict"] == "disagrees" and b["abs_cos"] < 0.5
    assert report["disagreeing_blocks"] == list(range(PLANTED_BLOCK, len(blocks)))
    html = (out / "report.html").read_text()
    assert "Weight-only defect direction (SINDER)" in html and "400 Gaussian samples per block" in html
    assert f"Disagrees at blocks {', '.join(map(str, report['disagreeing_blocks']))}" in html
    assert html.count("<td>disagrees</td>") == len(blocks) - PLANTED_BLOCK
    assert html.count("<td>no high-norm tokens</td>") == PLANTED_BLOCK
    # the observed side is right: recompute it from the model and compare with u
    backbone = vsink.load("demo")
    from vsink.data.demo_images import demo_images
    from vsink.defect import compare_with_scan
    from vsink.scan import scan

    images = demo_images()
    result = scan(backbone, images, progress=False)
    found = defect_directions(backbone, samples=400, progress=False)
    assert found.cached  # the CLI run above cached it under the same fingerprint
    comparison = compare_with_scan(backbone, images, result, found, progress=False)
    u = planted_direction()
    for i in range(PLANTED_BLOCK, backbone.num_layers):
        assert _abs_cos(comparison.observed[i], u) >= 0.9, i
        assert _abs_cos(found.directions[i], u) < 0.5, i


def test_cache_by_fingerprint(tmp_path):
    model = timm_model("deit_tiny_patch16_224", patch_size=8)
    backbone = vsink.wrap(model)
    first = defect_directions(backbone, samples=128, progress=False)
    again = defect_directions(backbone, samples=128, progress=False)
    assert not first.cached and again.cached
    np.testing.assert_array_equal(first.directions, again.directions)
    assert not defect_directions(backbone, samples=128, seed=1, progress=False).cached
    assert not defect_directions(backbone, samples=128, recompute=True, progress=False).cached
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.mul_(3.0)
    changed = defect_directions(backbone, samples=128, progress=False)
    assert not changed.cached and changed.weights != first.weights


def _value_check(backbone, layer: int = 0) -> None:
    """The family's value rows and norm1 weight against the library's own values: for tokens x_i,
    x_j entering the block, v_i − v_j = V·diag(w)·(x̂_i − x̂_j) (x̂: x centred and divided by its
    spread, as the norm does; biases cancel). v comes from the attn_qkv site, i.e. the model's
    own projection."""
    parts = backbone.block_parts(layer)
    seen = {}
    h1 = backbone.hook("block_input", layer, lambda x: seen.setdefault("x", x.clone()))
    h2 = backbone.hook("attn_qkv", layer, lambda q, k, v: seen.setdefault("v", v.clone()))
    try:
        g = torch.Generator().manual_seed(0)
        size = backbone.img_size
        backbone.forward(torch.randn(1, 3, *size, generator=g))
    finally:
        h1.remove()
        h2.remove()
    x = seen["x"][0].double()
    v = seen["v"][0].double().transpose(0, 1).reshape(x.shape[0], -1)  # [N, heads·d]
    norm = parts.norm1
    eps = next(float(getattr(norm, a)) for a in ("eps", "variance_epsilon") if getattr(norm, a, None) is not None)
    if "rms" in type(norm).__name__.lower():
        xh = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    else:
        xh = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    w = norm.weight.detach().double() if getattr(norm, "weight", None) is not None else torch.ones(x.shape[1])
    want = (xh[1:] - xh[:1]) * w @ parts.value.detach().double().T
    torch.testing.assert_close(v[1:] - v[:1], want, rtol=1e-4, atol=1e-4)
    # the MLP's hidden and output projection belong together: the MLP's own output is
    # out.W · hidden + out.b on any input (here the tokens entering the block)
    mlp, out = parts.hidden.mlp, parts.hidden.out_proj
    with torch.no_grad():
        h = seen["x"][0].to(parts.out.dtype)
        got = parts.hidden(h) @ parts.out.T + (out.bias if out.bias is not None else 0)
        torch.testing.assert_close(got, mlp(h), rtol=1e-4, atol=1e-5)
    assert parts.out is out.weight


FAMILIES = {
    "timm_deit": lambda: timm_case("deit"),
    "timm_dinov2_reg4": lambda: timm_case("dinov2_reg4"),
    "timm_eva02": lambda: timm_case("eva02"),
    "timm_rope_gqa": lambda: timm_case("rope_gqa"),
    "open_clip": lambda: open_clip_visual(),
    "hf_vit": lambda: hf_model("vit"),
    "hf_dinov2": lambda: hf_model("dinov2"),
    "hf_clip": lambda: hf_model("clip"),
    "hf_siglip": lambda: hf_model("siglip"),
    "hf_dinov3_reg": lambda: hf_model("dinov3_reg"),
    "hf_aimv2": lambda: hf_model("aimv2"),
    "hf_internvl_vision": lambda: hf_model("internvl_vision"),
}


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_every_family_gives_its_block_weights(case):
    backbone = vsink.wrap(FAMILIES[case]())
    _value_check(backbone)
    found = defect_directions(backbone, samples=160, progress=False, cache=False)
    assert found.directions.shape == (backbone.num_layers, backbone.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(found.directions, axis=1), 1.0, atol=1e-9)


def test_a_block_it_cannot_read_is_refused_in_one_line():
    from timm.models.vision_transformer import ResPostBlock

    backbone = vsink.wrap(timm_model("deit_tiny_patch16_224", patch_size=8, block_fn=ResPostBlock))
    with pytest.raises(VsinkError, match="not timm's pre-norm Block") as e:
        defect_directions(backbone, samples=128, progress=False)
    assert "\n" not in str(e.value)


def test_cli_defect_writes_and_refuses(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["defect", "--samples", "256", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "block  5" in printed and "wrote" in printed
    report = json.loads((out / "defect.json").read_text())
    assert report["samples"] == 256 and len(report["blocks"]) == 6
    with np.load(out / "defect.npz") as z:
        assert z["directions"].shape == (6, 192)
    assert json.loads((out / "vsink-run.json").read_text())["determining"]["samples"] == 256
    assert main(["defect", "--samples", "256", "--out", str(out), "--no-progress"]) == 0
    assert "from the cache" in capsys.readouterr().out
    assert main(["defect", "--samples", "0", "--out", str(out)]) == 2
    assert "--samples" in capsys.readouterr().err
    # fewer samples than the width (192) leave the fit underdetermined: refused in one line
    assert main(["defect", "--samples", "100", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("vsink: error:")]
    assert len(errors) == 1 and "samples 100 must exceed the width 192" in errors[0] and "Traceback" not in err
