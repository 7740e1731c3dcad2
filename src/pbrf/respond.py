"""Response functions (``docs/conventions.md`` §5): what happens to the model when training points
are removed.

For a removal set ``r`` (``|r| = k``) and the trained parameters θ^s:

1. ``cold``: retrain from a fresh initialisation without ``r`` (base recipe, same seed and minibatch
   order as a full-data reference run); ``Δm = m(θ_cold(−r)) − m(θ_cold(full))``, mean over seeds.
2. ``warm``: minimise ``J_{−r}(θ) = J(θ) − (1/N) Σ_{m∈r} L(z_m, θ)`` from θ^s with the base recipe.
3. ``proximal``: minimise ``J_{−r}(θ) + (λ/2) ||θ − θ^s||²`` from θ^s.
4. ``pbrf``: minimise ``(1/N) Σ_i D_L(f(θ, x_i), f(θ^s, x_i)) − (1/N) Σ_{m∈r} L(z_m, θ)
   + ((wd + λ)/2) ||θ − θ^s||²`` from θ^s.
5. ``linearized``: ``θ^s + Δθ_IF`` with ``C = G + (wd + λ) I`` solved accurately.

Every kind is computed for K removal sets at once, in chunks of ``chunk_size`` (results do not
depend on it). PBRF and proximal default to :class:`pbrf.NewtonRecipe`: a batched Gauss–Newton /
Newton–CG trust region (:mod:`pbrf.newton`, full batch) that stops each removal on its certificate;
proximal (and Newton warm-start) removals start from the no-removal continuation. First-order
:class:`pbrf.Recipe` runs stack the K problems and optimise them as one batched problem
(:func:`pbrf.optim.optimize`) on shared minibatches; their data term is ``(1/B) Σ_{i ∈ batch} w_i
L_i`` with ``w_i = 0`` for removed points (an unbiased estimate of the ``1/N``-normalised
``J_{−r}``); in full batch it is exact.

Certificates: every optimised removal gets ``signal = (w/N)||Σ_{m∈r} ∇L_m(θ^s)||``, ``rho`` = final
full-batch gradient norm of its objective / signal, and ``certified`` (see :func:`respond`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from . import kinds
from .diagnostics import RemovalDiagnostics
from .engine import batch_fn, chunks, run_batched, stack
from .influence import (
    Measurement,
    delta_theta,
    normalize_removals,
    per_example_grads,
    removal_gradients,
)
from .kinds import ResponseKind
from .models import reinitialize
from .newton import Batched, NewtonRecipe, Precision, descend, fingerprint, newton_optimize
from .objectives import (  # noqa: F401 (re-exported)
    pbrf_gn,
    pbrf_objective,
    removal_gn,
    removal_objective,
)
from .optim import Recipe
from .problem import Params, Problem

__all__ = ["respond", "Response", "KINDS", "RHO_THRESHOLD", "removal_signal"]

log = logging.getLogger(__name__)

#: The built-in response kinds (:mod:`pbrf.kinds` holds their records; ``kinds.response_names()``
#: includes kinds registered later).
KINDS = kinds.response_names()
#: Each problem's copy in the Newton model's product dtype (weakly keyed: it goes with the problem).
_LOW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Each problem's no-removal continuations (weakly keyed), per kind, damping, recipe and θ: a run
#: calls ``respond`` once per chunk of removals, and every chunk starts from the same one.
_CONTINUATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Each problem's round-off scales at θ^s (weakly keyed, per θ^s): the training objective J(θ^s)
#: and the gradient's floor (see :func:`_roundoff`).
_MAGNITUDES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Training points (evenly spaced) whose gradients size the gradient's round-off floor.
FLOOR_SAMPLE = 256
#: Default certificate threshold: a response is certified when ρ = ||∇F|| / signal ≤ this.
RHO_THRESHOLD = 1e-2


# ---------------------------------------------------------------------------------------- response
@dataclass
class Response:
    """Result of :func:`respond` for K removal sets.

    Attributes:
        kind: the response function.
        groups: the removal sets (index lists), in order.
        params_flat: resulting parameters ``[K, p]`` (cold: ``[S, K, p]``, one row block per seed).
        reference: cold start only: the full-data runs ``[S, p]``.
        diagnostics: one :class:`~pbrf.diagnostics.RemovalDiagnostics` per removal set (steps,
            objective, grad_norm, diverged, and the certificate ``signal``, ``rho``,
            ``certified``; see :func:`respond`); ``to_dict()`` gives the stored JSON.
        first_order: linearized only: measure ``∇mᵀΔθ`` instead of ``m(θ^s + Δθ) − m(θ^s)``.
        paired_reference: warm / proximal with ``paired=True``: the no-removal continuation
            ``[p]`` (same objective without removal, same start, recipe and seed); measure against
            it with ``loss_change(..., paired=True)``.
    """

    kind: str
    groups: list[list[int]]
    problem: Problem = field(repr=False)
    params_flat: Tensor = field(repr=False)
    reference: Tensor | None = field(default=None, repr=False)
    diagnostics: list[RemovalDiagnostics] = field(default_factory=list, repr=False)
    first_order: bool = False
    paired_reference: Tensor | None = field(default=None, repr=False)

    @property
    def n_removals(self) -> int:
        """Number of removal sets ``K``."""
        return len(self.groups)

    @property
    def params(self) -> Params:
        """Resulting parameters as a stacked dict (leading ``[K]``, or ``[S, K]`` for cold)."""
        return self.problem.unflatten(self.params_flat)

    @property
    def delta(self) -> Tensor:
        """Parameter change ``θ_r − θ_ref`` (cold: mean over seeds of ``θ_cold(−r) −
        θ_cold(full)``), ``[K, p]``.
        """
        if self.reference is not None:
            return (self.params_flat - self.reference[:, None]).mean(0)
        return self.params_flat - self.problem.theta

    def to(self, problem: Problem) -> "Response":
        """The same response measured on ``problem`` (e.g. a float64 copy of the problem:
        parameters are cast to its dtype and device, nothing is re-optimised).
        """
        def cast(t):
            return None if t is None else t.to(dtype=problem.dtype, device=problem.device)

        return dataclasses.replace(self, problem=problem, params_flat=cast(self.params_flat),
                                   reference=cast(self.reference),
                                       paired_reference=cast(self.paired_reference))

    def _paired(self, paired: bool) -> "Response":
        if not paired:
            return self
        if self.paired_reference is None:
            raise ValueError(f"{self.kind} response has no paired reference; compute it with "
                             "respond(..., paired=True).")
        return dataclasses.replace(self, reference=self.paired_reference[None],
                                   params_flat=self.params_flat[None], paired_reference=None)

    def _map(self, fn: Callable[[Tensor], Tensor], thetas: Tensor, chunk: int = 64) -> Tensor:
        return torch.cat([vmap(fn)(thetas[s : s + chunk]) for s in range(0, thetas.shape[0],
            chunk)])

    def loss_change(self, test, measurement: Measurement | None = None,
                    first_order: bool | None = None,
                    paired: bool = False) -> Tensor:
        """``Δm = m(θ_r) − m(θ_ref)`` for each test point and removal set, ``[n_test, K]``.

        ``m`` is the per-example test loss unless ``measurement`` is given. Positive means removing
        the set increased the test loss. Cold start: averaged over seeds, relative to the full-data
        run of the same seed. Linearized (``first_order``, its default): ``∇m(θ^s)ᵀ Δθ``.
        ``paired`` (warm / proximal computed with ``paired=True``): relative to the no-removal
        continuation instead of θ^s, which removes the removal-independent drift.
        """
        if paired:
            return self._paired(True).loss_change(test, measurement, first_order)
        prob = self.problem
        xt, tt = prob.prepare(test, "test")
        meas = prob.task.loss if measurement is None else measurement
        first_order = self.first_order if first_order is None else first_order
        if first_order:
            return per_example_grads(prob, xt, tt, measurement) @ self.delta.T
        m = lambda th: meas(prob.outputs_flat(th, xt), tt)  # noqa: E731
        if self.reference is not None:  # cold start: the mean of each seed's change
            return self.loss_change_per_seed(test, measurement).mean(0)
        with torch.no_grad():
            return (self._map(m, self.params_flat) - m(prob.theta)).T

    def loss_change_per_seed(self, test, measurement: Measurement | None = None) -> Tensor:
        """Cold start's ``Δm`` of each seed separately, ``[S, n_test, K]`` (``loss_change`` is
        their mean): what a noise floor between seeds is computed from.
        """
        if self.reference is None:
            raise ValueError(f"{self.kind} response has no per-seed runs; only cold start has.")
        prob = self.problem
        xt, tt = prob.prepare(test, "test")
        meas = prob.task.loss if measurement is None else measurement
        m = lambda th: meas(prob.outputs_flat(th, xt), tt)  # noqa: E731
        with torch.no_grad():
            return torch.stack([(self._map(m, P) - m(R)[None]).T
                                for P, R in zip(self.params_flat, self.reference)])

    def output_change(self, test, first_order: bool | None = None, paired: bool = False) -> Tensor:
        """Change of the test outputs ``f(θ_r, x) − f(θ_ref, x)``, ``[K, n_test, *out]`` (cold: mean
        over seeds).

        Linearized with ``first_order``: the Jacobian–vector product ``J Δθ``.
        """
        if paired:
            return self._paired(True).output_change(test, first_order)
        prob = self.problem
        xt, _ = prob.prepare(test, "test")
        f = lambda th: prob.outputs_flat(th, xt)  # noqa: E731
        first_order = self.first_order if first_order is None else first_order
        with torch.no_grad():
            if first_order:
                return self._map(lambda d: jvp(f, (prob.theta,), (d,))[1], self.delta)
            if self.reference is None:
                return self._map(f, self.params_flat) - f(prob.theta)[None]
            return torch.stack([self._map(f, P) - f(R)[None] for P,
                                R in zip(self.params_flat, self.reference)]).mean(0)

    @property
    def certified(self) -> list[bool]:
        """Per removal set: the certificate (ρ ≤ threshold, objective not above its start,
        finite).
        """
        return [bool(d.certified) for d in self.diagnostics]


# ---------------------------------------------------------------------------------------- engine
def _init_params(prob: Problem, model_init, seed: int) -> Params:
    if model_init is None:
        out = {n: p.detach() for n, p in reinitialize(prob.model, seed).named_parameters()}
    else:
        out = model_init(seed)
        if isinstance(out, nn.Module):
            out = {n: p.detach() for n, p in out.named_parameters()}
    return {n: out[n].to(prob.params[n]) for n in prob.names}


def removal_signal(prob: Problem, groups: list[list[int]], weight: float = 1.0) -> Tensor:
    """The removal's own signal ``(w/N) ||Σ_{m∈r} ∇L_m(θ^s)||`` for every group, ``[K]`` (0 for an
    empty group).

    This is the gradient norm of every response objective at θ^s that the removal itself
    contributes; the certificate ρ of a response is its final gradient norm divided by it.
    """
    out = torch.zeros(len(groups), dtype=prob.dtype, device=prob.device)
    nonempty = [k for k, g in enumerate(groups) if g]
    if nonempty:
        grads = removal_gradients(prob, [groups[k] for k in nonempty])
        out[nonempty] = grads.norm(dim=1) * (abs(weight) / prob.n_train)
    return out


def _median_signal(signal: Tensor) -> Tensor:
    """The median of the non-zero signals (1 if none): the scale of a group without its own."""
    positive = signal[signal > 0]
    return positive.median() if positive.numel() else torch.ones((), dtype=signal.dtype)


@dataclass(frozen=True)
class _Setting:
    """What every removal problem of one ``respond`` call shares."""

    prob: Problem
    kind: ResponseKind
    damping: float
    recipe: Recipe | NewtonRecipe
    weight: float
    chunk_size: int
    progress: bool


def _low_problem(prob: Problem, dtype: torch.dtype) -> Problem:
    """``prob`` in the Newton model's product dtype, made once per problem."""
    store = _LOW.setdefault(prob, {})
    if dtype not in store:
        store[dtype] = prob.astype(dtype)
    return store[dtype]


