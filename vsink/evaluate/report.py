"""Markdown and HTML tables of a dense evaluation: every variant, with deltas against the baseline."""

from __future__ import annotations

from typing import Optional

from ..export.views import DenseView


def _value(v: Optional[float], decimals: int) -> str:
    """``v`` rounded to ``decimals``; a value that rounds to zero is ``0.00``, never ``-0.00``."""
    return "—" if v is None else f"{round(v, decimals) + 0.0:.{decimals}f}"


def _delta(v: Optional[float], base: Optional[float], decimals: int) -> str:
    """``v - base`` rounded to ``decimals``, signed; ``±0.00`` when it rounds to zero."""
    if v is None or base is None:
        return ""
    d = round(v - base, decimals)
    sign = "±" if d == 0 else "+" if d > 0 else "−"
    return f" ({sign}{abs(d):.{decimals}f})"


def _interval(iv: Optional[dict[str, float]], decimals: int, signed: bool = False) -> str:
    """`` [low, high]`` of an interval (signed ends for a difference), or nothing."""
    if iv is None:
        return ""
    ends = [round(iv[k], decimals) + 0.0 for k in ("low", "high")]
    return " [" + ", ".join(f"{e:+.{decimals}f}" if signed else f"{e:.{decimals}f}" for e in ends).replace("-", "−") + "]"


def _rows(result: DenseView) -> tuple[list[str], list[list[str]]]:
    """The headline table: each value with its bootstrap interval, each difference from the
    baseline with the paired interval of the difference."""
    names = list(result.variants)
    header = ["metric"] + [names[0]] + [f"{n} (Δ vs {names[0]})" for n in names[1:]]
    rows = []
    for (label, values, decimals), (ivs, deltas) in zip(result.headline(), result.headline_intervals()):
        cells = [label, _value(values[0], decimals) + _interval(ivs[0], decimals)]
        for v, iv, d in zip(values[1:], ivs[1:], deltas[1:]):
            delta = _delta(v, values[0], decimals)
            if delta and d is not None:
                delta = delta[:-1] + _interval(d, decimals, signed=True) + ")"
            cells.append(_value(v, decimals) + _interval(iv, decimals) + delta)
        rows.append(cells)
    return header, rows


def statistics_line(result: DenseView) -> str:
    """How the intervals were made, in one sentence."""
    s = result.statistics()["settings"]
    return (f"Intervals: {100 * s['level']:g} % {s['method']} over images, {s['resamples']} resamples, seed "
            f"{s['seed']}; Δ: the difference from {next(iter(result.variants))} with its paired-bootstrap interval "
            "over the images evaluated under both (an interval containing 0 is no demonstrated change). The "
            "max/median norm ratio has no interval (docs/dense.md).")


def _normalised(flag: bool) -> str:
    return f"normalised: {'yes' if flag else 'no'}"


def _split(name: str, total: int, used: int) -> str:
    """A split and its images, e.g. "`val` (6 images)", or "`val`: 2 of 6 images (4 skipped)"."""
    if used == total:
        return f"`{name}` ({total} images)"
    return f"`{name}`: {used} of {total} images ({total - used} skipped)"


def _lost_lines(result: DenseView) -> list[str]:
    lines = []
    for name, res in result.variants.items():
        lost = res.get("lost")
        if not lost:
            continue
        s = lost["setting"]
        lines.append(f"- **{name}**: stated setting block {s['layer']} {s['kind']}, bias {s['bias']:g}, "
                     f"{_normalised(s['normalize'])}, k {lost['k']} → CorLoc {100 * lost['corloc']:.2f}% "
                     f"on {lost['n']} images")
        if len(lost["sweep"]) > 1:
            b = lost["best_on_eval_set"]
            lines.append(f"  - sweep ({len(lost['sweep'])} settings): best on the evaluation set block {b['layer']} "
                         f"{b['kind']}, bias {b['bias']:g}, {_normalised(b['normalize'])} → {100 * b['corloc']:.2f}% "
                         "(chosen on the evaluation data: an upper bound, not a result)")
    return lines


