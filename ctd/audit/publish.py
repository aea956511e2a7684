"""The end of the night: the report's page and files, then the manifest (the publish), then clean-up.

Nothing is published when a row is missing (rows read ≠ scored + quarantined). The manifest is the
one conditional write that makes the attempt the published run (:meth:`ctd.runs.layout.RunLayout.publish`);
it is written only while this driver still holds the run's lease.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from .. import storage
from ..log import log
from ..reporting.pages import csv_bytes, write_report
from ..reporting.plots import plot_binned, plot_history, plot_quality_history
from ..reporting.redact import redact_values
from ..runs.history import History, night
from ..runs.layout import RunLayout
from ..runs.notify import notify
from ..tables import write_parquet
from .facts import HIST_BINS, Facts
from .index import write_index
from .report import AuditReport
from .specs import PublishSpec

__all__ = ["TREND_NIGHTS", "figures", "write_audit_report", "publish"]

TREND_NIGHTS = 60  # nights drawn in the report's trend (the drift statistic uses every night)


def figures(report: AuditReport, facts: Facts, history: History) -> tuple[dict[str, bytes], History]:
    """The report's plots (d(x) and score histograms, the trend over the nights) and the nights drawn."""
    h = facts.histograms
    nights = History((history.nights + [night(report.model_dump())])[-TREND_NIGHTS:], history.gaps)
    figs = {
        "dv_histogram": plot_binned(
            {"scored rows": h["dv"]}, HIST_BINS["dv"], report.lambda_star, f"DV scores of run {report.run_id} and λ*", "d(x)"
        ),
        "score_histogram": plot_binned(
            {"probe p(x)": h["probe"], "final score": h["final"]}, HIST_BINS["probe"], None, "Probe and final scores", "P(unsafe)"
        ),
        "history": plot_history(nights.nights, nights.gaps),
    }
    if any(n.get("quality") for n in nights.nights):
        figs["quality_history"] = plot_quality_history(nights.nights)
    return figs, nights


def write_audit_report(
    layout: RunLayout, report: AuditReport, facts: Facts, history: History, review: pa.Table | None, secrets: list[str]
) -> dict[str, str]:
    """``report.json``, ``report.html`` (with its plots), ``review.parquet`` and ``review.csv`` (for a
    spreadsheet: formula-shaped cells neutralised) in the attempt, every text value redacted first
    (never the finished page)."""
    report = report.redacted(secrets)
    if review is not None:
        review = pa.Table.from_pylist(redact_values(review.to_pylist(), secrets), schema=review.schema)
    figs, nights = figures(report, facts, history)
    files = write_report(layout.attempt_root, "report", report.model_dump(), report.html(figs, nights, review), figs)
    if review is not None:  # the rows to look at first, with redacted excerpts: Parquet and CSV beside the report
        files["review"] = storage.join(layout.attempt_root, "review.parquet")
        write_parquet(files["review"], review)
        files["review_csv"] = storage.join(layout.attempt_root, "review.csv")
        storage.write_bytes(files["review_csv"], csv_bytes(review))
    return files


def publish(
    layout: RunLayout, report: AuditReport, files: dict[str, str], spec: PublishSpec, *, before_commit: Callable[[], None]
) -> None:
    """Publish the attempt (the manifest, last), then remove the staging (it holds the delegated rows'
    text) unless kept, rewrite the output's index of the nights, send the night's message when it is
    configured, and log the alarms and the summary. Nothing after the manifest can fail the run."""
    if not report.invariant_ok:
        raise RuntimeError(
            f"row invariant violated: read {report.rows_read} != scored {report.rows_scored} + "
            f"quarantined {report.rows_quarantined}; run {report.run_id} is not published"
        )
    attention = [t for k, t in report.headline() if k == "alarm"]
    summary = {
        "audited_date": report.audited_date,
        "rows_read": report.rows_read,
        "rows_scored": report.rows_scored,
        "rows_quarantined": report.rows_quarantined,
        "delegated": report.delegated,
        "drift_alarm": report.drift_alarm,
        "judge_alarm": report.judge_alarm,
        "calibration_hash": report.calibration_hash,
        "needs_attention": bool(attention),
    }
    layout.publish(summary, list(files.values()), before_commit=before_commit)
    log(f"published {layout.root} (attempt {layout.attempt}; manifest written last)")
    try:
        log(f"index of the nights: {write_index(layout.output)}")
    except Exception as e:  # published already: the index is a convenience
        log(f"published; writing the index of the nights failed ({e!r}): `ctd report index {layout.output}` rewrites it")
    notify(
        spec.notify,
        summary
        | {
            "run_id": report.run_id,
            "attention": attention,
            "report": files["html"],
            "headline": [t for k, t in report.headline() if k != "alarm"],
        },
    )
    if not spec.keep_staging:
        try:  # stage outputs (with the delegated rows' text) do not outlive the run
            storage.remove(layout.staging)
        except Exception as e:  # published already: never fail (and get rerun) over garbage
            log(f"published; removing {layout.staging} failed ({e!r}): remove it by hand")
    if report.drift_alarm:
        log("DRIFT ALARM: " + report.drift_message)
    if report.judge_alarm:
        log("JUDGE ALARM: " + report.judge_message)
    for line in report.summary_lines():
        print(line, flush=True)
    log(f"report: {files['html']}")
