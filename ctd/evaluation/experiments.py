"""Evaluation of delegation policies: budget sweeps, validation of the guarantee, group tables and
top-k value curves (the experiments of the CTD paper, on any scores table).

Methods compared in a sweep (names used in results and plots):

=====================  =================================================================
``ctd_pareto``         DV threshold calibrated by Pareto testing (the paper's method)
``ctd_ltt``            DV threshold, budget-only LTT (fixed-sequence from the top)
``uncertainty_pareto`` uncertainty threshold, Pareto testing
``uncertainty_ltt``    uncertainty threshold, budget-only LTT
``topk_uncertainty``   batch top-k by uncertainty (McKenzie et al. 2025), no guarantee
``topk_dv``            batch top-k by the DV probe
``topk_oracle``        batch top-k by the true delegation value (needs labels: an upper bound)
``probe_only``         never delegate
``expert_only``        always delegate
=====================  =================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..stats.calibrate import (
    calibrate,
    cascade_losses,
    delegation_loss_sums,
    exceedance_counts,
    ltt_select,
    pareto_ltt_select,
    pareto_split,
)
from ..stats.cascade import Cascade, threshold_policy, top_k_count, top_k_policy
from ..stats.metrics import accuracy, auroc, group_table, mse, paired_difference, spearman
from ..stats.pvalues import clopper_pearson
from ..stats.signals import delegation_value, effective_capacity

__all__ = [
    "DEFAULT_BUDGETS",
    "CALIBRATED",
    "TOPK",
    "Scores",
    "budget_sweep",
    "validate_guarantee",
    "topk_value_curve",
    "dv_quality",
]

DEFAULT_BUDGETS = np.round(np.linspace(0.05, 0.95, 20), 4)
CALIBRATED = ("ctd_pareto", "ctd_ltt", "uncertainty_pareto", "uncertainty_ltt")
TOPK = ("topk_uncertainty", "topk_dv", "topk_oracle")
COMPARISONS = (("ctd_pareto", "uncertainty_pareto"), ("ctd_ltt", "uncertainty_ltt"), ("topk_dv", "topk_uncertainty"))


@dataclass
class Scores:
    """A labelled scores table: labels 0/1, probe and expert P(unsafe), DV probe score and the
    uncertainty signal for every row, plus optional groups."""

    labels: np.ndarray
    probe: np.ndarray
    expert: np.ndarray
    dv: np.ndarray
    uncertainty: np.ndarray
    groups: np.ndarray | None = None

    @property
    def v(self) -> np.ndarray:
        return delegation_value(self.labels, self.probe, self.expert)

    def __len__(self) -> int:
        return len(self.labels)


def _record(store, method, s, b, y, p, e, delegated, cascade):
    f = Cascade(cascade).final(p, e, delegated)
    r = store.setdefault(method, {"auroc": {}, "accuracy": {}, "rate": {}})
    r["auroc"][(s, b)] = auroc(y, f)
    r["accuracy"][(s, b)] = accuracy(y, f)
    r["rate"][(s, b)] = float(np.mean(delegated))


def budget_sweep(
    scores: Scores,
    *,
    budgets: ArrayLike = DEFAULT_BUDGETS,
    delta: float = 0.1,
    dv_grid: ArrayLike,
    unc_grid: ArrayLike,
    splits: int = 20,
    cal_fraction: float = 0.5,
    seed: int = 0,
    cascade: str = "switch",
    risk: str = "accuracy",
    group_budget: float | None = 0.2,
    progress: Callable[[int, int], object] | None = None,
) -> dict:
    """AUROC, accuracy and realised delegation rate of every method at every budget, on the
    evaluation half of ``splits`` random calibration/evaluation splits (mean and std over splits).
    ``comparisons``: DV against uncertainty (calibrated and top-k), the mean paired difference over
    splits with its 95% t-interval, overall and per budget (:func:`ctd.stats.metrics.paired_difference`).
    Also the per-group table of ``ctd_pareto`` at the sweep budget nearest ``group_budget``, with a
    95% interval over splits of each group's delegation rate."""
    y, p, e, d, u = scores.labels, scores.probe, scores.expert, scores.dv, scores.uncertainty
    v = scores.v
    n = len(y)
    n_cal = int(round(cal_fraction * n))
    rng = np.random.default_rng(seed)
    store: dict = {}
    groups_rows = []
    budgets = np.asarray(budgets, dtype=float)
    group_index = None if group_budget is None else int(np.argmin(np.abs(budgets - group_budget)))
    t0 = time.perf_counter()
    for s in range(splits):
        perm = rng.permutation(n)
        cal, ev = perm[:n_cal], perm[n_cal:]
        yc, pc, ec = y[cal], p[cal], e[cal]
        for bi, a in enumerate(budgets):
            for name, sig, grid in (("ctd", d, dv_grid), ("uncertainty", u, unc_grid)):
                for pareto in (True, False):
                    res = calibrate(
                        sig[cal],
                        grid,
                        float(a),
                        delta,
                        labels=yc,
                        probe=pc,
                        expert=ec,
                        pareto=pareto,
                        risk=risk,
                        seed=s,
                        cascade=Cascade(cascade),
                    )
                    m = threshold_policy(sig[ev], res.lambda_hat)
                    method = f"{name}_{'pareto' if pareto else 'ltt'}"
                    _record(store, method, s, bi, y[ev], p[ev], e[ev], m, cascade)
                    if name == "ctd" and pareto and bi == group_index and scores.groups is not None:
                        groups_rows.append(group_table(scores.groups[ev], v[ev], m))
            k = top_k_count(len(ev), float(a))
            for method, sig in (("topk_uncertainty", u), ("topk_dv", d), ("topk_oracle", v)):
                _record(store, method, s, bi, y[ev], p[ev], e[ev], top_k_policy(sig[ev], k, seed=s), cascade)
            _record(store, "probe_only", s, bi, y[ev], p[ev], e[ev], np.zeros(len(ev), bool), cascade)
            _record(store, "expert_only", s, bi, y[ev], p[ev], e[ev], np.ones(len(ev), bool), cascade)
        if progress:
            progress(s + 1, splits)
    out = {
        "budgets": budgets.tolist(),
        "delta": delta,
        "splits": splits,
        "n": n,
        "n_cal": n_cal,
        "cascade": cascade,
        "risk": risk,
        "seconds": round(time.perf_counter() - t0, 2),
        "methods": {},
    }
    per_split = {
        m: {k: np.array([[vals[(s, b)] for b in range(len(budgets))] for s in range(splits)]) for k, vals in metrics.items()}
        for m, metrics in store.items()
    }
    for method, metrics in per_split.items():
        out["methods"][method] = {
            metric: {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()} for metric, arr in metrics.items()
        }
    if splits >= 2:  # paired over splits: the same split and budget for both methods
        out["comparisons"] = {
            f"{a} - {b}": {
                metric: paired_difference(per_split[a][metric], per_split[b][metric]) for metric in ("auroc", "accuracy")
            }
            for a, b in COMPARISONS
        }
    if groups_rows:
        keys = [r["group"] for r in groups_rows[0]]
        rows = []
        for i, g in enumerate(keys):
            vals = {
                f: np.array([r[i][f] for r in groups_rows], dtype=float)
                for f in ("n", "delegation_rate", "mean_v", "mean_v_delegated", "capacity")
            }
            row = {"group": g, **{f: float(np.nanmean(v)) for f, v in vals.items()}}
            if splits >= 2:
                row["delegation_rate_ci"] = paired_difference(vals["delegation_rate"], 0.0)["ci"]
            rows.append(row)
        out["group_table"] = {"budget": float(budgets[group_index]), "method": "ctd_pareto", "rows": rows}
    return out


