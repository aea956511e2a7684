"""A published run as a reader sees it: any folder that holds a ``manifest.json``.

That is ``<output>/runs/<run_id>/`` where the audit published it, or any copy of it (fetched, synced,
restored from a backup). Everything is read through the folder's own manifest:

- the manifest is validated (:class:`Manifest`): a corrupt or incomplete one is a :class:`RunError`
  that names the file and says what is wrong;
- every path it lists must stay inside the folder (no absolute path, no ``..``, no symbolic link and
  nothing that is not a regular file on the way): a copy cannot make a reader open ``/etc/passwd``;
- every file is read at most to the size the manifest records and checked against its SHA-256, so a
  file replaced or edited after publishing is refused, never shown (:meth:`RunFolder.read`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import storage

__all__ = [
    "MANIFEST",
    "RunError",
    "FileEntry",
    "Manifest",
    "RunFolder",
    "is_run_folder",
    "list_runs",
    "run_folder",
    "read_manifest",
    "run_file",
    "read_run_table",
    "pydantic_problems",
]

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RunError(Exception):
    """A run folder, or one of its files, that cannot be trusted; ``uri`` names it."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason = uri, reason


class NotARun(RunError):
    """What was named is not a run, a calibration or a report at all (a wrong path or run id)."""


def pydantic_problems(e: ValidationError) -> str:
    """A pydantic error as one line: "field a.b: what is wrong; field c: ..."."""
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"field {loc}: {msg}")
    return "; ".join(out)


def safe_relative(path: str) -> str:
    """A manifest's file path: relative, with no ``..``, no empty part and no backslash."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"not a relative path inside the run: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a relative path inside the run: {path!r}")
    return posixpath.normpath(path)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    bytes: int = Field(ge=0)
    sha256: str
    rows: int | None = Field(None, ge=0)

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        return safe_relative(v)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA256.fullmatch(v):
            raise ValueError("not a SHA-256 (64 hex digits)")
        return v


class Manifest(BaseModel):
    """``manifest.json`` of a published run (format ``ctd.run/v2``)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["ctd.run/v2"]
    run_id: str
    attempt: str
    replaces_attempt: str | None = None
    published_at: str
    files: dict[Literal["results", "quarantine"], list[FileEntry]]
    report: list[FileEntry]
    rows: dict[str, int]
    summary: dict

    def entries(self) -> list[tuple[str, FileEntry]]:
        """Every file the run holds, as (kind, entry): results, quarantine, report."""
        return [(k, e) for k in ("results", "quarantine") for e in self.files.get(k, [])] + [("report", e) for e in self.report]


def is_run_folder(uri: str) -> bool:
    return storage.exists(storage.join(uri, MANIFEST))


def list_runs(output: str) -> list[str]:
    """Run ids under ``<output>/runs/`` that have a manifest, in name order."""
    base = storage.join(output, "runs")
    return [r for r in storage.listdir(base) if storage.exists(storage.join(base, r, MANIFEST))]


