"""Attention captured by vsink equals each library's own attention; probes do not change outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vsink
from conftest import (HF_CASES, ROPE_CASES, TIMM_CASES, capture_probs, hf_call, hf_model, open_clip_visual,
                      sharpen, timm_case, timm_model, timm_reference)

TOL = 1e-5


@pytest.mark.parametrize("case", sorted(TIMM_CASES) + sorted(ROPE_CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_equals_library(case, fused, pixel_values):
    """timm ViTs and timm's Eva models (rotary positions applied by timm in the reference)."""
    name, kwargs = {**TIMM_CASES, **ROPE_CASES}[case]
    model = sharpen(timm_model(name, **kwargs))
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    backbone = vsink.wrap(model)
    x = pixel_values(size=backbone.img_size[0])
    ref_out, ref_probs = timm_reference(model, x)
    with torch.no_grad():
        plain = model.forward_features(x)
    out, probs = capture_probs(backbone, x)
    assert len(probs) == len(ref_probs) == backbone.num_layers
    for p, r in zip(probs, ref_probs):
        assert p.shape == r.shape == (2, backbone.num_heads, backbone.layout().num_tokens, backbone.layout().num_tokens)
        assert (p - r).abs().max().item() <= TOL
        assert r.max() > 0.3, "attention too flat to make the comparison meaningful"
    assert (out - plain).abs().max().item() <= TOL
    assert torch.equal(backbone.forward(x), plain), "routing was not undone"
    assert all(blk.attn.fused_attn == fused for blk in model.blocks)


def test_timm_register_layout_and_dynamic_size(pixel_values):
    reg = vsink.wrap(timm_case("dinov2_reg4"))
    assert (reg.layout().num_cls, reg.layout().num_registers, reg.layout().grid) == (1, 4, (3, 3))
    dyn = vsink.wrap(sharpen(timm_case("vit_dynamic")))
    x = pixel_values(size=48)
    assert dyn.layout((48, 40)).grid == (6, 5)
    ref_out, ref_probs = timm_reference(dyn.model, x)
    _, probs = capture_probs(dyn, x)
    assert probs[0].shape[-1] == dyn.layout((48, 48)).num_tokens == 37
    assert max((p - r).abs().max().item() for p, r in zip(probs, ref_probs)) <= TOL
    distilled = vsink.wrap(timm_case("deit_distilled"))
    assert distilled.layout().num_cls == 2 and distilled.layout().num_registers == 0


def _open_clip_reference(visual, x):
    """open_clip probabilities: nn.MultiheadAttention(need_weights=True) for standard blocks;
    open_clip's custom Attention never returns weights, so softmax(q k^T * scale) from its own
    in_proj for those."""
    inputs = {}
    hooks = [blk.ln_1.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, o))
             for i, blk in enumerate(visual.transformer.resblocks)]
    with torch.no_grad():
        out = visual(x)
    for h in hooks:
        h.remove()
    probs = []
    for i, blk in enumerate(visual.transformer.resblocks):
        h = inputs[i]
        if isinstance(blk.attn, torch.nn.MultiheadAttention):
            _, w = torch.nn.MultiheadAttention.forward(blk.attn, h, h, h, need_weights=True, average_attn_weights=False)
        else:
            a = blk.attn
            q, k, _ = F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
            q, k = (t.reshape(h.shape[0], h.shape[1], a.num_heads, -1).transpose(1, 2) for t in (q, k))
            w = (torch.einsum("bhqd,bhkd->bhqk", q, k) * a.scale).softmax(-1)
        probs.append(w)
    return out, probs


@pytest.mark.parametrize("block_type", [None, "custom"])
def test_open_clip_attention_equals_library(block_type, pixel_values):
    visual = sharpen(open_clip_visual(block_type))
    backbone = vsink.wrap(visual)
    assert backbone.family == "open_clip"
    x = pixel_values()
    ref_out, ref_probs = _open_clip_reference(visual, x)
    out, probs = capture_probs(backbone, x)
    for p, r in zip(probs, ref_probs):
        assert (p - r).abs().max().item() <= TOL
        assert r.max() > 0.3
    assert (out - ref_out).abs().max().item() <= TOL
    assert torch.equal(backbone.forward(x), ref_out)


