"""The night's figures, as distributed aggregates: what the report says, counted over every row.

Each block of results and quarantine rows becomes a few partial counts (:func:`result_counts`,
:func:`quarantine_counts`: pure pyarrow functions of a batch), summed by a tree of Ray tasks; the
driver receives one row per distinct count and builds :class:`Facts` from them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..pipeline.raydata import Tally, read, tally, tally_by, tally_rows
from ..stats.cascade import Cascade
from .results import Rows, answered

__all__ = ["HIST_BINS", "COUNTS", "Facts", "GroupFacts", "result_counts", "quarantine_counts", "short_reason", "collect"]

HIST_BINS = {"dv": np.linspace(-1.25, 1.25, 51), "probe": np.linspace(0, 1, 51), "final": np.linspace(0, 1, 51)}
COUNTS = (
    "rows",
    "delegated",
    "over_cap",
    "truncated",
    "unsafe",
    "expert_truncated",
    "unsafe_by_judge",
    "judge_overruled",
    "judged_tokens",
)


def short_reason(errors: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A quarantine reason without its detail: "malformed JSON (Expecting value at column 5)" →
    "malformed JSON" (an Arrow string array in, one out)."""
    return pc.replace_substring_regex(pc.fill_null(errors, ""), pattern=r"(?s) \(.*", replacement="", max_replacements=1)


def _hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    v = values[np.isfinite(values)]
    return np.bincount(np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2), minlength=len(edges) - 1)


def result_counts(batch: pa.Table, cascade: Cascade = Cascade()) -> pa.Table:
    """Partial figures of a block of results rows."""
    b = lambda c: np.asarray(batch.column(c).to_numpy(zero_copy_only=False), dtype=bool)  # noqa: E731
    f = lambda c: pc.fill_null(pc.cast(batch.column(c), pa.float64()), np.nan).to_numpy(zero_copy_only=False)  # noqa: E731
    deleg, dec = b("delegated"), b("decision")
    by_judge = answered(batch)  # the final score is the expert's
    probe_says = cascade.decide(f("probe"))
    tokens = pc.fill_null(batch.column("tokens"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    cut = np.asarray(pc.fill_null(batch.column("expert_truncated"), False).to_numpy(zero_copy_only=False), dtype=bool)
    counts = [
        batch.num_rows,
        int(deleg.sum()),
        int(b("over_cap").sum()),
        int(b("truncated").sum()),
        int(dec.sum()),
        int(cut.sum()),
        int((dec & by_judge).sum()),
        int((by_judge & (probe_says != dec)).sum()),
        int(tokens[deleg].sum()),
    ]
    parts = [
        tally_rows("count", list(COUNTS), counts),
        tally_by("group_rows", batch.column("group")),
        tally_by("group_delegated", batch.column("group"), deleg),
        tally_by("group_unsafe", batch.column("group"), dec),
        tally_by("status", batch.column("expert_status")),
    ]
    for col, edges in HIST_BINS.items():
        h = _hist(f(col), edges)
        parts.append(tally_rows(f"hist_{col}", [f"{i:03d}" for i in range(len(h))], h.tolist()))
    return pa.concat_tables(parts)


def quarantine_counts(batch: pa.Table) -> pa.Table:
    return pa.concat_tables(
        [tally_rows("count", ["quarantined"], [batch.num_rows]), tally_by("reason", short_reason(batch.column("error")))]
    )


@dataclass(frozen=True)
class GroupFacts:
    rows: int
    delegated: int
    unsafe: int


@dataclass(frozen=True)
class Facts:
    """The night's counts: ``counts`` (:data:`COUNTS` and ``quarantined``), per group (None: no
    group), per expert status (judged rows only), per quarantine reason, and histograms."""

    counts: dict[str, int]
    groups: dict[str | None, GroupFacts]
    statuses: dict[str, int]
    reasons: dict[str, int]
    histograms: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    @classmethod
    def from_tally(cls, t: Tally) -> Facts:
        rows, deleg, unsafe = t.by("group_rows"), t.by("group_delegated"), t.by("group_unsafe")
        groups = {g: GroupFacts(n, deleg.get(g, 0), unsafe.get(g, 0)) for g, n in rows.items()}
        hist = {c: np.array([t.get(f"hist_{c}", f"{j:03d}") for j in range(len(e) - 1)]) for c, e in HIST_BINS.items()}
        statuses = {k: n for k, n in t.by("status").items() if k is not None}
        return cls(
            {k: n for k, n in t.by("count").items() if k is not None},
            groups,
            statuses,
            {k or "": n for k, n in t.by("reason").items()},
            hist,
        )


def collect(rows: Rows, cascade: Cascade) -> Facts:
    """The figures of the run's results and quarantine, in one distributed pass."""
    parts = ([(read(rows.results), functools.partial(result_counts, cascade=cascade))] if rows.results else []) + (
        [(read(rows.quarantine), quarantine_counts)] if rows.quarantine else []
    )
    return Facts.from_tally(tally(parts) if parts else Tally({}))
