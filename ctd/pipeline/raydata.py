"""Ray and Ray Data, set up once and used one way by every job.

    init_ray        connect to the cluster (``ray job submit`` sets RAY_ADDRESS) or start a local one
    read / write    Parquet through Ray Data, local paths or object stores (s3fs), few large files
    tally           counts of a dataset (per kind and key) as partial tables per block, summed by a
                    tree of Ray tasks: the driver receives one row per distinct (kind, key)
    tree_reduce     the tree of tasks itself (top-k lists use it too)

What comes back to the driver from here is O(1) in the number of rows.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..tables import parquet_rows

if TYPE_CHECKING:
    from ray.data import Dataset

    from ..config import RayConfig

__all__ = [
    "init_ray",
    "local_system_config",
    "in_actor",
    "has_state_api",
    "configure_data",
    "accelerated",
    "cpu_task",
    "ray_path",
    "read",
    "write",
    "partitions",
    "footer_rows",
    "tree_reduce",
    "TALLY_SCHEMA",
    "tally_rows",
    "tally_by",
    "tally_sum",
    "tally",
    "Tally",
]


_local_without_dashboard = False  # init_ray started a local instance: no dashboard, so no state API


def has_state_api() -> bool:
    """Whether Ray's state API (the dashboard's) can answer this driver: not on a local instance that
    :func:`init_ray` started, which runs without a dashboard."""
    return not _local_without_dashboard


def init_ray(ray_cfg: RayConfig) -> None:
    """Connect to the cluster (``ray job submit`` sets RAY_ADDRESS) or start a local instance."""
    # Ray Data logs progress as text when not on a terminal: every 30 s, totals only (our own log
    # lines say which stage runs); set before ray.data is imported to take effect.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30")
    import ray

    if not ray.is_initialized():
        address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
        global _local_without_dashboard
        if address:
            ray.init(address=address)
            _local_without_dashboard = False
        else:  # a new local instance, never some other cluster found on this machine
            ray.init(
                address="local",
                num_cpus=ray_cfg.num_cpus,
                include_dashboard=False,
                _system_config=local_system_config(ray_cfg.num_cpus),
            )
            _local_without_dashboard = True
    configure_data(preserve_order=ray_cfg.preserve_order, cpu_nodes=ray_cfg.cpu_nodes)


def local_system_config(num_cpus: int | None) -> dict:
    """Ray settings for an instance of our own on one machine. Ray keeps at most ``num_cpus`` idle
    workers and kills the rest after a second; on a few cores an activation or judge actor holding
    half the CPUs pushes the task workers over that limit, so each small Ray Data step after a stage
    started cold workers again. Measured on 2 cores (benchmarks/worker_warmth.py → results/worker_warmth.json):
    the duplicate census of 1,210 rows after an actor stage took 5.1 s with Ray's limit and 0.5 s with this one."""
    n = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    return {"num_workers_soft_limit": 2 * int(n)}


