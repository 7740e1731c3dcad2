"""Benchmark: scoring every training point against a batch of test points.

Digits MLP (trained with pbrf.train). ``pbrf.influence`` (vmap per-example gradients, one exact
solve
per test point, chunked inner products) against a straightforward implementation: the same solve,
then a Python loop over training points computing each gradient with ``torch.autograd.grad``.
Prints both wall times, their ratio measured in this run, and the largest score difference.

    python bench/bench_influence.py [--n-test 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import pbrf
from _digits import trained_digits_mlp
from pbrf.curvature import CurvatureOperator
from pbrf.influence import per_example_grads


def _grad(model, params, task, x, t) -> torch.Tensor:
    loss = task.loss(model(x), t).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def loop_scores(prob: pbrf.Problem, xt, yt, damping: float, solver: str,
                opts: dict) -> tuple[torch.Tensor, float]:
    """The straightforward way: loop over points, one autograd gradient each; returns (scores,
    scoring seconds).
    """
    model = prob.model
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    g_test = torch.stack([_grad(model, params, prob.task, xt[i : i + 1],
                                yt[i : i + 1]) for i in range(len(xt))])
    S, _ = pbrf.solve(CurvatureOperator(prob, "ggn", damping), g_test, solver, **opts)
    t0 = time.perf_counter()
    scores = torch.empty(xt.shape[0], prob.n_train)
    for j in range(prob.n_train):
        scores[:, j] = S @ _grad(model, params, prob.task, prob.x[j : j + 1],
                                 prob.t[j : j + 1]) / prob.n_train
    t_score = time.perf_counter() - t0
    for p in params:
        p.requires_grad_(False)
    return scores, t_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ds, task, trained, prob = trained_digits_mlp(args.width)
    xt, yt = ds.x_test[: args.n_test], ds.y_test[: args.n_test]
    solver, opts = "exact", {"max_params": 20000}
    everyone = torch.arange(prob.n_train)

    t0 = time.perf_counter()
    fast = pbrf.influence(prob, (xt, yt), everyone, damping=1e-3, solver=solver,
                          solver_options=opts)
    t_fast = time.perf_counter() - t0
    # no cached factorisation: both pay the solve
    fresh = trained.problem(task, (ds.x_train, ds.y_train))
    t0 = time.perf_counter()
    slow, t_slow_score = loop_scores(fresh, xt, yt, 1e-3, solver, opts)
    t_slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    S = torch.randn(len(xt), prob.n_params)
    torch.cat([S @ per_example_grads(prob, prob.x[s], prob.t[s]).T for s in prob.chunks()], dim=1)
    t_fast_score = time.perf_counter() - t0

    rel = ((fast - slow).abs().max() / slow.abs().max()).item()
    print(f"influence of all N={prob.n_train} training points on {args.n_test} test points, "
          f"digits MLP ({prob.n_params} params), exact solve, {torch.get_num_threads()} threads")
    print(f"  end to end   - per-example loop: {t_slow:7.2f} s   pbrf.influence: {t_fast:7.2f} s   "
          f"ratio {t_slow / t_fast:.1f}x")
    print(f"  scoring only - per-example loop: {t_slow_score:7.2f} s   vmap + matmul:  "
          f"{t_fast_score:7.2f} s   "
          f"ratio {t_slow_score / t_fast_score:.1f}x")
    print(f"  max relative score difference: {rel:.1e}")


if __name__ == "__main__":
    main()
