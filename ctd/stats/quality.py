r"""The nightly quality watch (issue #23): how good were tonight's published decisions, measured against
the judge on a random control sample, and three per-night alarms.

Everything here is a pure, vectorised numpy/scipy function of arrays and counts; nothing reads data.

The control sample
------------------
Each audited row enters the control sample independently with probability π (a keyed hash of the
row id, independent of every score), so the realised size is n ~ Binom(N, π) and, given n, the
sampled rows are a uniform random subset of the night's rows (simple random sampling without
replacement). The judge labels every control row: Y = 1 "unsafe". Delegated rows are judged too, but
they are the probe's most uncertain rows, chosen by score: **they are never used as a sample** (their
share of probe errors is far above the rest; ``tests/test_quality_stats.py`` shows the bias). They
enter the estimates below only through the predictor, where no choice of rows can bias anything.

What the estimates estimate
---------------------------
The estimand is a share among *tonight's* rows (a finite population): e.g. the miss rate is the
share, among tonight's rows the probe decided alone, of rows the probe called safe and the judge
would call unsafe. The only randomness is the control sample, which the hash makes an exact uniform
sample whatever the traffic: the intervals need no assumption on the traffic (not even i.i.d. rows),
only that the judge's verdict on a row does not depend on whether the row was sampled.
``target="traffic"`` estimates instead the rate of the distribution the night's rows were drawn from
(rows i.i.d.), which adds the variance s_y²/N of tonight's share around that rate.

Prediction-powered inference
----------------------------
A predictor f in [0, 1] known on every row (the probe's score; for delegated rows the judge's verdict
itself) is combined with the labels of the sample (Angelopoulos et al. 2023, "Prediction-powered
inference"; the survey sampler's difference / regression estimator). For a set S of N rows with n of
them labelled and a weight λ,

.. math:: \hat\theta_\lambda = \lambda \bar f_S + \overline{(y - \lambda f)}_{\text{sample}},
          \qquad \widehat{\mathrm{Var}} = (1 - n/N)\, s^2_{y - \lambda f} / n \;[+\, s^2_y / N \text{ for the traffic}]

a CLT interval, clipped to [0, 1], with two small-sample refinements from the Edgeworth expansion of
the studentized mean (Hall 1992): Student's t quantile (n - 1 degrees of freedom) widened by
z γ̂² (z⁴ + 2z² - 3) / (18 n), the skewness term of the t interval's two-sided coverage error (Owen
2025), and both ends moved by se · γ̂ (2z² + 1) / (6 √n), up for a right-skewed residual (rare events),
which balances the misses on the two sides (γ̂ the residual's sample skewness). The coverage is
asymptotic. Over 3,000 simulated nights of 20,000 rows (``benchmarks/results/quality.json``) the 95%
intervals covered 94.8-95.5% overall (n ≈ 340-400 control rows; 96.6% for the false-flag rate, n ≈ 70)
and 93.9-98.5% per group (n ≈ 10-200), the lowest for the prevalence of groups of 40-100 control
rows; where exact coverage at such sizes matters more than width, ``method="sample"`` is exact.

For every fixed λ the estimate is unbiased given n, whatever f is: a bad predictor only widens the
interval. ``method="ppi"`` is classic PPI (λ = 1); ``"ppi++"`` is power-tuned (Angelopoulos, Duchi &
Zrnic 2023, "PPI++"): λ̂ = ĉov(y, f) / var(f), clipped to [0, 1], covariance from the sample, variance
of f over all N rows. PPI++ divides by (1 + n/N) because its unlabelled set is disjoint from the
labelled one; here the sample is drawn from the N rows whose mean f̄_S is used, and the variance above
is minimised by λ = cov/var exactly (the two differ by 1 + π, at most a few per cent). λ̂ = 0 gives the
sample mean and its Wald interval (with the finite-population factor and the refinements above); a
constant predictor gives λ̂ = 0. ``method="sample"`` is the exact Clopper-Pearson interval on the
labelled rows alone (valid, conservative, for a sample without replacement too).

Fallback: with fewer than ``MIN_LABELLED`` = 30 labelled rows, or fewer than ``MIN_EVENTS`` = 5 of
either verdict among them, the CLT is not trusted and the estimate is Clopper-Pearson on the sample
alone; the Estimate's ``method`` says so. A census (every row of S labelled) is exact.

**Subsets.** For a set S whose membership is known on every row (the rows the probe decided alone, one
group), the sampled rows that fall in S are, given their number, a uniform sample of S: use them as
the labels and f over all of S (count, sum and sum of squares: :class:`Sums`, additive over batches,
so the driver never holds every row). Membership must not depend on the sample or on the judge.

Named estimates (p = the probe's score p(x), its decision p >= t; f is the predictor):

=================  ==============================  ===========================  ====================================
estimate           rows (S)                        y (needs the judge)          f
=================  ==============================  ===========================  ====================================
miss_rate          not delegated                   probe safe and judge unsafe  p · [probe safe]
false_flag_rate    not delegated, probe unsafe     judge safe                   1 - p
agreement          all                             published == judge           [published == verdict] where the
                                                                                delegated row's verdict is known,
                                                                                else P(agree) = p or 1 - p
prevalence         all                             judge unsafe                 the verdict where the delegated
                                                                                row's is known, else p
=================  ==============================  ===========================  ====================================

:func:`by_group` gives them per group, optionally with Bonferroni-adjusted (simultaneous) levels.

The alarms: what each bounds
----------------------------
Each is a test of tonight against a reference at ``level`` (default ``DEFAULT_LEVEL`` = 0.005):

* :func:`disagreement_alarm`: tonight's share of control rows where the probe's decision differs from
  the judge, against the calibration data's. One-sided binomial test of tonight's count against the
  (1 - level/2) Clopper-Pearson upper bound of the reference rate, at level/2. Bounds P(fire) <= level
  per night when tonight's rate is at most the reference's; more: except with probability level/2
  over the reference sample (once, for the life of the reference), *every* night's false-alarm
  probability is <= level/2. Fisher's exact test would be more powerful but bounds false alarms only
  on average over reference samples: the reference is fixed for months, and one that came out low by
  chance (2 standard errors low: 2.5% of references) would raise every night's false-alarm rate to
  0.022 (at level 0.005, 400 control rows, 2,000 reference rows, a 20% rate), where this test stays
  at 0.0005. The price is power: a doubling of the probe's miss rate (disagreement 19.8% -> 28.6%) is
  caught on its first night with probability 0.51 instead of Fisher's 0.88 (mean delay 2.2 nights
  instead of 1.1); a larger reference narrows the gap.
* :func:`group_rate_alarm`: a group whose delegation rate is above α. Exact one-sided binomial
  p-values per group, Holm across groups. Bounds the family-wise false alarm per night by ``level``
  when every group's rate is <= α (rows independent within a group). λ* certifies only the overall
  rate: a group may legitimately delegate more than α, so the alarm flags a group for a look, not a
  broken guarantee.
* :func:`prevalence_alarm`: a change of the share of unsafe verdicts on tonight's control sample
  against the trailing nights' control samples pooled; two-sided Fisher exact test (conditional on
  the margins, so exact for any common rate). Bounds P(fire) <= level per night when tonight and the
  trailing nights share one prevalence and are independent samples; day-to-day variation beyond the
  binomial (weekly cycles) is a change by this definition and will fire it.

These are **per-night tests**, unlike the drift alarm (:mod:`ctd.stats.drift`), an e-detector whose
average run length to a false alarm is at least 1/level nights. Here each calm night fires with
probability <= level, so over T calm nights expect about T · level false alarms of each alarm (about
1.8 a year at 0.005). Use level 0.001-0.01; the default 0.005 is one false alarm per alarm in
about 200 calm nights, and still detects within a night or two (``benchmarks/results/quality.json``)
a group delegating 1.2 α, a doubled miss rate of the probe and a 10-point rise of the prevalence
across the traffic. Shifts confined to a small group take far longer, or, for the prevalence alarm,
are absorbed by the trailing window before they are seen.

Sizing the control sample (:func:`control_plan`)
------------------------------------------------
π = clip(share, floor/N, ceiling/N), at most 1. Defaults: share 0.01, floor 400, ceiling 20,000 rows.

* floor 400: a 5% rate is estimated to about ±2.3 points (Clopper-Pearson half-width at n = 400,
  :func:`control_interval_width`), a 50% rate to ±5; the miss rate, over the ~80-90% of rows the
  probe decides alone, to about ±2.5. Fewer rows give intervals too wide to act on, and the alarms
  lose their power (a disagreement rate doubling from 10% to 20% is detected on a night of 400
  control rows with probability 0.92 at level 0.005).
* share 1%: the judge's extra cost is 1% of traffic on top of the delegated share α (10-25%); a
  night of 1M rows gets 10,000 control rows, ±0.4 points at 5%.
* ceiling 20,000: ±0.3 points at 5%. Width falls as 1/√n while the judge's bill grows as n, so
  beyond this more rows buy nothing a nightly watch needs; the ceiling caps the bill on huge nights
  (10M rows: 20,000 control rows, not 100,000).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import betaincinv, gammaln, stdtrit  # scipy.stats: imported where used (~1 s in a Ray worker)

from .pvalues import binomial_ucb, binomial_upper_pvalue, check_level
from .testing import holm

__all__ = [
    "DEFAULT_LEVEL",
    "MIN_LABELLED",
    "MIN_EVENTS",
    "ESTIMATES",
    "Estimate",
    "Sums",
    "Alarm",
    "sample_proportion",
    "ppi_mean",
    "ppi_mean_from_sums",
    "estimate_terms",
    "subset_sums",
    "miss_rate",
    "false_flag_rate",
    "agreement",
    "prevalence",
    "estimate",
    "by_group",
    "fisher_greater_pvalue",
    "fisher_two_sided_pvalue",
    "disagreement_pvalue",
    "disagreement_alarm",
    "group_rate_alarm",
    "prevalence_alarm",
    "control_plan",
    "control_interval_width",
]

DEFAULT_LEVEL = 0.005  # per-night false-alarm probability of each alarm
MIN_LABELLED = 30  # fewer labelled rows: Clopper-Pearson on the sample alone
MIN_EVENTS = 5  # fewer of either verdict among them: likewise (the CLT is not trusted)
ESTIMATES = ("miss_rate", "false_flag_rate", "agreement", "prevalence")

Method = Literal["ppi++", "ppi", "sample"]
Target = Literal["night", "traffic"]


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.1f}%"


@dataclass(frozen=True)
class Estimate:
    """A share with a two-sided confidence interval: ``value`` (NaN without data), ``low``/``high``,
    the interval's confidence ``level``, ``n`` the labelled (control) rows used and ``method`` in words."""

    value: float
    low: float
    high: float
    level: float
    n: int
    method: str

    def words(self, pct: bool = True) -> str:
        """One line, e.g. "4.1% (95% interval 2.3%–6.8%, PPI++ with ...)"."""
        fmt = _pct if pct else (lambda x: "n/a" if not np.isfinite(x) else f"{x:.4f}")
        return f"{fmt(self.value)} ({100 * self.level:g}% interval {fmt(self.low)}–{fmt(self.high)}, {self.method})"

    def to_dict(self) -> dict:
        """Plain types (JSON: NaN becomes None)."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass(frozen=True)
class Sums:
    """Count, sum and sum of squares of a predictor over every row of a set (additive over batches)."""

    n: int = 0
    sum_f: float = 0.0
    sum_f2: float = 0.0

    @classmethod
    def of(cls, f: ArrayLike) -> Sums:
        """The sums of the values ``f``."""
        f = np.asarray(f, dtype=float).ravel()
        return cls(int(f.size), float(f.sum()), float(np.sum(f * f)))

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.n + other.n, self.sum_f + other.sum_f, self.sum_f2 + other.sum_f2)


@dataclass(frozen=True)
class Alarm:
    """A per-night quality alarm: fired when ``statistic`` (a p-value) <= ``threshold``; ``message``
    in words, ``bound`` one sentence on what the rule bounds; ``flagged`` names groups, where any."""

    fired: bool
    statistic: float
    threshold: float
    message: str
    bound: str
    flagged: tuple = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """Plain types."""
        d = asdict(self)
        d["flagged"] = list(self.flagged)
        return d


# ------------------------------------------------------------------ estimates
def _empty(level: float, method: str, n: int = 0) -> Estimate:
    return Estimate(float("nan"), 0.0, 1.0, level, n, method)


def sample_proportion(k: int, n: int, level: float = 0.95, *, what: str = "the control sample") -> Estimate:
    """A share among ``n`` uniformly sampled rows, ``k`` of them counted: the exact two-sided
    Clopper-Pearson interval at ``level`` (conservative for a sample without replacement too).
    n = 0 gives value NaN and the interval [0, 1]."""
    level = check_level(level, "level", scalar=True)
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return _empty(level, f"no rows in {what}: nothing to estimate")
    a = 1.0 - level
    low = float(betaincinv(k, n - k + 1, a / 2)) if k > 0 else 0.0
    high = float(betaincinv(k + 1, n - k, 1 - a / 2)) if k < n else 1.0
    return Estimate(k / n, low, high, level, n, f"Clopper-Pearson on {what} (n={n:,})")


def _labels(y: ArrayLike, f: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=float).ravel()
    f = np.asarray(f, dtype=float).ravel()
    if y.shape != f.shape:
        raise ValueError(f"y_lab and f_lab differ in length ({y.size} vs {f.size})")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y_lab must hold 0/1 verdicts")
    if not np.all((f >= 0) & (f <= 1)):
        raise ValueError("the predictor must lie in [0, 1] (no NaN)")
    return y, f


def ppi_mean_from_sums(
    y_lab: ArrayLike,
    f_lab: ArrayLike,
    n_all: int,
    sum_f: float,
    sum_f2: float,
    level: float = 0.95,
    tuned: bool = True,
    *,
    target: Target = "night",
    predictor: str = "the predictor",
) -> Estimate:
    """Prediction-powered estimate of the mean of a 0/1 ``y`` over a set of ``n_all`` rows, from a
    uniform sample of them (``y_lab`` with the predictor ``f_lab`` on the same rows) and the sums
    ``sum_f``, ``sum_f2`` of the predictor over all ``n_all`` rows (the sampled ones included).

    ``tuned``: PPI++'s power-tuned weight λ̂ = ĉov(y, f) / var(f) in [0, 1] (else λ = 1, classic PPI).
    ``target``: "night" (the share among these rows) or "traffic" (the rate they were drawn from).
    Falls back to Clopper-Pearson on the sample below ``MIN_LABELLED`` rows or ``MIN_EVENTS`` of either
    verdict; see the module docstring for the formulas and what they assume.
    """
    level = check_level(level, "level", scalar=True)
    if target not in ("night", "traffic"):
        raise ValueError(f"target must be 'night' or 'traffic', got {target!r}")
    y, f = _labels(y_lab, f_lab)
    n, big_n = y.size, int(n_all)
    if big_n < n:
        raise ValueError(f"n_all ({big_n}) is smaller than the labelled sample ({n}): f_all must include the sampled rows")
    if big_n == 0:
        return _empty(level, "no rows: nothing to estimate")
    mean_f = float(sum_f) / big_n
    var_f = float(sum_f2) / big_n - mean_f**2
    # the sums may come from a fixed-point tally (1e-6, rounded once per block: ctd/audit/facts.py), so each is
    # off by at most 0.5e-6 per block, at most n_all blocks: the mean by ≤ 0.5e-6 and the variance by ≤ 1.5e-6
    tol = 1e-6
    if not (-tol <= mean_f <= 1 + tol and var_f >= -2 * tol and float(sum_f2) <= float(sum_f) + tol * big_n + 1e-9):
        raise ValueError("sum_f and sum_f2 are not the sums of values in [0, 1] over n_all rows")
    var_f = max(var_f, 0.0) * big_n / (big_n - 1) if big_n > 1 else 0.0
    k = int(y.sum())
    if n == big_n and target == "night":
        return Estimate(k / n, k / n, k / n, level, n, f"census: every one of the {n:,} rows is labelled")
    why = None
    if n < MIN_LABELLED:
        why = f"fewer than {MIN_LABELLED} labelled rows"
    elif min(k, n - k) < MIN_EVENTS:
        why = f"fewer than {MIN_EVENTS} {'unsafe' if k < n - k else 'safe'} verdicts in it"
    if why:
        est = sample_proportion(k, n, level)
        return Estimate(est.value, est.low, est.high, level, n, est.method[:-1] + f"; {why}: the predictor is not used)")
    if tuned:
        cov = float(np.sum((y - y.mean()) * (f - f.mean()))) / (n - 1)
        lam = float(np.clip(cov / var_f, 0.0, 1.0)) if var_f > 0 else 0.0
    else:
        lam = 1.0
    e = y - lam * f
    theta = lam * mean_f + float(e.mean())
    var = (1.0 - n / big_n) * float(e.var(ddof=1)) / n
    if target == "traffic":
        var += float(y.var(ddof=1)) / big_n
    se = math.sqrt(max(var, 0.0))
    sd = float(e.std())
    skew = float(np.mean((e - e.mean()) ** 3)) / sd**3 if sd > 0 else 0.0
    z = float(stdtrit(n - 1, 1 - (1 - level) / 2))
    # Edgeworth expansion of the studentized mean (Hall 1992): P(T <= x) = Φ(x) + γ(2x² + 1)φ(x)/(6√n)
    # + O(1/n), so a skewed residual (rare events) skews T the other way: its quantiles are
    # z - γ(2z² + 1)/(6√n) (the shift below). At order 1/n the two tails together miss by
    # 2zφ(z)γ²(z⁴ + 2z² - 3)/(18n) (Owen 2025: the -2.16γ² of Student's t interval; the kurtosis term,
    # which only adds coverage, is left out): z widens by z γ²(z⁴ + 2z² - 3)/(18n) to make it up
    z += z * skew**2 * (z**4 + 2 * z * z - 3) / (18 * n)
    shift = float(np.clip(skew * (2 * z * z + 1) / (6 * math.sqrt(n)), -z, z))
    low, high = theta - se * (z - shift), theta + se * (z + shift)
    name = f"PPI++ (the predictor weighted {lam:.2f})" if tuned else "PPI"  # its own weight, not the threshold λ*
    method = f"{name} with {predictor} on {big_n:,} rows (control n={n:,})"
    if target == "traffic":
        method += ", for the traffic's rate"
    return Estimate(float(np.clip(theta, 0, 1)), float(max(low, 0.0)), float(min(high, 1.0)), level, n, method)


def ppi_mean(
    y_lab: ArrayLike,
    f_lab: ArrayLike,
    f_all: ArrayLike,
    level: float = 0.95,
    tuned: bool = True,
    *,
    target: Target = "night",
    predictor: str = "the predictor",
) -> Estimate:
    """:func:`ppi_mean_from_sums` with the predictor on every row of the set at hand (``f_all``, the
    labelled rows among them)."""
    s = Sums.of(_labels(np.zeros(np.size(f_all)), f_all)[1])
    return ppi_mean_from_sums(y_lab, f_lab, s.n, s.sum_f, s.sum_f2, level, tuned, target=target, predictor=predictor)


def _rows(score, flagged, delegated, verdict, published=None):
    p = np.asarray(score, dtype=float).ravel()
    fl = np.asarray(flagged, dtype=bool).ravel()
    dl = np.asarray(delegated, dtype=bool).ravel()
    v = np.asarray(verdict, dtype=float).ravel() if verdict is not None else np.full(p.shape, np.nan)
    if not (p.shape == fl.shape == dl.shape == v.shape):
        raise ValueError("score, flagged, delegated and verdict must have one entry per row")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("scores must lie in [0, 1]")
    if not np.all(np.isnan(v) | (v == 0) | (v == 1)):
        raise ValueError("verdicts must be 0 (safe), 1 (unsafe) or NaN (not judged)")
    known = dl & ~np.isnan(v)
    if published is None:  # the switch cascade: the judge's verdict where it was used
        pub = np.where(known, v == 1, fl)
    else:
        pub = np.asarray(published, dtype=bool).ravel()
        if pub.shape != p.shape:
            raise ValueError("published must have one entry per row")
    return p, fl, dl, v, known, pub


def estimate_terms(
    name: str,
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike | None,
    published: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(member, f, y)`` of a named estimate for every row: whether the row belongs to the set the
    share is taken over, the predictor, and the outcome (NaN where the verdict is unknown). ``verdict``:
    1 unsafe, 0 safe, NaN not judged; ``flagged``: the probe's decision p >= t; ``published``: the
    published decision (default: the judge's verdict on delegated rows that have one, else the probe's)."""
    p, fl, dl, v, known, pub = _rows(score, flagged, delegated, verdict, published)
    nan = np.isnan(v)
    if name == "miss_rate":
        return ~dl, np.where(fl, 0.0, p), np.where(nan, np.nan, (~fl & (v == 1)).astype(float))
    if name == "false_flag_rate":
        return ~dl & fl, 1.0 - p, np.where(nan, np.nan, (v == 0).astype(float))
    if name == "agreement":
        agree = (pub == (v == 1)).astype(float)
        f = np.where(known, agree, np.where(pub, p, 1.0 - p))
        return np.ones(p.shape, bool), f, np.where(nan, np.nan, agree)
    if name == "prevalence":
        return np.ones(p.shape, bool), np.where(known, v, p), v.copy()
    raise ValueError(f"unknown estimate {name!r}; choose from {ESTIMATES}")


