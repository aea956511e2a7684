"""The audit's expert stage: the delegated rows within the cap and the control sample go to the expert,
in committed files.

The rows to judge are read from stage 1's ``part=expert`` partition only (the one place their text
is kept), in blocks of about ``audit.commit_rows`` rows: each block is one expert task and one file
under ``_staging/expert/``, the unit a resumed run skips. Committed scores are reused only for the
same stage 1 (its chunk ids), cap and expert identity (``_KEY.json``); the rows a killed attempt
already judged are skipped by a left-anti join on id, never an id set on the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import storage
from ..experts.base import PoolPlan, judge_rows
from ..hashing import digest
from ..log import log
from ..pipeline.chunks import ChunkedStage1
from ..pipeline.raydata import footer_rows, partitions, read, tree_reduce, write
from ..runs.layout import parquet_files
from ..tables import parquet_rows
from .cost import latency_counts, latency_quantiles
from .results import EXPERT_CARRY, JUDGED_CARRY, to_expert
from .selection import Selection, stage1_columns
from .specs import JudgingSpec

__all__ = ["Judged", "judge"]


@dataclass
class Judged:
    """The expert stage's output: its files, rows, the calls this run made and the pool plan."""

    files: list[str]
    rows: int
    calls: int  # rows judged by this run (the rest were committed by an earlier attempt)
    resumed_rows: int
    plan: PoolPlan
    seconds: float
    latency: dict  # the judged rows' latency quantiles (ctd.audit.cost.latency_quantiles)


def judge(
    selection: Selection,
    stage1: ChunkedStage1,
    spec: JudgingSpec,
    uri: str,
    *,
    resume: bool,
    before_commit: Callable[[], None] | None = None,
) -> Judged:
    """Judge the night's sent rows into ``uri``. With ``resume``, scores an earlier attempt committed
    are reused when nothing in stage 1 was redone (the expert's input changes with stage 1)."""
    t0 = time.perf_counter()
    resume = resume and not stage1.rows_run
    key = {"stage1": stage1.chunk_ids, "cap": selection.cap, "control": selection.pi, "expert": digest(spec.expert.identity())}
    done_files, done_rows = _committed(uri, key) if resume else _fresh(uri, key)
    if done_rows:
        log(f"resume: {done_rows} expert scores already committed")
    todo_rows = selection.to_judge - done_rows
    plan = spec.expert.plan(todo_rows)
    if todo_rows > 0:
        sample = f" + the control sample ({selection.control} rows, {selection.control_only} below λ*)" if selection.pi else ""
        log(f"stage 2: {selection.sent} delegated rows{sample} → expert ({spec.expert.kind}); {todo_rows} to judge now")
        if not plan.target_met:
            log(f"WARNING: the expert pool cannot meet its target: {plan.describe()}")
        todo = selection.expert_rows(stage1_columns(selection.pi > 0) + ["input", "is_chat"]).map_batches(
            to_expert, batch_format="pyarrow", batch_size=None
        )
        if done_files:  # skip what a killed attempt committed
            todo = todo.join(
                read(done_files, ["id"]), join_type="left_anti", on=("id",), num_partitions=partitions(selection.to_judge)
            )
        todo = todo.repartition(target_num_rows_per_block=spec.commit_rows)
        carry = EXPERT_CARRY + JUDGED_CARRY
        write(judge_rows(spec.expert, todo, rows=todo_rows, carry=carry, plan=plan, log=log), uri)
    else:
        log("stage 2: nothing to send to the expert")
    files = [storage.join(uri, n) for n in parquet_files(uri)]
    rows = footer_rows(files)
    if before_commit is not None:
        before_commit()
    out = Judged(files, rows, rows - done_rows, done_rows, plan, time.perf_counter() - t0, latency(files))
    log(f"stage 2 done: {rows} expert scores ({out.calls} new) in {out.seconds:.1f} s")
    return out


def _bins_sum(*tables):
    import numpy as np
    import pyarrow as pa

    n = np.sum([t.column("n").to_numpy() for t in tables], axis=0)
    return pa.table({"bin": tables[0].column("bin"), "n": n})


def latency(files: list[str]) -> dict:
    """p50 and p95 of the judged rows' latency (``expert_seconds``), from per-bin counts summed in Ray."""
    if not files:
        return latency_quantiles([])
    counts = read(files).map_batches(latency_counts, batch_format="pyarrow", batch_size=None)
    t = tree_reduce(counts.to_arrow_refs(), _bins_sum)
    return latency_quantiles(t.column("n").to_numpy() if t is not None else [])


def _fresh(uri: str, key: dict) -> tuple[list[str], int]:
    storage.remove(uri)
    storage.write_json(storage.join(uri, "_KEY.json"), key)
    return [], 0


def _committed(uri: str, key: dict) -> tuple[list[str], int]:
    """Expert output files a previous attempt committed for the same key, and their rows. A file cut
    short by a crash has no footer and is removed; a folder made for another key is cleared."""
    marker = storage.join(uri, "_KEY.json")
    if not storage.exists(marker) or storage.read_json(marker) != key:
        return _fresh(uri, key)
    files = [storage.join(uri, n) for n in parquet_files(uri)]

    def rows(f):
        try:
            return parquet_rows(f)
        except Exception:
            log(f"resume: removing unreadable partial file {f}")
            storage.remove(f)
            return None

    with ThreadPoolExecutor(16) as pool:
        counted = list(pool.map(rows, files))
    kept = [(f, n) for f, n in zip(files, counted) if n is not None]
    return [f for f, _ in kept], sum(n for _, n in kept)
