"""Metrics: AUROC, accuracy, Spearman, MSE and the per-group delegation table."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# scipy.stats is imported where it is used: importing it takes ~1 s, and Ray workers that load a probe
# (which imports this module) never need it

__all__ = ["auroc", "accuracy", "spearman", "spearman_permutation_pvalue", "paired_difference", "mse", "group_table"]


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n1 n0)); ties count one half. NaN when only
    one class is present."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def accuracy(labels: ArrayLike, scores: ArrayLike, decision_threshold: float = 0.5) -> float:
    y = np.asarray(labels).astype(int)
    return float(np.mean((np.asarray(scores, dtype=float) >= decision_threshold).astype(int) == y))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def spearman_permutation_pvalue(a: ArrayLike, b: ArrayLike, max_items: int = 9) -> float:
    """Exact one-sided p-value of Spearman's ρ(a, b) against "no association": the share of the k!
    orderings of b whose ρ is at least the observed one (ties averaged). With k = 4 items the
    smallest possible p-value is 1/24 ≈ 0.042."""
    import itertools

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size != b.size or a.size < 2:
        raise ValueError("need two arrays of the same length >= 2")
    if a.size > max_items:
        raise ValueError(f"exact enumeration over {a.size}! orderings is too large (max {max_items} items)")
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    rho = lambda x: float(np.corrcoef(ra, x)[0, 1]) if np.std(ra) > 0 and np.std(x) > 0 else float("nan")  # noqa: E731
    observed = rho(rb)
    if not np.isfinite(observed):  # a constant input: no association to test
        return float("nan")
    perms = [rho(rb[list(p)]) for p in itertools.permutations(range(a.size))]
    return float(np.mean([r >= observed - 1e-12 for r in perms]))


def paired_difference(a: ArrayLike, b: ArrayLike, confidence: float = 0.95) -> dict:
    """Mean of a - b over paired replicates (first axis) with a Student-t interval; for [R, K] inputs
    (replicates × settings) also per setting. The interval covers the replicate-to-replicate
    variation only (e.g. random calibration/evaluation splits of one test set), not the sampling of
    that test set."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.shape[0] < 2:
        raise ValueError("at least two replicates are needed for an interval")
    from scipy import stats

    t = float(stats.t.ppf(0.5 + confidence / 2, d.shape[0] - 1))

    def summary(x):
        m, se = x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
        return m, m - t * se, m + t * se

    per = d.reshape(d.shape[0], -1)
    m, lo, hi = summary(per.mean(axis=1))
    out = {"mean": float(m), "ci": [float(lo), float(hi)], "confidence": confidence, "replicates": int(d.shape[0])}
    if d.ndim > 1:
        pm, plo, phi = summary(per)
        out |= {
            "per_setting_mean": pm.tolist(),
            "per_setting_ci": [[float(x), float(y)] for x, y in zip(plo, phi)],
            "settings_above_zero": int((plo > 0).sum()),
            "settings_below_zero": int((phi < 0).sum()),
        }
    return out


def mse(a: ArrayLike, b: ArrayLike) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.mean((a - b) ** 2))


def group_table(groups: ArrayLike, v: ArrayLike, delegated: ArrayLike) -> list[dict]:
    """Per group: rows, delegation rate, mean delegation value overall and among delegated rows,
    and the share of rows with v > 0 (the group's effective capacity). One row "all" first."""
    g = np.asarray(groups).astype(str)
    v = np.asarray(v, dtype=float)
    m = np.asarray(delegated, dtype=bool)
    rows = []
    for name in ["all", *sorted(set(g.tolist()))]:
        sel = np.ones(g.size, bool) if name == "all" else g == name
        n = int(sel.sum())
        nd = int((sel & m).sum())
        rows.append(
            {
                "group": name,
                "n": n,
                "delegation_rate": nd / n if n else float("nan"),
                "mean_v": float(v[sel].mean()) if n else float("nan"),
                "mean_v_delegated": float(v[sel & m].mean()) if nd else float("nan"),
                "capacity": float(np.mean(v[sel] > 0)) if n else float("nan"),
            }
        )
    return rows
