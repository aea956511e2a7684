"""Metrics: AUROC, accuracy, Spearman, MSE and the per-group delegation table."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["auroc", "accuracy", "spearman", "mse", "group_table"]


def auroc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n1 n0)); ties count one half. NaN when only
    one class is present."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def accuracy(labels, scores, decision_threshold: float = 0.5) -> float:
    y = np.asarray(labels).astype(int)
    return float(np.mean((np.asarray(scores, dtype=float) >= decision_threshold).astype(int) == y))


def spearman(a, b) -> float:
    return float(stats.spearmanr(a, b).statistic)


def mse(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.mean((a - b) ** 2))


def group_table(groups, v, delegated) -> list[dict]:
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
