"""``pbrf run --dry-run``: what a run will do and roughly what it will cost, before any work.

Nothing is written. The data are loaded and the config validated as for a real run; then the
model at its initialisation (the costs do not depend on the trained values) is put through one of
each heavy operation of the run, at the run's sizes, with its peak memory measured:

* a Gauss–Newton product for ``run.chunk_size + 1`` directions over one data chunk (the inner
  operation of the batched Newton optimiser of the PBRF / proximal responses);
* one vmapped gradient step of ``run.chunk_size + 1`` stacked models on one minibatch (cold and
  warm start, the LDS retraining);
* the per-example gradients of one data chunk (influence);
* the dense damped curvature, when a solver is ``exact``.

The peak-memory estimate is the process's resident memory after loading (data, model, torch)
plus the largest probe, plus the Newton state (about twelve ``[K, p]`` vectors). The compute
estimate multiplies the probes' wall times by the number of such operations; the Newton and CG
iteration counts are typical values (10 and 20), not the caps, so it is an order of magnitude.
"""

from __future__ import annotations

import math
import time

import torch
from torch.func import grad, jvp, vmap

from pbrf import Recipe
from pbrf.curvature import CurvatureOperator
from pbrf.engine import stack
from pbrf.estimators import MemoryMeter
from pbrf.experiment import (
    report,  # noqa: F401 - a run imports it matplotlib before it ends: count it
)
from pbrf.experiment.config import ExperimentConfig
from pbrf.experiment.run.inputs import build_problem
from pbrf.experiment.run.selection import random_groups
from pbrf.influence import per_example_grads

__all__ = ["dry_run", "format_dry_run"]

#: Typical Newton (outer) and CG (inner) iterations per response, for the compute estimate.
TYPICAL_NEWTON, TYPICAL_CG = 10, 20
#: ``[K, p]`` float64 vectors the Newton optimiser keeps per chunk (θ, gradient, CG state, ...).
NEWTON_VECTORS = 12


def _measure(fn, repeats: int = 3) -> tuple[float, int]:
    """Peak memory of the first call, and the best wall time of ``repeats`` further calls (the
    first pays for tracing and allocation, which a long run pays once).
    """
    with MemoryMeter() as meter:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times, default=math.nan), int(meter.peak or 0)


def dry_run(config: ExperimentConfig, inputs) -> dict:
    """Sizes, budgets and measured probes of a run (see the module docstring); writes nothing."""
    model = inputs.initial_model()
    problem = build_problem(inputs, {k: v.detach() for k, v in model.named_parameters()})
    measure = problem.astype(torch.float64)
    base_rss = MemoryMeter.rss() or 0
    n, p = problem.n_train, problem.n_params
    rc, run = config.removals, config.run
    K = min(run.chunk_size, rc.n_removals) + 1
    n_chunks = math.ceil(rc.n_removals / run.chunk_size)
    train = Recipe(**config.train.recipe_dict())
    seconds, peaks = _probes(config, problem, measure, K, min(train.batch_size or n, n))
    newton_state = NEWTON_VECTORS * K * p * 8
    peak = base_rss + max(max(peaks["gauss_newton"], peaks["newton_hessian"]) + newton_state,
                          peaks["training_step"], peaks["per_example_grads"],
                          peaks["dense_curvature"])
    steps = train.total_steps(n)
    compute = _compute_seconds(config, n, K, min(measure.chunk_size, n), steps, seconds)
    if rc.strategy == "random":
        random_groups(config, n)  # the choice works (validated again by the run)
    return {
        "name": config.name, "profile": config.profile, "dataset": config.data.name, "n_train": n,
        "n_params": p, "dtype": run.dtype, "device": run.device, "task": inputs.task_name,
        "n_test_points": rc.n_test_points, "n_removals": rc.n_removals,
        "group_size": rc.resolved_group_size(n), "chunk_size": run.chunk_size, "n_chunks": n_chunks,
        "kinds": list(config.responses.ordered_kinds()), "seeds": config.run.seeds,
        "train_seed": config.train.seed, "base_steps": steps,
        "cold_seeds": list(config.responses.cold_seeds),
        "response_recipe": config.responses.recipe_dict(), "lds_subsets": config.lds.subsets,
        "baseline_rss_bytes": base_rss, "probe_peak_bytes": peaks,
        "newton_state_bytes": newton_state, "estimated_peak_bytes": peak,
        "probe_seconds": seconds,
        "estimated_seconds": compute, "estimated_total_seconds": sum(compute.values()),
    }


def _probes(config: ExperimentConfig, problem, measure, K: int,
            batch: int) -> tuple[dict[str, float], dict[str, int]]:
    """Wall time and peak memory of each heavy operation of the run, at its sizes: a Gauss–Newton
    product of K directions over one data chunk, a stacked training step of K models on one
    minibatch of ``batch``, the per-example gradients of one data chunk and, when the run does
    them, the Newton optimiser's exact Hessian products and the dense curvature.
    """
    kinds = config.responses.ordered_kinds()
    data_chunk = min(measure.chunk_size, problem.n_train)
    V = torch.randn(K, problem.n_params, dtype=measure.dtype,
                    generator=torch.Generator().manual_seed(0))
    idx = torch.arange(data_chunk)
    op = CurvatureOperator(measure, config.influence.curvature, config.influence.damping)
    gn_seconds, gn_peak = _measure(lambda: op.matvec(V, index=idx))
    step_seconds, step_peak = _measure(lambda: _stacked_step(problem, K, batch))
    grad_seconds, grad_peak = _measure(lambda: per_example_grads(
        measure, measure.x[:data_chunk], measure.t[:data_chunk]))

    hess_peak = 0
    if config.responses.optimizer == "newton" and config.responses.model != "gn" and (
            {"pbrf", "proximal"} & set(kinds)):
        _, hess_peak = _measure(lambda: _newton_hessian(measure, K, data_chunk))

    dense_peak = 0
    if "exact" in (config.influence.solver, config.influence.accurate_solver):
        _, dense_peak = _measure(lambda: op.dense(), repeats=0)  # the exact solves' dense C
    seconds = {"gauss_newton": gn_seconds, "training_step": step_seconds,
               "per_example_grads": grad_seconds}
    peaks = {"gauss_newton": gn_peak, "training_step": step_peak, "per_example_grads": grad_peak,
             "newton_hessian": hess_peak, "dense_curvature": dense_peak}
    return seconds, peaks


