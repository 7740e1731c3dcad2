"""Check: doubling the response optimiser's budget does not move the stored Δm of a finished run.

Reruns the PBRF and proximal responses of every removal of RUN_DIR with twice the Newton budget
(``max_iter`` and ``cg_max_iter`` doubled, ``tol`` 100× tighter) and prints, per kind, the largest
change of any stored Δm relative to that removal's own effect (max over test points of |Δm| for
the PBRF, of the paired |Δm| for proximal, whose literal Δm also holds the continuation drift).

    python bench/bench_budget.py runs/digits-mlp [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import pbrf
from pbrf.experiment.run import driver as pipeline
from pbrf.experiment.run.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", nargs="?", default="runs/digits-mlp")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx = pipeline.load_context(args.run_dir)
    cfg = ctx.config
    with Store(args.run_dir, readonly=True) as store:
        stored = {k: store.gather(k, ctx.n_chunks)[0] for k in ("pbrf", "proximal")}
        paired = store.gather_extra("proximal", ctx.n_chunks)
    fields = cfg.responses.recipe_dict()
    base = pipeline.make_recipe(fields, 0)
    doubled = base.replace(max_iter=2 * base.max_iter, cg_max_iter=2 * base.cg_max_iter,
                           tol=base.tol / 100)
    print(f"{args.run_dir}: {len(ctx.groups)} removals; budget {base} -> {doubled}")
    for kind in ("pbrf", "proximal"):
        t0 = time.perf_counter()
        resp = pbrf.respond(ctx.measure_problem, kind, ctx.groups, damping=cfg.influence.damping,
                            recipe=doubled,
                            chunk_size=cfg.run.chunk_size, progress=False)
        dm = resp.loss_change(ctx.test).double().numpy()
        effect = np.abs(paired if kind == "proximal" else stored[kind]).max(axis=0)
        change = np.abs(dm - stored[kind]).max(axis=0) / effect
        print(f"{kind:9s} doubled budget: max change {change.max():.2e} of the removal effect "
              f"(median {np.median(change):.2e}); certified "
              f"{sum(resp.certified)}/{len(resp.certified)}; "
              f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
