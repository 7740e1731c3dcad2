"""The LDS stage of a run: retrain on random subsets (``[lds]``), store, summarise.

Runs after the response chunks, in the driver, resumable per chunk of ``run.chunk_size`` subsets;
results are stored as kind ``"lds"`` in ``results.sqlite`` (subsets as the array ``lds_groups``).
"""

from __future__ import annotations

import math
import time

import numpy as np
from tqdm.auto import tqdm

from pbrf import lds
from pbrf.experiment.config import ExperimentConfig
from pbrf.experiment.run.context import Context
from pbrf.experiment.run.inputs import build_model, make_recipe
from pbrf.experiment.run.selection import (
    all_train_scores,
    groups_from_array,
    groups_to_array,
    response_seed,
)
from pbrf.experiment.run.store import ChunkResult, Store

__all__ = ["LDS_KIND", "lds_groups", "run_lds", "lds_actual", "lds_summary"]

LDS_KIND = "lds"


def lds_groups(ctx: Context, store: Store) -> list[list[int]]:
    """The LDS removal sets (complements of the random subsets), chosen once and stored."""
    arr = store.get_array("lds_groups")
    if arr is None:
        c = ctx.config.lds
        groups = lds.subsets(ctx.problem.n_train, c.subsets, c.alpha, seed=c.seed)
        store.put_arrays({"lds_groups": groups_to_array(groups)})
        return groups
    return groups_from_array(arr)


def run_lds(ctx: Context, store: Store, progress: bool = True) -> None:
    """Retrain on ``lds.subsets`` random subsets (cold start, chunks of ``run.chunk_size``,
    resumable per chunk) and store their test-loss changes as kind ``"lds"``.
    """
    c, config = ctx.config.lds, ctx.config
    if not c.subsets:
        return
    groups = lds_groups(ctx, store) if not store.get_meta("lds_done") else None
    if groups is None:
        return
    cs = config.run.chunk_size
    n_chunks = math.ceil(len(groups) / cs)
    done = store.done()
    todo = [i for i in range(n_chunks) if (LDS_KIND, i) not in done]
    seeds = c.seeds or tuple(config.responses.cold_seeds)
    inputs = ctx.inputs
    model_init = lambda s: build_model(config, inputs.model_kwargs, seed=int(s)).to(
        config.run.device
    )  # noqa: E731
    recipe = make_recipe(config.train.recipe_dict(), response_seed(config))
    for i in tqdm(todo, desc="LDS retraining", unit="chunk", disable=not progress):
        start = time.perf_counter()
        dm, diags, per_seed = lds.retrain(ctx.problem, ctx.test, groups[i * cs : (i + 1) * cs],
                                          recipe, seeds, model_init, chunk_size=cs,
                                          measure=ctx.measure_problem, per_seed=True)
        # each seed's Δm, [n_test, k, S]: the LDS noise floor between retraining seeds
        store.put_chunk(ChunkResult(LDS_KIND, i, dm, None, diags, time.perf_counter() - start,
                                    np.moveaxis(per_seed, 0, -1)))
    store.set_meta("lds_done", True)


def lds_actual(store: Store, config: ExperimentConfig) -> tuple[np.ndarray, list[list[int]]] | None:
    """The stored LDS ground truth ``(Δm [n_test, K], removal sets)``, or ``None``."""
    arr = store.get_array("lds_groups")
    if not config.lds.subsets or arr is None:
        return None
    groups = groups_from_array(arr)
    try:
        dm, _, _ = store.gather(LDS_KIND, math.ceil(len(groups) / config.run.chunk_size))
    except KeyError:
        return None
    return dm, groups


def lds_summary(ctx: Context, store: Store) -> dict | None:
    """LDS settings and the LDS of the run's own influence estimate (all training points scored
    with the practical solver, stored once as ``lds_influence_scores``).
    """
    got = lds_actual(store, ctx.config)
    if got is None:
        return None
    actual, groups = got
    scores = store.get_array("lds_influence_scores")
    if scores is None:
        scores = all_train_scores(ctx.measure_problem, ctx.config, ctx.test)
        store.put_arrays({"lds_influence_scores": scores})
    own = lds.lds(lds.group_scores(scores, groups), actual)
    _, _, diags = store.gather(LDS_KIND, math.ceil(len(groups) / ctx.config.run.chunk_size))
    rho = np.array([d.get("rho", math.nan) for d in diags], dtype=float)
    c = ctx.config.lds
    return {
        "subsets": len(groups),
        "alpha": c.alpha,
        "seeds": list(c.seeds or ctx.config.responses.cold_seeds),
        "removed_per_subset": len(groups[0]),
        "influence": {k: own[k] for k in ("lds", "stderr", "n_test")},
        # how far each retraining is from a stationary point, relative to the removal's signal
        # (the recipe defines the response, as for cold start; shown, not used to exclude)
        "convergence": {"max_rho": float(np.nanmax(rho)) if np.isfinite(rho).any() else None,
                        "median_rho": float(np.nanmedian(rho)) if np.isfinite(rho).any() else None,
                        "diverged": int(sum(bool(d.get("diverged")) for d in diags))},
    }
