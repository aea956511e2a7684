"""The job graph shared by the train, calibrate and audit jobs.

    stage 1   corpus → validate → tokenize (CPU actors) → activations + probes + gate (GPU actors)
              → <staging>/stage1/*.parquet       every row read, scored or carrying its error
    driver    duplicate ids (all occurrences quarantined), hard budget cap
    stage 2   delegated rows only → expert pool → <staging>/expert/*.parquet
    stage 3   stage-1 rows + expert scores → final score and decision → results/ and quarantine/

Stage outputs are written to storage rather than materialised in memory: the expert stage must not
re-run the activation stage, and a later run can resume from them.
"""

from __future__ import annotations

import collections
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .. import storage
from ..config import JobConfig, resolve_model_path
from ..tables import parquet_rows, read_parquet
from .corpus import read_corpus
from .experts import EXPERT_SCHEMA, run_expert
from .runs import parquet_files
from .stages import ActivationStage, MergeStage, TokenizeStage

__all__ = ["log", "init_ray", "ray_path", "Stage1", "run_stage1", "stage1_columns", "find_duplicates", "apply_budget_cap",
           "run_expert_stage", "merge_and_write", "QUARANTINE_SCHEMA"]

QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string()), ("group", pa.string())])


def log(msg: str) -> None:
    print(f"[ctd {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def init_ray(cfg: JobConfig) -> None:
    """Connect to the cluster (``ray job submit`` sets RAY_ADDRESS) or start a local instance."""
    # Ray Data logs progress as text when not on a terminal: every 30 s, totals only (our own log
    # lines say which stage runs); set before ray.data is imported to take effect.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30")
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:  # a new local instance, never some other cluster found on this machine
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.enable_operator_progress_bars = False


def ray_path(uri: str):
    """(path, filesystem) for Ray Data readers and writers: local paths as they are, object
    stores through s3fs (pyarrow's own S3 filesystem ignores custom endpoints)."""
    lp = storage.local_path(uri)
    if lp is not None:
        return lp, None
    fs, _ = storage.filesystem(uri)
    return uri, fs


def _files(uri: str) -> list[str]:
    return [storage.join(uri, n) for n in parquet_files(uri)]


def _read(uris: list[str], columns=None):
    import ray

    paths = [ray_path(u)[0] for u in uris]
    fs = ray_path(uris[0])[1]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns)


def _write(ds, uri: str) -> None:
    path, fs = ray_path(uri)
    storage.remove(uri)
    ds.write_parquet(path, filesystem=fs)


# ----------------------------------------------------------------------------------------------
# stage 1
# ----------------------------------------------------------------------------------------------
@dataclass
class Stage1:
    uri: str
    rows: int
    seconds: float
    files: list[str] = field(default_factory=list)


def activation_spec(cfg: JobConfig, *, layers=None, probes: bool = True, lambda_star=None, return_pooled=False) -> dict:
    m = cfg.model
    return {
        "model_dir": resolve_model_path(m.path), "layers": layers or [m.layer], "score_layer": m.layer,
        "max_length": m.max_length, "token_budget": m.token_budget, "compile": m.compile, "dtype": m.dtype,
        "device": "cuda" if cfg.activations.num_gpus > 0 else "cpu",
        "safety_probe": cfg.probes.safety if probes else None, "dv_probe": cfg.probes.dv if probes else None,
        "lambda_star": lambda_star, "return_pooled": return_pooled,
    }


