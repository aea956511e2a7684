"""Verify a published run: what a reader can trust.

Checks that the manifest exists and lists exactly the files present, that the listed row counts are
the files' row counts, that no id appears twice among scored rows, that rows read = rows scored +
rows quarantined, and (given the corpus's ids) that every input row is accounted for exactly once.
``ctd report verify <run folder>`` prints the result.
"""

from __future__ import annotations

import collections

from .. import storage
from ..tables import parquet_rows, read_parquet
from .runs import RunLayout, parquet_files, read_manifest

__all__ = ["verify_run", "corpus_ids"]


def corpus_ids(uri: str) -> list[str]:
    """The ids a JSON-lines corpus file holds (rows without a usable id have none to account for)."""
    import json

    ids = []
    for line in storage.read_bytes(uri).split(b"\n"):
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str) and row["id"].strip():
            ids.append(row["id"])
    return ids


def verify_run(output: str, run_id: str, expected_ids: list[str] | None = None) -> dict:
    layout = RunLayout(output, run_id)
    m = read_manifest(output, run_id)
    if m is None:
        return {"published": False, "ok": False, "problems": ["no manifest: the run is not published"]}
    problems = []
    ids = {}
    for kind, uri in (("results", layout.results), ("quarantine", layout.quarantine)):
        listed = {f["file"]: f["rows"] for f in m["files"][kind]}
        present = {f"{kind}/{n}" for n in parquet_files(uri)}
        if set(listed) != present:
            problems.append(f"{kind}: files on storage differ from the manifest ({sorted(present ^ set(listed))[:3]})")
        rows = []
        for f, n in listed.items():
            if not storage.exists(layout.path(f)):
                problems.append(f"{f} listed but missing")
                continue
            if parquet_rows(layout.path(f)) != n:
                problems.append(f"{f}: {parquet_rows(layout.path(f))} rows, manifest says {n}")
            col = "id" if kind == "results" else ("id" if "id" in read_parquet(layout.path(f)).column_names else "trajectory")
            rows += read_parquet(layout.path(f), [col]).column(col).to_pylist()
        ids[kind] = rows
    dup = [k for k, c in collections.Counter(ids["results"]).items() if c > 1]
    if dup:
        problems.append(f"{len(dup)} ids appear more than once among scored rows, e.g. {dup[0]!r}")
    report = storage.read_json(layout.path("report.json")) if storage.exists(layout.path("report.json")) else {}
    read = report.get("rows_read")
    if read is not None and read != len(ids["results"]) + len(ids["quarantine"]):
        problems.append(f"rows read {read} != scored {len(ids['results'])} + quarantined {len(ids['quarantine'])}")
    out = {"published": True, "results_rows": len(ids["results"]), "quarantine_rows": len(ids["quarantine"]),
           "duplicate_ids": len(dup), "rows_read": read}
    if expected_ids is not None:
        seen = collections.Counter(ids["results"]) + collections.Counter(i for i in ids["quarantine"] if i is not None)
        exp = collections.Counter(expected_ids)
        lost = sum((exp - seen).values())
        out["rows_lost"] = lost
        if lost:
            problems.append(f"{lost} input rows are in neither results nor quarantine")
    out["problems"] = problems
    out["ok"] = not problems
    return out
