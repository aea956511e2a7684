"""The labelled jobs' expert pass (training's dev split, the calibration shard): the expert on every valid,
labelled row whose id is unique, carrying the stage-1 scores; and the (bounded) labelled sample read
onto the driver for the statistics."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..experts.base import Expert, judge_rows
from ..log import log
from ..tables import parquet_schema, read_parquet
from .dedup import census, is_scored, with_duplicates
from .raydata import read, write
from .scoring import EXPERT_CARRY, Stage1, stage1_files

__all__ = ["judge_labelled", "read_to_driver"]


def _has_label(batch: pa.Table):
    return pc.greater_equal(pc.fill_null(batch.column("label"), -1), 0)


def _labelled(batch: pa.Table):
    return pc.and_(is_scored(batch), _has_label(batch))


def judge_labelled(expert: Expert, s1: Stage1, out_uri: str, *, broadcast_limit: int = 1_000_000) -> dict:
    """The expert on every valid, labelled row whose id is unique, carrying the stage-1 scores.
    Writes the expert's output rows to ``out_uri``; returns counts {"scored", "labelled",
    "duplicate_rows", "files"}."""
    storage.remove(out_uri)
    if not s1.files:
        return {"scored": 0, "labelled": 0, "duplicate_rows": 0, "files": []}
    have = set(parquet_schema(s1.files[0]).names)  # the training job's stage 1 has no probe scores yet
    carry = [c for c in EXPERT_CARRY if c in have]
    rows = read(s1.files, [c for c in ("id", "input", "is_chat", "error", *carry) if c in have])
    c = census(rows, broadcast_limit=broadcast_limit, size=s1.rows, flags={"labelled": _has_label})
    dups, counts = c.dups, {"scored": c.scored, "labelled": c.flagged["labelled"]}
    marked = with_duplicates(rows, dups)
    if counts["labelled"]:
        todo = marked.map_batches(
            lambda b: b.filter(_labelled(b)).select(carry + ["input", "is_chat"]), batch_format="pyarrow", batch_size=None
        )
        log(f"expert on {counts['labelled']} labelled rows ({expert.kind})")
        write(judge_rows(expert, todo, rows=counts["labelled"], carry=tuple(carry), log=log), out_uri)
    return counts | {"duplicate_rows": dups.rows, "files": stage1_files(out_uri)}


def read_to_driver(files: list[str], columns: list[str]) -> pa.Table:
    """Some columns of stage-1 rows as a pyarrow table on the driver: for the training and
    calibration jobs only, whose statistics need their (labelled, bounded) sample in memory."""
    tables = [read_parquet(f, columns) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})
