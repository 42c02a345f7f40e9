"""Causal ablations: replace what a target writes at chosen layers and measure what changes downstream.

A *target* names entries of one site of one block (docs/ablate.md):

``sinks``
    the attention-sink tokens the sink detector finds at block ``L`` (per image), at ``block_output``;
``registers``
    the register tokens of the layout (trained registers after the class token and test-time
    registers appended at the end), at ``block_output``;
``high-norm``
    the high-norm patch tokens the high-norm detector flags at block ``L`` (per image), at ``block_output``;
``massive``
    the massive activations the detector finds at block ``L``: their residual dimensions at their
    tokens (per image), at ``block_output``;
``neurons``
    register neurons (a ``neurons.json`` or ``{layer: [unit, ...]}``): those MLP hidden units at
    every token, at ``mlp_hidden`` of the neuron's block.

An *ablation* says what replaces the selected entries; every value a replacement needs is taken
from a first, clean pass over the same images:

``zero``
    zero;
``mean-images``
    the clean value at the same token position and channel, averaged over the images (for
    registers at every layer this is Fix-Reg-Mean, Sun et al. 2024);
``mean-kind``
    the clean mean over the images and over every token of the same kind (class token, register,
    patch) that the target does not select (all tokens of that kind when it selects every one):
    a high-norm patch becomes an average ordinary patch, a register the average register;
``resample``
    the clean value of another image at the same token position and channel; images are paired by a
    seeded derangement (no image receives its own values).

Each (target, layer, ablation) is one more pass over the images. Measured against the clean pass:
cosine similarity of the final features (last block output through the final norm) per token
kind, the class-token attention map's total variation per block, the model output's cosine (the
class token or pooled output), and the high-norm tokens left at the last block (counted at the clean
pass's thresholds held fixed, :func:`vsink.detect.norms.flag_at_reference`: a threshold refitted on
the ablated pass would move with the ablation; and the largest patch-norm ratio).

Intervals (:data:`INTERVAL_MEASURES`): the image is the unit. Per image the pass gives the sums
and counts behind each measure (cosines summed over the tokens of a kind, the last block's
class-attention total variation, the output cosine, the high-norm tokens left); a percentile
bootstrap over the images (:func:`vsink.evaluate.stats.bootstrap`) gives each measure's interval,
the point estimate being the measure itself. The largest and smallest values (``cos_patches_min``,
the max/median norm ratios) get none: they are not sums over images.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

# the passes' names stay importable from here (vsink.ablate.run_pass, Selection, ...)
from .ablation_passes import (ABLATIONS, TARGETS, Pass, Selection, derangement, install_ablation,  # noqa: F401
                              replacement, run_pass, select)
from .arguments import ArgumentError, images_arg, index_list_arg, instance_arg, int_arg, names_arg
from .attention_variants import attention_report
from .backbones.base import Backbone, backbone_arg
from .detect.attention import detect_sinks
from .detect.massive import detect_massive
from .detect.norms import HighNormResult, detect_high_norm, flag_at_reference
from .errors import ImageError, VsinkError, VsinkWarning
from .evaluate.stats import Bootstrap, bootstrap, interval_dict, ratio
from .images import ImageSource, NamedImage, load_batch
from .layout import TokenLayout
from .maps import parse_selection
from .options import BATCH, SEED, Choice, Float, InputPath, ListOf, Option, Text, declare
from .probe import Trace
from .registers.neurons import NeuronSpec
from .scan import parse_threshold
from .version import __version__

KINDS = ("cls", "registers", "patches")
#: the measures given a bootstrap interval over the images, in the order of :func:`image_units`' statistic
INTERVAL_MEASURES = ("cos_cls", "cos_registers", "cos_patches", "attn_tv", "output_cos", "high_norm_after")

ABLATE = declare(
    Option("targets", ListOf(Choice(TARGETS), nonempty=True, distinct=True), ["high-norm"], "what to ablate"),
    Option("ablations", ListOf(Choice(ABLATIONS), nonempty=True, distinct=True), ["zero"],
           "what replaces it (mean-images, mean-kind and resample from a first clean pass)"),
    Option("layers", Text(r"\s*(auto|-?\d+(\s*,\s*-?\d+)*)\s*,?\s*", "auto or a comma list of block indices "
           "(negative from the end)"), "auto", "blocks whose output is ablated (neurons: their own blocks, "
           "filtered to these)", default_text="auto: the first block with high-norm tokens, else the middle block"),
    Option("neurons", InputPath(), None, "neurons.json from 'vsink registers find' (target neurons)", nullable=True),
    Option("seed", SEED, 0, "seed of the resample derangement"),
    Option("sink_ratio", Float(0, min_open=True), 5.0, "sink = share of received attention >= this x the median share"),
    Option("massive_ratio", Float(0, min_open=True), 100.0, "massive = |activation| >= this x the median |activation|"),
    BATCH,
)


@dataclass
class AblationRow:
    """One (target, layer, ablation): what was selected and what changed."""

    target: str
    layer: int
    site: str
    ablation: str
    tokens: int
    channels: Optional[list[int]]
    cos_cls: Optional[float]
    cos_registers: Optional[float]
    cos_patches: float
    cos_patches_min: float
    attn_tv: Optional[float]
    attn_tv_per_block: Optional[list[float]]
    output_cos: Optional[float]
    high_norm_before: int
    high_norm_after: int
    max_ratio_before: float
    max_ratio_after: float
    #: per measure of :data:`INTERVAL_MEASURES` that the row has: ``{"value", "low", "high"}`` over the images
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the figure image's maps (:attr:`AblationResult.shown`): final patch norms, class-token
    #: attention (last block), patch cosine
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("maps")
        return out


@dataclass
class AblationResult:
    model: str
    images: list[str]
    skipped: list[dict[str, str]]
    layout: TokenLayout
    settings: dict[str, Any]
    selections: list[Selection]
    rows: list[AblationRow]
    clean_maps: dict[str, np.ndarray]
    synthetic: bool = False
    #: dense metrics of the clean and every ablated model (``dense=`` of :func:`ablate`), or None
    dense: Optional[Any] = None
    #: with ``dense=``: each selection chosen again on the dense images (rows: the dense clean pass's images)
    dense_selections: list[Selection] = field(default_factory=list)
    #: with ``dense=``: how the dense ablation was chosen (:func:`vsink.ablate_dense.dense_record`)
    dense_ablation: Optional[dict[str, Any]] = None
    #: an LVLM's answers, clean and under every ablation (:class:`vsink.ablate_lvlm.AnswerMeasures`), or None
    answers: Optional[Any] = None
    #: index in :attr:`images` of the image the figures show (:func:`shown_image`)
    shown: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "vsink_version": __version__, "images": self.images, "skipped": self.skipped,
                "figure_image": self.images[self.shown],
                "layout": self.layout.to_dict(), "settings": self.settings,
                "selections": [{"target": s.target, "layer": s.layer, "site": s.site, "tokens": s.count,
                                "channels": s.channels} for s in self.selections],
                "rows": [r.to_json() for r in self.rows],
                "dense": None if self.dense is None else "dense.json", "dense_ablation": self.dense_ablation,
                "answers": None if self.answers is None else self.answers.to_json()}


#: called before each ablated pass with the selection, the ablation and its replacement values
#: [I, N, C'] (``each=`` of :func:`ablate`), to measure more under the same ablation
EachAblation = Callable[["Selection", str, torch.Tensor], None]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


def _last_ratio(trace: Trace, layout: TokenLayout) -> float:
    patches = trace.norms[-1][:, layout.patch_slice]
    median = float(np.median(patches))
    return float(patches.max() / median) if median > 0 else float("inf")


def _cls_maps(trace: Trace) -> Optional[np.ndarray]:
    """Class-token attention per block, heads averaged: [L, I, N] (None without a class token)."""
    if trace.attn_cls is None or trace.layout.cls_token is None:
        return None
    return trace.attn_cls.mean(axis=2)


def image_units(cos: torch.Tensor, layout: TokenLayout, tv: Optional[np.ndarray], output_cos: Optional[torch.Tensor],
                high_norm_after: np.ndarray) -> np.ndarray:
    """One row per image, the sums and counts behind the interval measures: ``[1, Σ cos cls, n cls,
    Σ cos registers, n registers, Σ cos patches, n patches, class-attention TV, output cosine,
    high-norm tokens left]`` (``cos`` [I, N] per token; ``tv`` [I] at the last block or None;
    ``output_cos`` [I] or None; ``high_norm_after`` [I]); :func:`interval_statistic` maps their
    sums to the measures."""
    parts = layout.split(cos.double())
    images = cos.shape[0]
    zeros = np.zeros(images)
    cols = [np.ones(images)]
    for kind in KINDS:
        part = parts[kind]
        cols += [part.sum(1).numpy() if part.numel() else zeros, np.full(images, float(part.shape[1]))]
    cols += [zeros if tv is None else np.asarray(tv, dtype=np.float64),
             zeros if output_cos is None else output_cos.double().numpy(), np.asarray(high_norm_after, np.float64)]
    return np.stack(cols, axis=1)


def interval_statistic(sums: np.ndarray) -> np.ndarray:
    """Column sums of :func:`image_units` ``[..., 10]`` → the measures of :data:`INTERVAL_MEASURES`
    ``[..., 6]``: the three mean cosines, mean TV, mean output cosine (means over images) and the
    total of high-norm tokens left."""
    n = sums[..., 0]
    return np.stack([ratio(sums[..., 1], sums[..., 2]), ratio(sums[..., 3], sums[..., 4]),
                     ratio(sums[..., 5], sums[..., 6]), ratio(sums[..., 7], n), ratio(sums[..., 8], n),
                     sums[..., 9]], axis=-1)


def measure(clean: Pass, ablated: Pass, layout: TokenLayout, high_norm: HighNormResult,
            detect_kwargs: Mapping[str, Any], stats: Bootstrap = Bootstrap(), shown: int = 0) -> dict[str, Any]:
    """The measures of one ablated pass against the clean one, with their intervals over the
    images (``stats``; see the module docstring); the figure's maps are image ``shown``'s."""
    cos = _cosine(clean.features, ablated.features)  # [I, N]
    parts = layout.split(cos)
    mean = lambda t: float(t.mean()) if t.numel() else None  # noqa: E731
    patches = parts["patches"]
    before, after = _cls_maps(clean.trace), _cls_maps(ablated.trace)
    tv = None if before is None else 0.5 * np.abs(after - before).sum(axis=-1).mean(axis=1)  # [L]
    last = clean.trace.layers[-1]
    held = flag_at_reference(clean.trace, ablated.trace, -1, **detect_kwargs)  # the clean thresholds, held fixed
    after_mask = held if held is not None else detect_high_norm(ablated.trace, **detect_kwargs).mask(last)
    output_cos, per_image_output = None, None
    if clean.outputs is not None and ablated.outputs is not None:
        per_image_output = _cosine(clean.outputs, ablated.outputs)
        output_cos = float(per_image_output.mean())
    left = after_mask.sum(axis=1).astype(np.float64)
    tv_last = None if before is None else 0.5 * np.abs(after[-1] - before[-1]).sum(axis=-1)  # [I]
    iv = interval_dict(bootstrap(image_units(cos, layout, tv_last, per_image_output, left), interval_statistic,
                                 stats), INTERVAL_MEASURES)
    maps = {"norms": ablated.trace.norms[-1][shown, layout.patch_slice],
            "cos": layout.patches(cos, dim=1)[shown].numpy()}
    if after is not None:
        maps["cls_attention"] = after[-1, shown, layout.patch_slice]
    return dict(
        cos_cls=mean(parts["cls"]),
        cos_registers=mean(parts["registers"]) if layout.total_registers else None,
        cos_patches=float(patches.mean()), cos_patches_min=float(patches.min()),
        attn_tv=None if tv is None else float(tv[-1]),
        attn_tv_per_block=None if tv is None else [float(v) for v in tv],
        output_cos=output_cos,
        high_norm_before=len(high_norm.tokens_at(last)), high_norm_after=int(after_mask.sum()),
        max_ratio_before=_last_ratio(clean.trace, layout), max_ratio_after=_last_ratio(ablated.trace, layout),
        intervals={k: v for k, v in iv.items() if not (
            (k == "cos_cls" and not parts["cls"].numel()) or (k == "cos_registers" and not layout.total_registers)
            or (k == "attn_tv" and tv is None) or (k == "output_cos" and output_cos is None))},
        maps=maps,
    )


def _neuron_layers(neurons: Union[NeuronSpec, Mapping[int, Sequence[int]], None],
                   backbone: Backbone) -> dict[int, list[int]]:
    """``{block: [unit, ...]}`` of ``neurons``, every block and unit checked against ``backbone``."""
    if neurons is None:
        raise VsinkError("target neurons needs register neurons (--neurons neurons.json from 'vsink registers find')")
    if isinstance(neurons, NeuronSpec):
        by_layer = neurons.by_layer()
    elif isinstance(neurons, Mapping):
        by_layer = {}
        for key, units in neurons.items():
            layer = int_arg(key, "neurons: block", 0, backbone.num_layers - 1)
            width = backbone.mlp_width(layer)
            by_layer[layer] = [int_arg(u, f"neurons[{layer}]: unit", 0, width - 1)
                               for u in index_list_arg(units, f"neurons[{layer}]")]
    else:
        raise ArgumentError(f"neurons must be a NeuronSpec or {{block: [unit, ...]}}, got the {type(neurons).__name__} "
                            f"{neurons!r:.80}")
    return {layer: sorted(set(int(u) for u in units)) for layer, units in sorted(by_layer.items())}


def _warn_auto_empty(target: str, layer: int, trace: Trace, sink_ratio: float, massive_ratio: float) -> None:
    """Warn that ``--layers auto`` (the high-norm emergence block) gave ``target`` nothing to ablate,
    naming the blocks where it has entries (sinks and massive activations rise at blocks of their own)."""
    if target == "sinks":
        found = sorted({s.layer for s in detect_sinks(trace, ratio=sink_ratio)})
    elif target == "massive":
        found = sorted({m.layer for m in detect_massive(trace, min_ratio=massive_ratio)})
    else:
        return
    where = (f"it has entries at block(s) {', '.join(map(str, found))}: pass --layers (layers=) {found[0]}"
             if found else "it has none at any block")
    warnings.warn(f"target {target} selects nothing at block {layer}, the block --layers auto chose (the first "
                  f"with high-norm tokens, else the middle one); {where}", VsinkWarning, stacklevel=3)


def _layers(layers: Union[str, Sequence[int], None], backbone: Backbone, high_norm: HighNormResult) -> list[int]:
    chosen = parse_selection(layers, backbone.num_layers, "layers", ("auto",))
    if chosen != "auto":
        return list(chosen)
    emergence = high_norm.emergence_layer
    return [emergence if emergence is not None else backbone.num_layers // 2]


def shown_image(selections: Sequence[Selection]) -> int:
    """The image the report's figures show: the one with the most selected tokens over all
    selections (the first on ties, image 0 when nothing is selected), so a figure shows an
    ablation where it happened rather than an image it left alone."""
    if not selections:
        return 0
    counts = sum(s.tokens.sum(axis=1) for s in selections)
    return int(np.argmax(counts))


def _thumbnail(images: Sequence[Any], name: str, size: tuple[int, int]) -> Optional[np.ndarray]:
    """The input named ``name`` at the model's input size, for the figures (None if it no longer
    opens)."""
    from .images import open_image, source_name

    for i, item in enumerate(images):
        if source_name(item, i) == name:
            try:
                return np.asarray(open_image(item).convert("RGB").resize((size[1], size[0])))
            except (ImageError, OSError):
                return None
    return None


def ablate(
    backbone: Backbone,
    images: Sequence[Union[ImageSource, NamedImage]],
    *,
    targets: Sequence[str] = ("high-norm",),
    ablations: Sequence[str] = ("zero",),
    layers: Union[str, Sequence[int], None] = "auto",
    neurons: Union[NeuronSpec, Mapping[int, Sequence[int]], None] = None,
    seed: int = 0,
    batch_size: int = 8,
    img_size: Optional[int] = None,
    threshold: Union[str, float, None] = "auto",
    sink_ratio: float = 5.0,
    massive_ratio: float = 100.0,
    stats: Bootstrap = Bootstrap(),
    dense: Optional[tuple[Any, Any]] = None,
    dense_tasks: Optional[Sequence[str]] = None,
    preprocess: Optional[Callable[[list[Any], list[str]], torch.Tensor]] = None,
    each: Optional[EachAblation] = None,
    progress: bool = True,
) -> AblationResult:
    """Ablate each target at each layer with each ablation and measure the change (module docstring).

    Args:
        backbone: from :func:`vsink.load` or :func:`vsink.wrap`.
        images: file paths, PIL images or :class:`~vsink.images.NamedImage` (unreadable files skipped).
        targets: some of :data:`TARGETS`.
        ablations: some of :data:`ABLATIONS`.
        layers: ``"auto"`` (the first block with high-norm tokens, else the middle block) or block
            indices; target ``neurons`` uses its neurons' own blocks, kept when in ``layers`` (unless auto).
        neurons: register neurons for target ``neurons`` (a :class:`NeuronSpec` or ``{layer: [unit, ...]}``).
        seed: seed of the resample derangement.
        threshold: the high-norm detector's threshold (``"auto"``, ``"sigma:K"`` or a norm).
        stats: the bootstrap of the intervals over the images (level, resamples, seed).
        dense: ``(eval_set, train_set)`` (:class:`~vsink.evaluate.datasets.DenseDataset`; train_set
            None without linear-seg): also evaluate the clean model and every ablated one on dense
            tasks (:mod:`vsink.ablate_dense`: every target, chosen again on each dense image, and
            every ablation, its values from the dense images' clean pass).
        dense_tasks: the dense tasks (default: all the dataset supports).
        preprocess: a batch of PIL images and their names → the model's pixel values, one row per
            image (default: the backbone's own preprocessing at ``img_size``); :mod:`vsink.ablate_lvlm`
            passes the LVLM's processor (one "image" per tower input: an image's tiles are several).
        each: called with the selection, the ablation and its replacement values [I, N, C'] before
            each ablated pass (:mod:`vsink.ablate_lvlm` asks the LVLM its questions under it).
    """
    backbone = backbone_arg(backbone)
    images = images_arg(images)
    targets, ablations = names_arg(targets, "targets"), names_arg(ablations, "ablations")
    img_size = int_arg(img_size, "img_size", 1, nullable=True)
    instance_arg(stats, Bootstrap, "stats", "a vsink.evaluate.stats.Bootstrap")
    for key, value in (("targets", targets), ("ablations", ablations), ("seed", seed),
                       ("sink_ratio", sink_ratio), ("massive_ratio", massive_ratio), ("batch_size", batch_size)):
        ABLATE[key].check(value)
    detect_kwargs = parse_threshold(threshold)
    if dense is not None:
        from .ablate_dense import check_dense

        check_dense(dense, dense_tasks, resample="resample" in ablations)
    size = (img_size, img_size) if img_size else backbone.img_size
    backbone.check_input_size(size)
    if isinstance(neurons, NeuronSpec):
        neurons.check(backbone)
    by_layer = _neuron_layers(neurons, backbone) if "neurons" in targets else {}
    names: list[str] = []
    skipped: list[dict[str, str]] = []
    batches: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        batch, batch_names, failed = load_batch(images[start:start + batch_size], start)
        for entry in failed:
            print(f"vsink: skipped {entry['reason']}", file=sys.stderr)
        skipped += failed
        if batch:
            batches.append(preprocess(batch, batch_names) if preprocess is not None
                           else backbone.preprocess(batch, size))
            names += batch_names
    if not names:
        raise VsinkError("no image could be read")
    if "resample" in ablations and len(names) < 2:
        raise VsinkError("ablation resample needs at least 2 images (each takes another image's values)")

    first = run_pass(backbone, batches)
    layout = first.trace.layout
    high_norm = detect_high_norm(first.trace, **detect_kwargs)
    chosen = _layers(layers, backbone, high_norm)
    selections: list[Selection] = []
    explicit = parse_selection(layers, backbone.num_layers, "layers", ("auto",))
    for target in targets:
        if target == "neurons":
            keep = [l for l in by_layer if explicit == "auto" or l in explicit]
            if not keep:
                raise VsinkError(f"target neurons: no register neuron in blocks {chosen} (neurons in {sorted(by_layer)})")
            selections += [select(target, l, first.trace, high_norm=high_norm, sink_ratio=sink_ratio,
                                  massive_ratio=massive_ratio, neurons=by_layer[l]) for l in keep]
        else:
            selections += [select(target, l, first.trace, high_norm=high_norm, sink_ratio=sink_ratio,
                                  massive_ratio=massive_ratio) for l in chosen]
            if explicit == "auto" and selections[-1].count == 0:
                _warn_auto_empty(target, chosen[0], first.trace, sink_ratio, massive_ratio)
    shown = shown_image(selections)
    needs_clean = any(a != "zero" for a in ablations)
    sites = sorted({(s.site, s.layer) for s in selections}) if needs_clean else []
    clean = run_pass(backbone, batches, capture=sites) if sites else first  # the site values of the chosen blocks

    rows: list[AblationRow] = []
    bar = tqdm(total=len(selections) * len(ablations), desc="ablate", unit="pass", disable=not progress)
    for selection in selections:
        for ablation in ablations:
            site_values = clean.sites.get((selection.site, selection.layer))
            if ablation == "zero":
                width = backbone.mlp_width(selection.layer) if selection.site == "mlp_hidden" else backbone.embed_dim
                channels = width if selection.channels is None else len(selection.channels)
                values = torch.zeros(1, 1, channels).expand(len(names), layout.num_tokens, channels)
            else:
                values = replacement(selection, ablation, site_values, layout, seed)
            if each is not None:
                each(selection, ablation, values)
            ablated = run_pass(backbone, batches, ablation=(selection, values))
            measured = measure(clean, ablated, layout, high_norm, detect_kwargs, stats, shown)
            rows.append(AblationRow(target=selection.target, layer=selection.layer, site=selection.site,
                                    ablation=ablation, tokens=selection.count, channels=selection.channels,
                                    **measured))
            bar.update(1)
    bar.close()
    clean_maps = {"norms": clean.trace.norms[-1][shown, layout.patch_slice]}
    cls_maps = _cls_maps(clean.trace)
    if cls_maps is not None:
        clean_maps["cls_attention"] = cls_maps[-1, shown, layout.patch_slice]
    thumbnail = _thumbnail(images, names[shown], size)
    if thumbnail is not None:
        clean_maps["image"] = thumbnail
    settings = {"targets": list(targets), "ablations": list(ablations), "layers": chosen, "seed": seed,
                "batch_size": batch_size, "input_size": list(size), "threshold": detect_kwargs,
                "sink_ratio": sink_ratio, "massive_ratio": massive_ratio, "intervals": stats.to_dict(unit="image"),
                "neurons": {str(k): v for k, v in by_layer.items()} if by_layer else None,
                "edits": list(backbone.edits), "attention": attention_report(backbone.model)}
    dense_result, dense_selections, dense_record = None, [], None
    if dense is not None:
        dense_result, dense_selections, dense_record = _ablate_dense(
            backbone, dense, dense_tasks, selections, ablations, high_norm, size=size, seed=seed,
            batch_size=batch_size, img_size=img_size, detect_kwargs=detect_kwargs, sink_ratio=sink_ratio,
            massive_ratio=massive_ratio, stats=stats, progress=progress)
    return AblationResult(model=backbone.spec, images=names, skipped=skipped, layout=layout, settings=settings,
                          selections=selections, rows=rows, clean_maps=clean_maps, shown=shown,
                          synthetic=backbone.synthetic is not None, dense=dense_result,
                          dense_selections=dense_selections, dense_ablation=dense_record)


def _ablate_dense(backbone: Backbone, dense: tuple[Any, Any], tasks: Optional[Sequence[str]],
                  selections: list[Selection], ablations: Sequence[str], high_norm: HighNormResult, *,
                  size: tuple[int, int], seed: int, batch_size: int, img_size: Optional[int],
                  detect_kwargs: dict[str, Any], sink_ratio: float, massive_ratio: float, stats: Bootstrap,
                  progress: bool) -> tuple[Any, list[Selection], dict[str, Any]]:
    """The dense metrics of the clean model and every ablated one (:mod:`vsink.ablate_dense`): the
    targets selected again on each dense image, the replacements from the dense images' clean pass."""
    from .ablate_dense import dense_clean_pass, dense_pairing, dense_record, dense_selection, dense_variant
    from .evaluate.dense import evaluate_dense
    from .evaluate.variants import Variant

    sites = sorted({(s.site, s.layer) for s in selections}) if any(a != "zero" for a in ablations) else []
    images = dense_clean_pass(backbone, dense[0], dense[1], tasks=tasks, sites=sites, size=size,
                              batch_size=batch_size, threshold=detect_kwargs)
    partner = dense_pairing(images, seed) if "resample" in ablations else None
    chosen = [dense_selection(s, images, sink_ratio=sink_ratio, massive_ratio=massive_ratio) for s in selections]
    variants = [dense_variant(f"{s.target}@{s.layer}:{a}", s, a, images, partner) for s in chosen for a in ablations]
    result = evaluate_dense(backbone, dense[0], train_set=dense[1], tasks=tasks, variants=[Variant("clean"), *variants],
                            batch_size=batch_size, img_size=img_size, progress=progress, bootstrap=stats)
    return result, chosen, dense_record(images, chosen, high_norm, partner)