def in_actor() -> bool:
    """This process is a Ray actor (not a driver, not a task)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def configure_data(preserve_order: bool = False, cpu_nodes: dict[str, str] | None = None) -> None:
    """Ray Data settings every job of ours runs with (the driver's context travels to the tasks).
    ``cpu_nodes`` (``ray.cpu_nodes``): node labels that every task and actor of our datasets must
    carry (Ray Data's ``label_selector``); the stages that ask for GPUs or custom resources pass
    :func:`accelerated` to go where those are instead."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.label_selector = dict(cpu_nodes) if cpu_nodes else None
    # Ray 2.60's default shuffle (v2) places its map tasks without the selector; the hash shuffle keeps it
    from ray.data.context import DEFAULT_SHUFFLE_STRATEGY, ShuffleStrategy

    ctx.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE if cpu_nodes else ShuffleStrategy(DEFAULT_SHUFFLE_STRATEGY)
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_operator_progress_bars = False
    # Ray 2.60's Parquet reader V2 starts 32 footer-reader actors for every read: measured 2-5 s per
    # read_parquet call here, against 0.15 s for V1, and the audit reads stage outputs several times.
    ctx.use_datasource_v2 = False


def _held_to() -> dict[str, str] | None:
    import ray

    return ray.data.DataContext.get_current().execution_options.label_selector


def accelerated(num_gpus: float, resources: dict | None) -> dict:
    """Ray remote args for a stage's actors: those that ask for GPUs or custom resources go to nodes
    *without* the ``ray.cpu_nodes`` labels (a selector of ours on the same keys wins over the
    dataset's); CPU-only ones keep the dataset's selector."""
    held = _held_to()
    return {"label_selector": {k: f"!{v}" for k, v in held.items()}} if held and (num_gpus or resources) else {}


def cpu_task(fn: Callable, **options: Any) -> Any:
    """``ray.remote(fn)`` held where Ray Data holds its CPU-only tasks (``ray.cpu_nodes``)."""
    import ray

    held = _held_to()
    opts = {**options, **({"label_selector": held} if held else {})}
    return ray.remote(**opts)(fn) if opts else ray.remote(fn)  # ray.remote() with no option is refused


# ----------------------------------------------------------------------------------------------
# reading and writing
# ----------------------------------------------------------------------------------------------
def ray_path(uri: str) -> tuple[str, Any]:
    """(path, filesystem) for Ray Data readers and writers: local paths as they are, object
    stores through s3fs (pyarrow's own S3 filesystem ignores custom endpoints)."""
    lp = storage.local_path(uri)
    if lp is not None:
        return lp, None
    fs, _ = storage.filesystem(uri)
    return uri, fs


def read(uris: list[str], columns: list[str] | None = None) -> Dataset:
    """A lazy Ray Dataset over Parquet files (only ``columns`` are read)."""
    import ray

    # partitioning=None: the columns are the files' own, never parsed from a part=... folder name
    return ray.data.read_parquet(
        [ray_path(u)[0] for u in uris], filesystem=ray_path(uris[0])[1], columns=columns, partitioning=None
    )


def write(ds: Dataset, uri: str, rows_per_file: int | None = None, partition_cols: list[str] | None = None) -> None:
    """Write a dataset as Parquet files of at least ``rows_per_file`` rows (few, large files), in
    Hive-style folders ``<col>=<value>/`` per value of ``partition_cols`` (whose columns then live in
    the folder names only)."""
    path, fs = ray_path(uri)
    with warnings.catch_warnings():  # Ray 2.60 deprecates (for 2027) min_rows_per_file with partition_cols;
        warnings.simplefilter("ignore", DeprecationWarning)  # its replacement is a shuffle of every row
        ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_file, partition_cols=partition_cols)


def partitions(n_rows: int) -> int:
    """Hash partitions for a groupby or join: about 200k rows each, between 1 and 1024."""
    return max(1, min(1024, n_rows // 200_000 + 1))


def footer_rows(files: list[str]) -> int:
    """Rows in Parquet files, from their footers (read concurrently: one small read per file)."""
    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(parquet_rows, files))


def tree_reduce(refs: list, merge: Callable[..., pa.Table]) -> pa.Table | None:
    """Reduce the tables behind ``refs`` with ``merge(*tables) -> table`` in a tree of Ray tasks
    (at most 64 tables per task), so that the driver receives one small table."""
    import ray

    while len(refs) > 1:
        task = cpu_task(merge)
        refs = [task.remote(*refs[i : i + 64]) for i in range(0, len(refs), 64)]
    return merge(ray.get(refs[0])) if refs else None


# ----------------------------------------------------------------------------------------------
# tallies: counts by (kind, key), summed across blocks
# ----------------------------------------------------------------------------------------------
TALLY_SCHEMA = pa.schema([("kind", pa.string()), ("key", pa.string()), ("n", pa.int64())])


def tally_rows(kind: str, keys: list, counts: list) -> pa.Table:
    """Partial counts of one kind: one row per key (a key may be None)."""
    return pa.table(
        {"kind": pa.array([kind] * len(keys), pa.string()), "key": pa.array(keys, pa.string()), "n": pa.array(counts, pa.int64())}
    )


def tally_by(kind: str, keys: pa.Array | pa.ChunkedArray, weights: np.ndarray | None = None) -> pa.Table:
    """Partial counts of ``keys`` (an Arrow string array; null and "" are one key, None), each row
    weighted by ``weights`` (default 1)."""
    keys = pc.if_else(pc.equal(pc.fill_null(keys, ""), ""), pa.scalar(None, pa.string()), keys)
    w = np.ones(len(keys), dtype=np.int64) if weights is None else np.asarray(weights).astype(np.int64)
    g = pa.table({"k": keys, "w": pa.array(w)}).group_by("k").aggregate([("w", "sum")])
    return tally_rows(kind, g.column("k").to_pylist(), g.column("w_sum").to_pylist())


def tally_sum(*tables: pa.Table) -> pa.Table:
    """Partial counts summed by (kind, key): the same schema in and out, so sums of sums work."""
    parts = [x.cast(TALLY_SCHEMA) for x in tables if x.num_rows]
    t = pa.concat_tables(parts) if parts else TALLY_SCHEMA.empty_table()
    g = t.group_by(["kind", "key"]).aggregate([("n", "sum")])
    return pa.table({"kind": g.column("kind"), "key": g.column("key"), "n": g.column("n_sum")}, schema=TALLY_SCHEMA)


@dataclass(frozen=True)
class Tally:
    """Counts by (kind, key) as the driver receives them; a key may be None (no group, no status)."""

    counts: dict[tuple[str, str | None], int]

    def get(self, kind: str, key: str | None) -> int:
        return self.counts.get((kind, key), 0)

    def by(self, kind: str) -> dict[str | None, int]:
        """{key: n} of one kind."""
        return {k: n for (kd, k), n in self.counts.items() if kd == kind}

    def __or__(self, other: Tally) -> Tally:
        out = dict(self.counts)
        for k, n in other.counts.items():
            out[k] = out.get(k, 0) + n
        return Tally(out)


def tally(parts: list[tuple[Any, Callable[[pa.Table], pa.Table]]]) -> Tally:
    """Sum the partial counts ``fn`` makes of each block of each (dataset, fn) pair, in one
    execution over their union."""
    mapped = [d.map_batches(lambda b, f=f: f(b).cast(TALLY_SCHEMA), batch_format="pyarrow", batch_size=None) for d, f in parts]
    union = mapped[0].union(*mapped[1:]) if len(mapped) > 1 else mapped[0]
    t = tree_reduce(union.to_arrow_refs(), tally_sum) or TALLY_SCHEMA.empty_table()
    return Tally(
        {
            (k, key): int(n)
            for k, key, n in zip(t.column("kind").to_pylist(), t.column("key").to_pylist(), t.column("n").to_pylist())
        }
    )
