"""The audit report (a pydantic model → JSON, and an HTML page with plots) and report fetching.

The report states what the run did and whether the guarantee's assumption looks intact. The drift
alarm is one rule: the e-detector over the published nights made with the same calibration reaches
1/``drift_alpha`` (:mod:`ctd.stats.drift`: under calm traffic its average run length to a false alarm
is at least 1/drift_alpha nights). The night's own one-sided binomial p-value P(Binom(n, α) >= D)
of its delegation count D out of n scored rows is reported for information and does not alarm.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from pydantic import BaseModel, Field

from .. import storage
from ..report import html_page, html_table
from .runs import MANIFEST

__all__ = ["StageTiming", "AuditReport", "fetch_report", "show_report", "REPORT_FILES"]

REPORT_FILES = ("report.json", "report.html", "calibration_report.json", "calibration_report.html", "calibration.json",
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
    groups: list[dict] = Field(default_factory=list)
    stages: list[StageTiming]
    resumed: dict = Field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        lam = "never delegate (nothing certified)" if self.lambda_star is None else f"{self.lambda_star:.6g}"
        lines = [
            f"audit run {self.run_id}  ({self.created_at})",
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

    def pool_line(self) -> str:
        p = self.expert_pool
        s = f"  expert pool: {p['rows']} rows to judge on up to {p['replicas']} replica(s)"
        if p.get("expected_seconds") is not None:
            s += f", expected {p['expected_seconds'] / 3600:.2f} h"
        if not p.get("target_met", True):
            s += f" — OVER the target of {p['target_seconds'] / 3600:.2f} h ({p['needed']} replicas needed; the quota allows {p['replicas']})"
        return s

    def html(self, figures: dict[str, bytes]) -> str:
        d = self.model_dump()
        alarm = f"<p class='{'alarm' if self.drift_alarm else 'ok'}'>{'DRIFT ALARM: ' if self.drift_alarm else ''}{self.drift_message}</p>"
        alarm += f"<p class='{'alarm' if self.judge_alarm else 'ok'}'>{'JUDGE ALARM: ' if self.judge_alarm else ''}{self.judge_message}</p>"
        overview = [{"quantity": k, "value": d[k]} for k in (
            "run_id", "created_at", "corpus", "model_id", "layer", "alpha", "delta", "lambda_star", "calibration_n", "rows_read", "rows_scored",
            "rows_quarantined", "rows_truncated", "invariant_ok", "delegated", "over_cap", "realised_rate", "rate_pvalue", "expert_kind",
            "expert_calls", "expert_failures", "expert_truncated", "decisions_unsafe")]
        hashes = [{"artifact": k, "hash": d[k]} for k in ("config_hash", "model_fingerprint", "safety_probe_hash", "dv_probe_hash", "calibration_hash")]
        sections = [
            ("Summary", alarm + html_table(overview)),
            ("Stages", html_table([s.model_dump() for s in self.stages])),
            ("Groups", html_table(self.groups)),
            ("Quarantine reasons", html_table([{"reason": k, "rows": v} for k, v in self.quarantine_reasons.items()])),
            ("Expert status", html_table([{"status": k, "rows": v} for k, v in self.expert_status.items()])),
            ("Expert pool", "<p>" + self.pool_line().strip() + "</p>" if self.expert_pool else "<p>no pool plan recorded</p>"),
            ("Provenance", html_table(hashes)),
        ]
        return html_page(f"CTD audit {self.run_id}", sections, figures)


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
            f"  artifact hash {body.get('artifact_hash', '')[:16]}…",
        ])
    return json.dumps(body, indent=2)[:4000]
