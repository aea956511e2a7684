"""Tables on disk: read Parquet or JSON lines from any URI, and validate the scores contract.

Scores table (calibration input and audit output): ``id``, ``probe``, ``dv``, ``expert`` (null when
not called), ``delegated``, ``final``, ``decision``, optional ``label`` and ``group``. Calibration
needs ``id``, ``label``, ``probe``, ``expert``, ``dv``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

__all__ = ["TableError", "read_table", "read_parquet", "parquet_rows", "parquet_schema", "write_parquet", "scores_for_calibration", "CALIBRATION_COLUMNS"]

CALIBRATION_COLUMNS = ("id", "label", "probe", "expert", "dv")


class TableError(ValueError):
    """A table that cannot be used: unreadable, or violating the column contract."""


def read_table(uri: str) -> pa.Table:
    """A Parquet file (by magic bytes) or JSON lines, from any fsspec URI."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise TableError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise TableError(f"{uri}: is a directory, expected a Parquet or JSONL file") from None
    if data[:4] == b"PAR1":
        try:
            return _parquet(pa.BufferReader(data))
        except Exception as e:
            raise TableError(f"{uri}: unreadable Parquet ({e})") from None
    rows = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TableError(f"{uri}: not UTF-8 JSON lines and not Parquet ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TableError(f"{uri}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TableError(f"{uri}: line {lineno} is not a JSON object")
        rows.append(row)
    if not rows:
        raise TableError(f"{uri}: empty table")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise TableError(f"{uri}: inconsistent column types ({e})") from None


def _parquet(source, columns: list[str] | None = None) -> pa.Table:
    """``ParquetFile.read``, never ``pq.read_table``: the latter's dataset scanner leaves threads that
    made pyarrow 26 abort at interpreter exit now and then ("terminate called without an active
    exception", apache/arrow#34314) — measured here in 5 of 20 runs, 0 of 40 with this."""
    return pq.ParquetFile(source).read(columns=columns)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file from any URI."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return _parquet(f, columns)


def parquet_rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


def parquet_schema(uri: str) -> pa.Schema:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def write_parquet(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def _column(table: pa.Table, name: str, uri: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise TableError(f"{uri}: column {name!r} has {col.null_count} missing values")
    try:
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=float)
    except (TypeError, ValueError):
        raise TableError(f"{uri}: column {name!r} must be numeric") from None


def scores_for_calibration(table: pa.Table, uri: str = "scores") -> dict[str, np.ndarray]:
    """Validated arrays for calibration: ids (unique strings), labels 0/1, probe and expert
    probabilities in [0, 1], finite dv; groups when present."""
    missing = [c for c in CALIBRATION_COLUMNS if c not in table.column_names]
    if missing:
        raise TableError(f"{uri}: missing column(s) {', '.join(missing)} (need {', '.join(CALIBRATION_COLUMNS)})")
    if table.num_rows == 0:
        raise TableError(f"{uri}: no rows")
    ids = np.asarray(table.column("id").cast(pa.string()).to_pylist(), dtype=object)
    if any(i is None or i == "" for i in ids):
        raise TableError(f"{uri}: column 'id' has missing or empty values")
    if len(set(ids.tolist())) != len(ids):
        raise TableError(f"{uri}: column 'id' has duplicate values")
    out = {"ids": ids}
    for name in ("label", "probe", "expert", "dv"):
        a = _column(table, name, uri)
        if not np.all(np.isfinite(a)):
            raise TableError(f"{uri}: column {name!r} has NaN or infinite values")
        out[name] = a
    if not np.all(np.isin(out["label"], (0, 1))):
        raise TableError(f"{uri}: column 'label' must hold 0/1 (1 = unsafe), found {sorted(set(np.unique(out['label']).tolist()) - {0.0, 1.0})[:5]}")
    out["label"] = out["label"].astype(np.int64)
    for name in ("probe", "expert"):
        if np.any((out[name] < 0) | (out[name] > 1)):
            raise TableError(f"{uri}: column {name!r} must hold probabilities in [0, 1]")
    if "group" in table.column_names:
        out["group"] = np.asarray(table.column("group").cast(pa.string()).fill_null("").to_pylist(), dtype=object)
    return out
