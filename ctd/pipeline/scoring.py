"""Stage 1, shared by the train, calibrate and audit jobs: every row read, scored or carrying its error.

    corpus → validate → [tokenize: a CPU pool on an accelerator] → activations + probes + gate → Parquet
      the audit: part=scores/  rows below λ* or invalid, no text (an excerpt where the probe flags it)
                 part=expert/  the delegated rows, with their text: the only files the expert reads

Stage outputs are written to storage in few large files rather than materialised in memory: the
expert stage must not re-run the activation stage, and a later run can resume from them. The audit
runs stage 1 over chunks of corpus files, each committed on its own (:mod:`ctd.pipeline.chunks`).
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field

from .. import storage
from ..config import ModelConfig, PoolConfig, resolve_model_path
from ..log import log
from ..model.probes import LinearProbe
from .corpus import read_corpus
from .raydata import accelerated, footer_rows, write
from .stages import ActivationSpec, ActivationStage, TokenizeStage

__all__ = ["Stage1", "activation_spec", "run_stage1", "run_stage1_splits", "stage1_files", "EXPERT_PART", "EXPERT_CARRY"]

EXPERT_PART = "part=expert"  # the audit's stage-1 partition that holds the delegated rows and their text
# stage-1 columns that travel through the expert stage with each judged row, so that the expert's output
# is those rows' own results (no join of expert scores back onto stage 1)
EXPERT_CARRY = ("id", "group", "label", "source", "truncated", "tokens", "probe", "dv")


@dataclass
class Stage1:
    """Stage 1's output: its folder, rows, seconds and Parquet files."""

    uri: str
    rows: int
    seconds: float
    files: list[str] = field(default_factory=list)

    @property
    def expert_files(self) -> list[str]:
        """The files that hold the delegated rows and their text (the ``part=expert`` partition)."""
        return [f for f in self.files if f"/{EXPERT_PART}/" in f]


def activation_spec(
    model: ModelConfig, pool: PoolConfig, *, safety: LinearProbe | None = None, dv: LinearProbe | None = None, **fields
) -> ActivationSpec:
    """The activation stage for the configured model on the configured pool: layer L (or ``layers``),
    the device and threads the pool's resources give; ``fields`` as :class:`ActivationSpec`."""
    fields.setdefault("layers", (model.layer,))
    return ActivationSpec(
        model_dir=resolve_model_path(model.path),
        score_layer=model.layer,
        max_length=model.max_length,
        token_budget=model.token_budget,
        compile=model.compile,
        dtype=model.dtype,
        device=pool.torch_device,
        threads=None if pool.torch_device == "cuda" else max(1, int(round(pool.num_cpus))),
        safety=safety,
        dv=dv,
        **fields,
    )


def stage1_files(uri: str) -> list[str]:
    """Parquet files of a stage-1 output, including those of its partitions (every ``*.parquet``
    under ``uri``, at any depth)."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return sorted(
        scheme + p for p in fs.find(path) if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
    )


def run_stage1(
    corpus: str,
    out_uri: str,
    spec: ActivationSpec,
    pool: PoolConfig,
    *,
    rows_per_file: int | None = None,
    files: list[str] | None = None,
) -> Stage1:
    """Stage 1 over a corpus (or ``files``, some of its listed files), written to ``out_uri`` in
    files of at least ``rows_per_file`` rows."""
    t0 = time.perf_counter()
    log(
        f"stage 1: {corpus} → validate → tokenize → activations (layer {spec.score_layer}, "
        f"{pool.min_actors}..{pool.max_actors} actors, {pool.num_gpus:g} GPU each) → {out_uri}"
    )
    storage.remove(out_uri)
    write(
        _activations(read_corpus(corpus, files=files), spec, pool),
        out_uri,
        rows_per_file,
        partition_cols=["part"] if spec.partitioned else None,
    )
    s1 = _collect(out_uri, t0)
    log(
        f"stage 1 done: {s1.rows} rows in {s1.seconds:.1f} s ({s1.rows / max(s1.seconds, 1e-9):.1f} rows/s, {len(s1.files)} files)"
    )
    return s1


def run_stage1_splits(corpora: dict[str, str], out_uri: str, spec: ActivationSpec, pool: PoolConfig) -> dict[str, Stage1]:
    """Stage 1 over several corpora in one pass (one actor pool: its model loads once), each written
    to ``out_uri``/split=NAME; e.g. training's train and dev corpora. Each split's ``seconds`` is the
    whole pass's. Not for an audit's stage 1, whose output is partitioned by ``part``."""
    import pyarrow as pa

    if spec.partitioned:
        raise ValueError("run_stage1_splits writes one partition per split; an audit's stage 1 uses run_stage1")

    t0 = time.perf_counter()
    log(
        f"stage 1: {', '.join(f'{k} {v}' for k, v in corpora.items())} → validate → tokenize → activations "
        f"(layer {spec.score_layer}, {pool.min_actors}..{pool.max_actors} actors, {pool.num_gpus:g} GPU each) → {out_uri}"
    )

    def tagged(name: str):
        return read_corpus(corpora[name]).map_batches(
            lambda b: b.append_column("split", pa.array([name] * b.num_rows, pa.string())),
            batch_format="pyarrow",
            batch_size=None,
        )

    names = list(corpora)
    ds = tagged(names[0]).union(*(tagged(n) for n in names[1:])) if len(names) > 1 else tagged(names[0])
    storage.remove(out_uri)
    write(_activations(ds, spec, pool), out_uri, None, partition_cols=["split"])
    out = {n: _collect(storage.join(out_uri, f"split={n}"), t0) for n in names}
    rows, dt = sum(x.rows for x in out.values()), time.perf_counter() - t0
    log(
        f"stage 1 done: {' + '.join(f'{x.rows} {n}' for n, x in out.items())} rows in {dt:.1f} s ({rows / max(dt, 1e-9):.1f} rows/s)"
    )
    return out


def _activations(ds, spec: ActivationSpec, pool: PoolConfig):
    """``ds`` through the activation stage on the pool's actors (tokenized ahead of it on an accelerator)."""
    from ray.data import ActorPoolStrategy

    if spec.tokenize_apart:  # on an accelerator: a CPU pool tokenizes ahead of it
        ds = ds.map_batches(
            TokenizeStage,
            fn_constructor_kwargs={"spec": spec},
            batch_format="pyarrow",
            batch_size=pool.batch_size,
            num_cpus=0.5,
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, pool.max_actors)),
        )
    return ds.map_batches(
        ActivationStage,
        fn_constructor_kwargs={"spec": spec},
        batch_format="pyarrow",
        batch_size=pool.batch_size,
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.num_cpus,
        resources=dict(pool.resources) or None,
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        **accelerated(pool.num_gpus, pool.resources),
    )


def _collect(out_uri: str, t0: float) -> Stage1:
    written = stage1_files(out_uri)
    return Stage1(out_uri, footer_rows(written), time.perf_counter() - t0, written)
