"""Benchmark: K removal problems optimised as one vectorised problem vs one at a time.

Digits MLP, K = 64 single-point removals, identical step counts and seeds; prints the wall time of
each way and their ratio measured in this run, plus the largest parameter difference between them.

    python bench/bench_respond.py [--k 64] [--steps 100] [--kind warm]
"""

from __future__ import annotations

import argparse
import time

import torch

import pbrf
from _digits import trained_digits_mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kind", default="warm", choices=["warm", "proximal", "pbrf"])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ds, task, trained, prob = trained_digits_mlp(args.width)
    recipe = pbrf.Recipe(optimizer="adam", lr=1e-3, steps=args.steps, batch_size=128)
    removals = list(range(args.k))
    kw = dict(damping=1e-3, recipe=recipe, progress=False)

    print(f"{args.kind} response, digits MLP ({prob.n_params} params, N={prob.n_train}), "
          f"K={args.k} removals, {args.steps} Adam steps of batch 128")
    threads = [args.threads] if args.threads else sorted({1, torch.get_num_threads()})
    best_loop = best_vec = float("inf")
    for n in threads:
        torch.set_num_threads(n)
        pbrf.respond(prob, args.kind, removals[:2], **kw)  # warm-up
        t0 = time.perf_counter()
        vec = pbrf.respond(prob, args.kind, removals, chunk_size=args.k, **kw)
        t_vec = time.perf_counter() - t0
        t0 = time.perf_counter()
        loop = torch.cat([pbrf.respond(prob, args.kind, [r], **kw).params_flat for r in removals])
        t_loop = time.perf_counter() - t0
        diff = (vec.params_flat - loop).abs().max().item()
        best_loop, best_vec = min(best_loop, t_loop), min(best_vec, t_vec)
        print(f"  {n} thread(s): one-at-a-time {t_loop:7.2f} s, vectorised {t_vec:6.2f} s, "
              f"ratio {t_loop / t_vec:5.1f}x, max |param difference| {diff:.1e}")
    print("  speed-up, each way at its best thread count (one-at-a-time / vectorised): "
          f"{best_loop / best_vec:.1f}x")

if __name__ == "__main__":
    main()
