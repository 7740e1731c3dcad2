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
``−(1/N) Σ_{m∈r} L(z_m, θ)``) enter the gradient and the objective but not that model.

The shared model (``model="shared"``, the default). The K objectives differ only in their removal
terms ``R_k(θ) = −(1/N) Σ_{m∈r_k} v_m L_m(θ)`` (``Objective.removal``). Every row starts on the
model ``S + ∇²R_k(θ_k) + μ I``: ``S`` is ONE curvature of the no-removal objective at the common
start θ_0 (its Gauss–Newton part at θ^s for the PBRF, where it is exact; its exact Hessian at the
continuation for proximal and warm start), applied to all rows' vectors with one shared forward
pass, and ``∇²R_k`` is each row's removed points' exact Hessian at its own θ_k (a few examples).
At θ^s this is the PBRF's exact Hessian. A row whose shared model fails twice to cut its gradient
4-fold (or meets negative curvature) continues on its own model (the ``"auto"`` rule below).

Precision and preconditioning: the model's products run in ``products`` (float32 by default, TF32
off), while the objective, the gradient and hence the certificate stay in the problem's dtype. A
row whose low-precision model stalls (near the optimum its round-off times the curvature's
condition number can exceed one, and steps stop cutting the gradient) is not stopped: it
continues on its own model with products in the problem's own dtype, as the engine before float32
products did, so float32 costs iterations, never a certificate.
Every CG solve is preconditioned by ``(U Λ Uᵀ + σ_k I)⁻¹``, a rank-``precondition`` Nyström sketch
of the Gauss–Newton curvature at θ_0 (one block of shared products, reused by every chunk from the
same start) with each row's shift ``σ_k = s + μ_k``.

Stopping: problem ``k`` stops when ``||∇F_k|| ≤ tol · scale_k`` (``scale_k`` is the removal's
own signal ``(1/N)||Σ_{m∈r} ∇L_m(θ^s)||``, see :mod:`pbrf.respond`) or the gradient's
round-off floor (``grad_floor``), when ``max_iter`` is reached, or when it stalls (``μ`` grown
beyond any useful step). The certificate is computed by the caller from the final gradient norm —
never from the fact that the loop stopped.

Warm-up (``warmup``, off by default): a problem that starts far from its optimum (the no-removal
continuation of the proximal response from an unconverged θ^s) can first descend with full-batch
L-BFGS (:func:`descend`) on gradients alone, Newton then converging from close by. On a
non-convex objective that path may end at another local minimum than Newton's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap
from tqdm.auto import tqdm

from . import jacobian

__all__ = ["NewtonRecipe", "NewtonOptions", "newton_optimize", "batched_cg", "MODELS",
           "PRODUCTS", "Batched", "Precision", "exact_matmul", "PRECONDITIONER_BYTES",
           "SKETCHES_KEPT", "fingerprint", "row_ways", "variant_names", "row_variants",
           "hessian_product", "Fastest",
           "FASTEST_MARGIN", "per_row", "descend", "DESCENT_TARGET", "RUNAWAY_IDLE", "KEEP_CUT"]

