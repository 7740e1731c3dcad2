"""Benchmark: the accurate influence solve (the linearised PBRF, ``solver="cg"``) with and without
the Newton engine's Nyström preconditioner, on the same removals, in one run.

Cases (each needs ``$PBRF_DATA``; the problems of ``bench_certify.py``): ``mnist-mlp`` (quick
profile, K = 64, λ = 0.01) and ``lenet`` (smooth LeNet ×0.5, N = 500, K = 4, λ = 0.1). Prints per
solve: wall time (the preconditioner's sketch included), CG iterations, the relative residual
reached (tol 1e-10), and the largest ``‖Δθ_pcg − Δθ_cg‖ / ‖Δθ_cg‖`` over the removals.

    PBRF_DATA=../shared/datasets python bench/bench_accurate.py [--cases mnist-mlp lenet]
    [--threads 2] [--rank 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_certify import mnist_mlp, smooth_lenet
from pbrf.influence import delta_theta


def case(name: str, rank: int) -> None:
    """One problem: plain CG, then preconditioned CG, on the same removals."""
    prob, _, lam = mnist_mlp() if name == "mnist-mlp" else smooth_lenet(500)
    K = 64 if name == "mnist-mlp" else 4
    removals = [[int(k)] for k in torch.arange(K) * (prob.n_train // K)]
    print(f"{name}: N={prob.n_train}, p={prob.n_params}, K={K}, damping={lam}, "
          f"threads={torch.get_num_threads()}")
    out = {}
    for label, opts in (("cg", {}), (f"cg + Nyström rank {rank}", {"precondition": rank})):
        start = time.perf_counter()
        d, info = delta_theta(prob.astype(torch.float64), removals, lam, "cg",
                              solver_options={"tol": 1e-10, "max_iter": 5000, **opts})
        seconds = time.perf_counter() - start
        out[label] = (seconds, d, info)
        print(f"  {label:<24} {seconds:8.1f} s   iterations {info.iterations:5d}   "
              f"residual {info.residual:.1e}   converged {info.converged}")
    (t0, d0, i0), (t1, d1, i1) = out.values()
    diff = float(((d1 - d0).norm(dim=1) / d0.norm(dim=1)).max())
    print(f"  plain / preconditioned: time {t0 / t1:.1f}x, iterations "
          f"{i0.iterations / max(i1.iterations, 1):.1f}x; largest relative Δθ difference "
          f"{diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", nargs="+", default=["mnist-mlp", "lenet"],
                    choices=["mnist-mlp", "lenet"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.cases:
        case(name, args.rank)


if __name__ == "__main__":
    main()
