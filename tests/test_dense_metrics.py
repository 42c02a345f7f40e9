"""Segmentation metrics, LOST and artifact metrics against independent references and hand values."""

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from vsink.data.synthetic import synthetic_dataset
from vsink.errors import VsinkError
from vsink.evaluate.artifacts import foreground_grid, foreground_share, neighbour_cosine
from vsink.evaluate.lost import LostBox, box_iou, corloc, is_correct, lost
from vsink.evaluate.segmentation import (ProbeSettings, confusion_matrix, evaluate_linear_probe, seg_metrics,
                                         train_linear_probe)


def _random_masks(rng, n=5, classes=6):
    """Predictions and targets over several images of different sizes; class 4 absent from both,
    class 5 only predicted; about 10% ignore pixels."""
    preds, targets = [], []
    for i in range(n):
        shape = (7 + i, 11 - i)
        t = rng.choice([0, 1, 2, 3], size=shape)
        t[rng.random(shape) < 0.1] = 255
        p = rng.choice([0, 1, 2, 3, 5], size=shape)
        preds.append(p)
        targets.append(t)
    return preds, targets


def test_miou_equals_sklearn_reference():
    rng = np.random.default_rng(0)
    preds, targets = _random_masks(rng)
    conf = sum(confusion_matrix(p, t, 6) for p, t in zip(preds, targets))
    metrics = seg_metrics(conf)

    t_all = np.concatenate([t.ravel() for t in targets])
    p_all = np.concatenate([p.ravel() for p in preds])
    keep = t_all != 255
    ref = sk_confusion(t_all[keep], p_all[keep], labels=list(range(6)))
    assert np.array_equal(conf, ref)
    iou = jaccard_score(t_all[keep], p_all[keep], labels=[0, 1, 2, 3, 5], average=None)
    assert metrics.per_class_iou[4] is None  # absent from labels and predictions: no IoU
    assert metrics.per_class_iou[5] == 0.0  # predicted but never true: IoU 0, counted in the mean
    np.testing.assert_allclose([metrics.per_class_iou[c] for c in (0, 1, 2, 3, 5)], iou)
    assert metrics.miou == pytest.approx(iou.mean())
    assert metrics.pixel_accuracy == pytest.approx((t_all[keep] == p_all[keep]).mean())
    assert metrics.labelled_pixels == keep.sum()


def test_miou_hand_values():
    target = np.array([[0, 0, 1, 255], [1, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 2], [1, 1, 2, 0]])
    m = seg_metrics(confusion_matrix(pred, target, 3))
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 3, fp 1 -> 3/4; class 2: tp 1, fn 1 -> 1/2
    assert m.per_class_iou == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert m.pixel_accuracy == pytest.approx(5 / 7)


def test_confusion_rejects_out_of_range_labels():
    from vsink.errors import VsinkError

    with pytest.raises(VsinkError, match="outside 0..2"):
        confusion_matrix(np.zeros(3), np.array([0, 3, 255]), 3)


def test_linear_probe_learns_separable_features():
    """Features that carry the class on a grid: the trained head segments the upsampled masks."""
    rng = np.random.default_rng(1)
    feats, masks = [], []
    for _ in range(6):
        labels = rng.integers(0, 3, size=(4, 4))
        f = torch.from_numpy(np.eye(3)[labels]).permute(2, 0, 1).float() + 0.05 * torch.randn(3, 4, 4)
        feats.append(torch.cat([f, torch.randn(2, 4, 4)]))
        masks.append(np.kron(labels, np.ones((8, 8), dtype=np.int64)).astype(np.uint8))
    masks[0][:3] = 255
    head, losses = train_linear_probe(torch.stack(feats), masks, 3, ProbeSettings(epochs=150, lr=0.05, batch_size=3))
    assert losses[-1] < 0.5 * losses[0]
    metrics = evaluate_linear_probe(head, torch.stack(feats), masks, 3)
    assert metrics.pixel_accuracy > 0.8  # bilinear upsampling blurs patch borders; the interiors are right


