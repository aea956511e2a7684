r"""Anytime-valid drift detection across nightly audits.

The calibrated threshold λ* guarantees R_B(λ*) = P(d(X) > λ*) <= α for traffic from the calibration
distribution. Night i delegates D_i of n_i rows; if the traffic still looks like the calibration
data, D_i ~ Binom(n_i, r) with r <= α. Against the alternative "the rate is ρ > α" the likelihood
ratio

.. math:: e_i(\rho) = (\rho/\alpha)^{D_i} \, ((1-\rho)/(1-\alpha))^{n_i - D_i}

has expectation <= 1 under any r <= α (it is increasing in D_i); so has the mixture
e_i = mean_j e_i(ρ_j) over a fixed set of alternatives. Two ways to combine nights:

* the e-process E_k = prod_{i<=k} e_i, a test supermartingale: by Ville's inequality
  P(sup_k E_k >= 1/γ) <= γ under the null (for the whole history). It is slow to react to a shift
  after many calm nights, because calm nights push it towards 0.
* the e-detector (CUSUM of e-values; Shin, Ramdas & Rinaldo 2023) M_k = max(M_{k-1}, 1) · e_k,
  which restarts after calm nights: under the null its average run length to a false alarm is at
  least 1/γ nights, and after a shift it alarms within a night or two. This is the alarm the audit
  uses; the report carries both numbers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_ALTERNATIVES", "log_e_values", "drift_eprocess", "detection_delay", "e_detector"]

DEFAULT_ALTERNATIVES = (1.25, 1.5, 2.0, 3.0)  # ρ = factor × α, capped below 1


def log_e_values(delegated, n, alpha: float, alternatives=DEFAULT_ALTERNATIVES) -> np.ndarray:
    """log of the mixture e-value of each night (vectorised over nights)."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
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


def e_detector(log_e) -> np.ndarray:
    """log M_k of the CUSUM e-detector M_k = max(M_{k-1}, 1) · e_k along the last axis."""
    log_e = np.asarray(log_e, dtype=float)
    out = np.empty_like(log_e)
    m = np.zeros(log_e.shape[:-1])
    for k in range(log_e.shape[-1]):
        m = np.maximum(m, 0.0) + log_e[..., k]
        out[..., k] = m
    return out


def drift_eprocess(delegated, n, alpha: float, level: float = 0.01, alternatives=DEFAULT_ALTERNATIVES) -> dict:
    """Drift statistics over a history of nights (oldest first): the e-detector (the alarm: it fires
    when M_k >= 1/level) and the plain e-process, with the first alarm night (None if never)."""
    if not 0 < level < 1:
        raise ValueError("level must lie in (0, 1)")
    le = log_e_values(delegated, n, alpha, alternatives)
    det = e_detector(le)
    proc = np.cumsum(le)
    hit = np.flatnonzero(det >= np.log(1.0 / level))
    exp = lambda x: float(np.exp(np.clip(x, -700, 700)))  # noqa: E731
    return {"log_e_detector": det.tolist(), "e_value": exp(det[-1]) if det.size else 1.0,
            "e_process": exp(proc[-1]) if proc.size else 1.0, "threshold": 1.0 / level, "alarm": bool(det.size and det[-1] >= np.log(1.0 / level)),
            "first_alarm_night": int(hit[0]) if hit.size else None}


def detection_delay(alpha: float, shifted_rate: float, n_per_night: int, *, nights_before: int = 30, max_nights: int = 60,
                    level: float = 0.01, sims: int = 2000, seed: int = 0) -> dict:
    """Simulated nights: ``nights_before`` at the calibrated rate α, then the rate shifts; the number
    of nights after the shift until the e-detector alarms (and how often it alarmed before it)."""
    rng = np.random.default_rng(seed)
    rates = np.concatenate([np.full(nights_before, alpha), np.full(max_nights, shifted_rate)])
    d = rng.binomial(n_per_night, rates, size=(sims, rates.size))
    det = e_detector(log_e_values(d, np.full(d.shape, n_per_night), alpha))
    over = det >= np.log(1.0 / level)
    first = np.where(over.any(axis=1), over.argmax(axis=1), -1)
    early = (first >= 0) & (first < nights_before)
    late = first >= nights_before
    delays = first[late] - nights_before + 1
    return {"alpha": alpha, "shifted_rate": shifted_rate, "rows_per_night": n_per_night, "level": level, "sims": sims,
            "false_alarm_before_shift": float(early.mean()), "detected_within": max_nights,
            "share_detected": float(late.mean()), "median_delay_nights": float(np.median(delays)) if delays.size else None,
            "mean_delay_nights": float(delays.mean()) if delays.size else None}
