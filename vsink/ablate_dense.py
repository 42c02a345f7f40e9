"""Dense metrics under ablation (``vsink ablate --dense``): each (target, layer, ablation) of an
ablation run becomes a model variant of :func:`vsink.evaluate.dense.evaluate_dense`, which then
measures the clean model and every ablated one on the same dense dataset — linear-probe mIoU,
LOST CorLoc and the artifact metrics, with bootstrap intervals over the images and paired
intervals of each variant's difference from the clean model.

Each ablated model is evaluated as a model of its own: the linear head is trained and evaluated
with the ablation in place (a probe of what the ablated features still carry), so the ablation
runs on the training images of the probe and on the evaluation images alike.

The dense images are not the ones the ablation run chose its targets on, so everything an
ablation needs is taken again from a clean pass over the dense images themselves
(:func:`dense_clean_pass`: both splits, the images the evaluation will keep):

* **selection** — per dense image, by the same rule and settings as the ablation run
  (:func:`vsink.ablate.select` on the dense clean trace): ``sinks``, ``high-norm`` and
  ``massive`` are detected on each dense image's own clean pass at the chosen block;
  ``registers`` and ``neurons`` select the same positions / units everywhere. The high-norm
  detector's threshold (the only one pooled over images) is fitted on the dense images, the
  training and evaluation splits pooled into one population; ``--threshold`` settings are the
  ablation run's. Sinks and massive activations are judged per image (ratios to the image's own
  median), so there is nothing to fit.
* **replacement** — ``zero``: 0. ``mean-images``: the clean value at the same token position and
  channel averaged over the dense images (both splits pooled). ``mean-kind``: the clean mean over
  the dense images (both splits pooled) and every token of the same kind that the dense
  selection does not select. ``resample``: the clean value of another dense image *of the same
  split* (a seeded derangement per split, :func:`dense_pairing`; no training image takes an
  evaluation image's values, or the reverse).

During the evaluation the ablation hook learns which images each batch holds
(:meth:`vsink.evaluate.variants.Variant.before_batch`) and applies those images' selections and
values. Memory: the dense images' clean values at each ablated site (images × tokens × channels)
are kept, as the ablation run keeps its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .ablation_passes import Pass, Selection, derangement, install_ablation, replacement, run_pass, select
from .arguments import ArgumentError
from .backbones.base import Backbone
from .detect.norms import HighNormResult, detect_high_norm
from .errors import VsinkError
from .evaluate.datasets import DatasetError, DenseDataset
from .evaluate.dense import _check_labels, _needs, supported_tasks
from .evaluate.variants import Variant
from .layout import TokenLayout

#: how each piece of a dense ablation is chosen (recorded in results.json, ``dense_ablation.rules``)
RULES = {
    "selection": "per dense image, on its own clean pass, by the ablation run's detectors and settings",
    "high_norm_threshold": "fitted on the dense images (training and evaluation splits pooled)",
    "mean_images": "per token position, over the dense images (both splits pooled)",
    "mean_kind": "over the dense images (both splits pooled) and the tokens of the kind not selected there",
    "resample": "another dense image of the same split (a derangement per split, seeded by --seed)",
    "applied_to": "the probe's training images and the evaluation images alike",
}


@dataclass
class DenseImages:
    """The clean pass over the dense images: ``keys`` (split, sample id) in pass order, the pass
    (trace and the captured sites' values) and the high-norm detection fitted on it."""

    keys: list[tuple[str, str]]
    clean: Pass
    high_norm: HighNormResult

    @property
    def layout(self) -> TokenLayout:
        return self.clean.trace.layout

    def split_indices(self) -> dict[str, np.ndarray]:
        """The pass positions of each split's images, splits in pass order."""
        splits = list(dict.fromkeys(split for split, _ in self.keys))
        return {s: np.array([i for i, (split, _) in enumerate(self.keys) if split == s]) for s in splits}


def _dense_batches(backbone: Backbone, sets: Sequence[tuple[DenseDataset, Any]], size: tuple[int, int],
                   batch_size: int, num_classes: Optional[int], keys: list[tuple[str, str]]) -> Iterator[torch.Tensor]:
    """Preprocessed batches of the images the evaluation keeps (its loading and checks), their
    keys appended to ``keys``; bad items are left out here and reported by the evaluation."""
    for dataset, need in sets:
        for start in range(0, len(dataset), batch_size):
            images = []
            for sample in dataset.samples[start:start + batch_size]:
                try:
                    item = sample.load()
                    _check_labels(sample, item, num_classes)
                except DatasetError:
                    continue
                if need(item):
                    continue
                keys.append((dataset.split, str(sample.id)))
                images.append(item.image)
            if images:
                yield backbone.preprocess(images, size)


def dense_splits(eval_set: DenseDataset, train_set: Optional[DenseDataset],
                 tasks: Optional[Sequence[str]]) -> list[tuple[DenseDataset, Any]]:
    """The splits the evaluation runs, in pass order (the training split when ``linear-seg`` is
    among ``tasks``, then the evaluation split), each with the evaluation's rule for a usable item."""
    tasks = list(tasks) if tasks is not None else supported_tasks(eval_set)
    sets: list[tuple[DenseDataset, Any]] = []
    if "linear-seg" in tasks and train_set is not None:
        sets.append((train_set, _needs(["linear-seg"])))
    sets.append((eval_set, _needs(tasks)))
    return sets


def check_dense(dense: Any, tasks: Optional[Sequence[str]], *, resample: bool) -> None:
    """Refuse, before any pass, a ``dense=`` that is not ``(eval_set, train_set or None)`` of
    :class:`DenseDataset`, and (``resample``) a split of fewer than 2 images."""
    what = "dense must be (eval_set, train_set or None), DenseDataset from vsink.evaluate.open.open_dataset"
    if not isinstance(dense, (tuple, list)) or len(dense) != 2:
        raise ArgumentError(f"{what}, got the {type(dense).__name__} {dense!r:.80}")
    eval_set, train_set = dense
    for name, value in (("eval_set", eval_set), ("train_set", train_set)):
        if not isinstance(value, DenseDataset) and not (name == "train_set" and value is None):
            raise ArgumentError(f"{what}; its {name} is the {type(value).__name__} {value!r:.80}")
    if not resample:
        return
    for dataset, _ in dense_splits(eval_set, train_set, tasks):
        if len(dataset) < 2:
            raise VsinkError(f"--dense with resample: split {dataset.split} has {len(dataset)} image(s); resample "
                             "needs at least 2 per split (each takes another image's values)")


def dense_clean_pass(backbone: Backbone, eval_set: DenseDataset, train_set: Optional[DenseDataset], *,
                     tasks: Optional[Sequence[str]], sites: Sequence[tuple[str, int]], size: tuple[int, int],
                     batch_size: int, threshold: dict[str, Any]) -> DenseImages:
    """One clean pass over the dense images the evaluation will use (the training split when
    ``linear-seg`` is among ``tasks``, then the evaluation split), capturing ``sites``; the
    high-norm detector (``threshold``: :func:`vsink.scan.parse_threshold`'s settings) fitted on
    all of them."""
    sets = dense_splits(eval_set, train_set, tasks)
    keys: list[tuple[str, str]] = []
    classes = eval_set.num_classes
    clean = run_pass(backbone, _dense_batches(backbone, sets, size, batch_size, classes, keys), capture=sites)
    if len(set(keys)) != len(keys):
        raise VsinkError("dense ablation: sample ids repeat within a split; each dense image needs its own id")
    return DenseImages(keys, clean, detect_high_norm(clean.trace, **threshold))


def dense_pairing(images: DenseImages, seed: int) -> np.ndarray:
    """The resample partner of every dense image (pass positions): a derangement within each split,
    drawn with ``seed`` (the same seed gives the same pairing)."""
    partner = np.empty(len(images.keys), dtype=np.int64)
    for split, idx in images.split_indices().items():
        if idx.size < 2:
            raise VsinkError(f"--dense with resample: split {split} has {idx.size} usable image(s); resample needs "
                             "at least 2 per split (each takes another image's values)")
        partner[idx] = idx[derangement(idx.size, seed)]
    return partner


def dense_selection(selection: Selection, images: DenseImages, *, sink_ratio: float,
                    massive_ratio: float) -> Selection:
    """``selection`` (the ablation run's, at its block) chosen again on the dense images."""
    return select(selection.target, selection.layer, images.clean.trace, high_norm=images.high_norm,
                  sink_ratio=sink_ratio, massive_ratio=massive_ratio, neurons=selection.channels)


@dataclass(frozen=True)
class DenseAblationVariant(Variant):
    """The model with one ablation installed, per dense image: ``tokens`` [I, N] bool (the tokens
    replaced in each dense image), ``channels`` (None: all), ``values`` [I, N, C'] (None: zero);
    ``index`` maps (split, sample id) to the row of ``tokens`` and ``values``."""

    site: str = "block_output"
    layer: int = 0
    index: dict[tuple[str, str], int] = field(default_factory=dict, compare=False, repr=False)
    tokens: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    channels: Optional[tuple[int, ...]] = None
    values: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    #: the rows of the batch being run (:meth:`before_batch`)
    batch: list[int] = field(default_factory=list, compare=False, repr=False)

    def describe(self) -> str:
        what = "all channels" if self.channels is None else f"channel(s) {list(self.channels)}"
        return (f"{self.name} (ablation: {int(self.tokens.sum())} token(s) over {self.tokens.shape[0]} dense image(s), "
                f"{what}, {self.site} block {self.layer})")

    def check(self, base: Backbone) -> None:
        return None

    def before_batch(self, split: str, ids: Sequence[str]) -> None:
        missing = [i for i in ids if (split, i) not in self.index]
        if missing:
            raise VsinkError(f"ablation {self.name}: dense image {split}/{missing[0]} was not in the clean pass the "
                             "ablation was chosen on")
        self.batch[:] = [self.index[(split, i)] for i in ids]

    @contextmanager
    def open(self, base: Backbone, **load_kwargs: Any) -> Iterator[Backbone]:
        values = self.values
        if values is None:  # zero, as ablate() installs it
            width = base.mlp_width(self.layer) if self.site == "mlp_hidden" else base.embed_dim
            count = width if self.channels is None else len(self.channels)
            values = torch.zeros(1, 1, count).expand(*self.tokens.shape, count)
        selection = Selection(self.name, self.layer, self.site, self.tokens,
                              None if self.channels is None else list(self.channels))
        with install_ablation(base, selection, values, self.batch):
            yield base


def dense_variant(name: str, selection: Selection, ablation: str, images: DenseImages,
                  partner: Optional[np.ndarray]) -> DenseAblationVariant:
    """The variant of the dense ``selection`` (:func:`dense_selection`) replaced by ``ablation``
    with values from the dense clean pass (module docstring; ``partner``: :func:`dense_pairing`,
    for ``resample``)."""
    values = None
    if ablation != "zero":
        site = images.clean.sites[(selection.site, selection.layer)]
        if ablation == "resample":
            chosen = site if selection.channels is None else site[:, :, selection.channels]
            values = chosen[torch.as_tensor(partner)]
        else:
            values = replacement(selection, ablation, site, images.layout)
    return DenseAblationVariant(name, kind="ablation", site=selection.site, layer=selection.layer,
                                index={key: i for i, key in enumerate(images.keys)},
                                tokens=torch.as_tensor(selection.tokens),
                                channels=None if selection.channels is None else tuple(selection.channels),
                                values=values)


def dense_record(images: DenseImages, selections: Sequence[Selection], ablation_high_norm: HighNormResult,
                 partner: Optional[np.ndarray]) -> dict[str, Any]:
    """What results.json records of the dense ablation (``dense_ablation``): the rules, the dense
    images' ids per split (in the order of the dense selections' rows), each dense selection's
    tokens per split, the high-norm thresholds fitted on the ablation images and on the dense
    images at the ablated blocks, and the resample pairing."""
    split_idx = images.split_indices()
    layers = sorted({s.layer for s in selections})
    threshold = lambda hn, l: next(s.threshold for s in hn.layers if s.index == l)  # noqa: E731
    out: dict[str, Any] = {
        "rules": RULES,
        "images": {split: [images.keys[i][1] for i in idx] for split, idx in split_idx.items()},
        "high_norm_threshold": {str(l): {"ablation_images": threshold(ablation_high_norm, l),
                                         "dense_images": threshold(images.high_norm, l)} for l in layers},
        "selections": [{"target": s.target, "layer": s.layer, "site": s.site, "channels": s.channels,
                        "tokens": s.count,
                        "tokens_per_split": {split: int(s.tokens[idx].sum()) for split, idx in split_idx.items()}}
                       for s in selections],
        "resample_pairing": None,
    }
    if partner is not None:
        out["resample_pairing"] = {split: {images.keys[i][1]: images.keys[int(partner[i])][1] for i in idx}
                                   for split, idx in split_idx.items()}
    return out
