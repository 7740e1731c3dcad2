"""The linear datamodeling score (LDS; Park et al. 2023) as a ground truth for attribution.

``K`` random subsets keep a fraction ``α`` of the training set (default 50%); each is retrained
from scratch by the batched cold-start engine (:func:`pbrf.respond` with ``kind="cold"``: all
``K`` models vmapped together, every subset with the same seeds — the same initialisations and
minibatch orders — and a full-data reference run per seed). The actual effect of removing the
complement ``r_k`` on test point ``t`` is ``Δm[t, k] = mean_s m_t(θ_{r_k, s}) − m_t(θ_{ref, s})``.

An estimator's prediction for subset ``k`` is its summed group score over the removed points
(attribution scores are additive), and

    LDS = mean over test points t of Spearman( scores[t, :], Δm[t, :] ).

As everywhere in pbrf, removing a point zeroes its weight in ``J`` and keeps the ``1/N`` scaling;
the sign is positive = removing the set increases the test loss, so a good estimator has LDS near 1.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from .problem import Problem
from .respond import respond
from .stats import spearman

__all__ = ["subsets", "retrain", "lds", "group_scores", "random_scores"]


def subsets(n_train: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> list[list[int]]:
    """``n_subsets`` removal sets, each the complement of a random subset of ``round(α N)`` points.

    Raises:
        ValueError: ``α`` outside (0, 1) or a subset that would keep or remove nothing.
    """
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(
            f"lds: alpha (the fraction of training points kept) must lie in (0, 1), got {alpha!r}."
        )
    if not (isinstance(n_subsets, int) and n_subsets >= 2):
        raise ValueError(f"lds: need at least 2 subsets for a rank correlation, got {n_subsets!r}.")
    keep = round(alpha * n_train)
    if not 0 < keep < n_train:
        raise ValueError(
            f"lds: alpha={alpha} keeps {keep} of {n_train} points; choose alpha so both parts "
            "are non-empty."
        )
    rng = np.random.default_rng([int(seed), 3])
    out = []
    for _ in range(n_subsets):
        kept = rng.choice(n_train, size=keep, replace=False)
        mask = np.ones(n_train, dtype=bool)
        mask[kept] = False
        out.append([int(i) for i in np.flatnonzero(mask)])
    return out


def retrain(
    problem: Problem,
    test: tuple,
    groups: list[list[int]],
    recipe,
    seeds=(0,),
    model_init=None,
    chunk_size: int = 16,
    progress: bool = False,
    measure: Problem | None = None,
    per_seed: bool = False,
) -> tuple:
    """Retrain without each removal set (cold start, paired seeds); ``Δm`` ``[n_test, K]`` (the
    mean over seeds) and the per-subset diagnostics. ``measure``: the problem (e.g. its float64
    copy) on which Δm is evaluated. ``per_seed``: also each seed's ``Δm``, ``[S, n_test, K]``.
    """
    resp = respond(
        problem,
        "cold",
        removals=groups,
        recipe=recipe,
        seeds=tuple(seeds),
        model_init=model_init,
        chunk_size=chunk_size,
        progress=progress,
    )
    if measure is not None:
        resp = resp.to(measure)
    dm = resp.loss_change(test=test).detach().cpu().double().numpy()
    diags = [d.to_dict() for d in resp.diagnostics]
    if per_seed:
        return dm, diags, resp.loss_change_per_seed(test).detach().cpu().double().numpy()
    return dm, diags


def group_scores(point_scores: np.ndarray | Tensor, groups: list[list[int]]) -> np.ndarray:
    """Summed scores of each group from per-point scores ``[n_test, N]`` → ``[n_test, K]``."""
    s = (
        point_scores.detach().cpu().double().numpy()
        if isinstance(point_scores, Tensor)
        else np.asarray(point_scores)
    )
    return np.stack([s[:, g].sum(axis=1) for g in groups], axis=1)


def lds(scores: np.ndarray, actual: np.ndarray) -> dict:
    """LDS of group scores ``[n_test, K]`` against the retrained ``Δm`` ``[n_test, K]``.

    Returns ``{"lds", "stderr", "per_test", "n_test"}``: the mean over test points of the
    per-test Spearman correlation (test points where it is undefined are left out and counted).
    """
    scores, actual = np.asarray(scores, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if scores.shape != actual.shape:
        raise ValueError(
            f"lds: scores {scores.shape} and actual changes {actual.shape} must have the same "
            "shape."
        )
    per = np.array([spearman(scores[t], actual[t]) for t in range(scores.shape[0])])
    ok = np.isfinite(per)
    n = int(ok.sum())
    mean = float(per[ok].mean()) if n else math.nan
    se = float(per[ok].std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "lds": mean,
        "stderr": se,
        "per_test": per.tolist(),
        "n_test": n,
        "n_undefined": int((~ok).sum()),
    }


def random_scores(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Standard-normal scores: the chance baseline (LDS ≈ 0)."""
    return np.random.default_rng(seed).standard_normal(shape)
