"""The objectives of the optimised response functions, for K removal problems at once.

An :class:`Objective` bundles what the engines need for one response kind (see
``docs/conventions.md`` §5 for the formulas): the objective of one problem
``value(params, aux, batch)``; its output-convex data term ``gn(out, aux, batch)`` (the
Gauss–Newton model of :mod:`pbrf.newton`); the ``shift`` of its quadratic term; ``make_aux(prob,
groups, weight)``, the per-problem auxiliary inputs (removal weights, removed points); and
``f_ref``, reference outputs handed to every batch as ``batch["f_ref"]`` (or ``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .problem import Params, Problem

__all__ = [
    "Objective",
    "removal_term",
    "removal_objective",
    "removal_gn",
    "pbrf_objective",
    "pbrf_gn",
    "mask_aux",
    "removed_aux",
    "warm_objective",
    "proximal_objective",
    "pbrf_response_objective",
]


class Objective(NamedTuple):
    """What the engines need to optimise one response kind (module docstring)."""

    value: Callable
    gn: Callable
    shift: float
    make_aux: Callable[[Problem, list[list[int]], float], dict]
    f_ref: Tensor | None = None
    removal: Callable | None = None
    #: every removal row's objective is bounded below while ``removal_weight ≤ 1`` (the kept
    #: points' nonnegative losses plus quadratics): a long descent there reaches a minimum, so
    #: :mod:`pbrf.newton` never calls it a runaway. Not the PBRF: with the removed point's own
    #: Bregman term, its removal term is linear in that point's outputs, bounded by nothing but
    #: the quadratic.
    bounded: bool = False


def sq(params: Params, anchor: Params | None = None) -> Tensor:
    """``||θ||²`` or ``||θ − anchor||²`` over a parameter dict."""
    if anchor is None:
        return sum(p.pow(2).sum() for p in params.values())
    return sum((params[k] - anchor[k]).pow(2).sum() for k in params)


def removal_term(prob: Problem) -> Callable:
    """``−(1/N) Σ_{m∈r} v_m L(z_m, θ)``: the part of every built-in response objective that differs
    between removal problems (removed points ``aux["xr"]``, ``aux["tr"]``, weights ``aux["vr"]``,
    see :func:`removed_aux`); :mod:`pbrf.newton`'s shared model takes its exact Hessian per row.
    """
    n = prob.n_train

    def removal(params: Params, aux: dict) -> Tensor:
        return -(aux["vr"] * prob.losses(params, aux["xr"], aux["tr"])).sum() / n

    return removal


def removal_objective(prob: Problem, prox: float = 0.0) -> Callable:
    """``(1/B) Σ_batch w_i L_i + (wd/2)||θ||² [+ (prox/2)||θ − θ^s||²]`` with per-problem weights
    ``aux["w"]``.
    """
    wd, anchor = prob.weight_decay, prob.params

    def objective(params: Params, aux: dict, batch: dict) -> Tensor:
        losses = prob.losses(params, batch["x"], batch["t"])
        val = (aux["w"][batch["idx"]] * losses).sum() / losses.shape[0] + 0.5 * wd * sq(params)
        return val + 0.5 * prox * sq(params, anchor) if prox else val

    return objective


def removal_gn(prob: Problem) -> Callable:
    """The output-convex data term of :func:`removal_objective` (its Gauss–Newton model)."""

    def gn(out: Tensor, aux: dict, batch: dict) -> Tensor:
        return (aux["w"][batch["idx"]] * prob.task.loss(out, batch["t"])).sum() / out.shape[0]

    return gn


def pbrf_gn(prob: Problem) -> Callable:
    """The Gauss–Newton model's data term of :func:`pbrf_objective`: the mean Bregman divergence
    over the kept points. For the tasks' canonical losses the output Hessian of ``D_L(·, f^s)``
    equals that of ``L``, so at a removed point the Bregman and removal terms' curvatures cancel:
    weight ``1 − removal_weight`` (clamped at 0), as in the exact Gauss–Newton matrix.
    """

    def gn(out: Tensor, aux: dict, batch: dict) -> Tensor:
        w = aux["w"][batch["idx"]].clamp_min(0.0)
        return (w * prob.task.bregman(out, batch["f_ref"], batch["t"])).mean()

    return gn


def pbrf_objective(prob: Problem, damping: float) -> Callable:
    """The PBRF objective (``docs/conventions.md`` §5) for one problem; removed points in
    ``aux``.
    """
    n, shift, anchor = prob.n_train, prob.weight_decay + damping, prob.params

    def objective(params: Params, aux: dict, batch: dict) -> Tensor:
        div = prob.task.bregman(prob.outputs(params, batch["x"]), batch["f_ref"], batch["t"]).mean()
        removed = (aux["vr"] * prob.losses(params, aux["xr"], aux["tr"])).sum() / n
        return div - removed + 0.5 * shift * sq(params, anchor)

    return objective


def mask_aux(prob: Problem, groups: list[list[int]], weight: float) -> dict:
    """``{"w": [K, N]}``: weight ``1 − weight`` on each group's removed points, 1 elsewhere."""
    w = torch.ones(len(groups), prob.n_train, dtype=prob.dtype, device=prob.device)
    for k, g in enumerate(groups):
        w[k, g] = 1.0 - weight
    return {"w": w}


def removed_aux(prob: Problem, groups: list[list[int]], weight: float) -> dict:
    """:func:`mask_aux` plus the removed points themselves (``xr``, ``tr``, weights ``vr``,
    padded).
    """
    kmax = max(1, max(len(g) for g in groups))
    idx = torch.zeros(len(groups), kmax, dtype=torch.long, device=prob.device)
    valid = torch.zeros(len(groups), kmax, dtype=prob.dtype, device=prob.device)
    for k, g in enumerate(groups):
        idx[k, : len(g)] = torch.tensor(g, device=prob.device)
        valid[k, : len(g)] = weight
    return {"xr": prob.x[idx], "tr": prob.t[idx], "vr": valid, **mask_aux(prob, groups, weight)}


# ------------------------------------------------------------------ the built-in kinds' objectives
def warm_objective(prob: Problem, damping: float) -> Objective:
    """``J_{−r}(θ)`` (warm and cold start; ``damping`` unused)."""
    return Objective(removal_objective(prob), removal_gn(prob), prob.weight_decay, removed_aux,
                     removal=removal_term(prob), bounded=True)


def proximal_objective(prob: Problem, damping: float) -> Objective:
    """``J_{−r}(θ) + (λ/2)||θ − θ^s||²``."""
    return Objective(removal_objective(prob, damping), removal_gn(prob),
                     prob.weight_decay + damping, removed_aux, removal=removal_term(prob),
                     bounded=True)


def pbrf_response_objective(prob: Problem, damping: float) -> Objective:
    """The PBRF: mean Bregman divergence − removed losses + ((wd + λ)/2)||θ − θ^s||²."""
    return Objective(pbrf_objective(prob, damping), pbrf_gn(prob), prob.weight_decay + damping,
                     removed_aux, prob.train_outputs(), removal=removal_term(prob))
