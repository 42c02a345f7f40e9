"""High-norm (outlier) tokens: per-layer patch-norm statistics, thresholds and the emergence layer.

Thresholds (``method``):

``auto`` (default)
    outliers exist in a layer only where its patch norms have a real gap: a separated upper
    cluster (at least ``min_count`` tokens, at most ``max_fraction`` of them) whose lowest member
    is at least ``min_ratio`` times the median of the bulk below it, and whose gap is many times
    the spacings of the bulk's own upper tail (the gap test of :mod:`vsink.detect.gap`, at
    family-wise level ``alpha``). A long continuous tail is never outliers, however heavy.

    Mechanistic check: when the trace holds the norms of the tokens entering the first block
    (:attr:`Trace.input_norms`), a token counts only if it was *written*: its norm grew since the
    embedding at least ``min_growth`` times as much as the median patch token's did. The
    register-neuron write (Jiang et al. 2025) makes artifact tokens grow ~10x more than the bulk;
    content that was already large in the patch embedding does not qualify. A candidate cluster
    must be at least half written tokens, and only written tokens above the threshold are
    flagged (``min_growth=0`` turns the check off).
``sigma``
    mean + ``k`` standard deviations of the layer's patch norms (always flags the upper tail).
``absolute``
    a fixed ``threshold`` (e.g. 150 for DINOv2 ViT-g; it does not carry over to other models).

What is pooled: the patch-token norms of all images of a layer form one population, in absolute
units. The register-neuron write has a fixed magnitude per model, so artifact norms are
comparable across images while bulk norms shift with content; pooling gives small per-image
clusters (1-2 artifacts in an image) the evidence of the whole set. A cluster that is separated
in each image alone stays separated in the pool unless another image's *bulk* reaches into the
gap. Class tokens and registers are excluded from the statistics and reported separately.
The rule, its parameters and its measured precision/recall are in docs/detection.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import VsinkError
from ..layout import TokenLayout
from ..probe import Trace
from ..wording import count
from . import gap as gap_test

METHODS = ("auto", "sigma", "absolute")
MIN_GROWTH = 2.0
#: an image whose every patch token's norm grows at least this many times in one block, with no
#: token standing out, is reported as uniformly high-norm (:attr:`HighNormResult.uniform`)
UNIFORM_JUMP = 3.0


@dataclass
class LayerNormStats:
    """One layer's patch-norm statistics.

    ``threshold`` is the pooled threshold (``auto``: null when the pool has no gap, even if single
    images were flagged through gaps of their own, counted in ``own_gap_images``);
    ``separation`` and ``critical`` are the pooled gap statistic and the value it had to reach;
    ``outliers`` counts the flagged tokens (all images).
    """

    index: int
    median: float
    max: float
    ratio: float
    threshold: Optional[float]
    outlier_fraction: float
    cls: Optional[float]
    registers: list[float] = field(default_factory=list)
    outliers: int = 0
    separation: Optional[float] = None
    critical: Optional[float] = None
    own_gap_images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutlierToken:
    image: int
    layer: int
    token: int
    row: int
    col: int
    norm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutlierTable:
    """Every flagged token as four parallel arrays (compact for millions of tokens)."""

    image: np.ndarray
    layer: np.ndarray
    token: np.ndarray
    norm: np.ndarray

    @classmethod
    def empty(cls) -> "OutlierTable":
        return cls(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32))

    @classmethod
    def concat(cls, parts: list["OutlierTable"]) -> "OutlierTable":
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("image", "layer", "token", "norm")))

    def __len__(self) -> int:
        return int(self.image.size)

    def select(self, index: np.ndarray) -> "OutlierTable":
        return OutlierTable(self.image[index], self.layer[index], self.token[index], self.norm[index])

    def rows(self, layout: TokenLayout) -> Iterator[OutlierToken]:
        rows, cols = np.divmod(self.token - layout.num_prefix, layout.grid[1])
        for i in range(len(self)):
            yield OutlierToken(int(self.image[i]), int(self.layer[i]), int(self.token[i]), int(rows[i]),
                               int(cols[i]), float(self.norm[i]))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """``{prefix_image, prefix_layer, prefix_token, prefix_norm}`` for an ``.npz``."""
        return {f"{prefix}_{f}": getattr(self, f) for f in ("image", "layer", "token", "norm")}


@dataclass
class HighNormResult:
    """Per-layer statistics, every flagged token, and the emergence layer.

    ``outliers`` holds all flagged tokens compactly; :attr:`tokens` and :meth:`tokens_at` give them
    as :class:`OutlierToken` rows (fine for a few thousand; use the table or :meth:`mask` beyond).
    """

    method: str
    settings: dict
    layers: list[LayerNormStats]
    outliers: OutlierTable
    emergence_layer: Optional[int]
    layout: TokenLayout
    num_images: int
    #: images where every patch token jumped to a high norm at once, none standing out (a flat
    #: image can trigger the artifact mechanism on every patch): ``{"image", "layer", "growth"}``
    #: with the first such block and the smallest growth of a patch's norm in it
    uniform: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens(self) -> list[OutlierToken]:
        return list(self.outliers.rows(self.layout))

    def tokens_at(self, layer: int) -> list[OutlierToken]:
        return list(self.outliers.select(self.outliers.layer == layer).rows(self.layout))

    def mask(self, layer: int) -> np.ndarray:
        """Boolean [images, patches]: which patch tokens are flagged at block ``layer``."""
        found = self.outliers.select(self.outliers.layer == layer)
        out = np.zeros((self.num_images, self.layout.num_patches), dtype=bool)
        out[found.image, found.token - self.layout.num_prefix] = True
        return out

    def strongest(self, limit: int) -> list[OutlierToken]:
        """At most ``limit`` flagged tokens, highest norm first."""
        order = np.argsort(-self.outliers.norm, kind="stable")[:limit]
        return list(self.outliers.select(order).rows(self.layout))

    def summary(self, names: Optional[list[str]] = None) -> str:
        """One line for messages: "emergence layer 2, 57 outlier tokens over all layers", or "no
        high-norm tokens found" when no layer has any; then, for images where every patch jumped
        to a high norm at once (:attr:`uniform`), that they may be uniform (``names``: the
        images' names, else their indices)."""
        text = (f"emergence layer {self.emergence_layer}, {count(len(self.outliers), 'outlier token')} over all layers"
                if self.emergence_layer is not None else "no high-norm tokens found")
        return text + "".join(f"; {uniform_text(u, names[u['image']] if names else None)}"
                              for u in self.uniform[:3]) + (
            f"; {len(self.uniform) - 3} more such images" if len(self.uniform) > 3 else "")



def uniform_text(entry: dict[str, Any], name: Optional[str] = None) -> str:
    """"every patch token is high-norm at block k in image i (...) — uniform image?"."""
    where = f" in {name}" if name else f" in image {entry['image']}"
    return (f"every patch token is high-norm at block {entry['layer']}{where} (each grew >= {entry['growth']:.3g}x in "
            "that block, none stands out) — uniform image?")


def uniform_jumps(trace: Trace, flagged_by_layer: list[np.ndarray], jump: float = UNIFORM_JUMP) -> list[dict[str, Any]]:
    """Per image, the first traced block (after the first) where every patch token's norm is at
    least ``jump`` times its norm at the previous traced block while no patch of that image is
    flagged there; ``flagged_by_layer[pos]`` is the [I, P] outlier mask of trace position ``pos``."""
    layout = trace.layout
    out = []
    for i in range(trace.num_images):
        for pos in range(1, len(trace.layers)):
            before = trace.norms[pos - 1][i, layout.patch_slice]
            after = trace.norms[pos][i, layout.patch_slice]
            growth = float(np.min(after / np.maximum(before, 1e-12)))
            if growth >= jump and not flagged_by_layer[pos][i].any():
                out.append({"image": i, "layer": int(trace.layers[pos]), "growth": growth})
                break
    return out


@dataclass
class LayerVerdict:
    """What the gap rule decided for one layer: the flagged patches [I, P], the pooled gap (if
    any), and how many images were flagged through a gap of their own."""

    flagged: np.ndarray
    pooled: Optional[gap_test.Gap]
    own_gap_images: int
    #: [I] the threshold each image's patches were flagged above (its own gap's, else the pooled
    #: one's); infinity where none applied
    thresholds: Optional[np.ndarray] = None


def flag_outliers(patches: np.ndarray, written: Optional[np.ndarray] = None, **gap_kwargs: Any) -> LayerVerdict:
    """The ``auto`` rule on one layer's patch norms [I, P] (see the module docstring).

    Each image is tested alone, and all images are tested pooled. An image whose own norms have a
    significant gap is flagged above its own threshold, whatever else is in the batch; the other
    images are flagged above the pooled threshold, if the pool has one. So a cluster that stands
    out in an image by itself is found the same way alone or in any batch, and images whose few
    artifacts are not significant alone get the evidence of the whole set.
    """
    written = np.ones_like(patches, dtype=bool) if written is None else written
    min_count = gap_kwargs.get("min_count", gap_test.MIN_COUNT)
    pooled = gap_test.find_gap(patches, written, **gap_kwargs)
    flagged = np.zeros_like(patches, dtype=bool)
    thresholds = np.full(patches.shape[0], np.inf)
    own = 0
    per_image = {**gap_kwargs, "alpha": gap_kwargs.get("alpha", gap_test.ALPHA) / patches.shape[0]}
    for i in range(patches.shape[0]):
        gap = gap_test.find_gap(patches[i], written[i], **per_image)
        own += gap is not None
        gap = gap or pooled
        if gap is not None:
            flagged[i] = (patches[i] > gap.threshold) & written[i]
            thresholds[i] = gap.threshold
    if flagged.sum() < min_count:
        flagged[:] = False
        thresholds[:] = np.inf
    return LayerVerdict(flagged, pooled, own, thresholds)


def flag_at_reference(reference: Trace, trace: Trace, position: int, *, method: str = "auto",
                      threshold: Optional[float] = None, k: float = 3.0, alpha: float = gap_test.ALPHA,
                      min_ratio: float = gap_test.MIN_RATIO, max_fraction: float = gap_test.MAX_FRACTION,
                      min_count: int = gap_test.MIN_COUNT, min_growth: float = MIN_GROWTH) -> Optional[np.ndarray]:
    """[I, P]: the patch tokens of ``trace`` at trace position ``position`` above the threshold
    :func:`detect_high_norm` (same settings) applied to the same image of ``reference``, held
    fixed (``auto``: each image's own gap, else the pooled one, and the growth check on ``trace``;
    ``sigma``: mean + k std of ``reference``'s patch norms). ``trace`` is ``reference`` changed
    (an ablation, say), with the same images and layout: a refitted threshold would move with the
    change itself, so tokens that did not change could count as new outliers. None where
    ``reference`` applied no threshold at that position (no gap: nothing to hold)."""
    if method not in METHODS:
        raise VsinkError(f"unknown threshold method {method!r}; use one of {', '.join(METHODS)}")
    layout = reference.layout
    ref = reference.norms[position][:, layout.patch_slice]
    new = trace.norms[position][:, layout.patch_slice]
    if method == "absolute":
        return new > float(threshold)
    if method == "sigma":
        return new > float(ref.mean() + k * ref.std())
    use_growth = min_growth > 0 and reference.input_norms is not None and trace.input_norms is not None
    written = (lambda t, p: written_tokens(p, t.input_norms[:, layout.patch_slice], min_growth)) if use_growth \
        else (lambda t, p: None)
    verdict = flag_outliers(ref, written(reference, ref), alpha=alpha, min_ratio=min_ratio,
                            max_fraction=max_fraction, min_count=min_count)
    if not np.isfinite(verdict.thresholds).any():
        return None
    flagged = new > verdict.thresholds[:, None]
    grown = written(trace, new)
    return flagged if grown is None else flagged & grown


def written_tokens(patches: np.ndarray, inputs: np.ndarray, min_growth: float) -> np.ndarray:
    """Tokens whose norm grew since the embedding at least ``min_growth`` times as much as the
    median patch token's (``patches`` and ``inputs`` [I, P] norms at the layer and at the input)."""
    growth = patches / np.maximum(inputs, 1e-12)
    return growth >= min_growth * float(np.median(growth))


def detect_high_norm(
    trace: Trace,
    *,
    method: str = "auto",
    threshold: Optional[float] = None,
    k: float = 3.0,
    alpha: float = gap_test.ALPHA,
    min_ratio: float = gap_test.MIN_RATIO,
    max_fraction: float = gap_test.MAX_FRACTION,
    min_count: int = gap_test.MIN_COUNT,
    min_growth: float = MIN_GROWTH,
) -> HighNormResult:
    """Find high-norm patch tokens in every traced layer (see the module docstring for methods)."""
    if trace.norms is None:
        raise VsinkError("the trace holds no token norms (probe with norms=True)")
    if method not in METHODS:
        raise VsinkError(f"unknown threshold method {method!r}; use one of {', '.join(METHODS)}")
    if method == "absolute" and (threshold is None or not threshold > 0):
        raise VsinkError("method 'absolute' needs a positive threshold")
    layout = trace.layout
    cls_idx, reg_idx = layout.cls_indices(), layout.register_indices()
    inputs = trace.input_norms[:, layout.patch_slice] if trace.input_norms is not None else None
    layers: list[LayerNormStats] = []
    found_parts: list[OutlierTable] = []
    masks: list[np.ndarray] = []
    emergence: Optional[int] = None
    for pos, layer in enumerate(trace.layers):
        norms = trace.norms[pos]  # [I, N]
        patches = norms[:, layout.patch_slice]
        median = float(np.median(patches))
        separation = critical = None
        own_gap = 0
        if method == "auto":
            written = written_tokens(patches, inputs, min_growth) if inputs is not None and min_growth > 0 else None
            verdict = flag_outliers(patches, written, alpha=alpha, min_ratio=min_ratio, max_fraction=max_fraction,
                                    min_count=min_count)
            flagged, own_gap = verdict.flagged, verdict.own_gap_images
            thr = verdict.pooled.threshold if verdict.pooled is not None else None
            if verdict.pooled is not None:
                separation, critical = verdict.pooled.separation, verdict.pooled.critical
        else:
            thr = float(patches.mean() + k * patches.std()) if method == "sigma" else float(threshold)
            flagged = patches > thr
        masks.append(flagged)
        image, p = np.nonzero(flagged)
        found_parts.append(OutlierTable(image.astype(np.int32), np.full(image.size, layer, np.int32),
                                        (p + layout.num_prefix).astype(np.int32), patches[image, p].astype(np.float32)))
        if image.size and emergence is None:
            emergence = int(layer)
        layers.append(LayerNormStats(
            index=int(layer),
            median=median,
            max=float(patches.max()),
            ratio=float(patches.max() / median) if median > 0 else float("inf"),
            threshold=thr,
            outlier_fraction=float(image.size / patches.size),
            cls=float(norms[:, cls_idx].mean()) if cls_idx else None,
            registers=[float(v) for v in norms[:, reg_idx].mean(axis=0)] if reg_idx else [],
            outliers=int(image.size),
            separation=separation,
            critical=critical,
            own_gap_images=own_gap,
        ))
    settings: dict[str, Any]
    if method == "auto":
        settings = {"method": method, "alpha": alpha, "min_ratio": min_ratio, "max_fraction": max_fraction,
                    "min_count": min_count, "min_growth": min_growth if inputs is not None else None,
                    "pooled": "patch tokens of all images, absolute norms"}
    elif method == "sigma":
        settings = {"method": method, "k": k}
    else:
        settings = {"method": method, "threshold": threshold}
    return HighNormResult(method=method, settings=settings, layers=layers, outliers=OutlierTable.concat(found_parts),
                          emergence_layer=emergence, layout=layout, num_images=trace.num_images,
                          uniform=uniform_jumps(trace, masks))
