"""The night in numbers and words: facts and the nights before → the audit report. Pure: no Ray, no I/O.

Each rule that a report states is a small function of counts, unit-tested on its own:

    drift_check    the drift alarm: one rule, the e-detector over the nights with this calibration
                   (:mod:`ctd.stats.drift`); the night's own binomial p-value is for information
    judge_check    the judge alarm: more than ``max_failure_share`` of the judged rows got no usable
                   answer (failed, or no label token) and kept the probe's score
    group_rows     rows, delegation and unsafe decisions per group
    summarise      all of it, with the run's identity, into :class:`ctd.audit.report.AuditReport`
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..experts.prompt import ExpertStatus
from ..runs.history import History
from ..stats.calibrate import CalibrationResult
from ..stats.drift import drift_eprocess
from .facts import Facts
from .report import AuditReport, StageTiming

__all__ = ["DriftCheck", "JudgeCheck", "drift_check", "judge_check", "group_rows", "stage_timings", "NightContext", "summarise"]


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


def summarise(ctx: NightContext, facts: Facts, history: History) -> AuditReport:
    """The audit report of one night (``history``: the nights before with this calibration, and the
    runs among them that could not be read)."""
    cal = ctx.calibration
    scored, deleg, over = facts["rows"], facts["delegated"], facts["over_cap"]
    passed = deleg + over  # the threshold's own delegation count (the cap is a separate fallback)
    drift = drift_check(history.nights, passed, scored, cal.alpha, ctx.drift_alpha)
    judge = judge_check(facts.statuses, deleg, ctx.max_failure_share)
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
        # the decisions
        decisions_unsafe=facts["unsafe"],
        unsafe_by_judge=facts["unsafe_by_judge"],
        judge_overruled=facts["judge_overruled"],
        groups=group_rows(facts),
        stages=stage_timings(ctx.timings),
        resumed=ctx.resumed,
        review_rows=ctx.review_rows,
    )
