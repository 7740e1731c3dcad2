"""Benchmark: time to certify K PBRF removals, batched Newton (the default) vs the previous
first-order default (Adam, lr 1e-3, full batch, stop on plateau, at most 3,000 steps).

θ^s is the ``mnist-mlp`` quick profile's (2,000 MNIST images, MLP 64×2, 10 epochs; needs
``$PBRF_DATA``), measured in float64 as ``pbrf run`` does. Both optimisers solve the same K
removal problems in one batched run; printed: wall time, certified count (ρ ≤ 1e-2), median and
largest ρ, and the ratio of the wall times, all measured in this run. The first-order run gets
``--first-order-steps`` at most (default 3,000 = the old cap).

    PBRF_DATA=../shared/datasets python bench/bench_certify.py [--k 64] [--threads 2]
    [--first-order-steps 3000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import pbrf
from pbrf.experiment.config import load_preset
from pbrf.experiment.run import driver as pipeline


def _report(name: str, resp, seconds: float) -> None:
    rhos = [d["rho"] for d in resp.diagnostics]
    print(f"{name:<12} {seconds:9.1f} s   certified {sum(resp.certified):3d}/{len(rhos)}   "
          f"median rho {statistics.median(rhos):.2e}   max rho {max(rhos):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-order-steps", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_preset("mnist-mlp", "quick")
    inputs = pipeline.prepare_inputs(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        params = pipeline.train_theta(inputs, tmp, progress=False)
    prob = pipeline.build_problem(inputs, params).astype(torch.float64)
    removals = torch.arange(args.k) * (prob.n_train // args.k)
    lam = cfg.influence.damping
    print(f"mnist-mlp quick: N={prob.n_train}, p={prob.n_params}, K={args.k}, damping={lam}, "
          f"threads={args.threads}")

    t0 = time.perf_counter()
    newton = pbrf.respond(prob, "pbrf", removals, damping=lam, progress=False)
    t_newton = time.perf_counter() - t0
    _report("newton", newton, t_newton)

    first = pbrf.Recipe.response_default(prob.n_train).replace(steps=args.first_order_steps)
    t0 = time.perf_counter()
    adam = pbrf.respond(prob, "pbrf", removals, damping=lam, recipe=first, progress=False)
    t_adam = time.perf_counter() - t0
    _report("first-order", adam, t_adam)

    if sum(adam.certified) < args.k:
        print(f"first-order: {args.k - sum(adam.certified)} of {args.k} removals never certified "
              f"(stopped after at most {args.first_order_steps} steps); time ratio "
              "first-order/newton "
              f"= {t_adam / t_newton:.1f}x with newton certifying {sum(newton.certified)}")
    else:
        print(f"time to certify all {args.k}: first-order / newton = {t_adam / t_newton:.1f}x")
    dn = (newton.params_flat - prob.theta).norm(dim=1)
    gap = (adam.params_flat - newton.params_flat).norm(dim=1) / dn
    print(f"first-order Δθ error relative to newton's: median {gap.median():.2e}, max "
          f"{gap.max():.2e}")


if __name__ == "__main__":
    main()
