"""Fetching a published run or a calibration from any store into a local folder that the tools read as is.

    ctd report fetch s3://bucket/out/runs/audit-2026-12-02 --to fetched     → fetched/runs/audit-2026-12-02/
    ctd report fetch s3://bucket/out/calibration --to fetched                → fetched/calibration/

A run is copied with its manifest and the files at the paths the manifest gives (the report files; with
``--data`` the results and quarantine too), so ``ctd report show``, ``verify`` (of a ``--data`` copy)
and ``history fetched`` read the copy exactly as they read the original. Every file is checked against
the source manifest's size and SHA-256 before it is written (a tampered source is refused); the
manifest is written last. Nothing is written outside the destination folder: the manifest's paths are
confined to the run (:class:`ctd.runs.folder.FileEntry`), and a symbolic link already in the
destination is refused, never written through.
"""

from __future__ import annotations

import os
import uuid

from .. import storage
from .folder import CALIBRATION_FILES, MANIFEST, RunError, RunFolder, locate, read_bounded

__all__ = ["fetch"]

MAX_CALIBRATION_FILE = 256 << 20


def _write_local(root: str, rel: str, data: bytes) -> str:
    """Write ``data`` at ``root/rel`` (a local folder), refusing any symbolic link on the way."""
    root = os.path.abspath(root)
    if os.path.islink(root):
        raise RunError(root, "a symbolic link in the destination: refused (fetch never writes through a link)")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, *rel.split("/"))
    here = root
    for part in rel.split("/")[:-1]:
        here = os.path.join(here, part)
        if os.path.islink(here):
            raise RunError(here, "a symbolic link in the destination: refused (fetch never writes through a link)")
        os.makedirs(here, exist_ok=True)
    if os.path.islink(path):
        raise RunError(path, "a symbolic link in the destination: refused (fetch never writes through a link)")
    if os.path.exists(path) and not os.path.isfile(path):
        raise RunError(path, "exists and is not a regular file: refused")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "xb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def fetch(uri: str, to: str = ".", *, data: bool = False) -> tuple[str, list[str]]:
    """Copy a run folder (its report files; with ``data`` its results and quarantine too) to
    ``<to>/runs/<run_id>/``, or a calibration folder to ``<to>/<its name>/``. Returns (the local folder,
    the files written). Raises :class:`ctd.runs.folder.RunError` for a source that cannot be trusted."""
    if storage.local_path(to) is None:
        raise RunError(to, "fetch writes to a local folder")
    kind, uri = locate(uri)
    if kind == "run":
        run = RunFolder.open(uri)
        dest = os.path.join(to, "runs", run.run_id)
        entries = [e for k, e in run.manifest.entries() if data or k == "report"]
        written = [_write_local(dest, e.file, run.read(e)) for e in entries]  # each checked against the manifest
        written.append(_write_local(dest, MANIFEST, read_bounded(storage.join(uri, MANIFEST), 64 << 20, uri)))  # last
        return dest, written
    if kind == "calibration":
        from ..calibration.artifact import load_calibration

        names = storage.listdir(uri)
        if "calibration.json" in names:
            load_calibration(uri)  # its artifact_hash must verify before anything is copied
        dest = os.path.join(to, os.path.basename(uri.rstrip("/")))
        written = []
        for n in sorted(n for n in names if n in CALIBRATION_FILES or (n.endswith(".png") and "/" not in n)):
            body = read_bounded(storage.join(uri, n), MAX_CALIBRATION_FILE, uri)
            if len(body) > MAX_CALIBRATION_FILE:
                raise RunError(storage.join(uri, n), f"larger than {MAX_CALIBRATION_FILE >> 20} MiB: not a report file")
            written.append(_write_local(dest, n, body))
        return dest, written
    raise RunError(
        uri,
        f"is {'an audit output' if kind == 'output' else 'a single file'}: fetch takes one run folder or a calibration folder",
    )
