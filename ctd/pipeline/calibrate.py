"""The calibration job: score a labelled held-out shard with the expert on every row, then
calibrate λ* with :func:`ctd.calibration.calibrate_table` (the same entry point as ``ctd calibrate``)
and write the calibration artifact and its report.

The threshold grid comes from the DV probe's metadata (quantiles of its out-of-fold predictions on
its own training split), so it is fixed before these calibration scores are seen.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import storage
from ..artifacts import model_fingerprint
from ..calibration import CalibrationArtifact, calibrate_table, write_calibration
from ..config import JobConfig, config_hash, resolve_model_path
from ..probes import LinearProbe
from ..stats.calibrate import threshold_grid
from ..tables import write_parquet
from .graph import activation_spec, find_duplicates, init_ray, log, run_expert_stage, run_stage1, stage1_columns

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
    t = stage1_columns(s1, ["id", "error", "label", "probe", "dv", "group"])
    dups = find_duplicates(t)
    valid = t.column("error").is_null().to_numpy(zero_copy_only=False).astype(bool)
    labels = t.column("label").to_numpy(zero_copy_only=False).astype(int)
    ids = t.column("id").to_pylist()
    unlabelled = {i for i, v, y in zip(ids, valid, labels) if v and y < 0}
    if unlabelled:
        log(f"calibration: {len(unlabelled)} rows have no label and are left out")
    exclude = set(dups) | unlabelled
    n_use = int(sum(1 for i, v in zip(ids, valid) if v and i not in exclude))
    expert, _ = run_expert_stage(cfg, s1, storage.join(staging, "expert"), exclude=exclude, n_expected=n_use, n_rows=n_use,
                                 alpha=1.0 - 1e-9, all_rows=True)
    e = dict(zip(expert.column("id").to_pylist(), expert.column("expert").to_pylist()))
    keep = [j for j, (i, v) in enumerate(zip(ids, valid)) if v and i not in exclude and e.get(i) is not None]
    failed = n_use - len(keep)
    if failed:
        log(f"calibration: the expert gave no score for {failed} rows; they are left out")
    probe = t.column("probe").to_numpy(zero_copy_only=False)
    dvs = t.column("dv").to_numpy(zero_copy_only=False)
    groups = t.column("group").to_pylist()
    scores = {"ids": np.array([ids[j] for j in keep], dtype=object), "label": labels[keep], "probe": probe[keep].astype(float),
              "expert": np.array([e[ids[j]] for j in keep], dtype=float), "dv": dvs[keep].astype(float),
              "group": np.array([groups[j] or "" for j in keep], dtype=object)}
    ref = dv.meta.get("grid_reference")
    grid = threshold_grid(reference=ref, size=len(ref)) if ref else threshold_grid()
    prov = {"model_id": safety.meta.get("model_id"), "model_fingerprint": fp, "layer": cfg.model.layer,
            "safety_probe_hash": safety.content_hash, "dv_probe_hash": dv.content_hash, "corpus": c.corpus,
            "config_hash": config_hash(cfg), "expert": cfg.expert.kind, "rows_read": s1.rows,
            "rows_left_out": {"invalid": int((~valid).sum()), "duplicate_id": sum(dups.values()), "unlabelled": len(unlabelled),
                              "expert_failed": failed},
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
