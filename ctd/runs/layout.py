"""Where a run's files live, and how a run is published.

    <output>/runs/<run_id>/
        manifest.json               THE published run: names its attempt and lists every file with its
                                    row count, size and SHA-256; written last, in one PUT
        attempts/<attempt>/         one folder per try at the run (a driver, a retry, a rerun)
            results/*.parquet       scored rows
            quarantine/*.parquet    rows that could not be scored, with the reason
            report.json report.html *.png
        _staging/                   resume state while the run is unfinished (removed after publish
                                    unless kept: ``audit.keep_staging``)
        _lease.json                 the writing driver's lease (:mod:`ctd.runs.lease`)

Publishing is the single write of ``manifest.json``: until it lands, readers see the previous
published attempt (or nothing, for a new run); after it, the new one, never a mix. A rerun writes
into a new attempt folder and never touches the published one; after publishing, attempts other than
the new one and the one it replaced are removed (a reader that read the old manifest a moment
before keeps working until the next publish).

Readers go through the manifest only (:mod:`ctd.runs.folder`: :func:`read_run_table`, :func:`run_file`, :func:`list_runs`).
Listing the run's folder shows attempts, staging and the lease, never "the" run. Other tools read the
files the manifest lists, e.g. ``duckdb.read_parquet([...])`` or ``pyarrow.dataset.dataset([...])``
with ``<run>/<file>`` for each entry of ``manifest["files"]["results"]`` (see the README).
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .. import storage
from ..log import log
from ..tables import parquet_rows
from .folder import MANIFEST, read_manifest

__all__ = ["RunLayout", "parquet_files", "describe_files", "sweep"]

FORMAT = "ctd.run/v2"


@dataclass(frozen=True)
class RunLayout:
    output: str
    run_id: str
    attempt: str | None = None  # the attempt this writer owns; None for readers

    @classmethod
    def new_attempt(cls, output: str, run_id: str) -> RunLayout:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return cls(output, run_id, f"{stamp}-{uuid.uuid4().hex[:8]}")

    @property
    def root(self) -> str:
        return storage.join(self.output, "runs", self.run_id)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def attempt_root(self) -> str:
        if self.attempt is None:
            raise ValueError("a reader's RunLayout has no attempt: read through the manifest")
        return self.path("attempts", self.attempt)

    @property
    def results(self) -> str:
        return storage.join(self.attempt_root, "results")

    @property
    def quarantine(self) -> str:
        return storage.join(self.attempt_root, "quarantine")

    @property
    def staging(self) -> str:
        return self.path("_staging")

    @property
    def manifest(self) -> str:
        return self.path(MANIFEST)

    @property
    def lease(self) -> str:
        return self.path("_lease.json")

    def relative(self, uri: str) -> str:
        root = self.root.rstrip("/") + "/"
        if not uri.startswith(root):
            raise ValueError(f"{uri} is not under {root}")
        return uri[len(root) :]

    def publish(self, summary: dict, report_files: list[str], before_commit: Callable[[], None] | None = None) -> dict:
        """Publish this attempt: describe every results/quarantine/report file (rows, bytes, SHA-256),
        call ``before_commit`` (the lease check), write the manifest (one PUT, conditioned on the
        manifest being the one read at the start, so two publishers cannot both win), then remove
        attempts other than this one and the one it replaces (a failure there is logged, not raised:
        the run is published)."""
        cur = storage.read_versioned(self.manifest)
        previous = json.loads(cur[0]) if cur else None
        data = {
            kind: [storage.join(uri, n) for n in parquet_files(uri)]
            for kind, uri in (("results", self.results), ("quarantine", self.quarantine))
        }
        described = describe_files(
            [f for fs in data.values() for f in fs] + list(report_files), rows=lambda f: f.endswith(".parquet")
        )
        entry = lambda f: {"file": self.relative(f), **described[f]}  # noqa: E731
        files = {kind: [entry(f) for f in fs] for kind, fs in data.items()}
        manifest = {
            "format": FORMAT,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "replaces_attempt": (previous or {}).get("attempt"),
            "published_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            "report": sorted((entry(f) for f in report_files), key=lambda e: e["file"]),
            "rows": {k: sum(f["rows"] for f in v) for k, v in files.items()},
            "summary": summary,
        }
        if before_commit is not None:
            before_commit()
        body = (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode("utf-8")
        try:
            storage.write_if(self.manifest, body, cur[1] if cur else None)  # the publish: one object, atomic
        except storage.PreconditionFailed:
            raise RuntimeError(
                f"run {self.run_id!r}: the manifest changed while this attempt published it "
                "(another driver published); this attempt is not published"
            ) from None
        keep = {self.attempt, manifest["replaces_attempt"]}
        try:
            for name in storage.listdir(self.path("attempts")):
                if name not in keep:
                    storage.remove(self.path("attempts", name))
        except Exception as e:  # published already: old attempts are only garbage
            log(f"published; removing old attempts failed ({e!r}): they are unlisted, remove them by hand")
        return manifest


def sweep(output: str, retention_days: float) -> list[str]:
    """Remove what unfinished runs left behind: ``_staging/`` (which holds the delegated rows' text)
    and attempts that no manifest names, of every run id whose last writer's lease is released or
    expired and was last renewed more than ``retention_days`` ago. Run ids without a lease (written
    before leases) are left alone. Returns the URIs removed. One small read per run id."""
    import time

    removed = []
    for rid in storage.listdir(storage.join(output, "runs")):
        layout = RunLayout(output, rid)
        try:
            lease = storage.read_json(layout.lease)
        except (FileNotFoundError, ValueError):
            continue
        # idle since the last renewal, or since expiry for a lease never released (negative while live)
        idle = time.time() - max(lease.get("renewed_at", 0), lease.get("expires_at", 0) if not lease.get("released") else 0)
        if idle < retention_days * 86400:
            continue
        m = read_manifest(output, rid) or {}
        keep = {m.get("attempt"), m.get("replaces_attempt")}
        stale = ([layout.staging] if storage.exists(layout.staging) else []) + [
            layout.path("attempts", a) for a in storage.listdir(layout.path("attempts")) if a not in keep
        ]
        for uri in stale:
            storage.remove(uri)
            removed.append(uri)
    if removed:
        log(
            f"retention: removed {len(removed)} stale staging/attempt folders (older than {retention_days:g} days): {removed[:3]}"
        )
    return removed


def parquet_files(uri: str) -> list[str]:
    return [n for n in storage.listdir(uri) if n.endswith(".parquet")]


def _describe(uri: str, rows: bool, strict: bool) -> dict:
    size, sha = storage.file_digest(uri)
    out = {"bytes": size, "sha256": sha}
    if rows:
        try:
            out["rows"] = parquet_rows(uri)
        except Exception as e:  # a file that is not Parquet (any more)
            if strict:
                raise
            out["rows"], out["error"] = None, f"{type(e).__name__}: {e}"[:200]
    return out


def describe_files(uris: list[str], rows: Callable[[str], bool] = lambda f: True, strict: bool = True) -> dict[str, dict]:
    """{uri: {"rows"?, "bytes", "sha256"}}: one Ray task per file when Ray is up (the bytes are read
    where the task runs, not through the driver), else a thread pool. ``strict=False``: an unreadable
    Parquet footer gives ``rows: None`` and an ``error`` instead of raising."""
    import ray

    if not uris:
        return {}
    if ray.is_initialized():
        from ..pipeline.raydata import cpu_task

        task = cpu_task(_describe, num_cpus=0.25, max_retries=3)
        return dict(zip(uris, ray.get([task.remote(u, rows(u), strict) for u in uris])))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(uris, pool.map(lambda u: _describe(u, rows(u), strict), uris)))
