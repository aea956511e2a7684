"""The rows a published run holds: results (every audited row with its final decision) and quarantine.

    results/     rows below λ* or over the cap (the probe's score), and the judged rows: delegated or
                 in the control sample (the expert's score where it answered usably):
                 :data:`RESULT_SCHEMA`, one schema for every file
    quarantine/  invalid rows with their reason, and every row of a duplicated id

Every function on a batch is vectorised pyarrow/numpy (unit-tested without Ray); :func:`write_rows`
maps them over the night's rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..experts.prompt import usable
from ..pipeline.corpus import Reason, is_valid
from ..pipeline.raydata import read, write
from ..pipeline.scoring import EXPERT_CARRY
from ..runs.layout import RunLayout, parquet_files
from ..stats.cascade import Cascade
from .selection import Selection
from .specs import ResultsSpec

__all__ = [
    "RESULT_SCHEMA",
    "QUARANTINE_SCHEMA",
    "EXPERT_CARRY",
    "JUDGED_CARRY",
    "was_judged",
    "answered",
    "to_expert",
    "not_sent",
    "judged",
    "quarantined",
    "finalize",
    "Rows",
    "write_rows",
]

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("group", pa.string()),
        ("label", pa.int8()),
        ("source", pa.string()),
        ("truncated", pa.bool_()),
        ("tokens", pa.int32()),
        ("probe", pa.float64()),
        ("dv", pa.float64()),
        ("delegated", pa.bool_()),
        ("over_cap", pa.bool_()),
        ("control", pa.bool_()),
        ("expert", pa.float64()),
        ("expert_status", pa.string()),
        ("expert_truncated", pa.bool_()),
        ("final", pa.float64()),
        ("decision", pa.bool_()),
    ]
)
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string()), ("group", pa.string())])


# what travels with each judged row through the expert stage besides EXPERT_CARRY
JUDGED_CARRY = ("delegated", "over_cap", "control")


def was_judged(batch: pa.Table) -> np.ndarray:
    """Rows sent to the judge: delegated within the cap, or in the control sample."""
    b = lambda c: np.asarray(pc.fill_null(batch.column(c), False).to_numpy(zero_copy_only=False), dtype=bool)  # noqa: E731
    return b("delegated") | (b("control") if "control" in batch.column_names else False)


def answered(batch: pa.Table) -> np.ndarray:
    """Rows whose final score is the expert's: judged (delegated, or in the control sample: the judge
    saw it), with a score, and a usable answer."""
    sent = was_judged(batch)
    expert = pc.fill_null(pc.cast(batch.column("expert"), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    ok = np.asarray(usable(batch.column("expert_status")).to_numpy(zero_copy_only=False), dtype=bool)
    return sent & np.isfinite(expert) & ok


def to_expert(batch: pa.Table) -> pa.Table:
    """The rows to send to the expert (delegated within the cap, or in the control sample), with their
    text and the columns they carry; ``delegated`` says which were sent by λ*."""
    b = batch.filter(pc.or_(batch.column("sent"), batch.column("control")))
    return b.select(list(EXPERT_CARRY) + ["input", "is_chat", "over_cap", "control"]).append_column("delegated", b.column("sent"))


def not_sent(batch: pa.Table) -> pa.Table:
    """Audited rows that keep the probe's score (below λ*, or over the cap, and not in the control sample)."""
    keep = pc.and_(pc.invert(batch.column("sent")), pc.invert(batch.column("control")))
    b = batch.filter(pc.and_(pc.and_(is_valid(batch), pc.is_null(batch.column("dup_n"))), keep))
    n = b.num_rows
    return (
        b.select(list(EXPERT_CARRY) + ["over_cap", "control"])
        .append_column("delegated", pa.array(np.zeros(n, dtype=bool)))
        .append_column("expert", pa.nulls(n, pa.float64()))
        .append_column("expert_status", pa.nulls(n, pa.string()))
        .append_column("expert_truncated", pa.nulls(n, pa.bool_()))
    )


def judged(batch: pa.Table) -> pa.Table:
    """Rows back from the expert stage, with what they carried (older expert files, from before the
    control sample, hold delegated rows only)."""
    n = batch.num_rows
    for name, value in (("delegated", True), ("over_cap", False), ("control", False)):
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.array(np.full(n, value)))
    return batch


def quarantined(batch: pa.Table) -> pa.Table:
    """Invalid rows with their reason, and every row of a duplicated id."""
    b = batch.filter(pc.or_(pc.invert(is_valid(batch)), pc.is_valid(batch.column("dup_n"))))
    reason = pc.binary_join_element_wise(f"{Reason.DUPLICATE} (", pc.cast(b.column("dup_n"), pa.string()), " rows share it)", "")
    return pa.table(
        {
            "id": b.column("id"),
            "source": b.column("source"),
            "error": pc.coalesce(b.column("error"), reason),
            "group": b.column("group"),
        },
        schema=QUARANTINE_SCHEMA,
    )


def finalize(batch: pa.Table, cascade: Cascade = Cascade()) -> pa.Table:
    """final = the cascade's score (:class:`ctd.stats.cascade.Cascade`: the expert's where it answered
    usably, else the probe's); decision = final >= the decision threshold. Columns :data:`RESULT_SCHEMA`."""
    probe = batch.column("probe").to_numpy(zero_copy_only=False).astype(float)
    expert = pc.fill_null(pc.cast(batch.column("expert"), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    final = cascade.final(probe, expert, answered(batch))
    cols = {name: batch.column(name) for name in RESULT_SCHEMA.names if name in batch.column_names}
    cols["final"] = pa.array(final)
    cols["decision"] = pa.array(cascade.decide(final))
    return pa.table({f.name: cols[f.name] for f in RESULT_SCHEMA}).cast(RESULT_SCHEMA)


@dataclass
class Rows:
    """The run's published rows: results and quarantine files."""

    results: list[str]
    quarantine: list[str]
    seconds: float


def write_rows(selection: Selection, expert_files: list[str], spec: ResultsSpec, layout: RunLayout) -> Rows:
    """Results (probe-only rows, judged rows) and quarantine, in few large files of the attempt."""
    t0 = time.perf_counter()
    for uri in (layout.results, layout.quarantine):
        storage.remove(uri)
    parts = []
    if selection.scored - selection.sent:  # below λ*, or over the cap, and not sampled: the probe's score
        parts.append(selection.rows.map_batches(not_sent, batch_format="pyarrow", batch_size=None))
    if expert_files:  # judged: the expert stage's output rows
        parts.append(read(expert_files).map_batches(judged, batch_format="pyarrow", batch_size=None))
    if parts:
        results = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        write(
            results.map_batches(finalize, fn_kwargs={"cascade": spec.cascade}, batch_format="pyarrow", batch_size=None),
            layout.results,
            spec.rows_per_file,
        )
    if selection.stage1.rows - selection.scored:
        write(
            selection.rows.map_batches(quarantined, batch_format="pyarrow", batch_size=None),
            layout.quarantine,
            spec.rows_per_file,
        )
    files = lambda uri: [storage.join(uri, n) for n in parquet_files(uri)]  # noqa: E731
    return Rows(files(layout.results), files(layout.quarantine), time.perf_counter() - t0)
