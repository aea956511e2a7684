"""The calibration job: score a labelled held-out shard with the expert on every row, then
calibrate λ* with :func:`ctd.calibration.calibrate_table` (the same entry point as ``ctd calibrate``)
and write the calibration artifact and its report.

The threshold grid comes from the DV probe's metadata (quantiles of its out-of-fold predictions on
its own training split), so it is fixed before these calibration scores are seen.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..artifacts import model_fingerprint
from ..calibration import CalibrationArtifact, calibrate_table, write_calibration
from ..config import JobConfig, config_hash, resolve_model_path
from ..probes import LinearProbe
from ..stats.calibrate import threshold_grid
from ..tables import write_parquet
from .graph import activation_spec, init_ray, judge_labelled, log, read_to_driver, run_stage1

__all__ = ["run_calibration"]


def run_calibration(cfg: JobConfig) -> CalibrationArtifact:
    if cfg.calibrate is None:
        raise ValueError("config has no 'calibrate' section")
    c, k = cfg.calibrate, cfg.calibration
    fp = model_fingerprint(resolve_model_path(cfg.model.path))
    safety, dv = LinearProbe.load(cfg.probes.safety), LinearProbe.load(cfg.probes.dv)
    for probe in (safety, dv):
        probe.check_compatible(model_fingerprint=fp, layer=cfg.model.layer, pooling="mean")
    init_ray(cfg)
    staging = storage.join(c.output, "_staging")
    storage.remove(staging)
    s1 = run_stage1(cfg, c.corpus, storage.join(staging, "stage1"), activation_spec(cfg, lambda_star=-np.inf))
    counts = judge_labelled(cfg, s1, storage.join(staging, "expert"))
    if counts["scored"] - counts["labelled"]:
        log(f"calibration: {counts['scored'] - counts['labelled']} rows have no label and are left out")
    # the calibration sample itself: the statistics need it in memory (n rows of five numbers)
    t = read_to_driver(counts["files"], ["id", "label", "probe", "expert", "dv", "group"])
    t = t.filter(pc.is_valid(t.column("expert")))
    failed = counts["labelled"] - t.num_rows
    if failed:
        log(f"calibration: the expert gave no score for {failed} rows; they are left out")
    scores = {"ids": np.asarray(t.column("id").to_pylist(), dtype=object), "label": t.column("label").to_numpy().astype(int),
              "probe": t.column("probe").to_numpy().astype(float), "expert": t.column("expert").to_numpy().astype(float),
              "dv": t.column("dv").to_numpy().astype(float),
              "group": np.asarray(t.column("group").fill_null("").to_pylist(), dtype=object)}
    order = np.argsort(scores["ids"].astype(str), kind="stable")  # a fixed order, whatever order the workers wrote in
    scores = {k: v[order] for k, v in scores.items()}
    ref = dv.meta.get("grid_reference")
    grid = threshold_grid(reference=ref, size=len(ref)) if ref else threshold_grid()
    prov = {"model_id": safety.meta.get("model_id"), "model_fingerprint": fp, "layer": cfg.model.layer,
            "safety_probe_hash": safety.content_hash, "dv_probe_hash": dv.content_hash, "corpus": c.corpus,
            "config_hash": config_hash(cfg), "expert": cfg.expert.kind, "rows_read": s1.rows,
            "rows_left_out": {"invalid": s1.rows - counts["scored"] - counts["duplicate_rows"], "duplicate_id": counts["duplicate_rows"],
                              "unlabelled": counts["scored"] - counts["labelled"], "expert_failed": failed},
            "grid": "DV probe reference quantiles" if ref else "uniform on [-1, 1]"}
    art = calibrate_table(scores, alpha=k.alpha, delta=k.delta, pareto=k.pareto, risk=k.risk, grid=grid,
                          performance_target=k.performance_target, method=k.method, seed=k.seed, opt_fraction=k.opt_fraction,
                          cascade=cfg.cascade, decision_threshold=cfg.decision_threshold, provenance=prov)
    uris = write_calibration(c.output, art, scores)
    write_parquet(storage.join(c.output, "calibration_scores.parquet"),
                  pa.table({"id": scores["ids"].tolist(), "label": scores["label"], "probe": scores["probe"], "expert": scores["expert"],
                            "dv": scores["dv"], "group": scores["group"].tolist()}))
    storage.remove(staging)
    log(art.result.message)
    log(f"calibration artifact: {uris['artifact']}; report: {uris['html']}")
    return art