def _group_codes(group, size: int) -> tuple[list, np.ndarray]:
    # sorted distinct groups and each row's index among them; rows without a group (None, NaN, "") last, as None
    g = np.asarray(group)
    if g.ndim != 1:
        g = g.ravel()
    if g.size != size:
        raise ValueError("group must have one entry per row")
    if g.dtype.kind == "f":
        missing = np.isnan(g)
    elif g.dtype.kind in "US":
        missing = g == g.dtype.type()
    elif g.dtype.kind == "O":
        missing = np.fromiter((x is None or x == "" or (isinstance(x, float) and x != x) for x in g), bool, g.size)
    else:
        missing = np.zeros(g.size, bool)
    try:
        keys, inv = np.unique(g[~missing], return_inverse=True)
    except TypeError:
        raise ValueError("group labels must be mutually comparable (all strings, or all numbers)") from None
    keys = keys.tolist()
    codes = np.full(g.size, len(keys), dtype=np.int64)
    codes[~missing] = inv.ravel()
    if missing.any():
        keys.append(None)
    return keys, codes


def subset_sums(
    name: str,
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike | None,
    *,
    published: ArrayLike | None = None,
    group: ArrayLike | None = None,
) -> Sums | dict[Hashable, Sums]:
    """The :class:`Sums` of a named estimate's predictor over the rows of its set, for a batch of the
    night's rows (any batch: sums add up; rows without a group are under the key None). These and the
    control rows are all the named estimates need."""
    member, f, _ = estimate_terms(name, score, flagged, delegated, verdict, published)
    if group is None:
        return Sums.of(f[member])
    keys, codes = _group_codes(group, f.size)
    m = len(keys)
    cnt = np.bincount(codes[member], minlength=m)
    s1 = np.bincount(codes[member], weights=f[member], minlength=m)
    s2 = np.bincount(codes[member], weights=f[member] ** 2, minlength=m)
    return {k: Sums(int(cnt[i]), float(s1[i]), float(s2[i])) for i, k in enumerate(keys)}