def _planted_grid(h=7, w=9, obj=(2, 5, 3, 7), extra=None):
    """Background patches share vector b; object patches share o with o.b < 0 (LOST's premise)."""
    b = torch.tensor([1.0, 0.0, 0.2])
    o = torch.tensor([-0.5, 1.0, 0.0])
    f = b.repeat(h, w, 1)
    r0, r1, c0, c1 = obj
    f[r0:r1, c0:c1] = o
    if extra is not None:
        er0, er1, ec0, ec1 = extra
        f[er0:er1, ec0:ec1] = o
    return f


def test_lost_returns_the_planted_object():
    found = lost(_planted_grid())
    assert found.box == (3, 2, 7, 5)  # x0, y0, x1, y1 in patches, exclusive
    assert found.seed == (2, 3)  # the first object patch: lowest degree, ties kept in order


def test_lost_keeps_only_the_seed_component():
    """A second, disconnected object with the same features: its patches enter M, but the box is
    the 4-connected component containing the seed (the larger object has the larger degree)."""
    f = _planted_grid(obj=(0, 2, 0, 2), extra=(4, 7, 4, 9))
    found = lost(f, k=100)
    assert found.seed == (0, 0)
    assert found.box == (0, 0, 2, 2)


def test_lost_bias_and_normalize():
    f = _planted_grid()
    # a bias above |o.b| makes every pair similar: degrees tie, the seed is patch 0, M > 0 everywhere
    assert lost(f, bias=1.0).box == (0, 0, 9, 7)
    assert lost(f * 10, normalize=True).box == lost(f).box


def test_lost_box_to_pixels_scales_and_clips():
    box = LostBox((3, 2, 7, 5), (2, 3))
    np.testing.assert_allclose(box.to_pixels((7, 9), (900, 350)), [300, 100, 700, 250])
    np.testing.assert_allclose(LostBox((0, 0, 9, 7), (0, 0)).to_pixels((7, 9), (90, 70)), [0, 0, 90, 70])


def test_box_iou_and_corloc_hand_values():
    assert box_iou([0, 0, 10, 10], [[5, 0, 15, 10], [20, 20, 30, 30]]) == pytest.approx([50 / 150, 0])
    assert is_correct(np.array([0, 0, 10, 10]), np.array([[0, 0, 10, 20], [50, 50, 60, 60]]))  # IoU exactly 0.5
    assert not is_correct(np.array([0, 0, 10, 10]), np.array([[0, 0, 10, 21]]))
    assert corloc([np.array([0, 0, 4, 4]), np.array([0, 0, 4, 4])],
                  [np.array([[0, 0, 4, 4]]), np.array([[10, 10, 20, 20]])]) == 0.5


def test_reference_iou_rule_by_hand():
    """LOST's bbox_iou adds eps = 1e-7 to each box height and to the union. Boxes (0, 0, 32, 32) and
    (0, 0, 32, 64): intersection 1024, exact union 2048, IoU exactly 0.5 (a hit); the reference
    union is 32·(32 + eps) + 32·(64 + eps) − 1024 + eps = 2048 + 65·eps, so its IoU falls just
    below 0.5: a miss."""
    pred, gt = np.array([0, 0, 32, 32.0]), np.array([[0, 0, 32, 64.0]])
    assert box_iou(pred, gt)[0] == 0.5 and is_correct(pred, gt)
    ref = box_iou(pred, gt, "reference")[0]
    assert ref == pytest.approx(1024 / (2048 + 65e-7), rel=1e-12) and ref < 0.5
    assert not is_correct(pred, gt, iou="reference")
    # IoU 100 / 199 ≈ 0.5025, far above the eps shift: a hit under both rules
    assert is_correct(np.array([0, 0, 10, 10.0]), np.array([[0, 0, 10, 19.9]]), iou="reference")
    assert corloc([pred, pred], [gt, np.array([[0, 0, 32, 32]])], iou="reference") == 0.5
    assert corloc([pred, pred], [gt, np.array([[0, 0, 32, 32]])]) == 1.0
    with pytest.raises(VsinkError, match="iou: use one of exact, reference"):
        box_iou(pred, gt, "strict")


def test_lost_ties_keep_patch_order():
    """2x2 grid, patches 0, 1 = e0 and 2, 3 = e1: each patch is similar to exactly one other, so
    all four degrees tie at 1. Stable order: seed = patch 0, S = {0, 1}, M = A[0] + A[1] =
    [2, 2, 0, 0], box = row 0. An order starting at patch 2 or 3 would give row 1."""
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    for grid in (f, f.flip(0)):
        found = lost(grid)
        assert found.seed == (0, 0) and found.box == (0, 0, 2, 1)
    with pytest.raises(VsinkError, match="ties: only 'stable' is defined"):
        lost(f, ties="reference")


