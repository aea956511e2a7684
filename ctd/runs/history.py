"""The nights before: one row per audited day made with one calibration, read from the published runs.

Each published audit run's ``report.json`` gives one night (:func:`night`), read through the run's
manifest and checked against it (:class:`ctd.runs.folder.RunFolder`). A rerun of a day replaces its
night (the latest published run of each day is kept), and a backfilled day sees only the nights before
it. A run that cannot be read (a manifest or a report that is missing, corrupt or modified after
publishing) is never dropped silently: it is a :class:`Gap`, with its reason, in the table, the trend
plot, the audit report's drift section and the exit code of ``ctd report history --strict``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from ..reporting.pages import drift_words
from .folder import RunError, RunFolder, list_runs, pydantic_problems, run_folder

__all__ = ["Night", "Gap", "History", "night", "history", "history_rows", "history_text"]


class Night(BaseModel):
    """The fields of one audit report that the trend draws (validated: a report that lacks them, or
    holds something else, is a gap, not a night)."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    audited_date: str
    created_at: str
    rows_read: int
    rows_scored: int
    rows_quarantined: int
    delegated_by_threshold: int
    delegated: int
    expert_calls: int
    decisions_unsafe: int
    alpha: float
    delta: float
    drift_e_value: float
    drift_alpha: float
    drift_alarm: bool
    judge_alarm: bool
    calibration_hash: str
    # the control sample (reports from before it have none)
    control_judged: int = 0
    control_unsafe: int = 0
    quality: dict = {}
    quality_alarms: dict = {}


NIGHT_FIELDS = tuple(Night.model_fields)


def night(report: dict) -> dict:
    """The fields of one audit report that the trend draws."""
    return Night.model_validate(report).model_dump()


@dataclass(frozen=True)
class Gap:
    """A published run whose night cannot be read, and why. ``audited_date`` and ``calibration_hash``
    come from its manifest when that much is readable."""

    run_id: str
    reason: str
    audited_date: str | None = None
    calibration_hash: str | None = None


@dataclass
class History:
    nights: list[dict] = field(default_factory=list)  # oldest first, one per audited day
    gaps: list[Gap] = field(default_factory=list)

    @property
    def calibration_hash(self) -> str | None:
        return self.nights[-1]["calibration_hash"] if self.nights else None


def _read(output: str, rid: str) -> dict | Gap | None:
    """One run's night, its gap, or None for a run that is not an audit (a monitor run)."""
    uri = run_folder(output, rid)
    try:
        run = RunFolder.open(uri)
    except RunError as e:
        return Gap(rid, str(e))
    summary = run.manifest.summary
    day, cal = summary.get("audited_date"), summary.get("calibration_hash")
    try:
        report = run.report()
        if report.get("kind") != "audit":
            return None
        return night(report)
    except RunError as e:
        return Gap(rid, str(e), day, cal)
    except ValidationError as e:
        return Gap(rid, f"{uri}/report.json: not an audit report ({pydantic_problems(e)})", day, cal)


def history(
    output: str,
    *,
    calibration_hash: str | None = None,
    exclude_run: str | None = None,
    before_day: str | None = None,
    last: int | None = None,
) -> History:
    """Published audit runs under ``output`` made with one calibration (default: the latest audited
    day's; a prefix of the hash is enough), one per audited day (the latest published run of each
    day: a rerun replaces a night, it does not add one), oldest first; only days before
    ``before_day`` when given (an audit of day D, backfilled or rerun, sees the nights before D);
    at most the ``last`` nights. The runs that cannot be read are its gaps: those of this calibration
    and days, and those whose calibration or day cannot be told. Reads one report.json per run,
    concurrently."""
    with ThreadPoolExecutor(16) as pool:
        got = [
            g for g in pool.map(lambda r: _read(output, r), [r for r in list_runs(output) if r != exclude_run]) if g is not None
        ]
    nights = [g for g in got if isinstance(g, dict)]
    gaps = [g for g in got if isinstance(g, Gap)]
    if calibration_hash is None and nights:
        calibration_hash = max(nights, key=lambda h: (h["audited_date"], h["created_at"]))["calibration_hash"]
    elif calibration_hash is not None:  # a prefix names one calibration
        full = sorted({h["calibration_hash"] for h in nights if h["calibration_hash"].startswith(calibration_hash)})
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
    out = out[-last:] if last else out
    first = out[0]["audited_date"] if (last and out) else None
    gaps = [
        g
        for g in gaps
        if (g.calibration_hash is None or g.calibration_hash == calibration_hash)
        and (
            g.audited_date is None
            or ((before_day is None or g.audited_date < before_day) and (first is None or g.audited_date >= first))
        )
    ]
    return History(out, sorted(gaps, key=lambda g: (g.audited_date or "", g.run_id)))


def history_rows(h: History) -> list[dict]:
    """The trend as table rows (terminal and page): one per night, and one per gap with its reason."""
    rows = []
    for n in h.nights:
        scored, read = max(n["rows_scored"], 1), max(n["rows_read"], 1)
        rows.append(
            {
                "night": n["audited_date"],
                "run": n["run_id"],
                "audited": n["rows_scored"],
                "delegation rate": f"{n['delegated_by_threshold'] / scored:.2%}",
                "budget α": f"{n['alpha']:.2%}",
                "judge calls": n["expert_calls"],
                "flagged unsafe": f"{n['decisions_unsafe'] / scored:.2%}",
                "quarantined": f"{n['rows_quarantined'] / read:.2%}",
                "drift": drift_words(n["drift_e_value"], n["drift_alpha"]),
            }
        )
    for g in h.gaps:
        rows.append({"night": g.audited_date or "?", "run": g.run_id, "audited": "UNREADABLE", "delegation rate": g.reason})
    rows.sort(key=lambda r: (r["night"], r["run"]))
    return rows


def history_text(h: History) -> str:
    """The trend in the terminal (``ctd report history``)."""
    if not h.nights and not h.gaps:
        return "no published audit runs"
    rows = [r for r in history_rows(h) if r["audited"] != "UNREADABLE"]
    out = []
    if rows:
        cols = list(rows[0])
        width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        line = lambda r: "  ".join(str(r[c]).rjust(width[c]) if i else str(r[c]).ljust(width[c]) for i, c in enumerate(cols))  # noqa: E731
        last = h.nights[-1]
        out += [
            f"{len(h.nights)} audited night(s) with calibration {last['calibration_hash'][:12]}… "
            f"(α = {last['alpha']:.2%}, δ = {last['delta']})",
            line({c: c for c in cols}),
            *(line(r) for r in rows),
        ]
    if h.gaps:
        out.append(f"{len(h.gaps)} published run(s) could not be read and are left out of the trend:")
        out += [f"  {g.audited_date or '?'}  {g.run_id}: {g.reason}" for g in h.gaps]
    return "\n".join(out)
