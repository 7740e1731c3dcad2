"""Linear solvers for ``C X = B`` behind one signature, each returning diagnostics.

``solve(op, B, solver, **options) -> (X, SolveInfo)`` with ``B`` a vector ``[p]`` or rows
``[m, p]`` (one independent system per row). ``op`` is a :class:`~pbrf.curvature.CurvatureOperator`
(anything with ``matvec(V, index=None)``, ``n_params`` and, for ``exact``, ``dense()``).

* ``exact`` — dense Cholesky solve; refuses above ``max_params``, and reports a curvature that is
  not positive definite as diverged (``allow_indefinite=True`` opts in to an LU solve instead).
* ``cg`` — conjugate gradients, batched over rows, stopping each row at ``‖CX − B‖/‖B‖ ≤ tol``.
* ``lissa`` — the stochastic Neumann recursion ``h ← b + h − C_batch h / scale`` (Agarwal et al.
  2017),
  ``X = h / scale``; it diverges unless ``scale`` exceeds about half the largest eigenvalue of
  ``C``, which is detected and reported (``diverged=True``), never returned silently; so is a
  result whose relative residual is 1 or more (no better than the zero vector).

Option values are checked (:func:`check_options`): a meaningless value (``max_iter=-1``,
``depth=0``, ``tol=nan``, ...) raises ``ValueError`` naming the option and a valid value.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .newton import Preconditioner

__all__ = ["SolveInfo", "SolverDivergedError", "solve", "solve_exact", "solve_cg", "solve_lissa",
           "SOLVERS",
           "check_options", "check_values", "option_names", "EXACT_MAX_PARAMS"]

log = logging.getLogger(__name__)


class SolverDivergedError(RuntimeError):
    """A solver diverged or produced non-finite values."""


@dataclass
class SolveInfo:
    """Diagnostics of one :func:`solve` call.

    Attributes:
        solver: name of the solver.
        iterations: iterations performed (0 for ``exact``).
        residual: max over rows of the final relative residual ``‖C x − b‖ / ‖b‖``.
        converged: residual ≤ tolerance (always True for a finite exact solve).
        diverged: non-finite values, growth beyond bounds, or a non-positive curvature direction.
        seconds: wall time.
        extra: solver-specific values (e.g. the LiSSA scale used, eigenvalue estimate).
    """

    solver: str
    iterations: int = 0
    residual: float = float("nan")
    converged: bool = False
    diverged: bool = False
    seconds: float = 0.0
    message: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The diagnostics as a plain dict."""
        return asdict(self)


#: Default cap on ``p`` for the dense exact solve (``solver_options={"max_params": ...}``).
EXACT_MAX_PARAMS = 5000


# ----------------------------------------------------------------------------------- option values
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


#: ``{solver: {option: (check, requirement, example)}}``: every option of every solver, in the order
#: of its signature (the one declaration of the options; :func:`check_options` reads it).
_OPTION_RULES = {
    "exact": {
        "max_params": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", "max_params=5000"),
        "allow_indefinite": (lambda v: isinstance(v, bool), "true or false",
                             "allow_indefinite=False"),
    },
    "cg": {
        "tol": (lambda v: v is None or (_is_real(v) and v >= 0), "a finite number >= 0 or None",
                "tol=1e-8"),
        "max_iter": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or None",
                     "max_iter=100"),
        "x0": (lambda v: v is None or isinstance(v, Tensor), "a tensor [m, p] or None", "x0=None"),
        "precondition": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: plain CG)",
                         "precondition=256"),
    },
    "lissa": {
        "scale": (lambda v: v is None or (_is_real(v) and v > 0),
                  "a finite number > 0 or None (estimated)", "scale=None"),
        "depth": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", "depth=1000"),
        "repeats": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", "repeats=1"),
        "batch_size": (lambda v: v is None or (_is_int(v) and v >= 1),
                       "an integer >= 1 or None (full batch)", "batch_size=128"),
        "seed": (lambda v: _is_int(v), "an integer", "seed=0"),
        "tol": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0", "tol=1e-2"),
    },
}


