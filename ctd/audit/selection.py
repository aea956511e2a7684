"""Which audited rows go to the expert: duplicates out, λ*'s gate, and the hard budget cap.

    cap_rows       the cap in rows: ceil(budget_cap × audited rows)                         (arithmetic)
    cap_boundary   the first row over the cap in the order (d(x) desc, id asc): a distributed sort
                   and a split at the cap; the driver gets one row
    mark           ``sent`` / ``over_cap`` / ``control`` on every row, the cap applied as a scalar filter
    select         the night's selection: counts on the driver, the marked rows lazy

The control sample (:mod:`ctd.pipeline.control`) is apart from all of it: its rows go to the judge
whether or not they pass λ* or fall over the cap, and the cap counts the delegated rows only.

Every per-row step is a vectorised pyarrow function of a batch (unit-tested without Ray); the
distributed parts only map them over blocks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
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
    "stage1_columns",
    "in_control",
    "control_only",
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


def stage1_columns(control: bool) -> list[str]:
    """:data:`STAGE1_COLUMNS`, with the control sample's draw when stage 1 made one."""
    return STAGE1_COLUMNS + (["control_u"] if control else [])


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


def in_control(batch: pa.Table, pi: float) -> pa.Array | pa.ChunkedArray:
    """Valid rows in the control sample: their draw ``control_u`` below π (a row of a duplicated id
    is drawn too, but never scored: see :func:`mark_batch`)."""
    if pi <= 0 or "control_u" not in batch.column_names:
        return pa.array(np.zeros(batch.num_rows, dtype=bool))
    return pc.fill_null(pc.less(batch.column("control_u"), pi), False)


def control_only(batch: pa.Table, pi: float) -> pa.Array | pa.ChunkedArray:
    """Control rows that do not pass λ*: judged only because of the sample."""
    return pc.and_(in_control(batch, pi), pc.invert(delegated(batch)))


def over_cap(batch: pa.Table, boundary: tuple[float, str] | None) -> pa.Array | pa.ChunkedArray:
    """Scalar filter: (d(x), id) at or after the boundary in (d(x) desc, id asc) order."""
    if boundary is None:
        return pa.array(np.zeros(batch.num_rows, dtype=bool))
    dv_b, id_b = boundary
    dv = pc.fill_null(batch.column("dv"), -np.inf)
    ids = pc.fill_null(batch.column("id"), "")
    return pc.or_(pc.less(dv, dv_b), pc.and_(pc.equal(dv, dv_b), pc.greater_equal(ids, id_b)))


def mark_batch(batch: pa.Table, boundary: tuple[float, str] | None = None, pi: float = 0.0) -> pa.Table:
    """``sent`` (delegated, within the cap), ``over_cap`` and ``control`` (in the control sample) for
    every row of a batch with ``dup_n`` attached."""
    passing = is_passing(batch)
    over = pc.and_(passing, over_cap(batch, boundary))
    return (
        batch.append_column("sent", pc.and_(passing, pc.invert(over)))
        .append_column("over_cap", over)
        .append_column("control", pc.and_(is_scored(batch), in_control(batch, pi)))
    )


def mark(rows: Dataset, dups: Duplicates, boundary: tuple[float, str] | None = None, pi: float = 0.0) -> Dataset:
    """Stage-1 rows with ``dup_n``, ``sent``, ``over_cap`` and ``control`` (lazy)."""
    return with_duplicates(rows, dups).map_batches(
        mark_batch, fn_kwargs={"boundary": boundary, "pi": pi}, batch_format="pyarrow", batch_size=None
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
    rows: Any  # stage-1 rows with dup_n, sent, over_cap, control; None when stage 1 wrote nothing
    dups: Duplicates
    scored: int  # valid rows with a unique id: the audited rows
    passing: int  # of them, d(x) > λ*
    cap: int | None
    boundary: tuple[float, str] | None
    seconds: float
    pi: float = 0.0  # the control sample's share
    control: int = 0  # rows in the control sample
    control_only: int = 0  # of them, rows that do not pass λ*

    @property
    def over(self) -> int:
        """Rows that passed λ* but fell back to the probe: over the hard cap."""
        return self.passing - self.cap if self.boundary is not None else 0

    @property
    def sent(self) -> int:
        """Delegated rows within the cap (the control sample's other rows are not counted here)."""
        return self.passing - self.over

    @property
    def to_judge(self) -> int:
        """At most this many rows go to the judge: the sent ones and the control sample's others."""
        return self.sent + self.control_only + (self.control - self.control_only if self.over else 0)

    def expert_rows(self, columns: list[str]) -> Dataset:
        """The rows that keep their text (stage 1's ``part=expert``), marked the same way."""
        return mark(read(self.stage1.expert_files, columns), self.dups, self.boundary, self.pi)


def select(stage1: Stage1, spec: SelectionSpec) -> Selection:
    """Dedup, then the hard cap over the rows that pass λ*, and the control sample: distributed; the
    driver gets counts and one boundary row."""
    t0 = time.perf_counter()
    if not stage1.files:
        return Selection(stage1, None, Duplicates(0, 0), 0, 0, None, None, time.perf_counter() - t0)
    pi = spec.control.pi(stage1.rows)
    rows = read(stage1.files, stage1_columns(spec.control.keep > 0))
    flags = {"passing": delegated}
    if pi > 0:
        flags |= {"control": partial(in_control, pi=pi), "control_only": partial(control_only, pi=pi)}
    c = census(rows, broadcast_limit=spec.broadcast_limit, size=stage1.rows, flags=flags)
    dups = c.dups
    if dups.ids:
        log(
            f"dedup: {dups.ids} ids occur on {dups.rows} valid rows; all of them are quarantined"
            + ("" if dups.broadcast else " (too many to broadcast: joined on id)")
        )
    cap = cap_rows(spec.budget_cap, c.scored)
    boundary = cap_boundary(mark(rows, dups), cap) if cap is not None and c.flagged["passing"] > cap else None
    sel = Selection(
        stage1,
        mark(rows, dups, boundary, pi),
        dups,
        c.scored,
        c.flagged["passing"],
        cap,
        boundary,
        0.0,
        pi,
        c.flagged.get("control", 0),
        c.flagged.get("control_only", 0),
    )
    if sel.over:
        log(
            f"budget cap: {sel.passing} rows pass λ*, the cap allows {cap}; {sel.over} fall back to the probe "
            f"(first over the cap: d(x) = {boundary[0]:.6g}, id {boundary[1]!r})"
        )
    if pi > 0:
        log(f"control sample: {sel.control} rows (π = {pi:.4g}), {sel.control_only} of them below λ*")
    sel.seconds = time.perf_counter() - t0
    return sel
