"""The online-monitoring job: apply a calibrated alarm threshold to step logs in object storage.

    step logs (files) → rows with their file and line → group by trajectory → replay each trajectory
    in file order through the streaming ThresholdMonitor → alarms/ (trajectory, step, score) and
    quarantine/ (bad trajectories with the reason) → report → manifest (last)

Each file is read whole by one task and its rows keep their line numbers, so "steps out of order"
is judged on the log's own order even though grouping shuffles rows between workers. Publishing,
reports and manifests are the audit job's (:mod:`ctd.pipeline.runs`, :mod:`ctd.report`).
"""

from __future__ import annotations

import datetime as _dt
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..config import MonitorConfig, audit_date, expand_dates, expand_run_id
from ..config import config_hash as _cfg_hash
from ..monitor import ThresholdMonitor, TrajectoryError, load_monitor, monitor_lambda, read_step_table, validate_steps
from ..report import html_page, html_table, plot_binned, write_report
from ..lease import Lease
from . import ops
from .graph import init_ray, log
from ..tables import write_parquet
from .runs import RunLayout, parquet_files

__all__ = ["run_monitor", "OUT_SCHEMA"]

OUT_SCHEMA = pa.schema([("trajectory", pa.string()), ("alarm", pa.bool_()), ("step", pa.float64()), ("score", pa.float64()),
                        ("tokens_at_alarm", pa.float64()), ("steps_seen", pa.int64()), ("length", pa.int64()),
                        ("label", pa.int64()), ("error", pa.string())])
ALARM_COLUMNS = ["trajectory", "step", "score", "tokens_at_alarm", "steps_seen", "length", "label"]


def _step_files(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"step logs not found: {uri}")
    if not fs.isdir(path):
        return [uri]
    names = [n for n in storage.listdir(uri) if n.endswith((".csv", ".csv.gz", ".parquet", ".jsonl", ".json")) and not n.startswith(("_", "."))]
    if not names:
        raise FileNotFoundError(f"no step-log files under {uri}")
    return [storage.join(uri, n) for n in names]


def _read_file(item: dict, columns: dict) -> list[dict]:
    t = read_step_table(item["uri"])
    need = [columns["trajectory"], columns["step"], columns["score"]]
    missing = [c for c in need if c not in t.column_names]
    if missing:
        raise TrajectoryError(f"{item['uri']}: missing column(s) {', '.join(missing)}")
    get = lambda c: t.column(c).to_pylist() if c and c in t.column_names else [None] * t.num_rows  # noqa: E731
    tr, st, sc, lb, tk = (get(columns[k]) for k in ("trajectory", "step", "score", "label", "tokens"))
    return [{"trajectory": str(tr[i]), "step": None if st[i] is None else float(st[i]), "score": None if sc[i] is None else float(sc[i]),
             "label": None if lb[i] is None else int(lb[i]), "tokens": None if tk[i] is None else float(tk[i]),
             "file": item["uri"], "line": i} for i in range(t.num_rows)]


def _apply(group: pa.Table, lam: float) -> pa.Table:
    g = group.sort_by([("file", "ascending"), ("line", "ascending")])
    tid = g.column("trajectory")[0].as_py()
    steps = np.array([np.nan if x is None else x for x in g.column("step").to_pylist()], dtype=float)
    scores = np.array([np.nan if x is None else x for x in g.column("score").to_pylist()], dtype=float)
    labels = g.column("label").to_pylist()
    label = labels[0] if labels and all(x is not None for x in labels) else None
    row = {"trajectory": tid, "alarm": False, "step": None, "score": None, "tokens_at_alarm": None, "steps_seen": len(steps),
           "length": len(steps), "label": label, "error": None}
    _, bad = validate_steps([tid] * len(steps), steps, scores, [0 if x is None else x for x in labels], quarantine=True)
    if np.isnan(steps).any():
        bad = [(tid, "missing step number")]
    if bad:
        row["error"] = bad[0][1]
        return pa.Table.from_pylist([row], schema=OUT_SCHEMA)
    mon = ThresholdMonitor(lam)  # the streaming monitor, one score at a time
    tokens = g.column("tokens").to_pylist()
    seen_tokens = 0.0
    for k, (s, x) in enumerate(zip(steps, scores)):
        seen_tokens += tokens[k] or 0.0
        if mon.observe(tid, s, x):
            row.update(alarm=True, step=float(s), score=float(x), steps_seen=k + 1,
                       tokens_at_alarm=seen_tokens if any(t is not None for t in tokens) else None)
            break
    return pa.Table.from_pylist([row], schema=OUT_SCHEMA)


