"""The night in numbers and words: facts and the nights before → the audit report. Pure: no Ray, no I/O.

Each rule that a report states is a small function of counts, unit-tested on its own:

    drift_check    the drift alarm: one rule, the e-detector over the nights with this calibration
                   (:mod:`ctd.stats.drift`); the night's own binomial p-value is for information
    judge_check    the judge alarm: more than ``max_failure_share`` of the judged rows got no usable
                   answer (failed, or no label token) and kept the probe's score
    group_rows     rows, delegation and unsafe decisions per group
    quality_check  what the probe misses, from the control sample (:mod:`ctd.stats.quality`): the
                   estimates with their intervals, overall and per group, and the three quality alarms
    summarise      all of it, with the run's identity, into :class:`ctd.audit.report.AuditReport`
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..calibration.artifact import Reference
from ..experts.prompt import ExpertStatus
from ..runs.history import History
from ..stats.calibrate import CalibrationResult
from ..stats.cascade import Cascade
from ..stats.drift import drift_eprocess
from ..stats.quality import (
    ESTIMATES,
    Alarm,
    Estimate,
    Sums,
    by_group,
    disagreement_alarm,
    estimate,
    group_rate_alarm,
    prevalence_alarm,
)
from .cost import Bill, PoolUse
from .facts import Facts, quality_view
from .report import AuditReport, StageTiming

__all__ = [
    "DriftCheck",
    "JudgeCheck",
    "QualityCheck",
    "ControlNight",
    "drift_check",
    "judge_check",
    "quality_check",
    "group_rows",
    "stage_timings",
    "NightContext",
    "summarise",
]

TRAILING_NIGHTS = 7  # the prevalence alarm's yardstick: the control samples of the last week's nights
INTERVAL_LEVEL = 0.95


@dataclass(frozen=True)
class DriftCheck:
    alarm: bool
    e_value: float
    e_process: float
    night_pvalue: float
    nights: int
    message: str


def drift_check(history: list[dict], passed: int, audited: int, alpha: float, level: float) -> DriftCheck:
    """The drift alarm over the nights before (``history``: their ``delegated_by_threshold`` and
    ``rows_scored``, oldest first) and tonight (``passed`` of ``audited`` rows passed λ*)."""
    ep = drift_eprocess(
        [h["delegated_by_threshold"] for h in history] + [passed],
        [max(h["rows_scored"], 1) for h in history] + [max(audited, 1)],
        alpha,
        level,
    )
    rate, nights = passed / audited if audited else 0.0, len(history) + 1
    msg = (
        f"{passed} of {audited} rows ({rate:.2%}) passed λ* (budget α = {alpha:.2%}). Drift e-detector over {nights} night(s) "
        f"with this calibration: {ep['e_value']:.3g}, alarm at {ep['threshold']:g}: "
        + (
            "the delegation rate has drifted above α; the traffic does not look like the calibration data."
            if ep["alarm"]
            else "consistent with the calibration."
        )
        + f" (This night alone: one-sided binomial p = {ep['night_pvalue']:.3g}, for information.)"
    )
    return DriftCheck(ep["alarm"], ep["e_value"], ep["e_process"], ep["night_pvalue"], nights, msg)


@dataclass(frozen=True)
class JudgeCheck:
    alarm: bool
    failures: int  # calls that failed
    unanswered: int  # failed, or answered without a label token: they kept the probe's score
    message: str


def judge_check(statuses: dict[str, int], judged: int, limit: float) -> JudgeCheck:
    """The judge alarm: more than ``limit`` of the ``judged`` rows got no usable answer."""
    parsed = {k: ExpertStatus.parse(k) for k in statuses}
    errors = {parsed[k].detail: n for k, n in statuses.items() if parsed[k].kind == "error"}
    failures = sum(errors.values())
    unanswered = sum(n for k, n in statuses.items() if not parsed[k].usable)
    share = unanswered / max(judged, 1)
    alarm = judged > 0 and share > limit
    msg = (
        f"{unanswered} of {judged} judged rows ({share:.2%}) got no usable answer from the expert ({failures} failed, "
        f"{unanswered - failures} without a label token) and kept the probe's score"
        + (f": over the limit of {limit:.2%} (expert.max_failure_share)" if alarm else f" (limit {limit:.2%})")
        + ("; by reason: " + "; ".join(f"{k}: {v}" for k, v in sorted(errors.items(), key=lambda x: -x[1])) if failures else "")
    )
    return JudgeCheck(alarm, failures, unanswered, msg)


@dataclass(frozen=True)
class ControlNight:
    """The control sample of a night: π, what was asked for, its rows (a few columns of each:
    :data:`ctd.audit.facts.CONTROL_COLUMNS`) and the calibration's probe-versus-judge figures."""

    pi: float
    share: float
    floor: int
    ceiling: int
    rows: pa.Table
    reference: Reference | None
    level: float
    cascade: Cascade = field(default_factory=Cascade)


