"""The cascade and its delegation policies: the one place the cascade rule is written.

A row's final score is the expert's where the expert was used for it, else the probe's (``switch``),
or the mean of probe and expert where the expert was used (``mean``); a final score at or above the
decision threshold is an "unsafe" decision. Calibration (its loss curves), evaluation and the
audit's published results all call :class:`Cascade`.

Policies decide which rows go to the expert. The calibrated threshold policy works row by row
(streaming: each row's decision depends on that row alone); top-k policies need the whole batch and
are the baselines the paper compares against (no guarantee on a future batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Cascade", "threshold_policy", "top_k_policy", "top_k_count"]

CascadeMode = Literal["switch", "mean"]


@dataclass(frozen=True)
class Cascade:
    """The cascade rule: ``mode`` (switch or mean) and the decision threshold."""

    mode: CascadeMode = "switch"
    decision_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ("switch", "mean"):
            raise ValueError(f"cascade mode must be 'switch' or 'mean', got {self.mode!r}")
        if not 0 < self.decision_threshold < 1:
            raise ValueError(f"decision threshold must lie in (0, 1), got {self.decision_threshold!r}")

    def expert_score(self, probe: ArrayLike, expert: ArrayLike) -> np.ndarray:
        """The final score of a row the expert was used for."""
        e = np.asarray(expert, dtype=float)
        return e if self.mode == "switch" else 0.5 * (np.asarray(probe, dtype=float) + e)

    def final(self, probe: ArrayLike, expert: ArrayLike, use_expert: ArrayLike) -> np.ndarray:
        """Final scores: :meth:`expert_score` where ``use_expert``, the probe's elsewhere. ``expert``
        may hold NaN where it was not used; a used row without an expert score is an error."""
        p = np.asarray(probe, dtype=float)
        e = np.asarray(expert, dtype=float)
        m = np.asarray(use_expert, dtype=bool)
        if np.any(m & np.isnan(e)):
            raise ValueError("a row the expert was used for has no expert score")
        return np.where(m, self.expert_score(p, np.where(m, e, 0.0)), p)

    def decide(self, final: ArrayLike) -> np.ndarray:
        """ "Unsafe" decisions: final score >= the decision threshold."""
        return np.asarray(final, dtype=float) >= self.decision_threshold


def threshold_policy(scores: ArrayLike, threshold: float) -> np.ndarray:
    """Delegate when score > threshold (strict). threshold = +inf never delegates."""
    return np.asarray(scores, dtype=float) > threshold


def top_k_count(n: int, budget: float) -> int:
    """k = floor(budget * n): the batch policy delegates exactly this many rows."""
    if not 0 <= budget <= 1:
        raise ValueError(f"budget must lie in [0, 1], got {budget}")
    return int(np.floor(budget * n + 1e-9))


def top_k_policy(signal: ArrayLike, k: int, *, seed: int | None = 0) -> np.ndarray:
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
