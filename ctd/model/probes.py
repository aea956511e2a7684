r"""Linear probes on pooled activations z(x).

* Safety probe p(x) = sigmoid(w·standardise(z) + b): L2-regularised logistic regression, C chosen by
  cross-validation on the training split; the layer is chosen on a dev split (:func:`select_layer`).
* DV probe d(x) = clip(w·standardise(z) + b, -1, 1): ridge regression to the delegation value
  v = P_e(y|x) - P_p(y|x) (or the binary target), regularisation chosen by cross-validation.

A probe is saved as an artifact (:mod:`ctd.model.artifacts`): weights in safetensors, metadata in JSON
(model id and fingerprint, layer, pooling, feature dimension, training-data hash, content hash).
:meth:`LinearProbe.check_compatible` refuses to score activations of another model or layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from ..hashing import data_hash
from ..stats.metrics import auroc
from .artifacts import ArtifactError, load_artifact, require_match, save_artifact

__all__ = ["LinearProbe", "fit_safety_probe", "fit_dv_probe", "select_layer", "cross_fit_predict"]

Kind = Literal["logistic", "ridge"]
FORMAT = "ctd.linear_probe/v1"


@dataclass
class LinearProbe:
    kind: Kind
    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.coef.shape[0])

    def decision_function(self, z: ArrayLike) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.feature_dim:
            raise ValueError(f"probe expects features of shape [n, {self.feature_dim}], got {list(z.shape)}")
        return ((z - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, z: ArrayLike) -> np.ndarray:
        """Logistic: P(unsafe) in [0, 1]. Ridge: predicted delegation value clipped to [-1, 1]."""
        s = self.decision_function(z)
        if self.kind == "logistic":
            return 1.0 / (1.0 + np.exp(-s))
        return np.clip(s, -1.0, 1.0)

    # -- identity and compatibility ------------------------------------------------------------
    @property
    def content_hash(self) -> str | None:
        return self.meta.get("content_hash")

    def check_compatible(
        self,
        *,
        model_id: str | None = None,
        model_fingerprint: str | None = None,
        layer: int | None = None,
        pooling: str | None = None,
        feature_dim: int | None = None,
    ) -> None:
        """Raise ArtifactError when this probe was trained on other activations."""
        require_match(
            self.meta,
            f"{self.kind} probe ({self.meta.get('role', 'probe')})",
            model_id=model_id,
            model_fingerprint=model_fingerprint,
            layer=layer,
            pooling=pooling,
            feature_dim=feature_dim,
        )

    # -- persistence ---------------------------------------------------------------------------
    def save(self, uri: str) -> dict:
        meta = dict(self.meta)
        meta.update({"format": FORMAT, "kind": self.kind, "intercept": float(self.intercept), "feature_dim": self.feature_dim})
        arrays = {
            "coef": self.coef.astype(np.float64),
            "mean": self.mean.astype(np.float64),
            "scale": self.scale.astype(np.float64),
        }
        self.meta = save_artifact(uri, arrays, meta)
        return self.meta

    @classmethod
    def load(cls, uri: str) -> LinearProbe:
        arrays, meta = load_artifact(uri)
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{uri} is not a linear probe artifact (format {meta.get('format')!r})")
        for k in ("coef", "mean", "scale"):
            if k not in arrays or arrays[k].shape != (meta["feature_dim"],):
                raise ArtifactError(f"{uri}: array {k!r} missing or of the wrong shape")
        return cls(meta["kind"], arrays["coef"], float(meta["intercept"]), arrays["mean"], arrays["scale"], meta)


def _standardise(z: np.ndarray):
    mean = z.mean(axis=0)
    scale = z.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    return mean, scale, (z - mean) / scale


def _check_features(z, target, name):
    z = np.asarray(z)
    if z.dtype not in (np.float32, np.float64):  # float32 features stay float32: half the memory of a large training set
        z = z.astype(np.float64)
    t = np.asarray(target)
    if z.ndim != 2 or z.shape[0] != t.shape[0] or z.shape[0] < 2:
        raise ValueError(f"{name}: features must be [n, d] with n >= 2 matching the targets")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return z, t


def fit_safety_probe(
    z: ArrayLike,
    labels: ArrayLike,
    *,
    Cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
    cv: int = 5,
    seed: int = 0,
    meta: dict | None = None,
) -> LinearProbe:
    """L2 logistic regression on standardised features, C chosen by stratified CV (log-loss)."""
    from sklearn.linear_model import LogisticRegressionCV

    z, y = _check_features(z, labels, "safety probe")
    if not np.all(np.isin(y, (0, 1))) or len(np.unique(y)) < 2:
        raise ValueError("safety probe: labels must be 0/1 with both classes present")
    mean, scale, zs = _standardise(z)
    folds = int(min(cv, np.bincount(y.astype(int)).min()))
    model = LogisticRegressionCV(
        Cs=list(Cs),
        cv=max(folds, 2),
        scoring="neg_log_loss",
        max_iter=2000,
        random_state=seed,
        l1_ratios=(0.0,),
        use_legacy_attributes=False,
    )  # l1_ratio 0: pure L2
    model.fit(zs, y.astype(int))
    m = dict(meta or {})
    m.update({"role": "safety", "C": float(np.ravel(model.C_)[0]), "n_train": int(z.shape[0]), "data_hash": data_hash(z, y)})
    return LinearProbe("logistic", model.coef_[0].copy(), float(model.intercept_[0]), mean, scale, m)


def fit_dv_probe(
    z: ArrayLike, v: ArrayLike, *, alphas: Sequence[float] = tuple(np.logspace(-1, 5, 13)), meta: dict | None = None
) -> LinearProbe:
    """Ridge regression on standardised features to the delegation value (efficient LOO CV over
    the regularisation strengths)."""
    from sklearn.linear_model import RidgeCV

    z, v = _check_features(z, v, "DV probe")
    v = v.astype(np.float64)
    if not np.all(np.isfinite(v)) or np.any(np.abs(v) > 1 + 1e-9):
        raise ValueError("DV probe: delegation values must be finite and lie in [-1, 1]")
    mean, scale, zs = _standardise(z)
    model = RidgeCV(alphas=list(alphas))
    model.fit(zs, v)
    m = dict(meta or {})
    m.update({"role": "dv", "ridge_alpha": float(model.alpha_), "n_train": int(z.shape[0]), "data_hash": data_hash(z, v)})
    return LinearProbe("ridge", model.coef_.copy(), float(model.intercept_), mean, scale, m)


def cross_fit_predict(
    fit: Callable[[np.ndarray, np.ndarray], LinearProbe],
    z: ArrayLike,
    target: ArrayLike,
    *,
    folds: int = 5,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> np.ndarray:
    """Out-of-fold predictions of ``fit(z_train, target_train).predict`` (each row predicted by a
    model that never saw it). Stratified by ``groups`` when given."""
    from sklearn.model_selection import KFold, StratifiedKFold

    z = np.asarray(z)
    target = np.asarray(target)
    out = np.empty(z.shape[0], dtype=np.float64)
    if groups is not None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(z, groups)
    else:
        splitter = KFold(n_splits=folds, shuffle=True, random_state=seed).split(z)
    for tr, te in splitter:
        out[te] = fit(z[tr], target[tr]).predict(z[te])
    return out


def select_layer(
    train: dict[int, np.ndarray], y_train: ArrayLike, dev: dict[int, np.ndarray], y_dev: ArrayLike, *, seed: int = 0
) -> tuple[int, dict[int, float], dict[int, LinearProbe]]:
    """Fit a safety probe per layer on the training split and pick the layer with the best AUROC on
    the dev split. Returns (best_layer, {layer: dev AUROC}, {layer: probe})."""
    scores, probes = {}, {}
    for layer in sorted(train):
        probe = fit_safety_probe(train[layer], y_train, seed=seed, meta={"layer": layer})
        probes[layer] = probe
        scores[layer] = auroc(y_dev, probe.predict(dev[layer]))
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores, probes
