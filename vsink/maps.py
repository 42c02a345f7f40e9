"""``vsink.export_maps``: attention and norm maps per image, as arrays (.npz) and overlays (.png).

Kinds: ``cls`` (class token → every token), ``received`` (attention each token receives, mean
over queries), ``norm`` (token norms), ``rollout`` (see :mod:`vsink.rollout`), ``pool`` (the
attention-pooling head's probe → every output token, for models pooled that way: SigLIP,
SigLIP2, AIMv2) and ``full`` (raw attention matrices, npz only, streamed block by block). Array
names: docs/maps.md.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .arguments import images_arg, index_list_arg, int_arg, names_arg
from .attention_variants import attention_report
from .backbones.base import Backbone, backbone_arg
from .errors import VsinkError, VsinkWarning
from .finite import FiniteGuard
from .images import ImageSource, NamedImage, load_batch, source_name
from .io import NpzWriter, write_json
from .manifest import weights_fingerprint
from .outputs import OutputSet, check_output_dir, derived_names
from .version import __version__
from .layout import TokenLayout
from .export.maps import ImageMaps
from .export.scales import Scale
from .viewbox import DISPLAY_SIDE
from .probe import Probe
from .shard import Shard
from .rollout import FUSIONS, FullAttentionObserver, RolloutObserver
from . import wording

KINDS = ("cls", "received", "norm", "rollout", "pool", "full")
#: the kinds drawn by default, those the model's layout allows (:func:`default_kinds`)
DEFAULT_KINDS = ("cls", "received", "norm", "rollout", "pool")
HEAD_KINDS = ("cls", "received")


def default_kinds(backbone: Backbone) -> tuple[list[str], list[str]]:
    """The default kinds for ``backbone`` and a note for each default it leaves out: ``cls`` only
    with a class token, ``pool`` only with an attention-pooling head (SigLIP, SigLIP2, AIMv2)."""
    kinds, left_out = [], []
    for kind in DEFAULT_KINDS:
        if kind == "cls" and backbone.layout().num_cls == 0:
            left_out.append("cls (no class token)")
        elif kind == "pool" and backbone.pool_head is None:
            left_out.append("pool (no attention-pooling head)")
        else:
            kinds.append(kind)
    return kinds, left_out


@dataclass
class MapsResult:
    model: str
    synthetic: bool
    images: list[ImageMaps]
    skipped: list[dict[str, str]]
    settings: dict[str, Any]
    #: the colour scale of each drawn kind, shared by all images and blocks (:mod:`vsink.export.scales`)
    scales: dict[str, Scale] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "synthetic": self.synthetic,
            "images": [{"image": m.name, "stem": m.stem, "layout": m.layout.to_dict(),
                        "size": list(m.size) if m.size else None,
                        "view_box": m.view_box.to_list() if m.view_box else None, "files": m.files}
                       for m in self.images],
            "scales": {kind: scale.to_dict() for kind, scale in self.scales.items()},
            "skipped": self.skipped,
            "settings": self.settings,
        }


def parse_selection(value: Union[str, Sequence[int], None], count: int, what: str,
                    keywords: Sequence[str]) -> Union[str, list[int]]:
    """``"all"`` / ``"mean"`` (as allowed) or a comma list of indices (negative from the end);
    surrounding spaces and one trailing comma allowed, as the options' patterns allow them."""
    if isinstance(value, str):
        value = value.strip()
        value = value[:-1].strip() if value.endswith(",") else value
    if value is None or (isinstance(value, str) and value in keywords):
        return value or keywords[0]
    if not isinstance(value, str):
        indices = index_list_arg(value, what)
    else:
        try:
            indices = [int(v) for v in value.split(",")]
        except ValueError:
            raise VsinkError(f"{what} must be {' | '.join(keywords)} or a comma list of integers, got {value!r}") from None
    bad = [i for i in indices if not -count <= i < count]
    if bad:
        raise VsinkError(f"{what} {bad} out of range: indices in [{-count}, {count - 1}] for {count} {what}")
    resolved = [i % count for i in indices]
    twice = sorted({i for i in resolved if resolved.count(i) > 1})
    if twice:
        raise VsinkError(f"{what} {twice} given more than once")
    return sorted(set(resolved))


def input_size(backbone: Backbone, image: Image.Image, img_size: Optional[int], keep_aspect: bool) -> tuple[int, int]:
    """Square ``img_size`` (default the model's), or for dynamic-size models with ``keep_aspect``
    the image's aspect ratio with the longer side ``img_size``, rounded to whole patches."""
    side = img_size or backbone.img_size[0]
    if not keep_aspect:
        return side, side
    if not backbone.dynamic_size:
        raise VsinkError(f"{backbone.spec} takes fixed-size inputs; keep_aspect needs a dynamic-size model")
    w, h = image.size
    ph, pw = backbone.patch_size
    scale = side / max(w, h)
    return max(ph, round(h * scale / ph) * ph), max(pw, round(w * scale / pw) * pw)


