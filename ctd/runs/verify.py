"""Verify a published run, or any copy of one: what a reader can trust.

``verify_run(folder)`` checks, against the folder's own manifest (:class:`ctd.runs.folder.RunFolder`):

- the manifest is there and valid (a missing or corrupt one is a problem that names the file);
- every file it lists is inside the folder, a regular file, with the size, SHA-256 and row count the
  manifest recorded, and no unlisted Parquet file sits beside them;
- the row counts agree with the report (rows read = scored + quarantined) and the manifest's totals;
- no id appears twice among scored rows, nor both in results and among the rows quarantined as
  duplicate ids; and (given the corpus) every corpus id occurs in results ∪ quarantine exactly as
  often as in the corpus: none lost, none extra. An id in results that is also quarantined as
  *invalid* is legitimate (the corpus held it twice, once valid).

The id checks of a run that fits in memory (at most ``local_rows`` rows) run in this process with
pyarrow; a larger run's are Ray Data groupbys, and the driver gets counts.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from .folder import RunError, RunFolder

__all__ = ["verify_run", "LOCAL_ROWS"]

LOCAL_ROWS = 2_000_000  # rows of results + quarantine (+ corpus) checked in memory, without Ray
COUNTERS = ("res", "qua", "dupq", "corp")


def _tag(batch: pa.Table, source: str) -> pa.Table:
    """One row per id occurrence with a 1 in the counter of its source (the quarantine's rows
    quarantined as duplicate ids also count in ``dupq``)."""
    batch = batch.filter(pc.is_valid(batch.column("id")))
    n = batch.num_rows
    one, zero = pa.array([1] * n, pa.int64()), pa.array([0] * n, pa.int64())
    cols = {c: one if c == source else zero for c in COUNTERS}
    if source == "qua":
        cols["dupq"] = pc.cast(pc.starts_with(pc.fill_null(batch.column("error"), ""), "duplicate id"), pa.int64())
    return pa.table({"id": pc.cast(batch.column("id"), pa.string()), **cols})


def _per_id(batch: pa.Table, with_corpus: bool) -> pa.Table:
    """Per id: scored more than once; scored and quarantined as a duplicate; lost and extra
    occurrences against the corpus."""
    res, qua, dupq, corp = (batch.column(f"sum({c})") for c in COUNTERS)
    seen = pc.add(res, qua)
    zeros = pa.array([0] * batch.num_rows, pa.int64())
    return pa.table(
        {
            "dup": pc.cast(pc.greater(res, 1), pa.int64()),
            "both": pc.cast(pc.and_(pc.greater(res, 0), pc.greater(dupq, 0)), pa.int64()),
            "lost": pc.max_element_wise(pc.subtract(corp, seen), 0) if with_corpus else zeros,
            "extra": pc.max_element_wise(pc.subtract(seen, corp), 0) if with_corpus else zeros,
        }
    )


def _local_totals(run: RunFolder, with_ids: dict[str, bool], corpus: str | None) -> dict[str, int]:
    """The id checks in this process: every id occurrence tagged, grouped by id with pyarrow."""
    from ..pipeline.corpus import local_rows

    parts = []
    for kind, source, cols in (("results", "res", ["id"]), ("quarantine", "qua", ["id", "error"])):
        if with_ids[kind]:
            parts.append(_tag(run.table(kind, cols), source))
    if corpus is not None:
        parts.append(_tag(local_rows(corpus), "corp"))
    if not parts:
        return {"dup": 0, "both": 0, "lost": 0, "extra": 0}
    g = pa.concat_tables(parts).group_by("id").aggregate([(c, "sum") for c in COUNTERS])
    g = g.rename_columns(["id" if c == "id" else f"sum({c[:-4]})" for c in g.column_names])
    t = _per_id(g, corpus is not None)
    return {k: int(pc.sum(t.column(k)).as_py() or 0) for k in ("dup", "both", "lost", "extra")}


def _ray_totals(run: RunFolder, with_ids: dict[str, bool], corpus: str | None, n: int) -> dict[str, int]:
    """The id checks as Ray Data groupbys (hash-partitioned by id)."""
    from ..pipeline.raydata import configure_data, partitions, read

    configure_data()
    parts = []
    for kind, source, cols in (("results", "res", ["id"]), ("quarantine", "qua", ["id", "error"])):
        files = [run.path(e) for e in run.manifest.files.get(kind, [])]
        if with_ids[kind] and files:
            parts.append(
                read(files, cols).map_batches(_tag, fn_kwargs={"source": source}, batch_format="pyarrow", batch_size=None)
            )
    if corpus is not None:
        from ..pipeline.corpus import read_corpus

        parts.append(read_corpus(corpus).map_batches(_tag, fn_kwargs={"source": "corp"}, batch_format="pyarrow", batch_size=None))
    totals = {"dup": 0, "both": 0, "lost": 0, "extra": 0}
    if parts:
        ids = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        per_id = ids.groupby("id", num_partitions=partitions(n)).sum(list(COUNTERS))
        got = per_id.map_batches(_per_id, fn_kwargs={"with_corpus": corpus is not None}, batch_format="pyarrow", batch_size=None)
        totals = {k: int((got.sum(list(totals)) or {}).get(f"sum({k})") or 0) for k in totals}
    return totals


def verify_run(uri: str, corpus: str | None = None, *, local_rows: int = LOCAL_ROWS) -> dict:
    """Check a run folder (``<output>/runs/<run_id>``, or any copy of one) against its manifest;
    ``corpus``: the input it audited. Returns {"ok", "problems", counts...}; never raises for what it
    finds (an unreadable manifest is a problem like any other)."""
    try:
        run = RunFolder.open(uri)
    except RunError as e:
        return {"published": False, "ok": False, "problems": [str(e)]}
    m = run.manifest
    problems: list[str] = []
    checked = {e.file: run.check(e) for _, e in m.entries()}
    problems += [c["problem"] for c in checked.values() if c["problem"]]
    rows = {kind: sum(checked[e.file]["rows"] or 0 for e in m.files.get(kind, [])) for kind in ("results", "quarantine")}
    for kind in ("results", "quarantine"):  # an unlisted data file beside the listed ones: a half-published mix
        listed = {e.file for e in m.files.get(kind, [])}
        for folder in sorted({posixpath.dirname(f) for f in listed}):
            names = storage.listdir(storage.join(run.uri, *folder.split("/")))
            extra = sorted(f"{folder}/{n}" for n in names if n.endswith(".parquet") and f"{folder}/{n}" not in listed)
            if extra:
                problems.append(f"{kind}: files that the manifest does not list ({', '.join(extra[:3])})")
    readable = {
        kind: all(checked[e.file]["problem"] is None for e in m.files.get(kind, [])) for kind in ("results", "quarantine")
    }
    # monitor runs' quarantine keys rows by trajectory, not id: only tables with an id are checked by id
    with_ids = {}
    for kind in ("results", "quarantine"):
        entries = [e for e in m.files.get(kind, []) if checked[e.file]["problem"] is None]
        with_ids[kind] = bool(entries) and readable[kind] and "id" in _columns(run, entries[0])
    n = rows["results"] + rows["quarantine"]
    local = n <= local_rows and (corpus is None or _corpus_bytes(corpus) <= 64 * local_rows)
    totals = _local_totals(run, with_ids, corpus) if local else _ray_totals(run, with_ids, corpus, n)
    if totals["dup"]:
        problems.append(f"{totals['dup']} ids appear more than once among scored rows")
    if totals["both"]:
        problems.append(f"{totals['both']} ids quarantined as duplicates also appear in results")
    try:
        report = run.report()
    except RunError as e:
        problems.append(str(e))
        report = {}
    rows_read = report.get("rows_read")
    if rows_read is not None and rows_read != n:
        problems.append(f"rows read {rows_read} (report) != scored {rows['results']} + quarantined {rows['quarantine']} (files)")
    for kind, field in (("results", "rows_scored"), ("quarantine", "rows_quarantined")):
        if report.get(field) is not None and report[field] != rows[kind]:
            problems.append(f"{kind}: {rows[kind]} rows in the files, the report says {field} = {report[field]}")
        if m.rows.get(kind) is not None and m.rows[kind] != rows[kind]:
            problems.append(f"{kind}: {rows[kind]} rows in the files, the manifest's total says {m.rows[kind]}")
    out = {
        "published": True,
        "run_id": m.run_id,
        "results_rows": rows["results"],
        "quarantine_rows": rows["quarantine"],
        "duplicate_ids": totals["dup"],
        "ids_in_both": totals["both"],
        "rows_read": rows_read,
        "counted_with": "pyarrow on this process" if local else "Ray Data",
    }
    if corpus is not None:
        out["rows_lost"], out["rows_extra"] = totals["lost"], totals["extra"]
        if out["rows_lost"]:
            problems.append(f"{out['rows_lost']} input rows are in neither results nor quarantine")
        if out["rows_extra"]:
            problems.append(f"{out['rows_extra']} output rows have no input row (an id not in the corpus, or written twice)")
    out["problems"] = problems
    out["ok"] = not problems
    return out


def _columns(run: RunFolder, entry) -> list[str]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(run.path(entry))
    with fs.open(path, "rb") as f:
        return pq.read_schema(f).names


def _corpus_bytes(corpus: str) -> int:
    from ..pipeline.corpus import list_corpus_files

    fs, files, _ = list_corpus_files(corpus)
    return sum(int(fs.size(f)) for f in files)
