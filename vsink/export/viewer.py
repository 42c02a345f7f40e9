"""``vsink view DIR``: one self-contained, offline HTML file to explore attention and norms.

It reads what the other commands wrote (:func:`load_viewer_data` says which arrays it uses):

* ``vsink maps`` output (``maps.json`` + ``<stem>.npz``): per block ``full/layer<L>`` attention
  rows (``--kind full``; clicking a patch shows its row), ``cls`` / ``received`` maps and ``norm``
  maps, the ``rollout`` and the attention-pooling head's ``pool`` map (of no block), and the input
  ``image``;
* ``vsink scan`` output (``scan.json`` + ``trace.npz``): per block the class-token row and the
  attention received, per head, the token norms, and the report ``thumbnails`` (no full rows);
* ``vsink generate --export-attention`` output (``row<b>.npz``): per generated word its
  attention on the image, per decoder layer.

Every quantity is drawn on one colour scale shared by all its blocks, heads and images
(:func:`viewer_scales`; attention from 0): the ``scales`` maps.json records when the export drew
PNGs (so the viewer and the PNGs agree), else one computed over the patch values shown.

Everything is embedded: the images as PNG data URIs, arrays as base64 float16 (default, half the
size: ~3 significant digits, in steps of 2⁻²⁴ ≈ 6e-8 below 6e-5) or float32, the script and the
colour maps. Full
attention rows dominate the size: images × blocks × heads × tokens² × 2 bytes (× 4/3 for base64);
``max_images`` and ``layers`` bound it, and :func:`write_viewer` reports the size.
"""

from __future__ import annotations

import base64
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from matplotlib import colormaps
from PIL import Image

from ..errors import VsinkError
from ..outputs import check_complete
from ..io import write_text
from ..layout import TokenLayout
from ..options import AnyOf, Choice, Float, Int, ListOf, Mapping_, Text
from ..readback import layout_of, member, open_npz
from ..readers import ReadError, checked_field, parse_json, read_json, records
from .html import esc
from .maps import UNITS
from .scales import Scale, shared_scale

PRECISIONS = ("float16", "float32")
TEXT, TEXTS, MAPPING = Text(), ListOf(Text()), Mapping_()
INDICES = ListOf(Int(min=0))
HEADS = AnyOf((Choice(("mean", "all")), ListOf(Int(min=0))))
#: a warning is printed above this many bytes
LARGE_BYTES = 64 * 2**20
NUMBER = Float()
#: colour bar label of each quantity the viewer draws (the maps kinds' own, and these)
LABELS = {**UNITS, "rows": "attention of the selected token (share)",
          "attention": "attention of the word on the image (share)"}


def encode(array: np.ndarray, precision: str = "float16") -> dict[str, Any]:
    """``{"dtype": "f16" | "f32", "shape", "data": base64 of the little-endian values}``."""
    if precision not in PRECISIONS:
        raise VsinkError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = "<f2" if precision == "float16" else "<f4"
    values = np.ascontiguousarray(array, dtype=dtype)
    return {"dtype": "f16" if precision == "float16" else "f32", "shape": list(values.shape),
            "data": base64.b64encode(values.tobytes()).decode("ascii")}


