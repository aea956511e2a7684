"""Delegation policies and the cascade's output.

A policy maps signals to a boolean "delegate" mask. The calibrated threshold policy works row by
row (streaming: each row's decision depends on that row alone); top-k policies need the whole
batch and are the baselines the paper compares against (no guarantee on a future batch).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["threshold_policy", "top_k_policy", "top_k_count", "cascade_scores", "decide"]


def threshold_policy(scores, threshold: float) -> np.ndarray:
    """Delegate when score > threshold (strict). threshold = +inf never delegates."""
    return np.asarray(scores, dtype=float) > threshold


def top_k_count(n: int, budget: float) -> int:
    """k = floor(budget * n): the batch policy delegates exactly this many rows."""
    if not 0 <= budget <= 1:
        raise ValueError(f"budget must lie in [0, 1], got {budget}")
    return int(np.floor(budget * n + 1e-9))


def top_k_policy(signal, k: int, *, seed: int | None = 0) -> np.ndarray:
    """Delegate the k rows with the largest signal; ties broken uniformly at random (seeded), so a
    constant signal does not always pick the first rows of the batch."""
    s = np.asarray(signal, dtype=float)
    if not 0 <= k <= s.size:
        raise ValueError(f"k must lie in [0, {s.size}], got {k}")
    tie_break = np.random.default_rng(seed).random(s.size)
    order = np.lexsort((tie_break, -s))
    mask = np.zeros(s.size, dtype=bool)
    mask[order[:k]] = True
    return mask


def cascade_scores(probe, expert, delegated, mode: Literal["switch", "mean"] = "switch") -> np.ndarray:
    """Final score: the expert's (or the probe/expert mean) where delegated, else the probe's.
    ``expert`` may hold NaN where it was not called."""
    p = np.asarray(probe, dtype=float)
    e = np.asarray(expert, dtype=float)
    m = np.asarray(delegated, dtype=bool)
    if mode == "switch":
        out = np.where(m, e, p)
    elif mode == "mean":
        out = np.where(m, 0.5 * (p + e), p)
    else:
        raise ValueError(f"cascade mode must be 'switch' or 'mean', got {mode!r}")
    if np.any(np.isnan(out)):
        raise ValueError("a delegated row has no expert score")
    return out


def decide(final_scores, decision_threshold: float = 0.5) -> np.ndarray:
    """Positive ("unsafe") decision when the final score >= threshold."""
    return np.asarray(final_scores, dtype=float) >= decision_threshold
