"""Stage 1, shared by the train, calibrate and audit jobs, and the Ray set-up around it.

    stage 1   corpus → validate → tokenize (CPU actors) → activations + probes + gate (GPU actors)
              → <staging>/stage1/*.parquet    every row read, scored or carrying its error
              (the audit: <staging>/stage1/part=scores/  rows below λ* or invalid, no text (but a
                                                         redacted excerpt where the probe flags the row)
                          <staging>/stage1/part=expert/  the delegated rows, with their text:
                                                         the only files the expert stage reads)

Stage outputs are written to storage in few large files rather than materialised in memory: the
expert stage must not re-run the activation stage, and a later run can resume from them. What
happens to the rows afterwards is in :mod:`ctd.pipeline.audit` (built from :mod:`ctd.pipeline.ops`).
"""

from __future__ import annotations

import os
import posixpath
import time

import pyarrow as pa
import pyarrow.compute as pc
from dataclasses import dataclass, field


from .. import storage
from ..config import JobConfig, resolve_model_path
from ..tables import parquet_rows
from .corpus import read_corpus
from .ops import ray_path, write
from .stages import ActivationStage, TokenizeStage

__all__ = ["log", "init_ray", "configure_data", "ray_path", "Stage1", "activation_spec", "run_stage1", "stage1_files", "count_rows", "read_to_driver", "judge_labelled"]


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
    configure_data(preserve_order=cfg.ray.preserve_order)


def configure_data(preserve_order: bool = False) -> None:
    """Ray Data settings every job of ours runs with (the driver's context travels to the tasks)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_operator_progress_bars = False
    # Ray 2.60's Parquet reader V2 starts 32 footer-reader actors for every read: measured 2-5 s per
    # read_parquet call here, against 0.15 s for V1, and the audit reads stage outputs several times.
    ctx.use_datasource_v2 = False


# ----------------------------------------------------------------------------------------------
# stage 1
# ----------------------------------------------------------------------------------------------
EXPERT_PART, SCORES_PART = "part=expert", "part=scores"  # the audit's stage-1 partitions (Hive-style folders)


@dataclass
class Stage1:
    uri: str
    rows: int
    seconds: float
    files: list[str] = field(default_factory=list)

    @property
    def expert_files(self) -> list[str]:
        """The files that hold the delegated rows (with their text): the ``part=expert`` partition of a
        partitioned stage 1, else every file."""
        if any(f"/{SCORES_PART}/" in f or f"/{EXPERT_PART}/" in f for f in self.files):
            return [f for f in self.files if f"/{EXPERT_PART}/" in f]
        return list(self.files)


def activation_spec(cfg: JobConfig, *, layers=None, probes: bool = True, lambda_star=None, return_pooled=False) -> dict:
    m = cfg.model
    return {
        "model_dir": resolve_model_path(m.path), "layers": layers or [m.layer], "score_layer": m.layer,
        "max_length": m.max_length, "token_budget": m.token_budget, "compile": m.compile, "dtype": m.dtype,
        "device": "cuda" if cfg.activations.num_gpus > 0 else "cpu",
        "safety_probe": cfg.probes.safety if probes else None, "dv_probe": cfg.probes.dv if probes else None,
        "lambda_star": lambda_star, "return_pooled": return_pooled,
        "threads": None if cfg.activations.num_gpus > 0 else max(1, int(round(cfg.activations.num_cpus))),
        "decision_threshold": cfg.decision_threshold, "secret_envs": secret_envs(cfg),
    }


# credentials the platform hands a job through the environment (storage.py): redacted from excerpts
CREDENTIAL_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def secret_envs(cfg: JobConfig) -> list[str]:
    """Names (never values) of the environment variables that hold secrets for this job: the
    standard credentials and every ``*_env`` the config names."""
    names = list(CREDENTIAL_ENVS)

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if str(k).endswith("_env") and isinstance(v, str) and v:
                    names.append(v)
                walk(v)

    walk(cfg.model_dump())
    return sorted(set(names))


def stage1_files(uri: str) -> list[str]:
    """Parquet files of a stage-1 output, including those of its partitions and chunks (every
    ``*.parquet`` under ``uri``, at any depth)."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return sorted(scheme + p for p in fs.find(path) if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", ".")))