_PREDICTORS = {
    "miss_rate": "the probe's scores",
    "false_flag_rate": "the probe's scores",
    "agreement": "the probe's scores and the delegated rows' verdicts",
    "prevalence": "the probe's scores and the delegated rows' verdicts",
}
_SETS = {
    "miss_rate": "rows the probe decided alone",
    "false_flag_rate": "rows the probe decided alone and flagged",
    "agreement": "all rows",
    "prevalence": "all rows",
}


def _estimate_set(name, member, f, y, sampled, sums, level, method, target) -> Estimate:
    lab = member & sampled
    unjudged = int(np.sum(lab & np.isnan(y)))
    lab &= ~np.isnan(y)
    note = f" ({unjudged} control rows without a verdict left out)" if unjudged else ""
    if method == "sample":
        est = sample_proportion(int(y[lab].sum()), int(lab.sum()), level, what=f"the control sample of {_SETS[name]}")
    elif method in ("ppi++", "ppi"):
        s = sums if sums is not None else Sums.of(f[member])
        est = ppi_mean_from_sums(
            y[lab], f[lab], s.n, s.sum_f, s.sum_f2, level, method == "ppi++", target=target, predictor=_PREDICTORS[name]
        )
    else:
        raise ValueError(f"method must be 'ppi++', 'ppi' or 'sample', got {method!r}")
    return Estimate(est.value, est.low, est.high, est.level, est.n, est.method + note) if note else est


