"""The online-monitoring job: apply a calibrated alarm threshold to step logs in object storage.

    step logs (files) → rows with their file and line → group by trajectory → replay each trajectory
    in file order through the streaming ThresholdMonitor → alarms/ (trajectory, step, score) and
    quarantine/ (bad trajectories with the reason) → report → manifest (last)

Each file is read whole by one task and its rows keep their line numbers, so "steps out of order"
is judged on the log's own order even though grouping shuffles rows between workers. Publishing,
reports and manifests are the audit job's (:mod:`ctd.runs`, :mod:`ctd.reporting`).
"""

from __future__ import annotations

import datetime as _dt
import os
import time

import numpy as np
import pyarrow as pa

from .. import storage
from ..config import CREDENTIAL_ENVS, MonitorConfig
from ..hashing import digest
from ..log import log
from ..pipeline.raydata import init_ray, read, tally, write
from ..reporting.pages import html_page, html_table, write_report
from ..reporting.plots import plot_binned
from ..reporting.redact import redact_values
from ..runs.job import Night
from ..runs.layout import parquet_files
from ..runs.lease import Lease
from ..tables import write_parquet
from .replay import ALARM_COLUMNS, OUT_SCHEMA, alarms, counts, quarantined, read_file, replay
from .rules import load_monitor, monitor_lambda

__all__ = ["run_monitor"]


def _step_files(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"step logs not found: {uri}")
    if not fs.isdir(path):
        return [uri]
    names = [
        n
        for n in storage.listdir(uri)
        if n.endswith((".csv", ".csv.gz", ".parquet", ".jsonl", ".json")) and not n.startswith(("_", "."))
    ]
    if not names:
        raise FileNotFoundError(f"no step-log files under {uri}")
    return [storage.join(uri, n) for n in names]


def run_monitor(
    cfg: MonitorConfig, *, run_id: str | None = None, date: str | None = None, now: _dt.datetime | None = None
) -> dict:
    """Monitor one day's step logs (``date``: YYYY-MM-DD, default yesterday in ``monitor.timezone``;
    ``{date}`` in the input and run id is that day, so a retry after midnight monitors the same day)."""
    night = Night.plan(cfg.monitor, run_id=run_id, date=date, now=now, day_field="monitored_date")
    cal = load_monitor(cfg.monitor.calibration)  # refuses a tampered calibration before any compute
    lam = monitor_lambda(cal)
    files = _step_files(night.expand(cfg.monitor.input))
    log(
        f"monitor {night.run_id}: {cal['rule']} ({cal['control'].upper()}, {cal['guarantee']}) on {len(files)} file(s) → {night.layout.root}"
    )
    init_ray(cfg.ray)
    with night.lease() as lease:
        return _monitor(cfg, cal, lam, files, night, lease)


def _monitor(cfg: MonitorConfig, cal: dict, lam, files: list[str], night: Night, lease: Lease) -> dict:
    """Per-trajectory rows are a Ray Data operation end to end: the driver holds counts, reasons and
    the histogram of alarm positions (one entry per distinct step count), never the trajectories."""
    import ray

    m, rid, layout, day = cfg.monitor, night.run_id, night.layout, night.day
    storage.remove(layout.staging)
    t0 = time.perf_counter()
    rows = ray.data.from_items([{"uri": f} for f in files]).flat_map(read_file, fn_kwargs={"columns": m.columns.model_dump()})
    per_traj = rows.groupby("trajectory").map_groups(replay, fn_kwargs={"lam": lam}, batch_format="pyarrow")
    staging = layout.path("_staging", "trajectories")
    write(per_traj, staging, m.rows_per_file)  # one pass over the steps; the outputs below read this
    staged = [storage.join(staging, n) for n in parquet_files(staging)]
    if staged:
        write(read(staged).map_batches(alarms, batch_format="pyarrow", batch_size=None), layout.results, m.rows_per_file)
        write(read(staged).map_batches(quarantined, batch_format="pyarrow", batch_size=None), layout.quarantine, m.rows_per_file)
    for uri, cols in ((layout.results, ALARM_COLUMNS), (layout.quarantine, ["trajectory", "error"])):
        if not parquet_files(uri):  # no alarm (or nothing quarantined): an empty table with its columns, as readers expect
            write_parquet(storage.join(uri, "empty.parquet"), pa.schema([OUT_SCHEMA.field(c) for c in cols]).empty_table())
    fr = tally([(read(staged), counts)]) if staged else None
    storage.remove(layout.staging)
    dt = time.perf_counter() - t0
    count = lambda k: fr.get("count", k) if fr else 0  # noqa: E731
    n_traj, n_steps, n_alarms, n_q = count("trajectories"), count("steps"), count("alarms"), count("quarantined")
    quality = {}
    if n_traj - n_q and not count("ok_unlabelled"):
        correct, wrong, aw = count("correct"), count("wrong"), count("alarms_wrong")
        quality = {
            "false_alarm_rate": count("alarms_correct") / correct if correct else None,
            "power": aw / wrong if wrong else None,
            "mean_steps_seen_at_alarm_incorrect": count("steps_seen_alarms_wrong") / aw if aw else None,
        }
    summary = {
        "kind": "monitor",
        "run_id": rid,
        "monitored_date": day.isoformat(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": digest(cfg.model_dump(mode="json")),
        "input": night.expand(m.input),
        "calibration": m.calibration,
        "calibration_hash": cal["artifact_hash"],
        "rule": cal["rule"],
        "risk": cal["risk"],
        "control": cal["control"],
        "epsilon": cal["epsilon"],
        "delta": cal["delta"],
        "guarantee": cal["guarantee"],
        "trajectories": n_traj,
        "steps": n_steps,
        "alarms": n_alarms,
        "trajectories_quarantined": n_q,
        "quarantine_reasons": fr.by("reason") if fr else {},
        "quality_with_labels": quality,
        "stages": [
            {"stage": "monitor", "seconds": round(dt, 2), "rows": n_steps, "rows_per_second": round(n_steps / max(dt, 1e-9), 1)}
        ],
    }
    at = fr.by("alarm_steps") if fr else {}  # {steps seen: alarms}: one entry per distinct step count
    steps = np.array([int(k) for k in at], dtype=float)
    hist, edges = (
        np.histogram(steps, bins=50, weights=np.array(list(at.values()), dtype=float))
        if at
        else (np.zeros(1), np.array([0.0, 1.0]))
    )
    fig = {
        "alarm_position": plot_binned({"steps seen when the alarm fired": hist}, edges, None, "When alarms fire", "steps seen")
    }
    summary = redact_values(summary, [os.environ.get(k, "") for k in CREDENTIAL_ENVS])  # values, before any page is built
    page = html_page(
        f"CTD monitor {rid}",
        [("Summary", html_table([{"quantity": k, "value": str(v)} for k, v in summary.items()]))],
        fig,
        {"alarm_position": "How many steps of a trajectory had been seen when its alarm fired (trajectories per bin)"},
    )
    files_written = write_report(layout.attempt_root, "report", summary, page, fig)
    layout.publish(
        {"monitored_date": day.isoformat(), "trajectories": n_traj, "alarms": n_alarms, "quarantined": n_q},
        list(files_written.values()),
        before_commit=lease.check,
    )
    log(
        f"monitor {rid}: {n_traj} trajectories, {n_steps} steps, {n_alarms} alarms, {n_q} quarantined"
        + (
            f"; false alarms {quality['false_alarm_rate']:.3f}, power {quality['power']:.3f}"
            if quality.get("power") is not None
            else ""
        )
    )
    log(f"report: {files_written['html']}")
    return summary
