"""The nightly audit: score every row, delegate those whose d(x) passes λ*, publish audited results.

:func:`run_audit` is the data flow, one line a step. Every per-row step is a Ray Data operation; the
driver holds counts, one boundary row, file lists, the review list (at most 4 × ``audit.review_rows``
rows), the control sample's rows (a few columns, about ``audit.control_ceiling`` at most) and, while it
is small, the set of duplicated ids.

    spec       the config read once: the night (day, run id), the deployment (model, probes and
               calibration, checked), the judge and the corpus checked: bad input exits 2 here
    lease      one writer per run id (:mod:`ctd.runs.lease`): a second driver exits 4, nothing written
    stage 1    read → validate → tokenize → activations + probes + gate, over chunks of corpus files,
               each committed alone (:func:`ctd.pipeline.scoring.run_chunked`)
    select     dedup, then the hard budget cap, and the control sample (:mod:`ctd.audit.selection`)
    judge      the sent rows and the control sample (stage 1's part=expert only) → the expert, in blocks
    rows       results and quarantine in few large files (:mod:`ctd.audit.results`)
    report     facts as distributed aggregates, the nights before, the summary (pure), the review list
    publish    manifest.json, one conditional write, last; then _staging/ is removed

Resuming: stage outputs stay under ``_staging/`` until the run is published. A rerun of the same run
id with ``resume: true`` (a new attempt) reuses every stage-1 chunk committed from the same corpus
content, model, probes, λ* and activation settings, and sends to the expert only the delegated rows
that have no committed expert score yet.
"""

from __future__ import annotations

import datetime as _dt

import pyarrow as pa

from .. import storage
from ..config import ConfigError, JobConfig
from ..log import log
from ..pipeline.chunks import ChunkedStage1, run_chunked
from ..pipeline.preflight import check_schedulable
from ..pipeline.raydata import init_ray
from ..pipeline.watchdog import watch
from ..runs.history import History, history
from ..runs.layout import sweep
from .cost import PoolUse
from .facts import collect, control_rows
from .judging import Judged, judge
from .publish import publish, write_audit_report
from .report import AuditReport
from .results import Rows, write_rows
from .review import review_night
from .selection import Selection, select
from .specs import AuditSpec
from .summary import ControlNight, NightContext, summarise

__all__ = ["run_audit"]


def run_audit(
    cfg: JobConfig, *, run_id: str | None = None, date: str | None = None, now: _dt.datetime | None = None
) -> AuditReport:
    """Audit one day's corpus (``date``: YYYY-MM-DD, default yesterday in ``audit.timezone``) into
    ``<output>/runs/<run_id>/``, as the only writer of that run id (raises :class:`ctd.runs.lease.LeaseHeld`
    when another driver holds it). The previous published run of the same id stays readable until
    this one is published."""
    spec = AuditSpec.from_config(cfg, run_id=run_id, date=date, now=now)
    init_ray(cfg.ray)
    check_schedulable(cfg)  # a request no node can ever meet: exit 2 now, not a night-long wait holding the lease
    with (
        spec.night.lease() as lease,
        watch(wait_s=spec.watch.wait_s, deadline=spec.watch.deadline, what=f"audit {spec.night.run_id}"),
    ):
        try:
            _prepare(spec)
            scored = run_chunked(spec.scoring, spec.staged("stage1"), resume=spec.resume, before_commit=lease.check)
            chosen = select(scored.stage1, spec.selection)
            judged = judge(chosen, scored, spec.judging, spec.staged("expert"), resume=spec.resume, before_commit=lease.check)
            rows = write_rows(chosen, judged.files, spec.results, spec.night.layout)
            facts = collect(rows, spec.results.cascade)
            sample = control_rows(rows) if chosen.pi > 0 else None
            before = _nights_before(spec)
            listed = review_night(rows, scored.stage1, spec.report, spec.results.cascade)
            report = summarise(_context(spec, scored, chosen, judged, rows, listed, sample), facts, before)
            files = write_audit_report(spec.night.layout, report, facts, before, listed, spec.report.secrets())
            publish(spec.night.layout, report, files, spec.publishing, before_commit=lease.check)
        except (FileNotFoundError, ConfigError) as e:
            # input was checked before the lease: a file vanishing now is a failure to retry (exit 1), not bad input (exit 2)
            raise RuntimeError(f"audit {spec.night.run_id} failed mid-run: {e}") from e
    return report