def _sampled(sampled, size, sums):
    if sampled is None:
        if sums is None:
            raise ValueError("sampled (the control-sample mask) is needed unless sums over the whole night are given")
        return np.ones(size, bool)
    s = np.asarray(sampled, dtype=bool).ravel()
    if s.size != size:
        raise ValueError("sampled must have one entry per row")
    return s


def estimate(
    name: str,
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike,
    sampled: ArrayLike | None = None,
    *,
    published: ArrayLike | None = None,
    level: float = 0.95,
    method: Method = "ppi++",
    target: Target = "night",
    sums: Sums | None = None,
) -> Estimate:
    """A named estimate (one of :data:`ESTIMATES`, see the module docstring) for tonight.

    Either the arrays hold every row of the night and ``sampled`` marks the control sample, or
    ``sums`` holds :func:`subset_sums` over the whole night and the arrays hold (at least) the control
    rows, ``sampled`` marking them (None: all of them). Only control rows are ever used as labels.
    ``method``: "ppi++", "ppi" or "sample" (Clopper-Pearson on the control rows alone).
    """
    member, f, y = estimate_terms(name, score, flagged, delegated, verdict, published)
    return _estimate_set(name, member, f, y, _sampled(sampled, f.size, sums), sums, level, method, target)


def miss_rate(
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike,
    sampled: ArrayLike | None = None,
    *,
    level: float = 0.95,
    method: Method = "ppi++",
    target: Target = "night",
    sums: Sums | None = None,
) -> Estimate:
    """Among the rows the probe decided alone (not delegated), the share the probe called safe and the
    judge calls unsafe. Predictor: p(x) on rows the probe called safe, 0 on the others. See :func:`estimate`."""
    return estimate(
        "miss_rate", score, flagged, delegated, verdict, sampled, level=level, method=method, target=target, sums=sums
    )


