"""Rank correlations for measured arrays: ranks with averaged ties, Pearson and Spearman.

Pure numpy, and the one place these statistics live: the decomposition, the LDS and the estimator
leaderboard all use them. Non-finite pairs are dropped; an undefined correlation (fewer than two
pairs, or a constant side) is NaN.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rankdata", "finite_pairs", "pearson_finite", "pearson", "spearman"]


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties receiving the average of their ranks (scipy's "average").

    Args:
        x: 1-D array of finite numbers.

    Returns:
        float64 array of the same length; e.g. ``[10, 20, 20, 5] -> [2, 3.5, 3.5, 1]``.
    """
    x = np.asarray(x).ravel()
    n = x.size
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_mask = np.r_[True, xs[1:] != xs[:-1]] if n else np.zeros(0, bool)
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    ends = np.r_[starts[1:], n]  # exclusive
    average = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def finite_pairs(a, b) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of ``a`` and ``b`` (flattened, one size) where both are finite."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"correlated arrays must have the same size; got {a.size} and {b.size}.")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def pearson_finite(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of finite 1-D arrays; NaN when n < 2 or either is constant."""
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ac, bc = a - a.mean(), b - b.mean()
    ac, bc = ac / np.abs(ac).max(), bc / np.abs(bc).max()  # scale-free: no overflow for huge values
    r = float(np.dot(ac, bc) / math.sqrt(float(np.dot(ac, ac)) * float(np.dot(bc, bc))))
    return max(-1.0, min(1.0, r)) if math.isfinite(r) else math.nan


def pearson(a, b) -> float:
    """Pearson correlation over the pairs where both ``a`` and ``b`` are finite.

    Args:
        a: array of any shape (flattened).
        b: array with as many elements as ``a``.

    Returns:
        The correlation in [-1, 1], or NaN when fewer than two finite pairs remain or either side
        is constant.
    """
    return pearson_finite(*finite_pairs(a, b))


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties) over the finite pairs of ``a``, ``b``.

    Args:
        a: array of any shape (flattened).
        b: array with as many elements as ``a``.

    Returns:
        Pearson correlation of the ranks, or NaN as in :func:`pearson`.
    """
    a, b = finite_pairs(a, b)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return pearson_finite(rankdata(a), rankdata(b))
