"""The nights before: one row per audited day made with one calibration, read from the published runs.

Each published audit run's ``report.json`` gives one night (:func:`night`); a rerun of a day replaces
its night (the latest published run of each day is kept), and a backfilled day sees only the nights
before it. ``ctd report history`` prints the table; the audit report draws the trend.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .. import storage
from .layout import list_runs, run_file

__all__ = ["NIGHT_FIELDS", "night", "history", "history_rows", "history_text"]

NIGHT_FIELDS = (
    "run_id",
    "audited_date",
    "created_at",
    "rows_read",
    "rows_scored",
    "rows_quarantined",
    "delegated_by_threshold",
    "delegated",
    "expert_calls",
    "decisions_unsafe",
    "alpha",
    "delta",
    "drift_e_value",
    "drift_alpha",
    "drift_alarm",
    "judge_alarm",
    "calibration_hash",
)


def night(report: dict) -> dict:
    """The fields of one audit report that the trend draws."""
    return {k: report.get(k) for k in NIGHT_FIELDS}


def history(
    output: str,
    *,
    calibration_hash: str | None = None,
    exclude_run: str | None = None,
    before_day: str | None = None,
    last: int | None = None,
) -> list[dict]:
    """Published audit runs under ``output`` made with one calibration (default: the latest audited
    day's; a prefix of the hash is enough), one per audited day (the latest published run of each
    day: a rerun replaces a night, it does not add one), oldest first; only days before
    ``before_day`` when given (an audit of day D, backfilled or rerun, sees the nights before D);
    at most the ``last`` nights. Reads one report.json per run, concurrently."""

    def read(rid):
        try:
            r = storage.read_json(run_file(output, rid, "report.json"))
        except (FileNotFoundError, ValueError):
            return None
        return night(r) if r.get("kind") == "audit" else None

    with ThreadPoolExecutor(16) as pool:
        nights = [h for h in pool.map(read, [r for r in list_runs(output) if r != exclude_run]) if h is not None]
    if calibration_hash is None and nights:
        calibration_hash = max(nights, key=lambda h: (h["audited_date"], h["created_at"]))["calibration_hash"]
    elif calibration_hash is not None:  # a prefix names one calibration
        full = sorted({h["calibration_hash"] for h in nights if str(h["calibration_hash"] or "").startswith(calibration_hash)})
        if len(full) > 1:
            raise ValueError(
                f"calibration {calibration_hash!r} matches {len(full)} calibrations ({', '.join(full)}): give more of the hash"
            )
        calibration_hash = full[0] if full else calibration_hash
    by_day: dict[str, dict] = {}
    for h in nights:
        d = h["audited_date"]
        if (
            h["calibration_hash"] == calibration_hash
            and (before_day is None or d < before_day)
            and (d not in by_day or by_day[d]["created_at"] < h["created_at"])
        ):
            by_day[d] = h
    out = sorted(by_day.values(), key=lambda h: h["audited_date"])
    return out[-last:] if last else out


def history_rows(nights: list[dict]) -> list[dict]:
    """The trend as table rows (terminal and page): one per night."""
    rows = []
    for h in nights:
        n, read = max(h["rows_scored"], 1), max(h["rows_read"], 1)
        rows.append(
            {
                "night": h["audited_date"],
                "run": h["run_id"],
                "audited": h["rows_scored"],
                "delegation rate": f"{h['delegated_by_threshold'] / n:.2%}",
                "budget α": f"{h['alpha']:.2%}",
                "judge calls": h["expert_calls"],
                "unsafe": f"{h['decisions_unsafe'] / n:.2%}",
                "quarantined": f"{h['rows_quarantined'] / read:.2%}",
                "drift e-detector": f"{h['drift_e_value']:.3g} / {1 / h['drift_alpha']:g}"
                + (" ALARM" if h["drift_alarm"] else ""),
            }
        )
    return rows


def history_text(nights: list[dict]) -> str:
    """The trend in the terminal (``ctd report history``)."""
    if not nights:
        return "no published audit runs"
    rows = history_rows(nights)
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).rjust(width[c]) if i else str(r[c]).ljust(width[c]) for i, c in enumerate(cols))  # noqa: E731
    head = (
        f"{len(nights)} audited night(s) with calibration {nights[-1]['calibration_hash'][:12]}… "
        f"(α = {nights[-1]['alpha']:.2%}, δ = {nights[-1]['delta']}); drift e-detector / alarm level"
    )
    return "\n".join([head, line({c: c for c in cols}), *(line(r) for r in rows)])
