"""``results.html`` of ``vsink eval pope``, ``vsink eval chair`` and the benchmarks of
:mod:`vsink.evaluate.benchmarks`: every mitigation side by side, with deltas against the first.
Each number shows its bootstrap interval and each delta its paired interval, coloured as a win or
a loss only when that interval excludes 0 (POPE and the yes/no benchmarks add McNemar's exact
test); POPE per split with the unparseable answers counted (a split whose answers are all
unparseable shows no metric, not 0.00); CHAIR per caption with the object words marked
(hallucinated red, grounded green), several captions of an image in one cell."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Optional

from ..evaluate.stats import excludes_zero
from .html import SYNTHETIC_HALLUC_NOTE, SYNTHETIC_LVLM_NOTE, banner, esc, page, table

POPE_METRICS = (("accuracy", "accuracy (%)", False), ("precision", "precision (%)", False),
                ("recall", "recall (%)", False), ("f1", "F1 (%)", False), ("yes_ratio", "yes-ratio (%)", None))
CHAIR_METRICS = (("chair_s", "CHAIR_s (%)", 100, True), ("chair_i", "CHAIR_i (%)", 100, True),
                 ("recall", "recall (%)", 100, False), ("avg_len", "average length (words)", 1, None))
#: captions shown per page
MAX_CAPTIONS = 300


def _cell(value: Optional[float], scale: float = 100, interval: Optional[dict[str, float]] = None) -> str:
    if value is None:
        return "—"
    if interval is None:
        return f"{value * scale:.2f}"
    return (f"{value * scale:.2f} <span class='muted'>[{interval['low'] * scale:.2f}, "
            f"{interval['high'] * scale:.2f}]</span>")


def _delta(value: Optional[float], base: Optional[float], lower_is_better: Optional[bool], scale: float = 100,
           paired: Optional[dict[str, float]] = None) -> str:
    """The signed difference with 2 decimals, as in ``results.md``, coloured (green a win, red a
    loss) where some direction is better. ``paired``: the paired interval of the difference
    (``{}`` where none could be made), shown, and the colour kept only when it excludes 0; None:
    a summary written without intervals (an older vsink's), coloured by direction."""
    if value is None or base is None:
        return "<span class='muted'>—</span>"
    d = round((value - base) * scale, 2) + 0.0
    text = f"±{0:.2f}" if d == 0 else f"{d:+.2f}".replace("-", "−")
    if paired:
        text += f" [{paired['low'] * scale:+.2f}, {paired['high'] * scale:+.2f}]".replace("-", "−")
    shown = paired is None or bool(paired) and excludes_zero(paired["low"], paired["high"])
    if lower_is_better is None or not shown or d == 0:
        return f"<span class='muted'>{text}</span>"
    good = (d < 0) == lower_is_better
    return f"<span class='{'pos' if good else 'neg'}'>{text}</span>"


def _pope_split_table(names: list[str], metrics: list[Optional[dict[str, Any]]],
                      intervals: list[dict[str, Any]], paired: list[dict[str, Any]],
                      tests: list[Optional[dict[str, Any]]]) -> str:
    header = ["metric", esc(names[0])] + [h for n in names[1:] for h in (esc(n), f"Δ vs {esc(names[0])}")]
    unusable = [m is not None and m.get("n") and m.get("unparseable") == m.get("n") for m in metrics]
    rows = []
    for key, label, lower in POPE_METRICS:
        def value(i: int) -> Optional[float]:
            return None if metrics[i] is None or unusable[i] else metrics[i].get(key)

        cells = [esc(label), _cell(value(0), 100, intervals[0].get(key)) if not unusable[0]
                 else "<b>n/a: all unparseable</b>"]
        for i in range(1, len(names)):
            cells.append(_cell(value(i), 100, intervals[i].get(key)) if not unusable[i] else "<b>n/a: all unparseable</b>")
            cells.append(_delta(value(i), value(0), None if lower is None else lower, 100, paired[i].get(key) or {}))
        rows.append(cells)
    counts = []
    for i, m in enumerate(metrics):
        text = "—" if m is None else f"{m.get('unparseable', 0)} / {m.get('n', 0)}"
        counts.append(f"<b class='neg'>{text}</b>" if m is not None and m.get("unparseable") else text)
    cells = ["unparseable answers", counts[0]]
    for c in counts[1:]:
        cells += [c, ""]
    rows.append(cells)
    if any(t is not None for t in tests):
        cells = ["McNemar's exact test (right only under the first / only under this one)", ""]
        for t in tests[1:]:
            cells += ["", "—" if t is None else f"{t['b']} / {t['c']}, p = {t['p']:.3g}"]
        rows.append(cells)
    return table(header, rows)


def pope_sections(summary: dict[str, Any]) -> list[str]:
    results = summary["results"]
    names = list(results)
    parser = summary["protocol"].get("parser")
    parts = []
    problems = [(n, s, m) for n, r in results.items() for s, m in r["splits"].items() if m.get("unparseable")]
    if problems:
        lines = "; ".join(f"{n} / {s}: {m['unparseable']} of {m['n']}" for n, s, m in problems)
        full = any(m["unparseable"] == m["n"] for _, _, m in problems)
        parts.append(banner(f"**Unparseable answers** (parser `{parser}`): {lines}. They count as wrong answers that "
                            "are not a yes" + ("; where every answer of a split is unparseable its metrics are not "
                                               "shown (they would all read 0.00)" if full else "") + ".",
                            "banner" if full else "warn"))
    comparisons = summary.get("comparisons", {})
    splits = sorted({s for r in results.values() for s in r["splits"]})
    for split in splits + ["mean"]:
        def part(d: Optional[dict[str, Any]]) -> dict[str, Any]:
            return {} if d is None else (d.get("mean", {}) if split == "mean" else d.get("splits", {}).get(split, {}))

        metrics = [(r["mean"] if split == "mean" else r["splits"].get(split)) for r in results.values()]
        intervals = [part(r.get("intervals")) for r in results.values()]
        paired = [{}] + [part(comparisons.get(n)) for n in names[1:]]
        tests = [None] + [comparisons.get(n, {}).get("mcnemar", {}).get("all" if split == "mean" else split)
                          for n in names[1:]]
        title = "mean over splits" if split == "mean" else f"split {split}"
        parts.append(f"<h2>{esc(title)}</h2>" + _pope_split_table(names, metrics, intervals, paired, tests))
    return parts


def _locate(caption: str, words: list[str], hallucinated: list[bool]) -> tuple[str, list[str]]:
    """The caption with each word marked at its first unused occurrence (case-insensitive, a plural
    ending allowed); the words not found in the text.

    Linear in the caption for each distinct word: a word's matches are read once, in order, and a
    repeated word resumes after its previous mark (a match skipped earlier overlapped a mark, and
    marks are never removed, so it would be skipped again)."""
    spans: list[tuple[int, int, bool]] = []
    taken = bytearray(len(caption))
    matches: dict[str, Iterator[re.Match]] = {}
    missing = []
    for word, bad in zip(words, hallucinated):
        if word not in matches:
            pattern = re.compile(r"\b" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?:e?s)?\b", re.I)
            matches[word] = pattern.finditer(caption)
        for m in matches[word]:
            if not any(taken[m.start():m.end()]):
                spans.append((m.start(), m.end(), bad))
                taken[m.start():m.end()] = b"\x01" * (m.end() - m.start())
                break
        else:
            missing.append(word)
    out, at = [], 0
    for start, end, bad in sorted(spans):
        out.append(esc(caption[at:start]))
        out.append(f"<mark class='{'halluc' if bad else 'ok'}'>{esc(caption[start:end])}</mark>")
        at = end
    out.append(esc(caption[at:]))
    return "".join(out), missing


def caption_cell(detail: dict[str, Any]) -> str:
    """One caption with its object words marked, and its hallucinated classes."""
    bad_classes = set(detail.get("hallucinated", []))
    words = detail.get("mentioned_words", [])
    flags = [c in bad_classes for c in detail.get("mentioned", [])]
    text, missing = _locate(detail.get("caption", ""), words, flags)
    extra = f" <span class='muted'>(found as: {esc(', '.join(missing))})</span>" if missing else ""
    halluc = (f"<br><span class='neg'>hallucinated: {esc(', '.join(sorted(bad_classes)))}</span>"
              if bad_classes else "")
    return text + extra + halluc


def chair_sections(summary: dict[str, Any]) -> list[str]:
    results = summary["results"]
    names = list(results)
    header = ["metric", esc(names[0])] + [h for n in names[1:] for h in (esc(n), f"Δ vs {esc(names[0])}")]
    rows = []
    comparisons = summary.get("comparisons", {})
    for key, label, scale, lower in CHAIR_METRICS:
        base = results[names[0]].get(key)
        cells = [esc(label), _cell(base, scale, results[names[0]].get("intervals", {}).get(key))]
        for n in names[1:]:
            cells += [_cell(results[n].get(key), scale, results[n].get("intervals", {}).get(key)),
                      _delta(results[n].get(key), base, lower, scale, comparisons.get(n, {}).get(key) or {})]
        rows.append(cells)

    def counts(r: dict[str, Any]) -> str:
        return f"{r.get('n')} ({r.get('images', r.get('n'))}, {r.get('mentions')}, {r.get('hallucinated_mentions')})"

    cells = ["captions (images, mentions, hallucinated)", counts(results[names[0]])]
    for n in names[1:]:
        cells += [counts(results[n]), ""]
    rows.append(cells)
    parts = ["<h2>Scores</h2>" + table(header, rows)]
    by_image: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for n, r in results.items():
        for d in r.get("captions", []):
            by_image.setdefault(int(d["image_id"]), {}).setdefault(n, []).append(d)
    ids = sorted(by_image)
    parts.append(f"<h2>Captions</h2><p><mark class='halluc'>hallucinated</mark> object words, "
                 f"<mark class='ok'>grounded</mark> ones; {len(ids)} images"
                 + (f", the first {MAX_CAPTIONS} shown" if len(ids) > MAX_CAPTIONS else "") + ".</p>")
    cap_rows = []
    for image_id in ids[:MAX_CAPTIONS]:
        cells = [str(image_id)]
        for n in names:
            caps = by_image[image_id].get(n)
            cells.append("<hr>".join(caption_cell(d) for d in caps) if caps else "<span class='muted'>—</span>")
        cap_rows.append(cells)
    html_table = table(["image id"] + [esc(n) for n in names], cap_rows)
    parts.append(html_table.replace("<td>", "<td class='cap'>"))
    return parts


def benchmark_sections(summary: dict[str, Any]) -> list[str]:
    """A benchmark of :mod:`vsink.evaluate.benchmarks`: its metrics side by side, each with its
    bootstrap interval, with deltas (2 decimals) and their paired intervals, coloured by the
    metric's better direction only when that interval excludes 0, McNemar's exact test for the
    yes/no benchmarks, what its numbers compare with, and its own detail tables per mitigation."""
    from ..evaluate.benchmarks import get

    bench = get(summary["kind"])
    results = summary["results"]
    names = list(results)
    per = [{m.label: m for m in bench.metrics(r)} for r in results.values()]
    labels = list(dict.fromkeys(label for p in per for label in p))
    header = ["metric", esc(names[0])] + [h for n in names[1:] for h in (esc(n), f"Δ vs {esc(names[0])}")]
    comparisons = summary.get("comparisons")
    intervals = [r.get("intervals", {}) for r in results.values()]
    rows = []
    for label in labels:
        ms = [p.get(label) for p in per]
        scale = next(m.scale for m in ms if m is not None)
        lower = next(m.lower_is_better for m in ms if m is not None)
        values = [None if m is None else m.value for m in ms]
        cells = [esc(label), _cell(values[0], scale, intervals[0].get(label))]
        for i, (n, v) in enumerate(zip(names[1:], values[1:]), 1):
            paired = None if comparisons is None else comparisons.get(n, {}).get(label) or {}
            cells += [_cell(v, scale, intervals[i].get(label)), _delta(v, values[0], lower, scale, paired)]
        rows.append(cells)
    tests = [None if comparisons is None else comparisons.get(n, {}).get("mcnemar") for n in names[1:]]
    if any(tests):
        cells = ["McNemar's exact test (right only under the first / only under this one)", ""]
        for t in tests:
            cells += ["", "—" if t is None else f"{t['b']} / {t['c']}, p = {t['p']:.3g}"]
        rows.append(cells)
    parts = [f"<h2>{esc(bench.title)}</h2>" + table(header, rows),
             f"<p><b>Comparable with:</b> {esc(bench.comparable)}</p>"]
    if bench.details is not None:
        for name, r in results.items():
            for title, head, body in bench.details(r):
                parts.append(f"<h3>{esc(name)}: {esc(title)}</h3>"
                             + table([esc(h) for h in head], [[esc(c) for c in row] for row in body]))
    return parts


def protocol_table(protocol: dict[str, Any]) -> str:
    """The protocol as a two-column table: text as text (the prompt keeps its line breaks),
    a list of images as its count, nested settings as compact JSON."""
    rows = []
    for key, value in protocol.items():
        if key == "images" and isinstance(value, list):
            shown = f"{len(value)} images"
        elif isinstance(value, str):
            shown = f"<code style='white-space:pre-wrap'>{esc(value)}</code>"
        elif isinstance(value, (dict, list)):
            shown = f"<code>{esc(json.dumps(value, sort_keys=True))}</code>" if value else "—"
        else:
            shown = esc(json.dumps(value))
        rows.append([esc(key), shown])
    return table(["setting", "value"], rows, left=2)


def hallucination_html(summary: dict[str, Any]) -> str:
    """The page of a ``results.json`` summary of :func:`vsink.evaluate.hallucination.save_results`."""
    kind = summary["kind"]
    title = f"vsink eval {kind}"
    body = [f"<h1>{esc(title)}</h1>"]
    protocol = summary["protocol"]
    if protocol.get("synthetic"):
        body.append(banner(SYNTHETIC_HALLUC_NOTE if protocol.get("model") == "demo-halluc" else SYNTHETIC_LVLM_NOTE))
    body.append("<h2>Protocol</h2>" + protocol_table(protocol))
    if summary.get("statistics"):
        from ..evaluate.hallucination_stats import statistics_line

        body.append(f"<p>{esc(statistics_line(summary['statistics']))}</p>")
    if kind == "pope":
        body += pope_sections(summary)
    elif kind == "chair":
        body += chair_sections(summary)
    else:
        body += benchmark_sections(summary)
    for name, items in summary.get("skipped", {}).items():
        if items:
            body.append(banner(f"{name}: {len(items)} items skipped (see results.json)", "warn"))
    return page(title, body)
