"""Register-neuron discovery: MLP hidden units whose activation concentrates on high-norm tokens.

Algorithm (Jiang et al. 2025, batched): pass 1 scans block-output norms and finds each image's
outlier patches at the detection layer with the high-norm detector; pass 2 records, for every
MLP hidden neuron of blocks ``0..highest_layer``, its mean |activation| over that image's
outlier positions. Images without outliers are skipped (and counted). Scores are averaged over
the remaining images; the (layer, neuron) pairs above the score gap (:mod:`.score_gap`), or the
top-k, are returned best first. Every per-image quantity is computed per sample of the batch.

Two options reproduce the authors' released code (``shared/algorithms.py``): ``outlier_tokens="all"``
(an outlier position is any token above the threshold, the class token included; default
``"patches"``) and ``sparsity_filter=True`` (their notebook's filter, see
:func:`find_register_neurons`).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..arguments import images_arg, int_arg
from ..backbones.base import Backbone, backbone_arg
from ..backbones.hooks import Hooks
from ..detect import detect_high_norm
from ..errors import VsinkError, VsinkWarning
from ..images import ImageSource, NamedImage, load_batch
from ..io import write_json
from ..layout import TokenLayout
from ..options import BATCH, THRESHOLD, Bool, Choice, Float, Int, Mapping_, Option, Text, check_all, declare
from ..readers import checked_field, read_json, records
from ..probe import Probe, Trace
from ..shard import Shard
from ..scan import parse_threshold
from .score_gap import CLEAR, WINDOW, cut_at_gap

OUTLIER_TOKENS = ("patches", "all")

#: the arguments of :func:`find_register_neurons` (``vsink registers find`` flags)
FIND = declare(
    Option("top_k", Int(1), None, "neurons to keep", nullable=True,
           default_text="those above the largest gap in the sorted scores"),
    Option("detection_layer", Int(), None, "block whose outliers are used (negative from the end, within the "
           "depth)", nullable=True, default_text="the emergence layer"),
    Option("highest_layer", Int(), None, "last block whose MLP is scored (negative from the end, within the "
           "depth)", nullable=True, default_text="the emergence layer"),
    replace(THRESHOLD, help="high-norm threshold of the outlier pass"),
    Option("min_selectivity", Float(0), None, "keep neurons whose outlier score is >= this x their mean "
           "|activation| on patches", nullable=True, default_text="no filter"),
    Option("outlier_tokens", Choice(OUTLIER_TOKENS), "patches", "outlier positions: patches above the threshold, "
           "or any token (class token included), as the released code"),
    Option("sparsity_filter", Bool(), False, "the paper notebook's filter: per image, score only neurons below "
           "--sparsity-activation on >= --sparsity-fraction of all tokens"),
    Option("sparsity_fraction", Float(0, 1), 0.5, "see --sparsity-filter"),
    Option("sparsity_activation", Float(), 0.5, "see --sparsity-filter"),
    BATCH,
)


@dataclass
class RegisterNeuron:
    layer: int
    neuron: int
    score: float


@dataclass
class NeuronSpec:
    """The ``neurons.json`` content: ``{"model", "neurons": [{"layer", "neuron", "score"}], "settings"}``."""

    model: str
    neurons: list[RegisterNeuron]
    settings: dict[str, Any] = field(default_factory=dict)

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for n in self.neurons:
            out.setdefault(n.layer, []).append(n.neuron)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "neurons": [asdict(n) for n in self.neurons], "settings": self.settings}

    def save(self, path: Union[str, os.PathLike]) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "NeuronSpec":
        """Read a ``neurons.json``; every problem is an error naming the file and the field."""
        p = Path(path)
        data = read_json(p, "neuron spec")
        neurons = [RegisterNeuron(checked_field(n, "layer", Int(min=0), at), checked_field(n, "neuron", Int(min=0), at),
                                  checked_field(n, "score", Float(), at, 0.0))
                   for at, n in records(data, "neurons", str(p))]
        return cls(model=checked_field(data, "model", Text(), str(p), ""), neurons=neurons,
                   settings=checked_field(data, "settings", Mapping_(), str(p), {}))

    def check(self, backbone: Backbone) -> None:
        """Raise if a neuron is outside the backbone's blocks or MLP width; warn if the spec was
        found on another model (an LVLM's tower, ``SPEC#vision_tower``, counts as ``SPEC``; an empty
        ``model``, a hand-written spec, is not compared)."""
        tower = "#vision_tower"
        found_on, applied_to = self.model.removesuffix(tower), backbone.spec.removesuffix(tower)
        if found_on and found_on != applied_to:
            warnings.warn(f"the neuron spec was found on {self.model!r} and is applied to {backbone.spec!r}: "
                          "register neurons are units of the model they were found on, so test-time registers "
                          "and ablations of them mean something only there (fine if both have the same weights)",
                          VsinkWarning, stacklevel=3)
        for n in self.neurons:
            if not 0 <= n.layer < backbone.num_layers:
                raise VsinkError(f"neuron spec: layer {n.layer} outside the {backbone.num_layers} blocks of {backbone.spec}")
            width = backbone.mlp_width(n.layer)
            if not 0 <= n.neuron < width:
                raise VsinkError(f"neuron spec: neuron {n.neuron} outside the {width} MLP units of block {n.layer}")


def _with_prefix_outliers(patch_mask: torch.Tensor, norms: torch.Tensor, layout: TokenLayout, pooled: Optional[float]) -> torch.Tensor:
    """Outlier positions over the whole sequence [I, N]: the flagged patches, plus class tokens and
    registers above the layer's threshold (for a layer whose patches were flagged only through
    gaps of single images, above that image's lowest flagged patch norm)."""
    if pooled is not None:
        floor = torch.full((norms.shape[0],), pooled, dtype=norms.dtype)
    else:
        patch_norms = layout.patches(norms, dim=1)
        floor = torch.where(patch_mask, patch_norms, torch.full_like(patch_norms, float("inf"))).amin(dim=1)
    full = norms > floor[:, None]
    full[:, layout.patch_slice] = patch_mask
    return full


