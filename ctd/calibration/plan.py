"""`ctd plan`: the judge pool a night needs, before the night, and the largest α a budget allows.

Forward, at the calibrated α: a night of ``rows`` conversations sends the judge at most

- the delegated rows: their *rate* is at most α with probability ≥ 1 − δ (the calibration's guarantee);
  a night's *count* then stays at or below ``q = night_count_bound(α, rows, ε)`` with probability
  ≥ 1 − δ − ε (a binomial quantile on top of the rate bound; ε = 5% here),
- the control sample: its expected size, ``π · rows`` with π the audit's own (:func:`ctd.stats.quality.control_plan`:
  ``control_share`` raised to expect ``control_floor`` rows, lowered to expect ``control_ceiling``); the
  draw is Bernoulli, so a night's count varies around it by about ``√(π · rows)``.

The pool is sized for ``q`` + control calls in the night's ``window`` at the judge's measured
``rows_per_second`` per replica: ``replicas = ⌈calls / (rows_per_second · window)⌉``; the GPU-hours are the
replicas' busy time, ``calls / rows_per_second / 3600 × gpus_per_replica`` (start-up and idle time not
counted); the cost is GPU-hours × ``gpu_hour_price`` where a price is given. A plan whose replicas exceed
the quota is refused, with how short it falls.

Inverse, for a limit (a replica quota in the window, GPU-hours, or money): the largest α whose
night-level calls fit it (bisection; ``q`` grows with α), the threshold λ*(α) recertified at that α by
budget-only LTT (fixed sequence) on the calibration set's own exceedance counts, and the performance
the calibration curve gives at λ*(α). Pure functions, no I/O: :mod:`ctd.cli` reads the calibration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..stats.calibrate import CalibrationResult, calibrate_counts
from ..stats.quality import control_plan
from .report import night_count_bound

__all__ = ["Pool", "Plan", "plan_night", "largest_alpha", "control_calls", "EPSILON"]

EPSILON = 0.05  # the night-level count bound holds with probability >= 1 - δ - EPSILON


@dataclass(frozen=True)
class Pool:
    rows_per_second: float  # one replica's measured throughput
    gpus_per_replica: float
    window_s: float  # the judge stage's share of the night
    quota: int | None = None  # replicas the cluster can give (the expert group's nodes × replicas per node)
    gpu_hour_price: float | None = None

    def calls_in(self, replicas: int) -> float:
        return replicas * self.rows_per_second * self.window_s

    def gpu_hours(self, calls: float) -> float:
        return calls / self.rows_per_second / 3600 * self.gpus_per_replica

    def cost(self, calls: float) -> float | None:
        return None if self.gpu_hour_price is None else self.gpu_hours(calls) * self.gpu_hour_price


@dataclass(frozen=True)
class Plan:
    alpha: float
    delta: float
    rows: int
    delegated_bound: int  # q: the night's delegated count, w.p. >= 1 - δ - EPSILON
    control_calls: int  # the control sample's expected size
    calls: int
    replicas: int
    hours: float  # the judge stage's wall time on min(replicas, quota)
    gpu_hours: float
    cost: float | None
    all_judge_gpu_hours: float  # every row to the judge, for comparison
    all_judge_cost: float | None
    fits: bool
    short_by: int  # replicas missing under the quota (0 when it fits)
    lambda_star: float | None = None
    performance: float | None = None  # 1 - the calibration's performance risk at λ*, when it has one
    recertified: bool = False  # λ* recertified at this α (the inverse plan), not the calibrated one

    def to_dict(self) -> dict:
        return asdict(self)


def _performance(cal: CalibrationResult, lam: float | None) -> float | None:
    if cal.performance_risk is None:
        return None
    grid = np.asarray(cal.grid, dtype=float)
    i = grid.size - 1 if lam is None or not np.isfinite(lam) else int(np.clip(np.searchsorted(grid, lam), 0, grid.size - 1))
    return float(1.0 - np.asarray(cal.performance_risk, dtype=float)[i])


def control_calls(rows: int, share: float, floor: int = 0, ceiling: int | None = None) -> int:
    """The control sample's expected size on a night of ``rows``, rounded up: π · rows with the audit's π
    (``share`` raised to expect ``floor`` rows, lowered to expect ``ceiling``; None: no ceiling); 0 without a sample."""
    if share <= 0 or rows <= 0:
        return 0
    return int(math.ceil(rows * control_plan(rows, share, floor, max(floor, rows) if ceiling is None else ceiling)))


def plan_night(
    rows: int,
    alpha: float,
    delta: float,
    pool: Pool,
    *,
    control_share: float = 0.0,
    control_floor: int = 0,
    control_ceiling: int | None = None,
    cal: CalibrationResult | None = None,
    lambda_star: float | None = None,
    recertified: bool = False,
) -> Plan:
    """The pool and bill of a night of ``rows`` at ``alpha`` (see the module docstring)."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    q = night_count_bound(alpha, rows, EPSILON)
    control = control_calls(rows, control_share, control_floor, control_ceiling)
    calls = q + control
    replicas = max(1, math.ceil(calls / pool.calls_in(1)))
    used = replicas if pool.quota is None else min(replicas, pool.quota)
    short = 0 if pool.quota is None else max(0, replicas - pool.quota)
    return Plan(
        alpha=alpha,
        delta=delta,
        rows=rows,
        delegated_bound=q,
        control_calls=control,
        calls=calls,
        replicas=replicas,
        hours=calls / (used * pool.rows_per_second) / 3600,
        gpu_hours=pool.gpu_hours(calls),
        cost=pool.cost(calls),
        all_judge_gpu_hours=pool.gpu_hours(rows),
        all_judge_cost=pool.cost(rows),
        fits=short == 0,
        short_by=short,
        lambda_star=lambda_star,
        performance=_performance(cal, lambda_star) if cal is not None else None,
        recertified=recertified,
    )


def largest_alpha(
    rows: int,
    max_calls: float,
    delta: float,
    pool: Pool,
    *,
    control_share: float = 0.0,
    control_floor: int = 0,
    control_ceiling: int | None = None,
    cal: CalibrationResult | None = None,
    tol: float = 1e-6,
) -> Plan | None:
    """The plan at the largest α whose night-level calls (delegated bound + control) are at most
    ``max_calls``, with λ*(α) recertified on the calibration's counts when ``cal`` is given; None when
    even α → 0 does not fit (the control sample alone exceeds the limit)."""
    control = control_calls(rows, control_share, control_floor, control_ceiling)
    fits = lambda a: night_count_bound(a, rows, EPSILON) + control <= max_calls  # noqa: E731
    if not fits(tol):
        return None
    lo, hi = tol, 1.0 - tol
    if fits(hi):
        lo = hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    alpha = lo
    lam = None
    if cal is not None:
        counts = np.rint(np.asarray(cal.budget_risk, dtype=float) * cal.n).astype(np.int64)
        counts = np.minimum.accumulate(counts)  # exceedance counts are non-increasing in λ
        res = calibrate_counts(cal.grid, counts, cal.n, alpha, delta)
        lam = float(res.lambda_hat) if res.delegates else None
    return plan_night(
        rows,
        alpha,
        delta,
        pool,
        control_share=control_share,
        control_floor=control_floor,
        control_ceiling=control_ceiling,
        cal=cal,
        lambda_star=lam,
        recertified=True,
    )
