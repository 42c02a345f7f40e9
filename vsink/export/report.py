"""The self-contained HTML report of a scan (inline PNGs, no external assets)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from .figures import data_uri, norm_histogram_png, overlay_png, ratio_curve_png

if TYPE_CHECKING:
    from ..scan import ScanResult

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}.warn{background:#fff4d6;border:1px solid #e0b000;padding:8px 12px}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid img{max-width:380px}code{background:#f4f4f4;padding:1px 4px}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}">'


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render_scan_report(result: "ScanResult") -> str:
    """Return the report as one HTML string."""
    trace, hn, layout = result.trace, result.high_norm, result.layout
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vsink scan: {e(result.model)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>vsink scan — <code>{e(result.model)}</code></h1>"]
    if result.synthetic:
        parts.append("<p class='warn'><b>Synthetic demo model.</b> Its high-norm tokens are planted by "
                     "construction (see docs/demo.md); the numbers say nothing about any real model.</p>")
    parts.append(f"<p>Layout: {e(layout.describe())}; input {result.input_size[0]}×{result.input_size[1]}; "
                 f"{len(result.images)} images scanned, {len(result.skipped)} skipped. "
                 f"Threshold method: <code>{e(hn.method)}</code>. Emergence layer: "
                 f"<b>{_fmt(hn.emergence_layer)}</b>. Outlier tokens (all layers): {len(hn.outliers)}. "
                 f"Sinks: {len(result.sinks)}.</p>")
    if result.settings.get("edits"):
        parts.append("<p>Forward edits applied: " + ", ".join(f"<code>{e(x)}</code>" for x in result.settings["edits"])
                     + ". Appended registers are excluded from the patch statistics and maps.</p>")

    layers = [s.index for s in hn.layers]
    parts.append("<h2>Norm ratio per layer</h2>")
    parts.append(_img(ratio_curve_png(layers, [s.ratio for s in hn.layers], hn.emergence_layer,
                                      "max / median patch norm"), "ratio curve"))
    focus_pos = layers.index(hn.emergence_layer) if hn.emergence_layer is not None else len(layers) - 1
    focus = hn.layers[focus_pos]
    patch_norms = layout.patches(trace.norms[focus_pos], dim=1)
    parts.append(f"<h2>Patch-norm histogram, block {focus.index}</h2>")
    parts.append(_img(norm_histogram_png(patch_norms, focus.threshold, f"block {focus.index}"), "histogram"))

    parts.append("<h2>Layers</h2><table><tr><th>block</th><th>median</th><th>max</th><th>ratio</th>"
                 "<th>threshold</th><th>outlier %</th><th>cls norm</th><th>max reg norm</th><th>cls recv</th>"
                 "<th>reg recv</th><th>max patch recv</th><th>entropy</th></tr>")
    for n, a in zip(hn.layers, result.attention):
        parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in (
            n.index, n.median, n.max, n.ratio, n.threshold, 100 * n.outlier_fraction, n.cls,
            max(n.registers) if n.registers else None,
            a["cls_received"], a["register_received"], a["max_patch_received"], a["entropy"])) + "</tr>")
    parts.append("</table>")

    parts.append(f"<h2>Norm maps, block {focus.index}</h2><div class='grid'>")
    for i, thumb in enumerate(result.thumbnails):
        grid = layout.patch_grid(trace.norms[focus_pos, i], dim=0)
        parts.append(_img(overlay_png(thumb, grid, f"{result.images[i]} — norm, block {focus.index}"), "norm map"))
    parts.append("</div>")

    if trace.attn_received is not None:
        last = list(range(max(0, len(layers) - 2), len(layers)))
        parts.append("<h2>Attention received (head mean), last layers</h2><div class='grid'>")
        for i, thumb in enumerate(result.thumbnails):
            for pos in last:
                share = trace.attn_received[pos, i].mean(axis=0)
                grid = layout.patch_grid(share, dim=0)
                prefix = share[layout.non_patch_indices()].sum()
                parts.append(_img(overlay_png(thumb, grid, f"{result.images[i]} — received, block {layers[pos]}"
                                              f" (cls+registers: {prefix:.2f})", cmap="viridis"), "received"))
        parts.append("</div>")

    parts.append("<h2>Strongest sinks</h2><table><tr><th>image</th><th>block</th><th>token</th><th>kind</th>"
                 "<th>row,col</th><th>share</th><th>× median</th></tr>")
    for s in sorted(result.sinks, key=lambda s: -s.share)[:30]:
        where = f"{s.row},{s.col}" if s.row is not None else "—"
        parts.append(f"<tr><td>{e(result.images[s.image])}</td><td>{s.layer}</td><td>{s.token}</td>"
                     f"<td>{s.kind}</td><td>{where}</td><td>{s.share:.4f}</td><td>{s.ratio:.1f}</td></tr>")
    parts.append("</table>")
    if result.skipped:
        parts.append("<h2>Skipped</h2><ul>" + "".join(
            f"<li><code>{e(s['image'])}</code>: {e(s['reason'])}</li>" for s in result.skipped) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)

