"""The nightly audit: score every row, delegate those whose DV passes λ*, publish audited results.

Before any compute the job refuses artifacts that do not fit: probes whose model fingerprint,
layer or feature size differ from the configured model, and a calibration artifact that fails its
integrity check or was made for other probes or another model. It then runs the job graph of
:mod:`ctd.pipeline.graph`, checks that rows read = rows scored + rows quarantined, writes the
report, and publishes the run with its manifest (last).

Resuming: stage outputs stay under ``_staging/``. A rerun of the same run id with ``resume: true``
reuses a finished stage 1 made from the same corpus, model, probes and λ*, and sends to the expert
only the delegated rows that have no expert score yet.
"""

from __future__ import annotations

import collections
import datetime as _dt

import numpy as np
import pyarrow as pa

from .. import storage
from ..artifacts import config_hash, model_fingerprint
from ..calibration import load_calibration
from ..config import JobConfig, expand_dates, expand_run_id, resolve_model_path
from ..config import config_hash as job_config_hash
from ..probes import LinearProbe
from ..report import plot_histogram, write_report
from ..stats.drift import drift_eprocess
from ..stats.pvalues import binomial_upper_pvalue
from ..tables import read_parquet
from .graph import (Stage1, activation_spec, apply_budget_cap, find_duplicates, init_ray, log, merge_and_write, run_expert_stage,
                    run_stage1, stage1_columns)
from .reports import AuditReport, StageTiming
from .runs import RunLayout, list_runs, parquet_files

__all__ = ["run_audit", "check_artifacts", "Artifacts"]


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


def _stage1_key(cfg: JobConfig, art: Artifacts, lam) -> dict:
    from .corpus import list_corpus_files

    fs, files, _ = list_corpus_files(cfg.audit.corpus)
    sizes = {f: fs.size(f) for f in files}
    return {"corpus": cfg.audit.corpus, "files": sizes, "model": art.model_fingerprint, "layer": cfg.model.layer,
            "safety": art.safety.content_hash, "dv": art.dv.content_hash, "lambda_star": None if lam is None else float(lam),
            "max_length": cfg.model.max_length}


def _resumable_stage1(layout: RunLayout, key: dict) -> Stage1 | None:
    marker = storage.join(layout.staging, "stage1", "_SUCCESS.json")
    if not storage.exists(marker):
        return None
    m = storage.read_json(marker)
    if m.get("key") != key:
        return None
    files = [storage.join(layout.staging, "stage1", n) for n in parquet_files(storage.join(layout.staging, "stage1"))]
    if sorted(files) != sorted(m["files"]):
        return None
    return Stage1(storage.join(layout.staging, "stage1"), m["rows"], 0.0, files)


def _resumable_expert(uri: str) -> pa.Table | None:
    """Expert scores already committed: every readable Parquet file in the expert staging folder
    (a file cut short by a crash has no footer and is removed)."""
    from .experts import EXPERT_SCHEMA

    tables = []
    for name in parquet_files(uri):
        f = storage.join(uri, name)
        try:
            tables.append(read_parquet(f).cast(EXPERT_SCHEMA))
        except Exception:
            log(f"resume: removing unreadable partial file {f}")
            storage.remove(f)
    if not tables:
        return None
    t = pa.concat_tables(tables)
    # one score per id, even if a retried task wrote a row twice
    ids = t.column("id").to_pylist()
    first = {}
    for i, rid in enumerate(ids):
        first.setdefault(rid, i)
    return t.take(pa.array(sorted(first.values())))