def _join_norms(parts) -> tuple[list[dict[str, str]], Optional[Trace], dict[int, int]]:
    """The first passes of a sharded discovery put back in batch order: the skipped entries, the
    joined norms trace and each batch's first image row in it."""
    runs = []
    for done, skipped, trace in parts:
        row = 0
        for i, (b, skip_start, n) in enumerate(done):
            skip_stop = done[i + 1][1] if i + 1 < len(done) else len(skipped)
            runs.append((b, skipped[skip_start:skip_stop], trace, row, n))
            row += n
    all_skipped, pieces, offsets, image = [], [], {}, 0
    for b, entries, trace, row, n in sorted(runs, key=lambda r: r[0]):
        all_skipped += entries
        offsets[b] = image
        if n:
            pieces.append(trace.image_rows(row, row + n))
            image += n
    return all_skipped, Trace.join(pieces) if pieces else None, offsets


def _batches(images, batch_size):
    for start in range(0, len(images), batch_size):
        yield start, images[start:start + batch_size]


@torch.inference_mode()
def find_register_neurons(
    backbone: Backbone,
    images: Sequence[Union[ImageSource, NamedImage]],
    *,
    top_k: Optional[int] = None,
    detection_layer: Optional[int] = None,
    highest_layer: Optional[int] = None,
    threshold: Union[str, float, None] = "auto",
    min_selectivity: Optional[float] = None,
    outlier_tokens: str = "patches",
    sparsity_filter: bool = False,
    sparsity_fraction: float = 0.5,
    sparsity_activation: float = 0.5,
    batch_size: int = 8,
    img_size: Optional[int] = None,
    progress: bool = True,
    shard: Optional[Shard] = None,
) -> Optional[NeuronSpec]:
    """Rank MLP neurons by their mean |activation| on high-norm tokens.

    Args:
        top_k: neurons to keep; default ``None``: those above the score gap
            (:func:`vsink.registers.score_gap.cut_at_gap`). ``settings["cut"]`` records the cut and
            ``settings["ranking"]`` the best scores the gap test saw.
        detection_layer: block whose output defines the outliers (default: the emergence layer).
        highest_layer: last block whose MLP is scored (default: the emergence layer).
        threshold: high-norm threshold for pass 1 (``"auto"``, ``"sigma:K"`` or a number).
        min_selectivity: optional sparsity filter: keep neurons whose outlier score is at least
            this many times their mean |activation| over all patch tokens.
        outlier_tokens: ``"patches"`` (default): outlier positions are patch tokens above the
            threshold; ``"all"``: any token above it, class tokens and registers included (as the
            released code, which takes every token of the sequence).
        sparsity_filter: the paper notebook's filter (``apply_sparsity_filter=True``): per image,
            a neuron counts only if its activation (signed) is below ``sparsity_activation`` on at
            least ``sparsity_fraction`` of all tokens of the sequence; otherwise its score for
            that image is 0 (the image still counts in the average). Default off.
        sparsity_fraction: see ``sparsity_filter`` (default 0.5, as released).
        sparsity_activation: see ``sparsity_filter`` (default 0.5, as released).
        shard: this process's place under ``torchrun`` (:mod:`vsink.shard`): each process runs its
            batches in both passes; rank 0 finds the outliers over the norms of every image, and
            adds the per-batch neuron sums in batch order, so the ranking equals one process's.
            Rank 0 returns the spec, the other ranks None.
    """
    backbone = backbone_arg(backbone)
    images = images_arg(images)
    img_size = int_arg(img_size, "img_size", 1, nullable=True)
    check_all(FIND, dict(top_k=top_k, detection_layer=detection_layer, highest_layer=highest_layer,
                         threshold=threshold, min_selectivity=min_selectivity, outlier_tokens=outlier_tokens,
                         sparsity_fraction=sparsity_fraction, sparsity_activation=sparsity_activation,
                         batch_size=batch_size))
    depth = backbone.num_layers
    for key, value in (("detection_layer", detection_layer), ("highest_layer", highest_layer)):
        if value is not None and not -depth <= value < depth:
            raise VsinkError(f"{key} must be a block index in [{-depth}, {depth - 1}] for the {depth} blocks of "
                             f"{backbone.spec}, got {value}")
    size = (img_size, img_size) if img_size else backbone.img_size
    shard = shard or Shard()
    batches = [(b, start, items) for b, (start, items) in enumerate(_batches(images, batch_size)) if shard.owns(b)]

    def norms() -> tuple[list[tuple[int, int, int]], list[dict[str, str]], Optional[Trace]]:
        """Pass 1 over this process's batches: per batch (number, its first skipped entry, images
        read), the files skipped, the norms."""
        skipped: list[dict[str, str]] = []
        done: list[tuple[int, int, int]] = []
        with Probe(backbone, attention=False) as probe:
            bar = tqdm(batches, desc="find: norms", disable=not progress or not shard.main)
            for b, start, items in bar:
                loaded, _, failed = load_batch(items, start)
                for entry in failed:  # reported as met, as vsink.scan does; listed in settings["unreadable"]
                    bar.write(f"vsink: skipped {entry['reason']}", file=sys.stderr)
                done.append((b, len(skipped), len(loaded)))
                skipped += failed
                if loaded:
                    probe.run(backbone.preprocess(loaded, size))
        return done, skipped, probe.trace() if probe.num_batches() else None

    parts = shard.settle(norms)  # an error on any process stops every one
    skipped, trace, offsets = [], None, {}
    if parts is not None:
        skipped, trace, offsets = _join_norms(parts) if not shard.alone else (parts[0][1], parts[0][2], {})

    def plan() -> tuple[int, int, float, torch.Tensor, dict[int, int], TokenLayout]:
        if trace is None:
            reasons = "; ".join(s["reason"] for s in skipped[:5])
            raise VsinkError(f"no image could be read for register-neuron discovery ({len(skipped)} skipped: {reasons})")
        trace.check_finite(backbone.spec)
        high = detect_high_norm(trace, **parse_threshold(threshold))
        _compare_with_gap_test(trace, high, threshold)
        if high.emergence_layer is None and detection_layer is None:
            raise VsinkError("no high-norm outliers in these images: there is nothing for register neurons to "
                             "explain (pass detection_layer and an absolute threshold to force a layer)")
        detection = high.emergence_layer if detection_layer is None else detection_layer % backbone.num_layers
        highest = detection if highest_layer is None else highest_layer % backbone.num_layers
        stats = high.layers[trace.layers.index(detection)]
        outliers = torch.from_numpy(high.mask(detection))  # [I, P]
        if outlier_tokens == "all":
            outliers = _with_prefix_outliers(outliers, torch.from_numpy(trace.norms[trace.layers.index(detection)]),
                                             trace.layout, stats.threshold)  # [I, N]
        return detection, highest, stats.threshold, outliers, (offsets if not shard.alone else {}), trace.layout

    # rank 0 finds the outliers over every image and sends them to every rank
    detection, highest, detection_threshold, outliers, offsets, layout = shard.on_main(plan)
    layers = list(range(highest + 1))
    scores = {l: torch.zeros(backbone.mlp_width(l), dtype=torch.float64) for l in layers}
    overall = {l: torch.zeros(backbone.mlp_width(l), dtype=torch.float64) for l in layers}
    used = 0
    current: dict[str, Any] = {"scores": scores, "overall": overall}
    sums: list[tuple[int, dict[int, torch.Tensor], dict[int, torch.Tensor], int]] = []  # per batch, under torchrun

    def scorer(layer):
        def fn(h: torch.Tensor) -> None:
            full = h.detach().float()  # [B, N, hidden]
            a = layout.patches(full.abs(), dim=1)  # [B, P, hidden]
            at = a if outlier_tokens == "patches" else full.abs()
            mask = current["mask"].to(a.device, a.dtype)  # [B, P] or [B, N], as ``at``
            counts = mask.sum(dim=1)  # [B]
            keep = counts > 0
            per_image = (mask.unsqueeze(-1) * at).sum(dim=1)[keep] / counts[keep].unsqueeze(-1)
            if sparsity_filter:
                below = (full < sparsity_activation).sum(dim=1)  # [B, hidden], over all tokens
                per_image = per_image * (below >= sparsity_fraction * full.shape[1])[keep]
            current["scores"][layer] += per_image.sum(dim=0).double().cpu()
            current["overall"][layer] += a[keep].mean(dim=1).sum(dim=0).double().cpu()
        return fn

    def run_pass() -> list[tuple[int, dict[int, torch.Tensor], dict[int, torch.Tensor], int]]:
        """Pass 2 over this process's batches: the sums into ``scores`` and ``overall`` (one
        process) or, under torchrun, each batch's sums."""
        nonlocal used
        with Hooks(lambda handles: handles.extend(backbone.hook("mlp_hidden", l, scorer(l)) for l in layers)):
            image_index = 0
            for b, start, items in tqdm(batches, desc="find: neurons", disable=not progress or not shard.main):
                loaded, _, _ = load_batch(items, start)  # the same files fail as in pass 1
                if not loaded:
                    continue
                if not shard.alone:
                    image_index = offsets[b]
                mask = outliers[image_index:image_index + len(loaded)]
                image_index += len(loaded)
                if not mask.any():
                    continue
                current["mask"] = mask
                if not shard.alone:  # this batch's sums, added on rank 0 in batch order as one process adds them
                    current["scores"] = {l: torch.zeros_like(t) for l, t in scores.items()}
                    current["overall"] = {l: torch.zeros_like(t) for l, t in overall.items()}
                batch_used = int((mask.sum(dim=1) > 0).sum())
                used += batch_used
                backbone.forward(backbone.preprocess(loaded, size))
                if not shard.alone:
                    sums.append((b, current["scores"], current["overall"], batch_used))
        return sums

    parts = shard.settle(run_pass)  # an error on any process stops every one
    if parts is None:
        return None
    if not shard.alone:
        used = 0
        for _, part_scores, part_overall, batch_used in sorted((s for part in parts for s in part), key=lambda s: s[0]):
            for l in layers:
                scores[l] += part_scores[l]
                overall[l] += part_overall[l]
            used += batch_used
    if used == 0:
        raise VsinkError(f"no image has outliers at block {detection} with threshold {detection_threshold}: "
                         "nothing to score")
    candidates = []
    for l in layers:
        mean_score = scores[l] / used
        selectivity = mean_score / (overall[l] / used).clamp_min(1e-12)
        for n in range(len(mean_score)):
            if min_selectivity is None or selectivity[n] >= min_selectivity:
                candidates.append(RegisterNeuron(l, n, float(mean_score[n])))
    candidates.sort(key=lambda n: -n.score)
    cut = cut_at_gap([n.score for n in candidates])
    if top_k is None and not cut.clear:
        warnings.warn(f"no clear gap in the neuron scores (the widest, {cut.widest:.3g}, is less than {CLEAR:g} times "
                      f"the typical gap): kept the {cut.count} best; look at the scores, or pass top_k (--top-k)",
                      VsinkWarning, stacklevel=3)
    keep = cut.count if top_k is None else top_k
    n_images = trace.num_images
    settings = {"detection_layer": detection, "highest_layer": highest, "threshold": parse_threshold(threshold),
                "detection_threshold": detection_threshold, "top_k": top_k,
                "cut": {"rule": "top_k" if top_k is not None else "score gap" if cut.clear else "no clear gap", "kept": min(keep, len(candidates)),
                        **cut.to_dict()},
                "ranking": [asdict(n) for n in candidates[:max(WINDOW, keep)]], "min_selectivity": min_selectivity,
                "outlier_tokens": outlier_tokens,
                "sparsity_filter": {"fraction": sparsity_fraction, "activation": sparsity_activation}
                if sparsity_filter else None,
                "images": n_images, "images_with_outliers": used, "images_skipped_no_outliers": n_images - used,
                "unreadable": skipped}
    return NeuronSpec(model=backbone.spec, neurons=candidates[:keep], settings=settings)


