"""Confidence intervals and seed-noise floors for the estimator leaderboard.

Pure numpy computations on the leaderboard's ``[n_test, K]`` matrices (estimator scores against a
ground truth's Δm, ``docs/conventions.md`` §6). Two sources of sampling error are in every number:
the test points *and* the removals (single points or LDS subsets) are random draws of the study.
The intervals therefore come from a two-way ("pigeonhole") bootstrap: each replicate draws the
test rows with replacement and, independently, the removal columns with replacement, and
evaluates the statistic on the resampled matrix (duplicated cells are duplicated pairs; Spearman
ranks them with ties averaged, as :func:`pbrf.stats.rankdata`). The percentile interval of the
replicates is reported. For cells that are i.i.d. the two-way bootstrap is conservative (it adds
row and column variance that is not there: 95% intervals covered 100% of 200 synthetic studies);
with the crossed effects of real Δm (a heavy-tailed scale per test point, effects per removal, a
fit that varies across test points) it is close to nominal: the pooled Pearson's interval covered
95.5% at 10 × 80 and 91.5% at 10 × 500 (``tests/bench/test_uncertainty.py``). With only ~10 test
points it is somewhat narrow when the test points differ strongly in their mean (an additive
test-point effect as large as the rest: 86% at 10 × 500); read its width as a lower bound there.

The point values are those of :func:`~pbrf.experiment.analysis.decomposition.correlation_entry`
and :func:`pbrf.lds.lds`; the replicates use a weighted, vectorised form of the same statistics
(a replicate's cells carry the product of its row and column draw counts), equal to evaluating
those functions on the explicitly resampled matrix up to round-off.

The seed floors answer a different question: how reproducible is a ground truth measured with
``S`` seeds (cold start, LDS retraining)? The seeds are split into two halves, and the agreement of
the half means bounds what any estimator can reach (:func:`seed_floor`, :func:`lds_floor`).

Given the same seed and the same matrix shape (after all-NaN rows and columns are dropped), every
call draws the same replicates, so the replicates of two estimators on one ground truth are paired
(:func:`bootstrap_replicates`).
"""

from __future__ import annotations

import math

import numpy as np

from pbrf.experiment.analysis.decomposition import correlation_entry, finite_or_none
from pbrf.lds import lds

__all__ = [
    "STATS",
    "MIN_FINITE",
    "resample_indices",
    "bootstrap_replicates",
    "percentile_interval",
    "bootstrap_correlations",
    "bootstrap_lds",
    "spearman_brown",
    "seed_halves",
    "seed_floor",
    "lds_floor",
]

#: The statistics of :func:`correlation_entry`, in its order.
STATS = ("pearson", "spearman", "pearson_per_test", "spearman_per_test")
#: An interval needs at least this fraction of the replicates to be defined (finite); a statistic
#: undefined on more resamples than that (a nearly constant side) gets no interval.
MIN_FINITE = 0.9
#: Cells (replicates × pairs) handled at once: bounds the memory of one block (~16 MB per array).
_BLOCK = 2_000_000


# --------------------------------------------------------------------------- input and draws


def _pairs(scores, truth) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies with NaN wherever either side is non-finite, without the rows and columns
    that have no finite pair (they carry no data and must not dilute the resampling).
    """
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and truth {t.shape} must both be [n_test, K].")
    ok = np.isfinite(s) & np.isfinite(t)
    rows, cols = ok.any(axis=1), ok.any(axis=0)
    s, t = np.where(ok, s, np.nan)[rows][:, cols], np.where(ok, t, np.nan)[rows][:, cols]
    return s, t


def _check(n_boot, level: float = 0.95) -> None:
    """Reject a non-positive replicate count and a level outside (0, 1)."""
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 1):
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}.")


def resample_indices(n_test: int, k: int, n_boot: int, seed: int = 0):
    """The two-way bootstrap draws: row indices ``[n_boot, n_test]`` and, independently, column
    indices ``[n_boot, k]``, each uniform with replacement (replicate ``b`` is
    ``matrix[rows[b]][:, cols[b]]``). Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_test, size=(n_boot, n_test))
    cols = rng.integers(0, k, size=(n_boot, k))
    return rows, cols


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each replicate: ``[n_boot, n]`` float64."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


# --------------------------------------------------------------------------- weighted statistics


