"""The self-contained HTML report of an LVLM scan: per decoder layer the BOS and image attention
shares, the visual sink tokens and massive activations, and, image by image, which of the vision
tower's high-norm tokens arrive in the language model as visual sink tokens."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np

from .figures import data_uri, overlay_png
from .report import STYLE

if TYPE_CHECKING:
    from ..lvlm.scan import LVLMScanResult


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def render_lvlm_report(result: "LVLMScanResult") -> str:
    """Return the report as one HTML string (inline PNGs, no external assets)."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vsink LVLM scan: {e(result.model)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>vsink LVLM scan — <code>{e(result.model)}</code></h1>"]
    if result.synthetic:
        parts.append("<p class='warn'><b>Synthetic demo LVLM.</b> Its register neurons, visual sinks and sink "
                     "dimensions are planted by construction (see docs/lvlm.md); the numbers say nothing about "
                     "any real model, and the text it generates is meaningless.</p>")
    parts.append(f"<p>Prompt: <code>{e(result.prompt)}</code>; layout per row: {e(result.layout.describe())}; "
                 f"{len(result.images)} images, {len(result.skipped)} skipped. Sink dimensions "
                 f"{result.sink_dims} ({e(result.sink_dims_source)}), τ = {result.tau:g}.</p>")
    parts.append("<h2>Language model, per decoder layer</h2><table><tr><th>layer</th><th>BOS share</th>"
                 "<th>image share</th><th>visual sink tokens</th><th>massive activations (dim: ×median)</th></tr>")
    for row in result.layer_summaries():
        massive = "; ".join(f"dim {m['dim']}: up to {m['ratio']:.0f}× on {m['tokens']} tokens ({', '.join(m['kinds'])})"
                            for m in row["massive"][:4]) or "—"
        parts.append(f"<tr><td>{row['index']}</td><td>{_fmt(row['bos_share'])}</td>"
                     f"<td>{_fmt(row['image_attention_share'])}</td><td>{row['visual_sink_count']}</td>"
                     f"<td style='text-align:left'>{e(massive)}</td></tr>")
    parts.append("</table>")
    link = result.tower_to_llm()
    if link is None:
        parts.append("<p>The tower's patches do not map one to one onto this model's image tokens; the tower "
                     "scan is in <code>vision/</code>.</p>")
    elif link["tower_layer"] is None:
        parts.append("<p>The vision tower has no high-norm tokens in these images.</p>")
    else:
        parts.append(f"<h2>Vision tower → language model</h2><p>Of the tower's {link['tower_high_norm']} high-norm "
                     f"tokens (block {link['tower_layer']}), <b>{link['both']}</b> arrive as visual sink tokens in "
                     f"the language model ({link['visual_sinks']} visual sink tokens in all). Left: tower norms at "
                     f"block {link['tower_layer']}; right: φ at the first decoder layer's input.</p>"
                     "<div class='grid'>")
        grid = result.layout.grid
        tower = result.vision
        pos = tower.trace.layers.index(link["tower_layer"])
        for i, name in enumerate(result.images[: len(tower.thumbnails) or 6]):
            norms = tower.layout.patch_grid(tower.trace.norms[pos, i], dim=0)
            phi = result.layout.patches(result.phi[0, i], dim=0).reshape(grid)
            thumb = _thumbnail(tower, i, grid)
            for png in (overlay_png(thumb, norms, f"{name}: tower norm"), overlay_png(thumb, phi, f"{name}: LLM φ")):
                parts.append(f'<img src="{data_uri(png)}" alt="{e(name)}">')
        parts.append("</div>")
    if result.vision is not None:
        parts.append("<p>The tower's own scan (same schema as a vision scan): <code>vision/report.html</code>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _thumbnail(tower, i: int, grid: tuple[int, int]):
    from PIL import Image

    if i < len(tower.thumbnails):
        return tower.thumbnails[i]
    return Image.fromarray(np.full((grid[0] * 16, grid[1] * 16, 3), 128, np.uint8))
