"""The self-contained HTML report of an LVLM scan: per decoder layer the BOS and image attention
shares, the visual sink tokens and massive activations, what DeepStack adds (Qwen3-VL), and,
image by image, which of the vision tower's high-norm tokens arrive in the language model as
visual sink tokens."""

from __future__ import annotations

from pathlib import Path

from .figures import overlay_png
from .html import SYNTHETIC_LVLM_NOTE, banner, esc, fig, fmt, img, page, table
from .layer_figures import heatmap_figure
from .scales import shared_scale
from .views import LVLMScanView


def head_share_section(result: LVLMScanView) -> list[str]:
    """Decoder layer × head heat maps: the share of attention on BOS, on the image tokens and on
    the visual sink tokens, each on a scale from 0."""
    shares = result.head_shares()
    layers = list(result.trace.layers)
    parts = ["<h2>Language model, per layer and head</h2>",
             "<p>Share of each head's attention (mean over queries and images) on the BOS token, on the image "
             "tokens and on the visual sink tokens of that layer (φ > τ); every scale starts at 0.</p>"
             "<div class='grid'>"]
    for key, what in (("bos", "on BOS"), ("image", "on the image tokens"), ("visual_sinks", "on visual sinks")):
        values = shares[key]
        parts.append(fig(heatmap_figure(values, layers, title=f"attention {what}, layer × head",
                                        label="attention share", vmin=0.0, vmax=max(float(values.max()), 1e-6),
                                        rows_label="decoder layer"),
                         f"attention {what} per head"))
    parts.append("</div>")
    return parts


def deepstack_section(result: LVLMScanView) -> list[str]:
    """DeepStack (Qwen3-VL): per decoder layer after which tower features are added to the image
    tokens, the tower block and the norms of the added features and of the stream they join."""
    summary = result.deepstack_summary()
    if summary is None:
        return []
    rows = [[str(row["layer"]), str(row["tower_block"]), fmt(row["injected_norm_mean"]), fmt(row["injected_norm_max"]),
             fmt(row["residual_norm_mean"]),
             fmt(row["injected_to_residual"])]
            for row in summary["layers"]]
    return ["<h2>DeepStack</h2>",
            "<p>After each of these decoder layers the model adds a tower block's merged features to every image "
            "token's hidden state. Norms are L2, over the image tokens of every image; the residual is the image "
            "tokens' hidden state at that layer's output, before the addition.</p>",
            table(["after decoder layer", "tower block", "added norm (mean)", "added norm (max)",
                   "residual norm (mean)", "added / residual"], rows)]


def per_image_section(result: LVLMScanView) -> list[str]:
    rows = []
    for entry in result.per_image():
        box = entry.get("view_box")
        rows.append([esc(entry["image"]), "×".join(str(v) for v in entry["size"]) if "size" in entry else "—",
                     ", ".join(f"{v:g}" for v in box) if box else "—", str(entry["visual_sink_tokens"]),
                     str(entry["visual_sink_entries"]), fmt(entry["bos_share"]), fmt(entry["image_attention_share"])])
    return ["<h2>Per image</h2>",
            "<p>View box: the region of the image the processor fed to the model (x0, y0, x1, y1 in its pixels; "
            "outside the image where it pads). Visual sink tokens: distinct image tokens with φ > τ at any decoder "
            "layer; entries: (layer, token) pairs. Shares: mean over layers, heads and queries.</p>",
            table(["image", "size", "view box", "visual sink tokens", "entries", "BOS share", "image share"], rows)]


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
    body += deepstack_section(result)
    body += head_share_section(result)
    body += per_image_section(result)
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
                    f"block {link['tower_layer']} (one scale for all images, the detector's threshold marked on "
                    f"it); right: φ at the first decoder layer's input (one scale from 0, τ marked). Each map is "
                    f"drawn on the region of the image the processor fed to the model.</p><div class='grid'>")
        tower = result.vision
        pos = tower.trace.layers.index(link["tower_layer"])
        grid = result.layout.grid
        shown = list(range(min(len(result.thumbnails), len(result.images))))
        norms = [tower.layout.patch_grid(tower.trace.norms[pos, i], dim=0) for i in shown]
        phis = [result.layout.patches(result.phi[0, i], dim=0).reshape(grid) for i in shown]
        threshold = tower.high_norm.layers[pos].threshold
        norm_scale = shared_scale(norms, zero=False, label="tower token norm (L2)",
                                  marks={"threshold": threshold})
        phi_scale = shared_scale(phis, zero=True, label="φ (RMS-normalised, max over sink dims)",
                                 marks={"τ": result.tau})
        for i in shown:
            name = Path(result.images[i]).name
            thumb = result.thumbnails[i]
            body.append(img(overlay_png(thumb, norms[i], f"{name}: tower norm", scale=norm_scale),
                            f"{name} tower norms"))
            body.append(img(overlay_png(thumb, phis[i], f"{name}: LLM φ", scale=phi_scale), f"{name} LLM phi"))
        body.append("</div>")
    if result.vision is not None:
        body.append("<p>The tower's own scan (same schema as a vision scan): <code>vision/report.html</code>.</p>")
    return page(f"vsink LVLM scan: {result.model}", body)