@dataclass(frozen=True)
class QualityCheck:
    judged: int  # control rows with a usable verdict
    unsafe: int  # of them, the judge calls unsafe
    disagree: int  # of them, the probe's decision differs from the judge's
    estimates: dict[str, Estimate]
    groups: dict[str, dict]  # estimate → group → Estimate
    alarms: dict[str, Alarm]


def quality_check(control: ControlNight, facts: Facts, history: History, alpha: float) -> QualityCheck:
    """The estimates of what the probe misses (:mod:`ctd.stats.quality`: PPI++ from the control rows'
    verdicts and the night's sums; the delegated rows never as a sample), per group with Bonferroni
    intervals, and the three quality alarms at ``control.level``."""
    v = quality_view(control.rows, control.cascade)
    ok = ~np.isnan(v.verdict)
    judged, unsafe = int(ok.sum()), int((v.verdict[ok] == 1).sum())
    disagree = int((v.flagged[ok] != (v.verdict[ok] == 1)).sum())
    args = (v.score, v.flagged, v.delegated, v.verdict)
    groups_of = np.asarray(control.rows.column("group").to_pylist(), dtype=object) if control.rows.num_rows else np.array([])
    estimates, groups = {}, {}
    for name in ESTIMATES:
        sums = facts.quality_sums.get(name, {})
        total = sum(sums.values(), start=Sums()) if sums else None
        estimates[name] = estimate(name, *args, published=v.published, level=INTERVAL_LEVEL, sums=total)
        if len(sums) > 1 or (sums and None not in sums):
            groups[name] = by_group(
                name, *args, groups_of, published=v.published, level=INTERVAL_LEVEL, simultaneous=True, sums=sums
            )
    ref = control.reference
    prior = [h for h in history.nights if h.get("control_judged")][-TRAILING_NIGHTS:]
    alarms = {
        "disagreement": disagreement_alarm(disagree, judged, ref.disagree if ref else 0, ref.n if ref else 0, control.level),
        "group_rate": group_rate_alarm(
            {g: f.delegated for g, f in facts.groups.items()},
            {g: f.rows for g, f in facts.groups.items()},
            alpha,
            control.level,
            ref.groups if ref else None,
        ),
        "prevalence": prevalence_alarm(
            unsafe, judged, sum(h["control_unsafe"] for h in prior), sum(h["control_judged"] for h in prior), control.level
        ),
    }
    return QualityCheck(judged, unsafe, disagree, estimates, groups, alarms)


def group_rows(facts: Facts) -> list[dict]:
    """One row per group ("(none)" for rows without one, first), as the report lists them."""
    order = sorted(facts.groups, key=lambda g: "" if g is None else g)
    return [
        {
            "group": "(none)" if g is None else g,
            "rows": f.rows,
            "delegated": f.delegated,
            "delegation_rate": f.delegated / f.rows,
            "unsafe_decisions": f.unsafe,
        }
        for g in order
        for f in [facts.groups[g]]
    ]


def stage_timings(timings: dict[str, tuple[float, int]]) -> list[StageTiming]:
    """{stage: (seconds, rows)} as report rows; a stage that took no time (resumed) has no rate."""
    return [
        StageTiming(stage=name, seconds=round(sec, 2), rows=n, rows_per_second=round(n / sec, 1) if sec > 0 else 0.0)
        for name, (sec, n) in timings.items()
    ]


@dataclass(frozen=True)
class NightContext:
    """What the report says about the run besides its facts: identity, calibration, the expert's
    bill and pool, the cap, what was resumed and how long each stage took."""

    run_id: str
    audited_date: str
    attempt: str
    config_hash: str
    corpus: str
    model_id: str
    model_fingerprint: str
    layer: int
    safety_probe_hash: str
    dv_probe_hash: str
    calibration_uri: str
    calibration_hash: str
    calibration: CalibrationResult
    rows_read: int
    cap: int | None
    expert_kind: str
    expert_calls: int
    expert_pool: dict
    max_failure_share: float
    drift_alpha: float
    timings: dict[str, tuple[float, int]]
    resumed: dict
    review_rows: int
    created_at: str
    control: ControlNight | None = None
    pools: tuple[PoolUse, PoolUse] | None = None  # activations, judge: their stages' time (ctd.audit.cost)
    bill_terms: dict = field(default_factory=dict)  # the judge's Expert.bill_terms() and audit.currency
    latency: dict | None = None  # the judged rows' latency quantiles


def bill(ctx: NightContext, rows: int, judge_tokens: int) -> dict:
    """The night's :class:`ctd.audit.cost.Bill` as the report keeps it ({} without pool timings)."""
    if ctx.pools is None:
        return {}
    t = ctx.bill_terms
    return Bill(
        currency=t.get("currency", "USD"),
        activations=ctx.pools[0],
        judge=ctx.pools[1],
        judged_rows=ctx.expert_calls,
        rows=rows,
        judge_tokens=judge_tokens,
        token_price=t.get("token_price"),
        by_tokens=bool(t.get("by_tokens")),
        latency=ctx.latency,
        resumed=bool(ctx.resumed),
    ).to_dict()


