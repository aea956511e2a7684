r"""Risk control for online alarm thresholds ("Online Safety Monitoring for LLMs", arXiv 2607.02510).

A monitor watches a risk score r_t at each step of a trajectory and raises an alarm at the first step
with r_t > λ (strictly). Per trajectory only its maximum M = max_t r_t matters for *whether* an alarm
fires: alarm(λ) = 1[M > λ]. Two risks, each the mean of a 0/1 loss over a population of trajectories:

* false alarm  R_I(λ)  = P(M > λ | the trajectory ends correct)      non-increasing in λ
* missed detection R_II(λ) = P(M <= λ | the trajectory ends incorrect) non-decreasing in λ

Two controls of a risk R at level ε on n calibration trajectories of the relevant kind, each choosing
the least conservative λ of a grid fixed in advance:

* conformal risk control (CRC; Angelopoulos et al. 2022), in expectation:
  λ̂ = the least conservative λ with (n/(n+1)) R̂(λ) + B/(n+1) <= ε (B = 1), so E[R(λ̂)] <= ε;
* an upper confidence bound, with probability >= 1 - δ: Learn-then-Test with the exact binomial
  p-value of the loss count and fixed-sequence testing from the most conservative λ — the same
  machinery as the delegation threshold (:mod:`ctd.stats.calibrate`), so R(λ̂) <= ε w.p. >= 1 - δ.

"Most conservative" is the end of the grid where the risk is smallest: the largest λ for false
alarms (never alarm), the smallest for missed detections (always alarm). When no grid value
qualifies the result is that end itself pushed to ±inf (never / always alarm), so the risk is 0.
Everything is vectorised over leading axes (many calibration sets at once) and pure.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from .calibrate import certify, counts_at_or_below
from .pvalues import binomial_pvalue, check_level

__all__ = ["RISKS", "alarm_counts", "crc_threshold", "ucb_threshold", "control_threshold"]

RISKS = ("false-alarm", "missed-detection")
Risk = Literal["false-alarm", "missed-detection"]


def alarm_counts(max_scores: ArrayLike, grid: ArrayLike, risk: Risk) -> np.ndarray:
    """Loss counts per grid value, from trajectory maxima [..., n]:
    false alarm #{M > λ}; missed detection #{M <= λ}. Shape [..., G] (int64)."""
    m = np.asarray(max_scores, dtype=float)
    n = m.shape[-1]
    le = counts_at_or_below(m, grid, "trajectory scores")  # #{M <= λ}
    if risk == "false-alarm":
        return n - le
    if risk == "missed-detection":
        return le
    raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")


def _check(epsilon, n):
    check_level(epsilon, "epsilon")
    if n < 1:
        raise ValueError("at least one calibration trajectory of the relevant kind is needed")


def _pick(grid, ok, risk):
    """The least conservative qualifying λ (ok: bool [..., G]); ±inf where none qualifies."""
    g = np.asarray(grid)
    if risk == "false-alarm":  # qualifying set is an upper ray of the grid: take its smallest λ
        idx = np.argmax(ok, axis=-1)
        return np.where(ok.any(axis=-1), g[idx], np.inf)
    idx = g.size - 1 - np.argmax(ok[..., ::-1], axis=-1)  # a lower ray: its largest λ
    return np.where(ok.any(axis=-1), g[idx], -np.inf)


def crc_threshold(counts: ArrayLike, n: int, epsilon: float, grid: ArrayLike, risk: Risk, bound: float = 1.0) -> np.ndarray:
    """CRC threshold from loss counts [..., G] on n trajectories: the least conservative λ with
    (n/(n+1)) R̂(λ) + B/(n+1) <= ε, requiring it of every more conservative λ too (for a monotone
    risk this is the same set; with ties it keeps the choice well defined)."""
    _check(epsilon, n)
    c = np.asarray(counts)
    ok = (n / (n + 1.0)) * (c / n) + bound / (n + 1.0) <= epsilon
    # the qualifying set must reach the conservative end (monotone risk): accumulate from that end
    if risk == "false-alarm":
        ok = np.logical_and.accumulate(ok[..., ::-1], axis=-1)[..., ::-1]
    else:
        ok = np.logical_and.accumulate(ok, axis=-1)
    return _pick(grid, ok, risk)


def ucb_threshold(counts: ArrayLike, n: int, epsilon: float, delta: float, grid: ArrayLike, risk: Risk) -> np.ndarray:
    """High-probability control: binomial p-values P(Binom(n, ε) <= count) for H_λ: R(λ) > ε,
    fixed-sequence testing from the conservative end at level δ; the least conservative certified λ."""
    _check(epsilon, n)
    c = np.asarray(counts)
    p = binomial_pvalue(c, n, epsilon)
    G = c.shape[-1]
    order = np.arange(G)[::-1] if risk == "false-alarm" else np.arange(G)
    ok = certify(p, delta, method="fixed_sequence", order=np.broadcast_to(order, c.shape))
    return _pick(grid, ok, risk)


def control_threshold(
    max_scores: ArrayLike, grid: ArrayLike, risk: Risk, control: Literal["crc", "ucb"], epsilon: float, delta: float = 0.1
) -> np.ndarray:
    """λ̂ from the maxima of the calibration trajectories of the relevant kind (correct ones for
    false alarms, incorrect ones for missed detections)."""
    m = np.asarray(max_scores, dtype=float)
    counts = alarm_counts(m, grid, risk)
    n = m.shape[-1]
    if control == "crc":
        return crc_threshold(counts, n, epsilon, grid, risk)
    if control == "ucb":
        return ucb_threshold(counts, n, epsilon, delta, grid, risk)
    raise ValueError(f"control must be 'crc' or 'ucb', got {control!r}")
