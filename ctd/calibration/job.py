"""The calibration job: score a labelled held-out shard with the expert on every row, calibrate λ*
(:class:`ctd.calibration.calibrator.Calibrator`, as ``ctd calibrate`` does) and write the artifact and
its report.

    deployment (model + probes, checked) → stage 1 (probe and d(x) on every row) → the expert on every
    labelled row → calibration scores (on the driver: n rows of five numbers) → Calibrator.fit → report

The threshold grid comes from the DV probe's metadata (quantiles of its out-of-fold predictions on its
own training split), so it is fixed before these calibration scores are seen.
"""

from __future__ import annotations

import pyarrow.compute as pc

from .. import storage
from ..config import JobConfig
from ..experts.registry import expert_for
from ..hashing import digest
from ..log import log
from ..model.deployment import Deployment
from ..pipeline.labelled import judge_labelled, read_to_driver
from ..pipeline.preflight import check_schedulable
from ..pipeline.raydata import init_ray
from ..pipeline.scoring import activation_spec, run_stage1
from ..stats.cascade import Cascade
from ..tables import write_parquet
from .artifact import CalibrationArtifact
from .calibrator import CalibrationScores, Calibrator, grid_for
from .report import write_calibration

__all__ = ["run_calibration"]


def run_calibration(cfg: JobConfig) -> CalibrationArtifact:
    if cfg.calibrate is None:
        raise ValueError("config has no 'calibrate' section")
    c = cfg.calibrate
    dep = Deployment.load(cfg.model, cfg.probes)
    init_ray(cfg.ray)
    check_schedulable(cfg)
    staging = storage.join(c.output, "_staging")
    storage.remove(staging)
    spec = activation_spec(cfg.model, cfg.activations, safety=dep.safety, dv=dep.dv)
    s1 = run_stage1(c.corpus, storage.join(staging, "stage1"), spec, cfg.activations)
    counts = judge_labelled(expert_for(cfg.expert), s1, storage.join(staging, "expert"))
    if counts["scored"] - counts["labelled"]:
        log(f"calibration: {counts['scored'] - counts['labelled']} rows have no label and are left out")
    t = read_to_driver(counts["files"], ["id", "label", "probe", "expert", "dv", "group"])
    t = t.filter(pc.is_valid(t.column("expert")))
    failed = counts["labelled"] - t.num_rows
    if failed:
        log(f"calibration: the expert gave no score for {failed} rows; they are left out")
    scores = CalibrationScores.from_table(t, c.corpus)
    grid, how = grid_for(dep.dv)
    prov = dep.provenance() | {
        "corpus": c.corpus,
        "config_hash": digest(cfg.model_dump(mode="json")),
        "expert": cfg.expert.kind,
        "rows_read": s1.rows,
        "rows_left_out": {
            "invalid": s1.rows - counts["scored"] - counts["duplicate_rows"],
            "duplicate_id": counts["duplicate_rows"],
            "unlabelled": counts["scored"] - counts["labelled"],
            "expert_failed": failed,
        },
        "grid": how,
    }
    art = Calibrator(cfg.calibration, Cascade(cfg.cascade, cfg.decision_threshold)).fit(scores, grid, prov)
    uris = write_calibration(c.output, art, scores.dv, c.night_rows)
    write_parquet(storage.join(c.output, "calibration_scores.parquet"), scores.table())
    storage.remove(staging)
    log(art.result.message)
    log(f"calibration artifact: {uris['artifact']}; report: {uris['html']}")
    return art
