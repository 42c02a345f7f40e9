"""Per generated token, the attention its query pays to the image, as arrays and pictures.

For batch row b: ``DIR/row<b>.npz`` with ``attention`` [steps, layers, h, w] (head mean per layer,
NaN where FastV pruned a token), ``layer_mean`` [steps, h, w] (mean over layers, pruned tokens
ignored), ``tokens`` [steps] (the generated ids), ``words`` (JSON: each generated token decoded
alone), ``image_token`` (the image placeholder as decoded, which the viewer marks as an image span
rather than a word), ``grid`` (h, w), ``spans`` (int [spans, 4]: per image span of the row, such
as LLaVA-OneVision's base and tiled views, its first image token among the row's, its token count
and its own grid's rows and columns), the run's ``mitigation``, ``protocol`` and ``settings``
(JSON) as strings, and, when the images are given, ``name`` (the image's name), ``view_box`` (x0, y0, x1, y1: the region
of the original image the processor fed to the model, in its pixels; :meth:`LVLM.view_box`) and
``image`` (that region, uint8 [H, W, 3], longer side at most :data:`IMAGE_SIDE`) for ``vsink view``;
and ``DIR/row<b>/step<t>.png`` overlays of ``layer_mean`` on that region (where one of the row's
spans alone shows the whole region, only that span on its own grid: LLaVA-OneVision's base
view), titled with the word, on one colour scale from 0 over all steps of the row. Works for any grid size: LLaVA's square
patch grid, Qwen2-VL's merged (h, w) grid, or 1 × n when the tokens do not form a rectangle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..backbones.hf_lvlm import LVLM
from ..errors import VsinkError
from ..io import NpzWriter, atomic_path
from ..layout import ImageSpans
from ..outputs import OutputSet, check_output_dir
from ..version import __version__
from ..viewbox import ViewBox
from .generate import GenerationResult

#: longer side of the image stored in each row's npz
IMAGE_SIDE = 448


def token_words(lvlm: LVLM, ids: Sequence[int]) -> list[str]:
    """Each token id decoded alone (special tokens kept, so an end-of-text token stays visible);
    ``id N`` without a tokenizer."""
    tok = getattr(lvlm.processor, "tokenizer", None)
    if tok is None:
        return [f"id {int(i)}" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def stored_image(lvlm: LVLM, image: Image.Image) -> tuple[Image.Image, ViewBox]:
    """The region of ``image`` the model saw (uint8 RGB, longer side at most :data:`IMAGE_SIDE`)
    and its view box."""
    box = lvlm.view_box(image.size)
    return box.crop(image, lvlm.view_fill(), IMAGE_SIDE), box


def span_table(lvlm: LVLM, inputs: dict[str, Any], spans: ImageSpans, row: int) -> np.ndarray:
    """Row ``row``'s image spans as int64 [spans, 4]: where each starts among the row's image tokens
    (the last axis of ``attention`` before its reshape to ``grid``), its token count and its own
    grid's rows and columns (:meth:`LVLM.span_grids`)."""
    table, offset = [], 0
    for (start, end), (rows, cols) in zip(spans.spans[row], lvlm.span_grids(inputs, row, spans)):
        table.append([offset, end - start, rows, cols])
        offset += end - start
    return np.asarray(table, dtype=np.int64).reshape(-1, 4)


def overview(lvlm: LVLM, inputs: dict[str, Any], spans: ImageSpans, row: int, layer_mean: np.ndarray) -> np.ndarray:
    """What a row's step overlays draw: ``layer_mean`` [steps, h, w] on the row's grid, or the part
    of it on the span that shows the whole view (:meth:`LVLM.overview_span`: LLaVA-OneVision's
    base view) on that span's own grid."""
    chosen = lvlm.overview_span(inputs, row, spans)
    if chosen is None:
        return layer_mean
    offset, count, rows, cols = span_table(lvlm, inputs, spans, row)[chosen].tolist()
    flat = layer_mean.reshape(layer_mean.shape[0], -1)
    return flat[:, offset:offset + count].reshape(-1, rows, cols)


