"""Recalibrating λ* from recent nights: no labelled shard, no new expert calls.

    python -m jobs.calibrate --config C --from-runs <audit output> [--nights 7] [--out DIR]

The budget half of the guarantee needs d(x) only, on rows drawn like tomorrow's traffic, no labels:
the last N published nights audited with the current calibration hold every scored row's d(x)
(computed by the same deployment: the calibration pins the probes). Ray Data counts, per threshold of
the current grid, the rows above it; the driver holds G counts. Where ``calibration.performance_target``
is set, the cascade's misclassification rate is measured against the judge's verdicts on those
nights' control samples (uniform rows, judged whatever their scores) and certified jointly
(:func:`ctd.stats.calibrate.calibrate_counts`). The control rows also become the new artifact's
``calibration_scores.parquet`` (the judge's verdict as the label): the quality alarms' yardstick.

Assumption, stated in the artifact and its report: tomorrow's rows and the pooled rows of those nights
are exchangeable (one distribution; nights that differ from each other, or a trend, break it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..audit.results import answered
from ..config import ConfigError, JobConfig
from ..hashing import digest
from ..log import log
from ..model.deployment import Deployment
from ..pipeline.raydata import init_ray, read
from ..runs.folder import RunFolder, run_folder
from ..runs.history import history
from ..stats.calibrate import calibrate_counts, cascade_losses, delegation_loss_sums
from ..stats.cascade import Cascade
from ..tables import write_parquet
from .artifact import CalibrationArtifact
from .calibrator import CalibrationScores
from .report import write_calibration

__all__ = ["recalibrate_from_runs", "ASSUMPTION"]

ASSUMPTION = (
    "tomorrow's conversations and the pooled rows of these nights are exchangeable (drawn from one distribution); "
    "nights that differ from each other, or a trend across them, break it"
)
_CONTROL = ["id", "group", "probe", "dv", "expert"]
_READ = [*_CONTROL, "control", "delegated", "expert_status"]


def _exceed(batch: pa.Table, grid: np.ndarray) -> pa.Table:
    d = np.sort(batch.column("dv").to_numpy(zero_copy_only=False).astype(float))
    k = d.size - np.searchsorted(d, grid, side="right")
    return pa.table({"n": [d.size], "k": pa.array([k.tolist()], pa.list_(pa.int64()))})


def _judged_control(batch: pa.Table, day: str) -> pa.Table:
    """The control rows with a usable verdict (a failed call or one without a label token is no verdict),
    their ids prefixed by the day (an id may recur on another night)."""
    keep = np.asarray(pc.fill_null(batch.column("control"), False).to_numpy(zero_copy_only=False), dtype=bool)
    t = batch.filter(pa.array(keep & answered(batch))).select(_CONTROL)
    return t.set_column(0, "id", pc.binary_join_element_wise(pa.scalar(day), t.column("id"), "/"))


def _has_control(uri: str) -> bool:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return "control" in pq.read_schema(f).names


def recalibrate_from_runs(cfg: JobConfig, output: str, nights: int = 7, dest: str | None = None) -> CalibrationArtifact:
    """Certify λ* for the budget (and ``performance_target`` against the judge) on the last ``nights``
    published nights under ``output`` made with the configured calibration; write the artifact and its
    report to ``dest`` (default ``<output>/calibration-from-runs``). Raises :class:`ConfigError` when
    there are no such nights."""
    if cfg.audit is None:
        raise ConfigError("--from-runs needs the config's 'audit' section (its calibration is the one to renew)")
    if nights < 1:
        raise ConfigError("--nights must be at least 1")
    dep = Deployment.load(cfg.model, cfg.probes, cfg.audit.calibration)
    current = dep.calibration
    assert current is not None
    h = history(output, calibration_hash=current.hash, last=nights)
    if not h.nights:
        raise ConfigError(
            f"{output}: no published nights audited with the calibration {current.hash[:12]} (the one at {cfg.audit.calibration})"
        )
    for g in h.gaps:
        log(f"recalibration: night {g.audited_date or '?'} ({g.run_id}) cannot be read and is left out: {g.reason}")
    runs = [RunFolder.open(run_folder(output, n["run_id"])) for n in h.nights]
    days = [n["audited_date"] for n in h.nights]
    by_day = {d: [r.path(e) for e in r.manifest.files.get("results", [])] for d, r in zip(days, runs)}
    files = [f for fs in by_day.values() for f in fs]
    log(f"recalibration: d(x) of every scored row of {len(days)} night(s) ({days[0]} … {days[-1]}), {len(files)} file(s)")
    init_ray(cfg.ray)
    grid = np.asarray(current.result.grid, dtype=float)
    per_block = read(files, ["dv"]).map_batches(_exceed, fn_kwargs={"grid": grid}, batch_format="pyarrow", batch_size=None)
    n, k = 0, np.zeros(grid.size, dtype=np.int64)
    for row in per_block.iter_rows():  # one row per block, never per conversation
        n += int(row["n"])
        k += np.asarray(row["k"], dtype=np.int64)
    parts = []  # the control rows: about π × N a night (nights from before the control sample have none)
    for day, fs in by_day.items():
        fs = [f for f in fs if _has_control(f)]
        if fs:
            ds = read(fs, _READ).map_batches(_judged_control, fn_kwargs={"day": day}, batch_format="pyarrow", batch_size=None)
            parts += [t for t in ds.iter_batches(batch_format="pyarrow") if t.num_rows]
    ctrl = pa.concat_tables(parts) if parts else None
    cal = cfg.calibration
    cascade = Cascade(cfg.cascade, cfg.decision_threshold)
    scores = None
    if ctrl is not None:
        judge = ctrl.column("expert").to_numpy(zero_copy_only=False).astype(float)
        verdict = cascade.decide(judge).astype(np.int64)
        scores = CalibrationScores.from_table(ctrl.append_column("label", pa.array(verdict)), f"{output} control rows")
    loss = None
    if cal.performance_target is not None:
        if scores is None:
            raise ConfigError(
                f"{output}: the nights have no judged control rows, and calibration.performance_target needs them "
                "(set audit.control_share, or drop the target)"
            )
        lk, ld = cascade_losses(scores.probe, scores.expert, scores.label, cascade)
        loss = delegation_loss_sums(scores.dv, lk, ld, grid)
    result = calibrate_counts(
        grid,
        k,
        n,
        cal.alpha,
        cal.delta,
        method=cal.method,
        loss_sums=loss,
        n_loss=len(scores) if scores is not None else None,
        performance_target=cal.performance_target,
    )
    prov = dep.provenance() | {
        "source": "recent nights (ctd calibrate --from-runs)",
        "from_runs": output,
        "nights": days,
        "run_ids": [n["run_id"] for n in h.nights],
        "nights_left_out": [g.run_id for g in h.gaps],
        "rows": n,
        "control_rows_judged": len(scores) if scores is not None else 0,
        "previous_calibration": current.hash,
        "grid": current.provenance.get("grid", "the previous calibration's grid"),
        "certifies": "the delegation rate"
        + (" and the misclassification rate against the judge's verdicts" if cal.performance_target is not None else ""),
        "assumption": ASSUMPTION,
        "config_hash": digest(cfg.model_dump(mode="json")),
    }
    if scores is not None:
        prov["scores_hash"] = scores.hash()
    art = CalibrationArtifact(result, prov)
    dest = dest or storage.join(output, "calibration-from-runs")
    storage.remove(storage.join(dest, "calibration_scores.parquet"))  # never a stale yardstick beside a new artifact
    per_night = max(1, round(n / max(1, len(days))))  # the night-level statement for the nights it was made from
    uris = write_calibration(dest, art, scores.dv if scores is not None else None, per_night)
    if scores is not None:  # the quality alarms' reference: the control rows, the judge's verdict as the label
        write_parquet(storage.join(dest, "calibration_scores.parquet"), scores.table())
    log(result.message)
    log(f"calibration artifact: {uris['artifact']}; report: {uris['html']} (set audit.calibration to it to use it)")
    return art