MODELS = ("shared", "auto", "gn", "hessian")
#: The most memory the preconditioner's basis may take (its rank is cut to fit: a big model gets a
#: smaller rank, hence more CG iterations, never a different answer).
PRECONDITIONER_BYTES = 2**29
#: The last Nyström sketches of each problem (weakly keyed: they go with the problem), reused by
#: the next call from the same start (the chunks of one ``respond``, and of a run, whose chunks
#: alternate the PBRF, from θ^s, and the proximal response, from its continuation) ...
_SKETCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: ... at most this many per problem (each at most :data:`PRECONDITIONER_BYTES`).
SKETCHES_KEPT = 2
#: Each problem's :class:`Fastest` choices (weakly keyed: they go with the problem) ...
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: ... the first variant within this factor of the fastest (per row and example, measured on
#: the first call): a choice timing noise does not flip. Measured (bench/bench_rows.py, 2
#: threads): ResNet-20 ×0.25's float32 Hessian products over 9 rows, 10.7 s per row and pass
#: vmapped, 2.3 looped, 2.0 looped reverse-over-reverse (the forward loop is kept); smooth LeNet
#: ×0.5, 0.071 vmapped; an MLP 64×2, 0.015 forward and 0.014 reverse (forward is kept).
FASTEST_MARGIN = 2.0
#: A row whose objective is not bounded below (a PBRF removal), whose gradient norm has not
#: halved in this many outer iterations and lies above its start, is a runaway: it descends
#: without nearing a stationary point. Measured (mnist-mlp quick, K = 64 PBRF removals,
#: λ = 1e-2): the 63 certified removals went at most 4 iterations without halving their gradient
#: norm (12 iterations in all at most); removal 32, never certified, went 61, its objective
#: falling 260-fold, and took 3,363 of the call's 5,748 CG products before its gradient had grown
#: 100-fold (the other runaway rule).
RUNAWAY_IDLE = 20
#: A preconditioned float32 CG solve whose residual norm has not halved in this many iterations has
#: stalled: it stops there, and where it ended within ``forcing`` of its right-hand side or
#: within its products' round-off (:func:`_coarse`) its row continues with products in the
#: problem's own dtype (``wide``; a one-row problem far from its optimum first gets a fresh
#: preconditioner, :func:`_refresh`). Measured on ResNet-20 ×0.25's quick θ^s (N = 1,000, λ = 1e-2,
#: 2 PBRF removals): four Newton iterations brought the gradients to 2e3-4e3 × their tolerance,
#: where the next exact-Hessian solves asked for relative residuals of 4e-5 and 2e-5; with float32
#: products the residuals wandered between 1.4e-3 and 7.5e-3 of the right-hand side from the 10th
#: iteration to the 60th (bound for ``cg_max_iter``, 500 products of ~1.8 s per row); with float64
#: products the same systems met their targets in 9 and 11 iterations. On the bfloat16 tiny-CNN case
#: of the tests (4 rows to 1e-12): 2,254 CG products and 109 outer iterations without the rule, 693
#: and 63 with 25, 470 and 57 with 15, 366 and 44 with 10, every row certified each time. Not
#: float64 solves or unpreconditioned ones: they may plateau that long on their conditioning.
CG_STALL = 10
#: ... unless that stalled solve's step was accepted and cut the gradient at least this much:
#: then the row keeps its float32 products, each outer iteration (its gradient in float64)
#: refining the truncated solves like iterative refinement. Measured on smooth LeNet ×0.5's
#: proximal continuation (N = 500, λ = 0.1, 2 threads, ``bench_certify``'s θ^s): 48 float32
#: iterations (850 products) to a gradient of 4e-7 of its size, then widened: 3 iterations and
#: 248 float64 products (168 s) to the round-off floor; keeping float32: 7 iterations and 232
#: float32 products (24 s), the same floor; the whole proximal call (continuation and 4 rows)
#: 385.7 s → 204.6 s, 4 of 4 certified by both, paired Δm 2.3e-8 apart. Unchanged where no
#: such stall occurs (LeNet's and ``mnist-mlp``'s PBRF: the same CG counts).
KEEP_CUT = 0.25
#: A Newton solve asks for a relative residual no smaller than ``OVERSOLVE · atol / ||∇F||``: the
#: forcing term ``||∇F|| / ||∇F(θ_0)||`` converges superlinearly but, one step from the
#: tolerance, asks for far more than that step needs. Measured on ResNet-20 ×0.25's quick θ^s
#: (λ = 1e-2, 8 PBRF removals): at 5-34 × their tolerance, five rows' last solves asked for
#: 1e-7 to 3e-7 and were still at 2e-5 to 4e-3 after 10 float64 products each;
#: 0.1 × atol needs 0.3% to 2%.
OVERSOLVE = 0.1
#: The dtype of the trust-region model's curvature products (the objective, the gradient and the
#: certificate are always in the problem's own dtype, float64 in a measured run).
PRODUCTS = ("float32", "float64")
#: :func:`descend` stops once the gradient norm has fallen this far below its start: measured on
#: smooth LeNet ×0.5 (N = 500, λ = 0.1), Newton from an L-BFGS point 1e-3 of the way down still
#: met negative curvature for 35 iterations and 1,103 CG products, from one 1e-5 of the way it
#: converged in a few; L-BFGS itself slows down on the way (200 evaluations to 1e-3, 400 to 1e-4,
#: 600-1,200 to 1e-5).
DESCENT_TARGET = 1e-4


@dataclass(frozen=True)
class NewtonOptions:
    """The settings of :class:`NewtonRecipe` other than its budget, declared once:
    :class:`NewtonRecipe` and the experiment config's ``[responses]`` section
    (:class:`pbrf.experiment.config.ResponsesConfig`, whose ``steps`` is ``max_iter``) extend it.
    """

    cg_max_iter: int = 500
    tol: float = 1e-8
    forcing: float = 0.1
    model: str = "shared"
    switch: float = 1.0
    products: str = "float32"
    precondition: int = 256
    warmup: int = 0


@dataclass(frozen=True)
class NewtonRecipe(NewtonOptions):
    """Settings of the batched Gauss–Newton trust-region optimiser (full batch).

    Args:
        max_iter: cap on outer (trust-region) iterations per problem.
        cg_max_iter: cap on CG iterations per outer iteration.
        tol: stop a problem once ``||∇F|| ≤ tol · scale`` (``scale`` = the removal's own signal).
        forcing: largest relative CG residual ``η`` accepted (it shrinks with the gradient,
            ``η = min(forcing, ||∇F|| / ||∇F(θ_0)||)``, for superlinear convergence).
        model: ``"shared"`` (the default: one curvature at the common start θ_0 shared by every
            row, plus each row's own removal term exactly — see the module docstring; a row whose
            shared model stops making fast progress continues with ``"auto"``), ``"auto"`` (each
            row's own Gauss–Newton model while ``||∇F||`` is above ``switch`` times the
            larger of ``scale`` and the starting gradient norm, then exact
            Hessian–vector products for quadratic convergence, falling back to Gauss–Newton in an
            iteration where CG meets negative curvature), ``"gn"`` (Gauss–Newton only: positive
            semi-definite, about 2.5× cheaper per product, linear convergence when residuals are
            large) or ``"hessian"`` (exact Hessian only; negative curvature is met by growing μ).
        switch: see ``model="auto"``; the default 1 uses the exact Hessian from the start
            (Gauss–Newton only where its CG meets negative curvature, or where the gradient grew
            above its start). Measured on smooth LeNet ×0.5, N = 500, K = 4 PBRF removals, 0.1
            (Gauss–Newton until the gradient fell 10-fold) took 13/11/4/4 own-model iterations,
            1 took 7/7/4/4: far from the optimum the Gauss–Newton model of the PBRF, which
            leaves out the removed point's curvature, predicted the objective poorly.
        products: dtype of the model's curvature products, ``"float32"`` (default; TF32 off on
            CUDA) or ``"float64"``. The objective, its gradient and so the certificate stay in the
            problem's dtype (float64 in a measured run): a less accurate model costs iterations,
            never the meaning of ρ.
        precondition: rank of the Nyström approximation of the Gauss–Newton curvature at the
            common start, built once per call from that many shared products, whose inverse
            (plus each row's shift) preconditions every CG solve; 0 turns it off. Cut to fit
            :data:`PRECONDITIONER_BYTES` for large models.
        warmup: the most full-batch L-BFGS evaluations (objective and gradient, the problem's
            dtype) spent on a problem that starts far from its optimum — the no-removal
            continuation of the proximal response and warm start, from an unconverged θ^s —
            before Newton takes over (:func:`descend`); 0 (the default) starts Newton at once.
            Off by default: on smooth LeNet ×0.5, N = 500, λ = 0.1, it brought the continuation
            to a different, higher local minimum (14% of the drift away), where the paired
            proximal Δm differed up to 3.3-fold, and the whole proximal call was no faster
            (395.7 s vs 371.6 s, ``bench/bench_continuation.py``): the continuation's answer
            depends on the path, and Newton's is the one every earlier number used.
    """

    max_iter: int = 100

    def __post_init__(self) -> None:
        for name in ("max_iter", "cg_max_iter"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"NewtonRecipe.{name} must be a positive int, got {v!r}.")
        for name in ("precondition", "warmup"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"NewtonRecipe.{name} must be an int >= 0 (0: none), got {v!r}.")
        if not (isinstance(self.tol,
                           (int, float)) and 0 < self.tol < 1 and math.isfinite(self.tol)):
            raise ValueError(f"NewtonRecipe.tol must lie in (0, 1), e.g. 1e-8; got {self.tol!r}.")
        if not (isinstance(self.forcing, (int, float)) and 0 < self.forcing < 1):
            raise ValueError("NewtonRecipe.forcing must lie in (0, 1), e.g. 0.1; got "
                             f"{self.forcing!r}.")
        if self.model not in MODELS:
            raise ValueError(f"NewtonRecipe.model must be one of {MODELS}, got {self.model!r}.")
        if self.products not in PRODUCTS:
            raise ValueError(f"NewtonRecipe.products must be one of {PRODUCTS}, got "
                             f"{self.products!r}.")

    # the same small interface as pbrf.Recipe, so respond(**changes) works for both
    batch_size = None
    optimizer = "newton"

    def replace(self, **changes) -> "NewtonRecipe":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


def fingerprint(t: Tensor) -> tuple[float, ...]:
    """A few float64 sums of ``t`` (a flat vector): the key of a cache of things computed at a
    point (two different points share one only by accident of ~1e-16).
    """
    d = t.detach().double()
    return float(d.sum()), float(d.norm()), float(d[:: max(1, d.numel() // 97)].sum())


def _rows_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(1)


def batched_cg(
    matvec: Callable[[Tensor, Tensor], Tensor],
    B: Tensor,
    atol: Tensor,
    max_iter: int,
    precond: Callable[[Tensor, Tensor], Tensor] | None = None,
    stall: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Preconditioned) conjugate gradients for K independent SPD systems ``A_k x_k = b_k`` at once.

    Args:
        matvec: ``(rows, V) -> A_rows V`` for the systems ``rows`` (a LongTensor) and vectors ``V``.
        B: right-hand sides ``[K, p]``.
        atol: per-system absolute residual tolerance ``[K]`` (on the residual's 2-norm, with or
            without a preconditioner).
        max_iter: iteration cap.
        precond: ``(rows, R) -> M_rows⁻¹ R``, an SPD preconditioner per system (default none).
        stall: stop a system whose residual norm has not halved in :data:`CG_STALL` iterations.

    Returns:
        ``(X, R, iters, negative, stalled)``: solutions, recursive residuals ``B − A X``,
        iterations per system, whether it met a non-positive curvature direction or stopped by
        ``stall`` (either stops where it is).
    """
    K = B.shape[0]
    every = torch.arange(K, device=B.device)
    apply = precond if precond is not None else (lambda rows, R: R)
    X, R = torch.zeros_like(B), B.clone()
    Z = apply(every, R)
    P, rz = Z.clone(), _rows_dot(R, Z)
    iters = torch.zeros(K, dtype=torch.long, device=B.device)
    negative = torch.zeros(K, dtype=torch.bool, device=B.device)
    stalled, since = torch.zeros_like(negative), torch.zeros_like(iters)
    mark = R.norm(dim=1)  # the residual norm at the last halving
    active = mark > atol
    for _ in range(max_iter):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        AP = matvec(rows, P[rows])
        pAp = _rows_dot(P[rows], AP)
        ok = pAp > 0
        negative[rows] |= ~ok
        alpha = torch.where(ok, rz[rows] / torch.where(ok, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(pAp))
        X[rows] += alpha[:, None] * P[rows]
        R[rows] -= alpha[:, None] * AP
        Zr = apply(rows, R[rows])
        rz_new = _rows_dot(R[rows], Zr)
        P[rows] = Zr + (rz_new / rz[rows])[:, None] * P[rows]
        rz[rows] = rz_new
        iters[rows] += 1
        rn = R[rows].norm(dim=1)
        halved = rn <= 0.5 * mark[rows]
        mark[rows] = torch.where(halved, rn, mark[rows])
        since[rows] = torch.where(halved, torch.zeros_like(since[rows]), since[rows] + 1)
        still = ok & (rn > atol[rows]) & torch.isfinite(rn)
        stalled[rows] |= still & (since[rows] >= CG_STALL) & stall
        active[rows] = still & ~stalled[rows]
    return X, R, iters, negative, stalled


def nystrom(matvec: Callable[[Tensor], Tensor], p: int, rank: int, like: Tensor,
            seed: int = 0, eps: float | None = None) -> tuple[Tensor, Tensor]:
    """A rank-``rank`` randomized Nyström approximation ``U diag(λ) Uᵀ`` of a positive
    semi-definite operator (Frangella, Tropp & Udell 2023, Algorithm 2.1): one product with a
    block of ``rank`` random directions; ``eps`` is the products' relative accuracy (default:
    ``like``'s machine epsilon). Returns ``(λ [r] decreasing, U [r, p])`` (rows).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(rank, p, generator=gen, dtype=like.dtype).to(like.device)
    omega = torch.linalg.qr(omega.T)[0].T
    Y = matvec(omega)
    eps = torch.finfo(like.dtype).eps if eps is None else eps
    nu = eps * float(Y.norm()) * p**0.5
    Y = Y + nu * omega
    core = omega @ Y.T
    d, V = torch.linalg.eigh(0.5 * (core + core.T))
    keep = d > d.max().clamp_min(0) * 1e-10 + 1e-300
    Bt = (V[:, keep] / d[keep].sqrt()).T @ Y  # Bᵀ with B Bᵀ = Y core⁺ Yᵀ
    U, S, _ = torch.linalg.svd(Bt.T, full_matrices=False)
    return (S**2 - nu).clamp_min(0.0), U.T


class Preconditioner:
    """``(U diag(λ) Uᵀ + σ_k I)⁻¹`` for each row's shift ``σ_k``: the inverse of a low-rank
    approximation of a curvature plus the row's shift (exact on the span of ``U``, ``1/σ_k``
    on the rest) — the Nyström PCG preconditioner, applied in O(p·r) per vector.
    """

    def __init__(self, values: Tensor, vectors: Tensor) -> None:
        self.values, self.vectors = values, vectors

    @classmethod
    def sketch(cls, matvec: Callable[[Tensor], Tensor], p: int, rank: int, like: Tensor,
               eps: float | None = None, block: int = 16) -> "Preconditioner":
        """The Nyström preconditioner of a positive semi-definite curvature ``matvec`` (rows in,
        rows out) from ``rank`` products in blocks of ``block``, the rank cut to fit
        :data:`PRECONDITIONER_BYTES`; ``eps`` as in :func:`nystrom`.
        """
        rank = min(rank, p, max(8, PRECONDITIONER_BYTES // (8 * p)))

        def blocked(V: Tensor) -> Tensor:
            return torch.cat([matvec(V[i: i + block]) for i in range(0, V.shape[0], block)])

        return cls(*nystrom(blocked, p, rank, like, eps=eps))

    def __call__(self, sigma: Tensor, R: Tensor) -> Tensor:
        """``M⁻¹ R`` for rows ``R [k, p]`` with shifts ``sigma [k]``."""
        U = self.vectors.to(R.dtype)
        C = R @ U.T  # [k, r]
        lam = self.values.to(R.dtype)
        inner = C / (lam[None] + sigma[:, None])
        return (R - C @ U) / sigma[:, None] + inner @ U


def row_ways(prob) -> tuple[str, ...]:
    """How the rows' own products and gradients may run over the K rows: ``"vmap"``, and for a
    convolutional model on CPU also ``"loop"`` (a Python loop, results stacked). ``vmap`` over K
    parameter sets of a convolution becomes a grouped convolution, whose CPU speed depends on the
    model and the sizes (per row, float32 exact-Hessian products, 2 threads: ResNet-20 ×0.25 over
    512 images 4.1 s vmapped over 4 rows, 1.0 looped; smooth LeNet ×0.5 over 500, 0.08 and 0.07,
    float64 0.36 and 0.72; at 2 rows × 16 images the two looked alike), so :class:`Fastest`
    measures them at the run's own sizes. Every other model and device ``vmap``s.
    """
    conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    convolutional = any(isinstance(m, conv) for m in prob.model.modules())
    return ("vmap", "loop") if convolutional and prob.device.type == "cpu" else ("vmap",)


def hessian_product(fn: Callable, reverse: bool = False) -> Callable:
    """``(θ, v, *args) ↦ ∇²_θ fn(θ, *args) v``: forward-over-reverse (the ``jvp`` of the
    gradient) or, with ``reverse``, reverse-over-reverse (the gradient of ``⟨∇fn, v⟩``). The
    same values up to round-off; which is faster depends on the model (float32, 2 threads, per
    row, vmapped over 4: an MLP 64×2 on 1,000 MNIST images 5.6 ms reverse and 9.5 forward,
    smooth LeNet ×0.5 on 500 CIFAR images 108 and 79); reverse is not among the
    :func:`variant_names`.
    """
    gradient = grad(fn)
    if reverse:
        def product(th: Tensor, v: Tensor, *args) -> Tensor:
            return grad(lambda t: torch.dot(gradient(t, *args), v))(th)
    else:
        def product(th: Tensor, v: Tensor, *args) -> Tensor:
            return jvp(lambda t: gradient(t, *args), (th,), (v,))[1]
    return product


def variant_names(prob, hessian: bool = False) -> list[str]:
    """The names of :func:`row_variants`: each of :func:`row_ways`, with ``hessian`` as
    ``"<way> forward"``. Reverse-over-reverse products (:func:`hessian_product`) are not offered:
    on the digits MLP's one-row continuation they measured 2.4–2.6× faster, so near the margin
    that a busy machine flipped the choice, and a resumed run's numbers differed in the last
    digits (``tests/cli/test_cli.py::test_kill_9_then_resume_gives_the_uninterrupted_numbers``).
    """
    return [f"{w} forward" if hessian else w for w in row_ways(prob)]


def row_variants(prob, fn: Callable, in_dims: tuple, hessian: bool = False
                 ) -> dict[str, Callable]:
    """The equivalent ways :class:`Fastest` chooses from: ``fn`` over the rows (:func:`per_row`,
    ``vmap`` or a loop), or with ``hessian`` the Hessian products of ``fn``
    (:func:`hessian_product`; ``in_dims`` for ``(θ, v, *args)``).
    """
    return {name: per_row(hessian_product(fn) if hessian else fn, in_dims, name.startswith("loop"))
            for name in variant_names(prob, hessian)}


class Fastest:
    """Equivalent implementations of one operation on a problem's rows (the same values up to
    round-off: ``vmap`` or a loop over the rows), chosen once per problem
    and operation by their speed on the first call's own arguments (the run's sizes, where small
    probes mislead): that call runs each variant (the first once more at the end: it bore the
    process's warm-up), keeps the first, in the declared order, within :data:`FASTEST_MARGIN` of
    the fastest, and returns its result; every later call runs it alone. The margin keeps timing
    noise from flipping the choice, so that the values do not depend on which call came first (a
    resumed run computes what the uninterrupted one did). The choice is weakly keyed by the
    problem, so every chunk of a run shares it; one row (a continuation) is chosen apart, among
    the loops where there are loops (a loop over one row is the plain call).

    Args:
        prob: the problem the rows are of.
        name: the operation (its choice's key).
        variants: ``{name: fn}``; ``fn(theta [k, p], ..., batch)`` with ``batch["idx"]`` the
            examples; the first is the default.
    """

    def __init__(self, prob, name: str, variants: dict[str, Callable]) -> None:
        self.prob, self.name, self.variants = prob, name, variants

    def __call__(self, theta: Tensor, *args):
        """The operation on the rows of ``theta`` (the variant chosen, measured on this call if
        none is yet).
        """
        rows, store = theta.shape[0], _CHOICES.setdefault(self.prob, {})
        key = (self.name, rows == 1)
        if key in store:
            return self.variants[store[key][0]](theta, *args)
        names = [n for n in self.variants if rows > 1 or "loop" in n] or list(self.variants)
        units = rows * max(args[-1]["idx"].numel(), 1)
        outs, seconds = {}, {}
        for name in [*names, names[0]] if len(names) > 1 else names:
            start = time.perf_counter()
            outs[name] = self.variants[name](theta, *args)
            if theta.device.type == "cuda":
                torch.cuda.synchronize(theta.device)
            per_unit = (time.perf_counter() - start) / units
            seconds[name] = min(seconds.get(name, math.inf), per_unit)
        fastest = min(seconds.values())
        choice = next(n for n in names if seconds[n] <= FASTEST_MARGIN * fastest)
        store[key] = (choice, seconds)
        return outs[choice]

    def choice(self, one_row: bool = False) -> str | None:
        """The variant chosen (``None`` before the first call)."""
        return self._record(one_row)[0]

    def measured(self, one_row: bool = False) -> dict[str, float]:
        """The measured seconds per row and example of each variant (empty before the first
        call).
        """
        return dict(self._record(one_row)[1])

    def _record(self, one_row: bool) -> tuple[str | None, dict]:
        return _CHOICES.get(self.prob, {}).get((self.name, one_row), (None, {}))


def per_row(fn: Callable, in_dims: tuple, loop: bool) -> Callable:
    """``fn`` over the rows of its batched arguments (``in_dims`` 0; the others shared, ``None``):
    ``vmap``, or with ``loop`` a Python loop whose results are stacked (same values).
    """
    if not loop:
        return vmap(fn, in_dims=in_dims)

    def looped(*args):
        rows = next(a for a, d in zip(args, in_dims) if d == 0).shape[0]

        def row(k: int) -> list:
            return [a if d is None else _index(a, k) for a, d in zip(args, in_dims)]

        outs = [fn(*row(k)) for k in range(rows)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs))
        return torch.stack(outs)

    return looped


def _index(a, k: int):
    return {n: v[k] for n, v in a.items()} if isinstance(a, dict) else a[k]


class Batched:
    """Full-batch value, gradient and curvature products of K stacked flat problems (one
    precision: the problem's own).
    """

    def __init__(self, prob, value_fn, gn_fn, aux: dict, batch_fn, removal_fn=None) -> None:
        self.prob, self.aux, self.batch_fn, self.gn_fn = prob, aux, batch_fn, gn_fn
        self._hessians: tuple | None = None  # (key, output Hessians per chunk) at the stored θ

        def value(th: Tensor, a: dict, b: dict) -> Tensor:
            return value_fn(prob.unflatten(th), a, b)

        def gn_one(th: Tensor, v: Tensor, a: dict, b: dict) -> Tensor:
            f = lambda t: prob.outputs(prob.unflatten(t), b["x"])  # noqa: E731
            out, jv = jvp(f, (th,), (v,))
            hjv = jvp(grad(lambda o: gn_fn(o, a, b)), (out,), (jv,))[1]
            return vjp(f, th)[1](hjv)[0]

        own = (0, 0, 0, None)
        self._vg = Fastest(prob, "value_grad",
                           row_variants(prob, grad_and_value(value), (0, 0, None)))
        self._gn = Fastest(prob, "gauss_newton", row_variants(prob, gn_one, own))
        self._hvp = Fastest(prob, "hessian", row_variants(prob, value, own, hessian=True))
        # one θ for every vector: the forward pass is shared, only the tangents are batched
        self._shared = {"gn": vmap(gn_one, in_dims=(None, 0, None, None)),
                        "hessian": vmap(hessian_product(value), in_dims=(None, 0, None, None))}
        self._removal = None
        if removal_fn is not None:
            def removal_one(th: Tensor, v: Tensor, a: dict) -> Tensor:
                fn = grad(lambda t: removal_fn(prob.unflatten(t), a))
                return jvp(fn, (th,), (v,))[1]

            self._removal = vmap(removal_one, in_dims=(0, 0, 0))

    @property
    def has_removal(self) -> bool:
        """Whether the objective's removal term is known (the ``"shared"`` model needs it)."""
        return self._removal is not None

    def _sub(self, rows: Tensor) -> dict:
        return {k: v[rows] for k, v in self.aux.items()}

    def _over_data(self, fn):
        total = None
        for b in self._chunk_batches():
            w = b["idx"].numel() / self.prob.n_train
            part = tuple(w * p for p in fn(b))
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

    def shared(self, form: str, theta0: Tensor, aux0: dict, V: Tensor) -> Tensor:
        """Products of ONE curvature of the no-removal objective (``aux0``) at ``theta0 [p]``
        with every row of ``V``: its Gauss–Newton data term (``form="gn"``) or its exact Hessian,
        penalties included (``"hessian"``).
        """
        fn = self._shared[form]
        if form == "gn" and jacobian.pays(self.prob):
            return self._stored_gn(theta0, aux0, V)
        (out,) = self._over_data(lambda b: (fn(theta0, V, aux0, b),))
        return out.detach()

    def _stored_gn(self, theta0: Tensor, aux0: dict, V: Tensor) -> Tensor:
        """:meth:`shared`'s Gauss–Newton products through the stored output Jacobians at
        ``theta0`` (:mod:`pbrf.jacobian`); the chunks past their memory through the network.
        """
        prob, key = self.prob, (*fingerprint(theta0), id(aux0))
        Js = jacobian.jacobians(prob, theta0, key[:-1])
        if self._hessians is None or self._hessians[0] != key:
            self._hessians = (key, [None if J is None else jacobian.output_hessians(
                lambda o, b=b: self.gn_fn(o, aux0, b), prob.outputs_flat(theta0, b["x"]))
                for J, b in zip(Js, self._chunk_batches())])
        total = torch.zeros_like(V)
        for J, H, b in zip(Js, self._hessians[1], self._chunk_batches()):
            part = (self._shared["gn"](theta0, V, aux0, b) if J is None
                    else jacobian.gn_product(J, H, V))
            total += (b["idx"].numel() / prob.n_train) * part
        return total.detach()

    def _chunk_batches(self):
        """The batches of the training set's chunks, in order."""
        for s in self.prob.chunks():
            yield self.batch_fn(torch.arange(s.start, s.stop, device=self.prob.device))

    def removal_hvp(self, rows: Tensor, theta: Tensor, V: Tensor) -> Tensor:
        """Exact Hessian products of each row's removal term at its own ``theta`` (a few
        examples per row, no data pass).
        """
        return self._removal(theta, V, self._sub(rows)).detach()


class Precision:
    """The curvature products of the trust-region model in another dtype (float32 by default):
    vectors and parameters are cast in, products cast back. The objective, the gradient and the
    certificate never come from here.

    Args:
        batched: the :class:`Batched`-style products built on the problem in that dtype.
        dtype: the caller's dtype (results are cast back to it).
    """

    def __init__(self, batched: Batched, dtype: torch.dtype) -> None:
        self.batched, self.dtype = batched, dtype
        self.low = batched.prob.dtype

    def _cast(self, *tensors: Tensor) -> list[Tensor]:
        return [t.to(self.low) for t in tensors]

    def gn(self, rows: Tensor, theta: Tensor, V: Tensor) -> Tensor:
        """As :meth:`Batched.gn`."""
        with exact_matmul():
            return self.batched.gn(rows, *self._cast(theta, V)).to(self.dtype)

    def hvp(self, rows: Tensor, theta: Tensor, V: Tensor) -> Tensor:
        """As :meth:`Batched.hvp`."""
        with exact_matmul():
            return self.batched.hvp(rows, *self._cast(theta, V)).to(self.dtype)

    def shared(self, form: str, theta0: Tensor, aux0: dict, V: Tensor) -> Tensor:
        """As :meth:`Batched.shared` (``aux0`` already in the low dtype)."""
        with exact_matmul():
            return self.batched.shared(form, *self._cast(theta0), aux0, *self._cast(V)).to(
                self.dtype)

    def removal_hvp(self, rows: Tensor, theta: Tensor, V: Tensor) -> Tensor:
        """As :meth:`Batched.removal_hvp`."""
        with exact_matmul():
            return self.batched.removal_hvp(rows, *self._cast(theta, V)).to(self.dtype)

    @property
    def has_removal(self) -> bool:
        """As :attr:`Batched.has_removal`."""
        return self.batched.has_removal


@contextlib.contextmanager
def exact_matmul():
    """TF32 off for CUDA matmuls and convolutions inside the block (restored after): on Ampere
    and later GPUs TF32 rounds float32 products to ~1e-3, far above float32's own 1e-7.
    """
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cuda.allow_tf32, cudnn.allow_tf32)
    cuda.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32 = saved


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
        own: the row uses its own model (``"auto"``) instead of the shared one; slow: shared-model
            iterations in a row that did not cut the gradient norm 4-fold; own_iterations: outer
            iterations on the row's own model.
        wide: the row's model products are in the problem's own dtype (float64), not the lower
            ``products`` dtype: set where the low-precision model stalled (see :meth:`watch`).
        bounded: the row's objective is bounded below (no removal term; the proximal and warm
            start): never a runaway.
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
    own: Tensor
    slow: Tensor
    own_iterations: Tensor
    wide: Tensor
    bounded: Tensor

    @classmethod
    def start(cls, B: Batched, theta0: Tensor, scale: Tensor, tol: float,
              exact_from_start: bool, shared: bool, floor: float = 0.0,
              bounded: Tensor | None = None) -> _NewtonState:
        """The state at ``theta0`` (objective and gradient evaluated there); a row stops at
        ``tol · scale`` or at the gradient's round-off ``floor``, whichever is larger; rows
        ``bounded`` below are never runaways.
        """
        K, dev, dt = theta0.shape[0], theta0.device, theta0.dtype
        theta = theta0.detach().clone()
        F, g = B.value_grad(torch.arange(K, device=dev), theta)
        gn0 = g.norm(dim=1)
        active = torch.isfinite(F) & torch.isfinite(gn0)

        def zeros(dtype):
            return torch.zeros(K, dtype=dtype, device=dev)

        return cls(theta=theta, F=F, g=g, F0=F.clone(), gn0=gn0, scale=scale,
                   atol=(tol * scale.to(dt)).clamp_min(floor), mu=zeros(dt), best=gn0.clone(),
                   idle=zeros(torch.long), active=active,
                   at_roundoff=torch.full((K,), bool(exact_from_start), dtype=torch.bool,
                                          device=dev),
                   diverged=~active.clone(), stalled=zeros(torch.bool),
                   runaway=zeros(torch.bool), steps=zeros(torch.long),
                   iterations=zeros(torch.long), cg_iterations=zeros(torch.long),
                   own=torch.full((K,), not shared, dtype=torch.bool, device=dev),
                   slow=zeros(torch.long), own_iterations=zeros(torch.long),
                   wide=zeros(torch.bool),
                   bounded=zeros(torch.bool) if bounded is None else bounded.to(dev))

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
              untestable: Tensor, can_widen: bool) -> None:
        """Stop the rows that stalled or ran away.

        Stalled: the trust region has shrunk to nothing (μ ≫ the curvature), or the gradient norm
        has not halved in 3 iterations while the steps are below the objective's round-off.
        With ``can_widen`` (the model's products are in a lower precision than the gradient), a
        row that would stall on the low-precision model is not stopped: it continues on its own
        model with products in the problem's own dtype (``wide``), μ reset — the engine before
        float32 products, so that float32 can cost iterations but never a certificate.
        Runaway: accepted descent steps while the gradient grows by orders of magnitude, or
        stays above its start after :data:`RUNAWAY_IDLE` iterations without halving (a row
        stalled at a kink has a smaller gradient than at its start) — the objective has no
        minimum near the start (e.g. a PBRF whose removed point's curvature exceeds wd + λ); the
        response is treated as diverged. Not a row whose objective is ``bounded`` below (no
        removal term, or the proximal and warm-start objectives: nonnegative losses and
        quadratics), which has a minimum, however far (ResNet-20 ×0.25's proximal continuation
        at λ = 1e-3 from 5 epochs of SGD: the gradient grew 100-fold in 48 iterations while the
        objective fell 1.97 → 1.11).
        """
        gbest = torch.minimum(self.best[rows], self.g[rows].norm(dim=1))
        halved = gbest < 0.5 * self.best[rows]
        self.best[rows] = torch.where(halved, gbest, self.best[rows])
        self.idle[rows] = torch.where(halved, torch.zeros_like(self.idle[rows]),
                                      self.idle[rows] + 1)
        stuck = (~accept & (mu > 1e10 * curv)) | ((self.idle[rows] >= 3) & untestable)
        if can_widen:
            widen = stuck & ~self.wide[rows]
            self.wide[rows] |= widen
            self.own[rows] |= widen
            self.mu[rows] = torch.where(widen, torch.zeros_like(mu), self.mu[rows])
            self.idle[rows] = torch.where(widen, torch.zeros_like(self.idle[rows]),
                                          self.idle[rows])
            stuck = stuck & ~widen
        self.stalled[rows] |= stuck
        dt = self.theta.dtype
        start = torch.maximum(self.gn0[rows], self.scale[rows].to(dt))
        gnorm = self.g[rows].norm(dim=1)
        away = (gnorm > 1e2 * start) | ((self.idle[rows] >= RUNAWAY_IDLE) & (gnorm > start))
        away &= ~self.bounded[rows]  # bounded below: a long descent to a minimum that exists
        self.runaway[rows] |= away
        self.active[rows] &= ~(stuck | away)

    def diagnostics(self) -> dict[str, Tensor]:
        """The ``[K]`` diagnostics of :func:`newton_optimize`."""
        gnorm = self.g.norm(dim=1)
        diverged = (self.diverged | ~torch.isfinite(self.F) | ~torch.isfinite(gnorm)
                    | self.runaway)
        return {"steps": self.steps, "iterations": self.iterations,
                "cg_iterations": self.cg_iterations, "own_iterations": self.own_iterations,
                "wide": self.wide,
                "objective": self.F, "grad_norm": gnorm,
                "initial_objective": self.F0, "initial_grad_norm": self.gn0,
                "stalled": self.stalled, "runaway": self.runaway, "diverged": diverged}


@dataclass(frozen=True)
class _Model:
    """How the trust-region model's products are formed (module docstring): ``products`` (the
    problem's own :class:`Batched` or a :class:`Precision`), the quadratic ``shift``, the recipe's
    ``model``, and for ``"shared"`` the common start ``theta0 [p]``, the no-removal ``aux0`` and
    the ``form`` of the shared curvature (``"gn"`` or ``"hessian"``).
    """

    products: Batched | Precision
    shift: float
    model: str
    theta0: Tensor | None = None
    aux0: dict | None = None
    form: str = "gn"
    floor: float = 0.0
    precond: Preconditioner | None = None
    wide: Batched | None = None
    #: where ``precond`` was sketched anew for a one-row problem (:func:`_refresh`), else None
    fresh_at: Tensor | None = None

    def shared_product(self, rows: Tensor, th: Tensor, V: Tensor) -> Tensor:
        """``(S + ∇²R_k(θ_k)) v_k``: the shared curvature plus each row's removal term."""
        P = self.products
        out = P.shared(self.form, self.theta0, self.aux0, V) + P.removal_hvp(rows, th, V)
        return out + self.shift * V if self.form == "gn" else out


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
    removal_fn: Callable | None = None,
    aux0: dict | None = None,
    low: Precision | None = None,
    magnitude: float = 0.0,
    grad_floor: float = 0.0,
    bounded: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Minimise K objectives ``value_fn(params_k, aux_k, batch)`` from ``theta0 [K, p]``.

    Args:
        prob: the :class:`~pbrf.Problem`. value_fn: objective of ONE problem on one chunk, a
            mean over the chunk (the full-data value is the size-weighted sum over chunks).
        gn_fn: ``(outputs, aux_k, batch) -> scalar``: the part of ``value_fn``'s data term that is
            convex in the outputs (its output Hessian defines the Gauss–Newton model).
        shift: the coefficient ``s`` of the quadratic terms in θ (``(s/2)||θ − a||²`` and
            ``(wd/2)||θ||²`` together), added to the model as ``s I``. theta0: start ``[K, p]``.
        aux: per-problem tensors ``[K, ...]``. scale: ``[K]`` gradient-norm scale of each
            problem (its removal signal), stopping at ``recipe.tol · scale`` (``recipe``: a
            :class:`NewtonRecipe`); batch_fn: chunk indices → batch dict.
        exact_from_start: the exact Hessian from the first iteration (starts near the optimum,
            e.g. the continuation), shared at the start with ``"shared"`` (not its GN part).
        removal_fn: ``(params, aux_k) -> scalar``, the removal term of ``value_fn`` (the part that
            differs between problems); with ``aux0`` (one problem's aux without removal) it
            enables ``model="shared"``; without them every row uses ``"auto"``.
        low: the model's products in another dtype (a :class:`Precision`); default: its own.
        magnitude: ``J(θ^s)``, the size of the losses in the objective (its round-off,
            :func:`_judge`); grad_floor: the gradient's round-off floor, where a problem stops;
            bounded: ``[K]`` bool, rows bounded below (proximal, warm start), never runaways.

    Returns: ``(theta [K, p], diagnostics)``, ``[K]`` tensors ``steps`` (accepted), ``iterations``,
    ``cg_iterations``, ``own_iterations`` (on the row's own model), ``wide``, ``objective``,
    ``grad_norm``, ``initial_objective``, ``initial_grad_norm``, ``stalled``, ``runaway`` (the
    gradient grew 100-fold along accepted descent steps) and ``diverged``.
    """
    B = Batched(prob, value_fn, gn_fn, aux, batch_fn, removal_fn)
    M = _model(B, low, recipe, shift, theta0[0], aux0, exact_from_start)
    state = _NewtonState.start(B, theta0, scale, recipe.tol, exact_from_start,
                               M.theta0 is not None, grad_floor, bounded)
    bar = tqdm(total=recipe.max_iter, desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for _ in range(recipe.max_iter):
        rows, gnorm = state.rows_to_go()
        if rows.numel() == 0:
            break
        bar.update()
        M = _iterate(B, M, recipe, state, rows, gnorm[rows], magnitude)
    bar.close()
    return state.theta, state.diagnostics()


class _Reached(Exception):
    """Raised inside :func:`descend`'s closure once the gradient target is met."""


def descend(B: Batched, theta0: Tensor, max_evals: int,
            target: float = DESCENT_TARGET) -> tuple[Tensor, int]:
    """L-BFGS (strong-Wolfe line search, full batch, in the problem's dtype) on the first problem
    of ``B`` from ``theta0 [p]``, until its gradient norm falls ``target``-fold or after
    ``max_evals`` evaluations of the objective and gradient; returns ``(θ [p], evaluations)``.

    A warm-up for Newton where it starts far from the optimum. Nothing is certified here (the
    Newton solve that follows is); ``theta0`` is returned when the objective did not decrease.
    """
    rows = torch.zeros(1, dtype=torch.long, device=theta0.device)
    F0, g0 = B.value_grad(rows, theta0[None])
    goal = target * float(g0.norm())
    seen = {"evals": 1, "F": F0[0], "x": theta0}
    if max_evals <= 2 or not (torch.isfinite(F0).all() and torch.isfinite(g0).all()):
        return theta0, 1
    x = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=max_evals, max_eval=max_evals - 2,
                            history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=0.0, tolerance_change=0.0)

    def closure() -> Tensor:
        F, g = B.value_grad(rows, x.detach()[None])
        seen["evals"] += 1
        if bool(torch.isfinite(F).all()) and float(g.norm()) <= goal:
            seen.update(F=F[0], x=x.detach().clone())
            raise _Reached
        x.grad = g[0]
        return F[0]

    try:
        opt.step(closure)
        F, _ = B.value_grad(rows, x.detach()[None])
        seen.update(evals=seen["evals"] + 1, F=F[0], x=x.detach().clone())
    except _Reached:
        pass
    if not (torch.isfinite(seen["F"]) and seen["F"] <= F0[0]):
        return theta0, seen["evals"]
    return seen["x"], seen["evals"]


def _model(B: Batched, low: Precision | None, recipe: NewtonRecipe, shift: float, theta0: Tensor,
           aux0: dict | None, exact_from_start: bool) -> _Model:
    """The trust-region model of :func:`newton_optimize` (see :class:`_Model`): products in
    ``low``'s dtype (if given; ``B``'s own for the rows that widen) or in ``B``'s.
    """
    products = B if low is None else low
    shared = recipe.model == "shared" and products.has_removal and aux0 is not None
    floor = 0.0 if low is None else 10 * torch.finfo(low.low).eps
    return _Model(products, shift, recipe.model, theta0 if shared else None, aux0,
                  "hessian" if exact_from_start else "gn", floor,
                  _preconditioner(products, theta0, aux0, recipe.precondition, shift),
                  None if low is None else B)


def _preconditioner(products: Batched | Precision, theta0: Tensor, aux0: dict | None, rank: int,
                    shift: float, block: int = 16) -> Preconditioner | None:
    """The Nyström preconditioner of the Gauss–Newton data curvature at ``theta0`` (the
    no-removal ``aux0``), ``rank`` products in blocks of ``block``; ``None`` without ``aux0``,
    with ``rank = 0`` or without a shift (no positive floor under the curvature).
    """
    if aux0 is None or rank == 0 or shift <= 0:
        return None
    # chunks of one respond call share their start: sketch it once per problem, start and
    # curvature (one product tells the kinds' objectives apart: which kind built a sketch first
    # must not change another's path)
    one = products.shared("gn", theta0, aux0, torch.ones_like(theta0)[None])
    key = (rank, *fingerprint(theta0), *fingerprint(one[0]))
    store = _SKETCHES.setdefault(_measured(products), {})
    if key in store:
        return store[key]
    while len(store) >= SKETCHES_KEPT:  # the oldest start goes
        store.pop(next(iter(store)))
    store[key] = _sketch(products, theta0, aux0, rank, block)
    return store[key]


def _sketch(products: Batched | Precision, theta: Tensor, aux0: dict, rank: int,
            block: int = 16) -> Preconditioner:
    """The Nyström preconditioner of the no-removal Gauss–Newton curvature at ``theta [p]``
    (``rank`` products of ``products``' dtype, in blocks of ``block``).
    """
    eps = torch.finfo(_measured(products).dtype).eps
    return Preconditioner.sketch(lambda V: products.shared("gn", theta, aux0, V), theta.shape[0],
                                 rank, theta, eps=eps, block=block)


def _measured(products: Batched | Precision):
    """The problem whose dtype ``products`` compute in (a :class:`Precision`'s low one)."""
    return products.batched.prob if isinstance(products, Precision) else products.prob


def _iterate(B: Batched, M: _Model, recipe: NewtonRecipe, st: _NewtonState, rows: Tensor,
             gn: Tensor, magnitude: float = 0.0) -> _Model:
    """One trust-region iteration of the problems ``rows`` (gradient norms ``gn``; ``magnitude``:
    see :func:`newton_optimize`); returns the model for the next (:func:`_refresh`).
    """
    dt = st.theta.dtype
    tiny = torch.finfo(dt).tiny
    th, gr, m = st.theta[rows], st.g[rows], st.mu[rows]
    own = st.own[rows]
    # no solve beyond the stopping tolerance (Eisenstat & Walker's safeguard): a residual of
    # OVERSOLVE · atol leaves the step's gradient below atol as far as the model is right
    eta = torch.maximum(gn / st.gn0[rows].clamp_min(tiny),
                        OVERSOLVE * st.atol[rows] / gn.clamp_min(tiny)).clamp(max=recipe.forcing)
    # the shared model converges linearly: no use solving its systems far below its rate
    eta = torch.where(own, eta, eta.clamp(min=1e-3))
    eta = torch.where(st.wide[rows], eta, eta.clamp(min=M.floor))
    # exact Hessian near the optimum: a small gradient, or steps below the objective's round-off
    # (where only the gradient can judge a step, and only the exact model reduces it reliably)
    switch_at = recipe.switch * torch.maximum(st.scale[rows].to(dt), st.gn0[rows])
    near = (gn <= switch_at) | st.at_roundoff[rows]
    d, Ad, ci, neg, stuck = _step(M, recipe, rows, th, gr, m, eta * gn, near, own, st.wide[rows])
    st.cg_iterations[rows] += ci
    st.iterations[rows] += 1
    st.own_iterations[rows] += own.long()
    pred = -(_rows_dot(gr, d) + 0.5 * _rows_dot(d, Ad))
    F_new, g_new = B.value_grad(rows, th + d)
    accept, ratio, untestable = _judge(st.F[rows], gn, pred, F_new, g_new, magnitude)
    st.at_roundoff[rows] |= untestable
    dd = _rows_dot(d, d).clamp_min(tiny)
    curv = (_rows_dot(d, Ad) / dd).clamp_min(M.shift if M.shift > 0 else tiny)
    mu = _next_mu(m, accept, ratio, untestable, curv)
    # a shared-model row that stops cutting its gradient 4-fold per iteration (or meets negative
    # curvature) continues on its own model
    slow = ~accept | (g_new.norm(dim=1) > 0.25 * gn)
    st.slow[rows] = torch.where(slow & ~own, st.slow[rows] + 1, torch.zeros_like(st.slow[rows]))
    # stuck: a float32 solve stopped (CG_STALL): a fresh preconditioner where that can help
    # (_refresh), else the problem's dtype from now where round-off can be what stopped it
    st.own[rows] |= (st.slow[rows] >= 2) | (neg & ~own) | stuck
    st.take(rows, accept, d, F_new, g_new, mu)
    M, fresh = _refresh(M, st, stuck & own & ~near, recipe.precondition)
    stalled = stuck & own & ~fresh
    if bool(stalled.any()):  # rare: no residual or gradient norms on every iteration
        # a stalled solve whose step still cut the gradient 4-fold keeps its products: the outer
        # iteration, with the gradient in the problem's dtype, refines the step (KEEP_CUT)
        cut = accept & (g_new.norm(dim=1) <= KEEP_CUT * gn)
        st.wide[rows] |= stalled & ~cut & _coarse(M, gr, d, Ad, m, recipe.forcing)
    st.watch(rows, accept, mu, curv, untestable, M.wide is not None)
    return M


def _refresh(M: _Model, st: _NewtonState, far: Tensor, rank: int) -> tuple[_Model, Tensor]:
    """A one-row problem (a no-removal continuation) whose float32 solve stalled far from its
    optimum (``far``: its gradient above its start) gets its preconditioner sketched anew at its
    point, once per point; returns the model and which rows of ``far`` got one (the others
    widen). A stall is only reported for preconditioned low-precision solves (:func:`_cg`).

    The sketch at the common start goes stale where the row has moved far: measured on ResNet-20
    ×0.25's quick θ^s (λ = 1e-2), 25 iterations into the proximal continuation the Gauss–Newton
    curvature's top eigenvalue was 1.7e3 against 15 at θ^s; the float32 solve (asked for 0.1 of
    its right-hand side, μ = 0.15) stalled at 0.38 after 15 products; with float64 products it
    took 22 (140 s); with float32 products and a sketch at the row's point, 3 (3.9 s, after
    10.8 s for the sketch).
    """
    x = st.theta[0]
    if st.theta.shape[0] != 1 or not bool(far.any()) or (
            M.fresh_at is not None and torch.equal(M.fresh_at, x)):  # stalled again: coarse
        return M, torch.zeros_like(far)
    return dataclasses.replace(M, precond=_sketch(M.products, x, M.aux0, rank),
                               fresh_at=x.clone()), torch.ones_like(far)


def _coarse(M: _Model, g: Tensor, d: Tensor, Ad: Tensor, m: Tensor, forcing: float) -> Tensor:
    """Whether each row's solve of ``(A + μ) d = −g`` ended where its low-precision products'
    round-off can have stopped it: a relative residual within ``forcing`` (the loosest a Newton
    solve asks for) or within that round-off, ``M.floor`` (10 ε of the products' dtype) times the
    condition number ``1 + λ_max / (s + μ)`` of the preconditioned system (``λ_max``: the
    preconditioner's top eigenvalue). Only there do products in the problem's dtype help.

    A float32 solve that stalls above both stalls in float64 too, and widening then costs a row its
    float32 products for nothing: measured on mnist-mlp quick (K = 64 PBRF removals, λ = 1e-2),
    removal 32, whose PBRF has no minimum near θ^s (a runaway, never certified), stalled in float32
    exact-Hessian solves at 0.23–8.4 of its gradient (asked 0.1); widened, its float64 solves were
    still at 1.05 after 10 products and 0.35 after 20, and its float64 iterations took 85 of the
    call's 129 s until the runaway rule stopped it; kept in float32, the call took 71 s, every
    other removal on the same path. The stalls that motivated widening (ResNet-20 ×0.25 PBRF rows
    near their optimum, :data:`CG_STALL`) sat at 1.4e-3–7.5e-3; bfloat16 products (ε = 7.8e-3)
    stall at their round-off far above ``forcing``.
    """
    tiny = torch.finfo(g.dtype).tiny
    rel = (g + Ad + m[:, None] * d).norm(dim=1) / g.norm(dim=1).clamp_min(tiny)
    top = float(M.precond.values.max()) if M.precond is not None else 0.0
    reach = M.floor * (1 + top / (M.shift + m).clamp_min(tiny))
    return rel <= reach.clamp_min(forcing)


def _judge(F: Tensor, gn: Tensor, pred: Tensor, F_new: Tensor, g_new: Tensor,
           magnitude: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(accept, ratio, untestable)`` of a step from objective ``F`` (gradient norm ``gn``) with
    predicted reduction ``pred`` to ``F_new`` (gradient ``g_new``).

    Reductions below the round-off of F cannot be tested by the ratio of actual to predicted
    reduction (``untestable``): such a step is accepted when it reduces the gradient norm. The
    round-off floor is ``1e3·eps`` times the size of what F is computed from: ``|F|`` and
    ``magnitude`` (a PBRF near θ^s has ``|F|`` ~1e-11 but differences of losses of size
    ``J(θ^s)`` in it: measured on mnist-mlp, its float64 differences carry noise ~3e-18, which
    ``1e3·eps·|F|`` ~7e-24 took for signal and so rejected Newton steps that cut the gradient
    10-fold).
    """
    dt = F.dtype
    eps = torch.finfo(dt).eps
    actual = F - F_new
    ratio = actual / pred.clamp_min(torch.finfo(dt).tiny)
    finite = torch.isfinite(F_new) & torch.isfinite(g_new).all(1)
    size = F.abs() + F_new.abs().nan_to_num(0.0) + abs(magnitude) + eps
    untestable = pred.abs() <= 1e3 * eps * size
    better_g = g_new.norm(dim=1) < gn
    accept = finite & (pred > 0) & ((ratio > 1e-4) | (untestable & better_g))
    return accept, ratio, untestable


def _next_mu(m: Tensor, accept: Tensor, ratio: Tensor, untestable: Tensor,
             curv: Tensor) -> Tensor:
    """The Levenberg–Marquardt update: grow μ after a rejected or poor step, shrink it after a
    very good one, and drop it once it is negligible against the curvature ``curv`` along the
    step, or once a step's actual reduction matched the model's prediction to 5% (the model is
    then accurate at that scale: the full Newton step converges quadratically, where shrinking μ
    3-fold per step converged only linearly — measured on smooth LeNet, N = 500: 11/9/3/3 own
    iterations instead of 13/11/4/4).
    """
    grow = ~accept | (ratio < 0.25) & ~untestable
    shrink = accept & ((ratio > 0.75) | untestable)
    m_new = torch.where(grow, torch.maximum(4 * m, 0.1 * curv), m)
    m_new = torch.where(shrink, m_new / 3, m_new)
    exact = accept & ~untestable & ((ratio - 1).abs() < 0.05)
    return torch.where((m_new < 1e-6 * curv) | exact, torch.zeros_like(m_new), m_new)


def _cg(M: _Model, mode: str, rows, th, gr, m, atol, max_iter, sel: Tensor, wide: bool = False):
    """CG on the rows ``sel`` with the model ``mode`` (``"shared"``, ``"hessian"`` or ``"gn"``),
    its products in the problem's own dtype if ``wide``; returns ``(d, A d without μ,
    iterations, negative curvature met, stalled)``.
    """
    P = M.wide if wide else M.products
    if mode == "shared":
        prod, add = M.shared_product, 0.0
    else:
        prod, add = (P.hvp, 0.0) if mode == "hessian" else (P.gn, M.shift)

    def mv(sub: Tensor, V: Tensor) -> Tensor:
        return prod(rows[sel[sub]], th[sel[sub]], V) + (add + m[sel[sub]])[:, None] * V

    pc = None
    if M.precond is not None:
        sigma = M.shift + m[sel]
        pc = lambda sub, R: M.precond(sigma[sub], R)  # noqa: E731
    low = M.wide is not None and not wide and pc is not None  # CG_STALL: preconditioned float32
    d, r, ci, neg, stuck = batched_cg(mv, -gr[sel], atol[sel], max_iter, pc, low)
    return d, -gr[sel] - r - m[sel, None] * d, ci, neg, stuck


def _step(M: _Model, recipe: NewtonRecipe, rows, th, gr, m, atol, near, own, wide):
    """The trust-region step ``d`` of every row, its model product ``A d`` (``A`` without μ), CG
    iterations, whether the shared model met negative curvature and whether a CG solve stalled
    (:data:`CG_STALL`).

    Rows on the shared model (``~own``) solve with it. The others follow ``recipe.model`` (the
    ``"auto"`` rule for ``"shared"``): exact Hessian for the rows ``near`` the optimum,
    Gauss–Newton for the rest and for rows whose Hessian CG meets negative curvature; the rows
    ``wide`` with products in the problem's own dtype, the rest in the model's.
    """
    d, Ad = torch.zeros_like(gr), torch.zeros_like(gr)
    ci = torch.zeros(rows.numel(), dtype=torch.long, device=th.device)
    neg = torch.zeros(rows.numel(), dtype=torch.bool, device=th.device)
    stuck = torch.zeros_like(neg)
    args = (rows, th, gr, m, atol, recipe.cg_max_iter)
    if bool((~own).any()):
        sel = (~own).nonzero().squeeze(1)
        d[sel], Ad[sel], ci[sel], neg[sel], stuck[sel] = _cg(M, "shared", *args, sel)
    model = "auto" if recipe.model == "shared" else recipe.model
    for w in (False, True):
        mine = own & (wide if w else ~wide)
        if not bool(mine.any()):
            continue
        if model in ("gn", "hessian"):
            sel = mine.nonzero().squeeze(1)
            d[sel], Ad[sel], ci[sel], _, stuck[sel] = _cg(M, model, *args, sel, w)
            continue
        use_gn = mine & ~near
        hess = mine & near
        if bool(hess.any()):
            sel = hess.nonzero().squeeze(1)
            d[sel], Ad[sel], ci[sel], bad, stuck[sel] = _cg(M, "hessian", *args, sel, w)
            use_gn[sel[bad]] = True
        if bool(use_gn.any()):
            sel = use_gn.nonzero().squeeze(1)
            d2, Ad2, ci2, _, stuck2 = _cg(M, "gn", *args, sel, w)
            d[sel], Ad[sel], ci[sel], stuck[sel] = d2, Ad2, ci[sel] + ci2, stuck2
    return d, Ad, ci, neg, stuck