def dense_markdown(result: DenseView) -> str:
    ds = result.dataset
    parts = [f"# vsink dense evaluation — `{result.model}`", ""]
    if result.synthetic:
        parts += ["**Synthetic demo model** (planted high-norm tokens, see docs/demo.md): the numbers say "
                  "nothing about any real model.", ""]
    evaluated = _split(ds["split"], ds["images"], ds["images_evaluated"])
    train = (f", linear head trained on {_split(ds['train_split'], ds['train_images'], ds['train_images_used'])}"
             if ds.get("train_split") and "linear-seg" in result.tasks else "")
    size = result.settings["input_size"]
    parts.append(f"Dataset: {ds['name']} [{ds['format']}], split {evaluated}{train}; input {size[0]}×{size[1]}.")
    parts.append("")
    parts += [statistics_line(result), ""]
    header, rows = _rows(result)
    parts.append("| " + " | ".join(header) + " |")
    parts.append("|" + "---|" * len(header))
    parts += ["| " + " | ".join(r) + " |" for r in rows]
    lost = _lost_lines(result)
    if lost:
        parts += ["", "LOST:"] + lost
    parts += ["", "Variants:"] + [f"- **{n}**: {r['description']}; layout {r.get('layout')}"
                                  for n, r in result.variants.items()]
    return "\n".join(parts) + "\n"


def _artifact_curves(result: DenseView) -> list[str]:
    from ..export.figures import layer_curves_figure
    from ..export.html import fig

    per = {name: res["artifacts"]["per_layer"] for name, res in result.variants.items() if res.get("artifacts")}
    if not per:
        return []
    outliers = {n: ([r["layer"] for r in rows], [100 * r["outlier_fraction"] for r in rows]) for n, rows in per.items()}
    ratios = {n: ([r["layer"] for r in rows], [r["norm_ratio"] for r in rows]) for n, rows in per.items()}
    return ["<h2>Artifacts per block, all variants on one axis</h2><div class='grid'>",
            fig(layer_curves_figure(outliers, ylabel="outlier patches (%)", title="outlier patches per block",
                                    floor=0.0), "outliers per block"),
            fig(layer_curves_figure(ratios, ylabel="max / median patch norm", title="norm ratio per block", floor=1.0),
                "norm ratio per block"), "</div>"]


def dense_html(result: DenseView) -> str:
    """The report page: the headline table with deltas, per-class IoU bars, per-block artifact
    curves, and the first evaluation images with ground truth, predicted masks and LOST boxes."""
    from ..export.dense_figures import per_class_iou_figure, previews_figure
    from ..export.html import banner, esc, fig, inline_markdown, page, table
    from ..export.report import SYNTHETIC_NOTE

    header, rows = _rows(result)
    body = [f"<h1>vsink dense evaluation — <code>{esc(result.model)}</code></h1>"]
    if result.synthetic:
        body.append(banner(SYNTHETIC_NOTE))
    md = dense_markdown(result).splitlines()
    body += [f"<p>{inline_markdown(line)}</p>" for line in md if line.startswith(("Dataset:", "Intervals:"))]
    body.append(table([esc(h) for h in header], [[esc(c) for c in r] for r in rows]))
    lost = _lost_lines(result)
    if lost:
        body.append("<h2>LOST</h2><ul>" + "".join(f"<li>{inline_markdown(line.lstrip(' -'))}</li>" for line in lost)
                    + "</ul>")
    seg = {name: res["linear_seg"]["per_class_iou"] for name, res in result.variants.items() if res.get("linear_seg")}
    if seg:
        body.append("<h2>Per-class IoU</h2>" + fig(per_class_iou_figure(seg, result.dataset.get("class_names")),
                                                    "per-class IoU", "wide"))
    body += _artifact_curves(result)
    pv = result.previews
    if pv is not None and pv.ids and (pv.predicted or pv.lost):
        classes = max((res["linear_seg"]["num_classes"] for res in result.variants.values() if res.get("linear_seg")),
                      default=1)
        body.append(f"<h2>First {len(pv.ids)} evaluation images</h2>"
                    + fig(previews_figure(pv, classes, result.dataset.get("class_names")), "predictions", "wide"))
    body.append("<h2>Variants</h2><ul>" + "".join(
        f"<li><b>{esc(n)}</b>: {inline_markdown(r['description'])}; layout {esc(str(r.get('layout')))}</li>"
        for n, r in result.variants.items()) + "</ul>")
    if result.skipped:
        body.append(banner(f"{len(result.skipped)} items skipped (see results.json)", "warn"))
    return page(f"vsink dense: {result.model}", body)
