"""`vsink scan` recovers the demo's planted mechanism, checked against the model's own neurons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vsink
from vsink.data import demo_model as D
from vsink.data.demo_images import demo_images
from conftest import PHOTOS, astronaut_variants, planted_firing, skimage_photo


@pytest.fixture(scope="module")
def demo():
    backbone = vsink.load("demo")
    images = demo_images()
    return backbone, images, vsink.scan(backbone, images, progress=False)


def test_demo_outliers_are_the_planted_tokens(demo):
    backbone, images, result = demo
    firing = planted_firing(backbone, images)
    assert 0 < firing.float().mean() < 0.5
    assert result.high_norm.emergence_layer == D.PLANTED_BLOCK
    layout = result.layout
    for layer in range(backbone.num_layers):
        found = {(t.image, t.token) for t in result.high_norm.tokens_at(layer)}
        if layer < D.PLANTED_BLOCK:
            assert found == set()
        else:
            expected = {(int(i), layout.num_prefix + int(p)) for i, p in torch.nonzero(firing)}
            assert found == expected
            stats = result.high_norm.layers[layer]
            assert stats.ratio > 8
    per_image = result.to_json()["per_image"]
    assert [e["high_norm_tokens"] for e in per_image] == [int(f.sum()) for f in firing]
    assert [e["high_norm_layers"] for e in per_image] == [list(range(D.PLANTED_BLOCK, backbone.num_layers))] * 2


def test_demo_outliers_sit_on_flat_patches(demo):
    backbone, images, result = demo
    x = backbone.preprocess([im.image for im in images])
    ph, pw = backbone.patch_size
    patch_std = x.unfold(2, ph, ph).unfold(3, pw, pw).std(dim=(-1, -2)).mean(1).flatten(1)  # [B, P]
    outlier = torch.zeros_like(patch_std, dtype=torch.bool)
    for t in result.high_norm.tokens_at(D.PLANTED_BLOCK):
        outlier[t.image, t.token - result.layout.num_prefix] = True
    assert patch_std[outlier].mean() < 0.25 * patch_std[~outlier].mean()


def test_demo_sinks_are_high_norm_tokens_after_the_planted_block(demo):
    backbone, images, result = demo
    outliers = {(t.image, t.token) for t in result.high_norm.tokens_at(D.PLANTED_BLOCK)}
    written = {(int(i), result.layout.num_prefix + int(p))
               for i, p in torch.nonzero(planted_firing(backbone, images, fraction=0.05))}
    assert {s.layer for s in result.sinks} == set(D.SINK_BLOCKS)
    # every sink carries the planted write (partly-firing tokens below the norm threshold too)
    assert all((s.image, s.token) in written and s.kind == "patch" for s in result.sinks)
    for layer in D.SINK_BLOCKS:
        for image in range(len(images)):
            strongest = max((s for s in result.sinks if s.image == image and s.layer == layer), key=lambda s: s.share)
            assert (image, strongest.token) in outliers
    summary = {a["index"]: a for a in result.attention}
    assert summary[D.SINK_BLOCKS[0]]["entropy"] < summary[0]["entropy"]


def test_demo_is_deterministic():
    a, b = D.build_demo_model(), D.build_demo_model()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    u = D.planted_direction()
    assert u[D.CONST_DIM] == 0 and np.isclose(float(u.norm()), 1.0)


PHOTO_SETS = {
    "astronaut alone": lambda: [skimage_photo("astronaut")],
    "coffee + rocket": lambda: [skimage_photo("coffee"), skimage_photo("rocket")],
    "astronaut variants": astronaut_variants,
    "seven photos": lambda: [skimage_photo(name) for name in PHOTOS],
}


@pytest.fixture(scope="module")
def backbone():
    return vsink.load("demo")


@pytest.mark.parametrize("name", PHOTO_SETS)
def test_photos_flag_exactly_the_planted_tokens_from_the_planted_block(backbone, name):
    # on real photos the demo's blocks 0-1 have smooth content tails (no gap) and block 2 on has
    # the planted cluster; the truth is read from the planted neurons with a plain torch hook
    images = PHOTO_SETS[name]()
    result = vsink.scan(backbone, images, progress=False)
    firing = planted_firing(backbone, images)
    assert firing.any()
    assert result.high_norm.emergence_layer == D.PLANTED_BLOCK
    expected = {(int(i), result.layout.num_prefix + int(p)) for i, p in torch.nonzero(firing)}
    for layer in range(backbone.num_layers):
        found = {(t.image, t.token) for t in result.high_norm.tokens_at(layer)}
        assert found == (set() if layer < D.PLANTED_BLOCK else expected), (name, layer)


def test_photo_verdict_does_not_depend_on_the_batch(backbone):
    # the astronaut's tokens are the same whether it is scanned alone or among the seven photos
    alone = vsink.scan(backbone, [skimage_photo("astronaut")], progress=False).high_norm
    photos = [skimage_photo(name) for name in PHOTOS]
    pooled = vsink.scan(backbone, photos, progress=False, batch_size=3).high_norm
    for layer in range(backbone.num_layers):
        assert np.array_equal(alone.mask(layer)[0], pooled.mask(layer)[PHOTOS.index("astronaut")]), layer
