"""P-values and confidence bounds for risks that are means of bounded losses.

Everything here is a pure, vectorised function of integer counts (or loss sums), sample sizes and
risk levels. Nothing reads data or files.

Conventions
-----------
A *risk* is the expectation of a loss in [0, 1]; a risk level ``alpha`` is the largest acceptable risk.
The null hypothesis for a configuration is H: R > alpha ("this configuration is not safe"); a small
p-value is evidence that R <= alpha. Each p-value below is super-uniform under H:
P(p <= t) <= t for every t in [0, 1].
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# scipy.stats is imported in the functions that use it: ~1 s that every Ray worker running audit code would pay

__all__ = [
    "check_level",
    "binomial_pvalue",
    "binomial_upper_pvalue",
    "hoeffding_bentkus_pvalue",
    "max_certifiable_count",
    "min_certifiable_n",
    "certifiable_counts",
    "rows_to_certify",
    "clopper_pearson",
    "binomial_ucb",
    "simulation_draws",
]


def _as_counts(k, name: str = "k") -> np.ndarray:
    k = np.asarray(k)
    if not np.issubdtype(k.dtype, np.integer):
        kf = k.astype(float)
        if not (np.all(np.isfinite(kf)) and np.all(kf == np.round(kf))):
            raise ValueError(f"{name} must hold integer counts, got non-integer values")
        k = kf.astype(np.int64)
    return k


def check_level(x: ArrayLike, name: str, *, scalar: bool = False) -> float | np.ndarray:
    """A level (alpha, delta, epsilon, ...) or an array of them, each in the open interval (0, 1).
    Returns it as a float (scalar input) or a float array; anything else (strings, booleans, empty
    arrays, NaN, an array where ``scalar`` is asked) raises ValueError."""
    bad = ValueError(f"{name} must {'be a number' if scalar else 'lie'} in the open interval (0, 1), got {x!r}")
    if isinstance(x, (str, bytes, bool, np.bool_)):
        raise bad
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise bad from None
    if (scalar and arr.ndim) or arr.size == 0 or np.any(~np.isfinite(arr)) or np.any(arr <= 0) or np.any(arr >= 1):
        raise bad
    return float(arr) if arr.ndim == 0 else arr


def _check_n(n) -> None:
    n = np.asarray(n)
    if np.any(n < 1) or not np.all(n == np.round(n)):
        raise ValueError(f"n must be a positive integer, got {n.tolist()}")


def binomial_pvalue(k: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> np.ndarray | float:
    r"""Exact p-value for H: R > alpha from a Binomial count.

    For a 0/1 loss (here: "row delegated"), the count ``k`` of losses among ``n`` i.i.d. rows is
    Binomial(n, R). Under H, k is stochastically larger than Binomial(n, alpha), so

    .. math:: p = P(\mathrm{Binom}(n, \alpha) \le k)

    is a valid p-value. Computed from integer counts, never from a rounded ``n * mean``.

    Parameters
    ----------
    k : int array_like
        Observed counts, 0 <= k <= n. Broadcasts against ``n`` and ``alpha``.
    n : int array_like
        Sample sizes (>= 1).
    alpha : float array_like
        Risk levels in (0, 1).
    """
    from scipy import stats

    k = _as_counts(k)
    _check_n(n)
    check_level(alpha, "alpha")
    if np.any(k < 0) or np.any(k > np.asarray(n)):
        raise ValueError("counts must satisfy 0 <= k <= n")
    if np.ndim(n) == 0 and np.ndim(alpha) == 0 and k.size > int(n) + 1:
        # many counts, one (n, alpha): evaluate the CDF once per possible count and index it
        return stats.binom.cdf(np.arange(int(n) + 1), n, alpha)[k]
    return stats.binom.cdf(k, n, alpha)


def binomial_upper_pvalue(k: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> np.ndarray | float:
    r"""One-sided p-value for H: R <= alpha against R > alpha: P(Binom(n, alpha) >= k).

    Used by the audit report: a realised delegation count that is implausibly large under the
    calibrated guarantee (distribution shift) gets a small p-value.
    """
    from scipy import stats

    k = _as_counts(k)
    _check_n(n)
    check_level(alpha, "alpha")
    return stats.binom.sf(k - 1, n, alpha)


def _h1(a, b):
    # Kullback-Leibler divergence between Bernoulli(a) and Bernoulli(b), with 0 log 0 = 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a > 0, a * np.log(a / b), 0.0)
        t2 = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return t1 + t2


def hoeffding_bentkus_pvalue(loss_sum: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> np.ndarray | float:
    r"""Hoeffding-Bentkus p-value for H: R > alpha, R the mean of a loss bounded in [0, 1].

    (Bates et al. 2021, "Distribution-free, risk-controlling prediction sets", Prop. 3; used by
    Learn-then-Test, Angelopoulos et al. 2021.) With :math:`\hat R = S / n`,

    .. math:: p = \min\Big(\exp\{-n\,h_1(\hat R \wedge \alpha, \alpha)\},\;
              e\,P(\mathrm{Binom}(n, \alpha) \le \lceil n \hat R \rceil)\Big)

    where :math:`h_1(a, b) = a\log(a/b) + (1-a)\log((1-a)/(1-b))`.

    Parameters
    ----------
    loss_sum : array_like
        Sum of the n losses (an integer count for a 0/1 loss, which is then used exactly).
    n : int array_like
    alpha : float array_like in (0, 1)
    """
    from scipy import stats

    _check_n(n)
    check_level(alpha, "alpha")
    s = np.asarray(loss_sum)
    n_arr = np.asarray(n)
    if np.issubdtype(s.dtype, np.integer):
        ceil_s = s
    else:
        s = s.astype(float)
        # The exact ceiling, never less: a sum just above an integer (12.00000005, real or rounding
        # noise) must count as above it, or the p-value is too small (invalid). Noise only ever makes
        # this conservative; pass integer counts for 0/1 losses to use them exactly.
        ceil_s = np.ceil(s).astype(np.int64)
    if np.any(s < 0) or np.any(s > n_arr + 1e-9):
        raise ValueError("loss_sum must lie in [0, n] (losses bounded in [0, 1])")
    r_hat = np.asarray(s, dtype=float) / n_arr
    hoeffding = np.exp(-n_arr * _h1(np.minimum(r_hat, alpha), np.asarray(alpha, dtype=float)))
    bentkus = np.e * stats.binom.cdf(ceil_s, n_arr, alpha)
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def max_certifiable_count(n: int, alpha: float, delta: float) -> int:
    r"""k* = max{k : BinomCDF(k; n, alpha) <= delta}, or -1 when even k = 0 is not enough.

    A threshold whose calibration count of delegated rows is at most k* has a binomial p-value
    <= delta, so it is certified by any of the tests in :mod:`ctd.stats.testing`.
    """
    from scipy import stats

    _check_n(n)
    check_level(alpha, "alpha")
    check_level(delta, "delta")
    cdf = stats.binom.cdf(np.arange(n + 1), n, alpha)
    return int(np.searchsorted(cdf, delta, side="right")) - 1


def min_certifiable_n(alpha: float, delta: float) -> int:
    """Smallest calibration size n for which a policy that never delegates on it is certifiable:
    (1 - alpha)^n <= delta (exactly: no rounding of the logarithms decides a tie)."""
    check_level(alpha, "alpha")
    check_level(delta, "delta")
    n = max(1, int(np.floor(np.log(delta) / np.log1p(-alpha))))
    while (1 - alpha) ** n > delta:
        n += 1
    while n > 1 and (1 - alpha) ** (n - 1) <= delta:
        n -= 1
    return n


def certifiable_counts(n: ArrayLike, alpha: float, delta: float) -> np.ndarray:
    """k*(n) = max{k : BinomCDF(k; n, alpha) <= delta} for every n (vectorised), -1 where none is."""
    from scipy import stats

    n = np.asarray(n, dtype=np.int64)
    k = stats.binom.ppf(delta, n, alpha)  # the smallest k with CDF >= delta
    k = np.where(stats.binom.cdf(k, n, alpha) <= delta, k, k - 1)
    return k.astype(np.int64)


def rows_to_certify(
    rate: float, alpha: float, delta: float, *, chance: float | None = None, n_max: int = 10_000_000
) -> int | None:
    """Calibration rows needed to certify a threshold that delegates a share ``rate`` of the traffic:
    the smallest n from which on (every larger n too: the binomial test is a sawtooth in n) ...

    - ``chance`` None: ... its count on the calibration rows, taken as exactly floor(n · rate), passes
      P(Binom(n, alpha) <= count) <= delta. That is where the *expected* count passes: a calibration
      set of that size certifies the threshold only about half the time.
    - ``chance`` c: ... its count, drawn Binom(n, rate) as a calibration set's count is, passes with
      probability >= c (P(Binom(n, rate) <= k*(n)) >= c, :func:`certifiable_counts`).

    Every n is scanned up to a Hoeffding bound past which the condition holds for certain; None
    when that bound exceeds ``n_max``, and always for rate >= alpha. ``rate`` 0 with ``chance`` None
    gives :func:`min_certifiable_n`."""
    from scipy import stats

    check_level(alpha, "alpha")
    check_level(delta, "delta")
    if not 0 <= rate < alpha:
        return None
    gap = alpha - rate
    if chance is None:
        bound = int(np.ceil(np.log(1 / delta) / (2 * gap**2)))
    else:
        check_level(chance, "chance")
        # K <= n·rate + t w.p. >= c with t = sqrt(n ln(1/(1-c))/2); k*(n) >= n·alpha - sqrt(n ln(1/δ)/2) - 1
        s = np.sqrt(np.log(1 / (1 - chance)) / 2) + np.sqrt(np.log(1 / delta) / 2)
        bound = int(np.ceil(((s + np.sqrt(s * s + 4 * gap)) / (2 * gap)) ** 2))
    if bound > n_max:
        return None
    n = np.arange(1, bound + 1)
    if chance is None:
        fails = np.flatnonzero(stats.binom.cdf(np.floor(n * rate + 1e-9), n, alpha) > delta)
    else:
        fails = np.flatnonzero(stats.binom.cdf(certifiable_counts(n, alpha, delta), n, rate) < chance)
    return int(fails[-1]) + 2 if fails.size else 1  # (index i is n = i + 1)


def clopper_pearson(k: ArrayLike, n: ArrayLike, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided Clopper-Pearson interval for a binomial proportion (vectorised).

    Returns ``(low, high)`` arrays.
    """
    from scipy import stats

    k = _as_counts(k)
    _check_n(n)
    check_level(confidence, "confidence")
    a = 1.0 - confidence
    k_f = k.astype(float)
    n_f = np.asarray(n, dtype=float)
    low = np.where(k > 0, stats.beta.ppf(a / 2, k_f, n_f - k_f + 1), 0.0)
    high = np.where(k < n_f, stats.beta.ppf(1 - a / 2, k_f + 1, n_f - k_f), 1.0)
    return low, high


