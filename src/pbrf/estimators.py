"""Training-data attribution estimators behind one interface, with their cost.

Every estimator answers the same question as :func:`pbrf.influence`, in the same conventions:
``scores[t, k]`` estimates how much removing the set ``r_k`` *increases* the loss of test point
``t`` (positive = the set helped that test point), summed over the set's points, and scaled like
``(1/N) ∇m_tᵀ C⁻¹ Σ_{i∈r_k} ∇L_i`` where the method has a natural scale. ::

    from pbrf import estimators, load_run
    run = load_run("runs/digits-mlp")
    result = estimators.get("arnoldi", rank=50).scores(run)      # [n_test, n_removals] + cost
    print(result.seconds, result.peak_memory_bytes)

Built in (``estimators.ESTIMATORS``):

* ``influence-exact``, ``influence-cg``, ``influence-lissa`` — :func:`pbrf.influence` with that
  solver: ``C = G + (wd + λ) I`` (or the damped Hessian).
* ``influence-lissa-published`` — LiSSA in the published setting (Koh & Liang 2017; Bae et al.
  2022): recursion depth ``N`` (the problem's training points), batch size 1 and a tuned scale
  (:class:`PublishedLissaInfluence`), kept truncated whatever residual that leaves.
* ``arnoldi`` — the top ``rank`` eigenpairs ``(μ_j, u_j)`` of ``C`` by Lanczos with full
  reorthogonalisation (Schioppa et al. 2022): ``(1/N) Σ_j (∇m_t·u_j)(u_j·∇L_i)/μ_j``; the
  complement of the top eigenspace is dropped. With ``rank = p`` it equals exact influence.
* ``grad-dot`` — ``(1/N) ∇m_t·∇L_i`` (``C = I``); ``grad-cos`` — the cosine of the two gradients.
* ``tracin`` — TracIn-CP (Pruthi et al. 2020): ``(1/N) Σ_c η_c ∇m_t(θ_c)·∇L_i(θ_c)`` over the
  base training's checkpoints (``train.checkpoints = n`` in a run's config).
* ``trak`` — TRAK-style (Park et al. 2023): gradients projected by a seeded Gaussian matrix ``P``
  ``[p, dim]`` (``PᵀP ≈ I``), Gauss–Newton in the projected space:
  ``(1/N) (Pᵀ∇m_t)ᵀ (PᵀCP)⁺ (Pᵀ∇L_i)``, averaged over ``ensemble`` independent projections. With
  ``dim ≥ p`` it equals exact Gauss–Newton influence.
* ``kronfluence-ekfac``, ``kronfluence-kfac`` — through the optional kronfluence package
  (:mod:`pbrf.kron`), converted to these conventions.

Cost: :meth:`Estimator.scores` returns the wall time and the peak memory of the call: on the CPU
the resident set sampled every 2 ms above its level at the start (freed heap pages are returned to
the OS first, so the growth shows), on a GPU CUDA's peak allocation.

Residual: every estimator that solves a system with the damped curvature ``C`` (the run's ggn or
hessian at the resolved damping) reports, in ``EstimatorResult.residual``, how well it solved it:
the relative residual ``‖C x_t − g_t‖ / ‖g_t‖`` of its implied preconditioned test gradient ``x_t``
for each test point ``t`` (``g_t`` = the test point's measurement gradient), as its max and median
over the test points. ``x_t`` is the solve's row for the influence estimators,
``Uᵀ diag(1/μ) U g_t`` for arnoldi and ``P (PᵀCP)⁺ Pᵀ g_t`` (mean over the ensemble) for trak. It
is computed after the timed part (one batched curvature product over the test points), so
``seconds`` and the peak memory are those of the scores alone. The methods without ``C``
(grad-dot, grad-cos, tracin) and kronfluence (its own solve, outside pbrf) report ``None``.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .curvature import CURVATURES, CurvatureOperator
from .fileio import dumps
from .influence import check_solve, normalize_removals, per_example_grads, removal_matrix
from .kron import kronfluence_scores
from .problem import Problem
from .solvers import SolveInfo, SolverDivergedError, check_options, check_values, solve

__all__ = [
    "Estimator",
    "EstimatorResult",
    "EstimatorUnavailable",
    "ESTIMATORS",
    "register",
    "get",
    "MemoryMeter",
    "lanczos",
]

class EstimatorUnavailable(RuntimeError):
    """The estimator cannot run here (missing optional package or training checkpoints)."""


@dataclass
class EstimatorResult:
    """Scores ``[n_test, n_removals]`` in pbrf's conventions, with what they cost.

    ``residual``: ``{"max", "median", "what"}`` — the max and median over the test points of the
    relative residual ``‖C x_t − g_t‖ / ‖g_t‖`` of the estimator's implied ``x_t ≈ C⁻¹ g_t``
    (``C`` the damped curvature it was given, ``g_t`` the test gradient; ``what`` names ``x_t``);
    ``None`` for methods that solve no system with ``C``. ``diagnostics``: the solver's
    :class:`~pbrf.solvers.SolveInfo` for the influence estimators (iterations, the LiSSA scale and
    the scales tried when tuned), else empty. Neither is part of the timed work.
    """

    name: str
    scores: Tensor
    seconds: float
    peak_memory_bytes: int | None
    hyperparameters: dict = field(default_factory=dict)
    residual: dict | None = None
    diagnostics: dict = field(default_factory=dict)


class MemoryMeter:
    """Peak memory of a block: CUDA's peak allocation, else the resident set size sampled by a
    thread every ``interval`` seconds, above its level at the start (``None`` if unreadable).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device, self.interval = torch.device(device), interval
        self.peak: int | None = None
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int | None:
        """This process's resident set size in bytes (Linux ``/proc``), else ``None``."""
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self, base: int) -> None:
        while not self._stop.is_set():
            now = self.rss()
            if now is not None:
                self.peak = max(self.peak or 0, now - base)
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_memory()
        base = self.rss()
        if base is not None:
            self.peak = 0
            self._thread = threading.Thread(target=self._sample, args=(base,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``): the next block's growth shows."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Estimator:
    """One attribution method. Subclasses implement :meth:`point_scores`.

    Hyperparameters are keyword arguments of the constructor (validated there) and are reported
    with every result. ``damping`` and ``curvature`` default to the run's when scoring a run.
    """

    name = "estimator"
    #: one plain line for ``pbrf estimators --list``
    summary = ""
    #: whether the default damping / curvature of a run apply (False for methods without C)
    uses_curvature = True
    #: the hyperparameters the method takes (``damping`` and ``curvature`` added with curvature)
    options: tuple[str, ...] = ()

    def __init__(self, **hyperparameters) -> None:
        allowed = set(self.options) | ({"damping", "curvature"} if self.uses_curvature else set())
        unknown = sorted(set(hyperparameters) - allowed)
        if unknown:
            raise ValueError(f"{self.name} has no hyperparameter {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(allowed)) or 'none'}.")
        check_values(f"{self.name}: ", hyperparameters, _SHARED_RULES)
        self.hyperparameters = dict(hyperparameters)

    def check_size(self, problem: Problem) -> None:
        """Refuse (``ValueError``, one line), before any work, hyperparameters whose arrays cannot
        fit in memory on ``problem``'s device; nothing to check by default.
        """

    #: what the implied ``x_t`` of :meth:`residual` is (a short phrase; methods that solve with C)
    implied = ""

    def point_scores(
        self, problem: Problem, test: tuple[Tensor, Tensor], points: Tensor, context: dict
    ) -> Tensor:
        """Scores of the single training points ``points`` (``[u]`` indices) on the prepared test
        points ``(x, targets)``: ``[n_test, u]``.

        A method that solves with ``C`` leaves ``context["implied"] = (g_test, x)``: the test
        gradients ``[n_test, p]`` and its implied ``x_t ≈ C⁻¹ g_t`` as rows, or a function of no
        arguments that builds them (called after the timed part); optionally
        ``context["diagnostics"]`` (a dict).
        """
        raise NotImplementedError

    def residual(self, problem: Problem, test: tuple[Tensor, Tensor], context: dict) -> dict | None:
        """``{"max", "median", "what"}`` of the relative residuals ``‖C x_t − g_t‖ / ‖g_t‖`` over
        the test points, from what :meth:`point_scores` left in ``context`` (``None`` if nothing:
        the method solves no system with ``C``). One batched curvature product; ``‖g_t‖ = 0``
        gives ``‖C x_t‖``, as the solvers report.
        """
        if context.get("implied") is None:
            return None
        g, x = context["implied"]
        x = x() if callable(x) else x
        op = CurvatureOperator(problem, context["curvature"], context["damping"])
        r, gn = (op.matvec(x) - g).norm(dim=1), g.norm(dim=1)
        rows = torch.where(gn > 0, r / gn.clamp_min(torch.finfo(g.dtype).tiny), r).double()
        return {"max": float(rows.max()), "median": float(rows.quantile(0.5)),
                "what": self.implied}

    def reported(self, context: dict) -> dict:
        """The resolved hyperparameters as reported with a result (JSON-able, no tensors): what
        stored scores are compared with before they are reused.
        """
        return _plain(self.resolved(context))

    def resolved(self, context: dict) -> dict:
        """The hyperparameters used, with the run's defaults filled in."""
        hp = dict(self.hyperparameters)
        if self.uses_curvature:
            hp.setdefault("damping", context.get("damping", 1e-2))
            hp.setdefault("curvature", context.get("curvature", "ggn"))
        return hp

    def scores(self, run_or_problem, test=None, removals=None) -> EstimatorResult:
        """Scores of ``removals`` on ``test`` and their cost.

        Args:
            run_or_problem: a :class:`~pbrf.experiment.run.load.Run` (its float64 problem, test
                points, removal sets and damping are the defaults) or a :class:`~pbrf.Problem`.
            test: ``(x, y)``; default the run's test points.
            removals: single points or groups as in :func:`pbrf.influence`; default the run's.
        """
        problem, test, removals, context = _unpack(run_or_problem, test, removals)
        context["n_train"] = problem.n_train
        groups = normalize_removals(removals, problem.n_train)
        xt, tt = problem.prepare(test, "test")
        hp = self.resolved(context)
        work = {**context, **hp}  # point_scores may leave its implied solve here
        with MemoryMeter(problem.device) as meter:
            start = time.perf_counter()
            unique, R = removal_matrix(groups, problem.device, problem.dtype)
            point = self.point_scores(problem, (xt, tt), unique, work)
            out = point @ R
            if problem.device.type == "cuda":
                torch.cuda.synchronize(problem.device)
            seconds = time.perf_counter() - start
        residual = self.residual(problem, (xt, tt), work)  # after the timed part
        return EstimatorResult(self.name, out.detach(), seconds, meter.peak, _plain(hp), residual,
                               dict(work.get("diagnostics") or {}))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Checks of the hyperparameters several estimators share: (valid?, requirement, example).
#: A curvature that is not a string is an operator, checked by :class:`CurvatureOperator`.
_SHARED_RULES: dict[str, tuple[Callable, str, str]] = {
    "damping": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0, "a finite number >= 0", "damping=1e-3"),
    "curvature": (lambda v: not isinstance(v, str) or v in CURVATURES,
                  f"one of {', '.join(CURVATURES)}", "curvature=ggn"),
    "seed": (_is_int, "an integer", "seed=0"),
}


