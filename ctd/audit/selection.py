"""Which audited rows go to the expert: duplicates out, λ*'s gate, and the hard budget cap.

    cap_rows       the cap in rows: ceil(budget_cap × audited rows)                         (arithmetic)
    cap_boundary   the first row over the cap in the order (d(x) desc, id asc): a distributed sort
                   and a split at the cap; the driver gets one row
    mark           ``sent`` / ``over_cap`` on every row, the cap applied as a scalar filter
    select         the night's selection: counts on the driver, the marked rows lazy

Every per-row step is a vectorised pyarrow function of a batch (unit-tested without Ray); the
distributed parts only map them over blocks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..log import log
from ..pipeline.dedup import Duplicates, census, is_scored, with_duplicates
from ..pipeline.raydata import read
from ..pipeline.scoring import Stage1
from .specs import SelectionSpec

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "STAGE1_COLUMNS",
    "cap_rows",
    "delegated",
    "over_cap",
    "mark_batch",
    "is_passing",
    "cap_boundary",
    "Selection",
    "select",
]

# stage-1 columns the audit reads back (never the pooled vectors); the text only for the expert
STAGE1_COLUMNS = ["id", "group", "label", "source", "error", "truncated", "probe", "dv", "delegated", "tokens"]


def cap_rows(budget_cap: float | None, audited: int) -> int | None:
    """The hard cap in rows: at most ceil(budget_cap × audited rows) expert calls; None without a cap."""
    return None if budget_cap is None else int(math.ceil(budget_cap * audited))


def delegated(batch: pa.Table) -> pa.Array | pa.ChunkedArray:
    """d(x) > λ* (false where stage 1 ran without the gate)."""
    if "delegated" not in batch.column_names:
        return pa.array(np.zeros(batch.num_rows, dtype=bool))
    return pc.fill_null(batch.column("delegated"), False)


def is_passing(batch: pa.Table) -> pa.ChunkedArray:
    """Scored rows whose d(x) passes λ* (before the cap)."""
    return pc.and_(is_scored(batch), delegated(batch))


def over_cap(batch: pa.Table, boundary: tuple[float, str] | None) -> pa.Array | pa.ChunkedArray:
    """Scalar filter: (d(x), id) at or after the boundary in (d(x) desc, id asc) order."""
    if boundary is None:
        return pa.array(np.zeros(batch.num_rows, dtype=bool))
    dv_b, id_b = boundary
    dv = pc.fill_null(batch.column("dv"), -np.inf)
    ids = pc.fill_null(batch.column("id"), "")
    return pc.or_(pc.less(dv, dv_b), pc.and_(pc.equal(dv, dv_b), pc.greater_equal(ids, id_b)))


def mark_batch(batch: pa.Table, boundary: tuple[float, str] | None = None) -> pa.Table:
    """``sent`` (to the expert) and ``over_cap`` for every row of a batch with ``dup_n`` attached."""
    passing = is_passing(batch)
    over = pc.and_(passing, over_cap(batch, boundary))
    return batch.append_column("sent", pc.and_(passing, pc.invert(over))).append_column("over_cap", over)


def mark(rows: Dataset, dups: Duplicates, boundary: tuple[float, str] | None = None) -> Dataset:
    """Stage-1 rows with ``dup_n``, ``sent`` and ``over_cap`` (lazy)."""
    return with_duplicates(rows, dups).map_batches(
        mark_batch, fn_kwargs={"boundary": boundary}, batch_format="pyarrow", batch_size=None
    )


def _eligible(batch: pa.Table) -> pa.Table:
    return batch.filter(is_passing(batch)).select(["dv", "id"])


def cap_boundary(marked: Dataset, cap: int) -> tuple[float, str] | None:
    """The first row over the cap in the order (d(x) descending, id ascending): the cap-th largest
    d(x) with ties broken by id, found by a distributed sort and a split at index ``cap``. Rows at or
    after it fall back to the probe. None when no row is over the cap."""
    ordered = marked.map_batches(_eligible, batch_format="pyarrow", batch_size=None).sort(["dv", "id"], descending=[True, False])
    _, rest = ordered.split_at_indices([cap])
    first = rest.take(1)
    if not first:
        return None
    return float(first[0]["dv"]), str(first[0]["id"])


@dataclass
class Selection:
    """The night's selection: the marked stage-1 rows (lazy) and what the driver knows of them."""

    stage1: Stage1
    rows: Any  # stage-1 rows with dup_n, sent, over_cap; None when stage 1 wrote nothing
    dups: Duplicates
    scored: int  # valid rows with a unique id: the audited rows
    passing: int  # of them, d(x) > λ*
    cap: int | None
    boundary: tuple[float, str] | None
    seconds: float

    @property
    def over(self) -> int:
        """Rows that passed λ* but fell back to the probe: over the hard cap."""
        return self.passing - self.cap if self.boundary is not None else 0

    @property
    def sent(self) -> int:
        return self.passing - self.over

    def expert_rows(self, columns: list[str]) -> Dataset:
        """The delegated rows' partition (with their text), marked the same way."""
        return mark(read(self.stage1.expert_files, columns), self.dups, self.boundary)


def select(stage1: Stage1, spec: SelectionSpec) -> Selection:
    """Dedup, then the hard cap over the rows that pass λ*: distributed; the driver gets counts and
    one boundary row."""
    t0 = time.perf_counter()
    if not stage1.files:
        return Selection(stage1, None, Duplicates(0, 0), 0, 0, None, None, time.perf_counter() - t0)
    rows = read(stage1.files, STAGE1_COLUMNS)
    c = census(rows, broadcast_limit=spec.broadcast_limit, size=stage1.rows, flags={"passing": delegated})
    dups = c.dups
    if dups.ids:
        log(
            f"dedup: {dups.ids} ids occur on {dups.rows} valid rows; all of them are quarantined"
            + ("" if dups.broadcast else " (too many to broadcast: joined on id)")
        )
    cap = cap_rows(spec.budget_cap, c.scored)
    boundary = cap_boundary(mark(rows, dups), cap) if cap is not None and c.flagged["passing"] > cap else None
    sel = Selection(stage1, mark(rows, dups, boundary), dups, c.scored, c.flagged["passing"], cap, boundary, 0.0)
    if sel.over:
        log(
            f"budget cap: {sel.passing} rows pass λ*, the cap allows {cap}; {sel.over} fall back to the probe "
            f"(first over the cap: d(x) = {boundary[0]:.6g}, id {boundary[1]!r})"
        )
    sel.seconds = time.perf_counter() - t0
    return sel
