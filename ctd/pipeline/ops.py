"""Per-row decisions of the audit as Ray Data operations. What comes back to the driver is O(1) in
the number of rows: counts, one boundary row, a handful of aggregate rows, or (for duplicates) the
set of duplicated ids while it is small, with a join instead of a broadcast when it is not.

    find_duplicates    groupby(id).count() over valid rows, kept where count > 1 (hash-partitioned)
    mark               adds ``dup_n`` (rows sharing the id) and ``sent`` / ``over_cap`` to stage-1 rows
    cap_boundary       the first row over the hard budget cap, in the order (d(x) desc, id asc), by a
                       distributed sort and a split at the cap; applied afterwards as a scalar filter
    finalize           final score and decision of a row (probe, or expert where it was called)
    facts              report figures (counts, per-group rows, statuses, reasons, histograms) as
                       partial aggregates per block, summed by a distributed groupby

Every function works on pyarrow batches with vectorised compute; no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage

__all__ = ["RESULT_SCHEMA", "QUARANTINE_SCHEMA", "EXPERT_CARRY", "Duplicates", "find_duplicates", "mark", "cap_boundary", "finalize",
           "facts", "collect_facts", "read", "write", "count_true", "HIST_BINS",
           "is_scored", "is_passing", "to_expert", "not_sent", "judged", "quarantined", "result_facts", "quarantine_facts", "ray_path",
           "REVIEW_SCHEMA", "REVIEW_LISTS", "top_rows", "review"]

# The scores table of a published run (results/*.parquet), one schema for every file.
RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("group", pa.string()), ("label", pa.int8()), ("source", pa.string()), ("truncated", pa.bool_()),
    ("tokens", pa.int32()), ("probe", pa.float64()), ("dv", pa.float64()), ("delegated", pa.bool_()), ("over_cap", pa.bool_()),
    ("expert", pa.float64()), ("expert_status", pa.string()), ("expert_truncated", pa.bool_()), ("final", pa.float64()),
    ("decision", pa.bool_()),
])
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string()), ("group", pa.string())])
# Stage-1 columns that travel through the expert stage with each delegated row, so that the expert's
# output is the delegated rows' own results (no join of expert scores back onto stage 1).
EXPERT_CARRY = ("id", "group", "label", "source", "truncated", "tokens", "probe", "dv")


# ----------------------------------------------------------------------------------------------
# reading and writing
# ----------------------------------------------------------------------------------------------
def ray_path(uri: str):
    """(path, filesystem) for Ray Data readers and writers: local paths as they are, object
    stores through s3fs (pyarrow's own S3 filesystem ignores custom endpoints)."""
    lp = storage.local_path(uri)
    if lp is not None:
        return lp, None
    fs, _ = storage.filesystem(uri)
    return uri, fs


def read(uris: list[str], columns: list[str] | None = None):
    """A lazy Ray Dataset over Parquet files (only ``columns`` are read)."""
    import ray

    # partitioning=None: the columns are the files' own, never parsed from a part=... folder name
    return ray.data.read_parquet([ray_path(u)[0] for u in uris], filesystem=ray_path(uris[0])[1], columns=columns, partitioning=None)


def write(ds, uri: str, rows_per_file: int | None = None, partition_cols: list[str] | None = None) -> None:
    """Write a dataset as Parquet files of at least ``rows_per_file`` rows (few, large files), in
    Hive-style folders ``<col>=<value>/`` per value of ``partition_cols`` (whose columns then live in
    the folder names only)."""
    import warnings

    path, fs = ray_path(uri)
    with warnings.catch_warnings():  # Ray 2.60 deprecates (for 2027) min_rows_per_file with partition_cols;
        warnings.simplefilter("ignore", DeprecationWarning)  # its replacement is a shuffle of every row
        ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_file, partition_cols=partition_cols)


def _valid(batch: pa.Table) -> pa.ChunkedArray:
    return pc.is_null(batch.column("error"))