def _oracle_features(mask, boxes, grid):
    """Features from the annotation: background e0; object i = e_{i+1} - a * sum_{j!=i} e_{j+1} - 0.1 e0,
    so objects are dissimilar to the background and to each other. A patch belongs to object i when
    its centre is in box i and it holds foreground pixels."""
    h, w = grid
    n = len(boxes)
    fg = foreground_grid(grid, (mask.shape[1], mask.shape[0]), mask)
    a = 1.0 / max(n, 1)
    feats = torch.zeros(h, w, n + 1)
    feats[..., 0] = 1.0
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    for r in range(h):
        for c in range(w):
            cy, cx = (r + 0.5) * sy, (c + 0.5) * sx
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                if x0 <= cx < x1 and y0 <= cy < y1 and fg[r, c] > 0:
                    v = -a * torch.ones(n + 1)
                    v[0] = -0.1
                    v[i + 1] = 1.0
                    feats[r, c] = v
    return feats


def test_corloc_with_oracle_features_on_synthetic_is_100_percent():
    data = synthetic_dataset("val", num_images=24, seed=3)
    preds, gts = [], []
    for sample in data.samples:
        item = sample.load()
        grid = (14, 14)
        found = lost(_oracle_features(item.mask, item.boxes, grid))
        preds.append(found.to_pixels(grid, item.image.size))
        gts.append(item.boxes)
    assert corloc(preds, gts) == 1.0


def test_neighbour_cosine_hand_values():
    g = torch.zeros(2, 2, 2)
    g[0, 0] = g[0, 1] = g[1, 0] = torch.tensor([1.0, 0.0])
    g[1, 1] = torch.tensor([0.0, 1.0])
    # pairs: (00,01)=1, (10,11)=0 horizontally; (00,10)=1, (01,11)=0 vertically
    assert neighbour_cosine(g) == pytest.approx(0.5)


def test_foreground_grid_and_share():
    mask = np.zeros((4, 8), dtype=np.uint8)
    mask[:, :2] = 3
    mask[0, 2:4] = 255  # ignore is not foreground
    fg = foreground_grid((2, 2), (8, 4), mask)
    np.testing.assert_allclose(fg, [[0.5, 0.0], [0.5, 0.0]])
    boxes_fg = foreground_grid((2, 2), (8, 4), boxes=np.array([[4, 0, 8, 2]]))
    np.testing.assert_allclose(boxes_fg, [[0.0, 1.0], [0.0, 0.0]])
    assert foreground_grid((2, 2), (8, 4)) is None
    attn = np.array([[0.2, 0.1], [0.3, 0.4]])
    assert foreground_share(attn, fg) == pytest.approx((0.1 + 0.15) / 1.0)


def test_probe_loss_over_masks_of_different_sizes():
    """First-epoch loss (one minibatch, initial weights) equals per-image cross-entropy summed
    over labelled pixels of masks of different sizes, divided by their count."""
    import torch.nn.functional as F

    from vsink.evaluate.segmentation import LinearHead

    rng = np.random.default_rng(2)
    feats = torch.randn(4, 5, 3, 3)
    masks = [rng.integers(0, 3, size=s).astype(np.uint8) for s in [(16, 16), (24, 20), (16, 16), (7, 30)]]
    masks[1][:5] = 255
    _, losses = train_linear_probe(feats, masks, 3, ProbeSettings(epochs=1, batch_size=4, seed=5))
    torch.manual_seed(5)
    head = LinearHead(5, 3).train()
    logits = head(feats)
    total, count = 0.0, 0
    for i, m in enumerate(masks):
        up = F.interpolate(logits[i:i + 1], size=m.shape, mode="bilinear", align_corners=False)
        t = torch.from_numpy(m.astype(np.int64))[None]
        total += F.cross_entropy(up, t, ignore_index=255, reduction="sum").item()
        count += int((t != 255).sum())
    assert losses[0] == pytest.approx(total / count, rel=1e-5)
