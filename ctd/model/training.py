"""The training job: fit the safety probe and the DV probe with the pipeline's own stages.

* Safety probe: pooled activations of the training corpus (every candidate layer in one pass),
  L2 logistic regression; the layer is chosen by AUROC on the dev corpus.
* DV probe: the same expert stage as the audit scores every dev row; the delegation value
  v = P_e(y|x) - P_p(y|x) (or the binary target) is regressed on the dev activations with ridge.
  Its out-of-fold predictions on dev give the threshold grid that calibration will use, stored in
  the probe's metadata (fixed before any calibration score is seen).
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import pyarrow as pa

from .. import storage
from ..config import JobConfig, resolve_model_path
from ..experts.registry import expert_for
from ..log import log
from ..pipeline.labelled import judge_labelled, read_to_driver
from ..pipeline.raydata import init_ray
from ..pipeline.scoring import activation_spec, run_stage1_splits
from ..pipeline.stages import pooled_column
from ..stats.calibrate import threshold_grid
from ..stats.metrics import auroc, mse, spearman
from ..stats.signals import delegation_value, effective_capacity
from .artifacts import model_fingerprint
from .probes import cross_fit_predict, fit_dv_probe, select_layer

__all__ = ["run_training"]


def _pooled(s1, layers):
    """Labelled rows' pooled features on the driver, float32 (4 bytes x hidden size x layers per row)."""
    cols = ["id", "error", "label"] + [pooled_column(L) for L in layers]
    t = read_to_driver(s1.files, cols)
    ok = t.column("error").is_null().to_numpy(zero_copy_only=False).astype(bool)
    y = t.column("label").to_numpy(zero_copy_only=False).astype(int)
    use = ok & (y >= 0)
    idx = np.flatnonzero(use)
    feats = {}
    for L in layers:
        col = t.column(pooled_column(L)).take(idx).combine_chunks()
        feats[L] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(idx), -1).astype(np.float32, copy=False)
    ids = t.column("id").take(pa.array(idx)).to_pylist()
    return ids, y[idx], feats, int((~use).sum())


def run_training(cfg: JobConfig) -> dict:
    if cfg.train is None:
        raise ValueError("config has no 'train' section")
    tr = cfg.train
    model_dir = resolve_model_path(cfg.model.path)
    fp = model_fingerprint(model_dir)
    layers = sorted(set(cfg.model.candidate_layers or [cfg.model.layer]))
    init_ray(cfg.ray)
    staging = cfg.probes.safety + "_staging"  # beside the probe artifact, local or object storage
    spec = activation_spec(cfg.model, cfg.activations, layers=tuple(layers), return_pooled=True)
    s1 = run_stage1_splits({"train": tr.train, "dev": tr.dev}, storage.join(staging, "stage1"), spec, cfg.activations)
    s_train, s_dev = s1["train"], s1["dev"]
    _, y_tr, f_tr, skipped_tr = _pooled(s_train, layers)
    dev_ids, y_dev, f_dev, skipped_dev = _pooled(s_dev, layers)
    if len(set(y_tr.tolist())) < 2 or len(set(y_dev.tolist())) < 2:
        raise ValueError("training and dev corpora both need labelled rows of both classes")
    log(
        f"training: {len(y_tr)} labelled training rows, {len(y_dev)} dev rows ({skipped_tr + skipped_dev} invalid or unlabelled left out)"
    )
    best, layer_auroc, probes = select_layer(f_tr, y_tr, f_dev, y_dev, seed=tr.seed)
    if best != cfg.model.layer:
        log(
            f"training: layer {best} has the best dev AUROC ({layer_auroc[best]:.3f}); set model.layer: {best} for calibrate/audit"
        )
    base_meta = {
        "model_id": cfg.model.id or model_dir.rstrip("/").split("/")[-1],
        "model_fingerprint": fp,
        "layer": best,
        "pooling": "mean",
        "max_length": cfg.model.max_length,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    safety = probes[best]
    safety.meta.update(base_meta)
    p_dev = safety.predict(f_dev[best])
    log(f"training: safety probe layer {best}, dev AUROC {layer_auroc[best]:.3f}; expert on all {len(y_dev)} dev rows")

    judged = judge_labelled(expert_for(cfg.expert), s_dev, storage.join(staging, "dev_expert"))
    expert = read_to_driver(judged["files"], ["id", "expert"])
    e_map = dict(zip(expert.column("id").to_pylist(), expert.column("expert").to_pylist()))
    have = np.array([e_map.get(i) is not None for i in dev_ids])
    e_dev = np.array([e_map.get(i) if e_map.get(i) is not None else np.nan for i in dev_ids], dtype=float)
    z, y, p, e = f_dev[best][have], y_dev[have], p_dev[have], e_dev[have]
    v = delegation_value(y, p, e, binary=tr.dv_target == "binary", decision_threshold=cfg.decision_threshold)
    oof = cross_fit_predict(lambda a, b: fit_dv_probe(a, b), z, v, seed=tr.seed)
    grid = threshold_grid(reference=oof, size=tr.grid_size)
    dv = fit_dv_probe(z, v, meta={**base_meta, "target": tr.dv_target, "grid_reference": [float(x) for x in grid]})
    safety.save(cfg.probes.safety)
    dv.save(cfg.probes.dv)
    report = {
        "kind": "training",
        "model_id": base_meta["model_id"],
        "model_fingerprint": fp,
        "layer": best,
        "dev_auroc_by_layer": {str(k): v_ for k, v_ in layer_auroc.items()},
        "train_rows": int(len(y_tr)),
        "dev_rows": int(len(y_dev)),
        "expert_dev_auroc": auroc(y, e),
        "probe_dev_auroc": auroc(y, p),
        "dv_target": tr.dv_target,
        "dv_oof_mse": mse(v, oof),
        "dv_oof_spearman": spearman(v, oof),
        "effective_capacity": effective_capacity(v),
        "safety_probe": {"uri": cfg.probes.safety, "content_hash": safety.content_hash},
        "dv_probe": {"uri": cfg.probes.dv, "content_hash": dv.content_hash},
    }
    storage.write_json(cfg.probes.safety + ".training_report.json", report)
    storage.remove(staging)
    log(
        f"training done: safety probe → {cfg.probes.safety}, DV probe → {cfg.probes.dv} (OOF Spearman {report['dv_oof_spearman']:.3f}, "
        f"capacity {report['effective_capacity']:.2f})"
    )
    return report
