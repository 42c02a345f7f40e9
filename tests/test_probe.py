"""Probe reductions against references computed from the libraries' own tensors; Trace round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vsink
from vsink.attention import explicit_attention, query_chunk_size
from vsink.probe import row_entropy
from conftest import hf_model, sharpen, timm_case


def test_streamed_reductions_equal_full_matrix_statistics(pixel_values):
    """norms / received / cls row / entropy from the probe equal the same statistics computed
    from HF's eager ``output_attentions`` and ``output_hidden_states``."""
    model = sharpen(hf_model("dinov2_reg", "eager"))
    backbone = vsink.wrap(model)
    backbone.attention_chunk_size = 4  # 21 tokens → 6 blocks, the last one partial
    x = pixel_values(batch=3)
    with torch.no_grad():
        ref = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    with vsink.Probe(backbone) as probe:
        probe.run(x[:2])
        probe.run(x[2:])
    trace = probe.trace()
    assert trace.num_images == 3 and trace.layers == [0, 1]
    for layer in range(2):
        A = ref.attentions[layer].double()  # [B, H, N, N]
        hidden = ref.hidden_states[layer + 1]  # [0] is the embedding output
        np.testing.assert_allclose(trace.norms[layer], hidden.norm(dim=-1).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(trace.attn_received[layer], A.mean(dim=2).numpy(), atol=1e-6)
        np.testing.assert_allclose(trace.attn_cls[layer], A[:, :, 0, :].numpy(), atol=1e-6)
        entropy = -torch.where(A > 0, A * A.log(), 0.0).sum(-1).mean(-1)
        np.testing.assert_allclose(trace.attn_entropy[layer], entropy.numpy(), atol=1e-5)


def test_probe_removes_everything_on_exception(pixel_values):
    backbone = vsink.wrap(timm_case("dinov2_reg4"))
    x = pixel_values(size=42)
    plain = backbone.forward(x)
    with pytest.raises(RuntimeError, match="boom"):
        with vsink.Probe(backbone):
            raise RuntimeError("boom")
    assert not any(b._forward_hooks for b in backbone.blocks)
    assert not any(backbone.attention_routed(i) for i in range(backbone.num_layers))
    assert all("forward" not in b.attn.__dict__ for b in backbone.blocks)
    assert torch.equal(backbone.forward(x), plain)


def test_trace_round_trip(tmp_path, pixel_values):
    backbone = vsink.wrap(timm_case("dinov2_reg4"))
    with vsink.Probe(backbone, layers=[-1, 0]) as probe:
        probe.run(pixel_values(size=42))
    trace = probe.trace(meta={"model": "x"})
    assert trace.layers == [0, 1]
    path = trace.save(tmp_path / "t.npz")
    back = vsink.Trace.load(path)
    assert back.layout == trace.layout and back.layers == trace.layers and back.meta == {"model": "x"}
    for name in vsink.Trace.ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(vsink.VsinkError, match="bad.npz"):
        vsink.Trace.load(tmp_path / "bad.npz")


def test_probe_rejects_mixed_input_sizes(pixel_values):
    backbone = vsink.wrap(timm_case("vit_dynamic"))
    with vsink.Probe(backbone) as probe:
        probe.run(pixel_values(size=32))
        with pytest.raises(vsink.VsinkError, match="one layout"):
            probe.run(pixel_values(size=40))


def test_chunks_bound_memory_and_match_unchunked():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g) for _ in range(3))
    rows = []
    out = explicit_attention(q, k, v, scale=8 ** -0.5, chunk_size=7, prob_fns=[lambda c, s, z: rows.append(c.shape[2])])
    ref = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1) @ v
    assert (out - ref).abs().max() < 1e-6
    assert rows == [7] * 7 + [1]
    # an 8 MiB budget for ViT-S/14 at 518 px (1370 tokens, 6 heads, batch 4) → 63-query blocks
    assert query_chunk_size(4, 6, 1370) == (8 * 2**20) // (4 * 6 * 1370 * 4) == 63


def test_entropy_from_logits_equals_definition():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, 40, generator=g) * 4
    z[..., :7] = float("-inf")  # masked keys
    p = z.softmax(-1)
    p64 = p.double()
    direct = -torch.where(p64 > 0, p64 * p64.log(), 0.0).sum(-1).float()
    assert torch.allclose(row_entropy(p, z), direct, atol=1e-5)
    assert torch.allclose(row_entropy(p), direct, atol=1e-5)


def test_prob_functions_see_logits_until_probs_are_replaced():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g) for _ in range(3))
    seen = []
    first = lambda p, s, z: seen.append(("first", z is not None)) or p.flip(-1)  # noqa: E731
    second = lambda p, s, z: seen.append(("second", z is not None))  # noqa: E731
    explicit_attention(q, k, v, scale=1.0, prob_fns=[first, second])
    assert seen == [("first", True), ("second", False)]
