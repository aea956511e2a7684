"""Family-wise error rate (FWER) controlling multiple tests over a family of null hypotheses.

Each function takes p-values along the last axis (any leading axes are independent families, which
lets the evaluation test hundreds of resampled calibration sets in one call) and returns a boolean
mask of rejected nulls of the same shape. Rejecting H_j: "configuration j is not safe" certifies j.
All three control the FWER at level ``delta``: P(any true null rejected) <= delta.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .pvalues import check_level

__all__ = ["fixed_sequence_test", "bonferroni", "holm", "multiple_test", "METHODS"]


def _prepare(pvalues, delta: float) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float)
    check_level(delta, "delta")
    if p.ndim == 0:
        raise ValueError("pvalues must have at least one axis")
    if np.any(np.isnan(p)):
        raise ValueError("pvalues contain NaN; mark untested hypotheses with +inf instead")
    return p


def fixed_sequence_test(pvalues: ArrayLike, delta: float) -> np.ndarray:
    """Fixed-sequence testing: test H_1, H_2, ... in the given order at level delta each, and stop
    at the first non-rejection. Controls the FWER at delta for an order fixed before the data
    that produced the p-values are seen (Bauer 1991). Hypotheses with p = +inf end the sequence.
    """
    p = _prepare(pvalues, delta)
    return np.logical_and.accumulate(p <= delta, axis=-1)


def bonferroni(pvalues: ArrayLike, delta: float) -> np.ndarray:
    """Bonferroni: reject H_j when p_j <= delta / m, m the number of hypotheses (last axis)."""
    p = _prepare(pvalues, delta)
    return p <= delta / p.shape[-1]


def holm(pvalues: ArrayLike, delta: float) -> np.ndarray:
    """Holm's step-down procedure: sort p-values ascending, reject p_(i) while
    p_(i) <= delta / (m - i + 1) (1-indexed), stop at the first failure."""
    p = _prepare(pvalues, delta)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=-1)
    levels = delta / (m - np.arange(m))
    accepted_sorted = np.logical_and.accumulate(sorted_p <= levels, axis=-1)
    rejected = np.empty_like(accepted_sorted)
    np.put_along_axis(rejected, order, accepted_sorted, axis=-1)
    return rejected


METHODS = {"fixed_sequence": fixed_sequence_test, "bonferroni": bonferroni, "holm": holm}


def multiple_test(pvalues: ArrayLike, delta: float, method: str = "fixed_sequence") -> np.ndarray:
    """Dispatch to one of :data:`METHODS` by name."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown multiple-testing method {method!r}; choose from {sorted(METHODS)}") from None
    return fn(pvalues, delta)
