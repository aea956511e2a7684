"""The JSON-lines corpus as a Ray Data datasource (kept apart so that reading a corpus in-process, or
the ``ctd`` command, never imports Ray Data)."""

from __future__ import annotations

from ray.data.datasource import FileBasedDatasource

from .corpus import rows_to_table, stream_rows

__all__ = ["JSONLinesDatasource"]


class JSONLinesDatasource(FileBasedDatasource):
    """JSON lines (plain or gzipped: Ray opens a decompressing stream by extension) read as a stream:
    each read task holds one chunk, one block of rows and one line at a time, never a whole file."""

    _FILE_EXTENSIONS = ["jsonl", "json", "ndjson", "gz"]

    def _read_stream(self, f, path: str):
        for rows in stream_rows(f, path):
            yield rows_to_table(rows)
