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


@dataclass
class _NewtonState:
    """The per-row state of K problems solved together (every field ``[K]`` or ``[K, p]``).

    Attributes:
        theta, F, g: current parameters, objective and gradient.
        F0, gn0: objective and gradient norm at the start.
        scale, atol: each problem's gradient scale (its removal signal) and stopping tolerance.
        mu: the Levenberg–Marquardt parameter.
        best, idle: the smallest gradient norm seen, and iterations since it last halved.
        active: still iterating; at_roundoff: steps fell below the objective's round-off.
        diverged, stalled, runaway: the flags of the diagnostics.
        steps, iterations, cg_iterations: accepted steps, outer and CG iterations.
    """

    theta: Tensor
    F: Tensor
    g: Tensor
    F0: Tensor
    gn0: Tensor
    scale: Tensor
    atol: Tensor
    mu: Tensor
    best: Tensor
    idle: Tensor
    active: Tensor
    at_roundoff: Tensor
    diverged: Tensor
    stalled: Tensor
    runaway: Tensor
    steps: Tensor
    iterations: Tensor
    cg_iterations: Tensor

    @classmethod
    def start(cls, B: _Batched, theta0: Tensor, scale: Tensor, tol: float,
              exact_from_start: bool) -> _NewtonState:
        """The state at ``theta0`` (objective and gradient evaluated there)."""
        K, dev, dt = theta0.shape[0], theta0.device, theta0.dtype
        theta = theta0.detach().clone()
        F, g = B.value_grad(torch.arange(K, device=dev), theta)
        gn0 = g.norm(dim=1)
        active = torch.isfinite(F) & torch.isfinite(gn0)

        def zeros(dtype):
            return torch.zeros(K, dtype=dtype, device=dev)

        return cls(theta=theta, F=F, g=g, F0=F.clone(), gn0=gn0, scale=scale,
                   atol=tol * scale.to(dt), mu=zeros(dt), best=gn0.clone(),
                   idle=zeros(torch.long), active=active,
                   at_roundoff=torch.full((K,), bool(exact_from_start), dtype=torch.bool,
                                          device=dev),
                   diverged=~active.clone(), stalled=zeros(torch.bool),
                   runaway=zeros(torch.bool), steps=zeros(torch.long),
                   iterations=zeros(torch.long), cg_iterations=zeros(torch.long))

    def rows_to_go(self) -> tuple[Tensor, Tensor]:
        """``(rows, gradient norms [K])``: the problems still active once those whose gradient
        is within tolerance stop.
        """
        gnorm = self.g.norm(dim=1)
        self.active &= gnorm > self.atol
        return self.active.nonzero().squeeze(1), gnorm

    def take(self, rows: Tensor, accept: Tensor, d: Tensor, F_new: Tensor, g_new: Tensor,
             mu: Tensor) -> None:
        """Move the ``accept``-ed rows by ``d`` (objective ``F_new``, gradient ``g_new``); set the
        new μ of every row.
        """
        th, gr = self.theta[rows], self.g[rows]
        self.theta[rows] = torch.where(accept[:, None], th + d, th)
        self.F[rows] = torch.where(accept, F_new, self.F[rows])
        self.g[rows] = torch.where(accept[:, None], g_new, gr)
        self.mu[rows] = mu
        self.steps[rows] += accept.long()

    def watch(self, rows: Tensor, accept: Tensor, mu: Tensor, curv: Tensor,
              untestable: Tensor) -> None:
        """Stop the rows that stalled or ran away.

        Stalled: the trust region has shrunk to nothing (μ ≫ the curvature), or the gradient norm
        has not halved in 3 iterations while the steps are below the objective's round-off.
        Runaway: accepted descent steps while the gradient grows by orders of magnitude — the
        objective has no minimum near the start (e.g. a PBRF whose removed point's curvature
        exceeds wd + λ); the response is treated as diverged.
        """
        gbest = torch.minimum(self.best[rows], self.g[rows].norm(dim=1))
        halved = gbest < 0.5 * self.best[rows]
        self.best[rows] = torch.where(halved, gbest, self.best[rows])
        self.idle[rows] = torch.where(halved, torch.zeros_like(self.idle[rows]),
                                      self.idle[rows] + 1)
        stuck = (~accept & (mu > 1e10 * curv)) | ((self.idle[rows] >= 3) & untestable)
        self.stalled[rows] |= stuck
        dt = self.theta.dtype
        away = self.g[rows].norm(dim=1) > 1e2 * torch.maximum(self.gn0[rows],
                                                              self.scale[rows].to(dt))
        self.runaway[rows] |= away
        self.active[rows] &= ~(stuck | away)

    def diagnostics(self) -> dict[str, Tensor]:
        """The ``[K]`` diagnostics of :func:`newton_optimize`."""
        gnorm = self.g.norm(dim=1)
        diverged = (self.diverged | ~torch.isfinite(self.F) | ~torch.isfinite(gnorm)
                    | self.runaway)
        return {"steps": self.steps, "iterations": self.iterations,
                "cg_iterations": self.cg_iterations, "objective": self.F, "grad_norm": gnorm,
                "initial_objective": self.F0, "initial_grad_norm": self.gn0,
                "stalled": self.stalled, "runaway": self.runaway, "diverged": diverged}


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
    B = _Batched(prob, value_fn, gn_fn, aux, batch_fn)
    state = _NewtonState.start(B, theta0, scale, recipe.tol, exact_from_start)
    bar = tqdm(total=recipe.max_iter, desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for _ in range(recipe.max_iter):
        rows, gnorm = state.rows_to_go()
        if rows.numel() == 0:
            break
        bar.update()
        _iterate(B, recipe, shift, state, rows, gnorm[rows])
    bar.close()
    return state.theta, state.diagnostics()


def _iterate(B: _Batched, recipe: NewtonRecipe, shift: float, st: _NewtonState, rows: Tensor,
             gn: Tensor) -> None:
    """One trust-region iteration of the problems ``rows`` (gradient norms ``gn``)."""
    dt = st.theta.dtype
    tiny = torch.finfo(dt).tiny
    th, gr, m = st.theta[rows], st.g[rows], st.mu[rows]
    eta = (gn / st.gn0[rows].clamp_min(tiny)).clamp(max=recipe.forcing)
    # exact Hessian near the optimum: a small gradient, or steps below the objective's round-off
    # (where only the gradient can judge a step, and only the exact model reduces it reliably)
    switch_at = recipe.switch * torch.maximum(st.scale[rows].to(dt), st.gn0[rows])
    near = (gn <= switch_at) | st.at_roundoff[rows]
    d, Ad, ci = _step(B, recipe.model, shift, rows, th, gr, m, eta * gn, recipe.cg_max_iter, near)
    st.cg_iterations[rows] += ci
    st.iterations[rows] += 1
    pred = -(_rows_dot(gr, d) + 0.5 * _rows_dot(d, Ad))
    F_new, g_new = B.value_grad(rows, th + d)
    accept, ratio, untestable = _judge(st.F[rows], gn, pred, F_new, g_new)
    st.at_roundoff[rows] |= untestable
    dd = _rows_dot(d, d).clamp_min(tiny)
    curv = (_rows_dot(d, Ad) / dd).clamp_min(shift if shift > 0 else tiny)
    mu = _next_mu(m, accept, ratio, untestable, curv)
    st.take(rows, accept, d, F_new, g_new, mu)
    st.watch(rows, accept, mu, curv, untestable)


def _judge(F: Tensor, gn: Tensor, pred: Tensor, F_new: Tensor,
           g_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(accept, ratio, untestable)`` of a step from objective ``F`` (gradient norm ``gn``) with
    predicted reduction ``pred`` to ``F_new`` (gradient ``g_new``).

    Reductions below the round-off of F cannot be tested by the ratio of actual to predicted
    reduction (``untestable``): such a step is accepted when it reduces the gradient norm.
    """
    dt = F.dtype
    eps = torch.finfo(dt).eps
    actual = F - F_new
    ratio = actual / pred.clamp_min(torch.finfo(dt).tiny)
    finite = torch.isfinite(F_new) & torch.isfinite(g_new).all(1)
    untestable = pred.abs() <= 1e3 * eps * (F.abs() + F_new.abs().nan_to_num(0.0) + eps)
    better_g = g_new.norm(dim=1) < gn
    accept = finite & (pred > 0) & ((ratio > 1e-4) | (untestable & better_g))
    return accept, ratio, untestable


def _next_mu(m: Tensor, accept: Tensor, ratio: Tensor, untestable: Tensor,
             curv: Tensor) -> Tensor:
    """The Levenberg–Marquardt update: grow μ after a rejected or poor step, shrink it after a
    very good one, and drop it once it is negligible against the curvature ``curv`` along the
    step.
    """
    grow = ~accept | (ratio < 0.25) & ~untestable
    shrink = accept & ((ratio > 0.75) | untestable)
    m_new = torch.where(grow, torch.maximum(4 * m, 0.1 * curv), m)
    m_new = torch.where(shrink, m_new / 3, m_new)
    return torch.where(m_new < 1e-6 * curv, torch.zeros_like(m_new), m_new)


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
