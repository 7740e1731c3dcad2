"""Stage 3 of a run: one (chunk, kind) task — Δm, Δf and per-removal diagnostics.

Every kind is computed as its record in :mod:`pbrf.kinds` says: the config section whose recipe it
uses, its precision, the ``pbrf.respond`` arguments it takes.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

import pbrf
from pbrf import kinds
from pbrf.experiment.config import ExperimentConfig
from pbrf.experiment.run.context import Context
from pbrf.experiment.run.inputs import build_model, make_recipe
from pbrf.experiment.run.selection import response_seed, solver_options_for
from pbrf.experiment.run.store import ChunkResult
from pbrf.newton import exact_matmul


# ---------------------------------------------------------------------------- chunks
def pending_tasks(ctx: Context, done: set[tuple[str, int]]) -> list[tuple[int, str]]:
    """(chunk, kind) pairs still to compute, chunk-major, influence first within a chunk."""
    kinds = ctx.config.responses.ordered_kinds()
    return [(c, k) for c in range(ctx.n_chunks) for k in kinds if (k, c) not in done]


def _config_recipe(config: ExperimentConfig, section: str) -> dict:
    """The recipe fields of the ``[train]`` or ``[responses]`` section."""
    return (config.train if section == "train" else config.responses).recipe_dict()


def _respond_kwargs(ctx: Context, kind: str) -> dict:
    """The keyword arguments of ``pbrf.respond`` for one kind (one seed for the whole run), read
    off the kind's record: its config recipe and the kind-specific arguments it takes.
    """
    config, inf, resp = ctx.config, ctx.config.influence, ctx.config.responses
    spec = kinds.get(kind)
    kw: dict[str, Any] = {"damping": inf.damping, "rho_threshold": resp.rho_threshold,
                          "curvature": inf.curvature}
    if spec.config_recipe:
        kw["recipe"] = make_recipe(_config_recipe(config, spec.config_recipe),
                                   response_seed(config))
    args = set(spec.arguments)
    if "solver" in args:
        kw.update(solver=inf.accurate_solver, solver_options=dict(inf.accurate_options))
    if "paired" in args:
        kw["paired"] = resp.paired
    if "seeds" in args:
        kw["seeds"] = tuple(resp.cold_seeds)
    if "model_init" in args:
        inputs = ctx.inputs
        def model_init(s):
            return build_model(config, inputs.model_kwargs, seed=int(s)).to(config.run.device)

        kw["model_init"] = model_init
    return {k: v for k, v in kw.items() if k in spec.respond_arguments}


def _respond(ctx: Context, chunk: int, kind: str):
    kw = _respond_kwargs(ctx, kind)
    prob = ctx.measure_problem if kinds.get(kind).float64 else ctx.problem
    resp = pbrf.respond(prob, kind, removals=ctx.removals(chunk), progress=False, **kw)
    return resp.to(ctx.measure_problem)


def _influence_chunk(ctx: Context, chunk: int) -> tuple[np.ndarray, list[dict]]:
    """The run's influence estimate: :func:`pbrf.influence` (one solve per test point, practical
    solver) on the float64 problem; ``pbrf.influence`` with the run's settings reproduces it.
    """
    scores, info = pbrf.influence_with_info(ctx.measure_problem, test=ctx.test,
                                            removals=ctx.removals(chunk),
                                            **influence_settings(ctx.config))
    row = {k: v for k, v in info.solve.to_dict().items() if k != "extra"}
    row["residual_flag"] = bool(not (row["residual"] < 1.0))
    n = len(ctx.chunk_groups(chunk))
    return scores.detach().cpu().double().numpy(), [dict(row) for _ in range(n)]


def influence_settings(config: ExperimentConfig) -> dict:
    """The keyword arguments with which ``pbrf.influence(problem_float64, test, removals, **kw)``
    reproduces the run's stored influence scores.
    """
    inf = config.influence
    return {"damping": inf.damping, "solver": inf.solver, "curvature": inf.curvature,
            "solver_options": solver_options_for(inf.solver, inf.solver_options,
                                              response_seed(config))}


def compute_chunk(ctx: Context, chunk: int, kind: str) -> ChunkResult:
    """Δm ``[n_test, k]``, Δf ``[k, n_test, *out]`` and diagnostics of one kind on one chunk, TF32
    off on CUDA (:func:`pbrf.newton.exact_matmul`; a Ray worker is a process of its own).

    ``extra``: linearized — the actual change ``m(θ^s + Δθ) − m(θ^s)``; warm and proximal (paired)
    — Δm against the no-removal continuation of the same recipe and seed.
    """
    with exact_matmul():
        return _compute_chunk(ctx, chunk, kind)


def _compute_chunk(ctx: Context, chunk: int, kind: str) -> ChunkResult:
    start = time.perf_counter()
    spec = kinds.get(kind)
    if spec.method == "estimate":
        dm, diagnostics = _influence_chunk(ctx, chunk)
        df = _influence_output_change(ctx, chunk)
        return ChunkResult(kind, chunk, dm, df, diagnostics, time.perf_counter() - start, None)
    resp = _respond(ctx, chunk, kind)
    dm = resp.loss_change(test=ctx.test).detach().cpu().double().numpy()
    df = resp.output_change(test=ctx.test).detach().cpu().float().numpy()
    extra = None
    if resp.first_order:  # also the actual change m(θ^s + Δθ) − m(θ^s), docs/conventions.md §5
        extra = resp.loss_change(test=ctx.test, first_order=False).detach().cpu().double().numpy()
    elif resp.paired_reference is not None:
        extra = resp.loss_change(test=ctx.test, paired=True).detach().cpu().double().numpy()
    elif resp.reference is not None:  # cold start: each seed's Δm, [n_test, k, S] (noise floors)
        extra = per_seed_dm(resp, ctx.test)
    diagnostics = [d.to_dict() for d in resp.diagnostics]
    if spec.method == "linear":
        for d in diagnostics:
            d["residual_flag"] = bool(not (d.get("residual", math.nan) < 1.0))
    return ChunkResult(kind, chunk, dm, df, diagnostics, time.perf_counter() - start, extra)


def per_seed_dm(resp, test) -> np.ndarray:
    """Cold start's Δm of each seed, ``[n_test, k, S]`` (stored as the chunk's ``extra``)."""
    return np.moveaxis(resp.loss_change_per_seed(test).detach().cpu().double().numpy(), 0, -1)


def _influence_output_change(ctx: Context, chunk: int) -> np.ndarray:
    """Δf of the influence estimate, ``J Δθ`` with the practical solver (one solve per removal)."""
    resp = pbrf.respond(ctx.measure_problem, "linearized", removals=ctx.removals(chunk),
                        progress=False,
                        **influence_settings(ctx.config))
    return resp.output_change(test=ctx.test).detach().cpu().float().numpy()
