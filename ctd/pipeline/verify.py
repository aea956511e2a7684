"""Verify a published run: what a reader can trust.

Checks that the manifest exists and lists exactly the files present, that the listed row counts are
the files' row counts, that no id appears twice among scored rows nor in both results and quarantine,
that rows read = rows scored + rows quarantined, and (given the corpus) that every input row is
accounted for exactly once. Row-level checks are Ray Data groupbys and joins on id; the driver gets
counts. ``ctd report verify <run folder> [--corpus URI]`` prints the result.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..tables import parquet_rows, parquet_schema
from . import ops
from .runs import RunLayout, parquet_files, read_manifest

__all__ = ["verify_run"]


def _ids(batch: pa.Table) -> pa.Table:
    return batch.select(["id"]).filter(pc.is_valid(batch.column("id")))


def _counts(ds, name: str, size: int):
    """(id, <name>) occurrences per id, hash-partitioned for ``size`` rows."""
    return (ds.map_batches(_ids, batch_format="pyarrow", batch_size=None).groupby("id", num_partitions=ops.partitions(size)).count()
            .rename_columns({"count()": name}))


def _differences(batch: pa.Table) -> pa.Table:
    exp = pc.fill_null(batch.column("expected"), 0)
    seen = pc.fill_null(batch.column("seen"), 0)
    return pa.table({"lost": pc.max_element_wise(pc.subtract(exp, seen), 0), "extra": pc.max_element_wise(pc.subtract(seen, exp), 0)})


def verify_run(output: str, run_id: str, corpus: str | None = None) -> dict:
    from .graph import configure_data

    configure_data()
    layout = RunLayout(output, run_id)
    m = read_manifest(output, run_id)
    if m is None:
        return {"published": False, "ok": False, "problems": ["no manifest: the run is not published"]}
    problems: list[str] = []
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for kind, uri in (("results", layout.results), ("quarantine", layout.quarantine)):
        listed = {f["file"]: f["rows"] for f in m["files"][kind]}
        present = {f"{kind}/{n}" for n in parquet_files(uri)}
        if set(listed) != present:
            problems.append(f"{kind}: files on storage differ from the manifest ({sorted(present ^ set(listed))[:3]})")
        files[kind], rows[kind] = [], 0
        for f, n in listed.items():
            if not storage.exists(layout.path(f)):
                problems.append(f"{f} listed but missing")
                continue
            got = parquet_rows(layout.path(f))
            if got != n:
                problems.append(f"{f}: {got} rows, manifest says {n}")
            files[kind].append(layout.path(f))
            rows[kind] += got
    # monitor runs' quarantine keys rows by trajectory, not id: only tables with an id are checked by id
    with_ids = {k: v if v and "id" in parquet_schema(v[0]).names else [] for k, v in files.items()}
    res = ops.read(with_ids["results"], ["id"]) if with_ids["results"] else None
    qua = ops.read(with_ids["quarantine"], ["id"]) if with_ids["quarantine"] else None
    n = rows["results"] + rows["quarantine"]
    dup = 0
    if res is not None:
        dup = _counts(res, "n", n).map_batches(lambda b: b.filter(pc.greater(b.column("n"), 1)), batch_format="pyarrow", batch_size=None).count()
        if dup:
            problems.append(f"{dup} ids appear more than once among scored rows")
    both = 0
    if res is not None and qua is not None:
        # an id quarantined as a duplicate must not also have a result (an invalid row may share a
        # valid row's id: that one is scored, the invalid one quarantined with its own reason)
        dup_q = ops.read(with_ids["quarantine"], ["id", "error"]).map_batches(
            lambda b: b.filter(pc.starts_with(pc.fill_null(b.column("error"), ""), "duplicate id")).select(["id"]),
            batch_format="pyarrow", batch_size=None)
        both = _counts(res, "n", n).join(_counts(dup_q, "m", n), join_type="inner", on=("id",), num_partitions=ops.partitions(n)).count()
        if both:
            problems.append(f"{both} ids quarantined as duplicates also appear in results")
    report = storage.read_json(layout.path("report.json")) if storage.exists(layout.path("report.json")) else {}
    read = report.get("rows_read")
    if read is not None and read != rows["results"] + rows["quarantine"]:
        problems.append(f"rows read {read} != scored {rows['results']} + quarantined {rows['quarantine']}")
    out = {"published": True, "results_rows": rows["results"], "quarantine_rows": rows["quarantine"], "duplicate_ids": dup,
           "ids_in_both": both, "rows_read": read}
    if corpus is not None:
        from .corpus import read_corpus

        parts = [d for d in (res, qua) if d is not None]
        expected = _counts(read_corpus(corpus).select_columns(["id"]), "expected", n)
        if parts:
            seen = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            expected = expected.join(_counts(seen, "seen", n), join_type="full_outer", on=("id",), num_partitions=ops.partitions(n))
        else:  # nothing published with an id: every corpus id is lost
            expected = expected.map_batches(lambda b: b.append_column("seen", pa.nulls(b.num_rows, pa.int64())), batch_format="pyarrow",
                                            batch_size=None)
        diff = expected.map_batches(_differences, batch_format="pyarrow", batch_size=None)
        totals = diff.sum(["lost", "extra"]) or {}
        out["rows_lost"], out["rows_extra"] = int(totals.get("sum(lost)") or 0), int(totals.get("sum(extra)") or 0)
        if out["rows_lost"]:
            problems.append(f"{out['rows_lost']} input rows are in neither results nor quarantine")
        if out["rows_extra"]:
            problems.append(f"{out['rows_extra']} output rows have no input row (an id not in the corpus, or written twice)")
    out["problems"] = problems
    out["ok"] = not problems
    return out
