r"""Delegation signals: the delegation value and the uncertainty baseline.

* Delegation value (CTD paper, Sec. 3): :math:`v(x, y) = P_e(y \mid x) - P_p(y \mid x)`, the
  probability the expert gives to the true class minus the probe's. It lies in [-1, 1]; the binary
  variant is :math:`1[\text{probe wrong} \wedge \text{expert right}]`.
* Effective delegation capacity: the share of rows with v > 0 (delegating more cannot help).
* Uncertainty (McKenzie et al. 2025): :math:`-|\hat F(p(x)) - 1/2|`, :math:`\hat F` the ECDF of probe
  scores on a reference sample; highest for rows whose probe score sits at the median.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["true_class_probability", "delegation_value", "effective_capacity", "ECDF", "uncertainty_signal"]


def _probabilities(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if np.any(~np.isfinite(a)) or np.any((a < 0) | (a > 1)):
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return a


def _binary(y) -> np.ndarray:
    a = np.asarray(y)
    if not np.all(np.isin(a, (0, 1))):
        raise ValueError("labels must be 0/1")
    return a.astype(np.int64)


def true_class_probability(score: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """P(y | x) from a score P(unsafe | x): the score when y = 1, one minus it when y = 0."""
    s = _probabilities(score, "score")
    y = _binary(labels)
    return np.where(y == 1, s, 1.0 - s)


def delegation_value(
    labels: ArrayLike, probe: ArrayLike, expert: ArrayLike, *, binary: bool = False, decision_threshold: float = 0.5
) -> np.ndarray:
    """v = P_e(y|x) - P_p(y|x) in [-1, 1]; with ``binary=True``, 1[probe wrong and expert right]
    at the decision threshold (score >= threshold is unsafe)."""
    y = _binary(labels)
    if binary:
        p = _probabilities(probe, "probe")
        e = _probabilities(expert, "expert")
        probe_wrong = (p >= decision_threshold).astype(np.int64) != y
        expert_right = (e >= decision_threshold).astype(np.int64) == y
        return (probe_wrong & expert_right).astype(float)
    return true_class_probability(expert, y) - true_class_probability(probe, y)


def effective_capacity(v: ArrayLike) -> float:
    """Share of rows whose delegation value is positive."""
    v = np.asarray(v, dtype=float)
    return float(np.mean(v > 0)) if v.size else float("nan")


class ECDF:
    """Right-continuous empirical CDF of a reference sample: F(x) = #{r <= x} / n."""

    def __init__(self, reference: ArrayLike):
        r = np.sort(np.asarray(reference, dtype=float).ravel())
        if r.size == 0 or not np.all(np.isfinite(r)):
            raise ValueError("ECDF reference must be a non-empty array of finite values")
        self.reference = r

    def __call__(self, x: ArrayLike) -> np.ndarray:
        return np.searchsorted(self.reference, np.asarray(x, dtype=float), side="right") / self.reference.size


def uncertainty_signal(probe_scores: ArrayLike, reference_scores: ArrayLike) -> np.ndarray:
    """-|F(p) - 1/2| in [-1/2, 0], F the ECDF of ``reference_scores``. Fit F on a split that is
    neither calibration nor evaluation data, so the signal is a fixed function of x there."""
    return -np.abs(ECDF(reference_scores)(probe_scores) - 0.5)
