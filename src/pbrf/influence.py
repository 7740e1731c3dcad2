"""Influence functions: per-example gradients, influence scores and the parameter change Δθ.

Conventions (``docs/conventions.md`` §4): removing the set ``r`` changes the parameters by

    Δθ_IF(r) = (1/N) C⁻¹ Σ_{m∈r} ∇θ L(z_m, θ^s),          C = G + (wd + λ) I   (or ∇²J + λ I),

and a measurement ``m`` (default: the per-example test loss) by ``Δm_IF = ∇m(θ^s)ᵀ Δθ_IF``.
A positive score means that removing ``r`` *increases* the test loss. Scores are additive over
the points of a group.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vmap

from .curvature import Curvature, CurvatureOperator
from .problem import Problem
from .solvers import SolveInfo, SolverDivergedError, solve

__all__ = [
    "influence",
    "influence_with_info",
    "InfluenceResult",
    "delta_theta",
    "per_example_grads",
    "normalize_removals",
    "InfluenceInfo",
    "check_solve",
    "Measurement",
]

log = logging.getLogger(__name__)

Measurement = Callable[[Tensor, Tensor], Tensor]
"""``measurement(outputs [B, ...], targets [B, ...]) -> [B]``; default: the task's loss."""


@dataclass
class InfluenceInfo:
    """Diagnostics of :func:`influence`: the solve's :class:`SolveInfo` and the sizes involved."""

    solve: SolveInfo
    n_test: int
    n_removals: int
    n_points: int
    damping: float
    curvature: str


class InfluenceResult(NamedTuple):
    """Output of :func:`influence_with_info`: the scores ``[n_test, n_removals]`` and their
    diagnostics.
    """

    scores: Tensor
    info: InfluenceInfo


def _as_index(i, k: int) -> int:
    if (
        isinstance(i, Tensor)
        and i.dim() == 0
        and not i.is_floating_point()
        and i.dtype != torch.bool
    ):
        return int(i)
    if isinstance(i, numbers.Integral) and not isinstance(i, bool):
        return int(i)
    raise ValueError(f"removals[{k}]: indices must be integers, got {i!r}.")


def normalize_removals(removals, n_train: int) -> list[list[int]]:
    """Removal sets as a list of index lists.

    Accepts a 1-D LongTensor / sequence of ints (single points) or a sequence of index lists
    (groups). Raises ``ValueError`` naming the bad entry for out-of-range, empty or duplicate
    indices.
    """
    if hasattr(removals, "__array__") and not isinstance(removals, Tensor):
        removals = torch.as_tensor(removals)
    if isinstance(removals, Tensor):
        if removals.dim() != 1 or removals.is_floating_point():
            raise ValueError(
                "removals: pass a 1-D integer tensor (single points) or a list of index lists "
                "(groups), "
                f"got a tensor of shape {tuple(removals.shape)} and dtype {removals.dtype}."
            )
        removals = removals.tolist()
    if (
        isinstance(removals, (int, str, bytes))
        or not isinstance(removals, Sequence)
        or len(removals) == 0
    ):
        raise ValueError(
            "removals: pass a non-empty list of indices or of index lists, e.g. [0, "
            "5] or [[0, 1], [2]]."
        )
    groups = []
    for k, r in enumerate(removals):
        if isinstance(r, numbers.Integral) or (isinstance(r, Tensor) and r.dim() == 0):
            g = [_as_index(r, k)]
        elif isinstance(r, (Sequence, Tensor)) and not isinstance(r, (str, bytes)):
            g = [_as_index(i, k) for i in r]
        else:
            raise ValueError(
                f"removals[{k}] must be an integer index or a list of integer indices, got {r!r}."
            )
        if not g:
            raise ValueError(
                f"removals[{k}] is an empty group; every removal set needs at least one index."
            )
        bad = [i for i in g if not 0 <= i < n_train]
        if bad:
            raise ValueError(
                f"removals[{k}] contains index {bad[0]} outside the training set of {n_train} "
                "points "
                f"(valid: 0..{n_train - 1})."
            )
        if len(set(g)) != len(g):
            raise ValueError(f"removals[{k}] repeats an index; each point can be removed once.")
        groups.append(g)
    return groups


def removal_matrix(
    groups: list[list[int]], device=None, dtype=torch.float64
) -> tuple[Tensor, Tensor]:
    """``(unique [u], R [u, K])`` with ``R[j, k] = 1`` when ``unique[j] ∈ groups[k]``."""
    unique = sorted({i for g in groups for i in g})
    pos = {i: j for j, i in enumerate(unique)}
    R = torch.zeros(len(unique), len(groups), dtype=dtype)  # filled on the CPU, moved once
    for k, g in enumerate(groups):
        R[[pos[i] for i in g], k] = 1.0
    return torch.tensor(unique, dtype=torch.long, device=device), R.to(device)