def _model_products(s: _Setting, groups, obj) -> tuple[Precision | None, dict]:
    """The Newton model's products in ``recipe.products`` (``None``: the problem's own dtype) and
    the no-removal aux of the shared model, in that dtype.
    """
    dtype = getattr(torch, s.recipe.products)
    same = dtype == s.prob.dtype
    low = s.prob if same else _low_problem(s.prob, dtype)
    obj = obj if same else s.kind.objective(low, s.damping)
    aux0 = {k: v[0] for k, v in obj.make_aux(low, [[]], s.weight).items()}
    if same:
        return None, aux0
    B = Batched(low, obj.value, obj.gn, obj.make_aux(low, groups, s.weight),
                batch_fn(low, obj.f_ref), obj.removal)
    return Precision(B, s.prob.dtype), aux0


def _run_newton(s: _Setting, groups, signal, desc, start=None, fallback=None):
    """Newton on ``groups`` from θ^s (or ``start``); returns ``(θ [K, p], records)``."""
    obj = s.kind.objective(s.prob, s.damping)
    K = len(groups)
    scale = signal.clone()
    # an empty group (the paired no-removal reference) has no signal of its own: use the batch's
    if fallback is None:
        fallback = _median_signal(signal)
    scale = torch.where(scale > 0, scale, torch.as_tensor(fallback).to(scale))
    theta0 = (s.prob.theta if start is None else start).unsqueeze(0).expand(K, -1).clone()
    low, aux0 = _model_products(s, groups, obj)
    magnitude, grad_floor = _roundoff(s.prob)
    theta, d = newton_optimize(s.prob, obj.value, obj.gn, obj.shift, theta0,
                               obj.make_aux(s.prob, groups, s.weight), scale, s.recipe,
                               batch_fn(s.prob, obj.f_ref), s.progress, desc,
                               exact_from_start=start is not None, removal_fn=obj.removal,
                               aux0=aux0, low=low, magnitude=magnitude, grad_floor=grad_floor,
                               bounded=torch.tensor([not g or (obj.bounded and s.weight <= 1)
                                                     for g in groups], device=theta0.device))
    return theta.detach(), RemovalDiagnostics.newton_rows(d)