def export_attention(lvlm: LVLM, result: GenerationResult, inputs: dict[str, Any], out: Union[str, os.PathLike],
                     images: Optional[Sequence[Image.Image]] = None, png: bool = True,
                     names: Optional[Sequence[str]] = None) -> list[Path]:
    """Write the arrays (and overlays when ``images`` are given) described in the module docstring,
    as one set with the folder's ``vsink-run.json`` (:class:`vsink.outputs.OutputSet`): rows of an
    earlier export into the same folder are replaced or removed, never mixed with this one.
    ``names``: the images' names (default ``row<b>``)."""
    if result.attention is None:
        raise VsinkError("generate with capture_attention=True to export attention")
    final = check_output_dir(out, "out")
    determining = attention_record(lvlm, result.mitigation, result.protocol, result.settings, len(result.texts))
    with OutputSet(final, "vsink generate --export-attention", {"determining": determining}) as stage:
        written = write_attention_rows(lvlm, result, inputs, stage, images, png, names)
    return [final / path.relative_to(stage) for path in written]


def attention_record(lvlm: LVLM, mitigation: str, protocol: str, settings: Any, rows: int) -> dict[str, Any]:
    """The ``determining`` fields of an export's ``vsink-run.json``: ``rows`` rows generated by
    ``lvlm`` under ``mitigation`` (its label), ``protocol`` and ``settings`` (as generate records them)."""
    return {"model": lvlm.spec, "mitigation": mitigation, "protocol": protocol, "settings": settings, "rows": rows,
            "vsink_version": __version__}


def write_attention_rows(lvlm: LVLM, result: GenerationResult, inputs: dict[str, Any], out: Path,
                         images: Optional[Sequence[Image.Image]], png: bool = True,
                         names: Optional[Sequence[str]] = None, first: int = 0) -> list[Path]:
    """Each batch row's ``row<first + b>.npz`` (and step overlays) into ``out``, the staging folder
    of the set; ``first``: the number of the batch's first row among the export's rows (a run in
    several batches writes each batch's rows as it goes)."""
    from ..export.figures import overlay_png
    from ..export.scales import shared_scale

    if result.attention is None:
        raise VsinkError("generate with capture_attention=True to export attention")
    written = []
    att = result.attention.numpy()  # [steps, B, L, n]
    for b, count in enumerate(result.image_spans.counts()):
        grid = lvlm.image_grid(inputs, b, count)
        per_layer = att[:, b, :, :count].reshape(att.shape[0], att.shape[2], *grid)
        with np.errstate(invalid="ignore"):
            layer_mean = np.nanmean(per_layer, axis=1)
        row = first + b
        path = out / f"row{row}.npz"
        words = token_words(lvlm, result.new_tokens[b].tolist())
        with NpzWriter(path) as w:
            w.add("attention", per_layer.astype(np.float32))
            w.add("layer_mean", layer_mean.astype(np.float32))
            w.add("tokens", result.new_tokens[b].cpu().numpy())
            w.add("words", np.asarray(json.dumps(words)))
            w.add("image_token", np.asarray(token_words(lvlm, [lvlm.image_token_id])[0]))
            if images is not None:
                shown, box = stored_image(lvlm, images[b])
                w.add("image", np.asarray(shown, dtype=np.uint8))
                w.add("view_box", np.asarray(box.to_list(), dtype=np.float64))
                w.add("name", np.asarray(names[b] if names is not None else f"row{row}"))
            w.add("grid", np.asarray(grid))
            w.add("spans", span_table(lvlm, inputs, result.image_spans, b))
            w.add("mitigation", np.asarray(result.mitigation))
            w.add("protocol", np.asarray(result.protocol))
            w.add("settings", np.asarray(json.dumps(result.settings)))
        written.append(path)
        if png and images is not None:
            drawn = overview(lvlm, inputs, result.image_spans, b, layer_mean)
            scale = shared_scale([drawn], zero=True, label="attention share (mean over layers)")
            label = names[b] if names is not None else f"row {row}"
            for t in range(layer_mean.shape[0]):
                png_path = out / f"row{row}" / f"step{t:03d}.png"
                png_path.parent.mkdir(parents=True, exist_ok=True)
                data = overlay_png(shown, np.nan_to_num(drawn[t]),
                                   f"{label}, word {t}: {words[t].strip() or repr(words[t])}, layer mean", scale=scale)
                with atomic_path(png_path) as tmp:
                    tmp.write_bytes(data)
                written.append(png_path)
    return written
