"""Intervals and paired differences of the dense evaluation: mIoU and CorLoc units against scipy's
bootstrap over images of the metrics' own functions; the demo model end to end (every reported
number but the pooled norm ratio has an interval, the per-image units add up to the reported
values, the planted outliers' removal is a difference whose interval excludes 0)."""

import json

import numpy as np
import pytest
import scipy.stats

import vsink
from vsink.data import demo_model
from vsink.data.synthetic import synthetic_dataset
from vsink.evaluate.dense import evaluate_dense
from vsink.evaluate.dense_stats import comparisons, intervals, mean_units, seg_units
from vsink.evaluate.segmentation import seg_metrics
from vsink.evaluate.stats import Bootstrap, excludes_zero
from vsink.evaluate.variants import parse_variants
from vsink.registers import NeuronSpec, RegisterNeuron

SETTINGS = Bootstrap(0.95, 300, 2)


def confusions():
    rng = np.random.default_rng(0)
    out = [rng.integers(0, 20, (3, 3)) for _ in range(6)]
    out[2][2] = 0  # class 2 neither true nor predicted in image 2 ...
    out[2][:, 2] = 0
    return out


def test_miou_interval_equals_scipy_over_seg_metrics():
    confs = confusions()
    ids = [f"img{i}" for i in range(6)]
    got = intervals(seg_units(ids, confs), SETTINGS)
    # the reference: scipy resamples image indices, and seg_metrics scores the summed confusion matrix
    stack = np.stack(confs)

    def miou(idx, axis=-1):
        return np.array([seg_metrics(stack[row].sum(0)).miou for row in np.atleast_2d(idx)])

    ref = scipy.stats.bootstrap((np.arange(6),), miou, n_resamples=300, method="percentile",
                                rng=np.random.default_rng(2), vectorized=True)
    assert got["linear_seg.miou"]["value"] == pytest.approx(seg_metrics(stack.sum(0)).miou)
    assert (got["linear_seg.miou"]["low"], got["linear_seg.miou"]["high"]) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high))
    assert got["linear_seg.pixel_accuracy"]["value"] == pytest.approx(seg_metrics(stack.sum(0)).pixel_accuracy)


def test_a_class_absent_from_a_resample_leaves_the_mean():
    # image a: class 0 only, all right; image b: class 1 only, half right (IoU 1/2 on class 1,
    # and class 0 gets b's wrong pixels as predictions: IoU of class 0 = 4 / (4 + 2) over both).
    a = np.array([[4, 0], [0, 0]])
    b = np.array([[0, 0], [2, 2]])
    units = seg_units(["a", "b"], [a, b])["linear_seg.miou"]
    # the resample {a, a}: class 1 has no union, so mIoU is class 0's IoU alone, 1 (not (1 + 0) / 2)
    assert units.statistic(units.rows[[0, 0]].sum(0))[0] == 1.0
    # {b, b}: class 0 IoU 0 / 4 = 0, class 1 IoU 4 / 8 = 1/2: mIoU 1/4
    assert units.statistic(units.rows[[1, 1]].sum(0))[0] == 0.25
    assert units.statistic(units.rows.sum(0))[0] == pytest.approx(seg_metrics(a + b).miou)


def test_corloc_paired_difference_equals_scipy():
    base = np.array([1, 0, 0, 1, 0, 1, 0, 0, 1, 0], dtype=float)
    other = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=float)
    ids = [str(i) for i in range(10)]
    cmp = comparisons(mean_units("lost.corloc", ids, base), mean_units("lost.corloc", ids[::-1], other[::-1]),
                      SETTINGS)["lost.corloc"]  # paired by id, whatever the order
    ref = scipy.stats.bootstrap((base, other), lambda u, v, axis=-1: v.mean(axis) - u.mean(axis), paired=True,
                                n_resamples=300, method="percentile", rng=np.random.default_rng(2), vectorized=True)
    assert cmp["value"] == pytest.approx(0.3) and cmp["n"] == 10
    assert (cmp["low"], cmp["high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_images_without_a_value_are_left_out():
    units = mean_units("artifacts.cls_foreground_share", ["a", "b", "c"], [0.5, None, float("nan")])
    assert units["artifacts.cls_foreground_share"].ids == ["a"]
    assert mean_units("x", ["a"], [None]) == {}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("ttr") / "neurons.json"
    NeuronSpec("demo", [RegisterNeuron(demo_model.PLANTED_BLOCK, n, 1.0) for n in demo_model.PLANTED_NEURONS]).save(path)
    val = synthetic_dataset("val", num_images=6)
    return evaluate_dense(vsink.load("demo"), val, tasks=["lost", "artifacts"],
                          variants=parse_variants([f"ttr={path}"]), progress=False, bootstrap=SETTINGS)


def test_dense_results_carry_intervals_and_paired_differences(dense, tmp_path):
    data = dense.to_json()
    assert data["statistics"] == {"method": "percentile bootstrap", "level": 0.95, "resamples": 300, "seed": 2,
                                  "unit": "image"}
    base = data["intervals"]["baseline"]
    expected = {"lost.corloc", "artifacts.outlier_fraction", "artifacts.outlier_fraction_max",
                "artifacts.attention_entropy", "artifacts.cls_foreground_share", "artifacts.neighbour_cosine"}
    assert set(base) == expected  # the pooled norm ratio has none
    for metric, iv in base.items():
        task, key = metric.split(".")
        # the per-image units add up to the number the evaluation reports
        assert iv["value"] == pytest.approx(data["variants"]["baseline"][task][key]), metric
        assert iv["low"] <= iv["value"] <= iv["high"]
    # the demo plants high-norm patches in every image; test-time registers remove them from the
    # patches, so every resample's outlier share drops: the interval excludes 0
    drop = data["comparisons"]["ttr"]["artifacts.outlier_fraction"]
    assert drop["value"] < 0 and excludes_zero(drop["low"], drop["high"]) and drop["n"] == 6
    paths = dense.save(tmp_path)
    md = paths["markdown"].read_text()
    assert "Intervals: 95 % percentile bootstrap over images, 300 resamples, seed 2" in md
    row = next(line for line in md.splitlines() if line.startswith("| outlier patches, last block"))
    assert row.count("[") == 3  # baseline interval; ttr interval and its difference's interval
    assert "Intervals: 95 %" in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["comparisons"]["ttr"]["artifacts.outlier_fraction"] == drop
