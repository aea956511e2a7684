r"""Drift detection across nightly audits: one alarm rule, the e-detector.

The calibrated threshold λ* guarantees R_B(λ*) = P(d(X) > λ*) <= α for traffic from the calibration
distribution. Night i delegates D_i of n_i rows; if the traffic still looks like the calibration
data, D_i ~ Binom(n_i, r) with r <= α. Against the alternative "the rate is ρ > α" the likelihood
ratio

.. math:: e_i(\rho) = (\rho/\alpha)^{D_i} \, ((1-\rho)/(1-\alpha))^{n_i - D_i}

has expectation <= 1 under any r <= α (it is increasing in D_i); so has the mixture
e_i = mean_j e_i(ρ_j) over a fixed set of alternatives.

**The alarm** (``drift_alarm`` of the audit report) is the e-detector of Shin, Ramdas & Rinaldo
(2023), a CUSUM of these e-values: M_k = max(M_{k-1}, 1) · e_k, alarm when M_k >= 1/level. What it
bounds: under the null (every night's rate <= α, nights independent) its *average run length* to a
false alarm is at least 1/level nights. It is not anytime-valid (it is meant to alarm eventually
even under the null, rarely); the false-alarm probability within a horizon is simulated by
``benchmarks/drift.py`` (``benchmarks/results/drift.json``), with the delay after a shift.

For information only, the report also carries the plain e-process E_k = prod_{i<=k} e_i (a test
supermartingale: by Ville's inequality P(sup_k E_k >= 1/level) <= level over the whole history, but
slow after many calm nights) and the night's own one-sided binomial p-value of D_i. Neither sets
the alarm: OR-ing a per-night test into the rule would add a false-alarm chance of up to ``level``
every night (about 24% within 30 calm nights at level 0.01, see the benchmark).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .pvalues import binomial_upper_pvalue, check_level

__all__ = ["DEFAULT_ALTERNATIVES", "log_e_values", "drift_eprocess", "detection_delay", "e_detector", "alarms"]

DEFAULT_ALTERNATIVES = (1.25, 1.5, 2.0, 3.0)  # ρ = factor × α, capped below 1


def log_e_values(delegated: ArrayLike, n: ArrayLike, alpha: float, alternatives: ArrayLike = DEFAULT_ALTERNATIVES) -> np.ndarray:
    """log of the mixture e-value of each night (vectorised over nights)."""
    alpha = check_level(alpha, "alpha")
    d = np.asarray(delegated, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(d < 0) or np.any(d > n):
        raise ValueError("delegated counts must lie in [0, n]")
    rho = np.minimum(np.asarray(alternatives, dtype=float) * alpha, 1 - 1e-9)
    rho = rho[rho > alpha]
    if rho.size == 0:
        raise ValueError("no alternative rate above alpha")
    le = d[..., None] * np.log(rho / alpha) + (n - d)[..., None] * np.log((1 - rho) / (1 - alpha))
    m = le.max(axis=-1, keepdims=True)
    return (m + np.log(np.mean(np.exp(le - m), axis=-1, keepdims=True)))[..., 0]


def e_detector(log_e: ArrayLike) -> np.ndarray:
    """log M_k of the CUSUM e-detector M_k = max(M_{k-1}, 1) · e_k along the last axis."""
    log_e = np.asarray(log_e, dtype=float)
    out = np.empty_like(log_e)
    m = np.zeros(log_e.shape[:-1])
    for k in range(log_e.shape[-1]):
        m = np.maximum(m, 0.0) + log_e[..., k]
        out[..., k] = m
    return out


def alarms(log_detector: ArrayLike, level: float) -> np.ndarray:
    """The alarm rule: the e-detector at or over 1/level (elementwise on log M_k)."""
    return np.asarray(log_detector) >= np.log(1.0 / check_level(level, "level", scalar=True))


def drift_eprocess(
    delegated: ArrayLike, n: ArrayLike, alpha: float, level: float = 0.01, alternatives: ArrayLike = DEFAULT_ALTERNATIVES
) -> dict:
    """Drift statistics over a history of nights (oldest first; the last is tonight): ``alarm`` is the
    one rule (the e-detector M_k >= 1/level tonight); the plain e-process, the first alarm night (None
    if never) and tonight's own one-sided binomial p-value (``night_pvalue``) are for information."""
    le = log_e_values(delegated, n, alpha, alternatives)
    det = e_detector(le)
    proc = np.cumsum(le)
    over = alarms(det, level)
    hit = np.flatnonzero(over)
    exp = lambda x: float(np.exp(np.clip(x, -700, 700)))  # noqa: E731
    return {
        "log_e_detector": det.tolist(),
        "e_value": exp(det[-1]) if det.size else 1.0,
        "e_process": exp(proc[-1]) if proc.size else 1.0,
        "threshold": 1.0 / level,
        "alarm": bool(det.size and over[-1]),
        "first_alarm_night": int(hit[0]) if hit.size else None,
        "night_pvalue": float(binomial_upper_pvalue(int(np.ravel(delegated)[-1]), int(np.ravel(n)[-1]), alpha))
        if det.size
        else 1.0,
    }


def detection_delay(
    alpha: float,
    shifted_rate: float,
    n_per_night: int,
    *,
    nights_before: int = 30,
    max_nights: int = 60,
    level: float = 0.01,
    sims: int = 2000,
    seed: int = 0,
) -> dict:
    """Simulated nights: ``nights_before`` at the calibrated rate α, then the rate shifts; the number
    of nights after the shift until the e-detector alarms (and how often it alarmed before it)."""
    rng = np.random.default_rng(seed)
    rates = np.concatenate([np.full(nights_before, alpha), np.full(max_nights, shifted_rate)])
    d = rng.binomial(n_per_night, rates, size=(sims, rates.size))
    det = e_detector(log_e_values(d, np.full(d.shape, n_per_night), alpha))
    over = alarms(det, level)
    first = np.where(over.any(axis=1), over.argmax(axis=1), -1)
    early = (first >= 0) & (first < nights_before)
    late = first >= nights_before
    delays = first[late] - nights_before + 1
    return {
        "alpha": alpha,
        "shifted_rate": shifted_rate,
        "rows_per_night": n_per_night,
        "level": level,
        "sims": sims,
        "false_alarm_before_shift": float(early.mean()),
        "detected_within": max_nights,
        "share_detected": float(late.mean()),
        "median_delay_nights": float(np.median(delays)) if delays.size else None,
        "mean_delay_nights": float(delays.mean()) if delays.size else None,
    }