def _roundoff(prob: Problem) -> tuple[float, float]:
    """``(J(θ^s), gradient floor)`` once per problem and θ^s. ``J(θ^s)`` is the size of the losses
    every built-in objective is summed from (the round-off of its differences); the gradient
    floor is ``10·eps`` times the mean norm of the per-example loss gradients and of the weight
    decay's, over :data:`FLOOR_SAMPLE` evenly spaced training points (measured on smooth LeNet
    ×0.5, N = 500: eps times that mean is 1.6e-15, and Newton on the no-removal continuation
    stalled at a gradient norm of 1.1e-15, then spent hundreds of CG products there).
    """
    key = fingerprint(prob.theta)
    store = _MAGNITUDES.setdefault(prob, {})
    if key not in store:
        idx = torch.linspace(0, prob.n_train - 1, min(FLOOR_SAMPLE, prob.n_train),
                             device=prob.device).long()
        # a few examples at a time: only their norms are kept, never [FLOOR_SAMPLE, p]
        norms = torch.cat([per_example_grads(prob, prob.x[idx[c]], prob.t[idx[c]]).norm(dim=1)
                           for c in prob.chunks(len(idx), 32)])
        eps = torch.finfo(prob.dtype).eps
        size = float(norms.mean()) + prob.weight_decay * float(prob.theta.norm())
        with torch.no_grad():
            store.clear()
            store[key] = (float(prob.objective()), 10 * eps * size)
    return store[key]