def summarise(ctx: NightContext, facts: Facts, history: History) -> AuditReport:
    """The audit report of one night (``history``: the nights before with this calibration, and the
    runs among them that could not be read)."""
    cal = ctx.calibration
    scored, deleg, over = facts["rows"], facts["delegated"], facts["over_cap"]
    passed = deleg + over  # the threshold's own delegation count (the cap is a separate fallback)
    drift = drift_check(history.nights, passed, scored, cal.alpha, ctx.drift_alpha)
    judge = judge_check(facts.statuses, facts["judged"] or deleg, ctx.max_failure_share)
    quality = quality_check(ctx.control, facts, history, cal.alpha) if ctx.control is not None and ctx.control.pi > 0 else None
    i = int(np.searchsorted(cal.grid, cal.lambda_hat)) if cal.delegates else None
    p_at = None if i is None or not np.isfinite(cal.pvalues[i]) else float(cal.pvalues[i])
    return AuditReport(
        run_id=ctx.run_id,
        audited_date=ctx.audited_date,
        attempt=ctx.attempt,
        created_at=ctx.created_at,
        config_hash=ctx.config_hash,
        corpus=ctx.corpus,
        model_id=ctx.model_id,
        model_fingerprint=ctx.model_fingerprint,
        layer=ctx.layer,
        safety_probe_hash=ctx.safety_probe_hash,
        dv_probe_hash=ctx.dv_probe_hash,
        calibration_uri=ctx.calibration_uri,
        calibration_hash=ctx.calibration_hash,
        # the calibration
        alpha=cal.alpha,
        delta=cal.delta,
        lambda_star=cal.lambda_hat if cal.delegates else None,
        calibration_n=cal.n,
        calibration_message=cal.message,
        calibration_pvalue_at_lambda=p_at,
        # the rows
        rows_read=ctx.rows_read,
        rows_scored=scored,
        rows_quarantined=facts["quarantined"],
        rows_truncated=facts["truncated"],
        invariant_ok=ctx.rows_read == scored + facts["quarantined"],
        quarantine_reasons=facts.reasons,
        # the delegation and the drift alarm
        delegated_by_threshold=passed,
        delegated=deleg,
        over_cap=over,
        budget_cap=ctx.cap,
        realised_rate=passed / scored if scored else 0.0,
        rate_pvalue=drift.night_pvalue,
        drift_alpha=ctx.drift_alpha,
        drift_alarm=drift.alarm,
        drift_message=drift.message,
        drift_history_runs=[h["run_id"] for h in history.nights],
        drift_history_gaps=[{"run_id": g.run_id, "audited_date": g.audited_date, "reason": g.reason} for g in history.gaps],
        drift_e_value=drift.e_value,
        drift_e_process=drift.e_process,
        # the expert and the judge alarm
        expert_kind=ctx.expert_kind,
        expert_calls=ctx.expert_calls,
        expert_failures=judge.failures,
        expert_status=facts.statuses,
        expert_truncated=facts["expert_truncated"],
        expert_pool=ctx.expert_pool,
        judge_alarm=judge.alarm,
        judge_message=judge.message,
        expert_tokens=facts["judged_tokens"],
        cost=bill(ctx, scored, facts["judged_tokens"] + facts["control_tokens"]),
        # the decisions
        decisions_unsafe=facts["unsafe"],
        unsafe_by_judge=facts["unsafe_by_judge"],
        judge_overruled=facts["judge_overruled"],
        groups=group_rows(facts),
        stages=stage_timings(ctx.timings),
        resumed=ctx.resumed,
        review_rows=ctx.review_rows,
        # the control sample and what the probe misses
        control_share=ctx.control.pi if ctx.control else 0.0,
        control_asked=(
            {"share": ctx.control.share, "floor": ctx.control.floor, "ceiling": ctx.control.ceiling} if ctx.control else {}
        ),
        control_rows=facts["control"],
        control_only=facts["control_only"],
        control_tokens=facts["control_tokens"],
        control_judged=quality.judged if quality else 0,
        control_unsafe=quality.unsafe if quality else 0,
        control_disagree=quality.disagree if quality else 0,
        quality={k: e.to_dict() for k, e in quality.estimates.items()} if quality else {},
        quality_groups=(
            {k: {"(none)" if g is None else str(g): e.to_dict() for g, e in by.items()} for k, by in quality.groups.items()}
            if quality
            else {}
        ),
        quality_alarms={k: a.to_dict() for k, a in quality.alarms.items()} if quality else {},
        quality_level=ctx.control.level if ctx.control else 0.0,
        quality_reference=(
            {"n": ctx.control.reference.n, "disagree": ctx.control.reference.disagree, "unsafe": ctx.control.reference.unsafe}
            if ctx.control and ctx.control.reference
            else None
        ),
    )