def run_monitor(cfg: MonitorConfig, *, run_id: str | None = None, date: str | None = None, now: _dt.datetime | None = None):
    """Monitor one day's step logs (``date``: YYYY-MM-DD, default yesterday in ``monitor.timezone``;
    ``{date}`` in the input and run id is that day, so a retry after midnight monitors the same day)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    day = audit_date(date or cfg.monitor.date, cfg.monitor.timezone, now)
    cfg = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"input": expand_dates(cfg.monitor.input, day, now)})})
    m = cfg.monitor
    cal = load_monitor(m.calibration)  # refuses a tampered calibration before any compute
    lam = monitor_lambda(cal)
    files = _step_files(m.input)
    rid = expand_run_id(run_id or m.run_id, day, now)
    layout = RunLayout.new_attempt(m.output, rid)
    log(f"monitor {rid}: {cal['rule']} ({cal['control'].upper()}, {cal['guarantee']}) on {len(files)} file(s) → {layout.root}")
    init_ray(cfg)
    with Lease(layout.lease, run_id=rid, ttl_s=120, wait_s=150, log=log) as lease:  # a retry outwaits a dead driver's lease
        return _monitor(cfg, cal, lam, files, layout, lease, day)


def _alarms(batch: pa.Table) -> pa.Table:
    ok = pc.and_(pc.is_null(batch.column("error")), pc.fill_null(batch.column("alarm"), False))
    return batch.filter(ok).select(ALARM_COLUMNS)


def _quarantined(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column("error"))).select(["trajectory", "error"])


def _facts(batch: pa.Table) -> pa.Table:
    """Partial figures of a block of per-trajectory rows (summed by :func:`ops.facts`)."""
    ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
    alarm = ok & pc.fill_null(batch.column("alarm"), False).to_numpy(zero_copy_only=False)
    unlabelled = batch.column("label").is_null().to_numpy(zero_copy_only=False)
    label = pc.fill_null(batch.column("label"), -1).to_numpy(zero_copy_only=False)
    seen = pc.fill_null(batch.column("steps_seen"), 0).to_numpy(zero_copy_only=False)
    correct, wrong = ok & (label == 1), ok & (label == 0)
    names = ["trajectories", "steps", "alarms", "quarantined", "ok_unlabelled", "correct", "wrong", "alarms_correct", "alarms_wrong",
             "steps_seen_alarms_wrong"]
    values = [batch.num_rows, int(pc.sum(batch.column("length")).as_py() or 0), int(alarm.sum()), int((~ok).sum()),
              int((ok & unlabelled).sum()), int(correct.sum()), int(wrong.sum()), int((alarm & correct).sum()),
              int((alarm & wrong).sum()), int(seen[alarm & wrong].sum())]
    return pa.concat_tables([ops._fact_rows("count", names, values),
                             ops._group_counts("reason", batch.column("error").filter(pa.array(~ok))),
                             ops._group_counts("alarm_steps", pa.chunked_array([pa.array(seen[alarm].astype(str))]))])


def _monitor(cfg: MonitorConfig, cal: dict, lam, files: list[str], layout: RunLayout, lease: Lease, day: _dt.date) -> dict:
    """Per-trajectory rows are a Ray Data operation end to end: the driver holds counts, reasons and
    the histogram of alarm positions (one entry per distinct step count), never the trajectories."""
    import ray

    m, rid = cfg.monitor, layout.run_id
    storage.remove(layout.staging)
    t0 = time.perf_counter()
    rows = ray.data.from_items([{"uri": f} for f in files]).flat_map(_read_file, fn_kwargs={"columns": m.columns.model_dump()})
    per_traj = rows.groupby("trajectory").map_groups(_apply, fn_kwargs={"lam": lam}, batch_format="pyarrow")
    staging = layout.path("_staging", "trajectories")
    ops.write(per_traj, staging, m.rows_per_file)  # one pass over the steps; the outputs below read this
    staged = [storage.join(staging, n) for n in parquet_files(staging)]
    if staged:
        ops.write(ops.read(staged).map_batches(_alarms, batch_format="pyarrow", batch_size=None), layout.results, m.rows_per_file)
        ops.write(ops.read(staged).map_batches(_quarantined, batch_format="pyarrow", batch_size=None), layout.quarantine, m.rows_per_file)
    for uri, cols in ((layout.results, ALARM_COLUMNS), (layout.quarantine, ["trajectory", "error"])):
        if not parquet_files(uri):  # no alarm (or nothing quarantined): an empty table with its columns, as readers expect
            write_parquet(storage.join(uri, "empty.parquet"), pa.schema([OUT_SCHEMA.field(c) for c in cols]).empty_table())
    fr = ops.facts(ops.read(staged), _facts) if staged else {}
    storage.remove(layout.staging)
    dt = time.perf_counter() - t0
    count = lambda k: fr.get(("count", k), 0)  # noqa: E731
    n_traj, n_steps, n_alarms, n_q = count("trajectories"), count("steps"), count("alarms"), count("quarantined")
    quality = {}
    if n_traj - n_q and not count("ok_unlabelled"):
        correct, wrong, aw = count("correct"), count("wrong"), count("alarms_wrong")
        quality = {"false_alarm_rate": count("alarms_correct") / correct if correct else None,
                   "power": aw / wrong if wrong else None,
                   "mean_steps_seen_at_alarm_incorrect": count("steps_seen_alarms_wrong") / aw if aw else None}
    summary = {
        "kind": "monitor", "run_id": rid, "monitored_date": day.isoformat(), "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": _cfg_hash(cfg), "input": m.input, "calibration": m.calibration, "calibration_hash": cal["artifact_hash"],
        "rule": cal["rule"], "risk": cal["risk"], "control": cal["control"], "epsilon": cal["epsilon"], "delta": cal["delta"],
        "guarantee": cal["guarantee"], "trajectories": n_traj, "steps": n_steps, "alarms": n_alarms,
        "trajectories_quarantined": n_q, "quarantine_reasons": ops.collect_facts(fr, "reason"), "quality_with_labels": quality,
        "stages": [{"stage": "monitor", "seconds": round(dt, 2), "rows": n_steps, "rows_per_second": round(n_steps / max(dt, 1e-9), 1)}],
    }
    at = ops.collect_facts(fr, "alarm_steps")  # {steps seen: alarms}: one entry per distinct step count
    steps = np.array([int(k) for k in at], dtype=float)
    counts, edges = np.histogram(steps, bins=50, weights=np.array(list(at.values()), dtype=float)) if at else (np.zeros(1), np.array([0.0, 1.0]))
    fig = {"alarm_position": plot_binned({"steps seen when the alarm fired": counts}, edges, None, "When alarms fire", "steps seen")}
    page = html_page(f"CTD monitor {rid}", [("Summary", html_table([{"quantity": k, "value": str(v)} for k, v in summary.items()]))], fig)
    files_written = write_report(layout.attempt_root, "report", summary, page, fig)
    layout.publish({"monitored_date": day.isoformat(), "trajectories": n_traj, "alarms": n_alarms, "quarantined": n_q},
                   list(files_written.values()),
                   before_commit=lease.check)
    log(f"monitor {rid}: {n_traj} trajectories, {n_steps} steps, {n_alarms} alarms, {n_q} quarantined"
        + (f"; false alarms {quality['false_alarm_rate']:.3f}, power {quality['power']:.3f}" if quality.get("power") is not None else ""))
    log(f"report: {files_written['html']}")
    return summary