def false_flag_rate(
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike,
    sampled: ArrayLike | None = None,
    *,
    level: float = 0.95,
    method: Method = "ppi++",
    target: Target = "night",
    sums: Sums | None = None,
) -> Estimate:
    """Among the rows the probe decided alone and flagged unsafe, the share the judge calls safe.
    Predictor: 1 - p(x). See :func:`estimate`."""
    return estimate(
        "false_flag_rate", score, flagged, delegated, verdict, sampled, level=level, method=method, target=target, sums=sums
    )


def agreement(
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike,
    sampled: ArrayLike | None = None,
    *,
    published: ArrayLike | None = None,
    level: float = 0.95,
    method: Method = "ppi++",
    target: Target = "night",
    sums: Sums | None = None,
) -> Estimate:
    """Among all rows, the share whose published decision agrees with the judge. Predictor: the known
    agreement on delegated rows with a verdict, else the probe's probability that its decision is
    right (p for an unsafe decision, 1 - p for a safe one). See :func:`estimate`."""
    return estimate(
        "agreement",
        score,
        flagged,
        delegated,
        verdict,
        sampled,
        published=published,
        level=level,
        method=method,
        target=target,
        sums=sums,
    )


def prevalence(
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike,
    sampled: ArrayLike | None = None,
    *,
    level: float = 0.95,
    method: Method = "ppi++",
    target: Target = "night",
    sums: Sums | None = None,
) -> Estimate:
    """Among all rows, the share the judge calls unsafe. Predictor: the verdict on delegated rows that
    have one, else p(x). See :func:`estimate`."""
    return estimate(
        "prevalence", score, flagged, delegated, verdict, sampled, level=level, method=method, target=target, sums=sums
    )


