"""The monitor job's per-row work, run in Ray workers: step-log files → rows, one trajectory replayed
through the streaming :class:`ctd.monitor.rules.ThresholdMonitor`, and the partial counts of the
per-trajectory rows. Nothing here imports the plotting module."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..pipeline.raydata import tally_by, tally_rows
from .rules import ThresholdMonitor, TrajectoryError, read_step_table, validate_steps

__all__ = ["OUT_SCHEMA", "ALARM_COLUMNS", "read_file", "replay", "alarms", "quarantined", "counts"]

OUT_SCHEMA = pa.schema(
    [
        ("trajectory", pa.string()),
        ("alarm", pa.bool_()),
        ("step", pa.float64()),
        ("score", pa.float64()),
        ("tokens_at_alarm", pa.float64()),
        ("steps_seen", pa.int64()),
        ("length", pa.int64()),
        ("label", pa.int64()),
        ("error", pa.string()),
    ]
)
ALARM_COLUMNS = ["trajectory", "step", "score", "tokens_at_alarm", "steps_seen", "length", "label"]


def read_file(item: dict, columns: dict) -> list[dict]:
    t = read_step_table(item["uri"])
    need = [columns["trajectory"], columns["step"], columns["score"]]
    missing = [c for c in need if c not in t.column_names]
    if missing:
        raise TrajectoryError(f"{item['uri']}: missing column(s) {', '.join(missing)}")
    get = lambda c: t.column(c).to_pylist() if c and c in t.column_names else [None] * t.num_rows  # noqa: E731
    tr, st, sc, lb, tk = (get(columns[k]) for k in ("trajectory", "step", "score", "label", "tokens"))
    return [
        {
            "trajectory": str(tr[i]),
            "step": None if st[i] is None else float(st[i]),
            "score": None if sc[i] is None else float(sc[i]),
            "label": None if lb[i] is None else int(lb[i]),
            "tokens": None if tk[i] is None else float(tk[i]),
            "file": item["uri"],
            "line": i,
        }
        for i in range(t.num_rows)
    ]


def replay(group: pa.Table, lam: float) -> pa.Table:
    g = group.sort_by([("file", "ascending"), ("line", "ascending")])
    tid = g.column("trajectory")[0].as_py()
    steps = np.array([np.nan if x is None else x for x in g.column("step").to_pylist()], dtype=float)
    scores = np.array([np.nan if x is None else x for x in g.column("score").to_pylist()], dtype=float)
    labels = g.column("label").to_pylist()
    label = labels[0] if labels and all(x is not None for x in labels) else None
    row = {
        "trajectory": tid,
        "alarm": False,
        "step": None,
        "score": None,
        "tokens_at_alarm": None,
        "steps_seen": len(steps),
        "length": len(steps),
        "label": label,
        "error": None,
    }
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
            row.update(
                alarm=True,
                step=float(s),
                score=float(x),
                steps_seen=k + 1,
                tokens_at_alarm=seen_tokens if any(t is not None for t in tokens) else None,
            )
            break
    return pa.Table.from_pylist([row], schema=OUT_SCHEMA)


def alarms(batch: pa.Table) -> pa.Table:
    ok = pc.and_(pc.is_null(batch.column("error")), pc.fill_null(batch.column("alarm"), False))
    return batch.filter(ok).select(ALARM_COLUMNS)


def quarantined(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column("error"))).select(["trajectory", "error"])


def counts(batch: pa.Table) -> pa.Table:
    """Partial figures of a block of per-trajectory rows (summed by :func:`ctd.pipeline.raydata.tally`)."""
    ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
    alarm = ok & pc.fill_null(batch.column("alarm"), False).to_numpy(zero_copy_only=False)
    unlabelled = batch.column("label").is_null().to_numpy(zero_copy_only=False)
    label = pc.fill_null(batch.column("label"), -1).to_numpy(zero_copy_only=False)
    seen = pc.fill_null(batch.column("steps_seen"), 0).to_numpy(zero_copy_only=False)
    correct, wrong = ok & (label == 1), ok & (label == 0)
    names = [
        "trajectories",
        "steps",
        "alarms",
        "quarantined",
        "ok_unlabelled",
        "correct",
        "wrong",
        "alarms_correct",
        "alarms_wrong",
        "steps_seen_alarms_wrong",
    ]
    values = [
        batch.num_rows,
        int(pc.sum(batch.column("length")).as_py() or 0),
        int(alarm.sum()),
        int((~ok).sum()),
        int((ok & unlabelled).sum()),
        int(correct.sum()),
        int(wrong.sum()),
        int((alarm & correct).sum()),
        int((alarm & wrong).sum()),
        int(seen[alarm & wrong].sum()),
    ]
    return pa.concat_tables(
        [
            tally_rows("count", names, values),
            tally_by("reason", batch.column("error").filter(pa.array(~ok))),
            tally_by("alarm_steps", pa.chunked_array([pa.array(seen[alarm].astype(str))])),
        ]
    )