def run_stage1(cfg: JobConfig, corpus: str, out_uri: str, spec: dict) -> Stage1:
    from ray.data import ActorPoolStrategy

    a = cfg.activations
    t0 = time.perf_counter()
    log(f"stage 1: {corpus} → validate → tokenize → activations (layer {spec['score_layer']}, "
        f"{a.min_actors}..{a.max_actors} actors, {a.num_gpus:g} GPU each) → {out_uri}")
    ds = read_corpus(corpus)
    tok = ds.map_batches(TokenizeStage, fn_constructor_kwargs={"spec": {"model_dir": spec["model_dir"], "max_length": spec["max_length"]}},
                         batch_format="pyarrow", batch_size=a.batch_size, num_cpus=0.5,
                         compute=ActorPoolStrategy(min_size=1, max_size=max(1, a.max_actors)))
    act = tok.map_batches(ActivationStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=a.batch_size,
                          num_gpus=a.num_gpus or None, num_cpus=a.num_cpus, resources=dict(a.resources) or None,
                          compute=ActorPoolStrategy(min_size=a.min_actors, max_size=a.max_actors))
    _write(act, out_uri)
    files = _files(out_uri)
    rows = sum(parquet_rows(f) for f in files)
    dt = time.perf_counter() - t0
    log(f"stage 1 done: {rows} rows in {dt:.1f} s ({rows / max(dt, 1e-9):.1f} rows/s)")
    return Stage1(out_uri, rows, dt, files)


