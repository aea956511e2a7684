"""Duplicate ids: every row of an id that occurs on more than one valid row is quarantined.

    find_duplicates   groupby(id).count() over valid rows, kept where count > 1 (hash-partitioned);
                      the driver receives the ids only while there are few of them
    with_duplicates   adds ``dup_n`` (rows sharing the id; null for a unique id or an invalid row),
                      by a broadcast of the small id set or a join on id
    is_scored         valid rows whose id is unique: they get a result
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .corpus import is_valid
from .raydata import partitions, tally, tally_rows

__all__ = ["Duplicates", "find_duplicates", "with_duplicates", "is_scored", "count_where"]

DUPS_SCHEMA = pa.schema([("id", pa.string()), ("dup_n", pa.int64())])


@dataclass
class Duplicates:
    """Ids that occur on more than one valid row. ``table`` (id, dup_n) is an ObjectRef broadcast
    to the tasks while the set is small; otherwise ``dataset`` is joined on id."""

    ids: int
    rows: int
    table: Any = None
    dataset: Any = None
    n_rows_hint: int = 0  # rows of the dataset it applies to (sizes the join)

    @property
    def broadcast(self) -> bool:
        return self.dataset is None


def _valid_ids(batch: pa.Table) -> pa.Table:
    return batch.filter(is_valid(batch)).select(["id"])


def _keep_dups(batch: pa.Table) -> pa.Table:
    n = batch.column("count()")
    return pa.table({"id": batch.column("id"), "dup_n": pc.cast(n, pa.int64())}).filter(pc.greater(n, 1))


def _dup_rows(batch: pa.Table) -> pa.Table:
    return tally_rows("count", ["rows"], [int(pc.sum(batch.column("dup_n")).as_py() or 0)])


def find_duplicates(rows, *, broadcast_limit: int, size: int) -> Duplicates:
    """Duplicated ids among valid rows by a distributed groupby/count (hash-partitioned by id, into
    partitions sized for ``size`` rows). The driver receives the ids only when there are at most
    ``broadcast_limit`` of them."""
    import ray

    dups = (rows.select_columns(["id", "error"]).map_batches(_valid_ids, batch_format="pyarrow", batch_size=None)
            .groupby("id", num_partitions=partitions(size)).count()
            .map_batches(_keep_dups, batch_format="pyarrow", batch_size=None)).materialize()
    n_ids = dups.count()
    if n_ids <= broadcast_limit:
        tables = [t for t in ray.get(dups.to_arrow_refs()) if t.num_rows]
        if not tables:
            return Duplicates(0, 0)
        table = pa.concat_tables(tables).cast(DUPS_SCHEMA)
        return Duplicates(n_ids, int(pc.sum(table.column("dup_n")).as_py()), table=ray.put(table))
    return Duplicates(n_ids, tally([(dups, _dup_rows)]).get("count", "rows"), dataset=dups, n_rows_hint=size)


_BROADCAST_CACHE: dict = {}


def _get(ref):
    """An object broadcast to the tasks, fetched once per worker process."""
    import ray

    if ref is None or not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _BROADCAST_CACHE:
        _BROADCAST_CACHE.clear()
        _BROADCAST_CACHE[key] = ray.get(ref)
    return _BROADCAST_CACHE[key]


def _attach(batch: pa.Table, dups_ref) -> pa.Table:
    table = _get(dups_ref)
    if "dup_n" in batch.column_names:  # joined on id already
        n = batch.column("dup_n")
        return batch.set_column(batch.column_names.index("dup_n"), "dup_n", pc.if_else(is_valid(batch), n, pa.scalar(None, pa.int64())))
    if table is None or table.num_rows == 0:
        return batch.append_column("dup_n", pa.nulls(batch.num_rows, pa.int64()))
    n = pc.take(table.column("dup_n"), pc.index_in(batch.column("id"), value_set=table.column("id")))
    return batch.append_column("dup_n", pc.if_else(is_valid(batch), n, pa.scalar(None, pa.int64())))  # invalid rows keep their reason


def with_duplicates(rows, dups: Duplicates):
    """Rows with ``dup_n`` (lazy)."""
    if dups.broadcast:
        return rows.map_batches(_attach, fn_kwargs={"dups_ref": dups.table}, batch_format="pyarrow", batch_size=None)
    joined = rows.join(dups.dataset, join_type="left_outer", on=("id",), num_partitions=partitions(dups.n_rows_hint))
    return joined.map_batches(_attach, fn_kwargs={"dups_ref": None}, batch_format="pyarrow", batch_size=None)


def is_scored(batch: pa.Table):
    """Valid rows whose id is unique: they get a result (``dup_n`` must be attached)."""
    return pc.and_(is_valid(batch), pc.is_null(batch.column("dup_n")))


def count_where(ds, predicates: dict) -> dict[str, int]:
    """Counts of rows where each predicate (``fn(batch) -> boolean array``) holds, in one pass."""

    def part(batch: pa.Table) -> pa.Table:
        return tally_rows("count", list(predicates), [int(pc.sum(pc.cast(fn(batch), pa.int64())).as_py() or 0) for fn in predicates.values()])

    t = tally([(ds, part)])
    return {name: t.get("count", name) for name in predicates}
