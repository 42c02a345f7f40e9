"""Figures a reader can trust, checked on the rendered matplotlib objects: scales, tick labels,
colour bars; the per-head, massive-activation, PCA and small-multiple figures; the scan report."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from vsink.detect import AttentionSink
from vsink.export.axes import DistinctFormatter, use_log
from vsink.export.figures import layer_curves_figure, norm_histogram_figure, overlay_axes, plt
from vsink.export.layer_figures import heatmap_figure, norm_small_multiples_figure, sink_share_by_head
from vsink.export.pca import pca_rgb
from vsink.export.report import group_sinks, layer_ranges
from vsink.layout import TokenLayout
from vsink.probe import Trace


def labels(axis) -> list[str]:
    fig = axis.figure
    fig.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def no_multiplier(texts: list[str]) -> bool:
    return not any(re.search(r"×|\\times|\$|10\^", t) for t in texts)


def test_narrow_ratio_range_is_linear_with_distinct_full_labels():
    """The random DINOv2-reg4 case: every ratio ~1.98491; a log axis printed 1.87201×10⁰ on every
    tick and drew a cliff. Now: linear, 1 in view, labels distinct and without multipliers."""
    ratios = 1.98491 + np.linspace(1e-5, 0, 12)
    fig = layer_curves_figure({"ratio": (list(range(12)), ratios)}, ylabel="r", title="t", floor=1.0)
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    lo, hi = ax.get_ylim()
    assert lo <= 1.0 and hi >= 1.98492 and (hi - lo) > 0.9  # the line is flat on the page
    texts = labels(ax.yaxis)
    assert len(texts) >= 3 and len(set(texts)) == len(texts) and no_multiplier(texts)
    assert ax.yaxis.get_offset_text().get_text() == ""
    plt.close(fig)


def test_ratios_over_decades_are_log_with_plain_labels():
    fig = layer_curves_figure({"ratio": ([0, 1, 2, 3], [1.2, 3.0, 80.0, 120.0])}, ylabel="r", title="t", floor=1.0)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    texts = labels(ax.yaxis)
    assert {"1", "10", "100"} <= set(texts) and no_multiplier(texts)
    plt.close(fig)


def test_compared_runs_share_one_axis():
    fig = layer_curves_figure({"before": ([0, 1], [4.84, 4.87]), "after": ([0, 1], [1.5, 1.6])}, ylabel="r",
                              title="t", floor=1.0)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.lines) == 2
    lo, hi = ax.get_ylim()
    assert lo <= 1.0 and hi >= 4.87
    plt.close(fig)


def overlaps(texts) -> bool:
    boxes = [t.get_window_extent() for t in texts]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize("values", [np.linspace(1.8, 24.0, 500), np.geomspace(0.5, 900.0, 500),
                                    np.linspace(3.0, 4.0, 500)])
def test_histogram_tick_labels_do_not_overlap(values):
    """``3×10⁰4×10⁰``: minor log ticks were labelled and ran together."""
    fig = norm_histogram_figure({"n": values}, {"n": None}, "t")
    ax = fig.axes[0]
    fig.canvas.draw()
    visible = [t for t in ax.xaxis.get_ticklabels(minor=False) + ax.xaxis.get_ticklabels(minor=True)
               if t.get_visible() and t.get_text()]
    lo, hi = ax.get_xlim()
    visible = [t for t in visible if lo <= t.get_position()[0] <= hi]
    assert len(visible) >= 2 and not overlaps(visible)
    assert no_multiplier([t.get_text() for t in visible])
    assert ax.get_xscale() == ("log" if use_log(values) else "linear")
    plt.close(fig)


def test_colour_bar_of_a_nearly_constant_map_has_no_offset_text():
    """A map of 1.449e-2 ± 1e-6 got the offset ``1e−6+1.449e−2`` on top of the colour bar, over the
    title of the next map."""
    fig, ax = plt.subplots()
    grid = 0.01449 + 1e-6 * np.random.default_rng(0).random((14, 14))
    overlay_axes(ax, Image.new("RGB", (56, 56)), grid, "title")
    cbar_ax = fig.axes[-1]
    fig.canvas.draw()
    assert cbar_ax.yaxis.get_offset_text().get_text() == ""
    texts = labels(cbar_ax.yaxis)
    assert len(texts) >= 2 and len(set(texts)) == len(texts) and no_multiplier(texts)
    assert all(t.startswith("0.01449") for t in texts)
    plt.close(fig)


def test_distinct_formatter_uses_just_enough_digits():
    f = DistinctFormatter()
    assert f.format_ticks([0.5, 1.0, 1.5]) == ["0.5", "1", "1.5"]
    assert f.format_ticks([1.984910, 1.984912, 1.984914]) == ["1.98491", "1.984912", "1.984914"]
    assert f.format_ticks([1e-7, 2e-7]) == ["1e-7", "2e-7"]


def toy_trace() -> Trace:
    """2 layers, 1 image, 2 heads, 1 class token + 2x2 patches; head 0 puts 0.6 on token 3, head 1 0.2."""
    layout = TokenLayout(1, 0, (2, 2))
    received = np.full((2, 1, 2, 5), 0.1, dtype=np.float32)
    received[:, 0, 0, 3], received[:, 0, 1, 3] = 0.6, 0.2
    return Trace(layout=layout, layers=[0, 1], attn_received=received)


def test_sink_share_by_head_counts_only_each_layers_sinks():
    trace = toy_trace()
    sinks = [AttentionSink(0, 1, 3, "patch", 0.4, 4.0, 1, 0)]  # a sink at block 1 only
    share = sink_share_by_head(trace, sinks)
    np.testing.assert_allclose(share, [[0.0, 0.0], [0.6, 0.2]], atol=1e-6)
    fig = heatmap_figure(share, [0, 1], title="t", label="share")
    assert fig.axes[0].images[0].get_array().shape == (2, 2)
    plt.close(fig)


def test_strongest_sinks_are_grouped_over_blocks_and_capped_per_image():
    """One image's tokens repeated for blocks 3, 4, 5 filled the table; now one row per token."""
    sinks = [AttentionSink(0, layer, token, "patch", 0.5 - 0.01 * token + 0.001 * layer, 9.0, 0, token)
             for token in range(1, 8) for layer in (3, 4, 5)]
    sinks += [AttentionSink(1, 2, 9, "register", 0.05, 5.0)]
    shown, left_out = group_sinks(sinks, per_image=4)
    assert [(g.image, g.token) for g in shown] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 9)]
    assert shown[0].layers == [3, 4, 5] and shown[0].peak_layer == 5 and left_out == 3
    assert layer_ranges([3, 4, 5, 8, 10, 11]) == "3–5, 8, 10–11"


