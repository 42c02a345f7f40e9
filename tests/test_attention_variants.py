"""Sink-free attention variants (vsink/attention_variants.py): each formula against a hand
computation, each variant's module against plain attention written out in the test, sites and
capture on every variant, rows that do not sum to 1 reported, pretrained starts, save/load, recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import vsink
from vsink.attention_variants import (VARIANTS, VariantAttention, apply_attention, attention_report, clipped_softmax,
                                      sigmoid_attention, softpick, with_extra_logit)
from vsink.errors import VsinkError

from conftest import sharpen, timm_model


def test_softpick_by_hand():
    # logits ln1, ln2, ln3: eˣ − 1 = 0, 1, 2; Σ|·| = 3 → 0, 1/3, 2/3
    got = softpick(torch.tensor([[0.0, math.log(2), math.log(3)]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[0.0, 1 / 3, 2 / 3]], dtype=torch.float64))
    # a negative entry: eˣ − 1 = −0.5 adds |−0.5| to the sum but nothing to the numerator:
    # 2 / (0.5 + 2) = 0.8 — the row sums to 0.8, not 1 (softpick's rows need not sum to 1)
    got = softpick(torch.tensor([[-math.log(2), math.log(3)]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.8]], dtype=torch.float64))
    # a masked (−inf) entry contributes 0 to the sum: same as without it
    got = softpick(torch.tensor([[float("-inf"), -math.log(2), math.log(3)]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 0.8]], dtype=torch.float64))
    # large logits: the max shift keeps it finite; unshifted value e^50 − 1 ≈ e^50, so ≈ [0, ~1]
    got = softpick(torch.tensor([[0.0, 50.0]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0]], dtype=torch.float64))


def test_clipped_softmax_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; (ζ − γ)p + γ with γ = −0.025, ζ = 1: 1.025p − 0.025
    got = clipped_softmax(torch.tensor([[0.0, math.log(3)]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[1.025 * 0.25 - 0.025, 1.025 * 0.75 - 0.025]], dtype=torch.float64))
    # p = 1/(1 + e^10) ≈ 4.5e-5: 1.025p − 0.025 < 0 → clipped to exactly 0 (the point of the method)
    got = clipped_softmax(torch.tensor([[0.0, 10.0]], dtype=torch.float64))
    p1 = 1 / (1 + math.exp(-10))
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.025 * p1 - 0.025]], dtype=torch.float64))


def test_sigmoid_attention_by_hand():
    # n = 4 keys, logits 0: sigmoid(0 − ln 4) = 1/(1 + 4) = 0.2 each, the row sums to 0.8
    got = sigmoid_attention(torch.zeros(1, 4, dtype=torch.float64))
    torch.testing.assert_close(got, torch.full((1, 4), 0.2, dtype=torch.float64))


def test_extra_logit_by_hand():
    # gpt-oss sink: softmax over [sink, s] with the sink column dropped. s = [0, 0], sink 0:
    # each e^0 / 3 = 1/3, the sink keeps 1/3 (softmax-off-by-one)
    probs, first = with_extra_logit(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(probs, torch.full((1, 2), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(first, torch.full((1,), 1 / 3, dtype=torch.float64))
    # sink at −30: the row is the softmax to 1e-13
    s = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    probs, _ = with_extra_logit(s, torch.full((1,), -30.0, dtype=torch.float64))
    torch.testing.assert_close(probs, s.softmax(-1), atol=1e-12, rtol=0)


def _attn(variant: str, seed: int = 0, start: str = "scratch") -> tuple[torch.nn.Module, VariantAttention]:
    model = sharpen(timm_model("deit_tiny_patch16_224", patch_size=8, depth=1, embed_dim=32, num_heads=2),
                    std=0.3, seed=seed)
    original = model.blocks[0].attn
    return original, VariantAttention(original, variant, start=start)


def _plain(attn, x, weights_fn, keys=None):
    """Attention written out: q, k, v from qkv; weights from the logits; proj."""
    B, N, _ = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    if keys is not None:
        k, v = keys(k, v)
    w = weights_fn((q * attn.scale) @ k.transpose(-2, -1))
    return w @ v, q


@pytest.mark.parametrize("variant", ["softmax", "softpick", "clipped", "sigmoid", "sink_logit"])
def test_module_equals_attention_written_out(variant):
    original, attn = _attn(variant)
    if variant == "sink_logit":
        with torch.no_grad():
            attn.sink.copy_(torch.tensor([0.5, -1.0]))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    hand = {
        "softmax": lambda s: s.softmax(-1),
        # softpick written unshifted, eps 0: relu(eˣ − 1) / Σ|eˣ − 1| (logits here are O(1))
        "softpick": lambda s: F.relu(s.exp() - 1) / (s.exp() - 1).abs().sum(-1, keepdim=True),
        "clipped": lambda s: (1.025 * s.softmax(-1) - 0.025).clamp(0, 1),
        "sigmoid": lambda s: 1 / (1 + torch.exp(-(s - math.log(5)))),
        # per-head sink logit appended as a column, softmax, column dropped
        "sink_logit": lambda s: torch.cat([torch.tensor([0.5, -1.0]).view(1, 2, 1, 1).expand(2, 2, 5, 1), s],
                                          -1).softmax(-1)[..., 1:],
    }[variant]
    with torch.no_grad():
        out, _ = _plain(original, x, hand)
        want = original.proj(out.transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


def test_kv_bias_is_an_extra_key_and_value_at_position_0():
    """Sun et al.: k′, v′ per head prepended to the keys and values of every query; plain softmax."""
    original, attn = _attn("kv_bias")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))

    def prepend(k, v):
        kb = attn.k_bias[None, :, None, :].expand(2, -1, 1, -1)
        vb = attn.v_bias[None, :, None, :].expand(2, -1, 1, -1)
        return torch.cat([kb, k], 2), torch.cat([vb, v], 2)

    with torch.no_grad():
        out, _ = _plain(original, x, lambda s: s.softmax(-1), keys=prepend)
        want = original.proj(out.transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


def test_gated_is_softmax_attention_times_a_sigmoid_gate_of_the_input():
    original, attn = _attn("gated")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, _ = _plain(original, x, lambda s: s.softmax(-1))
        gate = 1 / (1 + torch.exp(-(x @ attn.gate.weight.T + attn.gate.bias)))
        want = original.proj(out.transpose(1, 2).reshape(2, 5, 32) * gate)
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


def _variant_backbone(variant: str, start: str = "scratch"):
    torch.manual_seed(0)
    backbone = vsink.load("timm:deit_tiny_patch16_224", img_size=32, pretrained=False,
                          model_kwargs=dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=0))
    sharpen(backbone.model, std=0.2)
    apply_attention(backbone.model, variant, start=start)
    return backbone


@pytest.mark.parametrize("variant", VARIANTS)
def test_sites_and_capture_on_every_variant(variant, pixel_values):
    """Routed through vsink's explicit attention (a site installed) the output is unchanged; the
    captured weights are the variant's normalisation of the captured logits, not renormalised."""
    backbone = _variant_backbone(variant)
    x = pixel_values(batch=2, size=32)
    plain = backbone.forward(x).clone()
    seen = {}
    def keep(key, value):  # an observer: stores, returns None (no replacement)
        seen.setdefault(key, value)

    handles = [backbone.hook("attn_logits", 1, lambda s, start: keep("logits", s.clone())),
               backbone.hook("attn_probs", 1, lambda p, start, s: keep("probs", (p.clone(), s))),
               backbone.hook("attn_qkv", 1, lambda q, k, v: keep("q", q.clone())),
               backbone.hook("block_output", 1, lambda t: None), backbone.hook("mlp_hidden", 1, lambda t: None)]
    try:
        routed = backbone.forward(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(routed, plain, rtol=1e-4, atol=1e-5)
    s, (p, passed_logits) = seen["logits"], seen["probs"]
    # the logits go with the weights only while these are their softmax (the probe's entropy
    # shortcut assumes it); a variant's weights come alone
    assert (passed_logits is not None) == (variant == "softmax")
    assert p.shape == s.shape  # weights over the same keys (the bias key / sink column is not one of them)
    attn = backbone.blocks[1].attn
    if variant == "kv_bias":
        extra = ((seen["q"] * attn.scale) * attn.k_bias[None, :, None, :]).sum(-1)
        want = torch.cat([extra.unsqueeze(-1), s], -1).softmax(-1)[..., 1:]
    elif variant == "sink_logit":
        want = torch.cat([attn.sink.view(1, -1, 1, 1).expand(*s.shape[:-1], 1), s], -1).softmax(-1)[..., 1:]
    else:
        want = {"softmax": s.softmax(-1), "gated": s.softmax(-1), "softpick": softpick(s),
                "clipped": clipped_softmax(s), "sigmoid": sigmoid_attention(s)}[variant]
    torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
    sums = p.sum(-1)
    report = attention_report(backbone.model)
    assert report["variant"] == variant
    if report["rows_sum_to_one"]:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:
        assert (sums - 1).abs().max() > 1e-3, "a variant reported as not summing to 1 must not be renormalised"


@pytest.mark.parametrize("variant", ["softpick", "sigmoid", "sink_logit"])
def test_probe_entropy_is_that_of_the_weights_as_computed(variant, pixel_values):
    """−Σ p log p of the variant's own weights (not renormalised), averaged over queries."""
    from vsink.probe import Probe

    backbone = _variant_backbone(variant)
    x = pixel_values(batch=1, size=32)
    seen = []
    h = backbone.hook("attn_probs", 1, lambda p, start, s: seen.append(p.clone()) or None)
    try:
        with Probe(backbone, layers=[1]) as probe:
            backbone.forward(x)
    finally:
        h.remove()
    p = seen[0].double()
    want = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1).mean(-1)  # [B, H]
    got = torch.as_tensor(probe.trace().attn_entropy[0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_scan_and_maps_report_rows_that_do_not_sum_to_one(tmp_path, capsys):
    from vsink.cli import main

    backbone = _variant_backbone("sigmoid")
    backbone.save(tmp_path / "m")
    assert main(["scan", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "whose rows do not sum to 1" in capsys.readouterr().out
    settings = json.loads((tmp_path / "s" / "scan.json").read_text())["settings"]
    assert settings["attention"] == {"variant": "sigmoid", "rows_sum_to_one": False}
    assert main(["maps", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "maps"), "--kind", "received",
                 "--format", "npz", "--no-progress"]) == 0
    maps = json.loads((tmp_path / "maps" / "maps.json").read_text())
    assert maps["settings"]["attention"] == {"variant": "sigmoid", "rows_sum_to_one": False}


@pytest.mark.parametrize("variant", VARIANTS)
def test_models_save_and_load(variant, tmp_path, pixel_values):
    backbone = _variant_backbone(variant)
    with torch.no_grad():  # move the added parameters off their start values
        for p in backbone.model.parameters():
            if p.ndim <= 2 and p.numel() < 200:
                p.add_(0.01)
    backbone.save(tmp_path / "m")
    loaded = vsink.load(str(tmp_path / "m"))
    assert attention_report(loaded.model)["variant"] == variant
    x = pixel_values(batch=1, size=32)
    torch.testing.assert_close(loaded.forward(x), backbone.forward(x))


@pytest.mark.parametrize("variant", ["gated", "sink_logit"])
def test_pretrained_start_leaves_the_model_as_it_was(variant, pixel_values):
    model = sharpen(timm_model("deit_tiny_patch16_224", patch_size=8, depth=2, embed_dim=32, num_heads=2), std=0.2)
    x = pixel_values(batch=1, size=32)
    before = vsink.wrap(model).forward(x).clone()
    after = vsink.wrap(apply_attention(model, variant, start="pretrained")).forward(x)
    # gate sigmoid(10) = 1 − 4.5e-5; sink e^−30: both leave the output within float tolerance
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("variant", ["softpick", "clipped", "sigmoid", "kv_bias"])
def test_variants_that_change_every_row_refuse_a_pretrained_start(variant):
    model = timm_model("deit_tiny_patch16_224", patch_size=8)
    with pytest.raises(VsinkError, match=f"model.attention '{variant}' changes every attention row") as e:
        apply_attention(model, variant, start="pretrained")
    assert "\n" not in str(e.value)


def test_recipes_take_model_attention(tmp_path):
    from vsink.train import load_config, run_finetune
    from vsink.train.config import ConfigError

    tiny = ["model.spec=timm:vit_tiny_patch16_224", "model.img_size=32",
            "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "registers.n=1",
            "data.num_images=8", "data.eval_images=4", "train.batch_size=4", "train.steps=2",
            "train.eval_every=1000", "train.log_every=1000", "train.warmup_steps=1", "train.checkpoint_every=2"]
    cfg = load_config(None, ["recipe=scratch", f"out={tmp_path / 'scratch'}", "model.attention=softpick", *tiny])
    run_finetune(cfg, progress=False)
    loaded = vsink.load(str(tmp_path / "scratch" / "final"))
    assert attention_report(loaded.model)["variant"] == "softpick"
    posthoc = load_config(None, ["recipe=posthoc", f"out={tmp_path / 'posthoc'}", "model.spec=demo",
                                 "model.img_size=32", "model.attention=sigmoid", "data.num_images=4"])
    with pytest.raises(VsinkError, match="cannot start from pretrained"):
        run_finetune(posthoc, progress=False)
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=linear"])


def test_finetune_compare_attention_writes_one_report(tmp_path, capsys):
    """Every run on equal terms (one recipe, registers.n=0 and model.attention per variant); one
    table; the measures of each row are those of its own saved model."""
    from vsink.cli import main
    from vsink.train import load_config
    from vsink.train.data import load_training_images, to_input

    out = tmp_path / "cmp"
    args = ["finetune", "--config", "configs/scratch.yaml", "--compare-attention", "--no-progress", f"out={out}",
            "model.img_size=32", "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
            "registers.n=1", "data.num_images=8", "data.eval_images=4", "train.batch_size=4", "train.steps=1",
            "train.warmup_steps=1", "train.eval_every=1000", "train.checkpoint_every=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert list(runs) == ["registers", *VARIANTS[1:]]
    assert runs["registers"]["registers"] == 1 and runs["registers"]["attention"]["variant"] == "softmax"
    for v in VARIANTS[1:]:
        assert runs[v]["registers"] == 0 and runs[v]["attention"]["variant"] == v
        assert f"| {v} | 0 |" in printed and f"| {v} | 0 |" in (out / "compare.md").read_text()
        config = load_config(out / v / "config.yaml", [])
        assert config.model.attention == v and config.registers.n == 0
    # sink share of one row recomputed from its model: the largest mean weight a token receives
    cfg = load_config(out / "sigmoid" / "config.yaml", [])
    backbone = vsink.load(str(out / "sigmoid" / "final"))
    images = load_training_images(cfg.data, backbone.img_size, cfg.seed, classification=True)
    x = to_input(images.eval_pixels, backbone.mean, backbone.std, backbone.device, backbone.dtype, None)
    seen = []
    h = backbone.hook("attn_probs", -1, lambda p, start, s: seen.append(p.clone()) or None)
    try:
        backbone.forward(x)
    finally:
        h.remove()
    want = float(seen[0].mean(dim=(1, 2)).max(dim=1).values.mean())
    assert runs["sigmoid"]["sink_share"] == pytest.approx(want, rel=1e-5)
    # probe mIoU of the same row: a linear probe on synthetic segmentation images of the run's size
    # (8 train, 4 val, the recipe's seed), evaluated here through vsink eval dense's own function
    from vsink.evaluate.dense import evaluate_dense
    from vsink.evaluate.open import open_dataset

    sets = [open_dataset("synthetic", None, split, synthetic_images=n, synthetic_size=32, seed=cfg.seed)
            for split, n in (("val", 4), ("train", 8))]
    dense = evaluate_dense(backbone, sets[0], train_set=sets[1], tasks=["linear-seg"], progress=False)
    assert runs["sigmoid"]["probe_miou"] == pytest.approx(dense.variants["baseline"]["linear_seg"]["miou"])
    assert 0 <= runs["sigmoid"]["probe_miou"] <= 1 and "probe_miou" in report["columns"]
    iv = runs["sigmoid"]["probe_miou_interval"]
    assert iv["low"] <= runs["sigmoid"]["probe_miou"] <= iv["high"]
    with pytest.raises(VsinkError, match="scratch recipe"):
        from vsink.train.compare_attention import comparison_runs

        comparison_runs(load_config("configs/posthoc.yaml", []))
