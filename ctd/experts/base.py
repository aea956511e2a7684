"""The expert stage's contract: one protocol, one output shape, one pool plan.

An expert takes rows with ``input`` and ``is_chat`` plus the columns they carry and returns those rows
without their text, with ``expert`` (P(unsafe), null on failure), ``expert_status`` (text of an
:class:`ctd.experts.prompt.ExpertStatus`) and ``expert_truncated``. No row is dropped and no failure
of one row fails a block: a failed row keeps the probe's score downstream.

The kinds (``expert.kind``) are in :mod:`ctd.experts.registry`: ``vllm`` (an LLM judge on an
autoscaled vLLM pool through ``ray.data.llm``), ``http`` (the same judge behind an OpenAI-compatible
endpoint) and ``classifier`` (a transformers sequence classifier on its own actor pool).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from .prompt import error_status

if TYPE_CHECKING:
    import ray.data

__all__ = ["Expert", "PoolPlan", "OUT_COLUMNS", "normalise", "judge_rows", "replicas_needed"]

OUT_COLUMNS = ("expert", "expert_status", "expert_truncated", "expert_seconds")


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """How big the expert pool is and how long it is expected to take."""

    rows: int
    replicas: int  # the pool's maximum size (or fixed size)
    needed: int  # replicas the target wall time needs
    expected_seconds: float | None  # rows / (replicas × rows/s per replica); None where unknown
    target_seconds: float | None

    @property
    def target_met(self) -> bool:
        return self.target_seconds is None or self.expected_seconds is None or self.expected_seconds <= self.target_seconds

    def describe(self) -> str:
        s = f"{self.rows} rows on up to {self.replicas} replica(s)"
        if self.expected_seconds is not None:
            s += f", expected {self.expected_seconds / 3600:.2f} h"
        if not self.target_met:
            s += (
                f": OVER the target of {self.target_seconds / 3600:.2f} h, which needs {self.needed} replicas "
                f"(raise expert.vllm.max_replicas, the quota, or the target)"
            )
        return s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"target_met": self.target_met}


def replicas_needed(rows: int, rows_per_second_per_replica: float, target_wall_seconds: float, min_replicas: int = 1) -> int:
    """Replicas needed to score ``rows`` rows within the target wall time."""
    return max(min_replicas, int(math.ceil(rows / rows_per_second_per_replica / target_wall_seconds)))


class Expert(Protocol):
    """One kind of expert, made from its config section (``expert.<kind>``)."""

    kind: ClassVar[str]

    def identity(self) -> dict:
        """What makes two experts give the same score to a row (not how big the pool is): committed
        expert scores are reused by a resumed run only for the same identity."""

    def check(self) -> None:
        """Refuse, before any work, an expert that cannot run (raises ConfigError)."""

    def plan(self, rows: int) -> PoolPlan:
        """The pool for ``rows`` rows to judge."""

    def bill_terms(self) -> dict:
        """How the judge is paid: {"gpus_each": GPUs per replica, "gpu_hour_price", "token_price" (per
        1,000 tokens), "by_tokens": billed by tokens} (see :class:`ctd.audit.cost.Bill`)."""

    def judge(self, ds: ray.data.Dataset, carry: tuple, plan: PoolPlan, log: Callable[[str], None]) -> ray.data.Dataset:
        """The expert's dataset over ``ds`` (columns ``input``, ``is_chat`` and ``carry``)."""


def normalise(batch: pa.Table, carry: tuple) -> pa.Table:
    """One shape for every expert's output, whatever its stage returned: the carried columns,
    ``expert``, ``expert_status``, ``expert_truncated`` and ``expert_seconds`` (the time of the call that
    judged the row; null where the expert did not time it). A row that failed inference inside
    ``ray.data.llm`` bypasses our postprocess and comes back as the processor's raw row with
    ``__inference_error__``; it becomes expert = null, expert_status = "error: <reason>" (a bounded
    reason, see :func:`ctd.experts.prompt.error_status`)."""
    n = batch.num_rows
    has = batch.column_names
    cols = {c: batch.column(c) if c in has else pa.nulls(n) for c in carry}
    expert = pc.cast(batch.column("expert"), pa.float64()) if "expert" in has else pa.nulls(n, pa.float64())
    status = pc.cast(batch.column("expert_status"), pa.string()) if "expert_status" in has else pa.nulls(n, pa.string())
    cut = pc.cast(batch.column("expert_truncated"), pa.bool_()) if "expert_truncated" in has else pa.nulls(n, pa.bool_())
    secs = pc.cast(batch.column("expert_seconds"), pa.float64()) if "expert_seconds" in has else pa.nulls(n, pa.float64())
    if "__inference_error__" in has:
        err = pc.cast(batch.column("__inference_error__"), pa.string()).to_pylist()
        failed = pa.array([bool(e) for e in err])
        status = pc.if_else(failed, pa.array([error_status(e) if e else None for e in err], type=pa.string()), status)
        expert = pc.if_else(failed, pa.scalar(None, pa.float64()), expert)
    if "prompt_error" in has:  # the prompt could not be rendered: whatever the engine said is void
        perr = pc.cast(batch.column("prompt_error"), pa.string())
        status = pc.if_else(pc.is_valid(perr), perr, status)
        expert = pc.if_else(pc.is_valid(perr), pa.scalar(None, pa.float64()), expert)
    status = pc.fill_null(status, "error: the expert returned no status")
    return pa.table(
        {**cols, "expert": expert, "expert_status": status, "expert_truncated": pc.fill_null(cut, False), "expert_seconds": secs}
    )


def judge_rows(
    expert: Expert,
    ds: ray.data.Dataset,
    *,
    rows: int,
    carry: tuple = ("id",),
    plan: PoolPlan | None = None,
    log: Callable[[str], None] = print,
) -> ray.data.Dataset:
    """Expert scores of ``ds`` (columns ``input``, ``is_chat`` and ``carry``) as a dataset of the
    carried columns with ``expert``, ``expert_status`` and ``expert_truncated``: one output row per
    input row."""
    plan = plan or expert.plan(rows)
    ds = ds.select_columns(list(dict.fromkeys([*carry, "input", "is_chat"])))
    out = expert.judge(ds, tuple(carry), plan, log)
    return out.map_batches(normalise, fn_kwargs={"carry": tuple(carry)}, batch_format="pyarrow", batch_size=None)
