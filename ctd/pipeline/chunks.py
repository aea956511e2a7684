"""Stage 1 over a night's corpus in chunks of files, each committed on its own, so a rerun redoes only
what is not done.

A chunk's id hashes its files' content keys (S3 ETags, or SHA-256 of the bytes, cached by size and
mtime so a resumed run does not read a local corpus twice) and everything else its output depends on
(:meth:`ctd.pipeline.stages.ActivationSpec.resume_key`); its output is written under
``<staging>/stage1/<id>/`` and committed by a ``_SUCCESS.json`` marker. Boundaries fall where a file's
*name* hashes to 0 mod K, so a file that changes or arrives moves no boundary but its own.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..config import PoolConfig
from ..hashing import digest
from ..log import log
from .corpus import list_corpus_files
from .scoring import Stage1, run_stage1, stage1_files
from .stages import ActivationSpec

__all__ = ["ScoringSpec", "Chunk", "plan_chunks", "run_chunked", "ChunkedStage1", "corpus_keys", "STAGE1_FORMAT"]

STAGE1_FORMAT = 3  # bump when stage 1's output changes for the same inputs: old chunks are then redone


@dataclass(frozen=True)
class ScoringSpec:
    """Stage 1: the activation stage, its pool, and how it is cut into committed chunks."""

    corpus: str
    activation: ActivationSpec
    pool: PoolConfig
    model_fingerprint: str
    tokenizer_fingerprint: str
    chunk_bytes: int
    rows_per_file: int

    def resume_key(self) -> dict:
        """What a committed chunk's output depends on besides its files (an allow-list)."""
        return self.activation.resume_key(self.model_fingerprint, self.tokenizer_fingerprint)


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


def run_chunked(spec: ScoringSpec, uri: str, *, resume: bool, before_commit: Callable[[], None] | None = None) -> ChunkedStage1:
    """Stage 1 over the corpus in chunks (:func:`plan_chunks`) under ``uri``, each committed alone;
    with ``resume``, chunks committed before with the same key are reused. ``before_commit`` (the
    lease check) runs before each commit, so a driver whose run was taken over never commits."""
    corpus = spec.corpus
    chunks = plan_chunks(corpus, spec.resume_key(), uri, spec.chunk_bytes)
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
            part = run_stage1(corpus, c.uri, spec.activation, spec.pool, rows_per_file=spec.rows_per_file, files=c.files)
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