def _head_arrays(kind: str, layer: Optional[int], values: np.ndarray, layout: TokenLayout,
                 heads: Union[str, list[int]]) -> dict[str, np.ndarray]:
    """values [H, N] → ``kind/layerL`` [heads, h, w], ``/mean`` [h, w], ``/prefix`` [H, n_prefix]
    (``kind`` alone for a map of no block: ``pool``)."""
    key = kind if layer is None else f"{kind}/layer{layer}"
    out = {f"{key}/mean": layout.patch_grid(values.mean(axis=0), dim=0),
           f"{key}/prefix": values[:, layout.non_patch_indices()]}
    if heads != "mean":
        chosen = values if heads == "all" else values[heads]
        out[key] = layout.patch_grid(chosen, dim=1)
    return out


def stems(names: Sequence[str], out_dir: Union[str, os.PathLike]) -> list[str]:
    """The output stem of each input name: its file stem made safe (never ``.``, ``..``, hidden or
    a path), numbered ``-2``, ``-3`` on a clash, so that ``<stem>.npz`` and ``<stem>/`` of two
    inputs never collide with each other or with ``maps.json`` and stay inside ``out_dir``."""
    bases = [Path(name.split(":", 1)[-1]).stem for name in names]
    return derived_names(bases, out_dir, entries=("{}", "{}.npz"), reserved=("maps.json",))