@pytest.mark.parametrize("kind", HF_CASES)
def test_hf_attention_equals_eager_output_attentions(kind, pixel_values):
    model = sharpen(hf_model(kind, "eager"))
    backbone = vsink.wrap(model)
    x = pixel_values()
    with torch.no_grad():
        ref = hf_call(model, x, output_attentions=True)
    out, probs = capture_probs(backbone, x)
    assert len(ref.attentions) == len(probs)
    for p, r in zip(probs, ref.attentions):
        assert p.shape == r.shape
        assert (p - r).abs().max().item() <= TOL
        assert r.max() > 0.3
    assert (out - ref.last_hidden_state).abs().max().item() <= TOL
    assert model.config._attn_implementation == "eager", "attention implementation not restored"
    assert torch.equal(backbone.forward(x), ref.last_hidden_state)


@pytest.mark.parametrize("kind", ["dinov2_reg", "siglip", "dinov3_reg", "siglip2", "aimv2", "internvl_vision"])
def test_hf_sdpa_model_routes_and_restores(kind, pixel_values):
    eager = sharpen(hf_model(kind, "eager"))
    sdpa = hf_model(kind, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    backbone = vsink.wrap(sdpa)
    x = pixel_values()
    with torch.no_grad():
        ref = hf_call(eager, x, output_attentions=True)
        plain = hf_call(sdpa, x).last_hidden_state
    # route only layer 1: layer 0 keeps running sdpa
    got = []
    handle = backbone.hook("attn_probs", 1, lambda c, s, z: got.append(c.clone()))
    out = backbone.forward(x)
    handle.remove()
    assert (torch.cat(got, 2) - ref.attentions[1]).abs().max().item() <= TOL
    assert (out - plain).abs().max().item() <= TOL
    assert sdpa.config._attn_implementation == "sdpa"
    assert torch.equal(backbone.forward(x), plain)


@pytest.mark.parametrize("family", ["timm", "open_clip", "hf"])
def test_norm_probe_is_bit_for_bit(family, pixel_values):
    """Observing block outputs only (no attention) leaves the computation path untouched."""
    model = {"timm": lambda: timm_case("dinov2_reg4"), "open_clip": open_clip_visual,
             "hf": lambda: hf_model("dinov2_reg", "sdpa")}[family]()
    backbone = vsink.wrap(model)
    x = pixel_values(size=backbone.img_size[0])
    plain = backbone.forward(x)
    with vsink.Probe(backbone, attention=False) as probe:
        observed = probe.run(x)
    assert torch.equal(observed, plain)
    with vsink.Probe(backbone) as probe:
        routed = probe.run(x)
    assert (routed - plain).abs().max().item() <= TOL
    assert torch.equal(backbone.forward(x), plain)


def test_logit_and_prob_edits_change_attention(pixel_values):
    """Sites are edit points: a logits edit that masks every key but the first forces all
    attention there, and a probability edit is seen by the output."""
    backbone = vsink.wrap(sharpen(timm_case("deit")))
    x = pixel_values()

    def only_first(chunk, start):
        edited = torch.full_like(chunk, float("-inf"))
        edited[..., 0] = 0.0
        return edited

    seen = []
    h1 = backbone.hook("attn_logits", 0, only_first)
    h2 = backbone.hook("attn_probs", 0, lambda c, s, z: seen.append(c.clone()))
    edited = backbone.forward(x)
    h1.remove()
    h2.remove()
    probs = torch.cat(seen, 2)
    assert torch.equal(probs[..., 0], torch.ones_like(probs[..., 0]))
    assert not torch.allclose(edited, backbone.forward(x))


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_grouped_query_attention_equals_sdpa_with_repeated_heads(chunk_size):
    """Query heads sharing key/value heads (LLaMA/Qwen GQA): the grouped matmul equals SDPA on
    keys and values repeated per head, and the site functions see [B, H, q, N] per query head."""
    from vsink.attention import explicit_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hk, Nq, Nk, d = 2, 8, 2, 7, 11, 16
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h, n in ((H, Nq), (Hk, Nk), (Hk, Nk)))
    mask = torch.randn(B, 1, Nq, Nk, generator=g)
    scale = torch.linspace(0.1, 0.4, H).view(H, 1, 1)  # per-head scale: heads must stay in order
    seen = []

    def observe(logits, q_start):
        seen.append((logits.shape, q_start))

    out = explicit_attention(q, k, v, scale=scale, mask=mask, chunk_size=chunk_size, logit_fns=(observe,))
    ref = F.scaled_dot_product_attention(q * scale, k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1),
                                         attn_mask=mask, scale=1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert all(shape[:2] == (B, H) and shape[3] == Nk for shape, _ in seen)
    assert sum(shape[2] for shape, _ in seen) == Nq and seen[0][1] == 0
    with pytest.raises(ValueError, match="8 query heads cannot share 3"):
        explicit_attention(q, torch.randn(B, 3, Nk, d), torch.randn(B, 3, Nk, d), scale=1.0)