def _continuation(s: _Setting, signal):
    """Warm start / proximal with a NewtonRecipe: the no-removal continuation (the same objective
    without removal, from θ^s), solved once per problem, kind, damping and recipe (kept for the
    next call: a run's chunks); every removal problem then starts from it, so that each only has
    to resolve its own O(1/N) effect instead of the whole drift again.
    """
    fallback = _median_signal(signal)
    key = (s.kind.name, float(s.damping), s.recipe, *fingerprint(s.prob.theta))
    store = _CONTINUATIONS.setdefault(s.prob, {})
    if key not in store:
        # solved to its round-off floor (a vanishing tolerance; it stops when steps no longer
        # reduce the gradient), so that it does not depend on which removals share its chunk
        floor = torch.tensor(torch.finfo(signal.dtype).tiny, dtype=signal.dtype)
        unit = dataclasses.replace(s, weight=1.0)
        th, rows = _run_newton(unit, [[]], signal.new_zeros(1), f"{s.kind.name} continuation",
                               start=_warm_up(unit), fallback=floor)
        store[key] = (th[0], rows[0])
    start, row = store[key]
    return start.clone(), row, fallback


def _warm_up(s: _Setting) -> Tensor | None:
    """The no-removal continuation's L-BFGS warm-up from θ^s (``recipe.warmup`` evaluations at
    most, :func:`pbrf.newton.descend`), or ``None`` (Newton from θ^s) with ``warmup = 0``.
    """
    if not s.recipe.warmup:
        return None
    obj = s.kind.objective(s.prob, s.damping)
    B = Batched(s.prob, obj.value, obj.gn, obj.make_aux(s.prob, [[]], 1.0),
                batch_fn(s.prob, obj.f_ref))
    theta, evals = descend(B, s.prob.theta, s.recipe.warmup)
    log.info("%s continuation: %d L-BFGS evaluations before Newton", s.kind.name, evals)
    return theta


