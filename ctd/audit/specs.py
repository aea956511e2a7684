"""The audit's typed specs: the job config read once, each step given only the slice it uses.

:meth:`AuditSpec.from_config` is where a config becomes a night's plan. It also refuses, before any
lease is taken or anything is written, what cannot run: a calibration or probes made for another
model, a judge whose prompt cannot be built, a corpus that is not there (each is bad input: exit 2).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

from .. import storage
from ..calibration.artifact import Reference, load_reference
from ..config import JobConfig, NotifyConfig
from ..experts.base import Expert
from ..experts.registry import expert_for
from ..hashing import digest
from ..model.artifacts import tokenizer_fingerprint
from ..model.deployment import Deployment
from ..pipeline.chunks import ScoringSpec
from ..pipeline.control import keep_share
from ..pipeline.corpus import corpus_bytes
from ..pipeline.scoring import activation_spec
from ..pipeline.watchdog import deadline_at
from ..runs.job import Night
from ..stats.cascade import Cascade
from ..stats.quality import control_plan

__all__ = ["AuditSpec", "ControlSpec", "SelectionSpec", "JudgingSpec", "ResultsSpec", "ReportSpec", "PublishSpec"]


@dataclass(frozen=True)
class ControlSpec:
    """The control sample (:mod:`ctd.pipeline.control`): the share asked for, its floor and ceiling in
    rows, and the share of rows whose text stage 1 keeps for it."""

    share: float
    floor: int
    ceiling: int
    keep: float

    def pi(self, rows: int) -> float:
        """π for a night of ``rows`` rows read (:func:`ctd.stats.quality.control_plan`; never more than
        stage 1 kept text for; 0 without a sample)."""
        if self.share <= 0 or rows <= 0:
            return 0.0
        return min(self.keep, control_plan(rows, self.share, self.floor, self.ceiling))


@dataclass(frozen=True)
class SelectionSpec:
    """Dedup, the hard budget cap (a share of the audited rows; None: no cap) and the control sample."""

    budget_cap: float | None
    broadcast_limit: int
    control: ControlSpec = ControlSpec(0.0, 0, 0, 0.0)


@dataclass(frozen=True)
class JudgingSpec:
    """The expert stage: which expert, and the commit unit a resumed run skips."""

    expert: Expert
    commit_rows: int
    max_failure_share: float


@dataclass(frozen=True)
class ResultsSpec:
    """The published rows: the cascade rule and the file size."""

    cascade: Cascade
    rows_per_file: int


@dataclass(frozen=True)
class ReportSpec:
    """What the report shows and how it alarms (``reference``: the calibration rows' probe-versus-judge
    figures, the quality alarms' yardstick; None when the scores table is not beside the artifact)."""

    review_rows: int
    excerpt_chars: int
    drift_alpha: float
    secret_envs: tuple[str, ...]
    config_hash: str
    quality_level: float = 0.005
    reference: Reference | None = None
    currency: str = "USD"

    def secrets(self) -> list[str]:
        """The secrets' values, read from the environment now (never stored)."""
        return [os.environ.get(k, "") for k in self.secret_envs]


@dataclass(frozen=True)
class PublishSpec:
    """After the manifest: whether the staging (with the delegated rows' text) is kept, and the message."""

    keep_staging: bool
    notify: NotifyConfig | None


@dataclass(frozen=True)
class WatchSpec:
    """How long a stage may wait for resources, and when the night must stop (:mod:`ctd.pipeline.watchdog`)."""

    wait_s: float | None
    deadline: _dt.datetime | None


@dataclass(frozen=True)
class AuditSpec:
    night: Night
    deployment: Deployment
    scoring: ScoringSpec
    selection: SelectionSpec
    judging: JudgingSpec
    results: ResultsSpec
    report: ReportSpec
    publishing: PublishSpec
    resume: bool
    retention_days: float | None
    watch: WatchSpec

    @classmethod
    def from_config(
        cls, cfg: JobConfig, *, run_id: str | None = None, date: str | None = None, now: _dt.datetime | None = None
    ) -> AuditSpec:
        if cfg.audit is None:
            raise ValueError("config has no 'audit' section")
        a = cfg.audit
        night = Night.plan(a, run_id=run_id, date=date, now=now)
        dep = Deployment.load(cfg.model, cfg.probes, a.calibration)  # mismatched or tampered artifacts: before any compute
        expert = expert_for(cfg.expert)
        expert.check()  # a judge whose prompt cannot be built
        corpus = night.expand(a.corpus)
        expanded = cfg.model_copy(update={"audit": a.model_copy(update={"corpus": corpus})})  # the config as run tonight
        size = corpus_bytes(corpus)  # a missing corpus is bad input (exit 2), found before the lease
        control = ControlSpec(
            a.control_share, a.control_floor, a.control_ceiling, keep_share(size, a.control_share, a.control_floor)
        )
        activation = activation_spec(
            cfg.model,
            cfg.activations,
            safety=dep.safety,
            dv=dep.dv,
            gate=dep.calibration.gate,
            keep_text="delegated",
            excerpts=a.excerpt_chars > 0 and a.review_rows > 0,  # off: stage 1 keeps no text of the flagged rows
            decision_threshold=cfg.decision_threshold,
            secret_envs=cfg.secret_envs(),
            control_day=night.day.isoformat() if control.keep > 0 else None,
            control_keep=control.keep,
        )
        return cls(
            night=night,
            deployment=dep,
            scoring=ScoringSpec(
                corpus,
                activation,
                cfg.activations,
                dep.model_fingerprint,
                tokenizer_fingerprint(dep.model_dir),
                a.stage1_chunk_bytes,
                a.rows_per_file,
            ),
            selection=SelectionSpec(a.budget_cap, a.broadcast_limit, control),
            judging=JudgingSpec(expert, a.commit_rows, cfg.expert.max_failure_share),
            results=ResultsSpec(Cascade(cfg.cascade, cfg.decision_threshold), a.rows_per_file),
            report=ReportSpec(
                a.review_rows,
                a.excerpt_chars,
                a.drift_alpha,
                cfg.secret_envs(),
                digest(expanded.model_dump(mode="json")),
                a.quality_level,
                load_reference(dep.calibration_uri, dep.calibration, cfg.decision_threshold) if control.share > 0 else None,
                a.currency,
            ),
            publishing=PublishSpec(a.keep_staging, a.notify),
            resume=a.resume,
            retention_days=a.staging_retention_days,
            watch=WatchSpec(
                None if a.unschedulable_wait_minutes is None else a.unschedulable_wait_minutes * 60,
                deadline_at(a.deadline, a.timezone, _dt.datetime.now(_dt.timezone.utc)),  # the wall clock, not `now`
            ),
        )

    @property
    def staging(self) -> str:
        return self.night.layout.staging

    def staged(self, name: str) -> str:
        """A stage's folder under the run's ``_staging/``."""
        return storage.join(self.night.layout.staging, name)
