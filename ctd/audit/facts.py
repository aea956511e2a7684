"""The night's figures, as distributed aggregates: what the report says, counted over every row.

Each block of results and quarantine rows becomes a few partial counts (:func:`result_counts`,
:func:`quarantine_counts`: pure pyarrow functions of a batch), summed by a tree of Ray tasks; the
driver receives one row per distinct count and builds :class:`Facts` from them.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..pipeline.raydata import Tally, read, tally, tally_by, tally_rows
from ..stats.cascade import Cascade
from ..stats.quality import ESTIMATES, Sums, subset_sums
from .results import RESULT_SCHEMA, Rows, answered

__all__ = [
    "HIST_BINS",
    "COUNTS",
    "FIXED_POINT",
    "Facts",
    "GroupFacts",
    "QualityView",
    "quality_view",
    "control_rows",
    "result_counts",
    "quarantine_counts",
    "short_reason",
    "collect",
]

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
    "judged",
    "control",
    "control_only",
    "control_tokens",
)
# Each quality estimate (:mod:`ctd.stats.quality`) combines the control rows' verdicts with sums of its
# predictor over every row of its set (:func:`ctd.stats.quality.subset_sums`): tallied per group, in
# fixed point (integer tallies), and added up on the driver.
FIXED_POINT = 1_000_000


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
    control = b("control") if "control" in batch.column_names else np.zeros(batch.num_rows, dtype=bool)
    extra = control & ~deleg  # judged only because of the control sample: counted apart from the delegated
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
        int((deleg | control).sum()),
        int(control.sum()),
        int(extra.sum()),
        int(tokens[extra].sum()),
    ]
    parts = [
        tally_rows("count", list(COUNTS), counts),
        tally_by("group_rows", batch.column("group")),
        tally_by("group_delegated", batch.column("group"), deleg),
        tally_by("group_unsafe", batch.column("group"), dec),
        tally_by("status", batch.column("expert_status")),
    ]
    view = quality_view(batch, cascade)
    groups = pc.if_else(
        pc.equal(pc.fill_null(batch.column("group"), ""), ""), pa.scalar(None, pa.string()), batch.column("group")
    )
    for name in ESTIMATES:
        sums = subset_sums(
            name, view.score, view.flagged, view.delegated, view.verdict, published=view.published, group=groups.to_pylist()
        )
        keys = list(sums)
        parts += [
            tally_rows(f"q_{name}_n", keys, [s.n for s in sums.values()]),
            tally_rows(f"q_{name}_s1", keys, [round(s.sum_f * FIXED_POINT) for s in sums.values()]),
            tally_rows(f"q_{name}_s2", keys, [round(s.sum_f2 * FIXED_POINT) for s in sums.values()]),
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
class QualityView:
    """A block of results as the quality estimates see it: the probe's score, its decision, whether
    the row was delegated, the judge's verdict (1 unsafe, 0 safe, NaN: not judged or no usable
    answer) and the published decision of the cascade as calibrated (without the control sample)."""

    score: np.ndarray
    flagged: np.ndarray
    delegated: np.ndarray
    verdict: np.ndarray
    published: np.ndarray


def quality_view(batch: pa.Table, cascade: Cascade = Cascade()) -> QualityView:
    """:class:`QualityView` of a block of results rows (or of the control rows)."""
    f = lambda c: pc.fill_null(pc.cast(batch.column(c), pa.float64()), np.nan).to_numpy(zero_copy_only=False)  # noqa: E731
    probe, expert = np.clip(np.nan_to_num(f("probe"), nan=0.0), 0, 1), f("expert")
    deleg = np.asarray(pc.fill_null(batch.column("delegated"), False).to_numpy(zero_copy_only=False), dtype=bool)
    usable_ = answered(batch)
    verdict = np.where(usable_, cascade.decide(np.nan_to_num(expert)).astype(float), np.nan)
    published = cascade.decide(cascade.final(probe, expert, usable_ & deleg))  # as calibrated: the sample's verdicts left out
    return QualityView(probe, cascade.decide(probe), deleg, verdict, published)


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
    quality_sums: dict[str, dict[str | None, Sums]] = dataclasses.field(default_factory=dict)  # estimate → group → sums

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    @classmethod
    def from_tally(cls, t: Tally) -> Facts:
        rows, deleg, unsafe = t.by("group_rows"), t.by("group_delegated"), t.by("group_unsafe")
        groups = {g: GroupFacts(n, deleg.get(g, 0), unsafe.get(g, 0)) for g, n in rows.items()}
        sums = {
            name: {
                g: Sums(n, t.get(f"q_{name}_s1", g) / FIXED_POINT, t.get(f"q_{name}_s2", g) / FIXED_POINT)
                for g, n in t.by(f"q_{name}_n").items()
            }
            for name in ESTIMATES
        }
        hist = {c: np.array([t.get(f"hist_{c}", f"{j:03d}") for j in range(len(e) - 1)]) for c, e in HIST_BINS.items()}
        statuses = {k: n for k, n in t.by("status").items() if k is not None}
        return cls(
            {k: n for k, n in t.by("count").items() if k is not None},
            groups,
            statuses,
            {k or "": n for k, n in t.by("reason").items()},
            hist,
            sums,
        )


def collect(rows: Rows, cascade: Cascade) -> Facts:
    """The figures of the run's results and quarantine, in one distributed pass."""
    parts = ([(read(rows.results), functools.partial(result_counts, cascade=cascade))] if rows.results else []) + (
        [(read(rows.quarantine), quarantine_counts)] if rows.quarantine else []
    )
    return Facts.from_tally(tally(parts) if parts else Tally({}))


CONTROL_COLUMNS = ["group", "probe", "delegated", "over_cap", "control", "expert", "expert_status", "final", "decision"]


def _control_only_rows(batch: pa.Table) -> pa.Table:
    if "control" not in batch.column_names:
        return batch.select([c for c in CONTROL_COLUMNS if c in batch.column_names]).slice(0, 0)
    return batch.filter(pc.fill_null(batch.column("control"), False)).select(CONTROL_COLUMNS)


def control_rows(rows: Rows) -> pa.Table:
    """The control sample's rows (a few of their columns), for the estimates: their number is bounded
    by ``audit.control_ceiling`` (in expectation), not by the night's rows."""
    import ray

    empty = pa.schema([RESULT_SCHEMA.field(c) for c in CONTROL_COLUMNS]).empty_table()
    if not rows.results:
        return empty
    ds = read(rows.results, CONTROL_COLUMNS).map_batches(_control_only_rows, batch_format="pyarrow", batch_size=None)
    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(parts) if parts else empty