def _from_continuation(th: Tensor, rows: list, groups, start: Tensor, ref_row) -> list:
    """Mark the removals that started from the continuation; an empty group is the continuation
    itself (its parameters and record).
    """
    out = []
    for k, (g, row) in enumerate(zip(groups, rows)):
        if g:
            out.append(row.replace(start="continuation"))
        else:
            th[k] = start
            out.append(ref_row)
    return out


def _first_order_chunk(s: _Setting, groups, init, desc):
    """A first-order recipe on ``groups`` stacked, from ``init`` (θ^s by default)."""
    obj = s.kind.objective(s.prob, s.damping)
    start = s.prob.params if init is None else init
    return run_batched(s.prob, obj.value, stack(start, len(groups)),
                       obj.make_aux(s.prob, groups, s.weight), s.recipe, obj.f_ref, s.progress,
                       desc)


def _optimise_kind(s: _Setting, groups, init=None, signal=None):
    """Optimise the ``kind`` objective for every group; returns ``(params [K, p], records)``.

    With a :class:`NewtonRecipe`, warm and proximal removals start from the no-removal
    continuation (see :func:`_continuation`); an empty group in ``groups`` is that continuation.
    """
    newton = isinstance(s.recipe, NewtonRecipe)
    start = fallback = None
    if newton and s.kind.continuation:
        start, ref_row, fallback = _continuation(s, signal)
    thetas, diags = [], []
    parts = list(chunks(len(groups), s.chunk_size))
    for sl in tqdm(parts, desc=f"{s.kind.name} chunks", leave=False,
                   disable=not s.progress or len(parts) == 1):
        sub, desc = groups[sl], f"{s.kind.name} [{sl.start}:{sl.stop}]"
        if newton:
            th, dg = _run_newton(s, sub, signal[sl], desc, start, fallback)
            if start is not None:
                dg = _from_continuation(th, dg, sub, start, ref_row)
        else:
            th, dg = _first_order_chunk(s, sub, init, desc)
        thetas.append(th)
        diags.extend(dg)
    return torch.cat(thetas), diags


# ---------------------------------------------------------------------------------- arguments
def _is_default(value, default) -> bool:
    if value is default:
        return True
    try:
        return bool(value == default)
    except (TypeError, RuntimeError, ValueError):
        return False


def _refuse_unused(kind: ResponseKind, given: dict, recipe_changes: dict) -> None:
    """``ValueError`` for an argument that ``kind`` does not use, passed with a value other than
    its default (``recipe_changes``: any recipe field, for a kind that takes no recipe).
    """
    used = set(kind.respond_arguments)
    defaults = inspect.signature(respond).parameters
    for name, value in given.items():
        if name not in used and not _is_default(value, defaults[name].default):
            raise ValueError(f"respond: kind {kind.name!r} does not use {name!r}; drop it.")
    if recipe_changes and "recipe_changes" not in used:
        name = sorted(recipe_changes)[0]
        raise ValueError(f"respond: kind {kind.name!r} does not use {name!r}; drop it.")


def _check_args(kind: ResponseKind, seeds, chunk_size, damping, removal_weight, rho_threshold):
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number >= 0 (e.g. 1e-3), got {damping!r}.")
    if not isinstance(removal_weight, (int, float)) or not math.isfinite(removal_weight):
        raise ValueError(f"removal_weight must be a finite number, got {removal_weight!r}.")
    if "seeds" in kind.arguments and (not seeds or not all(isinstance(s, int) for s in seeds)):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}.")
    if not (isinstance(rho_threshold, (int, float)) and rho_threshold > 0):
        raise ValueError(
            f"rho_threshold must be a positive number (e.g. 1e-2), got {rho_threshold!r}."
        )


