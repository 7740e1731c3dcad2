"""Stage 4 of a run: gather the stored arrays, leave out the uncertified and diverged removals,
summarise (:func:`pbrf.experiment.analysis.summarise`) and write the report.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pbrf import kinds
from pbrf.experiment import analysis, report
from pbrf.experiment.analysis.results import Summary
from pbrf.experiment.config import ExperimentConfig
from pbrf.experiment.run.context import Context
from pbrf.experiment.run.inputs import CHECKPOINT
from pbrf.experiment.run.lds_stage import lds_summary
from pbrf.experiment.run.quality import base_quality
from pbrf.experiment.run.store import Store
from pbrf.fileio import atomic_write, dumps, npy_bytes


# ---------------------------------------------------------------------------- summary and report
def gather(store: Store, ctx: Context) -> tuple[dict, dict, dict]:
    """All stored arrays: ``dm``, ``df`` and diagnostics per kind."""
    dm, df, diags = {}, {}, {}
    for kind in ctx.config.responses.ordered_kinds():
        dm[kind], df[kind], diags[kind] = store.gather(kind, ctx.n_chunks)
    return dm, df, diags


_TIMING_KEYS = ("seconds", "time", "wall_seconds")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def diagnostics_summary(diags: dict[str, list[dict]]) -> dict:
    """Per kind: number of removals, diverged count, mean of numeric diagnostics."""
    out = {}
    for kind, rows in diags.items():
        entry: dict[str, Any] = {"n": len(rows)}
        entry["diverged"] = int(sum(bool(r.get("diverged")) for r in rows))
        # excluded by summarise
        entry["diverged_removals"] = [i for i, r in enumerate(rows) if r.get("diverged")]
        keys = sorted({k for r in rows for k, v in r.items()
                       if _number(v) and k not in _TIMING_KEYS})
        for k in keys:
            vals = [float(r[k]) for r in rows if _number(r.get(k))]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                entry[f"mean_{k}"] = float(np.mean(vals))
        out[kind] = entry
    return out


def objective_defined(config: ExperimentConfig, kind: str) -> bool:
    """Whether ``kind``'s response is defined as the solution of an objective (PBRF, proximal,
    full-batch warm start): its uncertified pairs are left out of every statistic. Responses
    defined by a training recipe (cold start, minibatch warm start) are kept whatever their ρ.
    """
    spec = kinds.get(kind)
    if spec.certificate == "exclude_if_full_batch":
        section = config.train if spec.config_recipe == "train" else config.responses
        return section.recipe_dict().get("batch_size") is None
    return spec.certificate == "exclude"


def exclusions(config: ExperimentConfig, diags: dict[str, list[dict]],
               certified_key: str = "certified") -> dict:
    """Which removals stay in the statistics: ``{"keep": bool [K], "by_kind": {kind: {...}}}``.

    A removal is left out when any kind diverged on it, or when an objective-defined kind is not
    certified there (``certified_key``: ``"certified"``, or ``"paired_certified"`` for the paired
    chain). The counts say how many and why.
    """
    n = len(next(iter(diags.values())))
    keep = np.ones(n, dtype=bool)
    by_kind, own = {}, {}
    for kind, rows in diags.items():
        diverged = np.array([bool(r.get("diverged")) for r in rows], dtype=bool)
        entry = {"diverged": int(diverged.sum())}
        keep &= ~diverged
        own[kind] = ~diverged
        if "rho" in (rows[0] if rows else {}):
            key = certified_key if certified_key in rows[0] else "certified"
            cert = np.array([bool(r.get(key)) for r in rows], dtype=bool)
            entry["certified"] = int(cert.sum())
            rhos = np.array([float(r["rho"]) if r.get("rho") is not None else np.inf for r in rows])
            entry["max_rho"] = float(rhos.max()) if rhos.size else None
            entry["median_rho"] = float(np.median(rhos)) if rhos.size else None
            entry["excludes_uncertified"] = objective_defined(config, kind)
            if objective_defined(config, kind):
                entry["uncertified"] = int((~cert & ~diverged).sum())
                keep &= cert
                own[kind] &= cert
        by_kind[kind] = entry
    return {"keep": keep, "own": own, "by_kind": by_kind, "n_removals": n,
            "n_kept": int(keep.sum()),
            "threshold": config.responses.rho_threshold}


def _own_correlations(dm: dict, own: dict) -> dict:
    """Each kind's correlation with the influence estimate over the removals where that kind (and
    the influence estimate) is certified and finite — a kind that cannot be certified elsewhere
    does not take the others' correlations with it. (The gaps use the joint set.)
    """
    base = own.get("influence", np.ones(dm["influence"].shape[1], dtype=bool))
    scores = np.where(base[None, :], dm["influence"], np.nan)
    return analysis.correlations(scores,
                                 {k: np.where(own[k][None, :], v, np.nan) for k, v in dm.items()})


def _masked(dm: dict, keep: np.ndarray) -> dict:
    return {k: np.where(keep[None, :], v, np.nan) for k, v in dm.items()}


def _nonfinite(dm: dict, keep: np.ndarray) -> dict[str, int]:
    """Non-finite Δm per kind among the kept removals: the left-out ones are NaN in what
    :func:`_masked` gives the statistics, and are reported as left out, not as non-finite.
    """
    return {k: int((~np.isfinite(v[:, keep])).sum()) for k, v in dm.items()}


def _solver_report(diags: dict[str, list[dict]]) -> dict:
    """Largest relative residual of the practical (influence) and accurate (linearized) solves."""
    out = {}
    for kind, label in (("influence", "practical"), ("linearized", "accurate")):
        rows = diags.get(kind) or []
        res = [float(r["residual"]) for r in rows if isinstance(r.get("residual"), (int, float))]
        if rows:
            worst = max(res) if res else math.nan
            out[label] = {"kind": kind, "solver": rows[0].get("solver"), "max_residual": worst,
                          "max_iterations": max(int(r.get("iterations", 0)) for r in rows),
                          "flagged": bool(not worst < 1.0)}
    return out


def finish(ctx: Context, store: Store, title: str | None = None) -> dict:
    """Summarise the stored arrays and write the report (report.md, figures, summary.json).

    Statistics use the certified, non-diverged removals only (see :func:`exclusions`): the gaps
    over the removals where every kind is, each correlation over those where its kind is; the
    summary says how many were left out and why. The paired chain (warm start and proximal against
    their no-removal continuation) is summarised next to the paper-literal one. The report reads
    the typed :class:`~pbrf.experiment.analysis.results.Summary`; returns its ``to_dict()``, which
    ``summary.json`` holds.
    """
    dm, df, diags = gather(store, ctx)
    excl = exclusions(ctx.config, diags)
    keep, own = excl.pop("keep"), excl.pop("own")
    base = analysis.summarise(_masked(dm, keep), {k: v for k, v in df.items() if v is not None},
                              diagnostics=diagnostics_summary(diags))
    base["correlations"] = _own_correlations(dm, own)
    # the left-out removals are NaN in what summarise saw: count only what the kept ones lack
    base["decomposition"]["nonfinite"] = _nonfinite(dm, keep)
    excl["excluded_removals"] = [int(i) for i in np.flatnonzero(~keep)]

    summary = Summary(**base, certificates=excl, solvers=_solver_report(diags),
                      paired=_paired_summary(ctx, store, dm, diags),
                      experiment=_experiment_info(ctx, store), theta_s=theta_s_quality(ctx),
                      lds=lds_summary(ctx, store),
                      linearized_actual=_linearized_actual(ctx, store, dm))
    report.write_report(
        ctx.run_dir,
        summary,
        _masked(dm, keep),
        ctx.config.to_dict(),
        title=title or f"pbrf run: {ctx.config.name}",
    )
    _write_inputs_for_evaluate(ctx, dm["influence"])
    return summary.to_dict()


def _paired_summary(ctx: Context, store: Store, dm: dict, diags: dict) -> dict | None:
    """The paired chain (warm start and proximal against their no-removal continuations)."""
    paired = {k: store.gather_extra(k, ctx.n_chunks) for k in dm if kinds.get(k).continuation}
    paired = {k: v for k, v in paired.items() if v is not None}
    if not paired:
        return None
    pexcl = exclusions(ctx.config, diags, certified_key="paired_certified")
    pkeep = pexcl.pop("keep")
    pexcl.pop("own")
    out = analysis.paired_chain(_masked(dm, pkeep), _masked(paired, pkeep))
    out["decomposition"]["nonfinite"] = _nonfinite({**dm, **paired}, pkeep)
    out["certificates"] = pexcl
    return out


def _linearized_actual(ctx: Context, store: Store, dm: dict) -> dict | None:
    """The actual change ``m(θ^s + Δθ_IF) − m(θ^s)`` against the first-order one."""
    actual = store.gather_extra("linearized", ctx.n_chunks) if "linearized" in dm else None
    if actual is None:
        return None
    return {
        "description": ("m(θ^s + Δθ_IF) − m(θ^s) with the accurate solver, vs the first-order "
                        "Δm"),
        "pearson_vs_first_order": analysis.pearson(actual, dm["linearized"]),
        "pearson_vs_influence": analysis.pearson(actual, dm["influence"]),
        "mean_abs_difference": float(np.mean(np.abs(actual - dm["linearized"]))),
    }


def _write_inputs_for_evaluate(ctx: Context, scores: np.ndarray) -> None:
    """What another library needs to produce comparable scores: test points, removal sets, our
    scores.
    """
    atomic_write(ctx.run_dir / "influence_scores.npy", npy_bytes(scores))
    atomic_write(ctx.run_dir / "test_index.npy", npy_bytes(np.asarray(ctx.test_index)))
    config = ctx.config
    model = {"name": config.model.name}
    kwargs = ctx.inputs.model_kwargs
    model.update({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    removals = {
        "test_index": [int(i) for i in ctx.test_index],
        "removals": [list(map(int, g)) for g in ctx.groups],
        "scores_shape": ["n_test", "n_removals"],
        "sign": "positive = removing the set increases the test loss",
        "scale": "1/N: scores[t, k] = (1/N) grad m_t^T C^-1 sum_{i in r_k} grad L_i",
        "n_train": int(ctx.problem.n_train),
        "n_params": int(ctx.problem.n_params),
        "damping": config.influence.damping,
        "weight_decay": config.train.weight_decay,
        "curvature": config.influence.curvature,
        "curvature_matrix": "C = G + (weight_decay + damping) I (ggn) or Hessian of J + damping I",
        "task": ctx.inputs.task_name,
        "dtype": config.run.dtype,
        "model": model,
        "theta_s": CHECKPOINT,
        "load": "pbrf.load_run(RUN_DIR)",
    }
    atomic_write(ctx.run_dir / "removals.json", dumps(removals))


def theta_s_quality(ctx: Context) -> dict:
    """Train/test loss and metric of θ^s (the whole test split), ‖∇J(θ^s)‖, near-chance warning."""
    ds = ctx.inputs.dataset
    y = None if ctx.inputs.task_name == "reconstruction" else ds.y_test
    return base_quality(ctx.measure_problem, (ds.x_test, y))


def _experiment_info(ctx: Context, store: Store) -> dict:
    """Identifying facts of the run (no timings, so a resumed run's summary equals a fresh
    one's).
    """
    sizes = sorted({len(g) for g in ctx.groups})
    return {
        "name": ctx.config.name,
        "profile": ctx.config.profile,
        "dataset": ctx.config.data.name,
        "model": ctx.config.model.name,
        "task": ctx.inputs.task_name,
        "n_train": int(ctx.problem.n_train),
        "n_params": int(ctx.problem.n_params),
        "group_size": sizes[0] if len(sizes) == 1 else sizes,
        "strategy": ctx.config.removals.strategy,
    }