def image_uri(image: Union[Image.Image, np.ndarray]) -> str:
    """A PNG data URI of an RGB image."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _placeholder(grid: Sequence[int]) -> str:
    """A grey image of the grid's aspect, for exports made before images were stored."""
    h, w = grid
    scale = max(1, 224 // max(h, w))
    return image_uri(Image.new("RGB", (w * scale, h * scale), (128, 128, 128)))


def _prefix(layout: TokenLayout) -> list[dict[str, Any]]:
    """Class tokens and registers with their sequence index and a label."""
    out, reg = [], 0
    for token in layout.non_patch_indices():
        kind = layout.kind_of(token)
        label = ("cls" if layout.num_cls == 1 else f"cls {token}") if kind == "cls" else f"reg {reg}"
        reg += kind == "register"
        out.append({"token": token, "kind": kind, "label": label})
    return out


def _tokens(layout: TokenLayout, grid: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Patch grid [..., h, w] + prefix values [..., n_prefix] → values over all tokens [..., N]."""
    lead = grid.shape[:-2]
    out = np.zeros((*lead, layout.num_tokens), dtype=np.float32)
    out[..., layout.patch_slice] = grid.reshape(*lead, -1)
    out[..., layout.non_patch_indices()] = prefix
    return out


def _pick_layers(available: Sequence[int], layers: Optional[Sequence[int]]) -> list[int]:
    """``layers`` (block indices; negative: from the end of the exported blocks) among ``available``."""
    available = list(available)
    if layers is None:
        return available
    wanted = []
    for layer in layers:
        layer = int(layer)
        if layer < 0 and -len(available) <= layer:
            layer = available[layer]
        if layer not in available:
            raise VsinkError(f"block {layer} is not in this export (it has blocks {available})")
        wanted.append(layer)
    return sorted(set(wanted))


def _maps_settings(meta: dict[str, Any], where: str) -> tuple[list[str], list[int], Union[str, list[int]]]:
    settings = checked_field(meta, "settings", MAPPING, where, default={})
    kinds = checked_field(settings, "kinds", TEXTS, f"{where}: settings", default=[])
    exported = checked_field(settings, "layers", INDICES, f"{where}: settings", default=[])
    heads = checked_field(settings, "heads", HEADS, f"{where}: settings", default="mean")
    return kinds, exported, heads


def _from_maps(directory: Path, max_images: int, layers: Optional[Sequence[int]], precision: str) -> dict[str, Any]:
    where = str(directory / "maps.json")
    meta = read_json(member(directory, "maps.json", str(directory)), "maps.json")
    kinds, exported, heads = _maps_settings(meta, where)
    images = []
    shown: dict[str, list[tuple[np.ndarray, str]]] = {}
    for at, entry in list(records(meta, "images", where))[:max_images]:
        layout = layout_of(entry.get("layout"), f"{at}: field 'layout'")
        name = checked_field(entry, "image", TEXT, at)
        path = member(directory, checked_field(entry, "stem", TEXT, at), f"{at}: field 'stem'", ".npz")
        if not path.is_file():
            raise VsinkError(f"{path} is missing: vsink view needs the npz arrays (vsink maps --format png,npz)")
        chosen = _pick_layers(exported, layers)
        grid, n_prefix = tuple(layout.grid), layout.num_prefix
        because = f"the layout in {where}"
        per_layer: dict[str, Any] = {}
        with open_npz(path) as data:
            for layer in chosen:
                item: dict[str, Any] = {}
                if "norm" in kinds or f"norm/layer{layer}" in data:  # listed in maps.json: must be there
                    norm = _tokens(layout, data.array(f"norm/layer{layer}", grid, what=because),
                                   data.array(f"norm/layer{layer}/prefix", (n_prefix,), what=because))
                    shown.setdefault("norm", []).append((_span(norm[layout.patch_slice]),
                                                         f"{path}: array 'norm/layer{layer}'"))
                    item["norm"] = encode(norm, precision)
                for kind in ("cls", "received"):
                    key = f"{kind}/layer{layer}"
                    if kind not in kinds and f"{key}/prefix" not in data:
                        continue
                    prefix = data.array(f"{key}/prefix", (None, n_prefix), what=because)
                    if key in data:
                        ids = list(range(prefix.shape[0])) if heads in ("all", "mean") else list(heads)
                        if max(ids, default=0) >= prefix.shape[0]:
                            raise ReadError(f"{where}: settings heads {ids} disagree with {path}: '{key}/prefix' has "
                                            f"{prefix.shape[0]} heads")
                        values = _tokens(layout, data.array(key, (len(ids), *grid), what=f"heads and layout in {where}"),
                                         prefix[ids])
                    else:
                        mean = data.array(f"{key}/mean", grid, what=because)
                        ids, values = ["mean"], _tokens(layout, mean[None], prefix.mean(axis=0)[None])
                    shown.setdefault(kind, []).append((_span(values[..., layout.patch_slice]),
                                                       f"{path}: array '{key}'"))
                    item[kind] = {"heads": ids, "values": encode(values, precision)}
                if "full" in kinds or f"full/layer{layer}" in data:
                    n = layout.num_tokens
                    full = data.array(f"full/layer{layer}", (None, n, n), what=because)
                    ids = list(range(full.shape[0])) if heads in ("all", "mean") else list(heads)
                    if len(ids) != full.shape[0]:
                        raise ReadError(f"{where}: settings heads {ids} disagree with {path}: 'full/layer{layer}' has "
                                        f"{full.shape[0]} heads")
                    shown.setdefault("rows", []).append((_span(full[..., layout.patch_slice]),
                                                         f"{path}: array 'full/layer{layer}'"))
                    item["rows"] = {"heads": ids, "values": encode(full, precision)}
                per_layer[str(layer)] = item
            pool = _pool(data, layout, heads, where, path, shown) if "pool" in kinds or "pool/prefix" in data else None
            rollout = None
            if "rollout" in kinds or "rollout/prefix" in data:
                grid_values = data.array("rollout", grid, what=because)
                on_prefix = data.array("rollout/prefix", (n_prefix,), what=because)
                rollout = _tokens(layout, grid_values[None], on_prefix[None])
                shown.setdefault("rollout", []).append((_span(grid_values), f"{path}: array 'rollout'"))
            picture = image_uri(data.array("image", kind="image")) if "image" in data else _placeholder(layout.grid)
        images.append({"name": name, "image": picture, "grid": list(layout.grid),
                       "tokens": layout.num_tokens, "patch_start": layout.num_prefix, "prefix": _prefix(layout),
                       "layers": per_layer, **({"pool": {**pool, "values": encode(pool["values"], precision)}}
                                               if pool else {}),
                       **({"rollout": {"heads": ["mean"], "values": encode(rollout, precision)}}
                          if rollout is not None else {})})
    if not images:
        raise VsinkError(f"{directory / 'maps.json'} lists no image")
    return {"kind": "vision", "source": "maps", "model": _text_or_none(meta, "model", where),
            "synthetic": bool(meta.get("synthetic")), "kinds": kinds, "images": images,
            "scales": viewer_scales(shown, _recorded_scales(meta, where))}


def _pool(data, layout: TokenLayout, heads: Union[str, list[int]], where: str, path: Path,
          shown: dict[str, list]) -> dict[str, Any]:
    """The pooling probe's attention over the image's tokens: ``{"heads", "values" [heads, N]}``;
    registers hooked in by ``with_registers`` leave before the head (NaN: it never sees them)."""
    grid, prefix_all = tuple(layout.grid), layout.non_patch_indices()
    prefix = data.array("pool/prefix", (None, None), what=f"the layout in {where}")
    dropped = len(prefix_all) - prefix.shape[1]
    if not 0 <= dropped <= layout.num_registers or (dropped and layout.num_registers != dropped):
        raise ReadError(f"{path}: array 'pool/prefix' has {prefix.shape[1]} class tokens and registers; the layout "
                        f"in {where} has {len(prefix_all)}, of which only hooked registers may be missing")
    seen = prefix_all[:layout.num_cls + layout.num_registers - dropped] + prefix_all[layout.num_prefix:]
    if "pool" in data:
        ids = list(range(prefix.shape[0])) if heads in ("all", "mean") else list(heads)
        if max(ids, default=0) >= prefix.shape[0]:
            raise ReadError(f"{where}: settings heads {ids} disagree with {path}: 'pool/prefix' has "
                            f"{prefix.shape[0]} heads")
        patches, on_prefix = data.array("pool", (len(ids), *grid), what=f"heads and layout in {where}"), prefix[ids]
    else:
        ids = ["mean"]
        patches = data.array("pool/mean", grid, what=f"the layout in {where}")[None]
        on_prefix = prefix.mean(axis=0)[None]
    values = np.full((len(ids), layout.num_tokens), np.nan, dtype=np.float32)
    values[:, layout.patch_slice] = patches.reshape(len(ids), -1)
    values[:, seen] = on_prefix
    shown.setdefault("pool", []).append((_span(patches), f"{path}: array 'pool'"))
    return {"heads": ids, "values": values}


def _span(values: np.ndarray) -> np.ndarray:
    """The smallest and largest finite value (empty if none): all a scale needs of an array."""
    finite = np.asarray(values)[np.isfinite(values)]
    return np.asarray([finite.min(), finite.max()], dtype=np.float64) if finite.size else finite


def _recorded_scales(meta: dict[str, Any], where: str) -> dict[str, Scale]:
    """The ``scales`` maps.json records (those of the PNGs), each checked."""
    out = {}
    for kind, entry in checked_field(meta, "scales", MAPPING, where, default={}).items():
        at = f"{where}: scales.{kind}"
        entry = checked_field({"scale": entry}, "scale", MAPPING, at)
        vmin, vmax = checked_field(entry, "vmin", NUMBER, at), checked_field(entry, "vmax", NUMBER, at)
        if not vmin < vmax:
            raise ReadError(f"{at}: vmin {vmin} must be below vmax {vmax}")
        out[kind] = Scale(vmin, vmax, checked_field(entry, "label", TEXT, at, default=LABELS.get(kind, kind)))
    return out


def viewer_scales(shown: dict[str, list[tuple[np.ndarray, str]]],
                  recorded: Optional[dict[str, Scale]] = None) -> dict[str, dict[str, Any]]:
    """One colour scale per quantity (``{vmin, vmax, label}``) over every value ``shown`` of it
    (``(values or their span, where they came from)`` pairs; attention quantities from 0): the ``recorded`` one
    where there is one, which must hold every shown value (else the record and the arrays disagree)."""
    out = {}
    for quantity, items in shown.items():
        scale = (recorded or {}).get(quantity)
        if scale is None:
            scale = shared_scale([a for a, _ in items], zero=quantity != "norm", label=LABELS[quantity])
        else:
            slack = 1e-5 * max(abs(scale.vmin), abs(scale.vmax))
            for values, at in items:
                finite = values[np.isfinite(values)]
                if finite.size and (finite.min() < scale.vmin - slack or finite.max() > scale.vmax + slack):
                    raise ReadError(f"scales.{quantity} [{scale.vmin:.6g}, {scale.vmax:.6g}] in maps.json disagrees "
                                    f"with {at}: its values span [{finite.min():.6g}, {finite.max():.6g}]")
        out[quantity] = {"vmin": scale.vmin, "vmax": scale.vmax, "label": scale.label}
    return out


def _text_or_none(meta: dict[str, Any], key: str, where: str) -> Optional[str]:
    value = meta.get(key)
    return None if value is None else checked_field(meta, key, TEXT, where)


def _from_scan(directory: Path, max_images: int, layers: Optional[Sequence[int]], precision: str) -> dict[str, Any]:
    from ..probe import Trace

    where = str(directory / "scan.json")
    meta = read_json(member(directory, "scan.json", str(directory)), "scan.json")
    names = checked_field(meta, "images", TEXTS, where)
    trace = Trace.load(member(directory, "trace.npz", str(directory)))
    layout = trace.layout
    if trace.num_images != len(names):
        raise ReadError(f"{where} lists {len(names)} images but {directory / 'trace.npz'} holds {trace.num_images}; "
                        "the two come from different runs")
    with open_npz(directory / "trace.npz") as data:
        thumbs = data.array("thumbnails", (None, None, None, 3)) if "thumbnails" in data else None
        sizes = (data.array("thumbnail_sizes", (len(thumbs), 2)) if thumbs is not None and "thumbnail_sizes" in data
                 else None)
    if thumbs is not None and (thumbs.dtype != np.uint8 or len(thumbs) > len(names)):
        raise ReadError(f"{directory / 'trace.npz'}: array 'thumbnails' must be uint8 pixels of at most "
                        f"{len(names)} images, got {thumbs.dtype} {list(thumbs.shape)}")
    if sizes is not None and ((sizes < 1).any() or (sizes > np.asarray(thumbs.shape[1:3])).any()):
        raise ReadError(f"{directory / 'trace.npz'}: array 'thumbnail_sizes' must hold (height, width) within "
                        f"the thumbnails' {list(thumbs.shape[1:3])}, got {sizes.tolist()}")
    chosen = _pick_layers(trace.layers, layers)
    images = []
    shown: dict[str, list[tuple[np.ndarray, str]]] = {}
    for i, name in enumerate(names[:max_images]):
        per_layer: dict[str, Any] = {}
        for layer in chosen:
            pos = trace.layers.index(layer)
            item: dict[str, Any] = {}
            if trace.norms is not None:
                shown.setdefault("norm", []).append((_span(trace.norms[pos, i][layout.patch_slice]), "norms"))
                item["norm"] = encode(trace.norms[pos, i], precision)
            for kind, arr in (("cls", trace.attn_cls), ("received", trace.attn_received)):
                if arr is not None:
                    shown.setdefault(kind, []).append((_span(arr[pos, i][..., layout.patch_slice]), kind))
                    item[kind] = {"heads": list(range(arr.shape[2])), "values": encode(arr[pos, i], precision)}
            per_layer[str(layer)] = item
        if thumbs is not None and i < len(thumbs):
            h, w = (int(v) for v in sizes[i]) if sizes is not None and i < len(sizes) else thumbs.shape[1:3]
            picture = image_uri(thumbs[i][:h, :w])
        else:
            picture = _placeholder(layout.grid)
        images.append({"name": name, "image": picture, "grid": list(layout.grid), "tokens": layout.num_tokens,
                       "patch_start": layout.num_prefix, "prefix": _prefix(layout), "layers": per_layer})
    return {"kind": "vision", "source": "scan", "model": _text_or_none(meta, "model", where),
            "synthetic": bool(meta.get("synthetic")),
            "kinds": [k for k, a in (("cls", trace.attn_cls), ("received", trace.attn_received), ("norm", trace.norms))
                      if a is not None], "images": images, "scales": viewer_scales(shown)}


def _from_lvlm(directory: Path, max_images: int, layers: Optional[Sequence[int]], precision: str) -> dict[str, Any]:
    rows = []
    shown: dict[str, list[tuple[np.ndarray, str]]] = {}
    files = sorted(directory.glob("row*.npz"), key=lambda p: int(p.stem[3:]) if p.stem[3:].isdigit() else 0)
    for path in files[:max_images]:
        path = member(directory, path.name, str(directory))
        with open_npz(path) as data:
            att = data.array("attention", (None, None, None, None))  # [steps, L, h, w]
            grid = [int(v) for v in data.array("grid", (2,))]
            if grid != list(att.shape[2:]):
                raise ReadError(f"{path}: array 'grid' {grid} disagrees with array 'attention' "
                                f"{list(att.shape)} (steps, layers, rows, columns)")
            chosen = _pick_layers(range(att.shape[1]), layers)
            if "words" in data:
                words = parse_json(str(data.array("words", kind="text")), f"{path}: array 'words'")
                if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                    raise ReadError(f"{path}: array 'words' must be a JSON list of texts")
            else:
                words = [f"id {int(t)}" for t in data.array("tokens", (att.shape[0],))]
            if len(words) != att.shape[0]:
                raise ReadError(f"{path}: {len(words)} words but array 'attention' has {att.shape[0]} steps")
            name = str(data.array("name", kind="text")) if "name" in data else path.stem
            image_token = str(data.array("image_token", kind="text")) if "image_token" in data else "<image>"
            shown.setdefault("attention", []).append((_span(att[:, chosen]), str(path)))
            rows.append({"name": name, "image_token": image_token,
                         "image": image_uri(data.array("image", kind="image")) if "image" in data
                         else _placeholder(grid), "grid": grid, "words": words, "layers": chosen,
                         "attention": encode(att[:, chosen].reshape(att.shape[0], len(chosen), -1), precision),
                         "mitigation": str(data.array("mitigation", kind="text")),
                         "protocol": str(data.array("protocol", kind="text"))})
    return {"kind": "lvlm", "source": "generate", "model": None, "synthetic": False, "rows": rows,
            "scales": viewer_scales(shown)}


def load_viewer_data(directory: Union[str, os.PathLike], *, max_images: int = 8,
                     layers: Optional[Sequence[int]] = None, precision: str = "float16") -> dict[str, Any]:
    """The viewer's payload from a ``vsink maps``, ``vsink scan`` or ``vsink generate
    --export-attention`` directory (the first ``max_images`` images; ``layers``: blocks to keep,
    default all exported)."""
    directory = Path(directory)
    if max_images < 1:
        raise VsinkError(f"max_images must be >= 1, got {max_images}")
    encode(np.zeros(0), precision)  # checks the precision before any reading
    if (directory / "maps.json").is_file():
        return _from_maps(directory, max_images, layers, precision)
    if (directory / "scan.json").is_file() and (directory / "trace.npz").is_file():
        return _from_scan(directory, max_images, layers, precision)
    if any(directory.glob("row*.npz")):
        return _from_lvlm(directory, max_images, layers, precision)
    raise VsinkError(f"{directory}: no vsink output to view (expected maps.json from 'vsink maps', scan.json and "
                     "trace.npz from 'vsink scan', or row<N>.npz from 'vsink generate --export-attention')")


def _lut(name: str) -> list[str]:
    cmap = colormaps[name]
    return ["%02x%02x%02x" % tuple(int(round(255 * c)) for c in cmap(i / 255)[:3]) for i in range(256)]


#: characters that could end or change the meaning of an inline script in any tokenizer state
#: (``</script``, ``<!--``, ``-->``, character references) or a JavaScript line (U+2028/9), as
#: JSON escapes that ``JSON.parse`` reads back unchanged
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def script_json(value: Any) -> str:
    """``value`` as JSON safe inside ``<script type='application/json'>``: no ``<``, ``>``,
    ``&``, U+2028 or U+2029 remains (each is written as its ``\\uXXXX`` escape)."""
    return json.dumps(value, separators=(",", ":")).translate(_SCRIPT_ESCAPES)


def render_viewer(payload: dict[str, Any], title: str) -> str:
    """The viewer page for a payload of :func:`load_viewer_data`."""
    payload = {**payload, "colormaps": {"attention": _lut("inferno"), "norm": _lut("magma")}}
    data = script_json(payload)
    script = resources.files("vsink.export").joinpath("viewer.js").read_text(encoding="utf-8")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{VIEWER_STYLE}"
            f"</style></head><body><div id='app'></div><script id='vsink-data' type='application/json'>{data}</script>"
            f"<script>{script}</script></body></html>")


VIEWER_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}#controls{display:flex;gap:14px;flex-wrap:wrap;
align-items:center;margin-bottom:10px}#main{display:flex;gap:18px;align-items:flex-start}canvas{cursor:crosshair;
border:1px solid #999}#side{min-width:300px;font-size:13px}#prefix button{margin:2px;padding:3px 6px;
border:1px solid #888;background:#f4f4f4;cursor:pointer;font:12px monospace}#prefix button.query{outline:2px solid
#06c}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
.banner{background:#ffe1e1;border:2px solid #c00;padding:8px 12px;font-weight:600;margin-bottom:10px}
.note{color:#666;font-size:12px}#words span{display:inline-block;margin:2px;padding:2px 5px;border:1px solid #bbb;
cursor:pointer;font-family:monospace}#words span.sel{background:#06c;color:#fff}#words span.image-span{border-style:dashed;background:#eef6ee;font-style:italic}#legend{display:flex;gap:6px;
align-items:center;font-size:12px;margin-top:6px}#legend canvas{border:none;cursor:default}
"""


def write_viewer(directory: Union[str, os.PathLike], out: Union[str, os.PathLike, None] = None, *,
                 max_images: int = 8, layers: Optional[Sequence[int]] = None,
                 precision: str = "float16") -> Path:
    """Write the viewer of ``directory`` to ``out`` (default ``DIR/viewer.html``) atomically."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VsinkError(f"{directory} is not a directory")
    check_complete(directory)  # a swap of its outputs cut short by a kill: the folder may mix two runs
    payload = load_viewer_data(directory, max_images=max_images, layers=layers, precision=precision)
    path = Path(out) if out is not None else directory / "viewer.html"
    return write_text(path, render_viewer(payload, f"vsink view: {directory.name}"))
