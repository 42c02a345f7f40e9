"""Pieces of vsink's self-contained HTML pages: one style sheet, inline PNGs, tables, banners."""

from __future__ import annotations

import html
import re
from typing import Iterable, Optional, Sequence

from .figures import data_uri, png_bytes

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1280px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}th.l,td.l{text-align:left}.warn{background:#fff4d6;border:1px solid #e0b000;padding:8px 12px}
.banner{background:#ffe1e1;border:2px solid #c00;padding:10px 14px;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid img{max-width:600px}code{background:#f4f4f4;padding:1px 4px}
img.wide{max-width:100%}.pos{color:#0a7a2a}.neg{color:#b00020}.muted{color:#777}
mark.halluc{background:#ffb3b3;padding:0 2px}mark.ok{background:#c8f0c8;padding:0 2px}
td.cap{text-align:left;max-width:760px;font-size:12px}
"""

esc = html.escape

#: the banner of every page about the synthetic demo LVLM (``demo-llava``)
SYNTHETIC_LVLM_NOTE = ("**Synthetic demo LVLM.** Its register neurons, visual sinks and sink dimensions are planted by "
                       "construction (see docs/lvlm.md); the numbers say nothing about any real model, and the text "
                       "it generates is meaningless.")
#: the banner of a results page of the planted-hallucination demo (``demo-halluc``)
SYNTHETIC_HALLUC_NOTE = ("**Synthetic demo LVLM (demo-halluc).** Its hallucination and the effect of each mitigation "
                         "are planted by construction, with answers computable by hand (see docs/hallucination.md); "
                         "the numbers show that the mitigations act on the mechanism they target, and say nothing "
                         "about any real model.")


def page(title: str, body: Iterable[str]) -> str:
    """A complete HTML document with the shared style and no external asset."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
                      f"<style>{STYLE}</style></head><body>", *body, "</body></html>"])


def img(png: bytes, alt: str, cls: Optional[str] = None) -> str:
    """An inline PNG."""
    klass = f" class='{cls}'" if cls else ""
    return f'<img{klass} src="{data_uri(png)}" alt="{esc(alt)}">'


def fig(figure, alt: str, cls: Optional[str] = None) -> str:
    """A matplotlib figure as an inline PNG (the figure is closed)."""
    return img(png_bytes(figure), alt, cls)


def banner(text: str, kind: str = "banner") -> str:
    """A visible warning box (``banner``: red, ``warn``: yellow); ``text`` is escaped, with
    ``**bold**`` and ```code``` rendered."""
    return f"<p class='{kind}'>{inline_markdown(text)}</p>"


def inline_markdown(text: str) -> str:
    """Escape ``text`` and render its ```code``` and ``**bold**`` spans (nothing else)."""
    out = esc(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """A table of already-escaped cells; the first ``left`` columns are left-aligned."""
    cls = lambda i: " class='l'" if i < left else ""  # noqa: E731
    out = ["<table><tr>" + "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header)) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def fmt(v) -> str:
    """A number for a table cell (4 significant digits), ``—`` for None."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc(str(v))


def delta(after: Optional[float], before: Optional[float], *, lower_is_better: bool = True,
          decimals: Optional[int] = None) -> str:
    """``after − before`` as a coloured signed cell (green where it moved the good way): with
    ``decimals``, rounded to that many (``±0.00`` when it rounds to zero), else 4 significant digits."""
    if after is None or before is None:
        return "<span class='muted'>—</span>"
    d = after - before if decimals is None else round(after - before, decimals)
    if d == 0:
        return f"<span class='muted'>{'0' if decimals is None else f'±{0:.{decimals}f}'}</span>"
    good = (d < 0) == lower_is_better
    size = f"{abs(d):.4g}" if decimals is None else f"{abs(d):.{decimals}f}"
    return f"<span class='{'pos' if good else 'neg'}'>{'+' if d > 0 else '−'}{size}</span>"
