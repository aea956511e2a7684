"""Self-contained HTML pages beside a JSON summary, and the number formats their sentences use.

A page is one file: figures are embedded as base64 PNG, so one HTML file can be fetched from object
storage and opened anywhere. Every value is escaped where it is put into markup; secrets are taken out
of the values before a page is built (:func:`ctd.reporting.redact.redact_values`), never by a pattern
over the finished page.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

import numpy as np

from .. import storage

__all__ = ["html_table", "html_figure", "html_page", "write_report", "csv_bytes", "pct", "share", "drift_words"]


def pct(x: float) -> str:
    """A share as a percentage with three significant figures: 0.2 → "20%", 0.025 → "2.5%"."""
    return f"{100 * x:.3g}%"


def share(k: int, n: int) -> str:
    """k of n as a percentage with one decimal, "—" when n is 0."""
    return f"{k / n:.1%}" if n else "—"


def html_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>(none)</em></p>"
    cols = columns or list(rows[0])

    def cell(x):
        if x is None:
            return "<td>—</td>"
        if isinstance(x, float):
            return f"<td>{'—' if not np.isfinite(x) else f'{x:.4g}'}</td>"
        if isinstance(x, (bool, int, np.integer)):
            return f"<td>{html.escape(str(x))}</td>"
        return f"<td class='text'>{html.escape(str(x))}</td>"  # words read left to right

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def drift_words(e_value: float, level: float) -> str:
    """The drift e-detector in words first, then its number against the alarm at 1/level."""
    at = 1 / level
    if e_value >= at:
        return f"ALARM: the delegation rate has drifted up (e-detector {e_value:.3g}, alarm at {at:g})"
    if e_value >= 1:
        return f"some evidence of a higher rate, {e_value / at:.0%} of the way to the alarm (e-detector {e_value:.3g}, alarm at {at:g})"
    return f"no evidence of drift (e-detector {e_value:.2g}, alarm at {at:g})"


def html_figure(name: str, png: bytes, caption: str | None = None) -> str:
    """A figure embedded as base64 PNG (the page stays one self-contained file)."""
    return (
        f"<figure><img alt='{html.escape(caption or name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"
        f"<figcaption>{html.escape(caption or name)}</figcaption></figure>"
    )


def html_page(
    title: str, sections: list[tuple[str, str]], figures: dict[str, bytes] | None = None, captions: dict[str, str] | None = None
) -> str:
    """A self-contained page: sections of (heading, HTML) and figures embedded as base64 PNG, each with its
    caption in words (``captions``, by figure name: a figure without one is refused, so no page shows a
    file name under a plot)."""
    missing = sorted(set(figures or {}) - set(captions or {}))
    if missing:
        raise ValueError(f"figures without a caption: {missing}")
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}"
        "th{background:#f3f3f3}.alarm{color:#b00;font-weight:bold}.ok{color:#070}img{max-width:100%}pre{background:#f6f6f6;padding:.6em}"
        "ul.headline{font-size:17px;line-height:1.5}td.text{text-align:left;max-width:520px}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    for name, png in (figures or {}).items():
        parts.append(html_figure(name, png, (captions or {})[name]))
    parts.append("</body></html>")
    return "".join(parts)


def write_report(
    out_dir: str, name: str, summary: dict[str, Any], html_text: str, figures: dict[str, bytes] | None = None
) -> dict[str, str]:
    """Write ``<name>.json``, ``<name>.html`` and the figures (PNG) under ``out_dir`` (any fsspec URI).
    Returns the URIs written. The caller redacts the values first."""
    uris = {}
    for fname, png in (figures or {}).items():
        uri = storage.join(out_dir, f"{fname}.png")
        storage.write_bytes(uri, png)
        uris[fname] = uri
    j = storage.join(out_dir, f"{name}.json")
    storage.write_bytes(j, (json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode())
    h = storage.join(out_dir, f"{name}.html")
    storage.write_bytes(h, html_text.encode())
    uris.update({"json": j, "html": h})
    return uris


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...), +cmd|...):
# such a cell is written with a leading apostrophe, which spreadsheets show as text (OWASP's advice).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_bytes(table: Any) -> bytes:
    """A table (pyarrow) as CSV for a spreadsheet: UTF-8 with a header, every text cell that a
    spreadsheet would run as a formula prefixed with an apostrophe (numbers are left as they are)."""
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv

    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = pa.array(
                [None if v is None else ("'" + v if v.startswith(_FORMULA_START) else v) for v in col.to_pylist()], pa.string()
            )
        cols[name] = col
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(cols), buf)
    return buf.getvalue()
