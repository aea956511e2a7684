"""Where a run's files live, and the manifest that publishes them.

    <output>/runs/<run_id>/
        results/*.parquet       scored rows (the scores table)
        quarantine/*.parquet    rows that could not be scored, with the reason
        report.json report.html *.png
        manifest.json           written last: lists every file with its size and row count
        _staging/               stage outputs kept for resuming an interrupted run

A run without a manifest is not there: readers (:func:`list_runs`, :func:`read_run_table`) look only
at runs with a manifest and only at the files the manifest lists. Re-running a run id first removes
its manifest (the run disappears), then its published files, then writes everything again, so
nothing is ever counted twice.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import pyarrow as pa

from .. import storage
from ..tables import parquet_rows, read_parquet

__all__ = ["RunLayout", "list_runs", "read_manifest", "read_run_table", "parquet_files", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = "ctd.run/v1"


@dataclass(frozen=True)
class RunLayout:
    output: str
    run_id: str

    @property
    def root(self) -> str:
        return storage.join(self.output, "runs", self.run_id)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def results(self) -> str:
        return self.path("results")

    @property
    def quarantine(self) -> str:
        return self.path("quarantine")

    @property
    def staging(self) -> str:
        return self.path("_staging")

    @property
    def manifest(self) -> str:
        return self.path(MANIFEST)

    def unpublish(self, keep_staging: bool = True) -> None:
        """Make the run invisible (manifest first), then remove its published files."""
        storage.remove(self.manifest)
        for name in storage.listdir(self.root):
            if name == MANIFEST or (keep_staging and name == "_staging"):
                continue
            storage.remove(self.path(name))

    def publish(self, summary: dict, report_files: list[str]) -> dict:
        """Write the manifest (last): every results/quarantine file with its row count."""
        files = {}
        for kind, uri in (("results", self.results), ("quarantine", self.quarantine)):
            files[kind] = [{"file": f"{kind}/{name}", "rows": parquet_rows(storage.join(uri, name))} for name in parquet_files(uri)]
        manifest = {
            "format": FORMAT,
            "run_id": self.run_id,
            "published_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            "report": sorted(report_files),
            "rows": {k: sum(f["rows"] for f in v) for k, v in files.items()},
            "summary": summary,
        }
        storage.write_json(self.manifest, manifest)
        return manifest


def parquet_files(uri: str) -> list[str]:
    return [n for n in storage.listdir(uri) if n.endswith(".parquet")]


def read_manifest(output: str, run_id: str) -> dict | None:
    uri = RunLayout(output, run_id).manifest
    if not storage.exists(uri):
        return None
    return storage.read_json(uri)


def list_runs(output: str) -> list[str]:
    """Run ids with a manifest, oldest first."""
    base = storage.join(output, "runs")
    return [r for r in storage.listdir(base) if storage.exists(storage.join(base, r, MANIFEST))]


def read_run_table(output: str, run_id: str, kind: str = "results", columns: list[str] | None = None) -> pa.Table:
    """The rows of a published run: only files listed in its manifest."""
    m = read_manifest(output, run_id)
    if m is None:
        raise FileNotFoundError(f"run {run_id!r} under {output} is not published (no manifest)")
    layout = RunLayout(output, run_id)
    tables = [read_parquet(layout.path(f["file"]), columns) for f in m["files"][kind]]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")
