"""Signals, policies, metrics, probes and artifacts."""

import json

import numpy as np
import pytest
from scipy import stats

from ctd.model.artifacts import ArtifactError, load_artifact, save_artifact
from ctd.model.probes import LinearProbe, cross_fit_predict, fit_dv_probe, fit_safety_probe, select_layer
from ctd.stats.cascade import Cascade, threshold_policy, top_k_count, top_k_policy
from ctd.stats.metrics import accuracy, auroc, group_table
from ctd.stats.signals import ECDF, delegation_value, effective_capacity, uncertainty_signal


def test_delegation_value_definition_and_binary_variant():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.2, 0.2, 0.9, 0.9])
    e = np.array([0.8, 0.1, 0.3, 0.4])
    # v = P_e(y) - P_p(y)
    assert np.allclose(delegation_value(y, p, e), [0.8 - 0.2, 0.9 - 0.8, 0.3 - 0.9, 0.6 - 0.1])
    assert delegation_value(y, p, e, binary=True).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert effective_capacity([0.1, -0.2, 0.0, 0.3]) == 0.5
    with pytest.raises(ValueError, match="0/1"):
        delegation_value([2], [0.5], [0.5])
    with pytest.raises(ValueError, match="probabilities"):
        delegation_value([1], [1.5], [0.5])


def test_uncertainty_signal_peaks_at_the_median():
    ref = np.linspace(0, 1, 101)
    u = uncertainty_signal([0.0, 0.5, 1.0], ref)
    assert u[1] == pytest.approx(0.0, abs=0.01) and u[0] == pytest.approx(-0.5, abs=0.01) and u.max() <= 0
    assert ECDF([1, 2, 3])([0, 2, 5]).tolist() == [0, 2 / 3, 1]


def test_policies_and_cascade():
    s = np.array([0.1, 0.5, 0.5, 0.9])
    assert threshold_policy(s, 0.5).tolist() == [False, False, False, True]
    assert not threshold_policy(s, np.inf).any()
    assert top_k_count(10, 0.25) == 2 and top_k_count(4, 0.75) == 3
    m = top_k_policy(s, 2)
    assert m.sum() == 2 and m[3] and (m[1] or m[2])
    # ties at the boundary are broken at random, seeded
    picks = {tuple(top_k_policy(np.zeros(4), 1, seed=k)) for k in range(20)}
    assert len(picks) > 1
    p, e = np.array([0.2, 0.8]), np.array([0.9, np.nan])
    assert Cascade().final(p, e, [True, False]).tolist() == [0.9, 0.8]
    assert Cascade("mean").final(p, e, [True, False]).tolist() == [pytest.approx(0.55), 0.8]
    with pytest.raises(ValueError, match="no expert score"):
        Cascade().final(p, e, [True, True])
    assert Cascade().decide([0.5, 0.49]).tolist() == [True, False]
    assert Cascade(decision_threshold=0.3).decide([0.3, 0.29]).tolist() == [True, False]
    with pytest.raises(ValueError, match="switch"):
        Cascade("max")


def test_metrics_against_references():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.uniform(size=300), 1)  # ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(auroc(np.ones(5), s[:5]))
    assert accuracy([1, 0], [0.7, 0.2]) == 1.0
    rows = group_table(["a", "a", "b"], [0.5, -0.1, 0.2], [True, False, False])
    assert rows[0]["group"] == "all" and rows[1] == {
        "group": "a",
        "n": 2,
        "delegation_rate": 0.5,
        "mean_v": 0.2,
        "mean_v_delegated": 0.5,
        "capacity": 0.5,
    }


def _blobs(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = rng.normal(size=(n, d)) + np.outer(y, np.linspace(1, 0, d))
    return z, y


def test_probes_fit_predict_and_round_trip(tmp_path):
    z, y = _blobs()
    probe = fit_safety_probe(z, y, meta={"model_id": "m", "layer": 3, "pooling": "mean"})
    assert auroc(y, probe.predict(z)) > 0.8
    v = np.clip(z[:, 0] / 4, -1, 1)
    dv = fit_dv_probe(z, v, meta={"model_id": "m", "layer": 3, "pooling": "mean"})
    assert stats.spearmanr(dv.predict(z), v).statistic > 0.9 and np.all(np.abs(dv.predict(z * 100)) <= 1)
    uri = str(tmp_path / "probe")
    meta = probe.save(uri)
    loaded = LinearProbe.load(uri)
    assert np.allclose(loaded.predict(z), probe.predict(z))
    assert loaded.content_hash == meta["content_hash"]
    loaded.check_compatible(model_id="m", layer=3, pooling="mean", feature_dim=16)
    with pytest.raises(ArtifactError, match="layer: artifact has 3, expected 4"):
        loaded.check_compatible(model_id="m", layer=4)
    with pytest.raises(ArtifactError, match="model_id"):
        loaded.check_compatible(model_id="other")
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        loaded.predict(z[:, :5])


def test_tampered_artifacts_are_refused(tmp_path):
    uri = str(tmp_path / "a")
    save_artifact(uri, {"w": np.arange(4.0)}, {"model_id": "m"})
    load_artifact(uri)
    meta = json.load(open(uri + ".json"))
    meta["model_id"] = "evil"
    json.dump(meta, open(uri + ".json", "w"))
    with pytest.raises(ArtifactError, match="integrity"):
        load_artifact(uri)
    save_artifact(uri, {"w": np.arange(4.0)}, {"model_id": "m"})
    raw = bytearray(open(uri + ".safetensors", "rb").read())
    raw[-1] ^= 0xFF
    open(uri + ".safetensors", "wb").write(bytes(raw))
    with pytest.raises(ArtifactError, match="integrity"):
        load_artifact(uri)
    open(uri + ".safetensors", "wb").write(b"not safetensors at all")
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        load_artifact(uri)
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(str(tmp_path / "missing"))


def test_layer_selection_and_cross_fitting():
    z1, y = _blobs(seed=1)
    noise = np.random.default_rng(2).normal(size=z1.shape)
    best, scores, probes = select_layer({1: noise[:300], 2: z1[:300]}, y[:300], {1: noise[300:], 2: z1[300:]}, y[300:])
    assert best == 2 and scores[2] > scores[1]
    oof = cross_fit_predict(lambda a, b: fit_dv_probe(a, b), z1, np.clip(z1[:, 0] / 4, -1, 1))
    assert oof.shape == (400,) and np.isfinite(oof).all()