def _compute_seconds(config: ExperimentConfig, n: int, K: int, data_chunk: int, steps: int,
                     probe: dict[str, float]) -> dict[str, float]:
    """Estimated seconds per part of the run, from the probes' wall times (typical iteration
    counts), summed over the run's θ^s seeds (one whole run each, one after another).
    """
    rc, run = config.removals, config.run
    kinds = config.responses.ordered_kinds()
    gn_seconds, step_seconds = probe["gauss_newton"], probe["training_step"]
    n_chunks = math.ceil(rc.n_removals / run.chunk_size)
    seeds = len(config.responses.cold_seeds)
    data_passes = math.ceil(n / data_chunk)
    newton_kinds = [k for k in ("pbrf", "proximal") if k in kinds]
    compute = {
        "base training": steps * step_seconds / K,
        "cold start": (steps * step_seconds * seeds * n_chunks) if "cold" in kinds else 0.0,
        "warm start": (steps * step_seconds * n_chunks) if "warm" in kinds else 0.0,
        "PBRF / proximal (Newton)": (len(newton_kinds) * n_chunks * TYPICAL_NEWTON * TYPICAL_CG
                                     * data_passes * gn_seconds),
        "influence": (rc.n_test_points * TYPICAL_CG * data_passes * gn_seconds / K
                      + data_passes * probe["per_example_grads"]),
        "LDS": (steps * step_seconds * math.ceil(config.lds.subsets / run.chunk_size)
                * len(config.lds.seeds or config.responses.cold_seeds)),
    }
    return {k: v * config.run.seeds for k, v in compute.items()}


def _newton_hessian(measure, K: int, n: int) -> None:
    """Exact Hessian products of K problems, each at its own parameters, on one data chunk: what
    the Newton optimiser of the PBRF and proximal responses computes near their optima (``model =
    "auto"``; K forward-over-reverse passes, more memory than K Gauss–Newton products at one θ).
    """
    x, t = measure.x[:n], measure.t[:n]
    theta = measure.flatten(measure.params).detach()
    stacked = theta.expand(K, -1).clone()
    V = torch.randn(stacked.shape, dtype=stacked.dtype,
                    generator=torch.Generator().manual_seed(1)).to(stacked.device)

    def loss(flat):
        return measure.losses(measure.unflatten(flat), x, t).mean()

    vmap(lambda th, v: jvp(grad(loss), (th,), (v,))[1])(stacked, V)


def _stacked_step(problem, K: int, batch: int) -> None:
    """One gradient of K stacked copies of the model on one minibatch (vmap, as the engine)."""
    stacked = stack(problem.params, K)
    x, t = problem.x[:batch], problem.t[:batch]

    def loss(params):
        return problem.losses(params, x, t).mean()

    vmap(grad(loss))(stacked)


def format_dry_run(d: dict) -> str:
    """The dry run as text for the terminal."""
    gib = 2**30
    lines = [
        f"dry run of {d['name']} ({d['profile']}): nothing computed, nothing written",
        f"  data      {d['dataset']}: N = {d['n_train']:,} training points, task {d['task']}",
        f"  model     {d['n_params']:,} parameters, {d['dtype']} on {d['device']}",
        f"  work      {d['n_test_points']} test points x {d['n_removals']} removal sets of "
        f"{d['group_size']} point(s), in {d['n_chunks']} chunk(s) of {d['chunk_size']}",
        f"  kinds     {', '.join(d['kinds'])}",
        *([f"  seeds     {d['seeds']} base models θ^s (train.seed {d['train_seed']}.."
            f"{d['train_seed'] + d['seeds'] - 1}), each a whole run, one after another: "
            "the compute below is their total, the memory that of one"] if d.get("seeds", 1) > 1
          else []),
        f"  budgets   base training {d['base_steps']:,} steps; cold-start seeds {d['cold_seeds']}; "
        f"PBRF/proximal recipe {d['response_recipe']}; LDS subsets {d['lds_subsets']}",
        f"  memory    about {d['estimated_peak_bytes'] / gib:.2f} GiB peak resident "
        f"(loaded {d['baseline_rss_bytes'] / gib:.2f} GiB + largest measured probe "
        f"{max(d['probe_peak_bytes'].values()) / gib:.2f} GiB + Newton state "
        f"{d['newton_state_bytes'] / gib:.2f} GiB)",
        f"  compute   roughly {_duration(d['estimated_total_seconds'])} at this machine's speed "
        "(typical iteration counts; an order of magnitude):",
    ]
    lines += [f"              {k}: {_duration(v)}" for k, v in d["estimated_seconds"].items() if v]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
