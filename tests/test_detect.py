"""Detectors on traces with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from vsink import Trace, VsinkError
from vsink.detect import adaptive_threshold, detect_high_norm, detect_sinks, layer_attention_summary
from vsink.layout import TokenLayout

LAYOUT = TokenLayout(num_cls=1, num_registers=2, grid=(16, 16))


def make_trace(norms=None, received=None) -> Trace:
    n_layers = (norms if norms is not None else received).shape[0]
    return Trace(layout=LAYOUT, layers=list(range(n_layers)), norms=norms, attn_received=received,
                 attn_entropy=None if received is None else np.ones(received.shape[:3], np.float32))


def lognormal_norms(n_layers=4, n_images=8, seed=0):
    rng = np.random.default_rng(seed)
    return np.exp(rng.normal(np.log(10.0), 0.25, size=(n_layers, n_images, LAYOUT.num_tokens))).astype(np.float32)


def test_unimodal_norms_have_no_outliers():
    result = detect_high_norm(make_trace(lognormal_norms()))
    assert result.emergence_layer is None and result.tokens == []
    assert all(layer.threshold is None and layer.outlier_fraction == 0 for layer in result.layers)


@pytest.mark.parametrize("spread", [0.1, 0.3, 0.45])
def test_unimodal_is_never_split_in_half(spread):
    rng = np.random.default_rng(1)
    values = np.exp(rng.normal(2.0, spread, size=5000))
    assert adaptive_threshold(values) is None


def test_two_equal_halves_are_not_outliers():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(5, 0.2, 2000), rng.normal(10, 0.4, 2000)])
    assert adaptive_threshold(values) is None


def test_planted_outliers_found_exactly_with_emergence_layer():
    norms = lognormal_norms()
    rng = np.random.default_rng(3)
    planted = {(int(i), int(p)) for i, p in zip(rng.integers(0, 8, 40), rng.integers(0, 256, 40))}
    for layer in (2, 3):
        for image, p in planted:
            norms[layer, image, LAYOUT.num_prefix + p] = 100.0 + p / 100
    norms[:, :, 0] = 500.0  # a huge class token is not a patch outlier
    result = detect_high_norm(make_trace(norms))
    assert result.emergence_layer == 2
    for layer in (2, 3):
        found = {(t.image, t.token - LAYOUT.num_prefix) for t in result.tokens_at(layer)}
        assert found == planted
        stats = result.layers[layer]
        bulk_max = np.delete(norms[layer][:, LAYOUT.patch_slice].ravel(),
                             [i * 256 + p for i, p in planted]).max()
        assert bulk_max < stats.threshold < 100.0
        assert stats.outlier_fraction == pytest.approx(len(planted) / (8 * 256))
        assert stats.cls == pytest.approx(500.0)
        assert len(stats.registers) == 2
    assert result.tokens_at(0) == [] and result.tokens_at(1) == []
    token = result.tokens_at(2)[0]
    assert (token.row, token.col) == LAYOUT.patch_position(token.token)


def test_sigma_and_absolute_thresholds_by_hand():
    norms = np.ones((1, 1, LAYOUT.num_tokens), np.float32)
    patches = norms[0, 0, LAYOUT.patch_slice]
    patches[:] = 1.0
    patches[:32] = 9.0  # 256 patches: 224 ones and 32 nines → mean 2, std sqrt(7)
    trace = make_trace(norms)
    sigma = detect_high_norm(trace, method="sigma", k=2.0)
    assert sigma.layers[0].threshold == pytest.approx(2 + 2 * np.sqrt(7), rel=1e-6)
    assert len(sigma.tokens) == 32
    absolute = detect_high_norm(trace, method="absolute", threshold=10.0)
    assert absolute.tokens == [] and absolute.emergence_layer is None
    with pytest.raises(VsinkError, match="positive threshold"):
        detect_high_norm(trace, method="absolute")
    with pytest.raises(VsinkError, match="unknown threshold method"):
        detect_high_norm(trace, method="otsu")


def test_sinks_by_kind_and_summary():
    n = LAYOUT.num_tokens
    received = np.full((2, 1, 4, n), 1.0 / n, np.float32)
    received[1, 0, :, 2] = 0.3          # second register soaks up attention in layer 1
    received[1, 0, :, 40] = 0.05        # one patch at ~13x the median
    received[1] /= received[1].sum(-1, keepdims=True)
    trace = make_trace(received=received)
    sinks = detect_sinks(trace, ratio=5.0)
    assert [(s.layer, s.token, s.kind) for s in sinks] == [(1, 2, "register"), (1, 40, "patch")]
    assert (sinks[1].row, sinks[1].col) == LAYOUT.patch_position(40)
    assert sinks[0].share == pytest.approx(received[1, 0, 0, 2])
    summary = layer_attention_summary(trace)
    assert summary[0]["register_received"] == pytest.approx(2 / n)
    assert summary[1]["register_received"] == pytest.approx(received[1, 0, 0, 1:3].sum())
    assert summary[1]["max_patch_received"] == pytest.approx(received[1, 0, 0, 40])
    assert summary[1]["cls_received"] == pytest.approx(received[1, 0, 0, 0])
