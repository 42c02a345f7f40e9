"""``vsink.scan``: run a probe over images, detect high-norm tokens and attention sinks, report."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .arguments import images_arg, index_list_arg, int_arg
from .manifest import weights_fingerprint
from .version import __version__
from .backbones.base import Backbone, backbone_arg
from .detect import (AttentionSink, HighNormResult, MassiveActivation, detect_high_norm, detect_massive,
                     detect_sinks, layer_attention_summary, massive_summary)
from .attention_variants import attention_report
from .errors import VsinkError
from .images import ImageSource, NamedImage, load_batch
from .io import write_text
from .layout import TokenLayout
from .options import BATCH, THRESHOLD, Float, Option, declare
from .probe import Probe, Trace
from .shard import Shard
from .viewbox import ViewBox


MAX_MASSIVE_ENTRIES = 200
#: scan.json lists at most this many outlier tokens and sinks (strongest first); trace.npz has all
MAX_TOKEN_ENTRIES = 1000
MAX_SINK_ENTRIES = 1000
MASSIVE_TOP_K = 4


class NothingScanned(VsinkError):
    """No image could be scanned; ``skipped`` lists why."""

    def __init__(self, skipped: list[dict[str, str]]):
        self.skipped = skipped
        reasons = "; ".join(s["reason"] for s in skipped[:5])
        super().__init__(f"no image could be scanned ({len(skipped)} skipped: {reasons})")


#: the checked arguments of :func:`scan` (``vsink scan`` adds its output and LVLM flags)
SCAN = declare(
    BATCH,
    THRESHOLD,
    Option("sink_ratio", Float(0, min_open=True), 5.0, "sink = share of received attention >= this x the median share"),
)


def parse_threshold(value: Union[str, float, None]) -> dict[str, Any]:
    """``"auto"`` | ``"sigma:K"`` | a number (absolute norm) → keyword arguments of :func:`detect_high_norm`;
    NaN, infinity, a negative K and a norm <= 0 are refused."""
    from .options import Invalid, Threshold

    try:
        return Threshold().detect_kwargs(value)
    except Invalid:
        raise VsinkError(f"threshold {value!r} is not {Threshold().describe()}") from None


@dataclass
class ScanResult:
    """What :func:`scan` found; ``to_json()`` is the ``scan.json`` schema (docs/scan-json.md).

    ``sinks`` holds every (image, token, block) sink entry, strongest first: largest share of
    received attention first (entries of equal share in block, then image order), so
    ``result.sinks[:3]`` are the three strongest.
    """

    model: str
    synthetic: bool
    input_size: tuple[int, int]
    images: list[str]
    skipped: list[dict[str, str]]
    trace: Trace
    high_norm: HighNormResult
    sinks: list[AttentionSink]
    attention: list[dict[str, Any]]
    massive: list[MassiveActivation]
    settings: dict[str, Any]
    thumbnails: list[Image.Image] = field(default_factory=list, repr=False)
    #: :func:`vsink.manifest.weights_fingerprint` of the scanned model (recorded in ``vsink-run.json``)
    weights: Optional[str] = None
    #: per scanned image: its ``(width, height)`` and the region the model saw (:mod:`vsink.viewbox`)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    view_boxes: list[ViewBox] = field(default_factory=list)
    #: the weight-only defect direction beside the observed one (``vsink scan --defect``), or None
    defect: Optional[Any] = None

    def __post_init__(self) -> None:
        self.sinks = sorted(self.sinks, key=lambda s: -s.share)  # stable: ties keep block, then image order

    @property
    def layout(self) -> TokenLayout:
        return self.trace.layout

    def per_image(self) -> list[dict[str, Any]]:
        """What each image holds: its size and view box, its high-norm tokens (distinct tokens at
        the emergence block, entries over all blocks, the blocks where it has any) and its
        attention-sink entries (over all blocks, and distinct tokens)."""
        hn, out = self.high_norm, []
        table = hn.outliers
        at_emergence = hn.mask(hn.emergence_layer).sum(axis=1) if hn.emergence_layer is not None else None
        for i, name in enumerate(self.images):
            mine = table.image == i
            sinks = [s for s in self.sinks if s.image == i]
            entry: dict[str, Any] = {"image": name}
            if i < len(self.image_sizes):
                entry["size"] = [int(v) for v in self.image_sizes[i]]
            if i < len(self.view_boxes):
                entry["view_box"] = self.view_boxes[i].to_list()
            entry.update({
                "high_norm_tokens": int(at_emergence[i]) if at_emergence is not None else 0,
                "high_norm_entries": int(mine.sum()),
                "high_norm_layers": sorted({int(v) for v in table.layer[mine]}),
                "max_norm": float(table.norm[mine].max()) if mine.any() else None,
                "uniform_high_norm_block": next((u["layer"] for u in hn.uniform if u["image"] == i), None),
                "sink_entries": len(sinks),
                "sink_tokens": len({s.token for s in sinks}),
            })
            out.append(entry)
        return out

    def to_json(self) -> dict[str, Any]:
        layers = [
            {"index": n.index,
             "norm": {k: v for k, v in n.to_dict().items() if k != "index"},
             "attention": {k: v for k, v in a.items() if k != "index"},
             "massive": {k: v for k, v in m.items() if k != "index"}}
            for n, a, m in zip(self.high_norm.layers, self.attention, massive_summary(self.trace, self.massive))
        ]
        strongest = sorted(self.massive, key=lambda m: -m.ratio)[:MAX_MASSIVE_ENTRIES]
        sinks = self.sinks[:MAX_SINK_ENTRIES]
        total = len(self.high_norm.outliers)
        return {
            "vsink_version": __version__,
            "model": self.model,
            "synthetic": self.synthetic,
            "input_size": list(self.input_size),
            "layout": self.layout.to_dict(),
            "images": self.images,
            "skipped": self.skipped,
            "per_image": self.per_image(),
            "layers": layers,
            "high_norm": {
                "method": self.high_norm.method,
                "settings": self.high_norm.settings,
                "emergence_layer": self.high_norm.emergence_layer,
                "tokens_total": total,
                "tokens_omitted": max(0, total - MAX_TOKEN_ENTRIES),
                "tokens": [t.to_dict() for t in self.high_norm.strongest(MAX_TOKEN_ENTRIES)],
                "uniform": [{**u, "image": self.images[u["image"]]} for u in self.high_norm.uniform],
            },
            "sinks_total": len(self.sinks),
            "sinks_omitted": max(0, len(self.sinks) - MAX_SINK_ENTRIES),
            "sinks": [s.to_dict() for s in sinks],
            "massive": [m.to_dict() for m in strongest],
            "settings": self.settings,
            **({"defect": self.defect.to_json()} if self.defect is not None else {}),
        }

    def save(self, out_dir: Union[str, os.PathLike]) -> dict[str, Path]:
        """Write ``scan.json``, ``report.html`` and ``trace.npz`` (the trace plus every outlier token,
        as arrays ``outlier_image``, ``outlier_layer``, ``outlier_token``, ``outlier_norm``, and the
        report images as ``thumbnails`` uint8 [images, H, W, 3]) into ``out_dir`` as one set with its
        ``vsink-run.json`` (:class:`vsink.outputs.OutputSet`): a failure or an interruption leaves the
        earlier set in ``out_dir`` as it was."""
        from .export.report import render_scan_report
        from .outputs import OutputSet

        report = render_scan_report(self)  # both can fail: before anything is written
        summary = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        extra = self.high_norm.outliers.arrays("outlier")
        if self.thumbnails:  # the report images, for ``vsink view``
            extra.update(stack_thumbnails(self.thumbnails))
        with OutputSet(out_dir, "vsink scan", {"determining": self.determining()}) as stage:
            self.trace.save(stage / "trace.npz", extra=extra)
            write_text(stage / "report.html", report)
            write_text(stage / "scan.json", summary)
        out = Path(out_dir)
        return {"trace": out / "trace.npz", "report": out / "report.html", "json": out / "scan.json",
                "record": out / "vsink-run.json"}

    def determining(self) -> dict[str, Any]:
        """What determined this scan (for its ``vsink-run.json``): model, weights, input size,
        images, settings, version."""
        out = {"model": self.model, "weights": self.weights, "input_size": list(self.input_size),
               "images": self.images, "settings": self.settings, "vsink_version": __version__}
        if self.defect is not None:
            out["defect"] = {"samples": self.defect.defect.samples, "seed": self.defect.defect.seed}
        return out


def scan(
    backbone: Backbone,
    images: Sequence[Union[ImageSource, NamedImage]],
    *,
    batch_size: int = 8,
    img_size: Optional[int] = None,
    threshold: Union[str, float, None] = "auto",
    sink_ratio: float = 5.0,
    massive_ratio: float = 100.0,
    layers: Optional[Sequence[int]] = None,
    report_images: int = 12,
    progress: bool = True,
    shard: Optional[Shard] = None,
) -> Optional[ScanResult]:
    """Scan images for high-norm tokens and attention sinks in every layer.

    Args:
        backbone: from :func:`vsink.load` or :func:`vsink.wrap`.
        images: file paths, PIL images or :class:`~vsink.images.NamedImage`. Unreadable files are
            skipped and listed in ``result.skipped``; the rest are scanned.
        batch_size: images per forward pass.
        img_size: square input size (default: the model's own).
        threshold: ``"auto"``, ``"sigma:K"`` or an absolute norm (see :mod:`vsink.detect.norms`).
        sink_ratio: a token is a sink when it receives this many times the median share.
        massive_ratio: an activation is massive at this many times the median |activation|.
        layers: blocks to scan (default all).
        report_images: how many input thumbnails to keep for the HTML report.
        progress: show a progress bar.
        shard: this process's place under ``torchrun`` (:mod:`vsink.shard`): it scans its batches,
            rank 0 gathers the reduced per-image data of all, in the order of ``images``, runs the
            detectors over all of it and returns the result; the other ranks return None. The
            result equals a one-process scan's. An error on any rank's batches stops every rank
            (:meth:`vsink.shard.Shard.settle`).

    Raises:
        NothingScanned: if no image could be read.
    """
    backbone = backbone_arg(backbone)
    images = images_arg(images)
    img_size = int_arg(img_size, "img_size", 1, nullable=True)
    layers = None if layers is None else index_list_arg(layers, "layers")
    int_arg(report_images, "report_images", 0)
    SCAN["batch_size"].check(batch_size)
    SCAN["sink_ratio"].check(sink_ratio)
    Option("massive_ratio", Float(0, min_open=True)).check(massive_ratio)
    size = (img_size, img_size) if img_size else backbone.img_size
    backbone.check_input_size(size)
    parse_threshold(threshold)  # a bad threshold fails before the scan
    shard = shard or Shard()
    mine = list(shard.batches(len(images), batch_size))
    bar = tqdm(total=sum(stop - start for _, start, stop in mine), desc="scan", unit="img",
               disable=not progress or not shard.main)

    def work() -> _ScanPart:
        """This process's batches through the probe."""
        part = _ScanPart([], [], [], [], [], [], None)
        with Probe(backbone, layers=layers, massive=MASSIVE_TOP_K) as probe:
            for b, start, stop in mine:
                batch, batch_names, failed = load_batch(images[start:stop], start)
                for entry in failed:
                    bar.write(f"vsink: skipped {entry['reason']}", file=sys.stderr)
                part.batches.append((b, len(part.skipped), len(batch)))  # (batch, its first skipped entry, images)
                part.skipped.extend(failed)
                if batch:
                    pixel_values = backbone.preprocess(batch, size)
                    probe.run(pixel_values)
                    part.names.extend(batch_names)
                    for img in batch:
                        part.boxes.append(backbone.view_box(img.size))
                        part.sizes.append(img.size)
                        if len(part.thumbnails) < report_images:
                            part.thumbnails.append(part.boxes[-1].crop(img, side=max(size)))
                bar.update(stop - start)
        part.trace = probe.trace() if part.names else None
        return part

    try:
        parts = shard.settle(work)  # an error on any process stops every one
    finally:
        bar.close()
    if parts is None:
        return None
    if shard.alone:
        names, skipped, thumbnails, boxes, sizes, trace = (parts[0].names, parts[0].skipped, parts[0].thumbnails,
                                                            parts[0].boxes, parts[0].sizes, parts[0].trace)
    else:
        names, skipped, thumbnails, boxes, sizes, trace = _join_parts(parts, report_images)
    if not names:
        raise NothingScanned(skipped)
    trace.meta = {"model": backbone.spec, "images": names}
    return result_of_trace(backbone, trace, size=size, names=names, skipped=skipped, threshold=threshold,
                           sink_ratio=sink_ratio, massive_ratio=massive_ratio, batch_size=batch_size,
                           thumbnails=thumbnails, image_sizes=sizes, view_boxes=boxes)


@dataclass
class _ScanPart:
    """What one process of a sharded scan sends rank 0: per batch it ran ``(batch number, index of
    its first entry in skipped, images scanned)``, and its images' names, skipped entries,
    thumbnails, view boxes, sizes and trace rows, in its batches' order."""

    batches: list[tuple[int, int, int]]
    names: list[str]
    skipped: list[dict[str, str]]
    thumbnails: list[Image.Image]
    boxes: list[ViewBox]
    sizes: list[tuple[int, int]]
    trace: Optional[Trace]


def _join_parts(parts: Sequence[_ScanPart], report_images: int) -> tuple[list[str], list[dict[str, str]],
                                                                          list[Image.Image], list[ViewBox],
                                                                          list[tuple[int, int]], Optional[Trace]]:
    """The parts of a sharded scan put back in batch order (what one process would have collected)."""
    runs = []  # (batch number, part, first image row, images, first skipped entry, skipped entries)
    for part in parts:
        row = 0
        for i, (b, skip_start, n) in enumerate(part.batches):
            skip_stop = part.batches[i + 1][1] if i + 1 < len(part.batches) else len(part.skipped)
            runs.append((b, part, row, n, skip_start, skip_stop))
            row += n
    names, skipped, thumbnails, boxes, sizes, traces = [], [], [], [], [], []
    for b, part, row, n, skip_start, skip_stop in sorted(runs, key=lambda r: r[0]):
        skipped += part.skipped[skip_start:skip_stop]
        if not n:
            continue
        names += part.names[row:row + n]
        boxes += part.boxes[row:row + n]
        sizes += part.sizes[row:row + n]
        thumbnails += part.thumbnails[row:row + n][:max(0, report_images - len(thumbnails))]
        traces.append(part.trace.image_rows(row, row + n))
    return names, skipped, thumbnails, boxes, sizes, Trace.join(traces) if traces else None


def stack_thumbnails(thumbnails: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """Report images of different sizes as ``thumbnails`` uint8 [images, H, W, 3] (each at the
    top left, black beyond it) and ``thumbnail_sizes`` [images, 2] (height, width of each)."""
    h = max(t.size[1] for t in thumbnails)
    w = max(t.size[0] for t in thumbnails)
    stacked = np.zeros((len(thumbnails), h, w, 3), dtype=np.uint8)
    for i, t in enumerate(thumbnails):
        stacked[i, : t.size[1], : t.size[0]] = np.asarray(t.convert("RGB"), dtype=np.uint8)
    return {"thumbnails": stacked, "thumbnail_sizes": np.asarray([(t.size[1], t.size[0]) for t in thumbnails],
                                                                  dtype=np.int64)}


def result_of_trace(backbone: Backbone, trace: Trace, *, size: tuple[int, int], names: list[str],
                    skipped: list[dict[str, str]], threshold: Union[str, float, None] = "auto", sink_ratio: float = 5.0,
                    massive_ratio: float = 100.0, batch_size: int, thumbnails: Sequence[Image.Image] = (),
                    synthetic: Optional[bool] = None, image_sizes: Sequence[tuple[int, int]] = (),
                    view_boxes: Sequence[ViewBox] = ()) -> ScanResult:
    """Run every detector on a trace of ``backbone`` and assemble the :class:`ScanResult`."""
    detect_kwargs = parse_threshold(threshold)
    trace.check_finite(backbone.spec)
    settings = {"batch_size": batch_size, "threshold": detect_kwargs, "sink_ratio": sink_ratio,
                "massive_ratio": massive_ratio, "layers": list(trace.layers),
                "dtype": str(backbone.dtype).removeprefix("torch."), "device": str(backbone.device),
                "edits": list(backbone.edits), "attention": attention_report(backbone.model)}
    return ScanResult(
        model=backbone.spec,
        synthetic=backbone.synthetic is not None if synthetic is None else synthetic,
        input_size=size,
        images=names,
        skipped=skipped,
        trace=trace,
        high_norm=detect_high_norm(trace, **detect_kwargs),
        sinks=detect_sinks(trace, ratio=sink_ratio),
        attention=layer_attention_summary(trace),
        massive=detect_massive(trace, min_ratio=massive_ratio),
        settings=settings,
        thumbnails=list(thumbnails),
        weights=weights_fingerprint(backbone.model),
        image_sizes=[tuple(v) for v in image_sizes],
        view_boxes=list(view_boxes),
    )

