"""Reading and validating a corpus with Ray Data.

A corpus is a file or a folder of files (JSON lines, optionally gzipped, or Parquet) at any fsspec
URI. Row schema: ``id`` (unique non-empty string), ``messages`` (list of {role, content}) or
``text``, optional ``group`` (string), optional ``label`` (0/1). Other fields are ignored.

Every physical input row becomes exactly one output row: valid rows carry the normalised fields,
invalid ones an ``error`` (the quarantine reason) and their ``source`` (file:line). Nothing is
dropped, so rows read = rows scored + rows quarantined can be checked at the end. JSON lines are
read as a stream (gzip decompressed as it is read), split and decoded line by line, so one malformed
line or one invalid UTF-8 byte sequence affects only its own row, and a read task's memory is bounded
by a chunk and a block of rows, whatever the file's size.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import unicodedata
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..config import ConfigError

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "list_corpus_files",
    "corpus_bytes",
    "validate_record",
    "read_corpus",
    "local_rows",
    "is_valid",
    "row_input",
    "ROW_COLUMNS",
    "MAX_ROW_BYTES",
    "REASONS",
    "Reason",
]

MAX_ROW_BYTES = 4 << 20
MAX_ID_CHARS = 512
ROW_COLUMNS = ("id", "input", "is_chat", "group", "label", "source", "error")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson", ".parquet")


def list_corpus_files(uri: str) -> tuple[Any, list[str], str]:
    """(filesystem, file paths, format) of a corpus file or folder. All files must share a format."""
    fs, files, kind, _ = _listing(uri)
    return fs, files, kind


def corpus_bytes(uri: str) -> int:
    """The corpus's size in bytes as stored (compressed files count compressed), from one listing;
    raises as :func:`list_corpus_files` does."""
    return int(sum(_listing(uri)[3].values()))


def _listing(uri: str) -> tuple[Any, list[str], str, dict[str, int]]:
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"corpus not found: {uri}")
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        files = sorted(p for p in found if p.endswith(_SUFFIXES) and not posixpath.basename(p).startswith(("_", ".")))
        if not files:
            raise FileNotFoundError(f"corpus folder {uri} holds no .jsonl(.gz) or .parquet files")
        info = {p: found[p] for p in files}
    else:
        files, info = [path], {path: fs.info(path)}
    odd = [p for p in files if info[p].get("type") != "file"]
    if odd:  # a device or a FIFO would be read forever
        raise ConfigError(f"corpus {uri}: {odd[0]} is not a regular file (a device, a FIFO or a socket); a corpus holds files")
    kinds = {"parquet" if f.endswith(".parquet") else "jsonl" for f in files}
    if len(kinds) != 1:
        raise ValueError(f"corpus {uri} mixes Parquet and JSON-lines files; use one format")
    return fs, files, kinds.pop(), {p: int(info[p].get("size") or 0) for p in files}


def row_input(text: str, is_chat: bool) -> str | list[dict]:
    """A validated row's model input: the chat's list of messages, or the text."""
    return json.loads(text) if is_chat else text


def is_valid(batch: pa.Table) -> pa.ChunkedArray:
    """Rows that passed validation (no ``error``): an Arrow boolean array over a batch of rows."""
    import pyarrow.compute as pc

    return pc.is_null(batch.column("error"))


def _is_label(x) -> bool:
    return isinstance(x, (bool, np.bool_)) or (isinstance(x, (int, np.integer)) and int(x) in (0, 1))


MAX_GROUP_CHARS = 256


# Every quarantine reason is one of these, then a short detail in parentheses: "label must be 0 or 1
# (got 7)". The report counts rows by the part before " (", so its table has at most this many lines
# whatever the input holds; a detail never carries more than a few characters of a row.
class Reason:
    """The quarantine reasons (the part before a detail in parentheses)."""

    NOT_OBJECT = "row is not a JSON object"
    NO_ID = "missing id"
    ID_TYPE = "id must be a string"
    ID_LONG = f"id longer than {MAX_ID_CHARS} characters"
    ID_NFC = "id not in Unicode NFC form"
    ID_INVISIBLE = "id with invisible characters or surrounding whitespace"
    ONE_OF = "row needs exactly one of 'messages' or 'text'"
    TEXT_TYPE = "text must be a string"
    EMPTY_TEXT = "empty text"
    MESSAGES_TYPE = "messages must be a non-empty list"
    MESSAGE_SHAPE = "each message must be an object with string 'role' and 'content'"
    GROUP_TYPE = "group must be a string"
    GROUP_LONG = f"group longer than {MAX_GROUP_CHARS} characters"
    LABEL = "label must be 0 or 1"
    TOO_LARGE = f"row larger than {MAX_ROW_BYTES} bytes"
    UNDECODABLE = "undecodable bytes"
    MALFORMED = "malformed JSON"
    GZIP = "unreadable gzip file"
    EMPTY_FILE = "empty file"
    DUPLICATE = "duplicate id"  # given by the audit, after the rows of an id are counted


REASONS = tuple(v for k, v in vars(Reason).items() if k.isupper())


def _brief(x: Any) -> str:
    """A few characters saying what a bad value is: its type, and a short repr of a scalar."""
    if isinstance(x, (bool, int, float, np.generic)):
        return f"got {str(x)[:24]}"
    if isinstance(x, str):
        return f"got a string: {x[:16]!r}" if len(x) <= 16 else f"got a string of {len(x)} characters"
    return f"got {type(x).__name__}"


def _bad_id(rid: str) -> str | None:
    """Why an id cannot name a row unambiguously (ids that look alike must be alike), or None."""
    if len(rid) > MAX_ID_CHARS:
        return Reason.ID_LONG
    if rid != rid.strip() or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") or (c.isspace() and c != " ") for c in rid):
        return Reason.ID_INVISIBLE
    if not unicodedata.is_normalized("NFC", rid):
        return Reason.ID_NFC
    return None


def validate_record(obj: Any, source: str) -> dict:
    """One output row for one input record (a parsed JSON object or a Parquet row); an invalid one
    carries its reason (one of :data:`REASONS`, with a short detail)."""
    row = {"id": None, "input": None, "is_chat": False, "group": None, "label": -1, "source": source, "error": None}

    def bad(reason: str, detail: str | None = None) -> dict:
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            row["id"] = obj["id"][:MAX_ID_CHARS]
        row["error"] = reason if detail is None else f"{reason} ({detail})"
        row["input"], row["is_chat"] = None, False
        return row

    if not isinstance(obj, dict):
        return bad(Reason.NOT_OBJECT)
    rid = obj.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return bad(Reason.NO_ID)
    if not isinstance(rid, str):
        return bad(Reason.ID_TYPE, _brief(rid))
    if why := _bad_id(rid):
        return bad(why)
    has_m, has_t = obj.get("messages") is not None, obj.get("text") is not None
    if has_m == has_t:
        return bad(Reason.ONE_OF)
    if has_t:
        text = obj["text"]
        if not isinstance(text, str):
            return bad(Reason.TEXT_TYPE, _brief(text))
        if not text.strip():
            return bad(Reason.EMPTY_TEXT)
        row["input"] = text
    else:
        msgs = obj["messages"]
        if isinstance(msgs, np.ndarray):
            msgs = msgs.tolist()
        if not isinstance(msgs, list) or not msgs:
            return bad(Reason.MESSAGES_TYPE)
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return bad(Reason.MESSAGE_SHAPE)
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in clean):
            return bad(Reason.EMPTY_TEXT)
        row["input"] = json.dumps(clean, ensure_ascii=False)
        row["is_chat"] = True
    if len(row["input"]) * 4 > MAX_ROW_BYTES and len(row["input"].encode("utf-8", "surrogatepass")) > MAX_ROW_BYTES:
        return bad(Reason.TOO_LARGE)  # one limit for every format (a JSON line is refused before it is parsed)
    g = obj.get("group")
    if g is not None and not isinstance(g, str):
        return bad(Reason.GROUP_TYPE, _brief(g))
    if g is not None and len(g) > MAX_GROUP_CHARS:
        return bad(Reason.GROUP_LONG)
    row["group"] = g
    lab = obj.get("label")
    if lab is not None:
        if not _is_label(lab):
            return bad(Reason.LABEL, _brief(lab))
        row["label"] = int(lab)
    row["id"] = rid
    return row


def _line_row(raw: bytes, src: str) -> dict:
    """One JSON line → one output row (valid, or carrying its error)."""
    if len(raw) > MAX_ROW_BYTES:
        return validate_record(None, src) | {"error": Reason.TOO_LARGE}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return validate_record(None, src) | {"error": f"{Reason.UNDECODABLE} (invalid UTF-8 at byte {e.start})"}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return validate_record(None, src) | {"error": f"{Reason.MALFORMED} ({e.msg}, column {e.colno})", "id": _salvaged_id(text)}
    except RecursionError:
        return validate_record(None, src) | {"error": f"{Reason.MALFORMED} (nested too deeply)", "id": _salvaged_id(text)}
    return validate_record(obj, src)


_ID_FIELD = re.compile(r'"id"\s*:\s*"((?:[^"\\]|\\.){1,' + str(MAX_ID_CHARS) + r'})"')


def _salvaged_id(text: str) -> str | None:
    """The readable id of a line that is not valid JSON (``"id": "..."`` near its start), so a
    reviewer can find it; None when there is none."""
    m = _ID_FIELD.search(text[:4096])
    if m is None:
        return None
    try:
        return json.loads(f'"{m.group(1)}"')
    except json.JSONDecodeError:
        return None


BLOCK_BYTES = 64 << 20  # a block of rows is yielded by this many bytes of lines, if not by its row count


def _chunks(f: BinaryIO, path: str, chunk_bytes: int) -> Iterator[bytes]:
    """The file's bytes in pieces of at most ``chunk_bytes``; a ``.gz`` file (read raw) decompressed
    as it is read, member after member. Every byte that decompresses is yielded before a corrupt or
    truncated stream raises, so the rows before the damage are kept."""
    if not path.endswith(".gz"):
        while data := f.read(chunk_bytes):
            yield data
        return
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    fed = False  # whether the current member has begun
    pending = b""
    while True:
        if not pending and not (pending := f.read(chunk_bytes)):
            break
        fed = True
        out = d.decompress(pending, chunk_bytes)  # at most chunk_bytes out: a bomb inflates a bounded piece at a time
        pending = d.unconsumed_tail
        if out:
            yield out
        if d.eof:  # a member ended: the next one (concatenated gzip) starts in its unused data
            pending = d.unused_data + pending
            d, fed = zlib.decompressobj(16 + zlib.MAX_WBITS), False
    if fed:
        raise EOFError("compressed file ended before the end-of-stream marker")


def stream_rows(
    f: BinaryIO,
    path: str,
    *,
    chunk_bytes: int = 1 << 20,
    rows_per_block: int = 8192,
    block_bytes: int = BLOCK_BYTES,
) -> Iterator[list[dict]]:
    """A JSON-lines file's stream (raw bytes; a ``.gz`` path is decompressed here) → lists of rows,
    one per non-empty line, each decoded on its own. A list is yielded at ``rows_per_block`` rows or
    ``block_bytes`` bytes of lines, so memory is bounded by a chunk, a block and the longest line
    kept (a line over MAX_ROW_BYTES is skipped to its end, not held). A stream that cannot be read
    to the end (a corrupt gzip file) ends with one row saying so, after the rows read before it; a
    file with no rows at all gives one row saying so."""
    out: list[dict] = []
    held = 0
    buf = b""
    lineno = 0
    rows = 0
    skipping = False  # inside a line already reported as too large
    try:
        for data in _chunks(f, path, chunk_bytes):
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                lineno += 1
                if skipping:  # the end of the oversized line
                    skipping = False
                    continue
                if raw.strip():
                    out.append(_line_row(raw, f"{path}:{lineno}"))
                    held += len(raw)
            if len(buf) > MAX_ROW_BYTES and not skipping:
                out.append(validate_record(None, f"{path}:{lineno + 1}") | {"error": Reason.TOO_LARGE})
                skipping, buf = True, b""
            elif skipping:
                buf = b""
            if len(out) >= rows_per_block or held >= block_bytes:
                rows += len(out)
                yield out
                out, held = [], 0
    except (OSError, EOFError, ValueError, zlib.error) as e:
        # A corrupt gzip stream is the file's fault: one quarantine row. Anything else (a network error
        # on a plain file) is raised, so that Ray retries the read rather than drop the file's rest.
        if not path.endswith(".gz"):
            raise
        out.append(validate_record(None, f"{path}:{lineno + 1}") | {"error": f"{Reason.GZIP} ({str(e)[:120]})"})
        buf = b""
    if buf.strip() and not skipping:
        out.append(_line_row(buf, f"{path}:{lineno + 1}"))
    if not out and not rows:
        out.append(validate_record(None, f"{path}:0") | {"error": f"{Reason.EMPTY_FILE} (no rows in {lineno} lines)"})
    if out:
        yield out


def _split_lines(item: dict) -> list[dict]:
    """A whole JSON-lines file held in memory (bytes, gzipped when its path ends in .gz) → its rows:
    the same decoding as the streaming reader, for small inputs and tests."""
    return [r for block in stream_rows(io.BytesIO(item["bytes"]), item["path"]) for r in block]


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

    return pa.schema(
        [
            ("id", pa.string()),
            ("input", pa.string()),
            ("is_chat", pa.bool_()),
            ("group", pa.string()),
            ("label", pa.int8()),
            ("source", pa.string()),
            ("error", pa.string()),
        ]
    )


def rows_to_table(rows: list[dict]) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=_schema())


def read_corpus(uri: str, *, files: list[str] | None = None, override_num_blocks: int | None = None) -> Dataset:
    """A Ray Dataset of validated rows (columns :data:`ROW_COLUMNS`) of a corpus, or of ``files``
    (some of the paths :func:`list_corpus_files` lists for it)."""
    import ray

    if files is None:
        fs, files, kind = list_corpus_files(uri)
    else:  # a chunk of a corpus already listed: no second listing
        fs, _ = storage.filesystem(uri)
        kind = "parquet" if all(f.endswith(".parquet") for f in files) else "jsonl"
    if kind == "jsonl":
        from .jsonl_source import JSONLinesDatasource  # Ray's datasource base class: imported only where Ray runs

        ds = ray.data.read_datasource(JSONLinesDatasource(files, filesystem=fs), override_num_blocks=override_num_blocks)
        return ds.map_batches(_rows_to_table_batch, batch_format="pyarrow", batch_size=None)
    ds = ray.data.read_parquet(files, filesystem=fs, include_paths=True, override_num_blocks=override_num_blocks)
    if "path" in ds.columns():
        ds = ds.rename_columns({"path": "__path"})
    return ds.map_batches(_validate_parquet_batch, batch_format="pyarrow", batch_size=4096)


def local_rows(uri: str) -> pa.Table:
    """A corpus read and validated in this process, as :func:`read_corpus` does with Ray Data (the same
    row decoding): for corpora that fit in memory (``ctd report verify --corpus`` of a small run)."""
    fs, files, kind = list_corpus_files(uri)
    tables = []
    for f in files:
        if kind == "jsonl":
            with fs.open(f, "rb") as stream:  # raw: stream_rows decompresses
                tables += [rows_to_table(rows) for rows in stream_rows(stream, f)]
        else:
            with fs.open(f, "rb") as src:
                t = pq.ParquetFile(src).read()
            tables.append(_validate_parquet_batch(t.append_column("__path", pa.array([f] * t.num_rows, pa.string()))))
    return pa.concat_tables(tables) if tables else _schema().empty_table()


def _rows_to_table_batch(batch):
    # flat_map output arrives as a table already; re-cast it to the fixed schema (all-null columns
    # of a block would otherwise be typed `null` and clash with other blocks).
    return batch.select(list(ROW_COLUMNS)).cast(_schema())