def per_example_grads(
    prob: Problem,
    x: Tensor,
    t: Tensor,
    measurement: Measurement | None = None,
    theta: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example gradients ``∇θ m(z_i)`` as rows ``[B, p]`` (``vmap(grad)``, chunked).

    ``measurement`` defaults to the task loss, so ``∇θ L(z_i, θ)``.
    """
    theta = prob.theta if theta is None else theta
    meas = prob.task.loss if measurement is None else measurement

    def one(th: Tensor, xi: Tensor, ti: Tensor) -> Tensor:
        return meas(prob.outputs_flat(th, xi.unsqueeze(0)), ti.unsqueeze(0)).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0))
    return torch.cat([g(theta, x[s], t[s]) for s in prob.chunks(x.shape[0], chunk_size)])


def _check_damping(damping) -> float:
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0 (e.g. 1e-3), got {damping!r}.")
    return float(damping)


def check_solve(X: Tensor, info: SolveInfo) -> tuple[Tensor, SolveInfo]:
    """A solve's result as influence takes it: ``SolverDivergedError`` when it diverged, a logged
    warning when it stopped above its tolerance.
    """
    if info.diverged:
        raise SolverDivergedError(
            f"{info.solver} solve failed: {info.message}. Diagnostics: {info.to_dict()}"
        )
    if not info.converged:
        log.warning("%s solve did not reach its tolerance: relative residual %.3g", info.solver,
                    info.residual)
    return X, info


def _solve_or_raise(
    op: CurvatureOperator, B: Tensor, solver: str, options: dict | None
) -> tuple[Tensor, SolveInfo]:
    return check_solve(*solve(op, B, solver, **(options or {})))


def influence(
    prob: Problem,
    test: tuple[Tensor, Tensor | None],
    removals,
    damping: float = 1e-2,
    solver: str = "exact",
    curvature: str | Curvature = "ggn",
    solver_options: dict | None = None,
    measurement: Measurement | None = None,
    return_info: bool = False,
):
    """Influence of removing each set in ``removals`` on each test measurement.

    ``scores[t, k] = (1/N) ∇m_tᵀ C⁻¹ Σ_{m ∈ r_k} ∇θ L(z_m, θ^s)``; positive means removing ``r_k``
    increases test measurement ``t`` (by default its loss). One solve per test point
    (``C s_t = ∇m_t``), then inner products with the removed points' gradients, so scoring all
    N training points costs N gradients, not N solves.

    Args:
        prob: the :class:`~pbrf.Problem`.
        test: ``(x_test, y_test)``.
        removals: 1-D LongTensor / list of ints (single points) or list of index lists (groups).
        damping: λ ≥ 0 in ``C = G + (wd + λ) I``.
        solver: ``"exact"``, ``"cg"`` or ``"lissa"`` (options in ``solver_options``).
        curvature: ``"ggn"`` (Gauss–Newton), ``"hessian"``, or an outside operator following the
            :class:`pbrf.curvature.Curvature` protocol (``op @ v``; ``C = op + (wd + λ) I``).
        measurement: ``f(outputs, targets) -> [B]`` to measure instead of the test loss.
        return_info: deprecated; use :func:`influence_with_info`.

    Returns:
        Tensor ``[n_test, n_removals]``.

    Raises:
        SolverDivergedError: the solver diverged (e.g. LiSSA with too small a scale).
    """
    result = _influence(
        prob, test, removals, damping, solver, curvature, solver_options, measurement
    )
    if return_info:
        warnings.warn(
            "influence(..., return_info=True) is deprecated; use "
            "pbrf.influence_with_info(...), "
            "which returns (scores, info).",
            DeprecationWarning,
            stacklevel=2,
        )
        return result
    return result.scores


def influence_with_info(
    prob: Problem, test: tuple[Tensor, Tensor | None], removals, **settings
) -> InfluenceResult:
    """:func:`influence` (the same arguments but ``return_info``) with its diagnostics: an
    :class:`InfluenceResult` ``(scores, info)``.
    """
    bound = inspect.signature(influence).bind(prob, test, removals, **settings)
    bound.apply_defaults()
    args = bound.arguments
    if args.pop("return_info"):
        raise TypeError("influence_with_info always returns the info; drop return_info.")
    return _influence(*args.values())


def _influence(
    prob, test, removals, damping, solver, curvature, solver_options, measurement
) -> InfluenceResult:
    damping = _check_damping(damping)
    groups = normalize_removals(removals, prob.n_train)
    xt, tt = prob.prepare(test, "test")
    op = CurvatureOperator(prob, curvature, damping)
    g_test = per_example_grads(prob, xt, tt, measurement)
    S, sinfo = _solve_or_raise(op, g_test, solver, solver_options)  # rows s_t = C⁻¹ ∇m_t
    unique, R = removal_matrix(groups, prob.device, prob.dtype)
    dots = torch.cat(
        [
            S @ per_example_grads(prob, prob.x[unique[s]], prob.t[unique[s]]).T
            for s in prob.chunks(len(unique))
        ],
        dim=1,
    )
    scores = dots @ R / prob.n_train
    return InfluenceResult(
        scores, InfluenceInfo(sinfo, xt.shape[0], len(groups), len(unique), damping, op.curvature)
    )


def removal_gradients(
    prob: Problem, groups: list[list[int]], theta: Tensor | None = None
) -> Tensor:
    """``Σ_{m ∈ r_k} ∇θ L(z_m)`` for every group, rows ``[K, p]``."""
    unique, R = removal_matrix(groups, prob.device, prob.dtype)
    grads = per_example_grads(prob, prob.x[unique], prob.t[unique], theta=theta)
    return R.T @ grads


def delta_theta(
    prob: Problem,
    removals,
    damping: float = 1e-2,
    solver: str = "exact",
    curvature: str | Curvature = "ggn",
    solver_options: dict | None = None,
    removal_weight: float = 1.0,
) -> tuple[Tensor, SolveInfo]:
    """Influence parameter change ``Δθ_IF(r_k) = (w/N) C⁻¹ Σ_{m∈r_k} ∇θ L(z_m, θ^s)`` for every set.

    ``w = removal_weight`` (1 = removing the points). Returns rows ``[n_removals, p]`` and the
    solve diagnostics (one solve per removal set). ``curvature`` as in :func:`influence`.
    """
    damping = _check_damping(damping)
    groups = normalize_removals(removals, prob.n_train)
    b = removal_gradients(prob, groups) * (removal_weight / prob.n_train)
    op = CurvatureOperator(prob, curvature, damping)
    return _solve_or_raise(op, b, solver, solver_options)