def read_bounded(uri: str, limit: int, root: str | None = None) -> bytes:
    """At most ``limit + 1`` bytes of a file. A local file must be a regular file reached without a
    symbolic link, inside ``root`` when given (a device, a FIFO or a link is refused, never opened
    for reading)."""
    lp = storage.local_path(uri)
    if lp is None:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            return f.read(limit + 1)
    if root is not None:
        real_root = os.path.realpath(storage.local_path(root) or root)
        if os.path.realpath(lp) != os.path.join(real_root, os.path.relpath(lp, storage.local_path(root) or root)):
            raise RunError(uri, "reached through a symbolic link: refused (only regular files inside the run folder are read)")
    try:
        st = os.lstat(lp)
    except FileNotFoundError:
        raise RunError(uri, "listed in the manifest but missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise RunError(uri, "a symbolic link: refused (only regular files inside the run folder are read)")
    if not stat.S_ISREG(st.st_mode):
        raise RunError(uri, "not a regular file (a device, a FIFO or a folder): refused")
    fd = os.open(lp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RunError(uri, "not a regular file: refused")
        return f.read(limit + 1)


@dataclass(frozen=True)
class RunFolder:
    """A run folder with its validated manifest."""

    uri: str
    manifest: Manifest

    @classmethod
    def open(cls, uri: str) -> RunFolder:
        """Read and validate ``<uri>/manifest.json``; :class:`RunError` names the file and the fault."""
        uri = uri.rstrip("/")
        m_uri = storage.join(uri, MANIFEST)
        if not storage.exists(m_uri):
            raise RunError(
                m_uri,
                "no manifest: this folder is not a published run (or not one yet: a run is published when its manifest is written)",
            )
        raw = read_bounded(m_uri, MAX_MANIFEST_BYTES, uri)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RunError(m_uri, f"larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RunError(m_uri, f"not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise RunError(m_uri, f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
        try:
            return cls(uri, Manifest.model_validate(body))
        except ValidationError as e:
            raise RunError(m_uri, "not a valid run manifest: " + pydantic_problems(e)) from None

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def path(self, entry: FileEntry) -> str:
        return storage.join(self.uri, *entry.file.split("/"))

    def read(self, entry: FileEntry) -> bytes:
        """A listed file's bytes, checked against the manifest's size and SHA-256."""
        uri = self.path(entry)
        try:
            data = read_bounded(uri, entry.bytes, self.uri)
        except FileNotFoundError:
            raise RunError(uri, "listed in the manifest but missing") from None
        if len(data) != entry.bytes:
            more = "more" if len(data) > entry.bytes else str(len(data))
            raise RunError(uri, f"{more} bytes where the manifest says {entry.bytes}: replaced or modified after publishing")
        got = hashlib.sha256(data).hexdigest()
        if got != entry.sha256:
            raise RunError(
                uri, f"content differs from the manifest (SHA-256 {got[:12]}… != {entry.sha256[:12]}…): modified after publishing"
            )
        return data

    def check(self, entry: FileEntry) -> dict:
        """A listed file streamed and checked without holding it: {"problem": reason or None,
        "rows": Parquet rows from its footer (data files)}."""
        uri = self.path(entry)
        try:
            lp = storage.local_path(uri)
            if lp is not None:
                read_bounded(uri, 0, self.uri)  # the path checks alone: regular file, no link, inside the folder
            fs, path = storage.filesystem(uri)
            h, n = hashlib.sha256(), 0
            with fs.open(path, "rb") as f:
                while n <= entry.bytes:
                    chunk = f.read(min(1 << 20, entry.bytes + 1 - n))
                    if not chunk:
                        break
                    h.update(chunk)
                    n += len(chunk)
            if n != entry.bytes:
                raise RunError(
                    uri,
                    f"{'more' if n > entry.bytes else n} bytes where the manifest says {entry.bytes}: "
                    "replaced or modified after publishing",
                )
            if h.hexdigest() != entry.sha256:
                raise RunError(
                    uri,
                    f"content differs from the manifest (SHA-256 {h.hexdigest()[:12]}… != {entry.sha256[:12]}…): "
                    "modified after publishing",
                )
            rows = None
            if entry.file.endswith(".parquet"):
                with fs.open(path, "rb") as f:
                    rows = pq.read_metadata(f).num_rows
                if entry.rows is not None and rows != entry.rows:
                    raise RunError(uri, f"{rows} rows, the manifest says {entry.rows}")
            return {"problem": None, "rows": rows}
        except RunError as e:
            return {"problem": str(e), "rows": None}
        except FileNotFoundError:
            return {"problem": f"{uri}: listed in the manifest but missing", "rows": None}
        except Exception as e:  # an unreadable Parquet footer, an I/O error
            return {"problem": f"{uri}: unreadable ({type(e).__name__}: {str(e)[:200]})", "rows": None}

    def report_entry(self, name: str) -> FileEntry:
        """The report file named ``name`` (``report.json``, ``report.html``, a plot)."""
        for e in self.manifest.report:
            if e.file.rsplit("/", 1)[-1] == name:
                return e
        raise RunError(storage.join(self.uri, MANIFEST), f"lists no {name}")

    def report(self) -> dict:
        """``report.json``, verified against the manifest and parsed."""
        e = self.report_entry("report.json")
        try:
            body = json.loads(self.read(e).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(self.path(e), f"not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise RunError(self.path(e), "not a JSON object")
        return body

    def table(self, kind: str = "results", columns: list[str] | None = None) -> pa.Table:
        """The rows of the run (``results`` or ``quarantine``), every file verified first."""
        tables = [pq.ParquetFile(pa.BufferReader(self.read(e))).read(columns=columns) for e in self.manifest.files.get(kind, [])]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


CALIBRATION_FILES = ("calibration.json", "calibration_report.json", "calibration_report.html")


def locate(uri: str) -> tuple[str, str]:
    """What ``uri`` is, as (kind, uri): "run" (a folder with a manifest), "calibration" (a folder with
    calibration.json or its report), "output" (an audit output: ``runs/`` with published runs) or
    "json" (a report file). Anything else raises :class:`RunError` with what is there and what to do."""
    uri = uri.rstrip("/") or "/"
    if uri.endswith(".json"):
        if not storage.exists(uri):
            raise NotARun(uri, "no such file")
        return "json", uri
    if not storage.exists(uri):
        parent, name = posixpath.split(uri) if "://" in uri else os.path.split(uri)
        if parent and posixpath.basename(parent.rstrip("/")) == "runs" and storage.exists(parent):
            output = parent.rstrip("/")[: -len("runs")].rstrip("/") or "."
            runs = list_runs(output)
            shown = ", ".join(runs[-5:]) + (f" (and {len(runs) - 5} more)" if len(runs) > 5 else "")
            raise NotARun(
                uri,
                f"no run {name!r} under {output}: the published runs there are {shown or 'none'} "
                f"(`ctd report history {output}` lists the nights)",
            )
        raise NotARun(uri, "no such file or folder")
    if is_run_folder(uri):
        return "run", uri
    names = storage.listdir(uri)
    if any(n in names for n in CALIBRATION_FILES):
        return "calibration", uri
    if "runs" in names:
        runs = list_runs(uri)
        if runs:
            raise NotARun(
                uri,
                f"an audit output with {len(runs)} published run(s), not one run: show one of them, e.g. "
                f"{run_folder(uri, runs[-1])}, or list the nights with `ctd report history {uri}`",
            )
        raise NotARun(uri, "an audit output with no published run yet")
    if "attempts" in names or "_lease.json" in names:
        raise NotARun(
            uri, "a run that is not published (no manifest): it is being written, or its writer failed before publishing"
        )
    raise NotARun(uri, "neither a published run (manifest.json), a calibration (calibration.json) nor an audit output (runs/)")


def run_folder(output: str, run_id: str) -> str:
    """``<output>/runs/<run_id>``."""
    return storage.join(output, "runs", run_id)


def read_manifest(output: str, run_id: str) -> dict | None:
    """The validated manifest of a published run as a dict; None when the run is not published."""
    uri = run_folder(output, run_id)
    if not is_run_folder(uri):
        return None
    return RunFolder.open(uri).manifest.model_dump()


def run_file(output: str, run_id: str, name: str) -> str:
    """The URI of a published run's report file (``report.json``, ``report.html``, a plot), from its manifest."""
    run = RunFolder.open(run_folder(output, run_id))
    return run.path(run.report_entry(name))


def read_run_table(output: str, run_id: str, kind: str = "results", columns: list[str] | None = None) -> pa.Table:
    """The rows of a published run (``results`` or ``quarantine``): only files its manifest lists,
    each verified against it."""
    return RunFolder.open(run_folder(output, run_id)).table(kind, columns)
