"""Verify a published run: what a reader can trust.

Checks that the manifest exists; that every file it lists (results, quarantine, report) is there with
the SHA-256, size and row count the manifest recorded, and that no unlisted Parquet file sits beside
them; that the row counts equal the report's (rows read = scored + quarantined, and each table's
count); that no id appears twice among scored rows, nor both in results and among the rows
quarantined as duplicate ids; and (given the corpus) that every corpus id occurs in results ∪
quarantine exactly as often as in the corpus: none lost, none extra (an id not in the corpus, or
written twice). An id in results that is also quarantined as *invalid* is legitimate (the corpus
held it twice, once valid) and is caught only through the corpus check when it is not. Row-level
checks are Ray Data groupbys and joins on id; the driver gets counts. ``ctd report verify <run folder> [--corpus URI]`` prints the result.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..pipeline.raydata import configure_data, partitions, read
from ..tables import parquet_schema
from .layout import RunLayout, describe_files, parquet_files, read_manifest, run_file

__all__ = ["verify_run"]


COUNTERS = ("res", "qua", "dupq", "corp")


def _tag(batch: pa.Table, source: str) -> pa.Table:
    """One row per id occurrence with a 1 in the counter of its source (the quarantine's rows
    quarantined as duplicate ids also count in ``dupq``)."""
    batch = batch.filter(pc.is_valid(batch.column("id")))
    n, one, zero = batch.num_rows, pa.array([1] * batch.num_rows, pa.int64()), pa.array([0] * batch.num_rows, pa.int64())
    cols = {c: one if c == source else zero for c in COUNTERS}
    if source == "qua":
        cols["dupq"] = pc.cast(pc.starts_with(pc.fill_null(batch.column("error"), ""), "duplicate id"), pa.int64())
    return (
        pa.table({"id": batch.column("id"), **cols})
        if n
        else pa.table({"id": pa.array([], pa.string()), **{c: zero for c in COUNTERS}})
    )


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


def verify_run(output: str, run_id: str, corpus: str | None = None) -> dict:
    configure_data()
    layout = RunLayout(output, run_id)
    m = read_manifest(output, run_id)
    if m is None:
        return {"published": False, "ok": False, "problems": ["no manifest: the run is not published"]}
    problems: list[str] = []
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    listed = [(kind, e) for kind in ("results", "quarantine") for e in m["files"][kind]] + [
        ("report", e) for e in m.get("report", []) if isinstance(e, dict)
    ]
    present = {e["file"]: storage.exists(layout.path(e["file"])) for _, e in listed}
    for f in sorted(f for f, ok in present.items() if not ok):
        problems.append(f"{f}: listed in the manifest but missing")
    facts = describe_files(
        [layout.path(e["file"]) for _, e in listed if present[e["file"]]], rows=lambda f: f.endswith(".parquet"), strict=False
    )
    for _, e in listed:
        got = facts.get(layout.path(e["file"]))
        if got is None:
            continue
        if "sha256" not in e:
            problems.append(f"{e['file']}: the manifest has no SHA-256 for it")
        elif got["sha256"] != e["sha256"] or got["bytes"] != e.get("bytes"):
            problems.append(
                f"{e['file']}: content differs from the manifest (SHA-256 {got['sha256'][:12]}… != {e['sha256'][:12]}…): "
                "replaced or modified after publishing"
            )
        if got.get("error"):
            problems.append(f"{e['file']}: unreadable ({got['error']})")
        elif "rows" in e and got.get("rows") != e["rows"]:
            problems.append(f"{e['file']}: {got.get('rows')} rows, manifest says {e['rows']}")
    for kind in ("results", "quarantine"):
        attempt = RunLayout(output, run_id, m["attempt"])
        folder = attempt.results if kind == "results" else attempt.quarantine
        on_storage = {layout.relative(storage.join(folder, n)) for n in parquet_files(folder)}
        extra = sorted(on_storage - {e["file"] for e in m["files"][kind]})
        if extra:
            problems.append(f"{kind}: files on storage that the manifest does not list ({extra[:3]})")
        files[kind] = [layout.path(e["file"]) for e in m["files"][kind] if present[e["file"]]]
        rows[kind] = sum(facts[f].get("rows") or 0 for f in files[kind])
    # monitor runs' quarantine keys rows by trajectory, not id: only tables with an id are checked by id
    with_ids = {k: v if v and "id" in parquet_schema(v[0]).names else [] for k, v in files.items()}
    # the row checks: one hash-partitioned pass over every id of results, quarantine (and corpus)
    parts = []
    if with_ids["results"]:
        parts.append(
            read(with_ids["results"], ["id"]).map_batches(
                _tag, fn_kwargs={"source": "res"}, batch_format="pyarrow", batch_size=None
            )
        )
    if with_ids["quarantine"]:
        parts.append(
            read(with_ids["quarantine"], ["id", "error"]).map_batches(
                _tag, fn_kwargs={"source": "qua"}, batch_format="pyarrow", batch_size=None
            )
        )
    if corpus is not None:
        from ..pipeline.corpus import read_corpus

        parts.append(read_corpus(corpus).map_batches(_tag, fn_kwargs={"source": "corp"}, batch_format="pyarrow", batch_size=None))
    n = rows["results"] + rows["quarantine"]
    totals = {"dup": 0, "both": 0, "lost": 0, "extra": 0}
    if parts:
        ids = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        per_id = ids.groupby("id", num_partitions=partitions(n)).sum(list(COUNTERS))
        got = per_id.map_batches(
            _per_id, fn_kwargs={"with_corpus": corpus is not None}, batch_format="pyarrow", batch_size=None
        ).sum(list(totals))
        totals = {k: int((got or {}).get(f"sum({k})") or 0) for k in totals}
    dup, both = totals["dup"], totals["both"]
    if dup:
        problems.append(f"{dup} ids appear more than once among scored rows")
    if both:
        problems.append(f"{both} ids quarantined as duplicates also appear in results")
    try:
        report = storage.read_json(run_file(output, run_id, "report.json"))
    except FileNotFoundError:
        report = {}
    rows_read = report.get("rows_read")
    if rows_read is not None and rows_read != rows["results"] + rows["quarantine"]:
        problems.append(f"rows read {rows_read} (report) != scored {rows['results']} + quarantined {rows['quarantine']} (files)")
    for kind, field in (("results", "rows_scored"), ("quarantine", "rows_quarantined")):
        if report.get(field) is not None and report[field] != rows[kind]:
            problems.append(f"{kind}: {rows[kind]} rows in the files, the report says {field} = {report[field]}")
        if m.get("rows", {}).get(kind) is not None and m["rows"][kind] != rows[kind]:
            problems.append(f"{kind}: {rows[kind]} rows in the files, the manifest's total says {m['rows'][kind]}")
    out = {
        "published": True,
        "results_rows": rows["results"],
        "quarantine_rows": rows["quarantine"],
        "duplicate_ids": dup,
        "ids_in_both": both,
        "rows_read": rows_read,
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