def validate_guarantee(
    dv: ArrayLike,
    budgets: ArrayLike,
    delta: float,
    grid: ArrayLike,
    *,
    n_cal: int,
    draws: int = 500,
    scheme: str = "bootstrap",
    pareto: bool = False,
    labels: ArrayLike | None = None,
    probe: ArrayLike | None = None,
    expert: ArrayLike | None = None,
    opt_fraction: float = 0.3,
    cascade: str = "switch",
    seed: int = 0,
    confidence: float = 0.95,
    details: bool = False,
) -> dict:
    """Frequency over ``draws`` random calibration sets with which the calibrated threshold's
    delegation rate exceeds the budget, per budget, with a Clopper-Pearson interval.

    ``scheme="bootstrap"``: the given rows are the population; each calibration set is drawn i.i.d.
    with replacement, and the rate is the exact rate over the population: this measures the
    guarantee itself. ``scheme="split_halves"``: each draw splits the rows into calibration and
    evaluation parts without replacement and measures the rate on the evaluation part (the paper's
    Appendix D style); the two parts are anti-correlated and the measured rate is itself noisy, so
    this can exceed δ although the guarantee holds. Pareto validation uses the accuracy risk and
    :func:`~ctd.stats.calibrate.pareto_split` seeded ``seed + r`` for draw r, so its λ̂ is exactly what
    ``calibrate(dv[calibration_indices[r]], ..., pareto=True, seed=seed + r)`` returns. ``details=True``
    adds ``lambda_hat`` [budgets][draws] and ``calibration_indices`` [draws][n_cal].
    """
    t0 = time.perf_counter()
    d = np.asarray(dv, dtype=float)
    budgets = np.atleast_1d(np.asarray(budgets, dtype=float))
    N = d.size
    rng = np.random.default_rng(seed)
    if scheme == "bootstrap":
        cal_idx = rng.integers(0, N, size=(draws, n_cal))
        grid_rate = exceedance_counts(d, grid) / N  # [G]
    elif scheme == "split_halves":
        if n_cal >= N:
            raise ValueError("split_halves needs n_cal < number of rows")
        perms = np.argsort(rng.random((draws, N)), axis=1)
        cal_idx = perms[:, :n_cal]
        grid_rate = exceedance_counts(d[perms[:, n_cal:]], grid) / (N - n_cal)  # [R, G]
    else:
        raise ValueError(f"scheme must be 'bootstrap' or 'split_halves', got {scheme!r}")
    d_cal = d[cal_idx]
    if not pareto:
        sel = ltt_select(grid, budgets, delta, counts=exceedance_counts(d_cal, grid), n=n_cal)
    else:
        if labels is None or probe is None or expert is None:
            raise ValueError("Pareto validation needs labels, probe and expert scores")
        lk, ld = cascade_losses(probe, expert, labels, Cascade(cascade))
        # the library's own split, seeded as calibrate(..., pareto=True, seed=seed + r) seeds draw r
        splits = [pareto_split(n_cal, opt_fraction, seed + r) for r in range(draws)]
        opt = np.take_along_axis(cal_idx, np.stack([o for o, _ in splits]), axis=1)
        test = np.take_along_axis(cal_idx, np.stack([t for _, t in splits]), axis=1)
        n_opt = opt.shape[1]
        sel = pareto_ltt_select(
            grid,
            budgets,
            delta,
            opt_counts=exceedance_counts(d[opt], grid),
            n_opt=n_opt,
            opt_perf=delegation_loss_sums(d[opt], lk[opt], ld[opt], grid) / n_opt,
            test_counts=exceedance_counts(d[test], grid),
            n_test=n_cal - n_opt,
            cal_perf=delegation_loss_sums(d_cal, lk[cal_idx], ld[cal_idx], grid) / n_cal,
        )
    lam = sel.lambda_hat  # [B, R]
    gi = np.clip(np.searchsorted(np.asarray(grid), lam), 0, len(grid) - 1)
    if grid_rate.ndim == 1:
        rate = grid_rate[gi]
    else:
        rate = np.take_along_axis(np.broadcast_to(grid_rate, (len(budgets),) + grid_rate.shape), gi[..., None], axis=-1)[..., 0]
    rate = np.where(np.isfinite(lam), rate, 0.0)
    viol = (rate > budgets[:, None]).sum(axis=1)
    lo, hi = clopper_pearson(viol, draws, confidence)
    out = {
        "scheme": scheme,
        "pareto": pareto,
        "budgets": budgets.tolist(),
        "delta": delta,
        "n_cal": n_cal,
        "draws": draws,
        "violation_rate": (viol / draws).tolist(),
        "ci_low": lo.tolist(),
        "ci_high": hi.tolist(),
        "mean_rate": rate.mean(axis=1).tolist(),
        "never_delegates": (~np.isfinite(lam)).mean(axis=1).tolist(),
        "max_violation_rate": float((viol / draws).max()),
        "mean_violation_rate": float((viol / draws).mean()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if details:
        out["lambda_hat"] = [[None if not np.isfinite(x) else float(x) for x in row] for row in lam]
        out["calibration_indices"] = cal_idx.tolist()
    return out


def topk_value_curve(
    v: ArrayLike, signals: dict, fractions: Sequence[float] | np.ndarray = np.linspace(0.05, 1.0, 20), seed: int = 0
) -> dict:
    """Mean delegation value of the top-k rows ranked by each signal (paper Fig. 5)."""
    v = np.asarray(v, dtype=float)
    out = {"fractions": np.asarray(fractions).tolist(), "curves": {}}
    for name, sig in signals.items():
        vals = []
        for f in fractions:
            k = max(1, top_k_count(v.size, float(f)))
            vals.append(float(v[top_k_policy(sig, k, seed=seed)].mean()))
        out["curves"][name] = vals
    return out


def dv_quality(v_true: ArrayLike, dv_pred: ArrayLike) -> dict:
    return {"mse": mse(v_true, dv_pred), "spearman": spearman(v_true, dv_pred), "capacity": effective_capacity(v_true)}