def _base_recipe(prob: Problem, recipe, kind: ResponseKind):
    if recipe is not None:
        if not isinstance(recipe, (Recipe, NewtonRecipe)):
            raise TypeError(
                f"recipe must be a pbrf.Recipe or pbrf.NewtonRecipe, got {type(recipe).__name__}."
            )
        if isinstance(recipe, NewtonRecipe) and kind.method == "retrain":
            raise ValueError(
                "cold start is defined by a training recipe: pass "
                "recipe=pbrf.Recipe(...), "
                "not a NewtonRecipe."
            )
        return recipe
    if kind.default_recipe == "newton":
        return NewtonRecipe()
    if getattr(prob, "recipe", None) is not None:
        return prob.recipe
    raise ValueError(
        f"respond({kind.name!r}) reuses the base training recipe: pass recipe=pbrf.Recipe(...) "
        "(the one that "
        "trained θ^s), or build the Problem with recipe=...."
    )


def _apply_changes(recipe, changes: dict):
    if not changes:
        return recipe
    valid = set(recipe.to_dict())
    bad = sorted(set(changes) - valid)
    if bad:
        raise TypeError(
            f"respond: unknown argument(s) {bad}; {type(recipe).__name__} fields are "
            f"{sorted(valid)}."
        )
    if isinstance(recipe, Recipe):
        if "steps" in changes and "epochs" not in changes:
            changes = {**changes, "epochs": None}
        if "epochs" in changes and "steps" not in changes:
            changes = {**changes, "steps": None}
    return recipe.replace(**changes)


# ---------------------------------------------------------------------------------------- respond
def respond(
    prob: Problem, kind: str, removals, damping: float = 1e-2,
    recipe: Recipe | NewtonRecipe | None = None, seeds=(0,),
    model_init: Callable[[int], nn.Module | Params] | None = None, solver: str = "exact",
    solver_options: dict | None = None, curvature: str = "ggn", removal_weight: float = 1.0,
    chunk_size: int = 64, progress: bool = True, paired: bool = False,
    rho_threshold: float = RHO_THRESHOLD, **recipe_changes) -> Response:
    """Compute a response function for every removal set.

    Args:
        prob: the :class:`~pbrf.Problem` (θ^s, data, weight decay).
        kind: ``"cold"``, ``"warm"``, ``"proximal"``, ``"pbrf"``, ``"linearized"`` (module
            docstring) or any kind registered in :mod:`pbrf.kinds`.
        removals: 1-D LongTensor / list of ints, or list of index lists (groups).
        damping: λ (proximal, PBRF and linearized; cold and warm take none).
        recipe: optimisation settings: a :class:`~pbrf.NewtonRecipe` (batched Gauss–Newton trust
            region, full batch) or a first-order :class:`~pbrf.Recipe`. pbrf/proximal default to
            ``NewtonRecipe()``; cold/warm default to ``prob.recipe`` (the base recipe).
        seeds: cold start: each seed ``s`` sets both the initialisation and the minibatch order
            (``recipe.seed = s``) of the removal runs and of their full-data reference run.
        model_init: cold start: ``seed -> model or params dict``; default
            :func:`pbrf.models.reinitialize` (every module's ``reset_parameters`` under the seed).
        solver, solver_options, curvature: linearized only: the accurate solve of ``C``.
        removal_weight: scales the removal (``1`` removes the points; ``s`` gives ``ε = −s k/N``).
        chunk_size: removal problems optimised together (bounds memory, not the results).
        progress: show progress bars.
        paired: warm / proximal: also optimise the no-removal continuation (same objective, start,
            recipe and seed, no removal) so that ``loss_change(..., paired=True)`` measures the
            removal's effect without the drift of continued training.
        rho_threshold: certificate threshold on ``ρ = ||∇F(θ_r)|| / signal`` (default 1e-2).
        **recipe_changes: fields of the recipe in use overriding it, e.g. ``steps=500, lr=1e-3,
            batch_size=None`` (``steps`` replaces ``epochs`` and vice versa) or ``max_iter=20``.

    An argument the kind does not use (``ResponseKind.respond_arguments``) and not at its default
    raises ``ValueError``. Every optimised kind gets a certificate per removal set in
    ``diagnostics`` (:class:`~pbrf.diagnostics.RemovalDiagnostics`): ``signal`` = ``(w/N)||Σ_{m∈r}
    ∇L_m(θ^s)||``, ``rho`` = final full-batch gradient norm of the response objective /
    ``signal``, and ``certified`` = ``rho ≤ rho_threshold``, the final objective not above the
    starting one, and nothing diverged. (Cold start: the largest ρ over seeds.) Paired runs add
    ``reference_rho`` (the continuation's gradient norm / this signal) and ``paired_certified``.

    Returns:
        A :class:`Response`; ``loss_change(test)`` gives ``[n_test, K]``.
    """
    spec = kinds.get(kind, responses_only=True)
    _refuse_unused(spec, dict(
        damping=damping, recipe=recipe, seeds=seeds, model_init=model_init, solver=solver,
        solver_options=solver_options, curvature=curvature, removal_weight=removal_weight,
        chunk_size=chunk_size, paired=paired, rho_threshold=rho_threshold), recipe_changes)
    _check_args(spec, seeds, chunk_size, damping, removal_weight, rho_threshold)
    groups = normalize_removals(removals, prob.n_train)
    if spec.method == "linear":
        return _linearized(prob, spec, groups, damping, solver, curvature, solver_options,
                           removal_weight)
    rec = _apply_changes(_base_recipe(prob, recipe, spec), recipe_changes)
    setting = _Setting(prob, spec, damping, rec, removal_weight, chunk_size, progress)
    signal = removal_signal(prob, groups, removal_weight)
    if spec.method == "retrain":
        return _cold(setting, groups, seeds, model_init, signal, rho_threshold)
    return _optimised(setting, groups, signal, paired, rho_threshold)