def _prepare(spec: AuditSpec) -> None:
    """Say what runs; clear the staging of a run that is not resumed; sweep abandoned runs' staging."""
    cal = spec.deployment.calibration
    lam = "never delegate" if cal.threshold is None else f"{cal.threshold:.6g}"
    log(
        f"audit {spec.night.run_id} of {spec.night.day}: α={cal.result.alpha} δ={cal.result.delta} λ*={lam} "
        f"→ {spec.night.layout.root} (attempt {spec.night.layout.attempt})"
    )
    if not spec.resume:
        storage.remove(spec.staging)
    if spec.retention_days is not None:
        try:  # abandoned runs' staging (text copies) and attempts do not outlive their retention
            sweep(spec.night.job.output, spec.retention_days)
        except Exception as e:
            log(f"retention sweep failed ({e!r}); continuing")


def _nights_before(spec: AuditSpec) -> History:
    """The published nights before this day with this calibration (a rerun of this run id replaces it)."""
    return history(
        spec.night.job.output,
        calibration_hash=spec.deployment.calibration.hash,
        exclude_run=spec.night.run_id,
        before_day=spec.night.day.isoformat(),
    )


def _context(
    spec: AuditSpec,
    scored: ChunkedStage1,
    chosen: Selection,
    judged: Judged,
    rows: Rows,
    listed: pa.Table | None,
    sample: pa.Table | None,
) -> NightContext:
    dep, cal = spec.deployment, spec.deployment.calibration
    act, terms = spec.scoring.pool, spec.judging.expert.bill_terms()
    resumed = {
        k: v
        for k, v in (
            ("stage1_rows", scored.resumed_rows),
            ("stage1_chunks", scored.resumed_chunks),
            ("expert_rows", judged.resumed_rows),
        )
        if v
    }
    return NightContext(
        run_id=spec.night.run_id,
        audited_date=spec.night.day.isoformat(),
        attempt=spec.night.layout.attempt,
        config_hash=spec.report.config_hash,
        corpus=spec.scoring.corpus,
        model_id=dep.model_id,
        model_fingerprint=dep.model_fingerprint,
        layer=dep.layer,
        safety_probe_hash=dep.safety.content_hash,
        dv_probe_hash=dep.dv.content_hash,
        calibration_uri=dep.calibration_uri,
        calibration_hash=cal.hash,
        calibration=cal.result,
        rows_read=scored.stage1.rows,
        cap=chosen.cap,
        expert_kind=spec.judging.expert.kind,
        expert_calls=judged.calls,
        expert_pool=judged.plan.to_dict(),
        pools=(
            PoolUse("activations", scored.stage1.seconds, act.max_actors, act.num_gpus, act.gpu_hour_price),
            PoolUse("judge", judged.seconds, judged.plan.replicas, terms["gpus_each"], terms["gpu_hour_price"]),
        ),
        bill_terms=terms | {"currency": spec.report.currency},
        latency=judged.latency,
        max_failure_share=spec.judging.max_failure_share,
        drift_alpha=spec.report.drift_alpha,
        timings={
            "activations": (scored.stage1.seconds, scored.rows_run),
            "select": (chosen.seconds, scored.stage1.rows),
            "expert": (judged.seconds, judged.calls),
            "merge": (rows.seconds, scored.stage1.rows),
        },
        resumed=resumed,
        review_rows=0 if listed is None else listed.num_rows,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        control=None
        if sample is None
        else ControlNight(
            chosen.pi,
            spec.selection.control.share,
            spec.selection.control.floor,
            spec.selection.control.ceiling,
            sample,
            spec.report.reference,
            spec.report.quality_level,
            spec.results.cascade,
        ),
    )
