"""Dense evaluation of one model and its variants: linear-probe segmentation, LOST, artifacts.

For each variant the backbone runs once per image of each split it needs; every feature a task
asks for (segmentation features, every LOST sweep setting, probe statistics) is captured in that
one forward pass and reduced immediately, so variants and sweeps never recompute the backbone.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..detect.norms import detect_high_norm
from ..errors import VsinkError
from ..export.views import Previews
from ..features import FEATURE_KINDS, FeatureCapture, FeatureSpec
from ..io import write_text
from ..options import Choice, Float, Int, ListOf, Option, declare
from ..layout import TokenLayout
from ..probe import Probe, Trace
from ..shard import Shard
from .artifacts import foreground_grid, foreground_share, neighbour_cosine
from .datasets import IGNORE_INDEX, DatasetError, DenseDataset, DenseSample, Loaded
from .dense_stats import Units, comparisons, intervals, mean_units, seg_units
from .lost import IOU_RULES, TIES, check_iou_rule, check_ties, is_correct, lost
from .segmentation import ProbeSettings, evaluate_linear_probe, predict, train_linear_probe
from .stats import Bootstrap
from .variants import Variant

TASKS = ("linear-seg", "lost", "artifacts")
#: the LOST sweep's settings (``vsink eval dense --lost-*``; :class:`LostSweep` checks them)
LOST = declare(
    Option("lost_layers", ListOf(Int(), nonempty=True), [-1], "LOST blocks"),
    Option("lost_kinds", ListOf(Choice(FEATURE_KINDS), nonempty=True), ["k"], "LOST features"),
    Option("lost_biases", ListOf(Float(), nonempty=True), [0.0], "LOST Gram-matrix biases"),
    Option("lost_normalize", Choice(("no", "yes", "both")), "no", "L2-normalise LOST features"),
    Option("lost_k", Int(1), 100, "LOST seed-expansion candidates"),
    Option("lost_ties", Choice(TIES), "stable", "LOST order of equal degrees (stable: patch order, the only one "
           "defined)"),
    Option("lost_iou", Choice(IOU_RULES), "exact", "CorLoc IoU: exact (IoU >= 0.5 is a hit) or reference (LOST's "
           "bbox_iou on float boxes: +1e-7 on heights and union, so exactly 0.5 is a miss)"),
)


@dataclass
class LostSettings:
    """The LOST sweep: every combination of layers × kinds × biases × normalize is evaluated;
    the first combination is the stated (primary) setting. ``ties`` is the degree order
    (:func:`~vsink.evaluate.lost.lost`), ``iou`` the CorLoc IoU rule
    (:func:`~vsink.evaluate.lost.box_iou`: ``exact`` or ``reference``)."""

    layers: Sequence[int] = (-1,)
    kinds: Sequence[str] = ("k",)
    biases: Sequence[float] = (0.0,)
    normalize: Sequence[bool] = (False,)
    k: int = 100
    ties: str = "stable"
    iou: str = "exact"

    def __post_init__(self) -> None:
        check_ties(self.ties)
        check_iou_rule(self.iou)
        self.biases = LOST["lost_biases"].check(list(self.biases), name="LOST biases")
        self.layers = LOST["lost_layers"].check(list(self.layers), name="LOST layers")
        self.k = LOST["lost_k"].check(self.k, name="LOST k")

    def combos(self, num_layers: int) -> list[tuple[FeatureSpec, float, bool]]:
        for kind in self.kinds:
            if kind not in FEATURE_KINDS:
                raise VsinkError(f"unknown LOST feature kind {kind!r}; kinds are {', '.join(FEATURE_KINDS)}")
        if not (self.layers and self.kinds and self.biases and self.normalize):
            raise VsinkError("the LOST sweep needs at least one layer, kind, bias and normalize value")
        specs = [FeatureSpec(layer, kind, norm=False).resolve(num_layers) for layer in self.layers
                 for kind in self.kinds]
        return [(spec, float(b), bool(n)) for spec, b, n in itertools.product(
            dict.fromkeys(specs), self.biases, self.normalize)]


def _combo_dict(spec: FeatureSpec, bias: float, normalize: bool) -> dict[str, Any]:
    return {"layer": spec.layer, "kind": spec.kind, "bias": bias, "normalize": normalize}


#: evaluation images kept for the report's figures
PREVIEW_IMAGES = 4
#: where a variant's result carries its per-image units until :func:`evaluate_dense` moves them out
UNITS = "_units"


@dataclass
class DenseResult:
    """Everything :func:`evaluate_dense` measured; ``variants[name][task]`` holds each task's numbers."""

    model: str
    dataset: dict[str, Any]
    tasks: list[str]
    settings: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    previews: Optional[Previews] = field(default=None, repr=False)
    #: the baseline is a synthetic demo model (its numbers say nothing about real models)
    synthetic: bool = False
    #: per variant, each headline metric's per-image units (resampled by the intervals)
    units: dict[str, dict[str, Units]] = field(default_factory=dict, repr=False)
    #: the bootstrap's settings
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    _statistics: Optional[dict[str, Any]] = field(default=None, repr=False)

    #: (task, key, label, display scale); percentages are shown with 2 decimals, the rest with 3
    HEADLINE = (("linear_seg", "miou", "linear-seg mIoU (%)", 100),
                ("linear_seg", "pixel_accuracy", "linear-seg pixel accuracy (%)", 100),
                ("lost", "corloc", "LOST CorLoc (%)", 100),
                ("artifacts", "outlier_fraction", "outlier patches, last block (%)", 100),
                ("artifacts", "outlier_fraction_max", "outlier patches, worst block (%)", 100),
                ("artifacts", "norm_ratio", "max/median patch norm, last block", 1),
                ("artifacts", "attention_entropy", "attention entropy, last block (nats)", 1),
                ("artifacts", "cls_foreground_share", "CLS attention on foreground (%)", 100),
                ("artifacts", "neighbour_cosine", "neighbour patch cosine", 1))

    @property
    def baseline(self) -> str:
        return next(iter(self.variants))

    def headline(self) -> list[tuple[str, list[Optional[float]], int]]:
        """(label, value per variant in display units, decimals shown) for each headline metric
        that was measured."""
        rows = []
        for task, key, label, scale in self.HEADLINE:
            values = [self.variants[v].get(task, {}).get(key) for v in self.variants]
            if any(v is not None for v in values):
                rows.append((label, [None if v is None else v * scale for v in values], 2 if scale == 100 else 3))
        return rows

    def headline_intervals(self) -> list[tuple[list[Optional[dict[str, float]]], list[Optional[dict[str, float]]]]]:
        """For each row of :meth:`headline`: per variant, the value's interval and (``None`` for
        the baseline) the paired interval of its difference from the baseline, in display units."""
        stats = self.statistics()
        names = list(self.variants)
        out = []
        for task, key, _, scale in self.HEADLINE:
            values = [self.variants[v].get(task, {}).get(key) for v in self.variants]
            if not any(v is not None for v in values):
                continue
            metric = f"{task}.{key}"

            def scaled(iv: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
                return None if iv is None else {k: iv[k] * scale for k in ("value", "low", "high")}

            out.append(([scaled(stats["intervals"][n].get(metric)) for n in names],
                        [None] + [scaled(stats["comparisons"][n].get(metric)) for n in names[1:]]))
        return out

    def statistics(self) -> dict[str, Any]:
        """``{"settings", "intervals": {variant: {task.key: {value, low, high}}}, "comparisons":
        {variant: {task.key: {value, low, high, n}}}}`` (:mod:`vsink.evaluate.dense_stats`),
        computed once."""
        if self._statistics is None:
            names = list(self.variants)
            base = self.units.get(names[0], {})
            self._statistics = {
                "settings": self.bootstrap.to_dict("image"),
                "intervals": {n: intervals(self.units.get(n, {}), self.bootstrap) for n in names},
                "comparisons": {n: comparisons(base, self.units.get(n, {}), self.bootstrap) for n in names[1:]}}
        return self._statistics

    def deltas(self) -> dict[str, dict[str, Optional[float]]]:
        """Headline metric minus the baseline's (raw units), per non-baseline variant."""
        base = self.variants[self.baseline]
        out: dict[str, dict[str, Optional[float]]] = {}
        for name, res in list(self.variants.items())[1:]:
            out[name] = {}
            for task, key, _, _ in self.HEADLINE:
                a, b = res.get(task, {}).get(key), base.get(task, {}).get(key)
                if a is not None or b is not None:
                    out[name][f"{task}.{key}"] = None if a is None or b is None else a - b
        return out

    def to_json(self) -> dict[str, Any]:
        stats = self.statistics()
        return {"model": self.model, "synthetic_model": self.synthetic, "dataset": self.dataset,
                "tasks": self.tasks, "settings": self.settings, "baseline": self.baseline,
                "variants": self.variants, "deltas": self.deltas(), "statistics": stats["settings"],
                "intervals": stats["intervals"], "comparisons": stats["comparisons"], "skipped": self.skipped}

    def to_markdown(self) -> str:
        from .report import dense_markdown

        return dense_markdown(self)

    def save(self, out_dir: Union[str, os.PathLike]) -> dict[str, Path]:
        """Write ``results.json``, ``results.md`` and ``results.html`` as one set with its
        ``vsink-run.json`` (:class:`vsink.outputs.OutputSet`; all three are made before any is
        written, and a failure leaves the earlier set as it was)."""
        from ..outputs import OutputSet
        from .report import dense_html

        texts = {"json": json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n",
                 "markdown": self.to_markdown(), "html": dense_html(self)}
        names = {"json": "results.json", "markdown": "results.md", "html": "results.html"}
        determining = {"model": self.model, "dataset": self.dataset, "tasks": self.tasks, "settings": self.settings,
                       "variants": list(self.variants), "statistics": self.bootstrap.to_dict("image")}
        with OutputSet(out_dir, "vsink eval dense", {"determining": determining}) as stage:
            for key, text in texts.items():
                write_text(stage / names[key], text)
        return {**{key: Path(out_dir) / name for key, name in names.items()}, "record": Path(out_dir) / "vsink-run.json"}


@dataclass
class _Batch:
    samples: list[DenseSample]
    loaded: list[Loaded]
    features: dict[FeatureSpec, torch.Tensor]
    #: the layout of the forward pass that made ``features``
    layout: TokenLayout


def supported_tasks(dataset: DenseDataset) -> list[str]:
    """The tasks a dataset's annotations allow: linear-seg needs masks, LOST needs boxes."""
    return [t for t in TASKS if (t != "linear-seg" or dataset.has_masks) and (t != "lost" or dataset.has_boxes)]


def _check_labels(sample: DenseSample, loaded: Loaded, num_classes: Optional[int]) -> None:
    if loaded.mask is None or num_classes is None:
        return
    labels = np.unique(loaded.mask)
    bad = labels[(labels != IGNORE_INDEX) & (labels >= num_classes)]
    if bad.size:
        where = sample.mask if isinstance(sample.mask, Path) else sample.id
        raise DatasetError(f"{where}: mask labels {bad.tolist()} are outside 0..{num_classes - 1} (255 = ignore)")


class _Runner:
    """One variant's backbone, run over a dataset in batches, skipping bad items. When ``skipped``
    is given (the first variant's run; later variants meet the same items) each bad item is
    appended to it and reported on stderr. ``kept[role]`` counts the items each pass used.
    ``before_batch(split, ids)`` is called before each forward pass with the batch's sample ids
    (:meth:`vsink.evaluate.variants.Variant.before_batch`).

    Under ``torchrun`` (``shard``, :mod:`vsink.shard`) each process runs its batches (batch ``b`` on
    rank ``b % N``, cut as one process cuts them), and after each round of N batches rank 0 gathers
    them and yields them in order, with the rows the ``probes`` took of each: rank 0 computes
    everything that pools over images as one process does; the other ranks yield nothing. An
    error on any process's batch stops every process at the end of its round
    (:meth:`vsink.shard.Shard.settle`)."""

    def __init__(self, name: str, backbone: Backbone, size: tuple[int, int], batch_size: int, progress: bool,
                 num_classes: Optional[int], skipped: Optional[list[dict[str, str]]], shard: Optional[Shard] = None,
                 before_batch: Optional[Callable[[str, list[str]], None]] = None):
        self.name, self.backbone, self.size, self.batch_size = name, backbone, size, batch_size
        self.before_batch = before_batch or (lambda split, ids: None)
        self.progress, self.num_classes, self.skipped = progress, num_classes, skipped
        self.shard = shard or Shard()
        self.forward_images = 0
        self.kept: dict[str, int] = {}
        self._probe_rows: list[list[Trace]] = []

    def _load(self, dataset: DenseDataset, start: int, stop: int, need: Callable[[Loaded], Optional[str]]
              ) -> tuple[list[DenseSample], list[Loaded], list[dict[str, str]]]:
        samples, loaded, skipped = [], [], []
        for sample in dataset.samples[start:stop]:
            try:
                item = sample.load()
                _check_labels(sample, item, self.num_classes)
                missing = need(item)
                if missing:
                    raise DatasetError(f"{sample.id}: {missing}")
            except DatasetError as e:
                skipped.append({"split": dataset.split, "item": sample.id, "reason": str(e)})
                continue
            samples.append(sample)
            loaded.append(item)
        return samples, loaded, skipped

    def _skip(self, entries: list[dict[str, str]], bar: tqdm) -> None:
        if self.skipped is not None:
            self.skipped.extend(entries)
            for entry in entries:
                bar.write(f"vsink: skipped {entry['reason']}", file=sys.stderr)

    def batches(self, dataset: DenseDataset, specs: Sequence[FeatureSpec], role: str,
                need: Callable[[Loaded], Optional[str]], probes: Sequence[Probe] = ()) -> Iterator[_Batch]:
        self.kept[role] = 0
        self._probe_rows = []
        bar = tqdm(total=len(dataset), desc=f"{self.name} {dataset.split}", unit="img",
                   disable=not self.progress or not self.shard.main)
        with FeatureCapture(self.backbone, specs) as capture:
            if self.shard.alone:
                for start in range(0, len(dataset), self.batch_size):
                    samples, loaded, skipped = self._load(dataset, start, start + self.batch_size, need)
                    self._skip(skipped, bar)
                    bar.update(len(dataset.samples[start:start + self.batch_size]))
                    if not samples:
                        continue
                    self.before_batch(dataset.split, [str(s.id) for s in samples])
                    self.backbone.forward(self.backbone.preprocess([x.image for x in loaded], self.size))
                    self.forward_images += len(samples)
                    self.kept[role] += len(samples)
                    yield _Batch(samples, loaded, capture.pop(), self.backbone.current_layout())
            else:
                yield from self._sharded(dataset, capture, need, role, bar, probes)
        bar.close()

    def _sharded(self, dataset: DenseDataset, capture: FeatureCapture, need: Callable[[Loaded], Optional[str]],
                 role: str, bar: tqdm, probes: Sequence[Probe]) -> Iterator[_Batch]:
        def run(span: Optional[tuple[int, int]]) -> Optional[tuple[int, list[dict[str, str]], Optional[_Batch], Any]]:
            """This process's batch of the round (None when it has none)."""
            if span is None:
                return None
            samples, loaded, skipped = self._load(dataset, *span, need)
            batch, rows = None, None
            if samples:
                self.before_batch(dataset.split, [str(s.id) for s in samples])
                self.backbone.forward(self.backbone.preprocess([x.image for x in loaded], self.size))
                features = {spec: t.cpu() for spec, t in capture.pop().items()}
                sent = [replace(s, boxes=None) for s in samples]  # read already (a reader may not pickle)
                batch = _Batch(sent, loaded, features, self.backbone.current_layout())
                rows = [probe.take() for probe in probes]
            return span[1] - span[0], skipped, batch, rows

        for _, span in self.shard.rounds(len(dataset), self.batch_size):
            pieces = self.shard.settle(lambda: run(span))  # an error on any process stops every one
            for piece in pieces or ():  # rank order is the batches' order within a round
                if piece is None:
                    continue
                count, skipped, batch, rows = piece
                self._skip(skipped, bar)
                bar.update(count)
                if batch is None:
                    continue
                batch.features = {spec: t.to(self.backbone.device) for spec, t in batch.features.items()}
                self.forward_images += len(batch.samples)
                self.kept[role] += len(batch.samples)
                self._probe_rows.append(rows)
                yield batch

    def traces(self, probes: Sequence[Probe]) -> list[Trace]:
        """What ``probes`` collected over every batch of the last pass, in order (joined from every
        rank's batches under ``torchrun``)."""
        if self.shard.alone:
            return [probe.trace() for probe in probes]
        return [Trace.join([rows[i] for rows in self._probe_rows]) for i in range(len(probes))]


def _needs(tasks: Sequence[str]) -> Callable[[Loaded], Optional[str]]:
    def need(item: Loaded) -> Optional[str]:
        if "linear-seg" in tasks and item.mask is None:
            return "no mask (linear-seg needs one)"
        if "lost" in tasks and (item.boxes is None or not len(item.boxes)):
            return "no ground-truth box (LOST needs one)"
        return None

    return need


def _infer_classes(masks: Sequence[np.ndarray]) -> int:
    top = max((int(m[m != IGNORE_INDEX].max()) for m in masks if (m != IGNORE_INDEX).any()), default=-1)
    if top < 0:
        raise VsinkError("linear-seg: every mask pixel is ignore (255); nothing to train on")
    return top + 1


def _evaluate_variant(backbone: Backbone, eval_set: DenseDataset, train_set: Optional[DenseDataset], *,
                      tasks: Sequence[str], seg_spec: FeatureSpec, lost_settings: LostSettings,
                      probe_settings: ProbeSettings, num_classes: Optional[int], runner: _Runner,
                      name: str, previews: Previews) -> dict[str, Any]:
    combos = lost_settings.combos(backbone.num_layers) if "lost" in tasks else []
    specs = list(dict.fromkeys([seg_spec] + [c[0] for c in combos]))
    timing: dict[str, float] = {}
    result: dict[str, Any] = {"edits": list(backbone.edits), "layout": None}
    units: dict[str, Units] = {}

    train_feats: list[torch.Tensor] = []
    train_masks: list[np.ndarray] = []
    if "linear-seg" in tasks:
        t0 = time.perf_counter()
        for batch in runner.batches(train_set, [seg_spec], "train", _needs(["linear-seg"])):
            train_feats.extend(batch.features[seg_spec].permute(0, 3, 1, 2))
            train_masks.extend(x.mask for x in batch.loaded)
        timing["train_features_s"] = time.perf_counter() - t0

    eval_feats: list[torch.Tensor] = []
    eval_masks: list[np.ndarray] = []
    eval_ids: list[str] = []
    hits = np.zeros(len(combos), dtype=np.int64)
    lost_images: list[dict[str, Any]] = []
    cosines: list[float] = []
    fg_grids: list[Optional[np.ndarray]] = []
    lost_time = 0.0
    t0 = time.perf_counter()
    probes: list[Probe] = []
    with ExitStack() as stack:
        if "artifacts" in tasks:
            probes = [stack.enter_context(Probe(backbone, attention=False)),
                      stack.enter_context(Probe(backbone, layers=[-1], norms=False, attention=True))]
        for batch in runner.batches(eval_set, specs, "eval", _needs(tasks), probes):
            grid = batch.layout.grid
            result["layout"] = batch.layout.describe()
            for b, (sample, item) in enumerate(zip(batch.samples, batch.loaded)):
                seg = batch.features[seg_spec][b]
                if len(previews.ids) < PREVIEW_IMAGES and sample.id not in previews.ids:
                    previews.ids.append(sample.id)
                    previews.images.append(item.image)
                    previews.masks.append(item.mask)
                    previews.boxes.append(item.boxes)
                eval_ids.append(str(sample.id))
                if "linear-seg" in tasks:
                    eval_feats.append(seg.permute(2, 0, 1))
                    eval_masks.append(item.mask)
                if "artifacts" in tasks:
                    cosines.append(neighbour_cosine(seg))
                    fg_grids.append(foreground_grid(grid, item.image.size, item.mask, item.boxes))
                if combos:
                    t1 = time.perf_counter()
                    row = {"id": sample.id}
                    for c, (spec, bias, normalize) in enumerate(combos):
                        found = lost(batch.features[spec][b], k=lost_settings.k, bias=bias, normalize=normalize,
                                     ties=lost_settings.ties)
                        box = found.to_pixels(grid, item.image.size)
                        correct = is_correct(box, item.boxes, iou=lost_settings.iou)
                        hits[c] += correct
                        if c == 0:
                            row.update(box=[round(float(v), 2) for v in box], seed=list(found.seed), correct=correct)
                    lost_images.append(row)
                    lost_time += time.perf_counter() - t1
    timing["eval_pass_s"] = time.perf_counter() - t0
    timing["forward_images"] = runner.forward_images

    if combos and lost_images:
        n = len(lost_images)
        sweep = [{**_combo_dict(*c), "corloc": float(h / n)} for c, h in zip(combos, hits)]
        best = max(sweep, key=lambda r: r["corloc"])
        result["lost"] = {"setting": {k: v for k, v in sweep[0].items() if k != "corloc"}, "k": lost_settings.k,
                          "ties": lost_settings.ties, "iou": lost_settings.iou,
                          "corloc": sweep[0]["corloc"], "n": n, "sweep": sweep, "best_on_eval_set": best,
                          "images": lost_images}
        timing["lost_s"] = lost_time
        previews.lost[name] = [row["box"] for row in lost_images[:len(previews.ids)]]
        units.update(mean_units("lost.corloc", [str(r["id"]) for r in lost_images],
                                [float(r["correct"]) for r in lost_images]))
        timing["lost_runs_per_s"] = n * len(combos) / lost_time if lost_time > 0 else None
    if "linear-seg" in tasks and train_feats and eval_feats:
        classes = num_classes or _infer_classes(train_masks + eval_masks)
        t0 = time.perf_counter()
        head, losses = train_linear_probe(torch.stack(train_feats), train_masks, classes, probe_settings,
                                          progress=runner.progress)
        timing["linear_probe_train_s"] = time.perf_counter() - t0
        confusions: list[np.ndarray] = []
        metrics = evaluate_linear_probe(head, torch.stack(eval_feats), eval_masks, classes, per_image=confusions)
        units.update(seg_units(eval_ids, confusions))
        previews.predicted[name] = [predict(head, f, m.shape) for f, m in
                                    zip(eval_feats[:len(previews.ids)], eval_masks[:len(previews.ids)])]
        result["linear_seg"] = {**metrics.to_dict(), "num_classes": classes, "feature": seg_spec.describe(),
                                "n_train": len(train_feats), "n_eval": len(eval_feats), "train_loss": losses}
    if probes and cosines:
        result["artifacts"] = _artifacts(runner.traces(probes), cosines, fg_grids, eval_ids, units)
    result["timing"] = timing
    result[UNITS] = units
    return result


def _artifacts(traces: list[Trace], cosines: list[float], fg_grids: list[Optional[np.ndarray]],
               ids: list[str], units: dict[str, Units]) -> dict[str, Any]:
    norms_trace, attn_trace = traces
    hn = detect_high_norm(norms_trace)
    last = hn.layers[-1]
    worst = max(hn.layers, key=lambda s: s.outlier_fraction)
    layout = attn_trace.layout
    shares = []
    per_image_share: list[Optional[float]] = [None] * len(ids)
    if attn_trace.attn_cls is not None:
        cls_maps = layout.patch_grid(attn_trace.attn_cls[0].mean(axis=1), dim=1)  # [I, h, w]
        per_image_share = [foreground_share(m, fg) if fg is not None else None for m, fg in zip(cls_maps, fg_grids)]
        shares = [v for v in per_image_share if v is not None]
    units.update(mean_units("artifacts.outlier_fraction", ids, hn.mask(last.index).mean(axis=1).tolist()))
    units.update(mean_units("artifacts.outlier_fraction_max", ids, hn.mask(worst.index).mean(axis=1).tolist()))
    units.update(mean_units("artifacts.attention_entropy", ids, attn_trace.attn_entropy[0].mean(axis=-1).tolist()))
    units.update(mean_units("artifacts.cls_foreground_share", ids, per_image_share))
    units.update(mean_units("artifacts.neighbour_cosine", ids, cosines))
    paired = [c for c in cosines if np.isfinite(c)]  # a 1x1 patch grid has no neighbours (NaN)
    return {
        "n": len(cosines),
        "outlier_fraction": last.outlier_fraction,
        "outlier_fraction_max": worst.outlier_fraction,
        "outlier_layer_max": worst.index,
        "emergence_layer": hn.emergence_layer,
        "threshold_last": last.threshold,
        "norm_ratio": last.ratio,
        "norm_ratio_max": max(s.ratio for s in hn.layers),
        "attention_entropy": float(attn_trace.attn_entropy[0].mean()),
        "cls_foreground_share": float(np.mean(shares)) if shares else None,
        "neighbour_cosine": float(np.mean(paired)) if paired else None,
        "per_layer": [{"layer": s.index, "outlier_fraction": s.outlier_fraction, "norm_ratio": s.ratio}
                      for s in hn.layers],
    }


def evaluate_dense(
    backbone: Backbone,
    eval_set: DenseDataset,
    *,
    train_set: Optional[DenseDataset] = None,
    tasks: Optional[Sequence[str]] = None,
    variants: Optional[Sequence[Variant]] = None,
    seg_layer: int = -1,
    lost_settings: Optional[LostSettings] = None,
    probe_settings: Optional[ProbeSettings] = None,
    num_classes: Optional[int] = None,
    batch_size: int = 8,
    img_size: Optional[int] = None,
    load_kwargs: Optional[dict[str, Any]] = None,
    progress: bool = True,
    bootstrap: Optional[Bootstrap] = None,
    shard: Optional[Shard] = None,
) -> Optional[DenseResult]:
    """Evaluate ``backbone`` and its ``variants`` on dense tasks.

    Args:
        backbone: the base model (from :func:`vsink.load` / :func:`vsink.wrap`).
        eval_set: the evaluation split (LOST, artifacts, linear-seg evaluation).
        train_set: the split the linear head is trained on (needed for ``linear-seg``).
        tasks: any of ``linear-seg``, ``lost``, ``artifacts`` (default: those the evaluation set
            supports, see :func:`supported_tasks`).
        variants: default ``[baseline]``; the first is the baseline deltas are taken against.
        seg_layer: block whose output (after the final norm) feeds the linear head and the
            neighbour-cosine metric (default: last).
        lost_settings: the LOST sweep (default: last block keys, bias 0, not normalised, k = 100).
        probe_settings: linear-head training.
        num_classes: classes of the masks (default: the dataset's, else inferred from the masks).
        batch_size: images per forward pass.
        img_size: square input size (default: the model's).
        load_kwargs: device/dtype/... for variants that load another model spec.
        progress: show progress bars.
        bootstrap: settings of the intervals and paired differences (:mod:`vsink.evaluate.dense_stats`;
            default 95 %, 1,000 resamples, seed 0).
        shard: this process's place under ``torchrun`` (:mod:`vsink.shard`): each process extracts
            the features of its batches, rank 0 gathers them in order, fits the linear head, runs
            LOST and pools the artifact metrics, and returns the result (equal to one process's,
            timings aside); the other ranks return None.
    """
    tasks = list(dict.fromkeys(tasks if tasks is not None else supported_tasks(eval_set)))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise VsinkError(f"unknown task(s) {', '.join(unknown) or '(none)'}; tasks are {', '.join(TASKS)}")
    if batch_size < 1:
        raise VsinkError(f"batch_size must be >= 1, got {batch_size}")
    if "linear-seg" in tasks:
        if train_set is None:
            raise VsinkError("linear-seg needs a training split (train_set)")
        if train_set.info.get("flat") and eval_set.info.get("flat"):
            raise VsinkError(f"linear-seg: {train_set.name} has no train/val subfolders (images/train, "
                             "images/val); training and evaluating on the same images is not a probe")
    if "lost" in tasks and not eval_set.has_boxes:
        raise DatasetError(f"LOST needs ground-truth boxes; {eval_set.describe()}")
    if "linear-seg" in tasks and not (eval_set.has_masks and train_set.has_masks):
        raise DatasetError(f"linear-seg needs masks; {eval_set.describe()}")
    variants = list(variants or [Variant("baseline")])
    for variant in variants:
        variant.check(backbone)  # a bad weights file or model spec fails now, not after the baseline
    lost_settings = lost_settings or LostSettings()
    probe_settings = probe_settings or ProbeSettings()
    classes = num_classes or eval_set.num_classes
    size = (img_size, img_size) if img_size else backbone.img_size
    skipped: list[dict[str, str]] = []
    out: dict[str, dict[str, Any]] = {}
    units: dict[str, dict[str, Units]] = {}
    previews = Previews()
    kept: dict[str, int] = {}
    for variant in variants:
        with variant.open(backbone, img_size=img_size, **(load_kwargs or {})) as vb:
            vb.check_input_size(size)
            runner = _Runner(variant.name, vb, size, batch_size, progress, classes, None if out else skipped, shard,
                             variant.before_batch)
            res = _evaluate_variant(vb, eval_set, train_set, tasks=tasks, seg_spec=FeatureSpec(seg_layer),
                                    lost_settings=lost_settings, probe_settings=probe_settings,
                                    num_classes=classes, runner=runner, name=variant.name, previews=previews)
            units[variant.name] = res.pop(UNITS)
            out[variant.name] = {"description": variant.describe(), "model": vb.spec, **res}
            kept = kept or runner.kept
    if shard is not None and not shard.main:
        return None
    if not any(k in r for r in out.values() for k in ("linear_seg", "lost", "artifacts")):
        raise VsinkError(f"nothing could be evaluated: {len(skipped)} items skipped "
                         f"(first: {skipped[0]['reason'] if skipped else 'none'})")
    settings = {"input_size": list(size), "batch_size": batch_size, "seg_feature": FeatureSpec(seg_layer).describe(),
                "lost": {"layers": list(lost_settings.layers), "kinds": list(lost_settings.kinds),
                         "biases": [float(b) for b in lost_settings.biases],
                         "normalize": [bool(n) for n in lost_settings.normalize], "k": lost_settings.k,
                         "ties": lost_settings.ties, "iou": lost_settings.iou}
                if "lost" in tasks else None,
                "linear_probe": vars(probe_settings) if "linear-seg" in tasks else None,
                "device": str(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch.")}
    dataset = {"name": eval_set.name, "format": eval_set.format, "split": eval_set.split,
               "images": len(eval_set), "images_evaluated": kept["eval"],
               "train_split": train_set.split if train_set else None,
               "train_images": len(train_set) if train_set else None, "train_images_used": kept.get("train"),
               "num_classes": classes,
               "class_names": eval_set.class_names, "info": eval_set.info}
    return DenseResult(model=backbone.spec, synthetic=backbone.synthetic is not None, dataset=dataset, tasks=tasks, settings=settings, variants=out,
                       skipped=skipped, previews=previews, units=units, bootstrap=bootstrap or Bootstrap())
