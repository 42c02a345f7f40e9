"""Detectors on traces with a known answer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from vsink import Trace, VsinkError
from vsink.detect import detect_high_norm, detect_sinks, find_gap, layer_attention_summary
from vsink.layout import TokenLayout

LAYOUT = TokenLayout(num_cls=1, num_registers=2, grid=(16, 16))


def make_trace(norms=None, received=None, input_norms=None) -> Trace:
    n_layers = (norms if norms is not None else received).shape[0]
    return Trace(layout=LAYOUT, layers=list(range(n_layers)), norms=norms, input_norms=input_norms,
                 attn_received=received,
                 attn_entropy=None if received is None else np.ones(received.shape[:3], np.float32))


def lognormal_norms(n_layers=4, n_images=8, seed=0):
    rng = np.random.default_rng(seed)
    return np.exp(rng.normal(np.log(10.0), 0.25, size=(n_layers, n_images, LAYOUT.num_tokens))).astype(np.float32)


def test_unimodal_norms_have_no_outliers():
    result = detect_high_norm(make_trace(lognormal_norms()))
    assert result.emergence_layer is None and result.tokens == []
    assert all(layer.threshold is None and layer.outlier_fraction == 0 for layer in result.layers)


@pytest.mark.parametrize("spread", [0.1, 0.3, 0.45, 0.75, 1.0])
def test_unimodal_is_never_split(spread):
    rng = np.random.default_rng(1)
    values = np.exp(rng.normal(2.0, spread, size=5000))
    assert find_gap(values) is None


@pytest.mark.parametrize("name, draw", [
    ("pareto a=1", lambda rng, n: 10 * (1 + rng.pareto(1.0, n))),
    ("pareto a=3", lambda rng, n: 10 * (1 + rng.pareto(3.0, n))),
    ("student-t df=1", lambda rng, n: 10 * (1 + 0.3 * np.abs(rng.standard_t(1, n)))),
    ("student-t df=3", lambda rng, n: 10 * (1 + 0.3 * np.abs(rng.standard_t(3, n)))),
])
@pytest.mark.parametrize("n", [1024, 65536])
def test_heavy_continuous_tails_are_not_outliers(name, draw, n):
    # a heavy tail puts values hundreds of times the median far out, but with no gap: its top
    # spacings are large and so is the local scale they are compared with
    for seed in range(3):
        assert find_gap(draw(np.random.default_rng(seed), n)) is None, (name, seed)


def test_content_tail_without_a_gap_is_not_outliers():
    # the demo's blocks 0-1 on photos: a smooth right tail to ~5.7x the median, every spacing small
    rng = np.random.default_rng(4)
    bulk = np.exp(rng.normal(np.log(5.0), 0.35, size=400))
    tail = np.geomspace(12.0, 28.3, 40) * np.exp(rng.normal(0, 0.01, size=40))
    assert find_gap(np.concatenate([bulk, tail])) is None


def test_two_equal_halves_are_not_outliers():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(5, 0.2, 2000), rng.normal(10, 0.4, 2000)])
    assert find_gap(values) is None


def test_gap_statistic_by_hand():
    # log norms: a cluster of 3 at 5.0, then 26 bulk values 1.00, 0.99, ..., 0.75 (spacing 0.01)
    logs = np.concatenate([[5.0] * 3, 1.0 - 0.01 * np.arange(26)])
    gap = find_gap(np.exp(logs), window=8)
    # the spacings below the gap, j * (x_j - x_{j+1}) for j = 4..11, are 0.04..0.11: median 0.075,
    # so the local scale is 0.075 / ln 2; the gap is 4.0 and k = 3: T = 3 * 4.0 / (0.075 / ln 2)
    assert gap is not None and gap.size == 3
    assert gap.separation == pytest.approx(3 * 4.0 * np.log(2) / 0.075, rel=1e-6)
    # candidates: k = 2 and 3 sit >= 3x above the bulk median (k = 4 does not): K = 2, so the
    # critical value is window * ((K / alpha)^(1 / window) - 1) with window 8 and alpha 1e-5
    assert gap.critical == pytest.approx(8 * ((2 / 1e-5) ** (1 / 8) - 1), rel=1e-9)
    assert gap.threshold == pytest.approx(np.exp(3.0), rel=1e-9)  # geometric middle of e^5 and e^1


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
        assert {(int(i), int(p)) for i, p in zip(*np.nonzero(result.mask(layer)))} == planted
        stats = result.layers[layer]
        bulk_max = np.delete(norms[layer][:, LAYOUT.patch_slice].ravel(),
                             [i * 256 + p for i, p in planted]).max()
        assert bulk_max < stats.threshold < 100.0
        assert stats.separation > stats.critical
        assert stats.outlier_fraction == pytest.approx(len(planted) / (8 * 256))
        assert stats.outliers == len(planted)
        assert stats.cls == pytest.approx(500.0)
        assert len(stats.registers) == 2
    assert result.tokens_at(0) == [] and result.tokens_at(1) == []
    token = result.tokens_at(2)[0]
    assert (token.row, token.col) == LAYOUT.patch_position(token.token)


def test_cluster_found_alone_is_found_with_other_images():
    # image 0 has 6 artifacts at ~100 over a bulk at median 13; the others are bulk only, with
    # medians from 5 to 13 (as the demo's photos): pooling must not change image 0's verdict
    rng = np.random.default_rng(5)
    medians = [13.0, 5.0, 8.0, 11.0, 6.5]
    norms = np.stack([np.exp(rng.normal(np.log(m), 0.3, size=LAYOUT.num_tokens)) for m in medians])[None]
    norms = norms.astype(np.float32)
    artifacts = LAYOUT.num_prefix + np.array([3, 40, 41, 77, 200, 201])
    norms[0, 0, artifacts] = 100.0 * np.exp(rng.normal(0, 0.03, size=6))
    alone = detect_high_norm(make_trace(norms[:, :1]))
    pooled = detect_high_norm(make_trace(norms))
    expected = {(0, int(t)) for t in artifacts}
    assert {(t.image, t.token) for t in alone.tokens} == expected
    assert {(t.image, t.token) for t in pooled.tokens} == expected


def test_cluster_present_at_the_input_is_content_not_a_write():
    norms = lognormal_norms(n_layers=1)
    inputs = norms[0].copy()
    content = LAYOUT.num_prefix + np.arange(12)
    norms[0, :, content] = 120.0
    inputs[:, content] = 120.0  # already large in the patch embedding: content, not a register write
    assert detect_high_norm(make_trace(norms, input_norms=inputs)).tokens == []
    inputs[:, content] = 10.0  # the same cluster written inside the block
    assert len(detect_high_norm(make_trace(norms, input_norms=inputs)).tokens) == 12 * norms.shape[1]
    assert detect_high_norm(make_trace(norms, input_norms=norms[0]), min_growth=0).tokens != []


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
    with warnings.catch_warnings():  # a huge ratio (--sink-ratio 1e300) finds nothing, without a float32 overflow
        warnings.simplefilter("error")
        assert detect_sinks(trace, ratio=1e300) == []
    summary = layer_attention_summary(trace)
    assert summary[0]["register_received"] == pytest.approx(2 / n)
    assert summary[1]["register_received"] == pytest.approx(received[1, 0, 0, 1:3].sum())
    assert summary[1]["max_patch_received"] == pytest.approx(received[1, 0, 0, 40])
    assert summary[1]["cls_received"] == pytest.approx(received[1, 0, 0, 0])
