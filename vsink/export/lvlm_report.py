"""The self-contained HTML report of an LVLM scan: per decoder layer the BOS and image attention
shares, the visual sink tokens and massive activations, and, image by image, which of the vision
tower's high-norm tokens arrive in the language model as visual sink tokens."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .figures import overlay_png
from .html import SYNTHETIC_LVLM_NOTE, banner, esc, fmt, img, page, table
from .views import LVLMScanView


def render_lvlm_report(result: LVLMScanView) -> str:
    """Return the report as one HTML string (inline PNGs, no external assets)."""
    body = [f"<h1>vsink LVLM scan — <code>{esc(result.model)}</code></h1>"]
    if result.synthetic:
        body.append(banner(SYNTHETIC_LVLM_NOTE))
    body.append(f"<p>Prompt: <code>{esc(result.prompt)}</code>; layout per row: {esc(result.layout.describe())}; "
                f"{len(result.images)} images, {len(result.skipped)} skipped. Sink dimensions {result.sink_dims} "
                f"({esc(result.sink_dims_source)}), τ = {result.tau:g}.</p>")
    rows = []
    for row in result.layer_summaries():
        massive = "; ".join(f"dim {m['dim']}: up to {m['ratio']:.0f}× on {m['tokens']} tokens ({', '.join(m['kinds'])})"
                            for m in row["massive"][:4]) or "—"
        rows.append([str(row["index"]), fmt(row["bos_share"]), fmt(row["image_attention_share"]),
                     str(row["visual_sink_count"]), esc(massive)])
    body += ["<h2>Language model, per decoder layer</h2>",
             table(["layer", "BOS share", "image share", "visual sink tokens", "massive activations"], rows)]
    link = result.tower_to_llm()
    if link is None:
        body.append("<p>The tower's patches do not map one to one onto this model's image tokens; the tower scan "
                    "is in <code>vision/</code>.</p>")
    elif link["tower_layer"] is None:
        body.append("<p>The vision tower has no high-norm tokens in these images.</p>")
    else:
        body.append(f"<h2>Vision tower → language model</h2><p>Of the tower's {link['tower_high_norm']} high-norm "
                    f"tokens (block {link['tower_layer']}), <b>{link['both']}</b> arrive as visual sink tokens in "
                    f"the language model ({link['visual_sinks']} visual sink tokens in all). Left: tower norms at "
                    f"block {link['tower_layer']}; right: φ at the first decoder layer's input.</p><div class='grid'>")
        tower = result.vision
        pos = tower.trace.layers.index(link["tower_layer"])
        grid = result.layout.grid
        for i, name in enumerate(result.images[: max(len(tower.thumbnails), 1)]):
            norms = tower.layout.patch_grid(tower.trace.norms[pos, i], dim=0)
            phi = result.layout.patches(result.phi[0, i], dim=0).reshape(grid)
            thumb = tower.thumbnails[i] if i < len(tower.thumbnails) else Image.fromarray(
                np.full((grid[0] * 16, grid[1] * 16, 3), 128, np.uint8))
            body.append(img(overlay_png(thumb, norms, f"{name}: tower norm"), f"{name} tower norms"))
            body.append(img(overlay_png(thumb, phi, f"{name}: LLM φ"), f"{name} LLM phi"))
        body.append("</div>")
    if result.vision is not None:
        body.append("<p>The tower's own scan (same schema as a vision scan): <code>vision/report.html</code>.</p>")
    return page(f"vsink LVLM scan: {result.model}", body)