def _plain(hp: dict) -> dict:
    """JSON-able hyperparameters: scalars as they are, option dicts as compact text (no tensors)."""
    out = {}
    for k, v in hp.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = dumps(v, sort_keys=True)
    return out


def _unpack(run_or_problem, test, removals) -> tuple[Problem, tuple, object, dict]:
    if isinstance(run_or_problem, Problem):
        if test is None or removals is None:
            raise ValueError("estimators: with a Problem, pass test=(x, y) and removals=...")
        return run_or_problem, test, removals, {}
    run = run_or_problem
    if not hasattr(run, "measure_problem"):
        raise TypeError(
            "estimators: pass a pbrf.Run (pbrf.load_run) or a pbrf.Problem, got "
            f"{type(run).__name__}."
        )
    context = {"damping": run.damping, "curvature": run.curvature, "run": run}
    return (
        run.measure_problem,
        run.test if test is None else test,
        run.removals if removals is None else removals,
        context,
    )


def _train_grads(problem: Problem, points: Tensor, theta: Tensor | None = None) -> Tensor:
    return per_example_grads(problem, problem.x[points], problem.t[points], theta=theta)


def _chunked_dot(
    problem: Problem,
    left: Tensor,
    points: Tensor,
    theta: Tensor | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``left @ g_iᵀ`` over training points in chunks (gradients never all in memory)."""
    cols = []
    for s in problem.chunks(len(points)):
        g = _train_grads(problem, points[s], theta)
        cols.append(left @ (g if transform is None else transform(g)).T)
    return torch.cat(cols, dim=1) if cols else left.new_zeros(left.shape[0], 0)


ESTIMATORS: dict[str, type[Estimator]] = {}


def register(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator adding an :class:`Estimator` to :data:`ESTIMATORS` under ``name``."""

    def deco(cls: type[Estimator]) -> type[Estimator]:
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return deco


def get(name: str, **hyperparameters) -> Estimator:
    """The estimator ``name`` with hyperparameters (``ValueError`` naming the choices)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}.")
    return ESTIMATORS[name](**hyperparameters)


# ---------------------------------------------------------------------------- influence
class _Influence(Estimator):
    options = ("solver_options",)
    solver = "exact"
    implied = "the solver's solution x_t of C x = g_t"
    #: whether a run's own influence solver options apply when its solver is this one
    run_options = True

    def __init__(self, **hp) -> None:
        super().__init__(**hp)
        options = hp.get("solver_options")
        if options is not None:
            if not isinstance(options, dict):
                raise ValueError(f"{self.name}: solver_options={options!r} is invalid; it must be "
                                 "a table of solver options (e.g. solver_options={tol=1e-6}).")
            try:
                check_options(self.solver, options)
            except ValueError as err:
                raise ValueError(f"{self.name}: solver_options: {err}") from None

    def resolved(self, context: dict) -> dict:
        hp = super().resolved(context)
        run = context.get("run")
        if (
            self.run_options
            and "solver_options" not in hp
            and run is not None
            and run.influence_settings.get("solver") == self.solver
        ):
            hp["solver_options"] = dict(run.influence_settings.get("solver_options") or {})
        return hp

    def point_scores(self, problem, test, points, context):
        """:func:`pbrf.influence`'s computation (rows ``x_t = C⁻¹ g_t``, then ``x_t·∇L_i / N``),
        keeping the solution for :meth:`residual`.
        """
        op = CurvatureOperator(problem, context["curvature"], context["damping"])
        g_test = per_example_grads(problem, *test)
        X, info = self.solve_rows(op, g_test, context)
        context["implied"] = (g_test, X)
        context["diagnostics"] = info.to_dict()
        return _chunked_dot(problem, X, points) / problem.n_train

    def solve_rows(
        self, op: CurvatureOperator, B: Tensor, context: dict
    ) -> tuple[Tensor, SolveInfo]:
        """``C X = B`` with this estimator's solver and options (as :func:`pbrf.influence`)."""
        return check_solve(*solve(op, B, self.solver, **(context.get("solver_options") or {})))


_SUMMARIES = {
    "influence-exact": "exact influence: dense Cholesky solve of C (p up to max_params)",
    "influence-cg": "influence with conjugate gradients (solver_options: max_iter, tol)",
    "influence-lissa": "influence with LiSSA (solver_options: depth, batch_size, scale)",
    "influence-lissa-published": (
        "LiSSA as published: depth N, batch size 1, scale = smallest lambda_max*10^k (k=0..8) "
        "that does not diverge"
    ),
    "kronfluence-ekfac": "EK-FAC influence through kronfluence (optional package)",
    "kronfluence-kfac": "K-FAC influence through kronfluence (optional package)",
}


def _variant(base: type[Estimator], name: str, cls_name: str, **attrs) -> type:
    """Register a subclass of ``base`` that differs only in class attributes (e.g. the solver)."""
    body = {"__doc__": _SUMMARIES[name], "summary": _SUMMARIES[name], **attrs}
    return register(name)(type(cls_name, (base,), body))


ExactInfluence = _variant(_Influence, "influence-exact", "ExactInfluence", solver="exact")
CGInfluence = _variant(_Influence, "influence-cg", "CGInfluence", solver="cg")
LissaInfluence = _variant(_Influence, "influence-lissa", "LissaInfluence", solver="lissa")

#: Powers of ten ``k`` of the published LiSSA's scale grid ``λ̂ · 10^k``, tried in this order.
PUBLISHED_SCALE_POWERS = tuple(range(9))
#: Lanczos steps of the estimate ``λ̂`` of the largest eigenvalue of ``C`` (at most ``p``).
PUBLISHED_LANCZOS_STEPS = 20


@register("influence-lissa-published")
class PublishedLissaInfluence(_Influence):
    """LiSSA in the published setting (Koh & Liang 2017; Bae et al. 2022), *not* run to
    convergence: recursion depth ``N`` (the problem's number of training points, resolved when it
    runs and reported as ``depth``), batch size 1 (``batch_size``), one repeat, and a tuned scale.

    Tuning rule of the scale: ``λ̂`` = the largest eigenvalue of the damped curvature ``C``
    estimated by :data:`PUBLISHED_LANCZOS_STEPS` Lanczos steps (:func:`lanczos`, seeded with the
    solver seed); the candidates are ``λ̂ · 10^k`` for ``k = 0, 1, …, 8``
    (:data:`PUBLISHED_SCALE_POWERS`), and the scale is the smallest of them whose depth-``N``
    recursion does not diverge — as ``solve_lissa`` reports divergence: non-finite values, growth
    beyond its bound, or a relative residual of 1 or more (no better than ``x = 0``). The grid
    starts at ``λ̂`` because a smaller power of ten lies below ``λ_max / 2``, where even the
    full-batch recursion diverges. The result of the first candidate that does not diverge is the
    estimate (no extra solve); the failed candidates are part of the timed cost. All candidates
    diverging raises :class:`~pbrf.solvers.SolverDivergedError`. ``diagnostics`` holds the scale
    used, ``lambda_max_estimate`` and ``scale_trials``.

    ``solver_options`` override any of it (``depth``, ``batch_size``, ``repeats``, ``seed``; a
    ``scale`` fixes the scale and skips the tuning); the run's own influence solver options do
    not apply. The depth stays as set whatever residual it leaves: beside ``influence-lissa`` (run
    to convergence) it shows what the published truncated setting gives.
    """

    summary = _SUMMARIES["influence-lissa-published"]
    solver = "lissa"
    run_options = False

    def resolved(self, context: dict) -> dict:
        hp = super().resolved(context)
        options = hp.get("solver_options") or {}
        run = context.get("run")
        n = context.get("n_train", run.n_train if run is not None else None)
        hp["depth"] = options.get("depth", n if n is not None else "N")
        hp["batch_size"] = options.get("batch_size", 1)
        hp["scale"] = "tuned" if options.get("scale") is None else options["scale"]
        return hp

    def solve_rows(
        self, op: CurvatureOperator, B: Tensor, context: dict
    ) -> tuple[Tensor, SolveInfo]:
        """The depth-``N`` LiSSA solve with the tuned scale (class docstring)."""
        options = {**(context.get("solver_options") or {}),
                   "depth": context["depth"], "batch_size": context["batch_size"]}
        if options.get("scale") is not None:
            return check_solve(*solve(op, B, "lissa", **options))
        steps = min(PUBLISHED_LANCZOS_STEPS, op.n_params)
        lam = float(lanczos(op.matvec, op.n_params, steps, op.theta, options.get("seed", 0))[0][0])
        if not (lam > 0 and math.isfinite(lam)):
            raise SolverDivergedError(
                f"{self.name}: the estimated largest eigenvalue of C is {lam:.3g} (not positive); "
                "use curvature='ggn', more damping, or pass solver_options={scale=...}"
            )
        trials = []
        for k in PUBLISHED_SCALE_POWERS:
            trials.append(lam * 10.0**k)
            X, info = solve(op, B, "lissa", **{**options, "scale": trials[-1]})
            if not info.diverged:
                info.extra.update(lambda_max_estimate=lam, scale_trials=trials)
                return check_solve(X, info)
        tried = ", ".join(f"{s:.3g}" for s in trials)
        raise SolverDivergedError(
            f"{self.name}: LiSSA diverged at every scale tried ({tried}); last: {info.message}"
        )


# ---------------------------------------------------------------------------- Arnoldi
def lanczos(
    matvec: Callable[[Tensor], Tensor], p: int, steps: int, like: Tensor, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric operator from ``steps`` Lanczos iterations with full
    reorthogonalisation (restarted with a fresh random direction on an invariant subspace).

    Returns ``(values [steps], vectors [steps, p])``, values in decreasing order.
    """
    steps = min(steps, p)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = like.new_zeros(steps, p)
    alpha, beta = like.new_zeros(steps), like.new_zeros(steps)

    def fresh(j: int) -> Tensor:
        for _ in range(5):
            q = torch.randn(p, generator=gen, dtype=like.dtype).to(like.device)
            for _ in range(2):
                q = q - Q[:j].T @ (Q[:j] @ q)
            n = q.norm()
            if n > 1e-8:
                return q / n
        raise RuntimeError("lanczos: cannot find a new direction")

    q, prev = fresh(0), None
    for j in range(steps):
        Q[j] = q
        w = matvec(q)
        alpha[j] = q @ w
        w = w - alpha[j] * q - (beta[j - 1] * prev if prev is not None and j > 0 else 0)
        for _ in range(2):  # full reorthogonalisation, twice
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        if j + 1 == steps:
            break
        b = w.norm()
        scale = alpha[: j + 1].abs().max()
        if b <= 1e-10 * max(float(scale), 1e-300):  # invariant subspace: restart, no coupling
            beta[j], prev, q = 0.0, None, fresh(j + 1)
        else:
            beta[j], prev, q = b, q, w / b
    T = torch.diag(alpha) + torch.diag(beta[: steps - 1], 1) + torch.diag(beta[: steps - 1], -1)
    vals, S = torch.linalg.eigh(T)
    order = torch.argsort(vals, descending=True)
    return vals[order], (Q.T @ S[:, order]).T


@register("arnoldi")
class Arnoldi(Estimator):
    """Influence in the top-``rank`` eigenspace of ``C`` (``iterations`` Lanczos steps, default
    ``2·rank``; ``seed``).
    """

    summary = "influence in the top-rank eigenspace of C, by Lanczos (rank, iterations, seed)"
    options = ("rank", "iterations", "seed")
    implied = "the truncated inverse U^T diag(1/mu) U g_t"

    def __init__(self, rank: int = 50, iterations: int | None = None, seed: int = 0, **hp) -> None:
        if not (_is_int(rank) and rank > 0):
            raise ValueError(f"arnoldi: rank must be a positive int, got {rank!r}.")
        if iterations is not None and not (_is_int(iterations) and iterations >= rank):
            raise ValueError(
                f"arnoldi: iterations must be an int >= rank ({rank}), got {iterations!r}."
            )
        super().__init__(rank=rank, iterations=iterations or 2 * rank, seed=seed, **hp)

    def point_scores(self, problem, test, points, context):
        op = CurvatureOperator(problem, context["curvature"], context["damping"])
        vals, U = lanczos(
            op.matvec, problem.n_params, context["iterations"], problem.theta, context["seed"]
        )
        rank = min(context["rank"], len(vals))
        vals, U = vals[:rank], U[:rank]
        if bool((vals <= 0).any()):
            raise ValueError(
                "arnoldi: the damped curvature has non-positive eigenvalues; raise the damping."
            )
        g_test = per_example_grads(problem, *test)
        left = (g_test @ U.T) / vals  # [n_test, rank]
        context["implied"] = (g_test, lambda: left @ U)  # x_t = Uᵀ diag(1/μ) U g_t
        return _chunked_dot(problem, left, points, transform=lambda g: g @ U.T) / problem.n_train


# ---------------------------------------------------------------------------- gradient similarity
@register("grad-dot")
class GradDot(Estimator):
    """``(1/N) ∇m_t·∇L_i`` at θ^s: influence with ``C = I``. It solves no system with the damped
    curvature, so its ``residual`` is ``None``.
    """

    summary = "(1/N) gradient dot product: influence with C = I"

    uses_curvature = False

    def point_scores(self, problem, test, points, context):
        return _chunked_dot(problem, per_example_grads(problem, *test), points) / problem.n_train


@register("grad-cos")
class GradCos(Estimator):
    """Cosine similarity of ``∇m_t`` and ``∇L_i`` at θ^s (summed over a group's points). No
    system with the damped curvature is solved: its ``residual`` is ``None``.
    """

    summary = "cosine similarity of test and training gradients"

    uses_curvature = False

    def point_scores(self, problem, test, points, context):
        g = per_example_grads(problem, *test)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return _chunked_dot(
            problem,
            g,
            points,
            transform=lambda h: h / h.norm(dim=1, keepdim=True).clamp_min(1e-300),
        )


# ---------------------------------------------------------------------------- TracIn
@register("tracin")
class TracIn(Estimator):
    """TracIn-CP over training checkpoints: ``(1/N) Σ_c η_c ∇m_t(θ_c)·∇L_i(θ_c)``.

    Checkpoints come from the run (``train.checkpoints``) or ``checkpoints=[{"params", "lr"}]``;
    ``lr_weighted=False`` drops ``η_c``. No system with the damped curvature is solved: its
    ``residual`` is ``None``.
    """

    summary = "TracIn-CP over the base training checkpoints (train.checkpoints; lr_weighted)"
    options = ("lr_weighted",)

    uses_curvature = False

    def __init__(
        self, checkpoints: list[dict] | None = None, lr_weighted: bool = True, **hp
    ) -> None:
        if not isinstance(lr_weighted, bool):
            raise ValueError(f"tracin: lr_weighted={lr_weighted!r} is invalid; it must be true or "
                             "false (e.g. lr_weighted=false).")
        super().__init__(lr_weighted=lr_weighted, **hp)
        self._checkpoints = checkpoints

    def point_scores(self, problem, test, points, context):
        cks = self._checkpoints
        if cks is None and context.get("run") is not None:
            cks = context["run"].training_checkpoints()
        if not cks:
            raise EstimatorUnavailable(
                "tracin needs training checkpoints: set train.checkpoints (e.g. --set "
                "train.checkpoints=5) in the run's config and run it again, or pass "
                "checkpoints=[{'params': ..., 'lr': ...}]."
            )
        out = None
        for ck in cks:
            theta = problem.flatten({k: v.to(problem.theta) for k, v in ck["params"].items()})
            g_test = per_example_grads(problem, *test, theta=theta)
            eta = float(ck.get("lr", 1.0)) if context["lr_weighted"] else 1.0
            term = eta * _chunked_dot(problem, g_test, points, theta=theta)
            out = term if out is None else out + term
        return out / problem.n_train

    def resolved(self, context: dict) -> dict:
        hp = super().resolved(context)
        cks = self._checkpoints
        if cks is None and context.get("run") is not None:
            cks = context["run"].training_checkpoints()
        hp["n_checkpoints"] = len(cks or [])
        return hp


# ---------------------------------------------------------------------------- TRAK
@register("trak")
class Trak(Estimator):
    """Projected-gradient Gauss–Newton influence (``dim``: projection size, ``ensemble``:
    independent projections averaged, ``seed``).

    Its implied ``x_t`` (for ``residual``) is the projection's inverse in parameter space,
    ``P (PᵀCP)⁺ Pᵀ g_t``, averaged over the ensemble as the scores are; the projections are drawn
    again from their seeds after the timed part.
    """

    summary = (
        "TRAK-style: random projection, Gauss-Newton in the projected space (dim, ensemble, seed)"
    )
    options = ("dim", "ensemble", "seed")
    implied = "the projected inverse P (P^T C P)^+ P^T g_t, ensemble mean"

    def __init__(self, dim: int = 512, ensemble: int = 1, seed: int = 0, **hp) -> None:
        if not (_is_int(dim) and dim > 0) or not (_is_int(ensemble) and ensemble > 0):
            raise ValueError(
                f"trak: dim and ensemble must be positive ints, got {dim!r}, {ensemble!r}."
            )
        super().__init__(dim=dim, ensemble=ensemble, seed=seed, **hp)

    @staticmethod
    def projection(p: int, dim: int, seed: int, like: Tensor) -> Tensor:
        """The seeded Gaussian projection ``[p, dim]`` with ``E[PᵀP] = I``."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randn(p, dim, generator=gen, dtype=like.dtype) / math.sqrt(dim)).to(
            like.device
        )

    def check_size(self, problem: Problem) -> None:
        """The projections and the projected curvature: ``2·p·dim + 3·dim²`` numbers."""
        dim = self.hyperparameters.get("dim", 512)
        _check_fits("trak", "dim", dim, problem.theta, 2 * problem.n_params * dim + 3 * dim ** 2)

    def point_scores(self, problem, test, points, context):
        self.check_size(problem)
        op = CurvatureOperator(problem, context["curvature"], context["damping"])
        g_test = per_example_grads(problem, *test)
        out, lefts = None, []
        for e in range(context["ensemble"]):
            P = self.projection(
                problem.n_params, context["dim"], context["seed"] + e, problem.theta
            )
            CP = torch.cat(
                [op.matvec(P[:, s].T.contiguous()) for s in _blocks(P.shape[1], 64)]
            )  # rows (C P_j)ᵀ
            M = P.T @ CP.T
            M = 0.5 * (M + M.T)
            vals, V = torch.linalg.eigh(M)
            keep = vals > vals.abs().max() * 1e-12  # pseudo-inverse: dim > p leaves a null space
            Minv = (V[:, keep] / vals[keep]) @ V[:, keep].T
            left = (g_test @ P) @ Minv
            lefts.append(left)
            term = _chunked_dot(problem, left, points, transform=lambda g: g @ P) / problem.n_train
            out = term if out is None else out + term
        context["implied"] = (g_test, lambda: self.implied_rows(problem, lefts, context))
        return out / context["ensemble"]

    def implied_rows(self, problem: Problem, lefts: list[Tensor], context: dict) -> Tensor:
        """``x_t = mean_e P_e M_e⁺ P_eᵀ g_t`` from the rows ``lefts[e] = g_tᵀ P_e M_e⁺``, the
        projections drawn again from their seeds.
        """
        p, dim, seed = problem.n_params, context["dim"], context["seed"]
        x = sum(left @ self.projection(p, dim, seed + e, problem.theta).T
                for e, left in enumerate(lefts))
        return x / len(lefts)


def proc_bytes(path: str, key: str) -> int | None:
    """The ``key: N kB`` field of a Linux ``/proc`` file in bytes; ``None`` if unreadable."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (``MemAvailable`` for the CPU); ``None`` if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = proc_bytes("/proc/meminfo", "MemAvailable")
    if free is not None:
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(name: str, option: str, value: int, like: Tensor, elements: int) -> None:
    """Refuse, before allocating, an option whose arrays (``elements`` of ``like``'s dtype) exceed
    the free memory of ``like``'s device.
    """
    need, free = elements * like.element_size(), available_bytes(like.device)
    if free is not None and need > free:
        raise ValueError(
            f"{name}: {option}={value} needs about {need / 2**30:.3g} GiB for its arrays, more "
            f"than the {free / 2**30:.3g} GiB free on {like.device}; lower --hp "
            f"{name}.{option}."
        )


def _blocks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


# ---------------------------------------------------------------------------- kronfluence
class _Kronfluence(Estimator):
    """Influence through kronfluence; its solve (K-FAC / EK-FAC) is kronfluence's, outside pbrf,
    so its ``residual`` is ``None``.
    """

    options = ("seed",)
    strategy = "ekfac"

    def __init__(self, seed: int = 0, **hp) -> None:
        super().__init__(seed=seed, **hp)

    def point_scores(self, problem, test, points, context):
        try:
            return kronfluence_scores(
                problem,
                test,
                points,
                strategy=self.strategy,
                damping=context["damping"],
                dtype=problem.dtype,
                seed=context["seed"],
            )
        except ImportError as err:  # the optional package is missing
            raise EstimatorUnavailable(str(err)) from None


KronfluenceEKFAC = _variant(_Kronfluence, "kronfluence-ekfac", "KronfluenceEKFAC", strategy="ekfac")
KronfluenceKFAC = _variant(_Kronfluence, "kronfluence-kfac", "KronfluenceKFAC", strategy="kfac")
