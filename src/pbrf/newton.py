"""A batched second-order optimiser for the smooth response objectives (PBRF, proximal, warm start).

K removal problems are solved at once: a Levenberg–Marquardt trust-region method on the
Gauss–Newton model of each objective, with the inner linear systems solved by conjugate gradients
batched over the problems (one ``vmap``-ed Gauss–Newton–vector product for all active rows per CG
iteration), each problem stopping on its own. No dense matrix is ever formed; memory is linear in
``K · p``.

For an objective ``F(θ) = Σ_i φ_i(f(θ, x_i)) + c(θ) + (s/2)||θ − a||²`` (data term convex in the
outputs, plus the rest), the model at ``θ`` is

    m(d) = F(θ) + gᵀd + ½ dᵀ (G(θ) + s I) d,        G(θ) = Σ_i J_iᵀ ∇²φ_i J_i,

and each iteration solves ``(G + (s + μ) I) d = −g`` inexactly (relative residual ≤ ``η``), then
accepts or rejects ``θ + d`` by the ratio of actual to predicted reduction and adapts the
Levenberg–Marquardt parameter ``μ`` per problem. For the PBRF, ``G(θ^s) + (wd + λ) I`` is exactly
the damped curvature ``C`` of the influence estimate, so the first step from θ^s is the (GN)
linearised PBRF and the next ones correct its nonlinearity; the method converges to machine
precision in a handful of iterations. Terms that are not convex in the outputs (the PBRF's
``−(1/N) Σ_{m∈r} L(z_m, θ)``) enter the gradient and the objective but not the model.

Stopping: problem ``k`` stops when ``||∇F_k|| ≤ tol · scale_k`` (``scale_k`` is the removal's
own signal ``(1/N)||Σ_{m∈r} ∇L_m(θ^s)||``, see :mod:`pbrf.respond`), when ``max_iter`` is
reached, or when it stalls (``μ`` grown beyond any useful step). The certificate is computed by
the caller from the final gradient norm — never from the fact that the loop stopped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap
from tqdm.auto import tqdm

__all__ = ["NewtonRecipe", "NewtonOptions", "newton_optimize", "batched_cg", "MODELS"]

MODELS = ("auto", "gn", "hessian")


@dataclass(frozen=True)
class NewtonOptions:
    """The settings of :class:`NewtonRecipe` other than its budget, declared once:
    :class:`NewtonRecipe` and the experiment config's ``[responses]`` section
    (:class:`pbrf.experiment.config.ResponsesConfig`, whose ``steps`` is ``max_iter``) extend it.
    """

    cg_max_iter: int = 500
    tol: float = 1e-8
    forcing: float = 0.1
    model: str = "auto"
    switch: float = 1e-1


@dataclass(frozen=True)
class NewtonRecipe(NewtonOptions):
    """Settings of the batched Gauss–Newton trust-region optimiser (full batch).

    Args:
        max_iter: cap on outer (trust-region) iterations per problem.
        cg_max_iter: cap on CG iterations per outer iteration.
        tol: stop a problem once ``||∇F|| ≤ tol · scale`` (``scale`` = the removal's own signal).
        forcing: largest relative CG residual ``η`` accepted (it shrinks with the gradient,
            ``η = min(forcing, ||∇F|| / ||∇F(θ_0)||)``, for superlinear convergence).
        model: ``"auto"`` (the Gauss–Newton model while ``||∇F||`` is above ``switch`` times the
            larger of ``scale`` and the starting gradient norm, then exact
            Hessian–vector products for quadratic convergence, falling back to Gauss–Newton in an
            iteration where CG meets negative curvature), ``"gn"`` (Gauss–Newton only: positive
            semi-definite, about 2.5× cheaper per product, linear convergence when residuals are
            large) or ``"hessian"`` (exact Hessian only; negative curvature is met by growing μ).
        switch: see ``model="auto"``.
    """

    max_iter: int = 100

    def __post_init__(self) -> None:
        for name in ("max_iter", "cg_max_iter"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"NewtonRecipe.{name} must be a positive int, got {v!r}.")
        if not (isinstance(self.tol,
                           (int, float)) and 0 < self.tol < 1 and math.isfinite(self.tol)):
            raise ValueError(f"NewtonRecipe.tol must lie in (0, 1), e.g. 1e-8; got {self.tol!r}.")
        if not (isinstance(self.forcing, (int, float)) and 0 < self.forcing < 1):
            raise ValueError("NewtonRecipe.forcing must lie in (0, 1), e.g. 0.1; got "
                             f"{self.forcing!r}.")
        if self.model not in MODELS:
            raise ValueError(f"NewtonRecipe.model must be one of {MODELS}, got {self.model!r}.")

    # the same small interface as pbrf.Recipe, so respond(**changes) works for both
    batch_size = None
    optimizer = "newton"

    def replace(self, **changes) -> "NewtonRecipe":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


def _rows_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(1)


def batched_cg(
    matvec: Callable[[Tensor, Tensor], Tensor],
    B: Tensor,
    atol: Tensor,
    max_iter: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Conjugate gradients for K independent SPD systems ``A_k x_k = b_k`` at once.

    Args:
        matvec: ``(rows, V) -> A_rows V`` for the systems ``rows`` (a LongTensor) and vectors ``V``.
        B: right-hand sides ``[K, p]``.
        atol: per-system absolute residual tolerance ``[K]``.
        max_iter: iteration cap.

    Returns:
        ``(X, R, iters, negative)``: solutions, recursive residuals ``B − A X``, iterations per
        system, and whether it met a non-positive curvature direction (it stops where it is).
    """
    K = B.shape[0]
    X, R = torch.zeros_like(B), B.clone()
    P, rs = R.clone(), _rows_dot(R, R)
    iters = torch.zeros(K, dtype=torch.long, device=B.device)
    negative = torch.zeros(K, dtype=torch.bool, device=B.device)
    active = rs.sqrt() > atol
    for _ in range(max_iter):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        AP = matvec(rows, P[rows])
        pAp = _rows_dot(P[rows], AP)
        ok = pAp > 0
        negative[rows] |= ~ok
        alpha = torch.where(ok, rs[rows] / torch.where(ok, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(pAp))
        X[rows] += alpha[:, None] * P[rows]
        R[rows] -= alpha[:, None] * AP
        rs_new = _rows_dot(R[rows], R[rows])
        P[rows] = R[rows] + (rs_new / rs[rows])[:, None] * P[rows]
        rs[rows] = rs_new
        iters[rows] += 1
        still = ok & (rs_new.sqrt() > atol[rows]) & torch.isfinite(rs_new)
        active[rows] = still
    return X, R, iters, negative


class _Batched:
    """Full-batch value, gradient and Gauss–Newton products of K stacked flat problems."""

    def __init__(self, prob, value_fn, gn_fn, aux: dict, batch_fn) -> None:
        self.prob, self.aux, self.batch_fn = prob, aux, batch_fn
        self._vg = vmap(grad_and_value(lambda th, a, b: value_fn(prob.unflatten(th), a, b)),
                        in_dims=(0, 0, None))

        def gn_one(th: Tensor, v: Tensor, a: dict, b: dict) -> Tensor:
            f = lambda t: prob.outputs(prob.unflatten(t), b["x"])  # noqa: E731
            out, jv = jvp(f, (th,), (v,))
            hjv = jvp(grad(lambda o: gn_fn(o, a, b)), (out,), (jv,))[1]
            return vjp(f, th)[1](hjv)[0]

        self._gn = vmap(gn_one, in_dims=(0, 0, 0, None))

        def hvp_one(th: Tensor, v: Tensor, a: dict, b: dict) -> Tensor:
            return jvp(grad(lambda t: value_fn(prob.unflatten(t), a, b)), (th,), (v,))[1]

        self._hvp = vmap(hvp_one, in_dims=(0, 0, 0, None))

    def _sub(self, rows: Tensor) -> dict:
        return {k: v[rows] for k, v in self.aux.items()}

    def _over_data(self, fn):
        prob, total = self.prob, None
        for s in prob.chunks():
            idx = torch.arange(s.start, s.stop, device=prob.device)
            w = (s.stop - s.start) / prob.n_train
            part = fn(self.batch_fn(idx))
            part = tuple(w * p for p in part)
            total = part if total is None else tuple(t + p for t, p in zip(total, part))
        return total

    def value_grad(self, rows: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(F [k], ∇F [k, p])`` for the problems ``rows`` at ``theta [k, p]``."""
        aux = self._sub(rows)
        g, v = self._over_data(lambda b: self._vg(theta, aux, b))
        return v.detach(), g.detach()

    def gn(self, rows: Tensor, theta: Tensor, V: Tensor) -> Tensor:
        """Gauss–Newton products of the data term ``G(θ_k) v_k`` (each chunk a mean, weighted)."""
        aux = self._sub(rows)
        (out,) = self._over_data(lambda b: (self._gn(theta, V, aux, b),))
        return out.detach()

    def hvp(self, rows: Tensor, theta: Tensor, V: Tensor) -> Tensor:
        """Exact Hessian products of the whole objective ``∇²F(θ_k) v_k`` (penalties included)."""
        aux = self._sub(rows)
        (out,) = self._over_data(lambda b: (self._hvp(theta, V, aux, b),))
        return out.detach()


def newton_optimize(
    prob,
    value_fn: Callable,
    gn_fn: Callable,
    shift: float,
    theta0: Tensor,
    aux: dict,
    scale: Tensor,
    recipe: NewtonRecipe,
    batch_fn: Callable,
    progress: bool = True,
    desc: str = "newton",
    exact_from_start: bool = False,
) -> tuple[Tensor, dict]:
    """Minimise K objectives ``value_fn(params_k, aux_k, batch)`` from ``theta0 [K, p]``.

    Args:
        prob: the :class:`~pbrf.Problem` (data, chunks, parameter layout).
        value_fn: objective of ONE problem on one chunk, normalised as a mean over the chunk
            (the full-data value is the size-weighted sum over chunks).
        gn_fn: ``(outputs, aux_k, batch) -> scalar``: the part of ``value_fn``'s data term that is
            convex in the outputs (its output Hessian defines the Gauss–Newton model).
        shift: the coefficient ``s`` of the quadratic terms in θ (``(s/2)||θ − a||²`` and
            ``(wd/2)||θ||²`` together), added to the model as ``s I``.
        theta0: start ``[K, p]``.
        aux: per-problem tensors ``[K, ...]``.
        scale: ``[K]`` gradient-norm scale of each problem (its removal signal); the stopping
            tolerance is ``recipe.tol · scale``.
        recipe: :class:`NewtonRecipe`.
        batch_fn: chunk indices → batch dict.
        exact_from_start: with ``model="auto"``, use the exact Hessian from the first iteration
            (for starts already near the optimum, e.g. the no-removal continuation).

    Returns:
        ``(theta [K, p], diagnostics)`` with ``[K]`` tensors ``steps`` (accepted steps),
        ``iterations``, ``cg_iterations`` (total), ``objective``, ``grad_norm``,
        ``initial_objective``, ``initial_grad_norm``, ``stalled``, ``runaway`` (the gradient grew
        100-fold along accepted descent steps: no minimum near the start) and ``diverged``
        (non-finite, or runaway).
    """
    K = theta0.shape[0]
    dev, dt = theta0.device, theta0.dtype
    B = _Batched(prob, value_fn, gn_fn, aux, batch_fn)
    every = torch.arange(K, device=dev)
    theta = theta0.detach().clone()
    F, g = B.value_grad(every, theta)
    F0, gn0 = F.clone(), g.norm(dim=1)
    atol = recipe.tol * scale.to(dt)
    mu = torch.zeros(K, dtype=dt, device=dev)
    active = torch.isfinite(F) & torch.isfinite(gn0)
    diverged = ~active.clone()
    stalled = torch.zeros(K, dtype=torch.bool, device=dev)
    steps = torch.zeros(K, dtype=torch.long, device=dev)
    iters = torch.zeros(K, dtype=torch.long, device=dev)
    cg_total = torch.zeros(K, dtype=torch.long, device=dev)
    best = gn0.clone()
    idle = torch.zeros(K, dtype=torch.long, device=dev)
    at_roundoff = torch.full((K,), bool(exact_from_start), dtype=torch.bool, device=dev)
    runaway = torch.zeros(K, dtype=torch.bool, device=dev)
    eps = torch.finfo(dt).eps
    bar = tqdm(total=recipe.max_iter, desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for _ in range(recipe.max_iter):
        gnorm = g.norm(dim=1)
        active &= gnorm > atol
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        bar.update()
        th, gr, m = theta[rows], g[rows], mu[rows]
        eta = (gnorm[rows] / gn0[rows].clamp_min(torch.finfo(dt).tiny)).clamp(max=recipe.forcing)
        # exact Hessian near the optimum: a small gradient, or steps below the objective's round-off
        # (where only the gradient can judge a step, and only the exact model reduces it reliably)
        switch_at = recipe.switch * torch.maximum(scale[rows].to(dt), gn0[rows])
        near = (gnorm[rows] <= switch_at) | at_roundoff[rows]
        d, Ad, ci = _step(B, recipe.model, shift, rows, th, gr, m, eta * gnorm[rows],
                          recipe.cg_max_iter, near)
        cg_total[rows] += ci
        iters[rows] += 1
        pred = -(_rows_dot(gr, d) + 0.5 * _rows_dot(d, Ad))
        F_new, g_new = B.value_grad(rows, th + d)
        actual = F[rows] - F_new
        ratio = actual / pred.clamp_min(torch.finfo(dt).tiny)
        finite = torch.isfinite(F_new) & torch.isfinite(g_new).all(1)
        # reductions below the round-off of F cannot be tested by the ratio: accept on the gradient
        untestable = pred.abs() <= 1e3 * eps * (F[rows].abs() + F_new.abs().nan_to_num(0.0) + eps)
        better_g = g_new.norm(dim=1) < gnorm[rows]
        at_roundoff[rows] |= untestable
        accept = finite & (pred > 0) & ((ratio > 1e-4) | (untestable & better_g))
        dd = _rows_dot(d, d).clamp_min(torch.finfo(dt).tiny)
        curv = (_rows_dot(d, Ad) / dd).clamp_min(shift if shift > 0 else torch.finfo(dt).tiny)
        grow = ~accept | (ratio < 0.25) & ~untestable
        shrink = accept & ((ratio > 0.75) | untestable)
        m_new = torch.where(grow, torch.maximum(4 * m, 0.1 * curv), m)
        m_new = torch.where(shrink, m_new / 3, m_new)
        m_new = torch.where(m_new < 1e-6 * curv, torch.zeros_like(m_new), m_new)
        theta[rows] = torch.where(accept[:, None], th + d, th)
        F[rows] = torch.where(accept, F_new, F[rows])
        g[rows] = torch.where(accept[:, None], g_new, gr)
        mu[rows] = m_new
        steps[rows] += accept.long()
        # stalled: the trust region has shrunk to nothing (μ ≫ the curvature), or the gradient norm
        # has not halved in 3 iterations while the steps are below the objective's round-off
        gbest = torch.minimum(best[rows], g[rows].norm(dim=1))
        halved = gbest < 0.5 * best[rows]
        best[rows] = torch.where(halved, gbest, best[rows])
        idle[rows] = torch.where(halved, torch.zeros_like(idle[rows]), idle[rows] + 1)
        stuck = (~accept & (m_new > 1e10 * curv)) | ((idle[rows] >= 3) & untestable)
        stalled[rows] |= stuck
        # runaway: accepted descent steps while the gradient grows by orders of magnitude — the
        # objective has no minimum near the start (e.g. a PBRF whose removed point's curvature
        # exceeds wd + λ); the response is treated as diverged
        away = g[rows].norm(dim=1) > 1e2 * torch.maximum(gn0[rows], scale[rows].to(dt))
        runaway[rows] |= away
        active[rows] &= ~(stuck | away)
    bar.close()
    gnorm = g.norm(dim=1)
    diverged |= ~torch.isfinite(F) | ~torch.isfinite(gnorm) | runaway
    diag = {
        "steps": steps, "iterations": iters, "cg_iterations": cg_total, "objective": F,
            "grad_norm": gnorm,
        "initial_objective": F0, "initial_grad_norm": gn0, "stalled": stalled, "runaway": runaway,
        "diverged": diverged,
    }
    return theta, diag


def _step(B: _Batched, model: str, shift: float, rows, th, gr, m, atol, max_iter, near):
    """The trust-region step ``d`` of every row and its model product ``A d`` (``A`` without μ).

    ``model="auto"``: exact Hessian for the rows ``near`` the optimum, Gauss–Newton for the others
    and for rows whose Hessian CG meets negative curvature (positive definite with the shift).
    """

    def solve(use_hessian: bool, sel: Tensor):
        add = 0.0 if use_hessian else shift
        prod = B.hvp if use_hessian else B.gn

        def mv(sub: Tensor, V: Tensor) -> Tensor:
            return prod(rows[sel[sub]], th[sel[sub]], V) + (add + m[sel[sub]])[:, None] * V

        d, r, ci, neg = batched_cg(mv, -gr[sel], atol[sel], max_iter)
        return d, -gr[sel] - r - m[sel, None] * d, ci, neg

    every = torch.arange(rows.numel(), device=th.device)
    if model == "gn":
        d, Ad, ci, _ = solve(False, every)
        return d, Ad, ci
    if model == "hessian":
        d, Ad, ci, _ = solve(True, every)
        return d, Ad, ci
    d, Ad = torch.zeros_like(gr), torch.zeros_like(gr)
    ci = torch.zeros(rows.numel(), dtype=torch.long, device=th.device)
    use_gn = ~near
    if bool(near.any()):
        sel = near.nonzero().squeeze(1)
        d[sel], Ad[sel], ci[sel], neg = solve(True, sel)
        use_gn[sel[neg]] = True
    if bool(use_gn.any()):
        sel = use_gn.nonzero().squeeze(1)
        d2, Ad2, ci2, _ = solve(False, sel)
        d[sel], Ad[sel], ci[sel] = d2, Ad2, ci[sel] + ci2
    return d, Ad, ci