def stage1_columns(s1: Stage1, columns: list[str]) -> pa.Table:
    """Some columns of all stage-1 rows, on the driver (ids, scores, errors: small)."""
    tables = [read_parquet(f, columns) for f in s1.files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def find_duplicates(table: pa.Table) -> dict[str, int]:
    """{id: occurrences} for ids that occur more than once among valid rows."""
    ok = table.column("error").is_null().to_numpy(zero_copy_only=False)
    ids = [i for i, v in zip(table.column("id").to_pylist(), ok) if v]
    return {k: c for k, c in collections.Counter(ids).items() if c > 1}


def apply_budget_cap(table: pa.Table, cap_fraction: float | None, n_scored: int, duplicates: dict) -> tuple[set, int | None]:
    """Hard budget cap, enforced here, for the whole pool at once: at most ceil(cap x n) rows reach
    the expert. Over the cap, the delegated rows with the lowest DV fall back to the probe.
    Returns (ids over the cap, the cap)."""
    if cap_fraction is None:
        return set(), None
    cap = int(math.ceil(cap_fraction * n_scored))
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    dv = np.nan_to_num(table.column("dv").to_numpy(zero_copy_only=False).astype(float), nan=-np.inf)
    deleg = np.asarray(table.column("delegated").to_numpy(zero_copy_only=False), dtype=bool)
    deleg &= np.array([i not in duplicates for i in ids], dtype=bool)
    idx = np.flatnonzero(deleg)
    if idx.size <= cap:
        return set(), cap
    order = idx[np.lexsort((ids[idx].astype(str), -dv[idx]))]  # highest DV first; ties by id (deterministic)
    return set(ids[order[cap:]].tolist()), cap


# ----------------------------------------------------------------------------------------------
# stage 2
# ----------------------------------------------------------------------------------------------
def _select(batch: pa.Table, exclude: set, all_rows: bool) -> pa.Table:
    keep = batch.column("error").is_null().to_numpy(zero_copy_only=False).astype(bool)
    if not all_rows:
        keep &= batch.column("delegated").to_numpy(zero_copy_only=False).astype(bool)
    keep &= np.array([i not in exclude for i in batch.column("id").to_pylist()], dtype=bool)
    return batch.filter(pa.array(keep)).select(["id", "input", "is_chat"])


def run_expert_stage(cfg: JobConfig, s1: Stage1, out_uri: str, *, exclude: set, n_expected: int, n_rows: int, alpha: float,
                     done: pa.Table | None = None, all_rows: bool = False, commit_rows: int = 256) -> tuple[pa.Table, float]:
    """Expert scores of the delegated rows (every valid row with ``all_rows``) not in ``exclude``
    nor already in ``done``, written to ``out_uri``; returns all scores (earlier and new) and the
    seconds spent."""
    t0 = time.perf_counter()
    skip = set(exclude)
    if done is not None and done.num_rows:
        skip |= set(done.column("id").to_pylist())
    todo = n_expected - (0 if done is None else done.num_rows)
    if todo <= 0:
        log("stage 2: nothing to send to the expert")
        return done if done is not None else EXPERT_SCHEMA.empty_table(), 0.0
    log(f"stage 2: {todo} delegated rows → expert ({cfg.expert.kind})")
    cols = ["id", "input", "is_chat", "error"] + ([] if all_rows else ["delegated"])
    # Blocks of ~commit_rows rows: each becomes one expert task and one committed file, the unit that
    # a resumed run can skip.
    ds = _read(s1.files, columns=cols).map_batches(
        _select, fn_kwargs={"exclude": skip, "all_rows": all_rows}, batch_format="pyarrow", batch_size=4096
    ).repartition(target_num_rows_per_block=commit_rows)
    scored = run_expert(ds, cfg.expert, alpha=alpha, n_rows=n_rows, log=log)
    path, fs = ray_path(out_uri)
    scored.write_parquet(path, filesystem=fs)  # appends new files beside earlier (resumed) ones
    tables = [read_parquet(f) for f in _files(out_uri)]
    table = pa.concat_tables([t.cast(EXPERT_SCHEMA) for t in tables]) if tables else EXPERT_SCHEMA.empty_table()
    dt = time.perf_counter() - t0
    log(f"stage 2 done: {table.num_rows} expert scores in {dt:.1f} s")
    return table, dt


# ----------------------------------------------------------------------------------------------
# stage 3
# ----------------------------------------------------------------------------------------------
_RESULT_DROP = ("input", "is_chat", "error", "activation_seconds")


def _results(batch: pa.Table, duplicates: dict) -> pa.Table:
    ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
    keep = ok & np.array([i not in duplicates for i in batch.column("id").to_pylist()], dtype=bool)
    return batch.filter(pa.array(keep)).drop_columns([c for c in _RESULT_DROP if c in batch.column_names])


def _quarantine(batch: pa.Table, duplicates: dict) -> pa.Table:
    ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
    ids = batch.column("id").to_pylist()
    errs = batch.column("error").to_pylist()
    rows = [i for i in range(batch.num_rows) if not ok[i] or ids[i] in duplicates]
    reasons = [errs[i] if not ok[i] else f"duplicate id ({duplicates[ids[i]]} rows share it)" for i in rows]
    return pa.table({"id": pa.array([ids[i] for i in rows], type=pa.string()),
                     "source": pa.array([batch.column("source")[i].as_py() for i in rows], type=pa.string()),
                     "error": pa.array(reasons, type=pa.string()),
                     "group": pa.array([batch.column("group")[i].as_py() for i in rows], type=pa.string())}, schema=QUARANTINE_SCHEMA)


def merge_and_write(cfg: JobConfig, s1: Stage1, expert: pa.Table, *, duplicates: dict, over_cap: set, results_uri: str,
                    quarantine_uri: str, n_results: int, n_quarantine: int) -> float:
    """Final scores for valid rows → results; invalid and duplicate-id rows → quarantine. An empty
    table is not handed to Ray: its Parquet sink deletes an empty output folder afterwards, which
    fails on object stores where the folder never existed."""
    import ray
    from ray.data import ActorPoolStrategy

    t0 = time.perf_counter()
    cols = [c for c in read_parquet(s1.files[0]).column_names if not c.startswith("pooled_")] if s1.files else []
    base = _read(s1.files, columns=cols)
    spec = {"expert": ray.put(expert), "cascade": cfg.cascade, "decision_threshold": cfg.decision_threshold, "over_cap": sorted(over_cap)}
    if n_results:
        results = base.map_batches(_results, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow").map_batches(
            MergeStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=2))
        _write(results, results_uri)
    if n_quarantine:
        _write(base.map_batches(_quarantine, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow"), quarantine_uri)
    return time.perf_counter() - t0
