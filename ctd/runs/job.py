"""One night's set-up, the same for the audit and the monitor job: the day, the run id, the attempt
and the lease.

    night = Night.plan(cfg.audit, run_id=..., date=...)   # the day (--date, or yesterday in the job's
                                                          # time zone), {date} filled in, the run id checked
    with night.lease():                                   # one writer per run id (exit 4 for a second one)
        ... write under night.layout.attempt_root, publish night.layout ...

A retry after midnight given the same ``--date`` audits the same day and reruns (resumes) the same run id.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

from ..config import ConfigError, NightlyJob
from ..log import log
from .folder import read_manifest
from .layout import RunLayout
from .lease import Lease

__all__ = ["Night", "audited_day", "expand_dates", "expand_run_id"]


def audited_day(date: str | None = None, timezone: str = "UTC", now: _dt.datetime | None = None) -> _dt.date:
    """The audited day: ``date`` (YYYY-MM-DD) when given, else yesterday in ``timezone`` (an IANA
    name)."""
    if date:
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(date)):
                raise ValueError
            return _dt.date.fromisoformat(str(date))
        except ValueError:
            raise ConfigError(f"--date {date!r}: expected YYYY-MM-DD") from None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone {timezone!r}: not an IANA time zone name (e.g. UTC, Europe/Paris)") from None
    now = (now or _dt.datetime.now(_dt.timezone.utc)).astimezone(tz)
    return now.date() - _dt.timedelta(days=1)


def expand_dates(template: str, day: _dt.date, now: _dt.datetime | None = None) -> str:
    """``{date}`` → the audited day (YYYY-MM-DD); ``{datetime}`` → when this attempt started
    (YYYYMMDDTHHMMSSZ, UTC: unique per attempt, so not for run ids that a retry should reuse)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return template.replace("{date}", day.isoformat()).replace(
        "{datetime}", now.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    )


def expand_run_id(template: str, day: _dt.date, now: _dt.datetime | None = None) -> str:
    rid = expand_dates(template, day, now)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", rid) or set(rid) == {"."}:
        raise ConfigError(f"run id {rid!r}: use letters, digits, '.', '_' or '-' (not dots alone)")
    return rid


@dataclass(frozen=True)
class Night:
    """The day a nightly job covers, its run id and this attempt's layout."""

    day: _dt.date
    run_id: str
    layout: RunLayout
    job: NightlyJob
    now: _dt.datetime

    @classmethod
    def plan(
        cls,
        job: NightlyJob,
        *,
        run_id: str | None = None,
        date: str | None = None,
        now: _dt.datetime | None = None,
        day_field: str = "audited_date",
    ) -> Night:
        """The night: ``date`` (default ``job.date``, else yesterday in ``job.timezone``), the run id
        (``run_id`` or ``job.run_id``, {date} filled in). Refuses a run id already published for
        another day (``day_field`` of its manifest's summary): a run id holds one day."""
        now = now or _dt.datetime.now(_dt.timezone.utc)
        day = audited_day(date or job.date, job.timezone, now)
        rid = expand_run_id(run_id or job.run_id, day, now)
        m = read_manifest(job.output, rid)
        had = (m or {}).get("summary", {}).get(day_field) if m else None
        if m is not None and had != day.isoformat():
            raise ConfigError(
                f"run {rid!r} under {job.output} is already published for {had or 'an unrecorded day'}, not {day}: "
                "choose a run id with {date} in it (run_id / --run-id), or remove that run first"
            )
        return cls(day, rid, RunLayout.new_attempt(job.output, rid), job, now)

    def expand(self, template: str) -> str:
        """A path template of the job (``{date}``: this night's day)."""
        return expand_dates(template, self.day, self.now)

    def lease(self) -> Lease:
        """The run id's lease (:mod:`ctd.runs.lease`): renewed while the job runs, released at the end;
        a retry waits for a crashed driver's lease to expire (``lease_wait_seconds``)."""
        j = self.job
        wait = j.lease_seconds + 30 if j.lease_wait_seconds is None else j.lease_wait_seconds
        return Lease(self.layout.lease, run_id=self.run_id, ttl_s=j.lease_seconds, wait_s=wait, log=log)
