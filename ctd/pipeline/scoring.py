"""Stage 1, shared by the train, calibrate and audit jobs: every row read, scored or carrying its error.

    corpus → validate → tokenize (CPU actors) → activations + probes + gate (GPU actors) → Parquet
      the audit: part=scores/  rows below λ* or invalid, no text (an excerpt where the probe flags it)
                 part=expert/  the delegated rows, with their text: the only files the expert reads

Stage outputs are written to storage in few large files rather than materialised in memory: the
expert stage must not re-run the activation stage, and a later run can resume from them. The audit
runs stage 1 over chunks of corpus files (:func:`plan_chunks`), each committed on its own and keyed by
its files' content and everything else its output depends on (:meth:`ActivationSpec.resume_key`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..config import ModelConfig, PoolConfig, resolve_model_path
from ..experts.base import Expert, judge_rows
from ..hashing import digest
from ..log import log
from ..model.probes import LinearProbe
from ..tables import read_parquet
from .corpus import list_corpus_files, read_corpus
from .dedup import census, is_scored, with_duplicates
from .raydata import footer_rows, read, write
from .stages import ActivationSpec, ActivationStage, TokenizeStage

__all__ = [
    "Stage1",
    "activation_spec",
    "run_stage1",
    "stage1_files",
    "Chunk",
    "plan_chunks",
    "run_chunked",
    "ChunkedStage1",
    "corpus_keys",
    "judge_labelled",
    "read_to_driver",
    "EXPERT_PART",
    "STAGE1_FORMAT",
]

EXPERT_PART = "part=expert"  # the audit's stage-1 partition that holds the delegated rows and their text
STAGE1_FORMAT = 3  # bump when stage 1's output changes for the same inputs: old chunks are then redone


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
        device="cuda" if pool.num_gpus > 0 else "cpu",
        threads=None if pool.num_gpus > 0 else max(1, int(round(pool.num_cpus))),
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
    from ray.data import ActorPoolStrategy

    t0 = time.perf_counter()
    log(
        f"stage 1: {corpus} → validate → tokenize → activations (layer {spec.score_layer}, "
        f"{pool.min_actors}..{pool.max_actors} actors, {pool.num_gpus:g} GPU each) → {out_uri}"
    )
    ds = read_corpus(corpus, files=files)
    if spec.tokenize_apart:  # on an accelerator: a CPU pool tokenizes ahead of it
        ds = ds.map_batches(
            TokenizeStage,
            fn_constructor_kwargs={"spec": spec},
            batch_format="pyarrow",
            batch_size=pool.batch_size,
            num_cpus=0.5,
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, pool.max_actors)),
        )
    act = ds.map_batches(
        ActivationStage,
        fn_constructor_kwargs={"spec": spec},
        batch_format="pyarrow",
        batch_size=pool.batch_size,
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.num_cpus,
        resources=dict(pool.resources) or None,
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
    )
    storage.remove(out_uri)
    write(act, out_uri, rows_per_file, partition_cols=["part"] if spec.partitioned else None)
    written = stage1_files(out_uri)
    rows = footer_rows(written)
    dt = time.perf_counter() - t0
    log(f"stage 1 done: {rows} rows in {dt:.1f} s ({rows / max(dt, 1e-9):.1f} rows/s, {len(written)} files)")
    return Stage1(out_uri, rows, dt, written)


# ----------------------------------------------------------------------------------------------
# chunks: stage 1 committed per group of corpus files, keyed by content
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Chunk:
    """Corpus files whose stage-1 output is written and committed together, under ``<uri>/<id>/`` with
    a ``_SUCCESS.json`` marker; ``id`` hashes ``key`` (the files' content keys and the spec's resume
    key), so a chunk of changed files or settings has a new id."""

    files: list[str]
    bytes: int
    key: dict
    id: str
    uri: str

    @property
    def marker(self) -> str:
        return storage.join(self.uri, "_SUCCESS.json")

    def commit(self, s1: Stage1) -> None:
        storage.write_json(self.marker, {"key": self.key, "rows": s1.rows, "seconds": s1.seconds, "files": s1.files})

    def committed(self) -> Stage1 | None:
        """This chunk's stage 1 as committed (by this run or an earlier attempt), else None (no
        marker, another key, files missing or added, or anything unreadable: the chunk is redone)."""
        try:
            if not storage.exists(self.marker):
                return None
            m = storage.read_json(self.marker)
            files = stage1_files(self.uri)
            if m.get("key") != self.key or sorted(files) != sorted(m["files"]):
                return None
            return Stage1(self.uri, int(m["rows"]), 0.0, files)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log(f"resume: stage-1 chunk {self.id} not reusable ({e!r}); redoing it")
            return None


def plan_chunks(corpus: str, key: dict, uri: str, chunk_bytes: int) -> list[Chunk]:
    """The corpus files in chunks of about ``chunk_bytes``, each keyed by ``key`` and its files'
    content (S3 ETags, or SHA-256 of the bytes, cached by size and mtime in ``<uri>/_corpus_keys.json``
    so that a resumed run does not read a local corpus twice). Chunk boundaries fall where a file's
    *name* hashes to 0 mod K (K: files per chunk at the median file size), so a file that changes or
    arrives moves no boundary but its own; a chunk is also cut at 4x the target. Folders under ``uri``
    that belong to no planned chunk are removed."""
    _, files, _ = list_corpus_files(corpus)
    sizes, keys = corpus_keys(corpus, files, storage.join(uri, "_corpus_keys.json"))
    common = {"format": STAGE1_FORMAT, "corpus": corpus, **key}
    per_chunk = max(1, round(chunk_bytes / max(1, float(np.median([sizes[f] for f in files])))))
    groups: list[list[str]] = []
    running = 0
    for f in files:
        boundary = int(hashlib.sha256(posixpath.basename(f).encode()).hexdigest(), 16) % per_chunk == 0
        if not groups or boundary or running + sizes[f] > 4 * chunk_bytes:
            groups.append([])
            running = 0
        groups[-1].append(f)
        running += sizes[f]
    chunks = []
    for g in groups:
        ck = common | {"files": {f: keys[f] for f in g}}
        cid = digest(ck)[:16]
        chunks.append(Chunk(g, sum(sizes[f] for f in g), ck, cid, storage.join(uri, cid)))
    if storage.exists(uri):  # earlier plans' chunks (changed files or settings)
        for name in storage.listdir(uri):
            if name not in {c.id for c in chunks} | {"_corpus_keys.json"}:
                storage.remove(storage.join(uri, name))
    return chunks


@dataclass
class ChunkedStage1:
    """Stage 1 over all chunks: the union of their outputs, and how much of it this run computed."""

    stage1: Stage1
    chunk_ids: list[str]
    rows_run: int
    resumed_rows: int
    resumed_chunks: int


def run_chunked(
    corpus: str,
    uri: str,
    spec: ActivationSpec,
    pool: PoolConfig,
    *,
    key: dict,
    chunk_bytes: int,
    rows_per_file: int | None,
    resume: bool,
    before_commit: Callable[[], None] | None = None,
) -> ChunkedStage1:
    """Stage 1 over the corpus in chunks (:func:`plan_chunks`) under ``uri``, each committed alone;
    with ``resume``, chunks committed before with the same key are reused. ``before_commit`` (the
    lease check) runs before each commit, so a driver whose run was taken over never commits."""
    chunks = plan_chunks(corpus, key, uri, chunk_bytes)
    done = {c.id: s for c in chunks if resume and (s := c.committed()) is not None}
    if done:
        log(
            f"resume: {len(done)} of {len(chunks)} stage-1 chunk(s) already done ({sum(s.rows for s in done.values())} rows), reusing them"
        )
    parts, ran = [], 0
    for i, c in enumerate(chunks):
        part = done.get(c.id)
        if part is None:
            log(f"stage 1: chunk {i + 1} of {len(chunks)} ({len(c.files)} file(s), {c.bytes / 2**20:.1f} MiB)")
            part = run_stage1(corpus, c.uri, spec, pool, rows_per_file=rows_per_file, files=c.files)
            if before_commit is not None:
                before_commit()
            c.commit(part)
            ran += part.rows
        parts.append(part)
    s1 = Stage1(uri, sum(p.rows for p in parts), sum(p.seconds for p in parts), [f for p in parts for f in p.files])
    return ChunkedStage1(s1, [c.id for c in chunks], ran, sum(s.rows for s in done.values()), len(done))


def corpus_keys(corpus: str, files: list[str], cache_uri: str | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """({file: bytes}, {file: content key}) for the listed corpus files: the ETag on S3 (one HEAD
    each, 16 at a time), the SHA-256 of the bytes elsewhere. A local file's SHA-256 is reused from
    ``cache_uri`` while its size and mtime (ns) are unchanged, as git's index does: a file modified
    in the last 2 s is not cached (a rewrite within one mtime tick would keep both), and a rewrite that
    forges both is not seen."""
    local = "://" not in corpus or corpus.startswith("file://")
    s3 = storage.conditional_writes(corpus) == "s3"
    cache = {}
    if local and cache_uri and storage.exists(cache_uri):
        try:
            cache = storage.read_json(cache_uri)
        except ValueError:  # a torn cache: hash again
            cache = {}
    fs, _ = storage.filesystem(corpus)
    stats = {f: os.stat(f) for f in files} if local else {}

    def key(f):
        if local:
            st, hit = stats[f], cache.get(f)
            if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
                return st.st_size, hit["key"]
            return st.st_size, storage.content_key(f)
        if s3:  # size and ETag from one HEAD
            info = fs.info(f)
            return int(info["size"]), "etag:" + str(info.get("ETag", "")).strip('"')
        return int(fs.size(f)), storage.content_key(_corpus_uri(corpus, f))

    with ThreadPoolExecutor(16) as pool:
        got = dict(zip(files, pool.map(key, files)))
    sizes, keys = {f: n for f, (n, _) in got.items()}, {f: k for f, (_, k) in got.items()}
    if local and cache_uri:
        settled = time.time_ns() - 2_000_000_000
        storage.write_json(
            cache_uri,
            {
                f: {"size": stats[f].st_size, "mtime_ns": stats[f].st_mtime_ns, "key": keys[f]}
                for f in files
                if stats[f].st_mtime_ns < settled
            },
        )
    return sizes, keys


def _corpus_uri(corpus: str, path: str) -> str:
    """A listed corpus file (a filesystem path) as a URI: the corpus' scheme put back."""
    return f"{corpus.split('://', 1)[0]}://{path}" if "://" in corpus and not corpus.startswith("file://") else path


# ----------------------------------------------------------------------------------------------
# the labelled jobs (train's dev split, the calibration shard): the expert on every labelled row
# ----------------------------------------------------------------------------------------------
EXPERT_CARRY = ("id", "group", "label", "source", "truncated", "tokens", "probe", "dv")


def _has_label(batch: pa.Table):
    return pc.greater_equal(pc.fill_null(batch.column("label"), -1), 0)


def _labelled(batch: pa.Table):
    return pc.and_(is_scored(batch), _has_label(batch))


def judge_labelled(expert: Expert, s1: Stage1, out_uri: str, *, broadcast_limit: int = 1_000_000) -> dict:
    """The expert on every valid, labelled row whose id is unique, carrying the stage-1 scores.
    Writes the expert's output rows to ``out_uri``; returns counts {"scored", "labelled",
    "duplicate_rows", "files"}."""
    from ..tables import parquet_schema

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