def test_pca_rgb_makes_an_artifact_a_saturated_dot():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 6, 16))
    feats[2, 3] += 40.0
    rgb = pca_rgb(feats)
    assert rgb.shape == (6, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[2, 3, 0] == 1.0 and np.median(rgb[..., 0]) < 0.8


def test_norm_small_multiples_show_every_block_on_one_scale():
    grids = {layer: np.full((3, 3), float(layer + 1)) for layer in range(5)}
    fig = norm_small_multiples_figure(Image.new("RGB", (30, 30)), grids, "img")
    shown = [ax.images[0] for ax in fig.axes if ax.images and ax.get_title().startswith("block")]
    assert len(shown) == 5 and {im.get_clim() for im in shown} == {(1.0, 5.0)}
    plt.close(fig)


def test_overlay_on_a_scale_starts_at_zero_with_units_marks_and_a_flat_note():
    """A class-token map spanning 0.0045–0.00452 is drawn on a scale from 0 (so it looks flat), the
    bar names the quantity, τ is a line on the bar, and the title says the panel is flat."""
    from vsink.export.scales import shared_scale

    grid = np.linspace(0.0045, 0.00452, 16).reshape(4, 4)
    scale = shared_scale([grid, np.full((4, 4), 0.02)], zero=True, label="attention share", marks={"τ": 0.01})
    fig, ax = plt.subplots()
    im = overlay_axes(ax, Image.new("RGB", (60, 40)), grid, "cls", scale=scale)
    assert im.get_clim() == (0.0, 0.02)
    bar = next(a for a in fig.axes if a is not ax)
    assert "attention share" in bar.get_ylabel() and "τ = 0.01" in bar.get_ylabel()
    assert any(np.allclose(line.get_ydata(), 0.01) for line in bar.lines)
    assert "flat" in ax.get_title() and "0.0045" in ax.get_title()
    plt.close(fig)
    fig, ax = plt.subplots()
    overlay_axes(ax, Image.new("RGB", (60, 40)), np.linspace(0, 1, 16).reshape(4, 4), "cls", scale=scale)
    assert "flat" not in ax.get_title()
    plt.close(fig)


def test_norm_histograms_at_every_block_mark_each_threshold_on_one_axis():
    from vsink.export.layer_figures import norm_histograms_figure

    rng = np.random.default_rng(0)
    norms = [rng.normal(10, 1, (3, 16)), rng.normal(10, 1, (3, 16)), np.r_[rng.normal(10, 1, 40), [80.0] * 8]]
    fig = norm_histograms_figure(norms, [0, 1, 2], [None, 30.0, 45.0], emergence=1)
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 3
    marks = [[float(line.get_xdata()[0]) for line in ax.lines] for ax in panels]
    assert marks == [[], [30.0], [45.0]]
    assert len({ax.get_xlim() for ax in panels}) == 1  # one norm axis for all blocks
    assert "emergence" in panels[1].get_title() and "threshold 30" in panels[1].get_title()
    plt.close(fig)


def test_maps_share_one_scale_per_kind_over_blocks_and_images(tmp_path):
    """maps.json's scales equal the range over every exported map of that kind in every image
    (read back from the npz files); attention scales start at 0; each PNG canvas uses them."""
    import json

    import vsink
    from vsink.data.demo_images import demo_images
    from vsink.export.maps import OverlayCanvas
    from vsink.maps import export_maps

    backbone = vsink.load("demo")
    export_maps(backbone, demo_images(), tmp_path, kinds=["cls", "norm", "rollout"], layers=[1, 4], progress=False)
    index = json.loads((tmp_path / "maps.json").read_text())
    arrays: dict[str, list[np.ndarray]] = {"cls": [], "norm": [], "rollout": []}
    for entry in index["images"]:
        with np.load(tmp_path / f"{entry['stem']}.npz") as d:
            arrays["cls"] += [d["cls/layer1/mean"], d["cls/layer4/mean"]]
            arrays["norm"] += [d["norm/layer1"], d["norm/layer4"]]
            arrays["rollout"].append(d["rollout"])
    for kind, grids in arrays.items():
        scale = index["scales"][kind]
        low = 0.0 if kind != "norm" else min(float(g.min()) for g in grids)
        assert scale["vmin"] == pytest.approx(low) and scale["vmax"] == pytest.approx(max(float(g.max()) for g in grids))
    assert "norm" in index["scales"]["norm"]["label"] and "attention" in index["scales"]["cls"]["label"]
    from vsink.export.scales import Scale

    canvas = OverlayCanvas(Image.new("RGB", (60, 40)), Scale(**index["scales"]["norm"]), "magma")
    assert canvas.overlay.get_clim() == (index["scales"]["norm"]["vmin"], index["scales"]["norm"]["vmax"])
    canvas.close()


def test_per_head_grid_uses_one_scale_for_all_heads_and_images():
    from vsink.export.layer_figures import head_grid_figure
    from vsink.export.scales import shared_scale

    rng = np.random.default_rng(0)
    grids = [rng.random((3, 4, 4)) * 0.1, rng.random((3, 4, 4))]
    scale = shared_scale(grids, zero=True, label="attention share")
    fig = head_grid_figure([Image.new("RGB", (40, 30))] * 2, grids, ["a.png", "b.png"], scale, "t")
    overlays = [im for ax in fig.axes for im in ax.images[1:]]
    assert len(overlays) == 6 and {im.get_clim() for im in overlays} == {(0.0, scale.vmax)}
    plt.close(fig)


def test_dense_previews_have_a_legend_of_the_classes_in_their_masks():
    from vsink.export.dense_figures import previews_figure
    from vsink.export.views import Previews

    gt = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    predicted = np.array([[0, 3], [3, 3]], dtype=np.uint8)
    pv = Previews(ids=["a"], images=[Image.new("RGB", (8, 8))], masks=[gt], boxes=[None],
                  predicted={"baseline": [predicted]})
    fig = previews_figure(pv, 4, ["background", "square", "circle", "star"])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["background", "square", "star"]  # circle: in no mask
    plt.close(fig)
