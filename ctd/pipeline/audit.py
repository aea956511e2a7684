"""The nightly audit: score every row, delegate those whose DV passes λ*, publish audited results.

Read top to bottom, :func:`run_audit` is the data flow. Every per-row step is a Ray Data operation
(:mod:`ctd.pipeline.ops`); the driver holds counts, one boundary row, file lists, the review list
(at most 3 x audit.review_rows rows) and, while it is small, the set of duplicated ids:

    date        the audited day: --date, or yesterday in audit.timezone; {date} in corpus and run id
    artifacts   probes and calibration checked against the model before any compute
    lease       one writer per run id (ctd.lease): a second driver exits 4, nothing written
    stage 1     read → validate → tokenize → activations + probes + gate        (graph.run_stage1)
                over chunks of corpus files, each committed alone               (plan_stage1)
                → _staging/stage1/<chunk>/part=scores/  scores of every other row, no text (a
                                        redacted excerpt of the rows the probe flags: the review list)
                → _staging/stage1/<chunk>/part=expert/  the delegated rows with their text
    dedup       groupby(id).count() over valid rows → duplicated ids           (ops.find_duplicates)
    cap         distributed sort of the passing rows by (d(x) desc, id), split at the cap → the first
                row over it, applied as a scalar filter                         (ops.cap_boundary)
    expert      delegated rows (part=expert only), within the cap, not yet judged → expert pool →
                _staging/expert/
                (the delegated rows' own results: no join back onto stage 1)
    rows        rows below λ* or over the cap, and judged rows → attempts/<attempt>/results/;
                invalid and duplicate-id rows → attempts/<attempt>/quarantine/ (few large files)
    report      counts, groups, statuses, reasons, histograms as distributed aggregates (ops.facts);
                rows read = rows scored + rows quarantined; the nights before (reports.history);
                the review list by a distributed top-k (ops.review) → review.parquet
    publish     manifest.json (one write, last) names the attempt and every file with its rows and
                SHA-256; the run's previous attempt stays readable until then; _staging/ removed

Resuming: stage outputs stay under ``_staging/`` until the run is published. A rerun of the same run
id with ``resume: true`` (a new attempt) reuses every stage-1 chunk committed from the same corpus
content (ETags or SHA-256), model, probes, λ* and activation settings, redoes the others, and sends to
the expert only the delegated rows that have no committed expert score yet (a left-anti join on id).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import os
import posixpath
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from .. import storage
from ..artifacts import config_hash, model_fingerprint
from ..calibration import load_calibration
from ..config import ConfigError, JobConfig, audit_date, expand_dates, expand_run_id, resolve_model_path
from ..config import config_hash as job_config_hash
from ..lease import Lease
from ..probes import LinearProbe
from ..report import plot_binned, plot_history, write_report
from ..stats.drift import drift_eprocess
from ..tables import parquet_rows, write_parquet
from . import ops
from .corpus import list_corpus_files
from .experts import check_judge, judge_identity, plan_pool, run_expert
from .graph import Stage1, activation_spec, count_rows, init_ray, log, run_stage1, secret_envs, stage1_files
from . import reports
from .reports import AuditReport, StageTiming
from .runs import RunLayout, parquet_files, read_manifest, sweep

__all__ = ["run_audit", "check_artifacts", "Artifacts", "Chunk", "plan_stage1", "stage1_spec", "corpus_keys"]

TREND_NIGHTS = 60  # nights drawn in the report's trend (the drift statistic uses every night)
# stage-1 columns the audit reads back (never the pooled vectors); the text only for the expert
S1_COLUMNS = ["id", "group", "label", "source", "error", "truncated", "probe", "dv", "delegated", "tokens"]
S1_EXPERT_COLUMNS = S1_COLUMNS + ["input", "is_chat"]


class Artifacts:
    """The probes and calibration an audit uses, verified against the configured model."""

    def __init__(self, cfg: JobConfig, calibration_uri: str):
        model_dir = resolve_model_path(cfg.model.path)
        self.model_fingerprint = model_fingerprint(model_dir)
        self.safety = LinearProbe.load(cfg.probes.safety)
        self.dv = LinearProbe.load(cfg.probes.dv)
        for probe in (self.safety, self.dv):
            probe.check_compatible(model_fingerprint=self.model_fingerprint, layer=cfg.model.layer, pooling="mean")
        self.calibration = load_calibration(calibration_uri)
        self.calibration.check_matches(model_fingerprint=self.model_fingerprint, layer=cfg.model.layer,
                                       safety_probe_hash=self.safety.content_hash, dv_probe_hash=self.dv.content_hash)
        self.calibration_hash = config_hash(self.calibration.to_dict())
        self.model_id = self.safety.meta.get("model_id", "")


def check_artifacts(cfg: JobConfig, calibration_uri: str) -> Artifacts:
    return Artifacts(cfg, calibration_uri)


def run_audit(cfg: JobConfig, *, run_id: str | None = None, date: str | None = None, now: _dt.datetime | None = None) -> AuditReport:
    """Audit one day's corpus (``date``: YYYY-MM-DD, default yesterday in ``audit.timezone``) into
    ``<output>/runs/<run_id>/``, as the only writer of that run id (raises :class:`ctd.lease.LeaseHeld`
    when another driver holds it). The previous published run of the same id stays readable until
    this one is published."""
    if cfg.audit is None:
        raise ValueError("config has no 'audit' section")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    day = audit_date(date or cfg.audit.date, cfg.audit.timezone, now)
    cfg = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"corpus": expand_dates(cfg.audit.corpus, day, now)})})
    run_id = expand_run_id(run_id or cfg.audit.run_id, day, now)
    art = check_artifacts(cfg, cfg.audit.calibration)  # refuses mismatches before any compute
    check_judge(cfg.expert)  # and a judge whose prompt cannot be built (label tokens, context, chat template)
    list_corpus_files(cfg.audit.corpus)  # a missing corpus is bad input (exit 2), found before the lease
    _check_same_day(cfg.audit.output, run_id, day)
    init_ray(cfg)
    layout = RunLayout.new_attempt(cfg.audit.output, run_id)
    a = cfg.audit
    wait = a.lease_seconds + 30 if a.lease_wait_seconds is None else a.lease_wait_seconds
    with Lease(layout.lease, run_id=run_id, ttl_s=a.lease_seconds, wait_s=wait, log=log) as lease:
        if a.staging_retention_days is not None:
            try:  # abandoned runs' staging (text copies) and attempts do not outlive their retention
                sweep(a.output, a.staging_retention_days, log)
            except Exception as e:
                log(f"retention sweep failed ({e!r}); continuing")
        try:
            return _audit(cfg, art, layout, day, lease)
        except (FileNotFoundError, ConfigError) as e:
            # input was checked before the lease: a file vanishing now is a failure to retry (exit 1),
            # not bad input (exit 2)
            raise RuntimeError(f"audit {run_id} failed mid-run: {e}") from e


def _check_same_day(output: str, run_id: str, day: _dt.date) -> None:
    """A run id holds one audited day: refuse to replace a published run of another day (e.g. a
    run-id template without {date}, or one whose meaning changed: before attempts, {date} was the
    day the job ran, not the day audited)."""
    m = read_manifest(output, run_id)
    if m is None:
        return
    had = (m.get("summary") or {}).get("audited_date")
    if had != day.isoformat():
        raise ConfigError(f"run {run_id!r} under {output} is already published for "
                          f"{'an unrecorded day (an older layout)' if had is None else had}, not {day}: "
                          "choose a run id with {date} in it (audit.run_id / --run-id), or remove that run first")


def _audit(cfg: JobConfig, art: Artifacts, layout: RunLayout, day: _dt.date, lease: Lease) -> AuditReport:
    a, run_id = cfg.audit, layout.run_id
    cal = art.calibration.result
    lam = art.calibration.lambda_star if cal.delegates else None
    log(f"audit {run_id} of {day}: α={cal.alpha} δ={cal.delta} λ*={'never delegate' if lam is None else f'{lam:.6g}'} "
        f"→ {layout.root} (attempt {layout.attempt})")
    if not a.resume:
        storage.remove(layout.staging)
    resumed: dict = {}
    timings: dict[str, tuple[float, int]] = {}

    # stage 1: every row scored (or carrying its error), text kept only where d(x) > λ* (and a
    # redacted excerpt where the probe flags the row); in chunks of corpus files, each committed alone
    spec = stage1_spec(cfg, lam)
    chunks = plan_stage1(cfg, art, spec, layout.path("_staging", "stage1"))
    done = {c.id: s for c in chunks if a.resume and (s := c.committed()) is not None}
    if done:
        log(f"resume: {len(done)} of {len(chunks)} stage-1 chunk(s) already done ({sum(s.rows for s in done.values())} rows), reusing them")
        resumed["stage1_rows"] = sum(s.rows for s in done.values())
        resumed["stage1_chunks"] = len(done)
    if len(done) < len(chunks):
        storage.remove(layout.path("_staging", "expert"))  # the expert's input changes with stage 1
    parts, ran_rows = [], 0
    for i, c in enumerate(chunks):
        part = done.get(c.id)
        if part is None:
            log(f"stage 1: chunk {i + 1} of {len(chunks)} ({len(c.files)} file(s), {c.bytes / 2**20:.1f} MiB)")
            part = run_stage1(cfg, a.corpus, c.uri, spec, rows_per_file=a.rows_per_file, files=c.files)
            lease.check()  # a driver whose run was taken over neither commits the chunk nor goes on
            c.commit(part)
            ran_rows += part.rows
        parts.append(part)
    s1 = Stage1(layout.path("_staging", "stage1"), sum(p.rows for p in parts), sum(p.seconds for p in parts),
                [f for p in parts for f in p.files])
    timings["activations"] = (s1.seconds, ran_rows)
    lease.check()  # stop here if another driver took the run over while stage 1 ran

    # dedup and the hard budget cap: distributed; the driver gets counts and one boundary row
    t0 = time.perf_counter()
    rows = ops.read(s1.files, S1_COLUMNS) if s1.files else None
    dups = ops.find_duplicates(rows, broadcast_limit=a.broadcast_limit, size=s1.rows) if rows is not None else ops.Duplicates(0, 0)
    if dups.ids:
        log(f"dedup: {dups.ids} ids occur on {dups.rows} valid rows; all of them are quarantined"
            + ("" if dups.broadcast else " (too many to broadcast: joined on id)"))
    counts = ops.count_true(ops.mark(rows, dups), {"scored": ops.is_scored, "passing": ops.is_passing}) if rows is not None else {
        "scored": 0, "passing": 0}
    n_scored, n_passing = counts["scored"], counts["passing"]
    cap = int(math.ceil(a.budget_cap * n_scored)) if a.budget_cap is not None else None
    boundary = ops.cap_boundary(ops.mark(rows, dups), cap) if cap is not None and n_passing > cap else None
    n_over = n_passing - cap if boundary is not None else 0
    n_sent = n_passing - n_over
    if n_over:
        log(f"budget cap: {n_passing} rows pass λ*, the cap allows {cap}; {n_over} fall back to the probe "
            f"(first over the cap: d(x) = {boundary[0]:.6g}, id {boundary[1]!r})")
    marked = ops.mark(rows, dups, boundary) if rows is not None else None
    timings["select"] = (time.perf_counter() - t0, s1.rows)

    # the expert stage: delegated rows within the cap that have no committed score yet
    t0 = time.perf_counter()
    expert_uri = layout.path("_staging", "expert")
    # committed expert scores are reused only for the same stage 1, cap and expert (model, prompt, context)
    expert_key = {"stage1": [c.id for c in chunks], "budget_cap": a.budget_cap, "expert": config_hash(judge_identity(cfg.expert))}
    done_files, done_rows = _committed_expert(expert_uri, expert_key) if a.resume else ([], 0)
    if not a.resume:
        storage.remove(expert_uri)
        storage.write_json(storage.join(expert_uri, "_KEY.json"), expert_key)
    if done_rows:
        log(f"resume: {done_rows} expert scores already committed")
        resumed["expert_rows"] = done_rows
    n_todo = n_sent - done_rows
    plan = plan_pool(cfg.expert, n_todo)
    if n_todo > 0:
        log(f"stage 2: {n_todo} delegated rows → expert ({cfg.expert.kind})")
        if not plan.target_met:
            log(f"WARNING: the expert pool cannot meet its target: {plan.describe()}")
        # only the delegated rows' partition is read here, text included (marked the same way)
        todo = ops.mark(ops.read(s1.expert_files, S1_EXPERT_COLUMNS), dups, boundary).map_batches(ops.to_expert, batch_format="pyarrow",
                                                                                                 batch_size=None)
        if done_files:  # skip what a killed attempt committed: a left-anti join on id, never an id set on the driver
            todo = todo.join(ops.read(done_files, ["id"]), join_type="left_anti", on=("id",), num_partitions=ops.partitions(n_sent))
        # blocks of ~commit_rows rows: each becomes one expert task and one committed file, the unit
        # a resumed run can skip
        todo = todo.repartition(target_num_rows_per_block=a.commit_rows)
        ops.write(run_expert(todo, cfg.expert, n_todo=n_todo, carry=ops.EXPERT_CARRY, plan=plan, log=log), expert_uri)
    else:
        log("stage 2: nothing to send to the expert")
    expert_files = [storage.join(expert_uri, n) for n in parquet_files(expert_uri)]
    n_judged = count_rows(expert_files)
    timings["expert"] = (time.perf_counter() - t0, n_judged - done_rows)
    lease.check()
    log(f"stage 2 done: {n_judged} expert scores ({n_judged - done_rows} new) in {timings['expert'][0]:.1f} s")

    # publish the rows: results (probe-only rows, judged rows) and quarantine, in few large files
    t0 = time.perf_counter()
    log("stage 3: results and quarantine")
    for uri in (layout.results, layout.quarantine):
        storage.remove(uri)
    finalize = {"cascade": cfg.cascade, "decision_threshold": cfg.decision_threshold}
    parts = []
    if n_scored - n_sent:  # below λ*, or over the cap: the probe's score
        parts.append(marked.map_batches(ops.not_sent, batch_format="pyarrow", batch_size=None))
    if expert_files:  # judged: the expert stage's output rows
        parts.append(ops.read(expert_files).map_batches(ops.judged, batch_format="pyarrow", batch_size=None))
    if parts:
        results = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ops.write(results.map_batches(ops.finalize, fn_kwargs=finalize, batch_format="pyarrow", batch_size=None), layout.results, a.rows_per_file)
    if s1.rows - n_scored:
        ops.write(marked.map_batches(ops.quarantined, batch_format="pyarrow", batch_size=None), layout.quarantine, a.rows_per_file)
    timings["merge"] = (time.perf_counter() - t0, s1.rows)

    report, figures, nights, review = _report(cfg, art, layout, day, s1, timings, n_judged - done_rows, cap, resumed, plan)
    files = write_report(layout.attempt_root, "report", report.model_dump(), report.html(figures, nights, review), figures,
                         secrets=[os.environ.get(k, "") for k in secret_envs(cfg)])
    if review is not None:  # the rows to look at first, with redacted excerpts: a Parquet file beside the report
        files["review"] = storage.join(layout.attempt_root, "review.parquet")
        write_parquet(files["review"], review)
    if not report.invariant_ok:
        raise RuntimeError(f"row invariant violated: read {report.rows_read} != scored {report.rows_scored} + "
                           f"quarantined {report.rows_quarantined}; run {run_id} is not published")
    # lease.check right before the manifest's conditional write: a driver whose lease expired and was
    # taken over must not publish
    layout.publish({"audited_date": day.isoformat(), "rows_read": report.rows_read, "rows_scored": report.rows_scored,
                    "rows_quarantined": report.rows_quarantined, "delegated": report.delegated, "drift_alarm": report.drift_alarm,
                    "judge_alarm": report.judge_alarm},
                   list(files.values()), before_commit=lease.check)
    log(f"published {layout.root} (attempt {layout.attempt}; manifest written last)")
    if not a.keep_staging:
        try:  # stage outputs (with the delegated rows' text) do not outlive the run
            storage.remove(layout.staging)
        except Exception as e:  # published already: never fail (and get rerun) over garbage
            log(f"published; removing {layout.staging} failed ({e!r}): remove it by hand")
    if report.drift_alarm:
        log("DRIFT ALARM: " + report.drift_message)
    if report.judge_alarm:
        log("JUDGE ALARM: " + report.judge_message)
    for line in report.summary_lines():
        print(line, flush=True)
    log(f"report: {files['html']}")
    return report


@dataclasses.dataclass(eq=False)
class Chunk:
    """Corpus files whose stage-1 output is written and committed together, under
    ``_staging/stage1/<id>/`` with a ``_SUCCESS.json`` marker; ``id`` hashes ``key`` (the files'
    content keys, model, probes, λ*, ...), so a chunk of changed files or settings has a new id."""

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


def stage1_spec(cfg: JobConfig, lam) -> dict:
    """The audit's activation stage: probes, the gate at λ* (never, without one), text kept on the
    delegated rows only, excerpts of the flagged ones."""
    return activation_spec(cfg, lambda_star=np.inf if lam is None else lam) | {"text": "delegated", "excerpt_chars": cfg.audit.excerpt_chars}


STAGE1_FORMAT = 2  # bump when stage 1's output changes for the same inputs: old chunks are then redone


def plan_stage1(cfg: JobConfig, art: Artifacts, spec: dict, uri: str) -> list[Chunk]:
    """The corpus files in chunks of about ``audit.stage1_chunk_bytes``, each keyed by content (S3
    ETags, or SHA-256 of the bytes, cached by size and mtime in ``<uri>/_corpus_keys.json`` so that a
    resumed run does not read a local corpus twice) and by everything else stage 1's output depends
    on (model, probes, the whole activation spec). Chunk boundaries fall where a file's *name* hashes
    to 0 mod K (K: files per chunk at the median file size), so a file that changes or arrives moves
    no boundary but its own; a chunk is also cut at 4x the target. Folders under ``uri`` that belong
    to no planned chunk are removed."""
    a = cfg.audit
    _, files, _ = list_corpus_files(a.corpus)
    sizes, keys = corpus_keys(a.corpus, files, storage.join(uri, "_corpus_keys.json"))
    # what stage 1's output depends on besides the files: the model's weights and the probes by
    # content, every other setting as given (the thread count and paths excluded)
    common = {k: v for k, v in spec.items() if k not in ("model_dir", "threads", "safety_probe", "dv_probe")}
    common |= {"format": STAGE1_FORMAT, "corpus": a.corpus, "model": art.model_fingerprint, "safety": art.safety.content_hash,
               "dv": art.dv.content_hash, "lambda_star": None if spec.get("lambda_star") in (None, np.inf) else float(spec["lambda_star"])}
    per_chunk = max(1, round(a.stage1_chunk_bytes / max(1, float(np.median([sizes[f] for f in files])))))
    groups: list[list[str]] = []
    running = 0
    for f in files:
        boundary = int(hashlib.sha256(posixpath.basename(f).encode()).hexdigest(), 16) % per_chunk == 0
        if not groups or boundary or running + sizes[f] > 4 * a.stage1_chunk_bytes:
            groups.append([])
            running = 0
        groups[-1].append(f)
        running += sizes[f]
    chunks = []
    for g in groups:
        key = common | {"files": {f: keys[f] for f in g}}
        cid = config_hash(key)[:16]
        chunks.append(Chunk(g, sum(sizes[f] for f in g), key, cid, storage.join(uri, cid)))
    if storage.exists(uri):  # earlier plans' chunks (changed files or settings), and the one-folder layout before chunks
        for name in storage.listdir(uri):
            if name not in {c.id for c in chunks} | {"_corpus_keys.json"}:
                storage.remove(storage.join(uri, name))
    return chunks


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
        storage.write_json(cache_uri, {f: {"size": stats[f].st_size, "mtime_ns": stats[f].st_mtime_ns, "key": keys[f]}
                                       for f in files if stats[f].st_mtime_ns < settled})
    return sizes, keys


def _corpus_uri(corpus: str, path: str) -> str:
    """A listed corpus file (a filesystem path) as a URI: the corpus' scheme put back."""
    return f"{corpus.split('://', 1)[0]}://{path}" if "://" in corpus and not corpus.startswith("file://") else path


