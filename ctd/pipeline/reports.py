"""The audit report (a pydantic model → JSON, and an HTML page with plots) and report fetching.

The report states what the run did and whether the guarantee's assumption looks intact. The drift
alarm is one rule: the e-detector over the published nights made with the same calibration reaches
1/``drift_alpha`` (:mod:`ctd.stats.drift`: under calm traffic its average run length to a false alarm
is at least 1/drift_alpha nights). The night's own one-sided binomial p-value P(Binom(n, α) >= D)
of its delegation count D out of n scored rows is reported for information and does not alarm.
"""

from __future__ import annotations

import html
import json
import os
from typing import Optional

from pydantic import BaseModel, Field

from .. import storage
from ..report import html_figure, html_page, html_table, pct
from .runs import MANIFEST

__all__ = ["StageTiming", "AuditReport", "fetch_report", "show_report", "REPORT_FILES", "history", "history_text", "history_rows", "night"]

REPORT_FILES = ("report.json", "report.html", "review.parquet", "calibration_report.json", "calibration_report.html", "calibration.json",
                "training_report.json", "manifest.json")


class StageTiming(BaseModel):
    stage: str
    seconds: float
    rows: int
    rows_per_second: float


class AuditReport(BaseModel):
    kind: str = "audit"
    run_id: str
    audited_date: Optional[str] = Field(None, description="the day whose traffic was audited (YYYY-MM-DD)")
    attempt: Optional[str] = Field(None, description="the attempt folder this report was written in")
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
    lambda_star: Optional[float] = Field(description="None: the calibration certified nothing; no row is delegated")
    calibration_n: int
    calibration_message: str
    calibration_pvalue_at_lambda: Optional[float] = None
    rows_read: int
    rows_scored: int
    rows_quarantined: int
    rows_truncated: int
    invariant_ok: bool
    quarantine_reasons: dict[str, int]
    delegated_by_threshold: int
    delegated: int
    over_cap: int = 0
    budget_cap: Optional[int] = None
    realised_rate: float
    rate_pvalue: float
    drift_alpha: float
    drift_alarm: bool
    drift_message: str
    drift_history_runs: list[str] = Field(default_factory=list, description="earlier published runs with this calibration, oldest first")
    drift_e_value: float = Field(1.0, description="the e-detector M_k of this night; drift_alarm is M_k >= 1/drift_alpha")
    drift_e_process: float = Field(1.0, description="plain e-process prod e_i over the history (for information)")
    expert_kind: str
    expert_calls: int
    expert_failures: int
    expert_status: dict[str, int]
    expert_truncated: int = Field(0, description="judged rows whose conversation was cut to the judge's context")
    expert_pool: dict = Field(default_factory=dict, description="the pool plan: rows, replicas, needed, expected_seconds, target_seconds, target_met")
    judge_alarm: bool = Field(False, description="more than expert.max_failure_share of the judged rows failed")
    judge_message: str = ""
    decisions_unsafe: int
    # None in reports written before these were counted
    unsafe_by_judge: Optional[int] = Field(None, description="unsafe decisions whose final score is the expert's (the rest are the probe's)")
    judge_overruled: Optional[int] = Field(None, description="judged rows whose verdict the expert changed from the probe's")
    expert_tokens: Optional[int] = Field(None, description="tokens of the delegated rows as the monitored model counts them, up to its "
                                         "context: a lower bound of what the judge reads")
    review_rows: int = Field(0, description="rows in review.parquet (flagged, disagreements, quarantined)")
    groups: list[dict] = Field(default_factory=list)
    stages: list[StageTiming]
    resumed: dict = Field(default_factory=dict)

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
            f"  expert ({self.expert_kind}): {self.expert_calls} calls, {self.expert_failures} failed, {self.expert_truncated} cut to the judge's context",
            f"  judge: {'ALARM — ' if self.judge_alarm else ''}{self.judge_message}",
            *([self.pool_line()] if self.expert_pool else []),
            f"  drift: {'ALARM — ' if self.drift_alarm else ''}{self.drift_message}",
            f"  unsafe decisions: {self.decisions_unsafe}",
        ]
        for s in self.stages:
            lines.append(f"  stage {s.stage:12s} {s.seconds:8.1f} s  {s.rows:>9} rows  {s.rows_per_second:10.1f} rows/s")
        if self.quarantine_reasons:
            lines.append("  quarantine reasons: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.quarantine_reasons.items(), key=lambda x: -x[1])))
        return lines

    def headline(self) -> list[tuple[str, str]]:
        """What a safety lead needs first, as (kind, sentence) with kind "alarm", "ok" or "": the
        rows, the unsafe ones and who flagged them, the judge's share against the budget and its
        cost, the quarantine, and what needs attention."""
        n, day = self.rows_scored, self.audited_date or self.created_at[:10]
        reasons = sorted(self.quarantine_reasons.items(), key=lambda x: -x[1])
        q = (f"; {self.rows_quarantined:,} could not be audited and were quarantined ("
             + ", ".join(f"{k}: {v:,}" for k, v in reasons[:3]) + (", …" if len(reasons) > 3 else "") + ")") if self.rows_quarantined else \
            "; none was quarantined"
        who = ("" if self.unsafe_by_judge is None else
               f": {self.unsafe_by_judge:,} by the judge, {self.decisions_unsafe - self.unsafe_by_judge:,} by the probe alone")
        out = [("", f"{self.rows_read:,} conversations of {day} were read: {n:,} audited{q}."),
               ("", f"{self.decisions_unsafe:,} flagged unsafe ({_share(self.decisions_unsafe, n)} of those audited){who}.")]
        sent = f"{self.delegated:,} went to the judge ({_share(self.delegated, n)}) against a budget of α = {pct(self.alpha)}"
        if self.lambda_star is None:
            sent = "Nothing went to the judge: the calibration certified no threshold (see the calibration report)"
        elif self.budget_cap is not None:
            sent += f" and a hard cap of {self.budget_cap:,} calls"
        if self.delegated and self.judge_overruled is not None:
            sent += f"; the judge changed the probe's verdict on {self.judge_overruled:,} of them"
        out.append(("", sent + "."))
        secs = next((s.seconds for s in self.stages if s.stage == "expert"), 0.0)
        reps = self.expert_pool.get("replicas") if self.expert_pool else None
        busy = secs * (reps or 0)
        tokens = "" if self.expert_tokens is None else f"{self.expert_tokens:,} tokens of conversation sent (as the monitored model counts them), "
        out.append(("", f"Cost: {self.expert_calls:,} judge calls in this run, {tokens}"
                        f"{secs:,.0f} s of the expert stage" + (f" on up to {reps} replica(s) (at most "
                                                                + (f"{busy / 3600:.2f} replica-hours)" if busy >= 360 else f"{busy:,.0f} replica-seconds)")
                                                                if reps else "") + "."))
        attention = []
        if not self.invariant_ok:
            attention.append(f"Rows are missing: {self.rows_read:,} read ≠ {n:,} audited + {self.rows_quarantined:,} quarantined.")
        if self.drift_alarm:
            attention.append(f"Drift: the delegation rate has moved above the budget over the last nights (e-detector {self.drift_e_value:.3g} ≥ "
                             f"{1 / self.drift_alpha:g}); tomorrow's traffic no longer looks like the calibration data — recalibrate.")
        if self.judge_alarm:
            attention.append(f"Judge failures: {self.judge_message}.")
        if self.over_cap:
            attention.append(f"Budget cap reached: {self.over_cap:,} rows passed λ* but kept the probe's score.")
        if self.expert_pool and not self.expert_pool.get("target_met", True):
            attention.append("The expert pool cannot meet its time target:" + self.pool_line().split("—", 1)[-1] + ".")
        if self.lambda_star is None:
            attention.append("The calibration certified nothing, so no row is delegated: its report says what to do.")
        out += [("alarm", a) for a in attention] or [("ok", f"Nothing needs attention: the delegation rate is consistent with the calibration "
                                                           f"(drift e-detector {self.drift_e_value:.3g}, alarm at {1 / self.drift_alpha:g}) and "
                                                           f"{self.expert_failures:,} judge call(s) failed.")]
        return out

    def pool_line(self) -> str:
        p = self.expert_pool
        s = f"  expert pool: {p['rows']} rows to judge on up to {p['replicas']} replica(s)"
        if p.get("expected_seconds") is not None:
            s += f", expected {p['expected_seconds'] / 3600:.2f} h"
        if not p.get("target_met", True):
            s += f" — OVER the target of {p['target_seconds'] / 3600:.2f} h ({p['needed']} replicas needed; the quota allows {p['replicas']})"
        return s

    def html(self, figures: dict[str, bytes], history: list[dict] | None = None, review=None) -> str:
        """The page: the headline in words, the nights before, what to look at, then the details.
        ``review``: the review table (:data:`ctd.pipeline.ops.REVIEW_SCHEMA`) or None."""
        figures = dict(figures)
        trend = figures.pop("history", None)
        lines = "".join(f"<li class='{k}'>{html.escape(t)}</li>" for k, t in self.headline())
        n = max(self.rows_scored, 1)
        rows = [("conversations read", self.rows_read), ("audited (scored)", self.rows_scored), ("quarantined", self.rows_quarantined),
                ("every row accounted for", "yes" if self.invariant_ok else "NO"), ("cut to the monitored model's context", self.rows_truncated),
                ("flagged unsafe", self.decisions_unsafe), ("… by the judge", self.unsafe_by_judge),
                ("… by the probe alone", None if self.unsafe_by_judge is None else self.decisions_unsafe - self.unsafe_by_judge)]
        deleg = [("budget α (share the judge may see)", f"{self.alpha:.2%}"), ("guarantee holds with probability", f"≥ {1 - self.delta:.0%}"),
                 ("threshold λ* on the DV score", "never delegate" if self.lambda_star is None else f"{self.lambda_star:.4g}"),
                 ("calibration rows", self.calibration_n), ("passed λ*", self.delegated_by_threshold),
                 ("sent to the judge", self.delegated), ("share sent", f"{self.delegated / n:.2%}"),
                 ("over the hard cap (kept the probe's score)", self.over_cap), ("hard cap", self.budget_cap),
                 ("judge changed the verdict", self.judge_overruled)]
        expert = [("expert", self.expert_kind), ("calls this run", self.expert_calls), ("failed calls", self.expert_failures),
                  ("tokens of conversation sent (monitored model's count)", self.expert_tokens), ("cut to the judge's context", self.expert_truncated)]
        drift = [("nights in the history (this calibration)", len(self.drift_history_runs) + 1),
                 ("e-detector (alarm at 1/level)", f"{self.drift_e_value:.3g} (alarm at {1 / self.drift_alpha:g})"),
                 ("this night alone: binomial p-value (information)", f"{self.rate_pvalue:.3g}"), ("alarm", "YES" if self.drift_alarm else "no")]
        table = lambda pairs: html_table([{"": k, "value": v} for k, v in pairs])  # noqa: E731
        hashes = [{"artifact": k, "hash": getattr(self, k)} for k in ("config_hash", "model_fingerprint", "safety_probe_hash", "dv_probe_hash",
                                                                     "calibration_hash")]
        sections = [
            ("The night in brief", f"<ul class='headline'>{lines}</ul>"
             "<p>Files: <a href='report.json'>report.json</a>" + (" · <a href='review.parquet'>review.parquet</a>" if self.review_rows else "")
             + "</p>"),
            ("The nights before", (html_figure("history", trend, "One point per audited night with this calibration")
                                   + html_table(history_rows(history or []))) if trend is not None else "<p>No history yet.</p>"),
            ("What to look at", _review_html(review)),
            ("Rows", table(rows)), ("Delegation and the budget", table(deleg)), ("Expert", table(expert)
                                                                                 + "<p>" + html.escape(self.judge_message) + "</p>"),
            ("Drift", table(drift) + "<p>" + html.escape(self.drift_message) + "</p>"),
            ("Groups", html_table([{"group": g["group"], "rows": g["rows"], "sent to the judge": g["delegated"],
                                    "share sent": f"{g['delegation_rate']:.1%}", "flagged unsafe": g["unsafe_decisions"]} for g in self.groups])),
            ("Why rows were quarantined", html_table([{"reason": k, "rows": v} for k, v in sorted(self.quarantine_reasons.items(), key=lambda x: -x[1])])),
            ("Expert answers", html_table([{"status": k, "rows": v} for k, v in self.expert_status.items()])),
            ("Expert pool", "<p>" + html.escape(self.pool_line().strip()) + "</p>" if self.expert_pool else "<p>no pool plan recorded</p>"),
            ("Stages", html_table([{"stage": s.stage, "seconds": s.seconds, "rows": s.rows, "rows/s": s.rows_per_second} for s in self.stages])),
            ("Provenance", html_table(hashes + [{"artifact": "calibration", "hash": self.calibration_uri}, {"artifact": "corpus", "hash": self.corpus},
                                                {"artifact": "run", "hash": f"{self.run_id} (attempt {self.attempt})"}])),
        ]
        return html_page(f"CTD audit of {self.audited_date or self.created_at[:10]} — {self.run_id}", sections, figures)


def _share(k: int, n: int) -> str:
    return f"{k / n:.1%}" if n else "—"



def _review_html(review) -> str:
    """The review list as tables: flagged rows, disagreements, quarantined rows."""
    from .ops import REVIEW_LISTS

    if review is None or not review.num_rows:
        return "<p>Nothing to review (no row was flagged, judged against the probe or quarantined), or the review list is off " \
               "(audit.review_rows: 0).</p>"
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
            body = html_table([{"#": r["rank"], "id": r["id"], "group": r["group"], "probe": fmt(r["probe"]), "judge": fmt(r["expert"]),
                                "final": fmt(r["final"]), "unsafe": "yes" if r["decision"] else "no", "excerpt (redacted)": r["excerpt"]}
                               for r in sel])
        out.append(f"<h3>{html.escape(what.capitalize())} ({len(sel)})</h3>{body}")
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# the nights before: one row per audited day
# ----------------------------------------------------------------------------------------------
NIGHT_FIELDS = ("run_id", "audited_date", "created_at", "rows_read", "rows_scored", "rows_quarantined", "delegated_by_threshold", "delegated",
                "expert_calls", "decisions_unsafe", "alpha", "delta", "drift_e_value", "drift_alpha", "drift_alarm", "judge_alarm",
                "calibration_hash")


def night(report: dict) -> dict:
    """The fields of one audit report that the trend draws."""
    r = {k: report.get(k) for k in NIGHT_FIELDS}
    r["audited_date"] = r["audited_date"] or report["created_at"][:10]
    r["drift_e_value"] = 1.0 if r["drift_e_value"] is None else r["drift_e_value"]
    return r


def history(output: str, *, calibration_hash: str | None = None, exclude_run: str | None = None, before_day: str | None = None,
            last: int | None = None) -> list[dict]:
    """Published audit runs under ``output`` made with one calibration (default: the latest audited
    day's; a prefix of the hash is enough), one per audited day (the latest published run of each
    day: a rerun replaces a night, it does not add one), oldest first; only days before
    ``before_day`` when given (an audit of day D, backfilled or rerun, sees the nights before D);
    at most the ``last`` nights. Reads one report.json per run, concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    from .runs import list_runs, run_file

    def read(rid):
        try:
            r = storage.read_json(run_file(output, rid, "report.json"))
        except (FileNotFoundError, ValueError):
            return None
        return night(r) if r.get("kind") == "audit" else None

    with ThreadPoolExecutor(16) as pool:
        nights = [h for h in pool.map(read, [r for r in list_runs(output) if r != exclude_run]) if h is not None]
    if calibration_hash is None and nights:
        calibration_hash = max(nights, key=lambda h: (h["audited_date"], h["created_at"]))["calibration_hash"]
    elif calibration_hash is not None:  # a prefix names one calibration
        full = sorted({h["calibration_hash"] for h in nights if str(h["calibration_hash"] or "").startswith(calibration_hash)})
        if len(full) > 1:
            raise ValueError(f"calibration {calibration_hash!r} matches {len(full)} calibrations ({', '.join(full)}): give more of the hash")
        calibration_hash = full[0] if full else calibration_hash
    by_day: dict[str, dict] = {}
    for h in nights:
        d = h["audited_date"]
        if (h["calibration_hash"] == calibration_hash and (before_day is None or d < before_day)
                and (d not in by_day or by_day[d]["created_at"] < h["created_at"])):
            by_day[d] = h
    out = sorted(by_day.values(), key=lambda h: h["audited_date"])
    return out[-last:] if last else out


def history_rows(nights: list[dict]) -> list[dict]:
    """The trend as table rows (terminal and page): one per night."""
    rows = []
    for h in nights:
        n, read = max(h["rows_scored"], 1), max(h["rows_read"], 1)
        rows.append({"night": h["audited_date"], "run": h["run_id"], "audited": h["rows_scored"],
                     "delegation rate": f"{h['delegated_by_threshold'] / n:.2%}", "budget α": f"{h['alpha']:.2%}",
                     "judge calls": h["expert_calls"], "unsafe": f"{h['decisions_unsafe'] / n:.2%}",
                     "quarantined": f"{h['rows_quarantined'] / read:.2%}",
                     "drift e-detector": f"{h['drift_e_value']:.3g} / {1 / h['drift_alpha']:g}" + (" ALARM" if h["drift_alarm"] else ""),
                     })
    return rows


def history_text(nights: list[dict]) -> str:
    """The trend in the terminal (``ctd report history``)."""
    if not nights:
        return "no published audit runs"
    rows = history_rows(nights)
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).rjust(width[c]) if i else str(r[c]).ljust(width[c]) for i, c in enumerate(cols))  # noqa: E731
    head = (f"{len(nights)} audited night(s) with calibration {nights[-1]['calibration_hash'][:12]}… "
            f"(α = {nights[-1]['alpha']:.2%}, δ = {nights[-1]['delta']}); drift e-detector / alarm level")
    return "\n".join([head, line({c: c for c in cols}), *(line(r) for r in rows)])


def _report_files(uri: str) -> dict[str, str]:
    """{name: URI} of the report files at ``uri``: a published run's (through its manifest), or a
    calibration/training folder's. A run folder without a manifest is refused: it is not published."""
    names = storage.listdir(uri)
    if MANIFEST in names:
        m = storage.read_json(storage.join(uri, MANIFEST))
        if m.get("format") == "ctd.run/v1":  # published before attempts: report files beside the manifest
            return {n: storage.join(uri, n) for n in names if n in REPORT_FILES or n.endswith(".png")}
        files = {e["file"].rsplit("/", 1)[-1]: storage.join(uri, e["file"]) for e in m.get("report", [])}
        return files | {MANIFEST: storage.join(uri, MANIFEST)}
    if "attempts" in names or "_lease.json" in names:  # a run folder (a calibration folder may have _staging)
        raise FileNotFoundError(f"run at {uri} is not published (no manifest): it is incomplete or being written")
    return {n: storage.join(uri, n) for n in names if n in REPORT_FILES or n.endswith(".png")}


def fetch_report(uri: str, to: str = ".") -> list[str]:
    """Download the report files of a published run (``<output>/runs/<id>``) or a calibration folder."""
    uri = uri.rstrip("/")
    files = _report_files(uri)
    if not files:
        raise FileNotFoundError(f"no report at {uri}")
    dest = os.path.join(to, os.path.basename(uri))
    os.makedirs(dest, exist_ok=True)
    out = []
    for n, src in sorted(files.items()):
        p = os.path.join(dest, n)
        with open(p, "wb") as f:
            f.write(storage.read_bytes(src))
        out.append(p)
    return out


def show_report(uri: str) -> str:
    """A report's summary as text (from a run folder, a calibration folder, or a JSON file)."""
    uri = uri.rstrip("/")
    if uri.endswith(".json"):
        body = storage.read_json(uri)
    else:
        files = _report_files(uri)
        name = next((n for n in ("report.json", "calibration_report.json", "training_report.json") if n in files), None)
        if name is None:
            raise FileNotFoundError(f"no report at {uri}")
        body = storage.read_json(files[name])
    if body.get("kind") == "audit":
        return "\n".join(AuditReport.model_validate(body).summary_lines())
    if "lambda_star" in body and "message" in body:
        lam = body["lambda_star"]
        return "\n".join([
            f"calibration  α={body['alpha']} δ={body['delta']} n={body['n']} method={body['method']}{' + Pareto' if body.get('pareto') else ''}",
            f"  λ* = {'never delegate' if lam is None else lam}",
            f"  {body['message']}",
            *(f"  {t}" for t in body.get("explanation", [])),
            f"  artifact hash {body.get('artifact_hash', '')[:16]}…",
        ])
    return json.dumps(body, indent=2)[:4000]