def by_group(
    name: str,
    score: ArrayLike,
    flagged: ArrayLike,
    delegated: ArrayLike,
    verdict: ArrayLike,
    group: ArrayLike,
    sampled: ArrayLike | None = None,
    *,
    published: ArrayLike | None = None,
    level: float = 0.95,
    method: Method = "ppi++",
    target: Target = "night",
    simultaneous: bool = False,
    sums: Mapping[Hashable, Sums] | None = None,
) -> dict[Hashable, Estimate]:
    """A named estimate per group (rows without a group under the key None), each from the control
    rows of its group (its ``n``). ``simultaneous``: Bonferroni over the m groups, each interval at
    1 - (1 - level)/m, so that all cover at once with probability >= level (said in ``method``).
    ``sums``: per-group :func:`subset_sums` over the whole night, as in :func:`estimate`."""
    level = check_level(level, "level", scalar=True)
    member, f, y = estimate_terms(name, score, flagged, delegated, verdict, published)
    smp = _sampled(sampled, f.size, sums)
    keys, codes = _group_codes(group, f.size)
    if sums is not None:
        keys = keys + [k for k in sums if k not in keys]
    m = len(keys)
    each = 1 - (1 - level) / m if simultaneous and m > 1 else level
    out = {}
    for i, k in enumerate(keys):
        mem = member & (codes == i)
        s = None if sums is None else sums.get(k, Sums())
        est = _estimate_set(name, mem, f, y, smp, s, each, method, target)
        if each != level:
            est = Estimate(
                est.value,
                est.low,
                est.high,
                each,
                est.n,
                est.method + f"; Bonferroni over {m} groups: {100 * level:g}% simultaneous",
            )
        out[k] = est
    return out


# ------------------------------------------------------------------ alarms
def _tables(k1, n1, k2, n2):
    k1, n1, k2, n2 = (np.asarray(x, dtype=np.int64) for x in (k1, n1, k2, n2))
    if np.any(k1 < 0) or np.any(k2 < 0) or np.any(k1 > n1) or np.any(k2 > n2):
        raise ValueError("counts must satisfy 0 <= k <= n")
    return np.broadcast_arrays(k1, n1, k2, n2)


def fisher_greater_pvalue(k1: ArrayLike, n1: ArrayLike, k2: ArrayLike, n2: ArrayLike) -> np.ndarray:
    """One-sided Fisher exact p-value for "the first rate is higher" (k1 of n1 against k2 of n2):
    P(X >= k1), X hypergeometric given the margins. Vectorised; 1 where either sample is empty."""
    from scipy import stats

    k1, n1, k2, n2 = _tables(k1, n1, k2, n2)
    p = stats.hypergeom.sf(k1 - 1, n1 + n2, k1 + k2, n1)
    return np.where((n1 == 0) | (n2 == 0), 1.0, np.minimum(p, 1.0))


def _log_hypergeom(x, big_m, big_k, n):
    # log P(X = x), X ~ Hypergeom(M, K, n), up to the term -log C(M, n) (and with it): log-gamma form
    lc = lambda a, b: gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)  # noqa: E731
    return lc(big_k, x) + lc(big_m - big_k, n - x) - lc(big_m, n)


def _first_at_or_below(g, lo, hi, thr):
    # smallest x in [lo, hi] with g(x) <= thr, g non-increasing there (hi + 1 if none); vectorised bisection
    a, b = lo.copy(), hi + 1
    while np.any(a < b):
        mid = (a + b) // 2
        ok = g(np.minimum(mid, hi)) <= thr
        act = a < b
        b = np.where(act & ok, mid, b)
        a = np.where(act & ~ok, mid + 1, a)
    return a