def run_audit(cfg: JobConfig, *, run_id: str | None = None, now: _dt.datetime | None = None) -> AuditReport:
    if cfg.audit is None:
        raise ValueError("config has no 'audit' section")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    cfg = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"corpus": expand_dates(cfg.audit.corpus, now)})})
    a = cfg.audit
    run_id = expand_run_id(run_id or a.run_id, now)
    layout = RunLayout(a.output, run_id)
    art = check_artifacts(cfg, a.calibration)  # refuses mismatches before any compute
    cal = art.calibration.result
    lam = art.calibration.lambda_star if cal.delegates else None
    log(f"audit {run_id}: α={cal.alpha} δ={cal.delta} λ*={'never delegate' if lam is None else f'{lam:.6g}'} → {layout.root}")
    init_ray(cfg)
    layout.unpublish(keep_staging=a.resume)
    if not a.resume:
        storage.remove(layout.staging)
    key = _stage1_key(cfg, art, lam)
    resumed = {}
    s1 = _resumable_stage1(layout, key) if a.resume else None
    if s1 is not None:
        log(f"resume: stage 1 already done ({s1.rows} rows), reusing it")
        resumed["stage1_rows"] = s1.rows
    else:
        storage.remove(layout.path("_staging", "expert"))
        spec = activation_spec(cfg, lambda_star=np.inf if lam is None else lam)
        s1 = run_stage1(cfg, a.corpus, layout.path("_staging", "stage1"), spec)
        storage.write_json(layout.path("_staging", "stage1", "_SUCCESS.json"), {"key": key, "rows": s1.rows, "files": s1.files})

    t = stage1_columns(s1, ["id", "error", "dv", "delegated", "truncated"])
    dups = find_duplicates(t)
    valid = np.asarray(t.column("error").is_null().to_numpy(zero_copy_only=False), dtype=bool)
    ids = t.column("id").to_pylist()
    not_dup = np.array([i not in dups for i in ids], dtype=bool)
    n_scored_expected = int((valid & not_dup).sum())
    delegated = np.asarray(t.column("delegated").to_numpy(zero_copy_only=False), dtype=bool) & valid & not_dup
    over_cap, cap = apply_budget_cap(t, a.budget_cap, n_scored_expected, dups)
    n_to_expert = int(delegated.sum()) - len(over_cap)
    if over_cap:
        log(f"budget cap: {int(delegated.sum())} rows pass λ*, the cap allows {cap}; {len(over_cap)} fall back to the probe")

    expert_uri = layout.path("_staging", "expert")
    done = _resumable_expert(expert_uri) if a.resume else None
    if done is not None:
        log(f"resume: {done.num_rows} expert scores already committed")
        resumed["expert_rows"] = done.num_rows
    calls_before = 0 if done is None else done.num_rows
    expert, t2 = run_expert_stage(cfg, s1, expert_uri, exclude=set(dups) | over_cap, n_expected=n_to_expert,
                                  n_rows=n_scored_expected, alpha=cal.alpha, done=done, commit_rows=a.commit_rows)
    log("stage 3: merge → results and quarantine")
    t3 = merge_and_write(cfg, s1, expert, duplicates=dups, over_cap=over_cap, results_uri=layout.results, quarantine_uri=layout.quarantine,
                         n_results=n_scored_expected, n_quarantine=s1.rows - n_scored_expected)

    report, figures = _report(cfg, art, layout, run_id, s1, t2, t3, n_to_expert, expert, calls_before, cap, over_cap, resumed)
    files = write_report(layout.root, "report", report.model_dump(), report.html(figures), figures)
    if not report.invariant_ok:
        raise RuntimeError(f"row invariant violated: read {report.rows_read} != scored {report.rows_scored} + "
                           f"quarantined {report.rows_quarantined}; run {run_id} is not published")
    layout.publish({"rows_read": report.rows_read, "rows_scored": report.rows_scored, "rows_quarantined": report.rows_quarantined,
                    "delegated": report.delegated, "drift_alarm": report.drift_alarm}, [storage.local_path(f) or f for f in files.values()])
    log(f"published {layout.root} (manifest written last)")
    for line in report.summary_lines():
        print(line, flush=True)
    log(f"report: {files['html']}")
    return report


def _history(output: str, run_id: str, calibration_hash: str) -> list[dict]:
    """Earlier published audits made with the same calibration, oldest first (this run id excluded:
    a rerun replaces it)."""
    out = []
    for rid in list_runs(output):
        if rid == run_id:
            continue
        try:
            r = storage.read_json(RunLayout(output, rid).path("report.json"))
        except (FileNotFoundError, ValueError):
            continue
        if r.get("kind") == "audit" and r.get("calibration_hash") == calibration_hash:
            out.append({"run_id": rid, "created_at": r["created_at"], "delegated_by_threshold": r["delegated_by_threshold"],
                        "rows_scored": r["rows_scored"]})
    return sorted(out, key=lambda h: h["created_at"])