def partitions(n_rows: int) -> int:
    """Hash partitions for a groupby or join: about 200k rows each, between 1 and 1024."""
    return max(1, min(1024, n_rows // 200_000 + 1))


def count_true(ds, columns: dict[str, Any]) -> dict[str, int]:
    """Counts of rows where each boolean expression holds, in one distributed pass.
    ``columns``: {name: fn(batch) -> boolean array}."""
    def part(batch: pa.Table) -> pa.Table:
        return _fact_rows("count", list(columns), [int(pc.sum(pc.cast(fn(batch), pa.int64())).as_py() or 0) for fn in columns.values()])

    f = facts(ds, part)
    return {n: f.get(("count", n), 0) for n in columns}


# ----------------------------------------------------------------------------------------------
# duplicate ids
# ----------------------------------------------------------------------------------------------
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
    return batch.filter(_valid(batch)).select(["id"])


def _keep_dups(batch: pa.Table) -> pa.Table:
    n = batch.column("count()")
    return pa.table({"id": batch.column("id"), "dup_n": pc.cast(n, pa.int64())}).filter(pc.greater(n, 1))


def find_duplicates(s1, *, broadcast_limit: int, size: int) -> Duplicates:
    """Duplicated ids among valid rows by a distributed groupby/count (hash-partitioned by id, into
    partitions sized for ``size`` rows). The driver receives the ids only when there are at most
    ``broadcast_limit`` of them."""
    import ray

    dups = (s1.select_columns(["id", "error"]).map_batches(_valid_ids, batch_format="pyarrow", batch_size=None)
            .groupby("id", num_partitions=partitions(size)).count()
            .map_batches(_keep_dups, batch_format="pyarrow", batch_size=None)).materialize()
    n_ids = dups.count()
    if n_ids <= broadcast_limit:
        tables = [t for t in ray.get(dups.to_arrow_refs()) if t.num_rows]
        if not tables:
            return Duplicates(0, 0)
        table = pa.concat_tables(tables).cast(pa.schema([("id", pa.string()), ("dup_n", pa.int64())]))
        return Duplicates(n_ids, int(pc.sum(table.column("dup_n")).as_py()), table=ray.put(table))
    n_rows = facts(dups, _dup_rows).get(("count", "rows"), 0)
    return Duplicates(n_ids, n_rows, dataset=dups, n_rows_hint=size)


def _dup_rows(batch: pa.Table) -> pa.Table:
    return _fact_rows("count", ["rows"], [int(pc.sum(batch.column("dup_n")).as_py() or 0)])


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


def _attach_dups(batch: pa.Table, dups_ref) -> pa.Table:
    table = _get(dups_ref)
    if "dup_n" in batch.column_names:
        return batch
    if table is None or table.num_rows == 0:
        return batch.append_column("dup_n", pa.nulls(batch.num_rows, pa.int64()))
    idx = pc.index_in(batch.column("id"), value_set=table.column("id"))
    n = pc.take(table.column("dup_n"), idx)
    n = pc.if_else(_valid(batch), n, pa.scalar(None, pa.int64()))  # invalid rows keep their own reason
    return batch.append_column("dup_n", n)


def _with_dups(s1, dups: Duplicates):
    if dups.broadcast:
        return s1.map_batches(_attach_dups, fn_kwargs={"dups_ref": dups.table}, batch_format="pyarrow", batch_size=None)
    joined = s1.join(dups.dataset, join_type="left_outer", on=("id",), num_partitions=partitions(dups.n_rows_hint))
    return joined.map_batches(_attach_dups, fn_kwargs={"dups_ref": None}, batch_format="pyarrow", batch_size=None)


# ----------------------------------------------------------------------------------------------
# the hard budget cap
# ----------------------------------------------------------------------------------------------
def _eligible(batch: pa.Table) -> pa.Table:
    return batch.filter(is_passing(batch)).select(["dv", "id"])


def cap_boundary(marked, cap: int) -> tuple[float, str] | None:
    """The first row over the cap in the order (d(x) descending, id ascending): the cap-th largest
    d(x) with ties broken by id, found by a distributed sort and a split at index ``cap``. Rows at or
    after it fall back to the probe. None when no row is over the cap."""
    ordered = marked.map_batches(_eligible, batch_format="pyarrow", batch_size=None).sort(["dv", "id"], descending=[True, False])
    _, rest = ordered.split_at_indices([cap])
    first = rest.take(1)
    if not first:
        return None
    return float(first[0]["dv"]), str(first[0]["id"])


def _over_cap(batch: pa.Table, boundary) -> pa.ChunkedArray:
    """Scalar filter: (dv, id) at or after the boundary in (dv desc, id asc) order."""
    if boundary is None:
        return pa.chunked_array([pa.array(np.zeros(batch.num_rows, dtype=bool))])
    dv_b, id_b = boundary
    dv = pc.fill_null(batch.column("dv"), -np.inf)
    ids = pc.fill_null(batch.column("id"), "")
    return pc.or_(pc.less(dv, dv_b), pc.and_(pc.equal(dv, dv_b), pc.greater_equal(ids, id_b)))


def _delegated(batch: pa.Table):
    """d(x) > λ* (false where stage 1 ran without the gate)."""
    if "delegated" not in batch.column_names:
        return pa.array(np.zeros(batch.num_rows, dtype=bool))
    return pc.fill_null(batch.column("delegated"), False)


def _mark(batch: pa.Table, boundary) -> pa.Table:
    """sent (to the expert) and over_cap for every row; ``dup_n`` must be attached."""
    threshold = pc.and_(pc.and_(_valid(batch), pc.is_null(batch.column("dup_n"))), _delegated(batch))
    over = pc.and_(threshold, _over_cap(batch, boundary))
    return batch.append_column("sent", pc.and_(threshold, pc.invert(over))).append_column("over_cap", over)


def mark(s1, dups: Duplicates, boundary=None):
    """Stage-1 rows with ``dup_n``, ``sent`` and ``over_cap`` (lazy)."""
    return _with_dups(s1, dups).map_batches(_mark, fn_kwargs={"boundary": boundary}, batch_format="pyarrow", batch_size=None)


# ----------------------------------------------------------------------------------------------
# selections
# ----------------------------------------------------------------------------------------------
def is_scored(batch: pa.Table):
    """Valid rows whose id is unique: they get a result."""
    return pc.and_(_valid(batch), pc.is_null(batch.column("dup_n")))


def is_passing(batch: pa.Table):
    """Scored rows whose d(x) passes λ* (before the cap)."""
    return pc.and_(is_scored(batch), _delegated(batch))


def to_expert(batch: pa.Table) -> pa.Table:
    """The rows to send to the expert, with their text and the columns they carry."""
    return batch.filter(batch.column("sent")).select(list(EXPERT_CARRY) + ["input", "is_chat"])


def not_sent(batch: pa.Table) -> pa.Table:
    """Scored rows that keep the probe's score (below λ*, or over the cap)."""
    keep = pc.and_(pc.and_(_valid(batch), pc.is_null(batch.column("dup_n"))), pc.invert(batch.column("sent")))
    b = batch.filter(keep)
    n = b.num_rows
    return (b.select(list(EXPERT_CARRY) + ["over_cap"])
            .append_column("delegated", pa.array(np.zeros(n, dtype=bool)))
            .append_column("expert", pa.nulls(n, pa.float64()))
            .append_column("expert_status", pa.nulls(n, pa.string()))
            .append_column("expert_truncated", pa.nulls(n, pa.bool_())))


def judged(batch: pa.Table) -> pa.Table:
    """Rows back from the expert stage, marked as sent within the cap."""
    n = batch.num_rows
    return batch.append_column("delegated", pa.array(np.ones(n, dtype=bool))).append_column("over_cap", pa.array(np.zeros(n, dtype=bool)))


def quarantined(batch: pa.Table) -> pa.Table:
    """Invalid rows with their reason, and every row of a duplicated id."""
    dup = pc.is_valid(batch.column("dup_n"))
    b = batch.filter(pc.or_(pc.invert(_valid(batch)), dup))
    reason = pc.binary_join_element_wise("duplicate id (", pc.cast(b.column("dup_n"), pa.string()), " rows share it)", "")
    err = pc.coalesce(b.column("error"), reason)
    return pa.table({"id": b.column("id"), "source": b.column("source"), "error": err, "group": b.column("group")}, schema=QUARANTINE_SCHEMA)


def finalize(batch: pa.Table, cascade: str = "switch", decision_threshold: float = 0.5) -> pa.Table:
    """final = the expert's score where it was called and answered usably, else the probe's; decision
    = final >= threshold. Columns as :data:`RESULT_SCHEMA`."""
    probe = batch.column("probe").to_numpy(zero_copy_only=False).astype(float)
    expert = pc.fill_null(pc.cast(batch.column("expert"), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    usable = _answered(batch)
    final = np.where(usable, expert if cascade == "switch" else 0.5 * (probe + expert), probe)
    cols = {name: batch.column(name) for name in RESULT_SCHEMA.names if name in batch.column_names}
    cols["final"] = pa.array(final)
    cols["decision"] = pa.array(final >= decision_threshold)
    n = batch.num_rows  # a column an older writer did not have (e.g. expert_truncated) is null
    return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in RESULT_SCHEMA}).cast(RESULT_SCHEMA)


# ----------------------------------------------------------------------------------------------
# report figures as distributed aggregates
# ----------------------------------------------------------------------------------------------
HIST_BINS = {"dv": np.linspace(-1.25, 1.25, 51), "probe": np.linspace(0, 1, 51), "final": np.linspace(0, 1, 51)}
_FACT_SCHEMA = pa.schema([("kind", pa.string()), ("key", pa.string()), ("n", pa.int64())])


def _hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    v = values[np.isfinite(values)]
    return np.bincount(np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2), minlength=len(edges) - 1)


def _fact_rows(kind: str, keys, counts) -> pa.Table:
    return pa.table({"kind": pa.array([kind] * len(keys), pa.string()), "key": pa.array(keys, pa.string()),
                     "n": pa.array(counts, pa.int64())})


def _group_counts(kind: str, keys: pa.ChunkedArray, weights: np.ndarray | None = None) -> pa.Table:
    if kind.startswith("group"):  # no group and an empty group are one "(none)" row, as before
        keys = pc.if_else(pc.equal(pc.fill_null(keys, ""), ""), pa.scalar(None, pa.string()), keys)
    keys = pc.fill_null(keys, "\x00none")
    t = pa.table({"k": keys, "w": pa.array(np.ones(len(keys), dtype=np.int64) if weights is None else weights.astype(np.int64))})
    g = t.group_by("k").aggregate([("w", "sum")])
    return _fact_rows(kind, g.column("k").to_pylist(), g.column("w_sum").to_pylist())


def _answered(batch: pa.Table) -> np.ndarray:
    """Rows whose final score is the expert's: delegated and answered usably (as :func:`finalize`)."""
    sent = np.asarray(batch.column("delegated").to_numpy(zero_copy_only=False), dtype=bool)
    expert = pc.fill_null(pc.cast(batch.column("expert"), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    status = pc.fill_null(batch.column("expert_status"), "")
    ok = pc.or_(pc.equal(status, "ok"), pc.ends_with(status, "_outside_topk")).to_numpy(zero_copy_only=False)
    return sent & np.isfinite(expert) & np.asarray(ok, dtype=bool)


def result_facts(batch: pa.Table, decision_threshold: float = 0.5) -> pa.Table:
    """Partial report figures of a block of results rows."""
    b = lambda c: np.asarray(batch.column(c).to_numpy(zero_copy_only=False), dtype=bool)  # noqa: E731
    f = lambda c: pc.fill_null(pc.cast(batch.column(c), pa.float64()), np.nan).to_numpy(zero_copy_only=False)  # noqa: E731
    deleg, dec = b("delegated"), b("decision")
    cut = b("expert_truncated") if "expert_truncated" in batch.column_names else np.zeros(batch.num_rows, dtype=bool)
    answered = _answered(batch)  # the final score is the expert's
    probe_says = f("probe") >= decision_threshold
    tokens = pc.fill_null(batch.column("tokens"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    parts = [_fact_rows("count", ["rows", "delegated", "over_cap", "truncated", "unsafe", "expert_truncated", "unsafe_by_judge",
                                  "judge_overruled", "judged_tokens"],
                        [batch.num_rows, int(deleg.sum()), int(b("over_cap").sum()), int(b("truncated").sum()), int(dec.sum()),
                         int(cut.sum()), int((dec & answered).sum()), int((answered & (probe_says != dec)).sum()),
                         int(tokens[deleg].sum())]),
             _group_counts("group_rows", batch.column("group")),
             _group_counts("group_delegated", batch.column("group"), deleg),
             _group_counts("group_unsafe", batch.column("group"), dec),
             _group_counts("status", batch.column("expert_status"))]
    for col, edges in HIST_BINS.items():
        h = _hist(f(col), edges)
        parts.append(_fact_rows(f"hist_{col}", [f"{i:03d}" for i in range(len(h))], h.tolist()))
    return pa.concat_tables(parts)


def quarantine_facts(batch: pa.Table) -> pa.Table:
    # the reason without its detail: "malformed JSON (Expecting value at column 5)" → "malformed JSON"
    short = pc.replace_substring_regex(pc.fill_null(batch.column("error"), ""), pattern=r"(?s) \(.*", replacement="", max_replacements=1)
    return pa.concat_tables([_fact_rows("count", ["quarantined"], [batch.num_rows]), _group_counts("reason", short)])


def _sum_facts(*tables: pa.Table) -> pa.Table:
    """Partial figures (kind, key, n) summed by (kind, key): the same schema in and out, so sums of
    sums work (the reduction is a tree)."""
    parts = [x.cast(_FACT_SCHEMA) for x in tables if x.num_rows]
    t = pa.concat_tables(parts) if parts else _FACT_SCHEMA.empty_table()
    g = t.group_by(["kind", "key"]).aggregate([("n", "sum")])
    return pa.table({"kind": g.column("kind"), "key": g.column("key"), "n": g.column("n_sum")}, schema=_FACT_SCHEMA)


def facts(ds, fn) -> dict[tuple[str, str], int]:
    """Sum the partial figures ``fn`` makes of each block: {(kind, key): n}. ``ds`` may be a list of
    (dataset, fn) pairs, run as one union. The partials (a few rows per block) are summed by a
    Ray task; the driver receives one row per distinct (kind, key): counts, groups, statuses,
    reasons and histogram bins."""
    import ray

    pairs = ds if isinstance(ds, list) else [(ds, fn)]
    parts = [d.map_batches(lambda b, f=f: f(b).cast(_FACT_SCHEMA), batch_format="pyarrow", batch_size=None) for d, f in pairs]
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    t = _tree(union.to_arrow_refs(), _sum_facts) or _FACT_SCHEMA.empty_table()
    return {(k, key): int(n) for k, key, n in zip(t.column("kind").to_pylist(), t.column("key").to_pylist(), t.column("n").to_pylist())}


def _tree(refs: list, merge) -> pa.Table | None:
    """Reduce the tables behind ``refs`` with ``merge(*tables) -> table`` in a tree of Ray tasks
    (at most 64 tables per task), so that the driver receives one small table."""
    import ray

    while len(refs) > 1:
        refs = [ray.remote(merge).remote(*refs[i:i + 64]) for i in range(0, len(refs), 64)]
    return merge(ray.get(refs[0])) if refs else None


# ----------------------------------------------------------------------------------------------
# the review list: the rows a person should look at first, by a distributed top-k
# ----------------------------------------------------------------------------------------------
REVIEW_SCHEMA = pa.schema([
    ("list", pa.string()), ("rank", pa.int32()), ("id", pa.string()), ("group", pa.string()), ("probe", pa.float64()),
    ("dv", pa.float64()), ("expert", pa.float64()), ("final", pa.float64()), ("decision", pa.bool_()), ("delegated", pa.bool_()),
    ("expert_status", pa.string()), ("reason", pa.string()), ("source", pa.string()), ("excerpt", pa.string()),
])
REVIEW_LISTS = {  # list name: (which rows, ordered by what, descending; ties by id)
    "flagged": "flagged unsafe, highest final score first",
    "disagreement": "the judge overruled the probe, largest change of score first",
}
_TOP_COLUMNS = ["id", "group", "probe", "dv", "expert", "final", "decision", "delegated", "expert_status"]


def _candidates(batch: pa.Table, which: str, decision_threshold: float) -> pa.Table:
    f = lambda c: pc.fill_null(pc.cast(batch.column(c), pa.float64()), np.nan).to_numpy(zero_copy_only=False)  # noqa: E731
    dec = np.asarray(batch.column("decision").to_numpy(zero_copy_only=False), dtype=bool)
    if which == "flagged":
        mask, key = dec, f("final")
    else:
        mask, key = _answered(batch) & ((f("probe") >= decision_threshold) != dec), np.abs(f("final") - f("probe"))
    return batch.select(_TOP_COLUMNS).filter(pa.array(mask)).append_column("key", pa.array(key[mask], pa.float64()))


def _top(k: int, *tables: pa.Table) -> pa.Table:
    t = pa.concat_tables(tables)
    return t.take(pc.sort_indices(t, sort_keys=[("key", "descending"), ("id", "ascending")])[:k])


def top_rows(ds, which: str, k: int, decision_threshold: float = 0.5) -> pa.Table:
    """The ``k`` rows of a results dataset first in review list ``which`` (:data:`REVIEW_LISTS`):
    each block keeps its own top k, a tree of tasks merges them; the driver gets k rows."""
    local = ds.map_batches(lambda b: _top(k, _candidates(b, which, decision_threshold)), batch_format="pyarrow", batch_size=None)
    t = _tree(local.to_arrow_refs(), lambda *ts: _top(k, *ts))
    return t.drop_columns(["key"]) if t is not None else None


def _spread(k: int, *tables: pa.Table) -> pa.Table:
    """Up to ``k`` quarantined rows spread over the reasons (the reason without its detail): the
    first row of each reason, then the second of each, and so on, in reason order."""
    t = pa.concat_tables(tables)
    if t.num_rows <= k:
        return t
    short = pc.replace_substring_regex(pc.fill_null(t.column("error"), ""), pattern=r"(?s) \(.*", replacement="", max_replacements=1)
    reasons = np.asarray(short.to_pylist(), dtype=object)
    order = np.argsort(reasons, kind="stable")
    sorted_r = reasons[order]
    starts = np.r_[0, np.flatnonzero(sorted_r[1:] != sorted_r[:-1]) + 1]
    within = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # rank of each row within its reason
    pick = order[np.lexsort((sorted_r, within))][:k]
    return t.take(pa.array(np.sort(pick)))


def _lookup(batch: pa.Table, ids: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(ids, pa.string())))


def review(results: list[str], quarantine: list[str], stage1: list[str], k: int, decision_threshold: float = 0.5,
           excerpt_chars: int = 160) -> pa.Table:
    """The review list (:data:`REVIEW_SCHEMA`): the top ``k`` rows of each :data:`REVIEW_LISTS`
    list, with their redacted excerpt from stage 1 (the ``excerpt`` column the activation stage
    wrote for flagged and delegated rows; none when stage 1 has no such column, e.g. a stage 1
    resumed from before excerpts, or ``excerpt_chars`` is 0), cut to ``excerpt_chars``; and up to
    ``k`` quarantined rows with their reason and source, spread over the reasons. The driver holds
    at most 3k rows; the excerpts are found by one filtered pass over stage 1's two columns."""
    import ray

    from ..tables import parquet_schema

    excerpts = excerpt_chars > 0 and bool(stage1) and "excerpt" in parquet_schema(stage1[0]).names

    parts = []
    for which in REVIEW_LISTS if results else ():
        t = top_rows(read(results), which, k, decision_threshold)
        if t is not None and t.num_rows:
            n = t.num_rows
            parts.append(t.append_column("list", pa.array([which] * n)).append_column("rank", pa.array(np.arange(1, n + 1, dtype=np.int32))))
    ids = sorted({i for t in parts for i in t.column("id").to_pylist()})
    text: dict[str, str] = {}
    if ids and excerpts and stage1:
        found = read(stage1, ["id", "excerpt"]).map_batches(_lookup, fn_kwargs={"ids": ids}, batch_format="pyarrow", batch_size=None)
        for t in ray.get(found.to_arrow_refs()):
            text.update({i: e if len(e) <= excerpt_chars else e[: max(excerpt_chars - 1, 0)].rstrip() + "…"
                         for i, e in zip(t.column("id").to_pylist(), t.column("excerpt").to_pylist()) if e is not None})
    out = []
    for t in parts:
        out.append(t.append_column("excerpt", pa.array([text.get(i) for i in t.column("id").to_pylist()], pa.string())))
    if quarantine and k:
        local = read(quarantine, ["id", "source", "group", "error"]).map_batches(lambda b: _spread(k, b), batch_format="pyarrow", batch_size=None)
        q = _tree(local.to_arrow_refs(), lambda *ts: _spread(k, *ts))
        n = q.num_rows
        out.append(pa.table({"list": pa.array(["quarantined"] * n), "rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
                             "id": q.column("id"), "source": q.column("source"), "group": q.column("group"), "reason": q.column("error")}))
    n0 = lambda t, f: t.column(f.name) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)  # noqa: E731
    tables = [pa.table({f.name: n0(t, f) for f in REVIEW_SCHEMA}).cast(REVIEW_SCHEMA) for t in out]
    return pa.concat_tables(tables) if tables else REVIEW_SCHEMA.empty_table()


def collect_facts(f: dict, kind: str) -> dict[str, int]:
    return {("(none)" if k == "\x00none" else k): n for (kd, k), n in f.items() if kd == kind}
