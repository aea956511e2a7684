r"""Learn-then-Test calibration of a delegation threshold (Calibrate-Then-Delegate, arXiv 2604.14251).

The policy is :math:`\pi_\lambda(x) = 1[d(x) > \lambda]` (strictly greater: a row whose score equals
the threshold is *not* delegated). Its budget risk is :math:`R_B(\lambda) = P(d(X) > \lambda)`.
For every threshold :math:`\lambda` of a grid fixed before the calibration data are seen we test
:math:`H_\lambda: R_B(\lambda) > \alpha` with the exact binomial p-value of the integer count
:math:`k(\lambda) = \#\{i : d_i > \lambda\}`, and certify the rejected thresholds with a FWER-controlling
test at level :math:`\delta`. Then, with probability at least :math:`1 - \delta` over the calibration
sample, every certified threshold -- in particular the chosen one -- has :math:`R_B \le \alpha`.

Variants
--------
* budget-only LTT (``pareto=False``): fixed-sequence testing from the most conservative threshold
  (largest :math:`\lambda`) downwards, or Bonferroni / Holm; the chosen threshold is the smallest
  certified one (the most delegation the budget allows). With fixed-sequence testing this equals
  the closed form "smallest grid value with :math:`k(\lambda) \le k^*`", where
  :math:`k^* = \max\{k : \mathrm{BinomCDF}(k; n, \alpha) \le \delta\}`.
* Pareto testing (``pareto=True``, Laufer-Goldenberg et al. 2023): a seeded split of the calibration
  set into an optimisation part (default 30%) and a testing part. On the optimisation part keep only
  thresholds not dominated in (budget risk, performance risk) and order them by their p-values
  there; run fixed-sequence testing in that order on the testing part; choose the certified
  threshold with the best performance on the whole calibration set. Past the effective delegation
  capacity more delegation stops helping, those thresholds are dominated, and the policy plateaus.
* joint control (``performance_target=beta``): also test :math:`H'_\lambda: R_{err}(\lambda) > \beta`
  for the cascade's misclassification rate with the Hoeffding-Bentkus p-value; a threshold is
  certified only when the maximum of the two p-values is rejected, so both risks hold jointly.
  Joint control needs a testing order that does not start at "never delegate": that threshold's
  error is the probe's, so a fixed sequence from the top stops at its first step whenever β is
  below the probe's error (the only case worth asking for). It therefore runs with Pareto testing
  (order from an independent split) or with Holm/Bonferroni (no order); fixed-sequence testing
  without Pareto is refused (:func:`check_joint`).

When nothing is certified the policy never delegates (:math:`\hat\lambda = +\infty`) and the result
says so in words.

Every function that takes a score matrix accepts leading batch axes (independent calibration sets),
so the evaluation can validate the guarantee on hundreds of resampled sets at once with the same
code that calibrates a single one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from .cascade import Cascade
from .pvalues import binomial_pvalue, check_level, hoeffding_bentkus_pvalue, max_certifiable_count, min_certifiable_n
from .testing import METHODS, multiple_test

# scipy.stats is imported in the functions that use it: ~1 s that every Ray worker running audit code would pay
__all__ = [
    "threshold_grid",
    "calibrate_counts",
    "counts_at_or_below",
    "exceedance_counts",
    "cascade_losses",
    "delegation_loss_sums",
    "cascade_auroc_curve",
    "pareto_front",
    "pareto_order",
    "certify",
    "select_threshold",
    "ltt_select",
    "pareto_ltt_select",
    "pareto_split",
    "check_joint",
    "Selection",
    "CalibrationResult",
    "calibrate",
]

Risk = Literal["accuracy", "auroc"]


# ----------------------------------------------------------------------------------------------
# grids and counts
# ----------------------------------------------------------------------------------------------
def threshold_grid(reference: ArrayLike | None = None, size: int = 1001, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """A strictly increasing threshold grid, fixed before calibration scores are seen.

    With ``reference`` (scores from a split that is neither calibration nor evaluation data, e.g. the
    DV probe's out-of-fold predictions on its training split) the grid holds ``size`` quantiles of
    it, padded with ``low`` and ``high``; otherwise ``size`` evenly spaced points on [low, high]
    (the delegation value lies in [-1, 1] by construction).
    """
    if size < 2:
        raise ValueError("grid size must be at least 2")
    if not low < high:
        raise ValueError(f"grid bounds must satisfy low < high, got [{low}, {high}]")
    if reference is None:
        return np.linspace(low, high, size)
    ref = np.asarray(reference, dtype=float).ravel()
    ref = ref[np.isfinite(ref)]
    if ref.size < 2:
        raise ValueError("reference scores for the grid must hold at least 2 finite values")
    q = np.quantile(ref, np.linspace(0.0, 1.0, size))
    return np.unique(np.concatenate([[min(low, q[0])], q, [max(high, q[-1])]]))


def _check_grid(grid) -> np.ndarray:
    g = np.asarray(grid, dtype=float)
    if g.ndim != 1 or g.size < 1:
        raise ValueError("grid must be a non-empty 1-D array")
    if not np.all(np.isfinite(g)):
        raise ValueError("grid values must be finite")
    if g.size > 1 and not np.all(np.diff(g) > 0):
        raise ValueError("grid must be strictly increasing")
    return g


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


def counts_at_or_below(scores: ArrayLike, grid: ArrayLike, what: str = "scores") -> np.ndarray:
    """#{i : scores[..., i] <= λ} for every grid value: int64 [..., G], non-decreasing along the last
    axis. The one sort-and-search of the package: exceedance counts, loss sums and the monitor's
    alarm counts are all read off it."""
    g = _check_grid(grid)
    s = np.asarray(scores, dtype=float)
    if np.any(np.isnan(s)):
        raise ValueError(f"{what} contain NaN")
    flat = np.sort(_rows(s), axis=-1)
    out = np.empty((flat.shape[0], g.size), dtype=np.int64)
    for r in range(flat.shape[0]):  # np.searchsorted is 1-D only; each call is O(G log n)
        out[r] = np.searchsorted(flat[r], g, side="right")
    return out.reshape(s.shape[:-1] + (g.size,))


def exceedance_counts(scores: ArrayLike, grid: ArrayLike) -> np.ndarray:
    """k(lambda) = #{i : scores[..., i] > lambda} for every grid value.

    Parameters
    ----------
    scores : array [..., n]
    grid : array [G], strictly increasing

    Returns
    -------
    int64 array [..., G], non-increasing along the last axis.
    """
    s = np.asarray(scores, dtype=float)
    return s.shape[-1] - counts_at_or_below(s, grid)


def cascade_losses(
    probe: ArrayLike, expert: ArrayLike, labels: ArrayLike, cascade: Cascade = Cascade()
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row 0/1 misclassification of the cascade when a row is kept (probe decides) and when it
    is delegated (:meth:`Cascade.expert_score`). Returns ``(loss_kept, loss_delegated)`` as int arrays."""
    y = np.asarray(labels)
    p = np.asarray(probe, dtype=float)
    loss_kept = (cascade.decide(p).astype(np.int64) != y).astype(np.int64)
    loss_del = (cascade.decide(cascade.expert_score(p, expert)).astype(np.int64) != y).astype(np.int64)
    return loss_kept, loss_del


def delegation_loss_sums(scores: ArrayLike, loss_kept: ArrayLike, loss_delegated: ArrayLike, grid: ArrayLike) -> np.ndarray:
    """Sum over rows of the cascade's loss when rows with score > lambda are delegated, for every
    grid value: sum(loss_kept) + sum_{score > lambda}(loss_delegated - loss_kept).

    Integer losses give integer sums (used exactly by the Hoeffding-Bentkus p-value).
    Shapes: scores, losses [..., n]; result [..., G].
    """
    g = _check_grid(grid)
    s = np.asarray(scores, dtype=float)
    lk = np.asarray(loss_kept)
    ld = np.asarray(loss_delegated)
    diff = ld - lk
    s2, d2 = _rows(s), _rows(np.broadcast_to(diff, s.shape))
    base = _rows(np.broadcast_to(lk, s.shape)).sum(axis=-1)
    order = np.argsort(s2, axis=-1, kind="stable")
    d_sorted = np.take_along_axis(d2, order, axis=-1)
    # suffix[j] = sum of diff over sorted positions >= j; suffix[n] = 0
    suffix = np.concatenate([np.cumsum(d_sorted[:, ::-1], axis=-1)[:, ::-1], np.zeros((len(s2), 1), d_sorted.dtype)], axis=-1)
    out = base[:, None] + np.take_along_axis(suffix, counts_at_or_below(s2, g), axis=-1)
    return out.reshape(s.shape[:-1] + (g.size,))


def _auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # Mann-Whitney AUROC of each row of `scores` [U, n] against binary `labels` [n]; ties count 1/2.
    from scipy import stats

    pos = labels.astype(bool)
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return np.full(scores.shape[0], np.nan)
    ranks = stats.rankdata(scores, axis=-1)
    return (ranks[:, pos].sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def cascade_auroc_curve(
    scores: ArrayLike,
    probe: ArrayLike,
    expert: ArrayLike,
    labels: ArrayLike,
    grid: ArrayLike,
    cascade: Cascade = Cascade(),
) -> np.ndarray:
    """AUROC of the cascade's final scores for every grid threshold (one calibration set).

    Only the distinct delegated sets are evaluated (at most n + 1 of them), so the cost is
    O(n^2) whatever the grid size."""
    g = _check_grid(grid)
    d = np.asarray(scores, dtype=float)
    p = np.asarray(probe, dtype=float)
    e = np.asarray(expert, dtype=float)
    y = np.asarray(labels).astype(int)
    counts = exceedance_counts(d, g)
    uniq = np.unique(counts)
    order = np.argsort(-d, kind="stable")  # top-c rows by score are the delegated set of count c
    delegated_score = cascade.expert_score(p, e)
    finals = np.repeat(p[None, :], uniq.size, axis=0)
    rank_of_row = np.empty(d.size, dtype=np.int64)
    rank_of_row[order] = np.arange(d.size)
    mask = rank_of_row[None, :] < uniq[:, None]
    finals = np.where(mask, delegated_score[None, :], finals)
    auc = _auroc_rows(finals, y)
    return auc[np.searchsorted(uniq, counts)]


# ----------------------------------------------------------------------------------------------
# Pareto front, testing order, certification, selection (all batched over leading axes)
# ----------------------------------------------------------------------------------------------
def pareto_front(budget_counts: ArrayLike, performance_risk: ArrayLike) -> np.ndarray:
    """Thresholds not dominated in (budget risk, performance risk), both to be minimised.

    Inputs are aligned with an ascending grid, so budget is non-increasing along the last axis.
    Walking from the largest threshold down, a threshold is kept when its performance risk is
    strictly below every more conservative one's; of several thresholds with the same delegated
    count (hence the same risks) only the largest is kept.
    """
    b = np.asarray(budget_counts)
    perf = np.asarray(performance_risk, dtype=float)
    if b.shape != perf.shape:
        raise ValueError("budget_counts and performance_risk must have the same shape")
    rev = perf[..., ::-1]
    best_before = np.concatenate([np.full(rev.shape[:-1] + (1,), np.inf), np.minimum.accumulate(rev, axis=-1)[..., :-1]], axis=-1)
    keep_rev = rev < best_before
    return keep_rev[..., ::-1]


def pareto_order(front: ArrayLike, opt_pvalues: ArrayLike) -> np.ndarray:
    """Testing order for Pareto testing: thresholds on the front sorted by their p-values on the
    optimisation split (ascending; ties towards the larger threshold), then everything else.
    Returns indices into the ascending grid, shape [..., G]."""
    front = np.asarray(front, dtype=bool)
    p = np.where(front, np.asarray(opt_pvalues, dtype=float), np.inf)
    G = p.shape[-1]
    desc = np.arange(G)[::-1]
    perm = np.argsort(p[..., desc], axis=-1, kind="stable")
    return desc[perm]


def certify(pvalues: ArrayLike, delta: float, *, method: str = "fixed_sequence", order: ArrayLike | None = None) -> np.ndarray:
    """Certified thresholds (rejected nulls) for p-values aligned with an ascending grid.

    ``order`` gives the testing order as indices into the grid ([..., G]); the default is from the
    most conservative threshold (the largest) downwards. Untested thresholds carry p = +inf.
    """
    p = np.asarray(pvalues, dtype=float)
    if order is None:
        order = np.broadcast_to(np.arange(p.shape[-1])[::-1], p.shape)
    order = np.asarray(order)
    p_ordered = np.take_along_axis(p, order, axis=-1)
    rejected_ordered = multiple_test(p_ordered, delta, method)
    out = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(out, order, rejected_ordered, axis=-1)
    return out


def select_threshold(grid: ArrayLike, certified: ArrayLike, performance_risk: ArrayLike | None = None) -> np.ndarray:
    """The chosen threshold: the smallest certified one (most delegation within the budget), or,
    given a performance risk, the certified one with the lowest risk (ties: the larger threshold).
    +inf (never delegate) where nothing is certified. Shape: certified.shape[:-1]."""
    g = _check_grid(grid)
    c = np.asarray(certified, dtype=bool)
    if performance_risk is None:
        idx = np.argmax(c, axis=-1)  # first True along an ascending grid = smallest certified
    else:
        r = np.where(c, np.asarray(performance_risk, dtype=float), np.inf)
        idx = g.size - 1 - np.argmin(r[..., ::-1], axis=-1)  # argmin from the top: ties → larger λ
    lam = g[idx]
    return np.where(c.any(axis=-1), lam, np.inf)


# ----------------------------------------------------------------------------------------------
# the user-facing calibration of one calibration set
# ----------------------------------------------------------------------------------------------
def _jsonable(a):
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.dtype == bool:
        return arr.tolist()
    return [None if not np.isfinite(x) else float(x) for x in arr.astype(float).ravel()]


@dataclass(frozen=True)
class CalibrationResult:
    """Everything a calibration learned, not only the answer.

    Arrays are aligned with ``grid`` (ascending). ``pvalues`` holds the p-value each threshold was
    tested with (budget, or the max of budget and performance for joint control), +inf for
    thresholds outside the tested family (off the Pareto front). Empirical risks are on the whole
    calibration set.
    """

    alpha: float
    delta: float
    n: int
    grid: np.ndarray
    lambda_hat: float
    certified: np.ndarray
    pvalues: np.ndarray
    budget_pvalues: np.ndarray
    budget_risk: np.ndarray
    method: str
    pareto: bool
    message: str
    performance_risk: np.ndarray | None = None
    performance_pvalues: np.ndarray | None = None
    risk: str | None = None
    performance_target: float | None = None
    pareto_front: np.ndarray | None = None
    n_opt: int | None = None
    n_test: int | None = None
    seed: int | None = None
    opt_fraction: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def delegates(self) -> bool:
        """False when nothing was certified: the policy never delegates."""
        return bool(np.isfinite(self.lambda_hat))

    @property
    def certified_count(self) -> int:
        return int(np.count_nonzero(self.certified))

    def to_dict(self) -> dict:
        d = {
            "alpha": self.alpha,
            "delta": self.delta,
            "n": self.n,
            "lambda_hat": self.lambda_hat if self.delegates else None,
            "delegates": self.delegates,
            "message": self.message,
            "method": self.method,
            "pareto": self.pareto,
            "risk": self.risk,
            "performance_target": self.performance_target,
            "n_opt": self.n_opt,
            "n_test": self.n_test,
            "seed": self.seed,
            "opt_fraction": self.opt_fraction,
            "certified_count": self.certified_count,
            "grid": _jsonable(self.grid),
            "certified": _jsonable(self.certified),
            "pvalues": _jsonable(self.pvalues),
            "budget_pvalues": _jsonable(self.budget_pvalues),
            "performance_pvalues": _jsonable(self.performance_pvalues),
            "budget_risk": _jsonable(self.budget_risk),
            "performance_risk": _jsonable(self.performance_risk),
            "pareto_front": _jsonable(self.pareto_front),
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationResult:
        def arr(key, dtype=float):
            v = d.get(key)
            if v is None:
                return None
            return np.array([np.inf if x is None else x for x in v], dtype=dtype)

        known = {f for f in cls.__dataclass_fields__}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("delegates", "certified_count")}
        lam = d.get("lambda_hat")
        return cls(
            alpha=float(d["alpha"]),
            delta=float(d["delta"]),
            n=int(d["n"]),
            grid=arr("grid"),
            lambda_hat=np.inf if lam is None else float(lam),
            certified=np.array(d["certified"], dtype=bool),
            pvalues=arr("pvalues"),
            budget_pvalues=arr("budget_pvalues"),
            budget_risk=arr("budget_risk"),
            method=d["method"],
            pareto=bool(d["pareto"]),
            message=d["message"],
            performance_risk=arr("performance_risk"),
            performance_pvalues=arr("performance_pvalues"),
            risk=d.get("risk"),
            performance_target=d.get("performance_target"),
            pareto_front=None if d.get("pareto_front") is None else np.array(d["pareto_front"], dtype=bool),
            n_opt=d.get("n_opt"),
            n_test=d.get("n_test"),
            seed=d.get("seed"),
            opt_fraction=d.get("opt_fraction"),
            extra=extra,
        )


# ----------------------------------------------------------------------------------------------
# the LTT selection, once, on count arrays batched over calibration sets [R, G] and budgets [B]
# ----------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Output of :func:`ltt_select` / :func:`pareto_ltt_select`: λ̂ per budget and calibration set
    [B, R]; with ``details=True`` also the tested p-values and certified masks [B, R, G]."""

    lambda_hat: np.ndarray
    pvalues: np.ndarray | None = None
    budget_pvalues: np.ndarray | None = None
    performance_pvalues: np.ndarray | None = None
    certified: np.ndarray | None = None
    front: np.ndarray | None = None


def _alphas(alphas) -> np.ndarray:
    a = np.atleast_1d(np.asarray(alphas, dtype=float))
    check_level(a, "alpha")
    return a


def ltt_select(
    grid: ArrayLike,
    alphas: ArrayLike,
    delta: float,
    *,
    counts: ArrayLike,
    n: int,
    method: str = "fixed_sequence",
    loss_sums: ArrayLike | None = None,
    performance_target: float | None = None,
    details: bool = False,
) -> Selection:
    """Budget-only LTT (optionally jointly with a misclassification target).

    ``counts`` [R, G]: #{d > λ} on each calibration set of size ``n``; ``loss_sums`` [R, G]: the
    cascade's misclassifications at each λ (joint control only). Tests from the largest λ down
    (or Bonferroni/Holm) and picks the smallest certified λ.
    """
    g = _check_grid(grid)
    counts = np.atleast_2d(counts)
    lam, keep = [], {"p": [], "bp": [], "pp": [], "c": []}
    perf_p = None
    if performance_target is not None:
        perf_p = hoeffding_bentkus_pvalue(np.atleast_2d(loss_sums), n, performance_target)
    for a in _alphas(alphas):
        bp = binomial_pvalue(counts, n, a)
        p = bp if perf_p is None else np.maximum(bp, perf_p)
        c = certify(p, delta, method=method)
        lam.append(select_threshold(g, c))
        if details:
            keep["p"].append(p), keep["bp"].append(bp), keep["pp"].append(perf_p), keep["c"].append(c)
    sel = Selection(np.array(lam))
    if details:
        sel.pvalues, sel.budget_pvalues, sel.certified = (np.array(keep[k]) for k in ("p", "bp", "c"))
        sel.performance_pvalues = None if perf_p is None else np.array(keep["pp"])
    return sel


def pareto_ltt_select(
    grid: ArrayLike,
    alphas: ArrayLike,
    delta: float,
    *,
    opt_counts: ArrayLike,
    n_opt: int,
    opt_perf: ArrayLike,
    test_counts: ArrayLike,
    n_test: int,
    cal_perf: ArrayLike,
    opt_loss_sums: ArrayLike | None = None,
    test_loss_sums: ArrayLike | None = None,
    performance_target: float | None = None,
    details: bool = False,
) -> Selection:
    """Pareto testing on count/risk arrays [R, G] of the optimisation split (size ``n_opt``), the
    testing split (``n_test``) and the whole calibration set (``cal_perf``, used to choose)."""
    g = _check_grid(grid)
    opt_counts, test_counts = np.atleast_2d(opt_counts), np.atleast_2d(test_counts)
    front = pareto_front(opt_counts, np.atleast_2d(opt_perf))
    joint = performance_target is not None
    if joint:
        opt_pp = hoeffding_bentkus_pvalue(np.atleast_2d(opt_loss_sums), n_opt, performance_target)
        test_pp = hoeffding_bentkus_pvalue(np.atleast_2d(test_loss_sums), n_test, performance_target)
    lam, keep = [], {"p": [], "bp": [], "pp": [], "c": []}
    for a in _alphas(alphas):
        opt_p = binomial_pvalue(opt_counts, n_opt, a)
        if joint:
            opt_p = np.maximum(opt_p, opt_pp)
        order = pareto_order(front, opt_p)
        bp = binomial_pvalue(test_counts, n_test, a)
        p = np.maximum(bp, test_pp) if joint else bp
        p = np.where(front, p, np.inf)
        c = certify(p, delta, method="fixed_sequence", order=order)
        lam.append(select_threshold(g, c, np.atleast_2d(cal_perf)))
        if details:
            keep["p"].append(p), keep["bp"].append(bp), keep["pp"].append(test_pp if joint else None), keep["c"].append(c)
    sel = Selection(np.array(lam), front=front)
    if details:
        sel.pvalues, sel.budget_pvalues, sel.certified = (np.array(keep[k]) for k in ("p", "bp", "c"))
        sel.performance_pvalues = np.array(keep["pp"]) if joint else None
    return sel


def _performance(d, probe, expert, labels, grid, risk, cascade: Cascade):
    """Empirical performance risk per grid value and (for accuracy) the integer error sums."""
    if risk == "accuracy":
        lk, ld = cascade_losses(probe, expert, labels, cascade)
        sums = delegation_loss_sums(d, lk, ld, grid)
        return sums / d.shape[-1], sums
    if risk == "auroc":
        return 1.0 - cascade_auroc_curve(d, probe, expert, labels, grid, cascade), None
    raise ValueError(f"risk must be 'accuracy' or 'auroc', got {risk!r}")


def pareto_split(n: int, opt_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded optimisation/testing split of a calibration set of size n."""
    if not 0 < opt_fraction < 1:
        raise ValueError("opt_fraction must lie in (0, 1)")
    n_opt = int(round(opt_fraction * n))
    if n_opt < 1 or n_opt >= n:
        raise ValueError(f"calibration set of {n} rows is too small to split {opt_fraction:.0%}/{1 - opt_fraction:.0%}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_opt], perm[n_opt:]


def check_joint(performance_target: float | None, pareto: bool, method: str) -> None:
    """Refuse joint control with fixed-sequence testing from the top (no power; see module docstring)."""
    if performance_target is not None and not pareto and method == "fixed_sequence":
        raise ValueError(
            "joint control (performance target) cannot use fixed-sequence testing without Pareto testing: the sequence "
            "starts at 'never delegate', whose misclassification rate is the probe's, so with a target below the probe's "
            "error it stops at the first step and certifies nothing. Use Pareto testing (it orders the thresholds on an "
            "independent split) or method 'holm' / 'bonferroni' (no order needed)"
        )


def _joint_failure(alpha, delta, beta, budget_p, perf_p, perf_risk, grid, tested_split: bool = False) -> str:
    """Why joint control certified nothing, in numbers (p-values compared with δ one by one, before the
    multiplicity correction: a diagnosis, not a test)."""
    b_ok, p_ok = budget_p <= delta, perf_p <= delta
    if not p_ok.any():
        i = int(np.argmin(perf_p))
        return (
            f"no threshold meets the misclassification target β={beta:g}: the best one (λ={grid[i]:.4g}, empirical "
            f"error {perf_risk[i]:.3g} on the calibration set) has performance p-value {perf_p[i]:.3g} > δ"
            f"{' on the testing split' if tested_split else ''}; raise β or label more rows"
        )
    if not b_ok.any():
        return f"no threshold is within the budget α={alpha} (see the budget p-values)"
    if not (b_ok & p_ok).any():
        return (
            f"the {int(b_ok.sum())} thresholds within the budget α={alpha} and the {int(p_ok.sum())} that meet β={beta:g} "
            f"do not overlap: reaching β takes more delegation than α allows"
        )
    return (
        f"{int((b_ok & p_ok).sum())} thresholds pass both tests one by one, but none survives the "
        f"multiplicity correction (the fixed sequence's order, or Holm's/Bonferroni's levels)"
    )


def _no_certification_message(alpha, delta, n_eff, k_star, pareto, joint_reason=None, grid_size=None) -> str:
    """``grid_size``: Bonferroni/Holm test one threshold at δ/G (k* was computed at that level)."""
    if joint_reason is not None:
        return f"Nothing certified jointly at α={alpha}, δ={delta}: {joint_reason}. The policy never delegates (λ* = +inf)."
    level, at = (delta, "δ") if grid_size is None else (delta / grid_size, f"δ/{grid_size}")
    if k_star < 0:
        reason = (
            f"with n={n_eff} {'testing-split ' if pareto else ''}calibration rows even a threshold that "
            f"delegates none of them has p-value (1-α)^n > {at}; at least {min_certifiable_n(alpha, level)} are needed"
        )
    else:
        reason = f"no tested threshold delegates at most k*={k_star} of the {n_eff} {'testing-split ' if pareto else ''}calibration rows"
    return f"Nothing certified at α={alpha}, δ={delta}: {reason}. The policy never delegates (λ* = +inf)."


def calibrate(
    dv: ArrayLike,
    grid: ArrayLike,
    alpha: float,
    delta: float,
    *,
    labels: ArrayLike | None = None,
    probe: ArrayLike | None = None,
    expert: ArrayLike | None = None,
    pareto: bool = False,
    risk: Risk = "accuracy",
    performance_target: float | None = None,
    method: str = "fixed_sequence",
    opt_fraction: float = 0.3,
    seed: int = 0,
    cascade: Cascade = Cascade(),
) -> CalibrationResult:
    """Calibrate the delegation threshold on one labelled calibration set.

    Parameters
    ----------
    dv : array [n]
        Delegation scores d(x) of the calibration rows (any real values; DV probe or uncertainty).
    grid : array [G]
        Strictly increasing thresholds, fixed before these scores were seen (:func:`threshold_grid`).
    alpha, delta : float in (0, 1)
        Budget level and error level: P(R_B(λ̂) > α) <= δ.
    labels, probe, expert : arrays [n], optional
        Needed for Pareto testing and joint control (labels 0/1, probe and expert scores in [0, 1]).
    pareto : bool
        Pareto testing (see module docstring); requires labels/probe/expert and fixed-sequence testing.
    risk : {"accuracy", "auroc"}
        Performance risk used on the Pareto front and for choosing among certified thresholds:
        misclassification rate or 1 - AUROC of the cascade.
    performance_target : float, optional
        β: also certify misclassification rate <= β (Hoeffding-Bentkus), jointly with the budget.
    method : {"fixed_sequence", "bonferroni", "holm"}
    opt_fraction : float
        Share of the calibration set used to find the Pareto front (seeded split).
    seed : int
        Seed of the optimisation/testing split.
    cascade : Cascade
        The cascade rule: a delegated row's output (the expert's score, or the mean of probe and
        expert) and the decision threshold (a final score >= it is "unsafe").
    """
    alpha = check_level(alpha, "alpha", scalar=True)
    delta = check_level(delta, "delta", scalar=True)
    g = _check_grid(grid)
    d = np.asarray(dv, dtype=float)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("dv must be a non-empty 1-D array")
    if not np.all(np.isfinite(d)):
        raise ValueError("dv contains NaN or infinite values")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    n = d.size
    has_labels = labels is not None and probe is not None and expert is not None
    joint = performance_target is not None
    if (pareto or joint) and not has_labels:
        raise ValueError("Pareto testing and joint control need labels, probe and expert scores")
    if pareto and method != "fixed_sequence":
        raise ValueError("Pareto testing orders the front and uses fixed-sequence testing; use method='fixed_sequence'")
    check_joint(performance_target, pareto, method)
    if joint:
        performance_target = check_level(performance_target, "performance_target", scalar=True)
        if risk != "accuracy":
            raise ValueError("joint control certifies the misclassification rate: use risk='accuracy'")

    counts = exceedance_counts(d, g)
    perf = perf_sums = None
    if has_labels:
        y, pr, ex = (np.asarray(a) for a in (labels, probe, expert))
        for name, arr in (("labels", y), ("probe", pr), ("expert", ex)):
            if arr.shape != d.shape:
                raise ValueError(f"{name} must have the same length as dv")
        perf, perf_sums = _performance(d, pr, ex, y, g, risk, cascade)

    if not pareto:
        sel = ltt_select(
            g,
            alpha,
            delta,
            counts=counts,
            n=n,
            method=method,
            loss_sums=perf_sums,
            performance_target=performance_target,
            details=True,
        )
        n_opt = n_test = seed_used = frac = None
        # the level a single threshold is tested at: δ for a fixed sequence, δ/G for Bonferroni and Holm
        k_star = max_certifiable_count(n, alpha, delta if method == "fixed_sequence" else delta / g.size)
        n_eff = n
    else:
        opt, test = pareto_split(n, opt_fraction, seed)
        n_opt, n_test = opt.size, test.size
        opt_perf, opt_sums = _performance(d[opt], pr[opt], ex[opt], y[opt], g, risk, cascade)
        test_sums = None
        if joint:
            _, test_sums = _performance(d[test], pr[test], ex[test], y[test], g, risk, cascade)
        sel = pareto_ltt_select(
            g,
            alpha,
            delta,
            opt_counts=exceedance_counts(d[opt], g),
            n_opt=n_opt,
            opt_perf=opt_perf,
            test_counts=exceedance_counts(d[test], g),
            n_test=n_test,
            cal_perf=perf,
            opt_loss_sums=opt_sums,
            test_loss_sums=test_sums,
            performance_target=performance_target,
            details=True,
        )
        seed_used, frac = seed, opt_fraction
        k_star = max_certifiable_count(n_test, alpha, delta)
        n_eff = n_test

    lam = float(sel.lambda_hat[0, 0])
    certified = sel.certified[0, 0]
    budget_risk = counts / n
    if np.isfinite(lam):
        i = int(np.searchsorted(g, lam))
        msg = (
            f"Certified {int(certified.sum())} of {g.size} thresholds at α={alpha}, δ={delta} (n={n}); "
            f"λ*={lam:.6g} delegates {budget_risk[i]:.1%} of the calibration rows. With probability ≥ {1 - delta:g}, "
            f"the rate at which rows from this distribution are delegated is at most {alpha:.1%} (a rate: one night's share "
            "can be above it by chance)" + (f" and the misclassification rate is ≤ {performance_target:g}." if joint else ".")
        )
    else:
        reason = None
        if joint:
            tested = np.isfinite(sel.pvalues[0, 0])
            reason = _joint_failure(
                alpha,
                delta,
                performance_target,
                np.where(tested, sel.budget_pvalues[0, 0], np.inf),
                np.where(tested, sel.performance_pvalues[0, 0], np.inf),
                perf,
                g,
                tested_split=pareto,
            )
        msg = _no_certification_message(
            alpha, delta, n_eff, k_star, pareto, reason, None if method == "fixed_sequence" else g.size
        )

    return CalibrationResult(
        alpha=alpha,
        delta=delta,
        n=n,
        grid=g,
        lambda_hat=lam,
        certified=certified,
        pvalues=sel.pvalues[0, 0],
        budget_pvalues=sel.budget_pvalues[0, 0],
        budget_risk=budget_risk,
        method=method,
        pareto=pareto,
        message=msg,
        performance_risk=perf,
        performance_pvalues=None if sel.performance_pvalues is None else sel.performance_pvalues[0, 0],
        risk=risk if has_labels else None,
        performance_target=performance_target,
        pareto_front=None if sel.front is None else sel.front[0],
        n_opt=n_opt,
        n_test=n_test,
        seed=seed_used,
        opt_fraction=frac,
        extra={"k_star": k_star, "cascade": cascade.mode, "decision_threshold": cascade.decision_threshold},
    )


def calibrate_counts(
    grid: ArrayLike,
    counts: ArrayLike,
    n: int,
    alpha: float,
    delta: float,
    *,
    method: str = "fixed_sequence",
    loss_sums: ArrayLike | None = None,
    n_loss: int | None = None,
    performance_target: float | None = None,
) -> CalibrationResult:
    """LTT from exceedance counts alone: ``counts`` [G] = #{d(x) > λ} on ``n`` unlabelled rows of the
    traffic (the budget needs no labels), for a grid fixed before they were seen. With a
    ``performance_target`` β, jointly with the cascade's misclassification sums ``loss_sums`` [G] on
    ``n_loss`` labelled rows (possibly another sample): each λ is tested with max(budget p, Hoeffding-
    Bentkus p), a valid p-value for "over budget or over β" whichever sample each comes from.
    Fixed-sequence testing goes from the largest λ down, which has no power jointly ("never delegate"
    has the probe's error: see :func:`check_joint`), so a joint target is tested with Holm instead.
    Same guarantee as :func:`calibrate`: P(budget rate of λ̂ > α) ≤ δ when the n rows
    and tomorrow's traffic are exchangeable."""
    alpha = check_level(alpha, "alpha", scalar=True)
    delta = check_level(delta, "delta", scalar=True)
    g = _check_grid(grid)
    k = np.asarray(counts, dtype=np.int64)
    if k.shape != g.shape or n < 1 or np.any(k < 0) or np.any(k > n) or np.any(np.diff(k) > 0):
        raise ValueError("counts must be non-increasing exceedance counts in [0, n], one per grid value")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    bp = np.asarray(binomial_pvalue(k, n, alpha), dtype=float)
    perf = perf_p = None
    p = bp
    joint = performance_target is not None
    if joint:
        if loss_sums is None or not n_loss:
            raise ValueError("a performance target needs the labelled rows' loss sums and their number")
        performance_target = check_level(performance_target, "performance_target", scalar=True)
        method = "holm" if method == "fixed_sequence" else method
        ls = np.asarray(loss_sums, dtype=float)
        perf, perf_p = ls / n_loss, np.asarray(hoeffding_bentkus_pvalue(ls, n_loss, performance_target), dtype=float)
        p = np.maximum(bp, perf_p)
    certified = certify(p, delta, method=method)
    lam = float(select_threshold(g, certified))
    k_star = max_certifiable_count(n, alpha, delta)
    if np.isfinite(lam):
        i = int(np.searchsorted(g, lam))
        msg = (
            f"Certified {int(certified.sum())} of {g.size} thresholds at α={alpha}, δ={delta} (n={n:,} unlabelled rows); "
            f"λ*={lam:.6g} delegates {k[i] / n:.1%} of them. With probability ≥ {1 - delta:g}, the rate at which "
            f"rows from this distribution are delegated is at most {alpha:.1%} (a rate: one night's share can be above it by "
            "chance)" + (f" and the misclassification rate against the judge is ≤ {performance_target:g}." if joint else ".")
        )
    else:
        reason = None
        if joint:
            reason = _joint_failure(alpha, delta, performance_target, bp, perf_p, perf, g)
        msg = _no_certification_message(alpha, delta, n, k_star, False, reason)
    return CalibrationResult(
        alpha=alpha,
        delta=delta,
        n=int(n),
        grid=g,
        lambda_hat=lam,
        certified=certified,
        pvalues=p,
        budget_pvalues=bp,
        budget_risk=k / n,
        method=method,
        pareto=False,
        message=msg,
        performance_risk=perf,
        performance_pvalues=perf_p,
        risk="accuracy" if joint else None,
        performance_target=performance_target,
        extra={"k_star": k_star, "n_labelled": n_loss},
    )
