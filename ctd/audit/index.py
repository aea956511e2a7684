"""The index of the nights: ``<output>/index.html``, one bookmark for every audited night.

One row per published run, newest first: the night, its status (ok / needs attention, with what /
unreadable, with why), its numbers and a link to its report; then the trend of the latest
calibration's nights. Rewritten after every publish and by ``ctd report index <output>``. Every report
is read through its run's manifest and checked against it (:class:`ctd.runs.folder.RunFolder`).
"""

from __future__ import annotations

import html

from pydantic import ValidationError

from .. import storage
from ..reporting.pages import html_figure, html_page
from ..reporting.plots import plot_history
from ..runs.folder import RunError, RunFolder, list_runs, pydantic_problems, run_folder
from ..runs.history import history
from .report import AuditReport

__all__ = ["index_rows", "write_index"]


def index_rows(output: str) -> list[dict]:
    """One entry per published audit run under ``output``, newest night first: status "ok", "needs
    attention" (with the sentences) or "unreadable" (with the reason), and the report's link."""
    rows = []
    for rid in list_runs(output):
        uri = run_folder(output, rid)
        try:
            run = RunFolder.open(uri)
            body = run.report()
            if body.get("kind") != "audit":
                continue
            r = AuditReport.model_validate(body)
            attention = [t for k, t in r.headline() if k == "alarm"]
            rows.append(
                {
                    "night": r.audited_date,
                    "run": rid,
                    "status": "needs attention" if attention else "ok",
                    "why": attention,
                    "audited": r.rows_scored,
                    "unsafe": r.decisions_unsafe,
                    "judged": r.delegated,
                    "link": f"runs/{rid}/{run.report_entry('report.html').file}",
                }
            )
        except RunError as e:
            rows.append({"night": "?", "run": rid, "status": "unreadable", "why": [e.reason], "link": None})
        except ValidationError as e:
            rows.append(
                {"night": "?", "run": rid, "status": "unreadable", "why": [f"report.json: {pydantic_problems(e)}"], "link": None}
            )
    return sorted(rows, key=lambda r: (r["night"], r["run"]), reverse=True)


def write_index(output: str) -> str:
    """Write ``<output>/index.html``; returns its URI."""
    rows = index_rows(output)
    style = {"ok": "ok", "needs attention": "alarm", "unreadable": "alarm"}
    body = "".join(
        "<tr>"
        f"<td class='text'>{html.escape(r['night'])}</td>"
        f"<td class='text'>{html.escape(r['run'])}</td>"
        f"<td class='text {style[r['status']]}'>{html.escape(r['status'])}</td>"
        f"<td class='text'>{'<br/>'.join(html.escape(w) for w in r['why']) or '—'}</td>"
        + "".join(f"<td>{r[k]:,}</td>" if k in r else "<td>—</td>" for k in ("audited", "unsafe", "judged"))
        + (f"<td><a href='{html.escape(r['link'], quote=True)}'>report</a></td>" if r["link"] else "<td>—</td>")
        + "</tr>"
        for r in rows
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "night",
            "run",
            "status",
            "what needs attention, or why it is unreadable",
            "audited",
            "flagged unsafe",
            "sent to the judge",
            "report",
        )
    )
    need = sum(r["status"] != "ok" for r in rows)
    sections = [
        (
            "The nights",
            f"<p>{len(rows):,} published night(s); {need:,} need attention or could not be read.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        )
    ]
    h = history(output)
    if h.nights or h.gaps:
        cal = h.calibration_hash
        sections.append(
            (
                "The trend",
                html_figure(
                    "history",
                    plot_history(h.nights, h.gaps),
                    f"One point per audited night with the latest calibration ({(cal or '?')[:12]}…); "
                    "grey bands: nights that could not be read",
                ),
            )
        )
    uri = storage.join(output, "index.html")
    storage.write_bytes(uri, html_page(f"CTD audits under {output}", sections).encode("utf-8"))
    return uri
