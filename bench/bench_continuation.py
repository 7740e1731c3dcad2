"""Benchmark: the proximal response's no-removal continuation with and without the L-BFGS
warm-up (``NewtonRecipe.warmup``, off by default), on the same θ^s and removals, in one run.

Measured (2 idle cores, 2 threads): Newton alone 371.6 s, with a 600-evaluation warm-up 395.7 s,
both 4 of 4 certified and paired-certified; the two continuations landed 14% of their drift apart
(two local minima) and the paired Δm differed up to 3.3-fold: on an unconverged θ^s the
proximal response depends on the optimiser's path, which is why the warm-up is off by default.

Case (needs ``$PBRF_DATA``; the problem of ``bench_certify.py``): smooth LeNet ×0.5 on 500 CIFAR-10
images after 30 epochs of SGD (θ^s is not a minimum of J: the continuation drifts far), K = 4
proximal removals, λ = 0.1, ``paired=True``. Prints per engine: wall time of the whole call
(continuation + rows), certified and paired-certified counts, the largest ρ; then the time ratio,
how far apart the two continuations land (relative to their drift from θ^s) and the largest
relative difference of the paired Δm (20 test points).

    PBRF_DATA=../shared/datasets python bench/bench_continuation.py [--threads 2] [--warmup 600]
"""

from __future__ import annotations

import argparse
import time

import torch

import pbrf
from bench_certify import smooth_lenet


def run(label: str, prob, removals, lam: float, warmup: int, test):
    """One proximal call; prints its line and returns ``(seconds, response, paired Δm)``."""
    start = time.perf_counter()
    resp = pbrf.respond(prob, "proximal", removals, damping=lam, paired=True, progress=False,
                        recipe=pbrf.NewtonRecipe(warmup=warmup))
    seconds = time.perf_counter() - start
    d = resp.diagnostics
    print(f"  {label:<22} {seconds:8.1f} s   certified {sum(resp.certified)}/{len(d)}   "
          f"paired {sum(bool(x.paired_certified) for x in d)}/{len(d)}   "
          f"max rho {max(x.rho for x in d):.1e}")
    xt, yt = test
    return seconds, resp, resp.loss_change((xt[:20], yt[:20]), paired=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=600, help="L-BFGS evaluations, at most")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prob, test, lam = smooth_lenet(500)
    removals = [[int(k)] for k in torch.arange(4) * (prob.n_train // 4)]
    print(f"lenet proximal: N={prob.n_train}, p={prob.n_params}, K={len(removals)}, "
          f"damping={lam}, threads={args.threads}")
    t0, r0, dm0 = run("Newton alone", prob, removals, lam, 0, test)
    t1, r1, dm1 = run("L-BFGS warm-up", prob, removals, lam, args.warmup, test)
    c0, c1 = r0.paired_reference, r1.paired_reference
    apart = float((c1 - c0).norm() / (c0 - prob.theta).norm())
    diff = float(((dm1 - dm0).norm(dim=0) / dm0.norm(dim=0)).max())
    print(f"  alone / warm-up time = {t0 / t1:.1f}x; continuations {apart:.1e} of the drift "
          f"apart; paired Δm, largest relative difference per removal {diff:.1e}")


if __name__ == "__main__":
    main()
