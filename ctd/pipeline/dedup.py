"""Duplicate ids: every row of an id that occurs on more than one valid row is quarantined.

census            one groupby(id) over the valid rows (hash-partitioned): the duplicated ids
                  (count > 1) and, in the same pass, how many rows are scored (a unique id) and
                  how many of those carry each flag (e.g. d(x) > λ*); the driver receives the
                  duplicated ids only while there are few of them
with_duplicates   adds ``dup_n`` (rows sharing the id; null for a unique id or an invalid row),
                  by a broadcast of the small id set or a join on id
is_scored         valid rows whose id is unique: they get a result
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from .corpus import is_valid
from .raydata import TALLY_SCHEMA, partitions, tally, tally_rows, tally_sum, tree_reduce

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["Duplicates", "Census", "census", "with_duplicates", "is_scored", "count_where"]

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


@dataclass
class Census:
    """The rows of a dataset by id: the duplicated ids, the scored rows (valid, unique id) and, of
    those, how many carry each flag."""

    dups: Duplicates
    scored: int
    flagged: dict[str, int]


def _per_row(batch: pa.Table, flags: dict) -> pa.Table:
    """Valid rows as (id, one 0/1 column per flag)."""
    ok = is_valid(batch)
    cols = {"id": batch.column("id")} | {f"f_{name}": pc.cast(fn(batch), pa.int64()) for name, fn in flags.items()}
    return pa.table(cols).filter(ok)


def _per_id(batch: pa.Table, flags: list[str]) -> pa.Table:
    """Groupby output → the duplicated ids (id, dup_n) and one block of partial counts (id null):
    scored rows, the scored rows that carry each flag, duplicated ids and their rows."""
    n = pc.cast(batch.column("count()"), pa.int64())
    unique = pc.equal(n, 1)
    dups = pa.table({"id": batch.column("id"), "dup_n": n}).filter(pc.invert(unique))
    counts = {
        "scored": int(pc.sum(pc.cast(unique, pa.int64())).as_py() or 0),
        "dup_ids": dups.num_rows,
        "dup_rows": int(pc.sum(dups.column("dup_n")).as_py() or 0),
    }
    for name in flags:
        counts[name] = int(pc.sum(pc.cast(pc.and_(unique, pc.equal(batch.column(f"sum(f_{name})"), 1)), pa.int64())).as_py() or 0)
    k = len(counts)
    return pa.concat_tables(
        [
            pa.table(
                {
                    "id": dups.column("id"),
                    "dup_n": dups.column("dup_n"),
                    "kind": pa.nulls(dups.num_rows, pa.string()),
                    "key": pa.nulls(dups.num_rows, pa.string()),
                    "n": pa.nulls(dups.num_rows, pa.int64()),
                },
                schema=_CENSUS,
            ),
            pa.table(
                {
                    "id": pa.nulls(k, pa.string()),
                    "dup_n": pa.nulls(k, pa.int64()),
                    "kind": ["count"] * k,
                    "key": list(counts),
                    "n": list(counts.values()),
                },
                schema=_CENSUS,
            ),
        ]
    )


_CENSUS = pa.schema([("id", pa.string()), ("dup_n", pa.int64()), ("kind", pa.string()), ("key", pa.string()), ("n", pa.int64())])


def _census_counts(*tables: pa.Table) -> pa.Table:
    """The partial counts of census blocks (or of sums of them), summed."""
    return tally_sum(
        *(t.filter(pc.is_valid(t.column("kind"))).select(["kind", "key", "n"]) if "id" in t.column_names else t for t in tables)
    )


def _dup_ids(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column("id"))).select(["id", "dup_n"]).cast(DUPS_SCHEMA)


def census(rows: Dataset, *, broadcast_limit: int, size: int, flags: dict | None = None) -> Census:
    """Duplicated ids and counts of the valid rows, by one distributed groupby(id) (hash-partitioned
    into partitions sized for ``size`` rows). ``flags``: {name: fn(batch) -> boolean array}, counted
    over the scored rows. The duplicated ids come to the driver only when there are at most
    ``broadcast_limit`` of them; otherwise they stay a dataset, joined on id."""
    import ray
    from ray.data.aggregate import Count, Sum

    flags = flags or {}
    per_id = (
        rows.map_batches(_per_row, fn_kwargs={"flags": flags}, batch_format="pyarrow", batch_size=None)
        .groupby("id", num_partitions=partitions(size))
        .aggregate(Count(), *(Sum(f"f_{k}") for k in flags))
        .map_batches(_per_id, fn_kwargs={"flags": list(flags)}, batch_format="pyarrow", batch_size=None)
    ).materialize()
    t = tree_reduce(per_id.to_arrow_refs(), _census_counts) or TALLY_SCHEMA.empty_table()
    total = dict(zip(t.column("key").to_pylist(), t.column("n").to_pylist()))
    n_ids, n_rows = int(total.get("dup_ids", 0)), int(total.get("dup_rows", 0))
    dup_ids = per_id.map_batches(_dup_ids, batch_format="pyarrow", batch_size=None)
    if n_ids == 0:
        dups = Duplicates(0, 0)
    elif n_ids <= broadcast_limit:
        table = pa.concat_tables([x for x in ray.get(dup_ids.to_arrow_refs()) if x.num_rows]).cast(DUPS_SCHEMA)
        dups = Duplicates(n_ids, n_rows, table=ray.put(table))
    else:
        dups = Duplicates(n_ids, n_rows, dataset=dup_ids.materialize(), n_rows_hint=size)
    return Census(dups, int(total.get("scored", 0)), {k: int(total.get(k, 0)) for k in flags})


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
        return batch.set_column(
            batch.column_names.index("dup_n"), "dup_n", pc.if_else(is_valid(batch), n, pa.scalar(None, pa.int64()))
        )
    if table is None or table.num_rows == 0:
        return batch.append_column("dup_n", pa.nulls(batch.num_rows, pa.int64()))
    n = pc.take(table.column("dup_n"), pc.index_in(batch.column("id"), value_set=table.column("id")))
    return batch.append_column(
        "dup_n", pc.if_else(is_valid(batch), n, pa.scalar(None, pa.int64()))
    )  # invalid rows keep their reason


def with_duplicates(rows: Dataset, dups: Duplicates) -> Dataset:
    """Rows with ``dup_n`` (lazy)."""
    if dups.broadcast:
        return rows.map_batches(_attach, fn_kwargs={"dups_ref": dups.table}, batch_format="pyarrow", batch_size=None)
    joined = rows.join(dups.dataset, join_type="left_outer", on=("id",), num_partitions=partitions(dups.n_rows_hint))
    return joined.map_batches(_attach, fn_kwargs={"dups_ref": None}, batch_format="pyarrow", batch_size=None)


def is_scored(batch: pa.Table) -> pa.ChunkedArray:
    """Valid rows whose id is unique: they get a result (``dup_n`` must be attached)."""
    return pc.and_(is_valid(batch), pc.is_null(batch.column("dup_n")))


def count_where(ds: Dataset, predicates: dict) -> dict[str, int]:
    """Counts of rows where each predicate (``fn(batch) -> boolean array``) holds, in one pass."""

    def part(batch: pa.Table) -> pa.Table:
        return tally_rows(
            "count", list(predicates), [int(pc.sum(pc.cast(fn(batch), pa.int64())).as_py() or 0) for fn in predicates.values()]
        )

    t = tally([(ds, part)])
    return {name: t.get("count", name) for name in predicates}
