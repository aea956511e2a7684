"""The review list: the rows a person should look at first, found by a distributed top-k.

    flagged         flagged unsafe, highest final score first, then the probe's score
    missed          the judge calls unsafe what the probe alone would have passed, largest change first
    false_alarm     the probe flagged what the judge calls safe, largest change first
    control         the same on the control sample: rows the probe decided alone and got wrong
    quarantined     a sample of the quarantined rows, spread over the reasons

Each block keeps its own top 4k and a tree of tasks merges them, so the driver holds at most 4k rows a
list. Excerpts come from stage 1 (credentials redacted there, for the rows the probe flags or
delegates); here repeats are folded into one row with a count (the same words, ignoring case, digits,
punctuation and spacing), personal data is taken out and the excerpt cut to the report's length.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..pipeline.raydata import read, tree_reduce
from ..pipeline.scoring import Stage1
from ..reporting.redact import shown
from ..stats.cascade import Cascade
from .facts import short_reason
from .report import REVIEW_LISTS
from .results import Rows, answered
from .specs import ReportSpec

__all__ = [
    "REVIEW_SCHEMA",
    "REVIEW_LISTS",
    "FOLD_POOL",
    "candidates",
    "top",
    "spread",
    "fold_key",
    "fold_keys",
    "fold",
    "review",
    "review_night",
]

REVIEW_SCHEMA = pa.schema(
    [
        ("list", pa.string()),
        ("rank", pa.int32()),
        ("id", pa.string()),
        ("group", pa.string()),
        ("probe", pa.float64()),
        ("dv", pa.float64()),
        ("expert", pa.float64()),
        ("final", pa.float64()),
        ("decision", pa.bool_()),
        ("delegated", pa.bool_()),
        ("expert_status", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
        ("excerpt", pa.string()),
        ("similar", pa.int32()),  # rows of this list's top ones folded into this one (itself included)
    ]
)
_TOP_COLUMNS = ["id", "group", "probe", "dv", "expert", "final", "decision", "delegated", "expert_status"]


def candidates(batch: pa.Table, which: str, cascade: Cascade = Cascade()) -> pa.Table:
    """The rows of a batch of results that belong in list ``which``, with their sort keys ``key`` and
    ``key2`` (the probe's score: it varies where the judge's scores tie, e.g. at 1)."""
    f = lambda c: pc.fill_null(pc.cast(batch.column(c), pa.float64()), np.nan).to_numpy(zero_copy_only=False)  # noqa: E731
    dec = np.asarray(batch.column("decision").to_numpy(zero_copy_only=False), dtype=bool)
    probe_says = cascade.decide(f("probe"))
    if which == "flagged":
        mask, key = dec, f("final")
    else:  # the judge's verdict differs from the probe's: on any judged row, or on the control sample's
        mask, key = answered(batch) & (probe_says != dec), np.abs(f("final") - f("probe"))
        if which == "missed":
            mask &= dec
        elif which == "false_alarm":
            mask &= ~dec
        elif which == "control":
            mask &= np.asarray(pc.fill_null(batch.column("control"), False).to_numpy(zero_copy_only=False), dtype=bool)
    t = batch.select(_TOP_COLUMNS).filter(pa.array(mask)).append_column("key", pa.array(key[mask], pa.float64()))
    return t.append_column("key2", pa.array(f("probe")[mask], pa.float64()))


def top(k: int, *tables: pa.Table) -> pa.Table:
    """The first ``k`` rows by ``key`` descending, then ``key2`` descending, then id."""
    t = pa.concat_tables(tables)
    return t.take(pc.sort_indices(t, sort_keys=[("key", "descending"), ("key2", "descending"), ("id", "ascending")])[:k])


def top_per_list(k: int, *tables: pa.Table) -> pa.Table:
    """:func:`top` of each list (the ``list`` column) of some candidate tables."""
    t = pa.concat_tables(tables)
    parts = [top(k, t.filter(pc.equal(t.column("list"), which))) for which in REVIEW_LISTS]
    return pa.concat_tables(parts)


def _candidates_of_every_list(batch: pa.Table, k: int, cascade: Cascade) -> pa.Table:
    parts = [candidates(batch, which, cascade) for which in REVIEW_LISTS]
    return top_per_list(
        k, *(p.append_column("list", pa.array([which] * p.num_rows, pa.string())) for which, p in zip(REVIEW_LISTS, parts))
    )


def spread(k: int, *tables: pa.Table) -> pa.Table:
    """Up to ``k`` quarantined rows spread over the reasons (the reason without its detail): the
    first row of each reason, then the second of each, and so on, in reason order."""
    t = pa.concat_tables(tables)
    if t.num_rows <= k:
        return t
    reasons = np.asarray(short_reason(t.column("error")).to_pylist(), dtype=object)
    order = np.argsort(reasons, kind="stable")
    sorted_r = reasons[order]
    starts = np.r_[0, np.flatnonzero(sorted_r[1:] != sorted_r[:-1]) + 1]
    within = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # rank of each row within its reason
    pick = order[np.lexsort((sorted_r, within))][:k]
    return t.take(pa.array(np.sort(pick)))


def _top_rows(results: list[str], k: int, cascade: Cascade) -> pa.Table | None:
    """The top ``k`` rows of every list, in one pass: each block's own tops, merged by a tree of tasks."""
    local = read(results).map_batches(
        _candidates_of_every_list, fn_kwargs={"k": k, "cascade": cascade}, batch_format="pyarrow", batch_size=None
    )
    t = tree_reduce(local.to_arrow_refs(), lambda *ts: top_per_list(k, *ts))
    return t.drop_columns(["key", "key2"]) if t is not None else None


