"""Fetching a published run's or a calibration's report files: only what the manifest lists."""

from __future__ import annotations

import os

from .. import storage
from .layout import MANIFEST

__all__ = ["REPORT_FILES", "report_files", "fetch_report"]

REPORT_FILES = (
    "report.json",
    "report.html",
    "review.parquet",
    "calibration_report.json",
    "calibration_report.html",
    "calibration.json",
    "training_report.json",
    "manifest.json",
)


def report_files(uri: str) -> dict[str, str]:
    """{name: URI} of the report files at ``uri``: a published run's (through its manifest), or a
    calibration/training folder's. A run folder without a manifest is refused: it is not published."""
    names = storage.listdir(uri)
    if MANIFEST in names:
        m = storage.read_json(storage.join(uri, MANIFEST))
        files = {e["file"].rsplit("/", 1)[-1]: storage.join(uri, e["file"]) for e in m.get("report", [])}
        return files | {MANIFEST: storage.join(uri, MANIFEST)}
    if "attempts" in names or "_lease.json" in names:  # a run folder (a calibration folder may have _staging)
        raise FileNotFoundError(f"run at {uri} is not published (no manifest): it is incomplete or being written")
    return {n: storage.join(uri, n) for n in names if n in REPORT_FILES or n.endswith(".png")}


def fetch_report(uri: str, to: str = ".") -> list[str]:
    """Download the report files of a published run (``<output>/runs/<id>``) or a calibration folder."""
    uri = uri.rstrip("/")
    files = report_files(uri)
    if not files:
        raise FileNotFoundError(f"no report at {uri}")
    dest = os.path.join(to, os.path.basename(uri))
    os.makedirs(dest, exist_ok=True)
    out = []
    for n, src in sorted(files.items()):
        p = os.path.join(dest, n)
        with open(p, "wb") as f:
            f.write(storage.read_bytes(src))
        out.append(p)
    return out