def fisher_two_sided_pvalue(k1: ArrayLike, n1: ArrayLike, k2: ArrayLike, n2: ArrayLike) -> np.ndarray:
    """Two-sided Fisher exact p-value (as :func:`scipy.stats.fisher_exact`: the probability, given the
    margins, of the tables no more likely than the observed one, within a relative 1e-7). Vectorised:
    the hypergeometric pmf is unimodal, so these tables are the observed tail and the far tail beyond
    the first table as unlikely, found by bisection. 1 where a sample is empty."""
    from scipy import stats

    k1, n1, k2, n2 = _tables(k1, n1, k2, n2)
    shape = k1.shape
    k1, n1, k2, n2 = (x.ravel() for x in (k1, n1, k2, n2))
    big_m, big_k = n1 + n2, k1 + k2
    lo = np.maximum(0, n1 - (big_m - big_k))
    hi = np.minimum(big_k, n1)
    mode = np.clip((n1 + 1) * (big_k + 1) // (big_m + 2), lo, hi)
    thr = _log_hypergeom(k1, big_m, big_k, n1) + np.log1p(1e-7)
    up = k1 <= mode
    # observed at or below the mode: the far tail starts at the first x > k1, x >= mode, as unlikely
    start = np.maximum(mode, k1 + 1)
    b = _first_at_or_below(lambda x: _log_hypergeom(x, big_m, big_k, n1), np.minimum(start, hi), hi, thr)
    b = np.where(start > hi, hi + 1, b)
    # observed above the mode: the far tail ends at the last x < k1, x <= mode, as unlikely (mirror image)
    end = np.minimum(mode, k1 - 1)
    a = (
        hi
        + lo
        - _first_at_or_below(lambda x: _log_hypergeom(hi + lo - x, big_m, big_k, n1), hi + lo - np.maximum(end, lo), hi, thr)
    )
    a = np.where(end < lo, lo - 1, a)
    left, right = np.where(up, k1, a), np.where(up, b, k1)  # p = P(X <= left) + P(X >= right)
    p = stats.hypergeom.cdf(left, big_m, big_k, n1) + stats.hypergeom.sf(right - 1, big_m, big_k, n1)
    out = np.minimum(p, 1.0)
    out[(n1 == 0) | (n2 == 0)] = 1.0
    return out.reshape(shape)


def disagreement_pvalue(k_night: ArrayLike, n_night: ArrayLike, k_ref: ArrayLike, n_ref: ArrayLike, level: float) -> np.ndarray:
    """The p-value of :func:`disagreement_alarm` (vectorised): P(Binom(n_night, u) >= k_night), u the
    reference's one-sided (1 - level/2) Clopper-Pearson upper bound; compare with level/2. 1 where a
    sample is empty or u = 1."""
    level = check_level(level, "level", scalar=True)
    k1, n1, k2, n2 = _tables(k_night, n_night, k_ref, n_ref)
    u = binomial_ucb(k2, np.maximum(n2, 1), level / 2)
    p = binomial_upper_pvalue(k1, np.maximum(n1, 1), np.clip(u, 1e-12, 1 - 1e-12))
    return np.where((n1 == 0) | (n2 == 0) | (u >= 1), 1.0, p)


def disagreement_alarm(k_night: int, n_night: int, k_ref: int, n_ref: int, level: float = DEFAULT_LEVEL) -> Alarm:
    """Tonight the probe disagrees with the judge on ``k_night`` of ``n_night`` control rows; on the
    calibration data on ``k_ref`` of ``n_ref``. Fires when tonight's rate is significantly higher: the
    one-sided binomial test of tonight's count against the reference's (1 - level/2) Clopper-Pearson
    upper bound, at level/2 (the module docstring says why not Fisher's test)."""
    level = check_level(level, "level", scalar=True)
    p = float(disagreement_pvalue(k_night, n_night, k_ref, n_ref, level))
    fired = p <= level / 2
    if n_night == 0 or n_ref == 0:
        msg = "no control rows tonight" if n_night == 0 else "no reference disagreement counts"
        msg += ": the disagreement alarm cannot test"
    else:
        u = float(binomial_ucb(k_ref, n_ref, level / 2))
        msg = (
            f"the probe disagrees with the judge on {k_night / n_night:.1%} of tonight's control rows ({k_night}/{n_night}) "
            f"against {k_ref / n_ref:.1%} on its calibration data ({k_ref}/{n_ref}, upper bound {u:.1%}): p = {p:.2g} "
            + (
                f"<= {level / 2:g}, the probe errs more than it did in calibration"
                if fired
                else f"> {level / 2:g}, no evidence of more"
            )
        )
    bound = (
        f"When tonight's disagreement rate is at most the reference's, this fires with probability <= {level:g} per night "
        f"(control rows and reference rows independent uniform samples), and <= {level / 2:g} on every night unless the "
        f"reference sample itself was off (probability <= {level / 2:g}, once)."
    )
    return Alarm(fired, p, level / 2, msg, bound)


def group_rate_alarm(
    delegated_by_group: Mapping[Hashable, int] | ArrayLike,
    rows_by_group: Mapping[Hashable, int] | ArrayLike,
    alpha: float,
    level: float = DEFAULT_LEVEL,
    reference: Mapping[Hashable, tuple[int, int]] | None = None,
) -> Alarm:
    """Groups delegating significantly more than α tonight: exact one-sided binomial p-values
    P(Binom(rows, α) >= delegated), Holm across the groups with rows. Given the calibration rows'
    (delegated, rows) per group in ``reference``, a group must also delegate significantly more than
    it did in calibration: its p-value is the larger of the binomial one and the one-sided Fisher exact
    p-value against its calibration count (an intersection-union test, valid when its rate is at most
    α *or* at most its calibration rate). λ* bounds only the overall rate, so a group the DV probe
    rightly sends more of (one the probe errs on) is not news; one that sends more than both is.
    ``statistic`` is the smallest Holm-adjusted p-value (m · smallest p); ``flagged`` the groups Holm
    rejects."""
    alpha = check_level(alpha, "alpha", scalar=True)
    level = check_level(level, "level", scalar=True)
    if isinstance(delegated_by_group, Mapping):
        if not isinstance(rows_by_group, Mapping) or set(rows_by_group) != set(delegated_by_group):
            raise ValueError("delegated_by_group and rows_by_group must have the same groups")
        keys = list(rows_by_group)
        d = np.array([int(delegated_by_group[k]) for k in keys])
        n = np.array([int(rows_by_group[k]) for k in keys])
    else:
        d, n = np.asarray(delegated_by_group).ravel(), np.asarray(rows_by_group).ravel()
        if d.shape != n.shape:
            raise ValueError("delegated_by_group and rows_by_group differ in length")
        keys = list(range(d.size))
    if np.any(d < 0) or np.any(d > n):
        raise ValueError("delegated counts must lie in [0, rows] per group")
    has = n > 0
    m = int(has.sum())
    ref = {k: v for k, v in (reference or {}).items() if v[1] > 0}
    bound = (
        f"When every group's delegation rate is at most α = {alpha:g}"
        + (" or at most its calibration rate" if ref else "")
        + f", this fires with probability <= {level:g} per night (family-wise over the groups, Holm; rows independent "
        "within a group" + ("; the calibration rows a uniform sample of their groups" if ref else "") + ")."
    )
    if not has.any():
        return Alarm(False, 1.0, level, "no rows in any group: nothing to test", bound)
    pv = np.asarray(binomial_upper_pvalue(d[has], n[has], alpha), dtype=float)
    hk = [k for k, h in zip(keys, has) if h]
    hd, hn = d[has], n[has]
    cal = [ref.get(k) for k in hk]
    for i, c in enumerate(cal):
        if c is not None:
            pv[i] = max(pv[i], float(fisher_greater_pvalue(hd[i], hn[i], c[0], c[1])))
    rej = holm(pv, level)
    stat = float(min(1.0, m * pv.min()))
    flagged = tuple(hk[i] for i in np.flatnonzero(rej))
    than = "α" + (" and than in calibration" if ref else "")

    def said(i: int) -> str:
        c = cal[i]
        was = f", {c[0] / c[1]:.1%} of {c[1]:,} in calibration" if c is not None else ""
        return f"{hk[i]} ({hd[i] / hn[i]:.1%} of {hn[i]:,} rows{was}, p = {pv[i]:.2g})"

    if flagged:
        parts = ", ".join(said(i) for i, k in enumerate(hk) if k in set(flagged))
        msg = (
            f"{len(flagged)} of {m} groups delegate more than {than} (α = {alpha:.1%}): {parts}. λ* certifies only the "
            "overall rate, so this flags the group for a look, not a broken guarantee"
        )
    else:
        msg = f"no group delegates significantly more than {than} (α = {alpha:.1%}; smallest Holm-adjusted p = {stat:.2g} > {level:g})"
    return Alarm(bool(flagged), stat, level, msg, bound, flagged)


def prevalence_alarm(k_night: int, n_night: int, k_trailing: int, n_trailing: int, level: float = DEFAULT_LEVEL) -> Alarm:
    """The share of unsafe verdicts on tonight's control sample (k of n) against the trailing nights'
    control samples pooled: two-sided Fisher exact test, fires when p <= level."""
    level = check_level(level, "level", scalar=True)
    p = float(fisher_two_sided_pvalue(k_night, n_night, k_trailing, n_trailing))
    fired = p <= level
    if n_night == 0 or n_trailing == 0:
        msg = (
            "no control rows " + ("tonight" if n_night == 0 else "on the trailing nights") + ": the prevalence alarm cannot test"
        )
    else:
        a, b = k_night / n_night, k_trailing / n_trailing
        msg = (
            f"the judge calls {a:.1%} of tonight's control rows unsafe ({k_night}/{n_night}) against {b:.1%} on the trailing "
            f"nights ({k_trailing}/{n_trailing}): p = {p:.2g} "
            + (
                f"<= {level:g}, the prevalence has {'risen' if a > b else 'fallen'}"
                if fired
                else f"> {level:g}, no evidence of a change"
            )
        )
    bound = (
        f"When tonight and the trailing nights share one unsafe prevalence (independent uniform control samples), this fires "
        f"with probability <= {level:g} per night; variation between nights beyond the binomial counts as a change."
    )
    return Alarm(fired, p, level, msg, bound)


# ------------------------------------------------------------------ sizing
def control_plan(n_rows: int, share: float = 0.01, floor: int = 400, ceiling: int = 20_000) -> float:
    """The Bernoulli inclusion probability π of the control sample for a night of ``n_rows`` rows:
    ``share``, raised to expect at least ``floor`` rows and lowered to expect at most ``ceiling``,
    capped to [0, 1] (1 for an empty night). Defaults and their reasons: module docstring."""
    if not 0 < share <= 1:
        raise ValueError(f"share must lie in (0, 1], got {share!r}")
    if not 0 <= floor <= ceiling:
        raise ValueError(f"need 0 <= floor <= ceiling, got {floor}, {ceiling}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if n_rows == 0:
        return 1.0
    return float(min(1.0, max(0.0, min(max(share, floor / n_rows), ceiling / n_rows))))


def control_interval_width(n: ArrayLike, p: float = 0.5, level: float = 0.95) -> np.ndarray | float:
    """Half-width of the two-sided Clopper-Pearson interval for a rate ``p`` on ``n`` rows, evaluated at
    the count round(n p) (vectorised over n): the precision a control sample of n rows buys."""
    from scipy import stats

    level = check_level(level, "level", scalar=True)
    n = np.asarray(n, dtype=float)
    if np.any(n < 1):
        raise ValueError("n must be >= 1")
    k = np.round(n * p)
    a = 1 - level
    low = np.where(k > 0, stats.beta.ppf(a / 2, np.maximum(k, 1e-300), n - k + 1), 0.0)
    high = np.where(k < n, stats.beta.ppf(1 - a / 2, k + 1, np.maximum(n - k, 1e-300)), 1.0)
    half = (high - low) / 2
    return float(half) if half.ndim == 0 else half
