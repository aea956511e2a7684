"""Object storage through fsspec: local paths, file://, s3:// (and anything else fsspec knows).

Credentials come only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the
platform: instance roles, Kubernetes secrets mounted as env). A custom S3 endpoint (MinIO,
SeaweedFS, ...) comes from CTD_S3_ENDPOINT or AWS_ENDPOINT_URL; pyarrow's own S3 filesystem ignores
the latter, so we always go through s3fs.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec

__all__ = ["filesystem", "join", "read_bytes", "write_bytes", "read_json", "write_json", "exists", "remove", "listdir", "local_path"]


def _s3_options() -> dict[str, Any]:
    # No listings cache: other processes (Ray workers, other jobs) publish runs while we read, and a
    # cached listing would hide them.
    opts: dict[str, Any] = {"use_listings_cache": False}
    endpoint = os.environ.get("CTD_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    # s3fs reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN itself; never from configs.
    return opts


def filesystem(uri: str):
    """(fs, path) for a URI or local path."""
    uri = str(uri)
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        fs = fsspec.filesystem("s3", **_s3_options())
        return fs, uri.split("://", 1)[1]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def local_path(uri: str) -> str | None:
    """The local filesystem path of a file:// URI or plain path; None for remote URIs."""
    uri = str(uri)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if "://" in uri:
        return None
    return os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed, so a reader
    never sees half a file; S3 PUTs are atomic per object."""
    fs, path = filesystem(uri)
    lp = local_path(uri)
    if lp is not None:
        os.makedirs(os.path.dirname(lp) or ".", exist_ok=True)
        tmp = f"{lp}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, lp)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def listdir(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