def binomial_ucb(k: ArrayLike, n: ArrayLike, delta: float) -> np.ndarray:
    """One-sided (1 - delta) upper confidence bound on a binomial proportion (Clopper-Pearson):
    the largest R with P(Binom(n, R) <= k) >= delta."""
    from scipy import stats

    k = _as_counts(k)
    _check_n(n)
    check_level(delta, "delta")
    k_f = k.astype(float)
    n_f = np.asarray(n, dtype=float)
    return np.where(k < n_f, stats.beta.ppf(1 - delta, k_f + 1, n_f - k_f), 1.0)


def simulation_draws(bound: float, *, ratio: float = 1.25, level: float = 0.01, power: float = 0.9) -> int:
    """How many independent draws a simulation of a guarantee "P(violation) <= bound" needs.

    The check is the exact one-sided binomial test of the violation count ``v`` out of ``N`` draws,
    failing when :func:`binomial_upper_pvalue` (v, N, bound) <= ``level``. Returns the smallest N
    (in steps of 50) with which a true violation rate of ``ratio * bound`` fails the check with
    probability >= ``power``; a correct method (rate <= bound) fails it with probability <= level.
    """
    from scipy import stats

    check_level(bound, "bound")
    check_level(level, "level")
    check_level(power, "power")
    if not (ratio > 1 and ratio * bound < 1):
        raise ValueError("ratio must be > 1 with ratio * bound < 1")
    for n in range(50, 1_000_001, 50):
        c = stats.binom.isf(level, n, bound)  # fail when v > c: P(v > c | bound) <= level
        if stats.binom.sf(c, n, ratio * bound) >= power:
            return n
    raise ValueError("more than a million draws needed")