def _optimised(s: _Setting, groups, signal: Tensor, paired: bool, threshold: float) -> Response:
    """An optimised kind (warm, proximal, pbrf, ...), certified; ``paired``: with the no-removal
    continuation as one more problem with an empty removal set (in the last chunk; results do not
    depend on chunking).
    """
    run_groups = groups + [[]] if paired else groups
    run_signal = torch.cat([signal, signal.new_zeros(1)]) if paired else signal
    th, diags = _optimise_kind(s, run_groups, signal=run_signal)
    diags = [row.certify(sig, threshold) for row, sig in zip(diags, run_signal.tolist())]
    ref = None
    if paired:
        ref, ref_row, th, diags = th[-1], diags[-1], th[:-1], diags[:-1]
        diags = [row.certify_paired(ref_row, threshold) for row in diags]
    return Response(s.kind.name, groups, s.prob, th, diagnostics=diags, paired_reference=ref)


def _linearized(
    prob, spec: ResponseKind, groups, damping, solver, curvature, solver_options, weight
) -> Response:
    """``θ^s + Δθ_IF`` with the accurate solve of ``C`` (one solve per removal set)."""
    d, info = delta_theta(prob, groups, damping, solver, curvature, solver_options, weight)
    diag = [RemovalDiagnostics.from_solve(info) for _ in groups]
    return Response(
        spec.name, groups, prob, (prob.theta + d).detach(), diagnostics=diag, first_order=True
    )


def _cold(s: _Setting, groups, seeds, model_init, signal: Tensor, threshold: float) -> Response:
    """Cold start: per seed, K removal runs plus one full-data run with the same init and
    batches; certified (the largest ρ over seeds).
    """
    per_seed, refs, diags, ref_diags = [], [], [[] for _ in groups], []
    for seed in seeds:
        init = _init_params(s.prob, model_init, seed)
        run = dataclasses.replace(s, damping=0.0, recipe=s.recipe.replace(seed=seed))
        # the full-data reference is one more problem with an empty removal set
        th, dg = _optimise_kind(run, groups + [[]], init)
        per_seed.append(th[:-1])
        refs.append(th[-1])
        for k, d in enumerate(dg[:-1]):
            diags[k].append(d.replace(seed=seed))
        ref_diags.append(dg[-1].replace(seed=seed))
    rows = [RemovalDiagnostics.cold(d, ref_diags).certify(sig, threshold)
            for d, sig in zip(diags, signal.tolist())]
    return Response(s.kind.name, groups, s.prob, torch.stack(per_seed), torch.stack(refs),
                    diagnostics=rows)