def _read_results(layout: RunLayout, columns) -> pa.Table:
    tables = [read_parquet(storage.join(layout.results, n), columns) for n in parquet_files(layout.results)]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def _report(cfg, art, layout, run_id, s1, t2, t3, n_to_expert, expert, calls_before, cap, over_cap, resumed):
    cal = art.calibration.result
    res = _read_results(layout, ["id", "group", "dv", "probe", "final", "delegated", "over_cap", "expert_status", "decision", "truncated"])
    q_files = [storage.join(layout.quarantine, n) for n in parquet_files(layout.quarantine)]
    quarantine = pa.concat_tables([read_parquet(f, ["error"]) for f in q_files]) if q_files else pa.table({"error": pa.array([], pa.string())})
    n_scored, n_q = res.num_rows, quarantine.num_rows
    reasons = collections.Counter(str(e).split(" (")[0] for e in quarantine.column("error").to_pylist())
    deleg = np.asarray(res.column("delegated").to_numpy(zero_copy_only=False), dtype=bool)
    by_threshold = int(deleg.sum()) + len(over_cap)
    D = int(deleg.sum()) + len(over_cap)  # the threshold's own delegation count (the cap is a separate fallback)
    pval = float(binomial_upper_pvalue(D, max(n_scored, 1), cal.alpha)) if n_scored else 1.0
    history = _history(cfg.audit.output, run_id, art.calibration_hash)
    ep = drift_eprocess([h["delegated_by_threshold"] for h in history] + [D], [max(h["rows_scored"], 1) for h in history] + [max(n_scored, 1)],
                        cal.alpha, cfg.audit.drift_alpha)
    alarm = pval < cfg.audit.drift_alpha or ep["alarm"]
    rate = D / n_scored if n_scored else 0.0
    msg = (f"{D} of {n_scored} rows ({rate:.2%}) passed λ*; under the guarantee (rate ≤ α = {cal.alpha:.2%}) a count this large "
           f"has p = {pval:.3g}" + (f" < {cfg.audit.drift_alpha}: the traffic does not look like the calibration data."
                                     if alarm else f" ≥ {cfg.audit.drift_alpha}: consistent with the calibration."))
    statuses = collections.Counter(s for s in res.column("expert_status").to_pylist() if s is not None)
    groups = []
    g = np.asarray([x if x is not None else "" for x in res.column("group").to_pylist()], dtype=object)
    dec = np.asarray(res.column("decision").to_numpy(zero_copy_only=False), dtype=bool)
    for name in sorted(set(g.tolist())):
        m = g == name
        groups.append({"group": name or "(none)", "rows": int(m.sum()), "delegated": int(deleg[m].sum()),
                       "delegation_rate": float(deleg[m].mean()), "unsafe_decisions": int(dec[m].sum())})
    stages = [StageTiming(stage="activations", seconds=round(s1.seconds, 2), rows=s1.rows, rows_per_second=round(s1.rows / max(s1.seconds, 1e-9), 1)),
              StageTiming(stage="expert", seconds=round(t2, 2), rows=n_to_expert, rows_per_second=round(n_to_expert / max(t2, 1e-9), 1)),
              StageTiming(stage="merge", seconds=round(t3, 2), rows=n_scored + n_q, rows_per_second=round((n_scored + n_q) / max(t3, 1e-9), 1))]
    i = None if not cal.delegates else int(np.searchsorted(cal.grid, cal.lambda_hat))
    report = AuditReport(
        run_id=run_id, created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), config_hash=job_config_hash(cfg),
        corpus=cfg.audit.corpus, model_id=art.model_id, model_fingerprint=art.model_fingerprint, layer=cfg.model.layer,
        safety_probe_hash=art.safety.content_hash, dv_probe_hash=art.dv.content_hash, calibration_uri=cfg.audit.calibration,
        calibration_hash=art.calibration_hash, alpha=cal.alpha, delta=cal.delta, lambda_star=cal.lambda_hat if cal.delegates else None,
        calibration_n=cal.n, calibration_message=cal.message,
        calibration_pvalue_at_lambda=None if i is None else float(cal.pvalues[i]) if np.isfinite(cal.pvalues[i]) else None,
        rows_read=s1.rows, rows_scored=n_scored, rows_quarantined=n_q,
        rows_truncated=int(np.sum(np.asarray(res.column("truncated").to_numpy(zero_copy_only=False), dtype=bool))),
        invariant_ok=s1.rows == n_scored + n_q, quarantine_reasons=dict(reasons), delegated_by_threshold=by_threshold,
        delegated=int(deleg.sum()), over_cap=len(over_cap), budget_cap=cap, realised_rate=rate, rate_pvalue=pval,
        drift_alpha=cfg.audit.drift_alpha, drift_alarm=alarm, drift_message=msg, expert_kind=cfg.expert.kind,
        drift_history_runs=[h["run_id"] for h in history], drift_e_value=ep["e_value"], drift_eprocess_alarm=ep["alarm"],
        expert_calls=expert.num_rows - calls_before, expert_failures=sum(v for k, v in statuses.items() if k.startswith("error")),
        expert_status=dict(statuses), decisions_unsafe=int(dec.sum()), groups=groups, stages=stages, resumed=resumed)
    dv = res.column("dv").to_numpy(zero_copy_only=False).astype(float)
    figures = {
        "dv_histogram": plot_histogram({"scored rows": dv}, cal.lambda_hat, f"DV scores of run {run_id} and λ*", "d(x)"),
        "score_histogram": plot_histogram({"probe p(x)": res.column("probe").to_numpy(zero_copy_only=False).astype(float),
                                           "final score": res.column("final").to_numpy(zero_copy_only=False).astype(float)},
                                          None, "Probe and final scores", "P(unsafe)"),
    }
    return report, figures