def count_rows(files: list[str]) -> int:
    """Rows in Parquet files, from their footers (read concurrently: one small read per file)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(parquet_rows, files))


def run_stage1(cfg: JobConfig, corpus: str, out_uri: str, spec: dict, *, rows_per_file: int | None = None,
               files: list[str] | None = None) -> Stage1:
    """Stage 1 over a corpus (or ``files``, some of its listed files), written to ``out_uri`` in
    files of at least ``rows_per_file`` rows."""
    from ray.data import ActorPoolStrategy

    a = cfg.activations
    t0 = time.perf_counter()
    log(f"stage 1: {corpus} → validate → tokenize → activations (layer {spec['score_layer']}, "
        f"{a.min_actors}..{a.max_actors} actors, {a.num_gpus:g} GPU each) → {out_uri}")
    ds = read_corpus(corpus, files=files)
    tok = ds.map_batches(TokenizeStage, fn_constructor_kwargs={"spec": {"model_dir": spec["model_dir"], "max_length": spec["max_length"]}},
                         batch_format="pyarrow", batch_size=a.batch_size, num_cpus=0.5,
                         compute=ActorPoolStrategy(min_size=1, max_size=max(1, a.max_actors)))
    act = tok.map_batches(ActivationStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=a.batch_size,
                          num_gpus=a.num_gpus or None, num_cpus=a.num_cpus, resources=dict(a.resources) or None,
                          compute=ActorPoolStrategy(min_size=a.min_actors, max_size=a.max_actors))
    storage.remove(out_uri)
    # the audit's stage 1 (text kept on delegated rows only) is split in two partitions, so that the
    # expert stage reads the delegated rows and their text, and nothing else
    split = spec.get("text") == "delegated" and spec.get("lambda_star") is not None and bool(spec.get("dv_probe"))
    write(act, out_uri, rows_per_file, partition_cols=["part"] if split else None)
    files = stage1_files(out_uri)
    rows = count_rows(files)
    dt = time.perf_counter() - t0
    log(f"stage 1 done: {rows} rows in {dt:.1f} s ({rows / max(dt, 1e-9):.1f} rows/s, {len(files)} files)")
    return Stage1(out_uri, rows, dt, files)


def read_to_driver(files: list[str], columns: list[str]):
    """Some columns of stage-1 rows as a pyarrow table on the driver: for the training and
    calibration jobs only, whose statistics need their (labelled, bounded) sample in memory."""
    from ..tables import read_parquet

    tables = [read_parquet(f, columns) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def judge_labelled(cfg: JobConfig, s1: Stage1, out_uri: str, *, broadcast_limit: int = 1_000_000) -> dict:
    """The expert on every valid, labelled row whose id is unique (training's dev split and the
    calibration shard), carrying the stage-1 scores. Writes the expert's output rows to
    ``out_uri``; returns counts {"scored", "labelled", "duplicate_rows", "files"}."""
    from . import ops
    from .experts import run_expert

    from ..tables import parquet_schema

    storage.remove(out_uri)
    if not s1.files:
        return {"scored": 0, "labelled": 0, "duplicate_rows": 0, "files": []}
    have = set(parquet_schema(s1.files[0]).names)  # the training job's stage 1 has no probe scores yet
    carry = [c for c in ops.EXPERT_CARRY if c in have]
    rows = ops.read(s1.files, [c for c in ("id", "input", "is_chat", "error", "delegated", *carry) if c in have])
    dups = ops.find_duplicates(rows, broadcast_limit=broadcast_limit, size=s1.rows)
    marked = ops.mark(rows, dups)
    labelled = lambda b: pc.and_(ops.is_scored(b), pc.greater_equal(pc.fill_null(b.column("label"), -1), 0))  # noqa: E731
    counts = ops.count_true(marked, {"scored": ops.is_scored, "labelled": labelled})
    if counts["labelled"]:
        todo = marked.map_batches(lambda b: b.filter(labelled(b)).select(carry + ["input", "is_chat"]), batch_format="pyarrow", batch_size=None)
        log(f"expert on {counts['labelled']} labelled rows ({cfg.expert.kind})")
        ops.write(run_expert(todo, cfg.expert, n_todo=counts["labelled"], carry=tuple(carry), log=log), out_uri)
    return counts | {"duplicate_rows": dups.rows, "files": stage1_files(out_uri)}