def _lookup(batch: pa.Table, ids: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(ids, pa.string())))


# each list's top FOLD_POOL × k rows are read, repeats folded into their first row, and the first k kept
FOLD_POOL = 4
_WORDS = re.compile(r"[^\W\d_]+")


# A capitalised word inside a sentence (not its first word): a name or a proper noun, the slot a template fills
# in ("Tomas was robbed in Tbilisi", "Ada was robbed in Lisbon"). The first word of the text, of a sentence
# or of a chat turn ("user: Hi") is an ordinary word.
_NAME_SLOT = re.compile(r"(?<=\s)(?<![.!?:\n]\s)[A-Z][\w'\-]*")


def fold_key(excerpt: str | None, rid: str) -> str:
    """Rows whose excerpts have the same words, case, digits, punctuation, spacing and names aside (a
    capitalised word inside a sentence stands for any other), fold into one; a row without an excerpt
    folds with none. Only names and numbers may differ: "kill a process" and "kill a person", or a safe and
    a lethal dose, stay apart."""
    if not excerpt:
        return "\x00" + rid
    return " ".join(_WORDS.findall(_NAME_SLOT.sub(" name ", excerpt).lower()))


def fold_keys(excerpts: list[str | None], ids: list[str]) -> list[str]:
    """:func:`fold_key` of each row."""
    return [fold_key(e, i) for e, i in zip(excerpts, ids)]


def fold(t: pa.Table, keys: list[str], k: int) -> pa.Table:
    """The first row of each key in ``t``'s order (its rank order), with ``similar``: how many rows of
    ``t`` have that key (itself included); the first ``k`` of them."""
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    counts = Counter(keys)
    keep = sorted(first.values())[:k]
    return t.take(pa.array(keep, pa.int64())).append_column("similar", pa.array([counts[keys[i]] for i in keep], pa.int32()))


def review(
    results: list[str], quarantine: list[str], stage1: list[str], k: int, cascade: Cascade, excerpt_chars: int
) -> pa.Table:
    """The review list (:data:`REVIEW_SCHEMA`): the top ``k`` rows of each :data:`REVIEW_LISTS` list
    with their excerpt (stage 1's, personal data out, cut to ``excerpt_chars``; none when it is 0),
    repeats (names and numbers aside) among the list's top :data:`FOLD_POOL` × ``k`` folded into one row
    with their count (:func:`fold_keys`, :func:`fold`), and up to ``k`` quarantined rows with their reason and source, spread over the reasons."""
    import ray

    tops = _top_rows(results, FOLD_POOL * k, cascade) if results else None
    lists = [tops.filter(pc.equal(tops.column("list"), which)) for which in REVIEW_LISTS] if tops is not None else []
    ids = sorted({i for t in lists for i in t.column("id").to_pylist()})
    raw: dict[str, str] = {}
    if ids and excerpt_chars > 0 and stage1:
        found = read(stage1, ["id", "excerpt"]).map_batches(
            _lookup, fn_kwargs={"ids": ids}, batch_format="pyarrow", batch_size=None
        )
        for t in ray.get(found.to_arrow_refs()):
            raw.update({i: e for i, e in zip(t.column("id").to_pylist(), t.column("excerpt").to_pylist()) if e is not None})
    out = []
    for t in lists:
        ids_t = t.column("id").to_pylist()
        t = fold(t, fold_keys([raw.get(i) for i in ids_t], ids_t), k)
        if t.num_rows:
            excerpts = [shown(raw.get(i), excerpt_chars) for i in t.column("id").to_pylist()]
            t = t.append_column("rank", pa.array(np.arange(1, t.num_rows + 1, dtype=np.int32)))
            out.append(t.append_column("excerpt", pa.array(excerpts, pa.string())))
    if quarantine and k:
        local = read(quarantine, ["id", "source", "group", "error"]).map_batches(
            lambda b: spread(k, b), batch_format="pyarrow", batch_size=None
        )
        q = tree_reduce(local.to_arrow_refs(), lambda *ts: spread(k, *ts))
        n = q.num_rows
        out.append(
            pa.table(
                {
                    "list": pa.array(["quarantined"] * n),
                    "rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
                    "id": q.column("id"),
                    "source": q.column("source"),
                    "group": q.column("group"),
                    "reason": q.column("error"),
                }
            )
        )
    column = lambda t, f: t.column(f.name) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)  # noqa: E731
    tables = [pa.table({f.name: column(t, f) for f in REVIEW_SCHEMA}).cast(REVIEW_SCHEMA) for t in out]
    return pa.concat_tables(tables) if tables else REVIEW_SCHEMA.empty_table()


def review_night(rows: Rows, stage1: Stage1, spec: ReportSpec, cascade: Cascade) -> pa.Table | None:
    """The night's review list as the report asks for it (None when ``audit.review_rows`` is 0)."""
    if not spec.review_rows:
        return None
    return review(rows.results, rows.quarantine, stage1.files, spec.review_rows, cascade, spec.excerpt_chars)