#: the threshold and the gap test disagree widely when their total outlier counts differ by more
#: than this factor (or their emergence blocks differ)
DISAGREEMENT = 2.0


def _compare_with_gap_test(trace, high, threshold) -> None:
    """Warn when a chosen (non-``auto``) threshold finds very different outliers from the
    detector's gap test (``auto``) on the same norms: another emergence block, or total outlier
    counts more than :data:`DISAGREEMENT` times apart."""
    if parse_threshold(threshold)["method"] == "auto":
        return
    gap = detect_high_norm(trace)
    mine, theirs = len(high.outliers), len(gap.outliers)
    ratio = max(mine, theirs) / max(min(mine, theirs), 1)
    if high.emergence_layer == gap.emergence_layer and (max(mine, theirs) == 0 or ratio <= DISAGREEMENT):
        return

    def said(result) -> str:
        where = "no block" if result.emergence_layer is None else f"block {result.emergence_layer}"
        return f"{len(result.outliers)} outlier tokens, emergence at {where}"

    warnings.warn(f"threshold {threshold} disagrees with the detector's gap test (--threshold auto): {said(high)} "
                  f"against {said(gap)}; the neurons found explain the threshold's outliers, check them "
                  "(docs/registers.md)", VsinkWarning, stacklevel=4)

