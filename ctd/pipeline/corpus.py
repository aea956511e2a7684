"""Reading and validating a corpus with Ray Data.

A corpus is a file or a folder of files (JSON lines, optionally gzipped, or Parquet) at any fsspec
URI. Row schema: ``id`` (unique non-empty string), ``messages`` (list of {role, content}) or
``text``, optional ``group`` (string), optional ``label`` (0/1). Other fields are ignored.

Every physical input row becomes exactly one output row: valid rows carry the normalised fields,
invalid ones an ``error`` (the quarantine reason) and their ``source`` (file:line). Nothing is
dropped, so rows read = rows scored + rows quarantined can be checked at the end. JSON lines are
split and decoded row by row, so one malformed line or one invalid UTF-8 byte sequence affects only
its own row.
"""

from __future__ import annotations

import gzip
import json
import posixpath
from typing import Any

import numpy as np

from .. import storage

__all__ = ["list_corpus_files", "validate_record", "read_corpus", "ROW_COLUMNS", "MAX_ROW_BYTES"]

MAX_ROW_BYTES = 4 << 20
MAX_ID_CHARS = 512
ROW_COLUMNS = ("id", "input", "is_chat", "group", "label", "source", "error")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson", ".parquet")


def list_corpus_files(uri: str) -> tuple[Any, list[str], str]:
    """(filesystem, file paths, format) of a corpus file or folder. All files must share a format."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"corpus not found: {uri}")
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(_SUFFIXES) and not posixpath.basename(p).startswith(("_", ".")))
        if not files:
            raise FileNotFoundError(f"corpus folder {uri} holds no .jsonl(.gz) or .parquet files")
    else:
        files = [path]
    kinds = {"parquet" if f.endswith(".parquet") else "jsonl" for f in files}
    if len(kinds) != 1:
        raise ValueError(f"corpus {uri} mixes Parquet and JSON-lines files; use one format")
    return fs, files, kinds.pop()


def _is_label(x) -> bool:
    return isinstance(x, (bool, np.bool_)) or (isinstance(x, (int, np.integer)) and int(x) in (0, 1))


def validate_record(obj: Any, source: str) -> dict:
    """One output row for one input record (a parsed JSON object or a Parquet row)."""
    row = {"id": None, "input": None, "is_chat": False, "group": None, "label": -1, "source": source, "error": None}

    def bad(reason: str) -> dict:
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            row["id"] = obj["id"][:MAX_ID_CHARS]
        row["error"] = reason
        return row

    if not isinstance(obj, dict):
        return bad("row is not a JSON object")
    rid = obj.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return bad("missing id")
    if not isinstance(rid, str):
        return bad(f"id must be a string, got {type(rid).__name__}")
    if len(rid) > MAX_ID_CHARS:
        return bad(f"id longer than {MAX_ID_CHARS} characters")
    has_m, has_t = obj.get("messages") is not None, obj.get("text") is not None
    if has_m == has_t:
        return bad("row needs exactly one of 'messages' or 'text'")
    if has_t:
        text = obj["text"]
        if not isinstance(text, str):
            return bad(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            return bad("empty text")
        row["input"] = text
    else:
        msgs = obj["messages"]
        if isinstance(msgs, np.ndarray):
            msgs = msgs.tolist()
        if not isinstance(msgs, list) or not msgs:
            return bad("messages must be a non-empty list")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return bad("each message must be an object with string 'role' and 'content'")
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in clean):
            return bad("empty text")
        row["input"] = json.dumps(clean, ensure_ascii=False)
        row["is_chat"] = True
    g = obj.get("group")
    if g is not None and not isinstance(g, str):
        return bad(f"group must be a string, got {type(g).__name__}")
    row["group"] = g
    lab = obj.get("label")
    if lab is not None:
        if not _is_label(lab):
            return bad(f"label must be 0 or 1, got {lab!r}")
        row["label"] = int(lab)
    row["id"] = rid
    return row


def _split_lines(item: dict) -> list[dict]:
    """A JSON-lines file (bytes) → one row per non-empty line, each decoded on its own."""
    path, data = item["path"], item["bytes"]
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            return [validate_record(None, f"{path}") | {"error": f"unreadable gzip file ({e})"}]
    out = []
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        src = f"{path}:{i}"
        if len(raw) > MAX_ROW_BYTES:
            out.append(validate_record(None, src) | {"error": f"row larger than {MAX_ROW_BYTES} bytes"})
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append(validate_record(None, src) | {"error": f"undecodable bytes (invalid UTF-8 at byte {e.start})"})
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            out.append(validate_record(None, src) | {"error": f"malformed JSON ({e.msg} at column {e.colno})"})
            continue
        except RecursionError:
            out.append(validate_record(None, src) | {"error": "malformed JSON (nested too deeply)"})
            continue
        out.append(validate_record(obj, src))
    return out


def _validate_parquet_batch(batch):
    import pyarrow as pa

    rows = batch.to_pylist()
    paths = batch.column("__path").to_pylist() if "__path" in batch.column_names else ["parquet"] * len(rows)
    out = []
    for i, (r, p) in enumerate(zip(rows, paths)):
        r.pop("__path", None)
        src = f"{p}:{r.pop('__row', i)}"
        out.append(validate_record(r, src))
    return pa.Table.from_pylist(out, schema=_schema())


def _schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("input", pa.string()), ("is_chat", pa.bool_()), ("group", pa.string()),
                      ("label", pa.int8()), ("source", pa.string()), ("error", pa.string())])


def _rows_to_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=_schema())


def read_corpus(uri: str, *, override_num_blocks: int | None = None):
    """A Ray Dataset of validated rows (columns :data:`ROW_COLUMNS`)."""
    import ray

    fs, files, kind = list_corpus_files(uri)
    if kind == "jsonl":
        ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True, override_num_blocks=override_num_blocks)
        return ds.flat_map(_split_lines).map_batches(_rows_to_table_batch, batch_format="pyarrow", batch_size=None)
    ds = ray.data.read_parquet(files, filesystem=fs, include_paths=True, override_num_blocks=override_num_blocks)
    if "path" in ds.columns():
        ds = ds.rename_columns({"path": "__path"})
    return ds.map_batches(_validate_parquet_batch, batch_format="pyarrow", batch_size=4096)


def _rows_to_table_batch(batch):
    # flat_map output arrives as a table already; re-cast it to the fixed schema (all-null columns
    # of a block would otherwise be typed `null` and clash with other blocks).
    return batch.select(list(ROW_COLUMNS)).cast(_schema())