def export_maps(
    backbone: Backbone,
    images: Sequence[Union[ImageSource, NamedImage]],
    out_dir: Union[str, os.PathLike],
    *,
    kinds: Optional[Sequence[str]] = None,
    layers: Union[str, Sequence[int], None] = "all",
    heads: Union[str, Sequence[int], None] = "mean",
    formats: Sequence[str] = ("png", "npz"),
    fusion: str = "mean",
    discard_ratio: float = 0.0,
    img_size: Optional[int] = None,
    keep_aspect: bool = False,
    progress: bool = True,
    shard: Optional[Shard] = None,
) -> Optional[MapsResult]:
    """Export maps for each image into ``out_dir`` (``<stem>.npz``, ``<stem>/*.png``, ``maps.json``;
    stems from :func:`stems`).

    ``kinds`` default (None): :func:`default_kinds`, those of ``cls``, ``received``, ``norm``,
    ``rollout`` and ``pool`` the model's layout allows; ``settings["kinds"]`` of the result says
    which were drawn.

    Unreadable images are skipped and listed (none readable: a :class:`VsinkError`). The files are
    written as one set with the folder's ``vsink-run.json`` (:class:`vsink.outputs.OutputSet`):
    they replace the earlier export (its files included, where an image is no longer exported) when
    every image is done, and an interruption or a failure leaves the earlier export as it was. The
    PNGs are drawn after the last image, on one colour scale per kind shared by all images and
    blocks (``scales`` in maps.json), from the arrays read back from each npz (with
    ``formats=["png"]`` alone they stay in memory until then). Each map is drawn on the region of
    the original image the model saw (``view_box``).

    ``shard`` (under ``torchrun``, :mod:`vsink.shard`): rank 0 holds the folder and its staging
    folder, every rank computes and writes the npz files of its images into it (image ``i`` on rank
    ``i % N``), rank 0 folds the colour scales over every image in order and sends them, every rank
    draws its images' PNGs, and rank 0 writes ``maps.json`` and swaps the set in: the files equal
    one process's. Rank 0 returns the result, the other ranks None.
    """
    backbone = backbone_arg(backbone)
    images = images_arg(images)
    img_size = int_arg(img_size, "img_size", 1, nullable=True)
    kinds = default_kinds(backbone)[0] if kinds is None else list(dict.fromkeys(names_arg(kinds, "kinds")))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise VsinkError(f"unknown map kind(s) {unknown}; kinds are {', '.join(KINDS)}")
    formats = list(dict.fromkeys(names_arg(formats, "formats")))
    if not formats or any(f not in ("png", "npz") for f in formats):
        raise VsinkError(f"formats must be png and/or npz, got {formats}")
    if "full" in kinds and "npz" not in formats:
        raise VsinkError("kind 'full' is written to npz only: add npz to the formats")
    if fusion not in FUSIONS:
        raise VsinkError(f"unknown head fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    if "cls" in kinds and backbone.layout().num_cls == 0:
        pooled = " (its attention-pooling head's probe: kind 'pool')" if backbone.pool_head is not None else ""
        raise VsinkError(f"{backbone.spec} has no class token: kind 'cls' is not available{pooled}")
    if "pool" in kinds and backbone.pool_head is None:
        raise VsinkError(f"{backbone.spec} has no attention-pooling head: kind 'pool' is not available")
    sel_layers = parse_selection(layers, backbone.num_layers, "layers", ("all",))
    sel_layers = list(range(backbone.num_layers)) if sel_layers == "all" else sel_layers
    sel_heads = parse_selection(heads, backbone.num_heads, "heads", ("mean", "all"))
    out = check_output_dir(out_dir, "out_dir")
    image_stems = stems([source_name(item, i) for i, item in enumerate(images)], out)
    settings = {"kinds": kinds, "layers": sel_layers, "heads": sel_heads, "formats": formats, "fusion": fusion,
                "discard_ratio": discard_ratio, "img_size": img_size, "keep_aspect": keep_aspect,
                "attention": attention_report(backbone.model)}
    determining = {"model": backbone.spec, "weights": weights_fingerprint(backbone.model),
                   "images": [source_name(item, i) for i, item in enumerate(images)], "settings": settings,
                   "vsink_version": __version__}
    shard = shard or Shard()
    with ExitStack() as stack:  # rank 0 holds the set; every rank writes into its staging folder
        stage = shard.on_main(lambda: stack.enter_context(OutputSet(out, "vsink maps", {"determining": determining})))
        return _export_all(backbone, images, stage, image_stems, settings, progress, shard)


def _export_all(backbone: Backbone, images: Sequence[Union[ImageSource, NamedImage]], out: Path,
                image_stems: list[str], settings: dict[str, Any], progress: bool,
                shard: Shard) -> Optional[MapsResult]:
    """Every image's maps into ``out`` (the staging folder of the set), then ``maps.json``."""
    from .export.maps import fold_scales, map_scales, panel_extents, reload, render_image_pngs

    kinds, sel_layers, sel_heads, formats = settings["kinds"], settings["layers"], settings["heads"], settings["formats"]
    fusion, discard_ratio, img_size = settings["fusion"], settings["discard_ratio"], settings["img_size"]
    keep_aspect = settings["keep_aspect"]
    done: list[ImageMaps] = []
    skipped: list[dict[str, str]] = []
    scales: dict[str, Scale] = {}
    warned = not shard.main  # rank 0 warns for all
    extents: list[tuple[int, list[dict[str, str]], Optional[dict[str, np.ndarray]]]] = []  # under torchrun
    indices = [i for i in range(len(images)) if shard.owns(i)]

    def compute() -> list[tuple[int, list[dict[str, str]], Optional[dict[str, np.ndarray]]]]:
        """This process's images: their maps written (npz); under torchrun, each image's colour
        extents (None for a skipped file), for rank 0 to fold."""
        nonlocal scales, warned
        for index in tqdm(indices, desc="maps", unit="img", disable=not progress or not shard.main):
            loaded, names, failed = load_batch([images[index]], index)
            for entry in failed:
                print(f"vsink: skipped {entry['reason']}", file=sys.stderr)
            skipped.extend(failed)
            if not shard.alone:
                extents.append((index, failed, None))
            if not loaded:
                continue
            image, name = loaded[0], names[0]
            size = input_size(backbone, image, img_size, keep_aspect)
            layout = backbone.layout(size)
            if "full" in kinds and not warned:
                n_heads = backbone.num_heads if sel_heads in ("mean", "all") else len(sel_heads)
                per_image = len(sel_layers) * n_heads * layout.num_tokens ** 2 * 4
                shape = (f"{wording.count(len(sel_layers), 'block')} x {wording.count(n_heads, 'head')} x "
                         f"{layout.num_tokens}^2 float32")
                warnings.warn(f"kind 'full' writes about {per_image / 2**20:.1f} MiB per image ({shape}), "
                              f"{len(images) * per_image / 2**20:.1f} MiB for all images", VsinkWarning, stacklevel=4)
                warned = True
            box = backbone.view_box(image.size)
            maps = ImageMaps(name, image_stems[index], box.crop(image, side=DISPLAY_SIDE), layout, {}, view_box=box,
                             size=image.size)
            with ExitStack() as stack:
                writer = stack.enter_context(NpzWriter(out / f"{maps.stem}.npz")) if "npz" in formats else None
                maps.arrays = _compute(backbone, image, maps, size, kinds, sel_layers, sel_heads, fusion, discard_ratio,
                                       writer, stack)
                if writer is not None:
                    for key, arr in maps.arrays.items():
                        writer.add(key, arr)
                    writer.add("image", np.asarray(maps.image.convert("RGB"), dtype=np.uint8))
                    writer.add("view_box", np.asarray(box.to_list(), dtype=np.float64))
                    maps.files.append(f"{maps.stem}.npz")
            if "png" in formats and shard.alone:
                scales = map_scales([maps], kinds, sel_layers, sel_heads, scales)
            elif not shard.alone:
                extents[-1] = (index, failed, panel_extents(maps, kinds, sel_layers, sel_heads))
            if "npz" in formats:  # on disk now: read back to draw
                maps.arrays, maps.image = {}, None
            done.append(maps)
        return extents

    parts = shard.settle(compute)  # an error on any process stops every one
    if not shard.alone:  # rank 0 folds the colour scales over every image in order, as one process does

        def fold() -> dict[str, Scale]:
            ordered = sorted((e for part in parts for e in part), key=lambda e: e[0])
            if not any(extent is not None for _, _, extent in ordered):
                raise VsinkError(f"no image could be read ({wording.count(len(images), 'file')} skipped)")
            folded: dict[str, Scale] = {}
            for _, _, extent in ordered:
                if extent is not None and "png" in formats:
                    folded = fold_scales([extent], folded)
            return folded

        scales = shard.on_main(fold)
    elif not done:  # each skipped file was reported as the export met it; the earlier export stays
        raise VsinkError(f"no image could be read ({wording.count(len(skipped), 'file')} skipped)")

    def draw() -> list[tuple[int, list[dict[str, str]], Optional[ImageMaps]]]:
        """This process's PNGs; under torchrun, its images' entries for rank 0's list."""
        if "png" in formats:
            for maps in done:
                if "npz" in formats:
                    reload(maps, out / f"{maps.stem}.npz")
                maps.files += render_image_pngs(maps, out, backbone.spec, kinds, sel_layers, sel_heads, scales)
                maps.arrays, maps.image = {}, None
        by_index = dict(zip([i for i, _, e in extents if e is not None], done))
        return [(index, failed, by_index.get(index)) for index, failed, _ in extents]

    parts = shard.settle(draw)
    if parts is None:
        return None
    if not shard.alone:  # rank 0 lists every rank's images in order
        ordered = sorted((e for part in parts for e in part), key=lambda e: e[0])
        skipped = [entry for _, failed, _ in ordered for entry in failed]
        done = [maps for _, _, maps in ordered if maps is not None]
    result = MapsResult(backbone.spec, backbone.synthetic is not None, done, skipped, settings, scales)
    write_json(out / "maps.json", result.to_json())
    return result


def _compute(backbone: Backbone, image: Image.Image, maps: ImageMaps, size: tuple[int, int], kinds: list[str],
             layers: list[int], heads: Union[str, list[int]], fusion: str, discard_ratio: float,
             writer: Optional[NpzWriter], stack: ExitStack) -> dict[str, np.ndarray]:
    layout = maps.layout
    x = backbone.preprocess([image], size)
    want_attention = any(k in kinds for k in HEAD_KINDS)
    stack.enter_context(FiniteGuard(backbone))
    probe = None
    if want_attention or "norm" in kinds:
        probe = stack.enter_context(Probe(backbone, layers=layers, norms="norm" in kinds, attention=want_attention))
    rollout = RolloutObserver(fusion, discard_ratio) if "rollout" in kinds else None
    if rollout is not None:
        for handle in rollout.install(backbone, layout):
            stack.callback(handle.remove)
    pooled: list[np.ndarray] = []
    if "pool" in kinds:
        stack.callback(backbone.hook_pool(lambda probs: pooled.append(probs[0, :, 0].float().cpu().numpy())).remove)
    if "full" in kinds:
        head_list = None if heads in ("mean", "all") else heads
        full = FullAttentionObserver(layers, head_list,
                                     lambda layer, a: writer.add(f"full/layer{layer}", a[0].numpy()))
        for handle in full.install(backbone):
            stack.callback(handle.remove)
    if probe is not None:
        probe.run(x)
    else:
        backbone.forward(x)
    arrays: dict[str, np.ndarray] = {}
    if probe is not None:
        trace = probe.trace()
        for pos, layer in enumerate(trace.layers):
            if "cls" in kinds:
                arrays.update(_head_arrays("cls", layer, trace.attn_cls[pos, 0], layout, heads))
            if "received" in kinds:
                arrays.update(_head_arrays("received", layer, trace.attn_received[pos, 0], layout, heads))
            if "norm" in kinds:
                norms = trace.norms[pos, 0]
                arrays[f"norm/layer{layer}"] = layout.patch_grid(norms, dim=0)
                arrays[f"norm/layer{layer}/prefix"] = norms[layout.non_patch_indices()]
    if pooled:
        arrays.update(_head_arrays("pool", None, pooled[0], backbone.pool_layout(size), heads))
    if rollout is not None:
        row = rollout.row()[0].numpy()
        arrays["rollout"] = layout.patch_grid(row, dim=0)
        arrays["rollout/prefix"] = row[layout.non_patch_indices()]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