def _prepare(x: np.ndarray) -> dict:
    """What the weighted statistics of a finite 1-D side need, computed once: the values
    standardised (Pearson is affine-invariant; this keeps the raw sums well conditioned), the
    sort order and each sorted position's group of equal values (ties), and the groups' ends.
    """
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]] if x.size else np.zeros(0, bool)
    group = np.cumsum(starts) - 1
    ends = np.r_[np.flatnonzero(starts)[1:], x.size] - 1  # last sorted position of each group
    sd = float(x.std()) if x.size else 0.0
    z = (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
    return {"z": z, "order": order, "group": group, "ends": ends}


def _ranks(prep: dict, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks of the side in each replicate (a cell of weight ``w`` stands for ``w``
    tied copies: rank = weight below + (weight of its tie group + 1) / 2) ``[b, m]``, and whether
    the replicate's drawn cells are all equal (one tie group holds the whole weight) ``[b]``.
    """
    cum = np.cumsum(w[:, prep["order"]], axis=1)
    at_end = cum[:, prep["ends"]]
    below = np.concatenate([np.zeros((w.shape[0], 1)), at_end[:, :-1]], axis=1)
    tied = at_end - below
    ranks = np.empty_like(w)
    ranks[:, prep["order"]] = (below + (tied + 1.0) / 2.0)[:, prep["group"]]
    constant = tied.max(axis=1, initial=0.0) >= cum[:, -1] if w.shape[1] else np.ones(len(w), bool)
    return ranks, constant


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation per replicate of ``x``, ``y`` (``[m]`` or ``[b, m]``) with cell weights
    ``w`` ``[b, m]`` (two passes: weighted means, then centred sums); NaN where the weight is 0.
    """
    total = w.sum(axis=1)
    x, y = np.broadcast_to(x, w.shape), np.broadcast_to(y, w.shape)
    dot = lambda a, b: np.einsum("bm,bm,bm->b", w, a, b)  # no [b, m] temporaries
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = x - (np.einsum("bm,bm->b", w, x) / total)[:, None]
        yc = y - (np.einsum("bm,bm->b", w, y) / total)[:, None]
        r = dot(xc, yc) / np.sqrt(dot(xc, xc) * dot(yc, yc))
    return np.clip(r, -1.0, 1.0)


def _side_stats(x: np.ndarray, y: np.ndarray, w: np.ndarray, wanted: set) -> dict:
    """``{"pearson", "spearman"}`` (those in ``wanted``) of the finite pairs ``x``, ``y`` ``[m]``
    in each replicate with cell weights ``w`` ``[b, m]``; NaN where a side is constant, as
    :func:`pbrf.stats.pearson` on the resampled pairs.
    """
    px, py = _prepare(x), _prepare(y)
    rx, cx = _ranks(px, w)
    ry, cy = _ranks(py, w)
    undefined = cx | cy
    out = {}
    if "pearson" in wanted:
        out["pearson"] = np.where(undefined, np.nan, _weighted_pearson(px["z"], py["z"], w))
    if "spearman" in wanted:
        out["spearman"] = np.where(undefined, np.nan, _weighted_pearson(rx, ry, w))
    return out


# --------------------------------------------------------------------------- replicates


def _pooled(s, t, rows: np.ndarray, cols: np.ndarray, wanted: set) -> dict:
    """The pooled statistics of each replicate (cell weight = row count × column count), in
    blocks of replicates that keep the ``[b, pairs]`` arrays to :data:`_BLOCK` cells.
    """
    ti, tj = np.nonzero(np.isfinite(s))
    x, y = s[ti, tj], t[ti, tj]
    step = max(1, _BLOCK // max(1, x.size))
    parts = []
    for b0 in range(0, rows.shape[0], step):
        w = rows[b0:b0 + step][:, ti] * cols[b0:b0 + step][:, tj]
        parts.append(_side_stats(x, y, w, wanted))
    return {k: np.concatenate([p[k] for p in parts]) for k in wanted}


def _per_test(s, t, rows: np.ndarray, cols: np.ndarray, wanted: set) -> dict:
    """The per-test means of each replicate: every test point's correlation across the drawn
    columns, averaged over the drawn rows (with their multiplicity) where it is defined.
    """
    per_row = {k: np.full(rows.shape, np.nan) for k in wanted}
    for i in range(s.shape[0]):
        keep = np.isfinite(s[i])
        for k, v in _side_stats(s[i, keep], t[i, keep], cols[:, keep], wanted).items():
            per_row[k][:, i] = v
    out = {}
    for k, r in per_row.items():
        ok = np.isfinite(r)
        used = (rows * ok).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(used > 0, (rows * np.where(ok, r, 0.0)).sum(axis=1) / used, np.nan)
    return out


def bootstrap_replicates(scores, truth, *, n_boot: int = 1000, seed: int = 0,
                         stats=STATS) -> dict[str, np.ndarray]:
    """The two-way bootstrap replicates of the statistics in ``stats`` (names from
    :data:`STATS`): ``{name: float array [n_boot]}``, NaN where undefined on that resample.

    Rows and columns without any finite pair are dropped first; then :func:`resample_indices`
    with the remaining shape and ``seed`` gives the draws, so two calls with equal shapes and
    seeds (two estimators on one ground truth) resample the same test points and removals.
    """
    _check(n_boot)
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STATS}.")
    s, t = _pairs(scores, truth)
    if s.size == 0:
        return {k: np.full(n_boot, np.nan) for k in stats}
    ri, ci = resample_indices(s.shape[0], s.shape[1], int(n_boot), seed)
    rows, cols = _counts(ri, s.shape[0]), _counts(ci, s.shape[1])
    pooled = {k for k in ("pearson", "spearman") if k in stats}
    per = {k.removesuffix("_per_test") for k in stats if k.endswith("_per_test")}
    out = _pooled(s, t, rows, cols, pooled) if pooled else {}
    if per:
        out.update({f"{k}_per_test": v for k, v in _per_test(s, t, rows, cols, per).items()})
    return {k: out[k] for k in stats}


def percentile_interval(replicates, level: float = 0.95) -> list[float] | None:
    """The percentile interval ``[lo, hi]`` (quantiles ``(1 ∓ level) / 2``) of the finite
    replicates, or None when fewer than :data:`MIN_FINITE` of them (or fewer than 2) are finite.
    """
    reps = np.asarray(replicates, dtype=np.float64).ravel()
    finite = reps[np.isfinite(reps)]
    if finite.size < 2 or finite.size < MIN_FINITE * reps.size:
        return None
    lo, hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------- intervals


def bootstrap_correlations(scores, truth, *, n_boot: int = 1000, level: float = 0.95,
                           seed: int = 0) -> dict:
    """Two-way bootstrap intervals of the four correlations of :func:`correlation_entry`.

    Args:
        scores: estimator scores ``[n_test, K]``.
        truth: the ground truth's Δm ``[n_test, K]``; a non-finite entry on either side leaves the
            pair out (an uncertified removal is an all-NaN column: it changes nothing).
        n_boot: bootstrap replicates.
        level: coverage of the intervals.
        seed: the seed of the draws (:func:`resample_indices`).

    Returns:
        ``{"pearson", "spearman", "pearson_per_test", "spearman_per_test"}``, each ``[lo, hi]``
        (Python floats) or None when the statistic is undefined on the data or on too many
        resamples (:func:`percentile_interval`).
    """
    _check(n_boot, level)
    point = correlation_entry(*_pairs(scores, truth))  # equal to the entry of the inputs
    reps = bootstrap_replicates(scores, truth, n_boot=n_boot, seed=seed)
    return {k: percentile_interval(reps[k], level) if point[k] is not None else None
            for k in STATS}


def bootstrap_lds(group_scores, actual, *, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> list[float] | None:
    """Two-way bootstrap interval ``[lo, hi]`` of the LDS, ``pbrf.lds.lds(group_scores,
    actual)["lds"]`` (the mean over test points of the per-test Spearman across subsets),
    resampling test points and subsets; None when the LDS is undefined or too many resamples are.
    It is the ``spearman_per_test`` interval of :func:`bootstrap_correlations` (same draws).
    """
    _check(n_boot, level)
    if finite_or_none(lds(group_scores, actual)["lds"]) is None:
        return None
    reps = bootstrap_replicates(group_scores, actual, n_boot=n_boot, seed=seed,
                                stats=("spearman_per_test",))
    return percentile_interval(reps["spearman_per_test"], level)


# --------------------------------------------------------------------------- seed floors


def spearman_brown(r) -> float | None:
    """``sqrt(2r / (1 + r))`` from a half-split correlation ``r``: the correlation that a perfect,
    noise-free estimator is expected to reach with the full ``S``-seed average (the square root of
    the Spearman–Brown reliability ``2r / (1 + r)`` of the average). None when ``r`` is None or
    ``r ≤ 0`` (no reproducible signal to step up).
    """
    if r is None or not math.isfinite(r) or r <= 0:
        return None
    return math.sqrt(2.0 * r / (1.0 + r))


def seed_halves(per_seed) -> tuple[np.ndarray, np.ndarray, list[list[int]]] | None:
    """The means of the even-position and of the odd-position seeds of ``per_seed``
    ``[n_test, K, S]`` (a seed's NaN makes the cell NaN, i.e. left out), and the two index lists;
    None when ``S < 2``.
    """
    a = np.asarray(per_seed, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"per_seed must be [n_test, K, S], got shape {a.shape}.")
    n_seeds = a.shape[2]
    if n_seeds < 2:
        return None
    idx = [list(range(0, n_seeds, 2)), list(range(1, n_seeds, 2))]
    return a[:, :, idx[0]].mean(axis=2), a[:, :, idx[1]].mean(axis=2), idx


def seed_floor(per_seed, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict | None:
    """The noise floor of a ground truth measured with ``S`` seeds: how well two independent
    halves of the seeds agree, and the ceiling this puts on any estimator.

    The seeds are split by position (even / odd), each half is averaged, and the four correlations
    of :func:`correlation_entry` between the half means are reported with their two-way bootstrap
    intervals (:func:`bootstrap_correlations`). A half-split correlation ``r`` well below 1 means
    the ground truth is itself noisy at this number of seeds: an estimator's correlation with it
    is bounded by the noise, not only by the estimator. ``ceiling_<stat>`` = :func:`spearman_brown`
    of ``r``: the correlation a perfect, noise-free estimator is expected to reach with the
    ``S``-seed average.

    Assumptions: each seed's Δm = a signal common to all seeds + seed noise, the noise independent
    across seeds and of the signal, with the same variance for every seed. The step-up is exact for
    Pearson with equal halves; with odd ``S`` the halves differ by one seed and the ceiling is
    slightly understated; for Spearman and the per-test means it is the same formula applied as an
    approximation.

    Args:
        per_seed: each seed's Δm, ``[n_test, K, S]``.
        n_boot, level, seed: as :func:`bootstrap_correlations`.

    Returns:
        None when ``S < 2``; else ``{stat, stat + "_ci", "ceiling_" + stat for stat in STATS}``
        plus ``"halves"`` (``[[seed positions of A], [of B]]``) and ``"n_seeds"``.
    """
    split = seed_halves(per_seed)
    if split is None:
        return None
    a, b, halves = split
    entry = correlation_entry(a, b)
    cis = bootstrap_correlations(a, b, n_boot=n_boot, level=level, seed=seed)
    out = {k: entry[k] for k in STATS}
    out.update({f"{k}_ci": cis[k] for k in STATS})
    out.update({f"ceiling_{k}": spearman_brown(entry[k]) for k in STATS})
    return {**out, "halves": halves, "n_seeds": int(np.shape(per_seed)[2])}


def lds_floor(per_seed, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict | None:
    """The noise floor of the LDS ground truth: the LDS of one half of the retraining seeds' mean
    Δm against the other half's (:func:`seed_halves`), as :func:`seed_floor` does for the
    correlations, with the same assumptions.

    Args:
        per_seed: each seed's retrained Δm, ``[n_test, K_subsets, S]``.
        n_boot, level, seed: as :func:`bootstrap_lds`.

    Returns:
        None when ``S < 2``; else ``{"lds", "lds_ci", "ceiling_lds", "halves", "n_seeds"}``:
        ``pbrf.lds.lds(half_a, half_b)["lds"]``, its :func:`bootstrap_lds` interval and its
        :func:`spearman_brown` ceiling (the LDS a perfect estimator is expected to reach against
        the ``S``-seed average).
    """
    split = seed_halves(per_seed)
    if split is None:
        return None
    a, b, halves = split
    value = finite_or_none(lds(a, b)["lds"])
    return {
        "lds": value,
        "lds_ci": bootstrap_lds(a, b, n_boot=n_boot, level=level, seed=seed),
        "ceiling_lds": spearman_brown(value),
        "halves": halves,
        "n_seeds": int(np.shape(per_seed)[2]),
    }
