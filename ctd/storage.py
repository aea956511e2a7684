"""Object storage through fsspec: local paths, file://, s3:// (and anything else fsspec knows).

Credentials come only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the
platform: instance roles, Kubernetes secrets mounted as env). A custom S3 endpoint (MinIO,
SeaweedFS, ...) comes from CTD_S3_ENDPOINT or AWS_ENDPOINT_URL; pyarrow's own S3 filesystem ignores
the latter, so we always go through s3fs.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec

__all__ = [
    "filesystem",
    "join",
    "read_bytes",
    "write_bytes",
    "read_json",
    "write_json",
    "exists",
    "remove",
    "listdir",
    "local_path",
    "PreconditionFailed",
    "read_versioned",
    "write_if",
    "conditional_writes",
    "content_key",
    "file_digest",
]


def _s3_options() -> dict[str, Any]:
    # No listings cache: other processes (Ray workers, other jobs) publish runs while we read, and a
    # cached listing would hide them.
    opts: dict[str, Any] = {"use_listings_cache": False}
    endpoint = os.environ.get("CTD_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    # s3fs reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN itself; never from configs.
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
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


# ----------------------------------------------------------------------------------------------
# conditional writes: the compare-and-swap a lease needs
# ----------------------------------------------------------------------------------------------
class PreconditionFailed(Exception):
    """A conditional write found the object not in the state it was conditioned on."""


def conditional_writes(uri: str) -> str:
    """How :func:`write_if` is made exclusive on this store:

    - ``"s3"``: S3 conditional PUTs (``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace);
      AWS S3 since 2024, MinIO, SeaweedFS (tested with 4.48 in ``tests/test_runs.py``);
    - ``"flock"``: a local file, read-compare-write under ``fcntl.flock`` on a sidecar lock file:
      exclusive between processes of one machine (not across NFS clients);
    - ``"none"``: any other store: read-compare-write with no lock, so two writers racing within one
      round trip can both succeed (the lease is then advisory).
    """
    uri = str(uri)
    if uri.startswith(("s3://", "s3a://")):
        return "s3"
    return "flock" if local_path(uri) is not None else "none"


def _is_precondition(e: BaseException) -> bool:
    for err in (e, e.__cause__, e.__context__):
        resp = getattr(err, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status in (409, 412):
                return True
    return "pre-condition" in str(e).lower() or "precondition" in str(e).lower()


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """(content, version token) of an object, or None when it does not exist. The token is what
    :func:`write_if` conditions on: the ETag on S3, the content's SHA-256 elsewhere."""
    kind = conditional_writes(uri)
    if kind == "s3":
        fs, path = filesystem(uri)
        bucket, key = path.split("/", 1)
        try:
            resp = fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return _read_body(fs, resp["Body"]), resp["ETag"]
    if not exists(uri):
        return None
    data = read_bytes(uri)
    return data, hashlib.sha256(data).hexdigest()


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read():
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


def write_if(uri: str, data: bytes, token: str | None) -> str:
    """Write ``data`` only if the object is still at version ``token`` (None: only if it does not
    exist). Returns the new version token; raises :class:`PreconditionFailed` otherwise."""
    kind = conditional_writes(uri)
    if kind == "s3":
        fs, path = filesystem(uri)
        bucket, key = path.split("/", 1)
        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except Exception as e:
            if _is_precondition(e):
                raise PreconditionFailed(f"{uri}: changed by another writer") from None
            raise
        return resp["ETag"]
    if kind == "flock":
        import fcntl

        lp = local_path(uri)
        os.makedirs(os.path.dirname(lp) or ".", exist_ok=True)
        with open(lp + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return _compare_and_write(uri, data, token)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return _compare_and_write(uri, data, token)


def _compare_and_write(uri: str, data: bytes, token: str | None) -> str:
    cur = read_versioned(uri)
    if (cur is None) != (token is None) or (cur is not None and cur[1] != token):
        raise PreconditionFailed(f"{uri}: changed by another writer")
    write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# content keys and digests
# ----------------------------------------------------------------------------------------------
def file_digest(uri: str, chunk: int = 1 << 20) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of a file, streamed in 1 MiB chunks."""
    fs, path = filesystem(uri)
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            n += len(b)
    return n, h.hexdigest()


def content_key(uri: str) -> str:
    """What identifies a file's content without trusting its size: the ETag on S3 (one HEAD), the
    SHA-256 of the bytes elsewhere."""
    if conditional_writes(uri) == "s3":
        fs, path = filesystem(uri)
        return "etag:" + str(fs.info(path).get("ETag", "")).strip('"')
    return "sha256:" + file_digest(uri)[1]