def _committed_expert(uri: str, key: dict) -> tuple[list[str], int]:
    """Expert output files a previous attempt committed for the same stage 1 and cap, and their rows.
    A file cut short by a crash has no footer and is removed; a folder made for another stage 1 or
    cap is cleared."""
    marker = storage.join(uri, "_KEY.json")
    if not storage.exists(marker) or storage.read_json(marker) != key:
        storage.remove(uri)
        storage.write_json(marker, key)
        return [], 0
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


def _report(cfg, art, layout, day, s1, timings, expert_calls, cap, resumed, plan):
    run_id = layout.run_id
    cal = art.calibration.result
    res_files = [storage.join(layout.results, n) for n in parquet_files(layout.results)]
    q_files = [storage.join(layout.quarantine, n) for n in parquet_files(layout.quarantine)]
    facts = functools.partial(ops.result_facts, decision_threshold=cfg.decision_threshold)
    pairs = ([(ops.read(res_files), facts)] if res_files else []) + ([(ops.read(q_files), ops.quarantine_facts)] if q_files else [])
    fr = ops.facts(pairs, None) if pairs else {}  # results and quarantine figures in one pass
    fq = fr
    count = lambda k: fr.get(("count", k), 0)  # noqa: E731
    n_scored, n_q = count("rows"), fq.get(("count", "quarantined"), 0)
    deleg, over = count("delegated"), count("over_cap")
    D = deleg + over  # the threshold's own delegation count (the cap is a separate fallback)
    # the audited days before this one with this calibration, one per day (this run id left out: a rerun replaces it)
    history = reports.history(cfg.audit.output, calibration_hash=art.calibration_hash, exclude_run=run_id, before_day=day.isoformat())
    ep = drift_eprocess([h["delegated_by_threshold"] for h in history] + [D], [max(h["rows_scored"], 1) for h in history] + [max(n_scored, 1)],
                        cal.alpha, cfg.audit.drift_alpha)
    alarm, pval = ep["alarm"], ep["night_pvalue"]  # one rule: the e-detector (ctd/stats/drift.py); the p-value is for information
    rate = D / n_scored if n_scored else 0.0
    nights = len(history) + 1
    msg = (f"{D} of {n_scored} rows ({rate:.2%}) passed λ* (budget α = {cal.alpha:.2%}). Drift e-detector over {nights} night(s) "
           f"with this calibration: {ep['e_value']:.3g}, alarm at {ep['threshold']:g}: "
           + ("the delegation rate has drifted above α; the traffic does not look like the calibration data."
              if alarm else "consistent with the calibration.")
           + f" (This night alone: one-sided binomial p = {pval:.3g}, for information.)")
    statuses = {k: v for k, v in ops.collect_facts(fr, "status").items() if k != "(none)"}
    failures = sum(v for k, v in statuses.items() if k.startswith("error"))
    unanswered = failures + statuses.get("no_label_token", 0)  # every row that kept the probe's score
    share, limit = unanswered / max(deleg, 1), cfg.expert.max_failure_share
    judge_alarm = deleg > 0 and share > limit
    judge_msg = (f"{unanswered} of {deleg} judged rows ({share:.2%}) got no usable answer from the expert ({failures} failed, "
                 f"{unanswered - failures} without a label token) and kept the probe's score"
                 + (f": over the limit of {limit:.2%} (expert.max_failure_share)" if judge_alarm else f" (limit {limit:.2%})")
                 + ("; by reason: " + "; ".join(f"{k[7:]}: {v}" for k, v in sorted(statuses.items(), key=lambda x: -x[1])
                                              if k.startswith("error")) if failures else ""))
    g_rows, g_del, g_uns = (ops.collect_facts(fr, k) for k in ("group_rows", "group_delegated", "group_unsafe"))
    groups = [{"group": g, "rows": g_rows[g], "delegated": g_del.get(g, 0), "delegation_rate": g_del.get(g, 0) / g_rows[g],
               "unsafe_decisions": g_uns.get(g, 0)} for g in sorted(g_rows, key=lambda g: "" if g == "(none)" else g)]
    stages = [StageTiming(stage=name, seconds=round(sec, 2), rows=n, rows_per_second=round(n / sec, 1) if sec > 0 else 0.0)
              for name, (sec, n) in timings.items()]  # a resumed stage took no time: no rate
    i = None if not cal.delegates else int(np.searchsorted(cal.grid, cal.lambda_hat))
    report = AuditReport(
        run_id=run_id, audited_date=day.isoformat(), attempt=layout.attempt, created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), config_hash=job_config_hash(cfg),
        corpus=cfg.audit.corpus, model_id=art.model_id, model_fingerprint=art.model_fingerprint, layer=cfg.model.layer,
        safety_probe_hash=art.safety.content_hash, dv_probe_hash=art.dv.content_hash, calibration_uri=cfg.audit.calibration,
        calibration_hash=art.calibration_hash, alpha=cal.alpha, delta=cal.delta, lambda_star=cal.lambda_hat if cal.delegates else None,
        calibration_n=cal.n, calibration_message=cal.message,
        calibration_pvalue_at_lambda=None if i is None else float(cal.pvalues[i]) if np.isfinite(cal.pvalues[i]) else None,
        rows_read=s1.rows, rows_scored=n_scored, rows_quarantined=n_q, rows_truncated=count("truncated"),
        invariant_ok=s1.rows == n_scored + n_q, quarantine_reasons=ops.collect_facts(fq, "reason"), delegated_by_threshold=D,
        delegated=deleg, over_cap=over, budget_cap=cap, realised_rate=rate, rate_pvalue=pval,
        drift_alpha=cfg.audit.drift_alpha, drift_alarm=alarm, drift_message=msg, expert_kind=cfg.expert.kind,
        drift_history_runs=[h["run_id"] for h in history], drift_e_value=ep["e_value"], drift_e_process=ep["e_process"],
        expert_calls=expert_calls, expert_failures=failures, expert_status=statuses, expert_truncated=count("expert_truncated"),
        judge_alarm=judge_alarm, judge_message=judge_msg, expert_pool=dataclasses.asdict(plan) | {"target_met": plan.target_met}, decisions_unsafe=count("unsafe"), groups=groups, stages=stages, resumed=resumed,
        unsafe_by_judge=count("unsafe_by_judge"), judge_overruled=count("judge_overruled"), expert_tokens=count("judged_tokens"))
    hist = {c: np.array([fr.get((f"hist_{c}", f"{j:03d}"), 0) for j in range(len(e) - 1)]) for c, e in ops.HIST_BINS.items()}
    figures = {
        "dv_histogram": plot_binned({"scored rows": hist["dv"]}, ops.HIST_BINS["dv"], cal.lambda_hat, f"DV scores of run {run_id} and λ*", "d(x)"),
        "score_histogram": plot_binned({"probe p(x)": hist["probe"], "final score": hist["final"]}, ops.HIST_BINS["probe"], None,
                                       "Probe and final scores", "P(unsafe)"),
    }
    nights = (history + [reports.night(report.model_dump())])[-TREND_NIGHTS:]
    figures["history"] = plot_history(nights)
    review = None
    if cfg.audit.review_rows:
        review = ops.review(res_files, q_files, s1.files, cfg.audit.review_rows, cfg.decision_threshold, excerpt_chars=cfg.audit.excerpt_chars)
        report.review_rows = review.num_rows
    return report, figures, nights, review
