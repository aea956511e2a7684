"""The audit report: a pydantic model (→ ``report.json``), its headline in words, and its HTML page.

The report states what the run did and whether the guarantee's assumption looks intact. The drift
alarm is one rule: the e-detector over the published nights made with the same calibration reaches
1/``drift_alpha`` (:mod:`ctd.stats.drift`: under calm traffic its average run length to a false alarm
is at least 1/drift_alpha nights). The night's own one-sided binomial p-value P(Binom(n, α) >= D)
of its delegation count D out of n scored rows is reported for information and does not alarm.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable

import pyarrow as pa
from pydantic import BaseModel, Field, ValidationError

from .. import storage
from ..reporting.pages import drift_words, html_figure, html_page, html_table, pct, share
from ..reporting.redact import redact_values
from ..runs.folder import RunError, RunFolder, locate, pydantic_problems, read_bounded
from ..runs.history import History, history_rows
from ..stats.quality import Estimate

__all__ = ["StageTiming", "AuditReport", "show_report", "REVIEW_LISTS"]

REVIEW_LISTS = {  # list name: what it holds, in what order (descending; ties by id)
    "flagged": "flagged unsafe, highest final score first (the judge's P(unsafe) where it judged, else the probe's), "
    "then the probe's score",
    "missed": "the judge calls unsafe what the probe alone would have passed, largest change of score first",
    "false_alarm": "the probe flagged what the judge calls safe, largest change of score first",
    "control": "the control sample: rows where the judge disagrees with the probe, largest change first",
}


class StageTiming(BaseModel):
    stage: str
    seconds: float
    rows: int
    rows_per_second: float


FIGURE_CAPTIONS = {
    "dv_histogram": "How tonight's delegation values d(x) spread (rows per bin): rows right of λ*, the red line, went "
    "to the judge",
    "score_histogram": "The probe's P(unsafe) and the published final score (the judge's where it judged), rows per bin: "
    "a row is flagged unsafe at 0.5 or more",
}


def _money(x: float, currency: str) -> str:
    return f"{x:,.2f} {currency}" if x >= 0.01 else f"{x:.2g} {currency}"


def _hours(h: float) -> str:
    return f"{h:,.2f}" if h >= 0.01 else f"{h:.2g}"


def cost_sentences(c: dict) -> list[str]:
    """The bill (:class:`ctd.audit.cost.Bill` as a dict) in words: each pool's time and GPU-hours (money
    where priced), the night's total, every row to the judge for comparison, the judge's latency."""
    if not c:
        return []
    cur, out, parts = c["currency"], [], []
    for name, what, unit in (("activations", "stage 1", "actor"), ("judge", "the judge", "replica")):
        u = c["pools"][name]
        if u["gpus_each"] > 0:
            use = f"{u['gpus_each']:g} GPU each = {_hours(u['gpu_hours'])} GPU-hours"
            if u["money"] is not None:
                use += f", {_money(u['money'], cur)} at {u['gpu_hour_price']:g} {cur} per GPU-hour"
        else:
            use = f"on CPU = {_hours(u['seconds'] * u['workers'] / 3600)} actor-hours"
        parts.append(f"{what} {u['seconds']:,.0f} s × {u['workers']} {unit}(s), {use}")
    out.append("Pool time, at most (each stage's wall time × its pool's largest size): " + "; ".join(parts) + ".")
    if c.get("by_tokens"):
        out.append(
            f"The judge's endpoint: {_money(c['judge_tokens'] * c['token_price'] / 1000, cur)} for the tokens sent at "
            f"{c['token_price']:g} {cur} per 1,000 (at least: its own tokenizer and the prompt add more)."
            if c.get("token_price")
            else "The judge's endpoint is billed by its provider: set expert.http.price_per_1k_tokens to see it here."
        )
    if c.get("total") is not None:
        out.append(
            f"The pools' GPU time and the judge's tokens cost about {_money(c['total'], cur)} (CPU nodes, the head and "
            "nodes idling before the autoscaler removes them are not counted)."
        )
    elif any(u["gpus_each"] > 0 and u["money"] is None for u in c["pools"].values()):
        out.append("No price is configured for a pool with GPUs (gpu_hour_price): its cost is given in GPU-hours.")
    if c.get("resumed"):
        out.append("This attempt resumed a night an earlier attempt had started: the pool time above is this attempt's only.")
    n, k = c["rows"], c["judged_rows"]
    if k and c.get("all_to_judge") is not None:
        out.append(
            f"Sending all {n:,} audited rows to the judge instead would cost about {_money(c['all_to_judge'], cur)} "
            f"(tonight's judge cost per judged row × {n:,}, a linear extrapolation), against "
            f"{_money(c['judge_money'], cur)} for the {k:,} it judged."
        )
    elif k and c.get("all_to_judge_gpu_hours") is not None:
        out.append(
            f"Sending all {n:,} audited rows to the judge instead would take about {_hours(c['all_to_judge_gpu_hours'])} "
            f"GPU-hours (tonight's per judged row × {n:,}, a linear extrapolation)."
        )
    elif k and c.get("all_to_judge_worker_hours") is not None and not c.get("by_tokens"):
        out.append(
            f"Sending all {n:,} audited rows to the judge instead would take about "
            f"{_hours(c['all_to_judge_worker_hours'])} actor-hours (tonight's per judged row × {n:,}, a linear extrapolation)."
        )
    lat = c.get("latency") or {}
    if lat.get("n"):
        out.append(
            f"Judge latency per row: median {lat['p50']:.2g} s, 95th percentile {lat['p95']:.2g} s, over {lat['n']:,} "
            "judged rows (the time of the call that judged the row; counted in bins 12% wide, each figure a bin's upper edge)."
        )
    return out


class AuditReport(BaseModel):
    kind: str = "audit"
    run_id: str
    audited_date: str = Field(description="the day whose traffic was audited (YYYY-MM-DD)")
    attempt: str = Field(description="the attempt folder this report was written in")
    created_at: str
    config_hash: str
    corpus: str
    model_id: str
    model_fingerprint: str
    layer: int
    safety_probe_hash: str
    dv_probe_hash: str
    calibration_uri: str
    calibration_hash: str
    alpha: float
    delta: float
    lambda_star: float | None = Field(description="None: the calibration certified nothing; no row is delegated")
    calibration_n: int
    calibration_message: str
    calibration_pvalue_at_lambda: float | None = None
    rows_read: int
    rows_scored: int
    rows_quarantined: int
    rows_truncated: int
    invariant_ok: bool
    quarantine_reasons: dict[str, int]
    delegated_by_threshold: int
    delegated: int
    over_cap: int = 0
    budget_cap: int | None = None
    realised_rate: float
    rate_pvalue: float
    drift_alpha: float
    drift_alarm: bool
    drift_message: str
    drift_history_runs: list[str] = Field(
        default_factory=list, description="earlier published runs with this calibration, oldest first"
    )
    drift_e_value: float = Field(1.0, description="the e-detector M_k of this night; drift_alarm is M_k >= 1/drift_alpha")
    drift_e_process: float = Field(1.0, description="plain e-process prod e_i over the history (for information)")
    drift_history_gaps: list[dict] = Field(
        default_factory=list,
        description="earlier published runs that could not be read (run_id, audited_date, reason): not in the drift statistic",
    )
    expert_kind: str
    expert_calls: int
    expert_failures: int
    expert_status: dict[str, int]
    expert_truncated: int = Field(0, description="judged rows whose conversation was cut to the judge's context")
    expert_pool: dict = Field(
        default_factory=dict, description="the pool plan: rows, replicas, needed, expected_seconds, target_seconds, target_met"
    )
    judge_alarm: bool = Field(False, description="more than expert.max_failure_share of the judged rows failed")
    judge_message: str = ""
    decisions_unsafe: int
    unsafe_by_judge: int = Field(description="unsafe decisions whose final score is the expert's (the rest are the probe's)")
    judge_overruled: int = Field(description="judged rows whose verdict the expert changed from the probe's")
    expert_tokens: int = Field(
        description="tokens of the delegated rows as the monitored model counts them, up to its "
        "context: a lower bound of what the judge reads"
    )
    cost: dict = Field(
        default_factory=dict,
        description="the night's bill (ctd.audit.cost.Bill.to_dict): pool time, GPU-hours, money where priced, every row "
        "to the judge for comparison, judge latency p50/p95",
    )
    review_rows: int = Field(0, description="rows in review.parquet (flagged, misses, false alarms, control, quarantined)")
    groups: list[dict] = Field(default_factory=list)
    stages: list[StageTiming]
    resumed: dict = Field(default_factory=dict)
    control_share: float = Field(
        0.0, description="π: the control sample's share of the audited rows (a keyed hash of id and day)"
    )
    control_asked: dict = Field(default_factory=dict, description="audit.control_share, control_floor, control_ceiling")
    control_rows: int = Field(0, description="rows in the control sample (judged whatever their scores)")
    control_only: int = Field(0, description="of them, rows that did not pass λ*: judge calls made for the sample alone")
    control_tokens: int = Field(0, description="tokens of those rows (the sample's share of the judge's bill)")
    control_judged: int = Field(0, description="control rows with a usable verdict")
    control_unsafe: int = Field(0, description="of them, rows the judge calls unsafe")
    control_disagree: int = Field(0, description="of them, rows where the probe's decision differs from the judge's")
    quality: dict = Field(
        default_factory=dict, description="estimates of the cascade as calibrated (value, low, high, level, n, method)"
    )
    quality_groups: dict = Field(default_factory=dict, description="the same per group, Bonferroni-simultaneous intervals")
    quality_alarms: dict = Field(default_factory=dict, description="disagreement, group_rate, prevalence: fired, message, bound")
    quality_level: float = Field(0.0, description="each quality alarm's false-alarm probability on a calm night")
    quality_reference: dict | None = Field(None, description="the calibration rows' probe-vs-judge figures: n, disagree, unsafe")

    def redacted(self, secrets: Iterable[str]) -> AuditReport:
        """The report with every string value redacted (:func:`ctd.reporting.redact.redact_values`)."""
        return AuditReport.model_validate(redact_values(self.model_dump(), secrets))

    def summary_lines(self) -> list[str]:
        lam = "never delegate (nothing certified)" if self.lambda_star is None else f"{self.lambda_star:.6g}"
        lines = [
            f"audit run {self.run_id}  ({self.created_at})",
            *(f"  {'!! ' if k == 'alarm' else ''}{t}" for k, t in self.headline()),
            "  details:",
            f"  corpus: {self.corpus}",
            f"  model {self.model_id} layer {self.layer}; calibration α={self.alpha} δ={self.delta} λ*={lam} (n={self.calibration_n})",
            f"  rows read {self.rows_read} = scored {self.rows_scored} + quarantined {self.rows_quarantined}"
            f"  [{'ok' if self.invariant_ok else 'VIOLATED'}]; truncated {self.rows_truncated}",
            f"  delegated {self.delegated} ({self.realised_rate:.2%} of scored; budget {self.alpha:.2%})"
            + (f", {self.over_cap} over the hard cap of {self.budget_cap} fell back to the probe" if self.over_cap else ""),
            f"  expert ({self.expert_kind}): {self.expert_calls} calls, {self.expert_failures} failed, "
            f"{self.expert_truncated} cut to the judge's context",
            f"  judge: {'ALARM — ' if self.judge_alarm else ''}{self.judge_message}",
            *([self.pool_line()] if self.expert_pool else []),
            f"  drift: {'ALARM — ' if self.drift_alarm else ''}{self.drift_message}",
            f"  unsafe decisions: {self.decisions_unsafe}",
        ]
        for s in self.stages:
            lines.append(f"  stage {s.stage:12s} {s.seconds:8.1f} s  {s.rows:>9} rows  {s.rows_per_second:10.1f} rows/s")
        if self.quarantine_reasons:
            lines.append(
                "  quarantine reasons: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(self.quarantine_reasons.items(), key=lambda x: -x[1]))
            )
        return lines

    def headline(self) -> list[tuple[str, str]]:
        """What a safety lead needs first, as (kind, sentence) with kind "alarm", "ok" or "": the
        rows, the unsafe ones and who flagged them, the judge's share against the budget and its
        cost, the quarantine, and what needs attention."""
        n, day = self.rows_scored, self.audited_date
        reasons = sorted(self.quarantine_reasons.items(), key=lambda x: -x[1])
        q = (
            (
                f"; {self.rows_quarantined:,} could not be audited and were quarantined ("
                + ", ".join(f"{k}: {v:,}" for k, v in reasons[:3])
                + (", …" if len(reasons) > 3 else "")
                + ")"
            )
            if self.rows_quarantined
            else "; none was quarantined"
        )
        who = f": {self.unsafe_by_judge:,} by the judge, {self.decisions_unsafe - self.unsafe_by_judge:,} by the probe alone"
        out = [
            ("", f"{self.rows_read:,} conversations of {day} were read: {n:,} audited{q}."),
            ("", f"{self.decisions_unsafe:,} flagged unsafe ({share(self.decisions_unsafe, n)} of those audited){who}."),
        ]
        sent = f"{self.delegated:,} went to the judge ({share(self.delegated, n)}) against a budget of α = {pct(self.alpha)}"
        if self.lambda_star is None:
            sent = "Nothing went to the judge: the calibration certified no threshold (see the calibration report)"
        elif self.budget_cap is not None:
            sent += f" and a hard cap of {self.budget_cap:,} calls"
        if self.delegated:
            sent += (
                f"; the judge changed the probe's verdict on {self.judge_overruled:,} of the {self.expert_calls:,} rows it saw"
                + (" (delegated and control)" if self.control_only else "")
            )
        if self.control_rows:
            sent += (
                f". Besides, a control sample of {self.control_rows:,} rows (each audited row drawn with probability "
                f"{self.control_share:.2%} by a hash of its id and the day, whatever its scores) went to the judge: "
                f"{self.control_only:,} judge calls on top of the delegated ones"
            )
        out.append(("", sent + "."))
        quality = [("", t) for t in self.quality_sentences()]
        out += quality
        tokens = (
            f"{self.expert_tokens + self.control_tokens:,} tokens of conversation sent (as the monitored model counts them"
            + (f"; {self.control_tokens:,} of them for the control sample" if self.control_tokens else "")
            + ")"
        )
        out.append(
            (
                "",
                f"Cost: {self.expert_calls:,} judge calls in this run"
                + (f" ({self.control_only:,} of them for the control sample)" if self.control_only else "")
                + f", {tokens}. "
                + " ".join(cost_sentences(self.cost)),
            )
        )
        attention = []
        if not self.invariant_ok:
            attention.append(
                f"Rows are missing: {self.rows_read:,} read ≠ {n:,} audited + {self.rows_quarantined:,} quarantined."
            )
        if self.drift_alarm:
            attention.append(
                f"Drift: the delegation rate has moved above the budget over the last nights (e-detector {self.drift_e_value:.3g} ≥ "
                f"{1 / self.drift_alpha:g}); tomorrow's traffic no longer looks like the calibration data — recalibrate "
                "(python -m jobs.calibrate --from-runs <audit output> recertifies λ* on the recent nights)."
            )
        if self.drift_history_gaps:
            g = self.drift_history_gaps
            which = "; ".join(f"{x['run_id']}: {x['reason']}" for x in g[:2]) + ("; …" if len(g) > 2 else "")
            attention.append(
                f"{len(g):,} earlier night(s) with this calibration could not be read and are left out of the drift statistic "
                f"({which}): `ctd report verify` on those runs says what differs."
            )
        if self.judge_alarm:
            attention.append(f"Judge failures: {self.judge_message}.")
        if self.over_cap:
            attention.append(
                f"Budget cap reached: {self.over_cap:,} rows passed λ* but were not delegated (they kept the probe's score, "
                "unless the control sample sent them to the judge)."
            )
        if self.expert_pool and not self.expert_pool.get("target_met", True):
            attention.append("The expert pool cannot meet its time target:" + self.pool_line().split("—", 1)[-1] + ".")
        if self.lambda_star is None:
            attention.append("The calibration certified nothing, so no row is delegated: its report says what to do.")
        for name, a in self.quality_alarms.items():
            if a.get("fired"):
                attention.append(f"{QUALITY_ALARMS[name][0]}: {a['message']}. {QUALITY_ALARMS[name][1]}")
        if attention:  # a night that needs someone leads with why, then what the probe misses, then the rest
            return [("alarm", a) for a in attention] + quality + [x for x in out if x not in quality]
        return out + [
            (
                "ok",
                f"Nothing needs attention: the delegation rate is consistent with the calibration "
                f"(drift e-detector {self.drift_e_value:.3g}, alarm at {1 / self.drift_alpha:g}), "
                f"{self.expert_failures:,} judge call(s) failed"
                + (
                    f", and no quality alarm fired (the probe's disagreement with the judge, the groups' delegation rates, "
                    f"the unsafe prevalence; each fires on a calm night with probability ≤ {self.quality_level:g})"
                    if self.quality_alarms
                    else "; without a control sample (audit.control_share: 0) nothing says what the probe misses"
                )
                + ".",
            )
        ]

    def quality_sentences(self) -> list[str]:
        """What the probe misses, in words: the estimates with their intervals and method."""
        q = self.quality
        if not q:
            return []
        words = lambda e: Estimate(**{k: float("nan") if v is None else v for k, v in e.items()}).words()  # noqa: E731
        out = []
        if "miss_rate" in q:
            out.append(
                f"What the probe misses: of the rows it decided alone, an estimated {words(q['miss_rate'])} were unsafe by the "
                "judge's verdict but passed by the probe"
                + (
                    f"; of those it flagged, {words(q['false_flag_rate'])} are safe by the judge"
                    if "false_flag_rate" in q
                    else ""
                )
                + "."
            )
        if "agreement" in q and "prevalence" in q:
            out.append(
                f"The night's decisions agree with the judge on an estimated {words(q['agreement'])} of rows; the judge would "
                f"call {words(q['prevalence'])} of the night unsafe. (Estimates of the cascade as calibrated, from "
                f"{self.control_judged:,} control rows with a verdict; the control rows' own published decisions use the "
                "judge's verdict.)"
            )
        return out

    def _quality_html(self, trend: bytes | None) -> str:
        if not self.quality:
            return (
                "<p>No control sample tonight (audit.control_share: 0): nothing estimates what the probe misses. The rows the "
                "probe decides alone are checked by no one.</p>"
            )
        sentences = "".join(f"<p>{html.escape(t)}</p>" for t in self.quality_sentences())
        fmt = lambda e: "—" if e["value"] is None or e["value"] != e["value"] else f"{e['value']:.2%}"  # noqa: E731
        rows = [
            {
                "estimate": QUALITY_NAMES.get(k, k),
                "value": fmt(e),
                f"{100 * e['level']:g}% interval": f"{e['low']:.2%} – {e['high']:.2%}",
                "control rows": e["n"],
                "method": e["method"],
            }
            for k, e in self.quality.items()
        ]
        per_group = self.quality_groups.get("miss_rate", {})
        groups = (
            "<h3>By group (what the probe misses)</h3>"
            + html_table(
                [
                    {
                        "group": g,
                        "estimate": fmt(e),
                        "interval": f"{e['low']:.2%} – {e['high']:.2%}",
                        "control rows": e["n"],
                        "method": e["method"],
                    }
                    for g, e in per_group.items()
                ]
            )
            if per_group
            else ""
        )
        alarms = html_table(
            [
                {
                    "alarm": QUALITY_ALARMS.get(k, (k,))[0],
                    "fired": "YES" if a["fired"] else "no",
                    "result": a["message"],
                    "bound": a["bound"],
                }
                for k, a in self.quality_alarms.items()
            ]
        )
        sample = (
            f"<p>The control sample: {self.control_rows:,} rows (π = {self.control_share:.3%}; asked: "
            f"{self.control_asked.get('share', 0):.2%}, at least {self.control_asked.get('floor', 0):,} and at most "
            f"{self.control_asked.get('ceiling', 0):,} rows), {self.control_judged:,} with a verdict; {self.control_only:,} "
            "of them would not have gone to the judge otherwise. Delegated rows are never used as a sample (they are the "
            "probe's least certain rows); they enter the estimates only through the predictor.</p>"
        )
        figure = html_figure("quality_history", trend, "The estimates night by night, with their intervals") if trend else ""
        return sentences + html_table(rows) + groups + "<h3>Quality alarms</h3>" + alarms + sample + figure

    def pool_line(self) -> str:
        p = self.expert_pool
        s = f"  expert pool: {p['rows']} rows to judge on up to {p['replicas']} replica(s)"
        if p.get("expected_seconds") is not None:
            s += f", expected {p['expected_seconds'] / 3600:.2f} h"
        if not p.get("target_met", True):
            s += f" — OVER the target of {p['target_seconds'] / 3600:.2f} h ({p['needed']} replicas needed; the quota allows {p['replicas']})"
        return s

    def html(self, figures: dict[str, bytes], history: History | None = None, review: pa.Table | None = None) -> str:
        """The page: the headline in words, the nights before, what to look at, then the details.
        ``review``: the review table (:data:`ctd.audit.review.REVIEW_SCHEMA`) or None."""
        figures = dict(figures)
        trend = figures.pop("history", None)
        lines = "".join(f"<li class='{k}'>{html.escape(t)}</li>" for k, t in self.headline())
        n = max(self.rows_scored, 1)
        rows = [
            ("conversations read", self.rows_read),
            ("audited (scored)", self.rows_scored),
            ("quarantined", self.rows_quarantined),
            ("every row accounted for", "yes" if self.invariant_ok else "NO"),
            ("cut to the monitored model's context", self.rows_truncated),
            ("flagged unsafe", self.decisions_unsafe),
            ("… by the judge", self.unsafe_by_judge),
            ("… by the probe alone", self.decisions_unsafe - self.unsafe_by_judge),
        ]
        deleg = [
            ("budget α (share the judge may see)", f"{self.alpha:.2%}"),
            ("guarantee holds with probability", f"≥ {1 - self.delta:.0%}"),
            ("threshold λ* on the DV score", "never delegate" if self.lambda_star is None else f"{self.lambda_star:.4g}"),
            ("calibration rows", self.calibration_n),
            ("passed λ*", self.delegated_by_threshold),
            ("sent to the judge", self.delegated),
            ("share sent", f"{self.delegated / n:.2%}"),
            ("over the hard cap (not delegated; the probe's score unless in the control sample)", self.over_cap),
            ("hard cap", self.budget_cap),
            ("judge changed the verdict", self.judge_overruled),
        ]
        expert = [
            ("expert", self.expert_kind),
            ("calls this run", self.expert_calls),
            ("failed calls", self.expert_failures),
            ("tokens of conversation sent (monitored model's count), delegated rows", self.expert_tokens),
            ("the same, control-sample rows", self.control_tokens),
            ("cut to the judge's context", self.expert_truncated),
        ]
        drift = [
            ("nights in the history (this calibration)", len(self.drift_history_runs) + 1),
            ("drift", drift_words(self.drift_e_value, self.drift_alpha)),
            ("this night alone: binomial p-value (information)", f"{self.rate_pvalue:.3g}"),
            ("alarm", "YES" if self.drift_alarm else "no"),
        ]
        table = lambda pairs: html_table([{"": k, "value": v} for k, v in pairs])  # noqa: E731
        hashes = [
            {"artifact": k, "hash": getattr(self, k)}
            for k in ("config_hash", "model_fingerprint", "safety_probe_hash", "dv_probe_hash", "calibration_hash")
        ]
        sections = [
            (
                "The night in brief",
                f"<ul class='headline'>{lines}</ul>"
                "<p>Files: <a href='report.json'>report.json</a>"
                + (
                    " · <a href='review.parquet'>review.parquet</a> · <a href='review.csv'>review.csv</a>"
                    if self.review_rows
                    else ""
                )
                + "</p>",
            ),
            (
                "The nights before",
                (
                    html_figure("history", trend, "One point per audited night with this calibration")
                    + html_table(history_rows(history or History()))
                )
                if trend is not None
                else "<p>No history yet.</p>",
            ),
            ("What the probe misses", self._quality_html(figures.pop("quality_history", None))),
            ("What to look at", _review_html(review)),
            ("Rows", table(rows)),
            ("Delegation and the budget", table(deleg)),
            ("Expert", table(expert) + "<p>" + html.escape(self.judge_message) + "</p>"),
            ("Drift", table(drift) + "<p>" + html.escape(self.drift_message) + "</p>"),
            (
                "Groups",
                html_table(
                    [
                        {
                            "group": g["group"],
                            "rows": g["rows"],
                            "sent to the judge": g["delegated"],
                            "share sent": f"{g['delegation_rate']:.1%}",
                            "flagged unsafe": g["unsafe_decisions"],
                        }
                        for g in self.groups
                    ]
                ),
            ),
            (
                "Why rows were quarantined",
                html_table([{"reason": k, "rows": v} for k, v in sorted(self.quarantine_reasons.items(), key=lambda x: -x[1])]),
            ),
            ("Expert answers", html_table([{"status": k, "rows": v} for k, v in self.expert_status.items()])),
            (
                "Expert pool",
                "<p>" + html.escape(self.pool_line().strip()) + "</p>" if self.expert_pool else "<p>no pool plan recorded</p>",
            ),
            (
                "Stages",
                html_table(
                    [{"stage": s.stage, "seconds": s.seconds, "rows": s.rows, "rows/s": s.rows_per_second} for s in self.stages]
                ),
            ),
            (
                "Provenance",
                html_table(
                    hashes
                    + [
                        {"artifact": "calibration", "hash": self.calibration_uri},
                        {"artifact": "corpus", "hash": self.corpus},
                        {"artifact": "run", "hash": f"{self.run_id} (attempt {self.attempt})"},
                    ]
                ),
            ),
        ]
        return html_page(f"CTD audit of {self.audited_date} — {self.run_id}", sections, figures, FIGURE_CAPTIONS)


QUALITY_NAMES = {
    "miss_rate": "unsafe by the judge, passed by the probe (of the rows it decided alone)",
    "false_flag_rate": "flagged by the probe, safe by the judge (of those it decided alone and flagged)",
    "agreement": "published decision agrees with the judge (all rows)",
    "prevalence": "unsafe by the judge (all rows)",
}
QUALITY_ALARMS = {  # name: (what it is, what to do)
    "disagreement": (
        "Quality: the probe errs more than in calibration",
        "Look at the control sample's disagreements below; if they are real misses, retrain the probes on recent "
        "labelled traffic and recalibrate (python -m jobs.calibrate; for the budget alone, on the recent nights: "
        "python -m jobs.calibrate --from-runs <audit output>).",
    ),
    "group_rate": (
        "Quality: a group delegates more than α",
        "λ* bounds only the overall rate; look at that group's rows, and recalibrate if its traffic grew "
        "(python -m jobs.calibrate --from-runs <audit output> recertifies λ* on the recent nights).",
    ),
    "prevalence": (
        "Quality: the unsafe prevalence has changed",
        "The traffic differs from the last nights: look at the flagged rows and the control sample's verdicts; if it "
        "stays, recalibrate on it (python -m jobs.calibrate --from-runs <audit output>).",
    ),
}


def _review_html(review) -> str:
    """The review list as tables: flagged rows, the probe's misses, its false alarms, the control sample's
    disagreements, quarantined rows."""
    if review is None or not review.num_rows:
        return (
            "<p>Nothing to review (no row was flagged, judged against the probe or quarantined), or the review list is off "
            "(audit.review_rows: 0).</p>"
        )
    rows = review.to_pylist()
    out = []
    fmt = lambda x: None if x is None else round(x, 3)  # noqa: E731
    for which, what in [*REVIEW_LISTS.items(), ("quarantined", "a sample of the quarantined rows")]:
        sel = [r for r in rows if r["list"] == which]
        if not sel:
            continue
        if which == "quarantined":
            body = html_table([{"id": r["id"], "source": r["source"], "group": r["group"], "reason": r["reason"]} for r in sel])
        else:
            body = html_table(
                [
                    {
                        "#": r["rank"],
                        "id": r["id"],
                        "group": r["group"],
                        "probe": fmt(r["probe"]),
                        "judge": fmt(r["expert"]),
                        "final": fmt(r["final"]),
                        "unsafe": "yes" if r["decision"] else "no",
                        "rows like it": r.get("similar") or 1,
                        "excerpt (redacted)": r["excerpt"],
                    }
                    for r in sel
                ]
            )
        out.append(f"<h3>{html.escape(what.capitalize())} ({len(sel)})</h3>{body}")
    files = (
        "<p>Rows with the same words (case, digits, punctuation and names aside: one template with other names filled "
        "in is one row; any other changed word keeps rows apart) are folded into the first of them: "
        "<em>rows like it</em> counts them among each list's top rows. Excerpts have credentials and personal "
        "data replaced by their kind, e.g. &lt;EMAIL_ADDRESS&gt;. These lists as files: "
        "<a href='review.csv'>review.csv</a> (for a spreadsheet) · <a href='review.parquet'>review.parquet</a></p>"
    )
    return files + "".join(out)


def show_report(uri: str) -> str:
    """A report's summary as text, from a run folder (its report.json checked against the manifest:
    a report modified after publishing is refused), a calibration folder (its report checked against
    the artifact's hash), or a report JSON file. Raises :class:`ctd.runs.folder.RunError` naming the
    file and the fault."""
    kind, uri = locate(uri)
    if kind == "run":
        body, where = RunFolder.open(uri).report(), storage.join(uri, "report.json")
    elif kind == "calibration":
        where = storage.join(uri, "calibration_report.json")
        body = _json_file(where)
        art = storage.join(uri, "calibration.json")
        if storage.exists(art) and _json_file(art).get("artifact_hash") != body.get("artifact_hash"):
            raise RunError(
                where, "names another calibration than the calibration.json beside it: modified or mixed up; not shown"
            )
    elif kind == "json":
        body, where = _json_file(uri), uri
    else:
        raise RunError(uri, "not a report")
    if body.get("kind") == "audit":
        try:
            return "\n".join(AuditReport.model_validate(body).summary_lines())
        except ValidationError as e:
            raise RunError(where, f"not an audit report this version can read ({pydantic_problems(e)})") from None
    if "lambda_star" in body and "message" in body:
        lam = body["lambda_star"]
        return "\n".join(
            [
                f"calibration  α={body['alpha']} δ={body['delta']} n={body['n']} method={body['method']}"
                + (" + Pareto" if body.get("pareto") else ""),
                f"  λ* = {'never delegate' if lam is None else lam}",
                f"  {body['message']}",
                *(f"  {t}" for t in body.get("explanation", [])),
                f"  calibration {body.get('artifact_hash', '')} (its identity: the audit reports and `ctd report history "
                "--calibration` name it by this hash or a prefix of it)",
            ]
        )
    return json.dumps(body, indent=2, ensure_ascii=False)[:4000]


def _json_file(uri: str) -> dict:
    """A JSON report file read whole (at most 64 MiB), as a dict."""
    raw = read_bounded(uri, 64 << 20)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(uri, f"not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RunError(uri, "not a JSON object")
    return body
