"""Benchmark: the Newton engine's shared Gauss–Newton products through stored output Jacobians
(:mod:`pbrf.jacobian`) vs through the network, in one run.

The shared model of the PBRF (the Gauss–Newton curvature at θ^s, one for every removal row) and
the Nyström preconditioner's sketch apply ONE curvature to many vectors, in float32 as the engine
does. Printed per case: whether the engine's rule (:func:`pbrf.jacobian.pays`) stores the
Jacobians, the seconds to build them, the seconds of a product of K vectors each way and their
ratio, the largest relative difference between the two, and the rank-256 sketch through the
stored Jacobians (measured) vs through the network (16 blocks of 16 vectors, one block measured).

Cases (the models at their initialisation on random inputs of the dataset's shape: the costs do
not depend on the values):

* ``resnet20``: ResNet-20 ×0.25, GELU (the cifar10-resnet20 quick profile), N = 1,000, K = 9;
* ``lenet``: smooth LeNet ×0.5 (GELU, average pooling), N = 500, K = 5;
* ``mlp``: MLP 64×2, GELU (mnist-mlp quick), K = 65 — the rule keeps its products through the
  network; the stored way is timed anyway, to show why, on N = 512 (one data chunk: its
  Jacobians, 1.1 GB, are over :data:`pbrf.jacobian.JACOBIAN_BYTES`, raised here to hold them).

    python bench/bench_jacobian.py [--cases resnet20 lenet mlp] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import pbrf
from bench_rows import CASES, problem
from pbrf import jacobian
from pbrf.engine import batch_fn
from pbrf.newton import Batched, Preconditioner


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def case(name: str) -> None:
    spec, shape, n, K = CASES[name]
    n = 512 if name == "mlp" else n
    prob = problem(spec, shape, n).astype(torch.float32)
    need = n * 10 * prob.n_params * 4
    obj = pbrf.kinds.get("pbrf").objective(prob, 1e-3)
    aux = obj.make_aux(prob, [[]], 1.0)
    aux0 = {k: v[0] for k, v in aux.items()}
    B = Batched(prob, obj.value, obj.gn, aux, batch_fn(prob, obj.f_ref))
    print(f"{name}: N={n}, p={prob.n_params}, K={K}, threads={torch.get_num_threads()}; the "
          f"engine stores the Jacobians: {jacobian.pays(prob)} "
          f"({jacobian.forward_flops(prob)} forward FLOPs per example, 4·C·p = "
          f"{4 * jacobian.outputs_per_example(prob) * prob.n_params})")
    V = torch.randn(K, prob.n_params, generator=torch.Generator().manual_seed(0))
    theta = prob.theta
    real, budget = jacobian.pays, jacobian.JACOBIAN_BYTES
    jacobian.pays = lambda p: True
    jacobian.JACOBIAN_BYTES = max(budget, need)
    try:
        _, build = timed(lambda: B.shared("gn", theta, aux0, V[:1]))
        stored, t_stored = timed(lambda: B.shared("gn", theta, aux0, V))
        block = V[:1].expand(16, -1)
        _, t_sketch = timed(lambda: Preconditioner.sketch(
            lambda W: B.shared("gn", theta, aux0, W), prob.n_params, 256, theta,
            eps=torch.finfo(torch.float32).eps, block=16))
        jacobian.pays = lambda p: False
        network, t_network = timed(lambda: B.shared("gn", theta, aux0, V))
        _, t_block = timed(lambda: B.shared("gn", theta, aux0, block))
    finally:
        jacobian.pays, jacobian.JACOBIAN_BYTES = real, budget
    diff = float((stored - network).norm() / network.norm())
    print(f"  build the Jacobians (and the output Hessians) {build:8.2f} s  "
          f"({n} examples, {n * jacobian.outputs_per_example(prob) * prob.n_params * 4 / 2**20:.0f}"
          " MiB)")
    print(f"  {K} vectors: network {t_network:8.3f} s   stored {t_stored:8.3f} s   "
          f"network / stored {t_network / t_stored:7.1f}x   (relative difference {diff:.1e})")
    print(f"  rank-256 sketch: stored {t_sketch:8.2f} s (measured)   network {16 * t_block:8.1f} s "
          f"(16 blocks of 16 vectors, one measured)   {16 * t_block / t_sketch:7.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.cases:
        case(name)


if __name__ == "__main__":
    main()
