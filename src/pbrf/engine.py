"""The batched first-order engine: K problems stacked and optimised as one (:func:`run_batched`).

Base training (:func:`pbrf.train`) and the first-order response functions (:func:`pbrf.respond`
with a :class:`pbrf.Recipe`) both run here, so a cold-start reference run with the same
initialisation and seed reproduces θ^s exactly. An objective is
``objective(params, aux, batch) -> value`` for one problem (``vmap``-ed over the K stacked
problems, ``aux`` holding each problem's own inputs, e.g. its removal weights); ``batch`` is what
:func:`batch_fn` returns for a minibatch of training indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.func import vmap

from .diagnostics import RemovalDiagnostics
from .optim import Recipe, optimize
from .problem import Params, Problem

__all__ = ["stack", "batch_fn", "full_eval", "run_batched", "chunks"]


def stack(params: Params, K: int) -> Params:
    """``K`` copies of ``params`` stacked along a new leading dimension."""
    return {k: v.unsqueeze(0).expand(K, *v.shape).clone() for k, v in params.items()}


def batch_fn(prob: Problem, f_ref: Tensor | None) -> Callable[[Tensor], dict]:
    """``idx -> {"idx", "x", "t"[, "f_ref"]}``: a minibatch of the training data."""

    def batch(idx: Tensor) -> dict:
        out = {"idx": idx, "x": prob.x[idx], "t": prob.t[idx]}
        if f_ref is not None:
            out["f_ref"] = f_ref[idx]
        return out

    return batch


def full_eval(objective, params: Params, aux: dict, prob: Problem, batch) -> tuple[Tensor, Tensor]:
    """Full-data objective and gradient norm ``[K]`` (weighted sum of chunk means: exact)."""
    vg = vmap(torch.func.grad_and_value(objective), in_dims=(0, 0, None))
    val, grads = 0.0, None
    for s in prob.chunks():
        idx = torch.arange(s.start, s.stop, device=prob.device)
        g, v = vg(params, aux, batch(idx))
        w = (s.stop - s.start) / prob.n_train
        val = val + w * v.detach()
        grads = {k: w * t for k,
                 t in g.items()} if grads is None else {k: grads[k] + w * g[k] for k in g}
    gn = sum(t.pow(2).reshape(t.shape[0], -1).sum(1) for t in grads.values()).sqrt()
    return val, gn


def run_batched(prob: Problem, objective, init: Params, aux: dict, recipe: Recipe, f_ref,
                progress: bool, desc: str,
                callback=None) -> tuple[Tensor, list[RemovalDiagnostics]]:
    """Optimise K stacked problems with a first-order ``recipe``; returns ``(θ [K, p],
    diagnostics)``.

    ``callback(step, params, lr)`` is called after every step (see :func:`pbrf.optim.optimize`).
    """
    batch = batch_fn(prob, f_ref)
    init_obj, init_gn = full_eval(objective, init, aux, prob, batch)
    params, diag = optimize(objective, init, aux, prob.n_train, recipe, batch, progress, desc,
                            callback)
    final_obj, final_gn = full_eval(objective, params, aux, prob, batch)
    # a finite run counts as diverged when its objective or gradient grew by orders of magnitude
    blown = (final_obj - init_obj > 1e3 * (init_obj.abs() + 1)) | (final_gn > 1e3 * (init_gn + 1))
    rows = [
        RemovalDiagnostics(
            steps=int(diag["steps"][k]),
            objective=float(final_obj[k]),
            grad_norm=float(final_gn[k]),
            last_minibatch_grad_norm=float(diag["grad_norm"][k]),
            initial_objective=float(init_obj[k]),
            diverged=bool(diag["diverged"][k])
            or not math.isfinite(float(final_obj[k]))
            or bool(blown[k]),
        )
        for k in range(final_obj.shape[0])
    ]
    return prob.flatten(params).detach(), rows


def chunks(K: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` out of ``range(K)``."""
    for s in range(0, K, chunk_size):
        yield slice(s, min(s + chunk_size, K))