def option_names(solver: str) -> tuple[str, ...]:
    """The options of ``solver`` (keyword arguments of its function), in order."""
    return tuple(_OPTION_RULES[solver])


def check_options(solver: str, options: dict) -> None:
    """Check a solver's option names and values (the one validation of solver options).

    Raises:
        ValueError: one line naming the unknown solver or option (with the valid ones), or the
            first meaningless value, what it must be and an example.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {sorted(SOLVERS)}.")
    rules = _OPTION_RULES[solver]
    bad = sorted(set(options) - set(rules))
    if bad:
        raise ValueError(f"{bad[0]!r} is not an option of solver {solver!r}; it takes "
                         f"{', '.join(rules)}.")
    check_values(f"{solver}: option ", options, rules)


def check_values(where: str, values: dict, rules: dict) -> None:
    """``ValueError`` (one line starting with ``where``) for the first value that breaks its rule
    ``rules[name] = (ok, requirement, example)``; names without a rule are not checked here.
    """
    for name, value in values.items():
        if name in rules:
            ok, requirement, example = rules[name]
            if not ok(value):
                raise ValueError(f"{where}{name}={value!r} is invalid; it must be "
                                 f"{requirement} (e.g. {example}).")


def _rel_residual(op, X: Tensor, B: Tensor) -> Tensor:
    R = op.matvec(X) - B
    bn = B.norm(dim=1)
    return torch.where(bn > 0, R.norm(dim=1) / bn.clamp_min(torch.finfo(B.dtype).tiny),
                       R.norm(dim=1))


def _finish(op, X: Tensor, B: Tensor, info: SolveInfo, tol: float) -> SolveInfo:
    if not torch.isfinite(X).all():
        info.diverged, info.converged = True, False
        info.message = info.message or "non-finite values in the solution"
        return info
    res = _rel_residual(op, X, B)
    info.residual = float(res.max()) if res.numel() else 0.0
    info.converged = bool(info.residual <= tol) and not info.diverged
    return info


def solve_exact(op, B: Tensor, max_params: int = EXACT_MAX_PARAMS,
                allow_indefinite: bool = False) -> tuple[Tensor, SolveInfo]:
    """Dense solve ``C⁻¹ Bᵀ`` by Cholesky.

    A damped curvature that is not positive definite (an indefinite Hessian, or a singular one
    without damping) is reported as ``diverged`` with the fix in the message, and the solution is
    NaN — never a silent LU solve. ``allow_indefinite=True`` opts in to an LU solve of an
    indefinite (but non-singular) ``C``; a singular ``C`` is reported as diverged either way.

    The factorisation is kept in the operator's own ``factor_cache`` (a dict with one entry, see
    :class:`~pbrf.CurvatureOperator`), so repeated solves with the same curvature and damping
    (e.g. chunks of removals) build ``C`` once. An operator without one is factorised every time.
    """
    check_options("exact", {"max_params": max_params, "allow_indefinite": allow_indefinite})
    info = SolveInfo("exact")
    key = (getattr(op, "cache_key", None), allow_indefinite)
    cache = getattr(op, "factor_cache", None)
    if cache is not None and cache.get("key") == key:
        kind, F = cache["value"]
        info.extra["cached_factorisation"] = True
    else:
        C = op.dense(max_params=max_params)
        kind, F = _factorise(C, allow_indefinite)
        if kind == "failed":
            info.diverged, info.message = True, F
            return torch.full_like(B, float("nan")), info
        if cache is not None:
            cache.clear()
            cache.update(key=key, value=(kind, F))
    if kind == "cholesky":
        X = torch.cholesky_solve(B.T, F).T
    else:
        info.message = "curvature not positive definite; used LU (allow_indefinite=True)"
        X = torch.linalg.lu_solve(*F, B.T).T
    return X, _finish(op, X, B, info, tol=10 * torch.finfo(B.dtype).eps ** 0.5)


_EXACT_FIX = ("increase damping (e.g. damping=1e-2) or use curvature='ggn' (the Gauss-Newton "
              "matrix is positive semi-definite)")


def _factorise(C: Tensor, allow_indefinite: bool) -> tuple[str, Any]:
    """``("cholesky", L)``, ``("lu", (LU, pivots))`` or ``("failed", message)``."""
    if not torch.isfinite(C).all():
        return (
            "failed",
            f"the damped curvature has non-finite entries (is θ^s finite?); {_EXACT_FIX}",
        )
    L, err = torch.linalg.cholesky_ex(C)
    if int(err) == 0:
        return "cholesky", L
    if not allow_indefinite:
        return "failed", (
            f"the damped curvature is not positive definite (Cholesky failed at order {int(err)}): "
            "it is "
            f"singular or indefinite; {_EXACT_FIX}; or pass "
            "solver_options={'allow_indefinite': True} to solve it by LU"
        )
    LU, pivots, err = torch.linalg.lu_factor_ex(C)
    if int(err) != 0:
        return (
            "failed",
            f"the damped curvature is singular (LU pivot {int(err)} is zero); {_EXACT_FIX}",
        )
    return "lu", (LU, pivots)


def solve_cg(
    op, B: Tensor, tol: float | None = None, max_iter: int | None = None, x0: Tensor | None = None,
    precondition: int = 0,
) -> tuple[Tensor, SolveInfo]:
    """Conjugate gradients on every row of ``B`` at once (one matvec with all active rows per step).

    Args:
        tol: relative residual ``‖C x − b‖/‖b‖`` at which a row stops (default 1e-10 in float64,
            ``10·eps`` of the dtype otherwise).
        max_iter: iteration cap (default ``min(10 p, 2000)``).
        x0: warm start ``[m, p]`` (e.g. the previous solution).
        precondition: rank of the Nyström preconditioner (0: plain CG), the Newton engine's
            (:meth:`pbrf.newton.Preconditioner.sketch`, the rank cut to fit its memory bound): a
            low-rank approximation of the data curvature from that many products, whose inverse
            plus the shift ``wd + λ`` preconditions every row; built once per operator (kept in
            its ``factor_cache``). The stopping rule is unchanged.
    """
    check_options("cg", {"tol": tol, "max_iter": max_iter, "x0": x0, "precondition": precondition})
    info = SolveInfo("cg")
    default = 1e-10 if B.dtype == torch.float64 else 10 * torch.finfo(B.dtype).eps
    tol = default if tol is None else float(tol)
    max_iter = min(10 * op.n_params, 2000) if max_iter is None else int(max_iter)
    apply = _preconditioner(op, precondition, B)
    X = torch.zeros_like(B) if x0 is None else x0.reshape(B.shape).clone().to(B)
    R = B - op.matvec(X) if x0 is not None else B.clone()
    Z = apply(R)
    P, rz, rs = Z.clone(), (R * Z).sum(1), (R * R).sum(1)
    thresh = (tol**2) * (B * B).sum(1)
    it = 0
    # shown on terminals only
    bar = tqdm(total=max_iter, desc="cg", disable=None, leave=False, mininterval=1.0)
    for it in range(1, max_iter + 1):
        bar.update()
        active = rs > thresh
        if not bool(active.any()):
            it -= 1
            break
        AP = op.matvec(P)
        pAp = (P * AP).sum(1)
        if bool((pAp[active] <= 0).any()):
            info.diverged = True
            info.message = (
                "non-positive curvature direction met: C is not positive definite; increase damping"
            )
            break
        alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), 0.0)
        X += alpha[:, None] * P
        R -= alpha[:, None] * AP
        Z = apply(R)
        rz_new = (R * Z).sum(1)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), 0.0)
        P = Z + beta[:, None] * P
        rz = torch.where(active, rz_new, rz)
        rs = torch.where(active, (R * R).sum(1), rs)
    bar.close()
    info.iterations = it
    if precondition:
        info.extra["precondition"] = precondition
    return X, _finish(op, X, B, info, tol)


def _preconditioner(op, rank: int, like: Tensor):
    """``R -> M⁻¹ R`` for :func:`solve_cg` (the identity for ``rank = 0``)."""
    if rank == 0:
        return lambda R: R
    shift = float(getattr(op, "shift", 0.0))
    if shift <= 0:
        raise ValueError("solver_options precondition needs a positive shift wd + λ under the "
                         "curvature (the Nyström preconditioner inverts it plus the shift); "
                         "set damping > 0 or precondition=0.")
    cache = getattr(op, "factor_cache", None)
    cache = {} if cache is None else cache
    key = ("nystrom", rank, getattr(op, "cache_key", None))
    if cache.get("nystrom", (None,))[0] != key:
        def data(V: Tensor) -> Tensor:  # the curvature without its shift
            return op.matvec(V) - shift * V

        cache["nystrom"] = (key, Preconditioner.sketch(data, op.n_params, rank, like))
    pre = cache["nystrom"][1]
    return lambda R: pre(torch.full(R.shape[:1], shift, dtype=R.dtype, device=R.device), R)


def _power_iteration(op, p: int, like: Tensor, iters: int = 30, seed: int = 0) -> float:
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(p, generator=g, dtype=like.dtype).to(like.device)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = op.matvec(v)
        lam = float(v @ w)
        v = w / w.norm().clamp_min(torch.finfo(like.dtype).tiny)
    return lam


class _Minibatch:
    """``op`` restricted to a fixed minibatch (for eigenvalue estimates)."""

    def __init__(self, op, index: Tensor) -> None:
        self.op, self.index = op, index

    def matvec(self, V: Tensor, index: Tensor | None = None) -> Tensor:
        return self.op.matvec(V, index=self.index)


def _lambda_max(op, like: Tensor, batch_size: int | None, seed: int) -> float:
    """Power-iteration estimate of λ_max(C); with minibatches, the largest over 5 of them (they
    exceed the full one).
    """
    lam = _power_iteration(op, op.n_params, like, seed=seed)
    n = op.prob.n_train
    if batch_size is not None and batch_size < n:
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        for _ in range(5):
            idx = torch.randperm(n, generator=gen)[:batch_size].to(op.prob.device)
            lam = max(
                lam, _power_iteration(_Minibatch(op, idx), op.n_params, like, iters=20, seed=seed)
            )
    return lam


def solve_lissa(
    op,
    B: Tensor,
    scale: float | None = None,
    depth: int = 1000,
    repeats: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    tol: float = 1e-2,
) -> tuple[Tensor, SolveInfo]:
    """LiSSA: ``h_{j+1} = b + h_j − C_{B_j} h_j / scale``, estimate ``h_depth / scale``, averaged
    over repeats.

    Args:
        scale: must exceed about half the largest eigenvalue of ``C``; ``None`` estimates
            ``λ_max`` by power iteration (on the full curvature and, when ``batch_size`` is set,
            on 5 minibatches, taking the largest) and uses ``1.1 λ_max``.
        depth: recursion steps per repeat.
        repeats: independent repeats averaged.
        batch_size: minibatch of training examples per step (``None`` = full batch, deterministic).
        seed: minibatch sampling seed.
        tol: residual threshold reported as ``converged`` (LiSSA is an approximation).
    """
    check_options("lissa", {"scale": scale, "depth": depth, "repeats": repeats,
                            "batch_size": batch_size, "seed": seed, "tol": tol})
    info = SolveInfo("lissa")
    scale = _lissa_scale(op, B, scale, batch_size, seed, info)
    if scale is None:
        return torch.full_like(B, float("nan")), info
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros_like(B)
    bar = tqdm(total=repeats * depth, desc="lissa", disable=None, leave=False, mininterval=1.0)
    for _ in range(repeats):
        h = _lissa_recursion(op, B, scale, depth, batch_size, gen, info, bar)
        if h is None:
            bar.close()
            return torch.full_like(B, float("nan")), info
        total += h / scale
    bar.close()
    X = total / repeats
    info = _finish(op, X, B, info, tol)
    # no better than X = 0: not an approximation at all
    if not info.diverged and not info.residual < 1.0:
        info.diverged, info.converged = True, False
        info.message = (
            f"LiSSA did not converge: relative residual {info.residual:.3g} >= 1 (no better than "
            "the zero vector) "
            f"after depth={depth}; the damped curvature is likely indefinite or too "
            "ill-conditioned: "
            "increase damping, use curvature='ggn', or a larger depth"
        )
        return torch.full_like(B, float("nan")), info
    return X, info


def _lissa_scale(op, B: Tensor, scale, batch_size, seed, info: SolveInfo) -> float | None:
    """The LiSSA scale: ``scale``, or ``1.1 λ_max`` estimated; ``None`` (``info`` diverged) when
    the estimate is not positive. Recorded in ``info.extra``.
    """
    if scale is None:
        lam = _lambda_max(op, B, batch_size, seed)
        # reported like any other divergence (influence() raises SolverDivergedError)
        if not lam > 0:
            info.diverged = True
            info.message = (
                f"the estimated largest eigenvalue of C is {lam:.3g} (not positive: the Hessian "
                "may be "
                "indefinite); use curvature='ggn', more damping, or pass solver_options={'scale': "
                "...}"
            )
            return None
        scale = 1.1 * lam
        info.extra["lambda_max_estimate"] = lam
    if not (scale > 0 and math.isfinite(scale)):  # an estimate that overflowed
        raise ValueError(f"lissa: scale must be a positive number, got {scale!r}.")
    info.extra["scale"] = float(scale)
    return scale


def _lissa_recursion(op, B: Tensor, scale: float, depth: int, batch_size, gen, info: SolveInfo,
                     bar) -> Tensor | None:
    """One repeat: ``depth`` steps of the recursion from ``h = B``; ``None`` (``info`` diverged)
    when it blows up. Counts its steps in ``info.iterations``.
    """
    n = op.prob.n_train
    bound = 1e6 * max(float(B.norm(dim=1).max()), 1e-300) * depth
    h = B.clone()
    for j in range(depth):
        bar.update()
        idx = (
            None
            if batch_size is None or batch_size >= n
            else torch.randperm(n, generator=gen)[:batch_size]
        )
        h = B + h - op.matvec(h, index=idx.to(op.prob.device) if idx is not None else None) / scale
        if (j % 10 == 9 or j == depth - 1) and not (
            torch.isfinite(h).all() and float(h.norm(dim=1).max()) < bound
        ):
            info.diverged = True
            info.iterations += j + 1
            info.message = (
                f"LiSSA diverged at step {j + 1} with scale={scale:.4g}: the scale must exceed "
                "half the largest "
                "eigenvalue of the damped curvature (leave scale=None to estimate it, or "
                "increase it)"
            )
            return None
    info.iterations += depth
    return h


SOLVERS = {"exact": solve_exact, "cg": solve_cg, "lissa": solve_lissa}


def solve(op, B: Tensor, solver: str = "cg", **options) -> tuple[Tensor, SolveInfo]:
    """Solve ``C X = B`` row-wise with the named solver; returns ``(X, SolveInfo)``.

    Raises:
        ValueError: unknown solver or unknown option (the message lists the valid ones).
    """
    check_options(solver, options)
    fn = SOLVERS[solver]
    single = B.dim() == 1
    B2 = B.unsqueeze(0) if single else B
    t0 = time.perf_counter()
    X, info = fn(op, B2, **options)
    info.seconds = time.perf_counter() - t0
    log.debug("solve %s: %s", solver, info)
    return (X[0] if single else X), info
