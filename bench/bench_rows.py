"""Benchmark: the Newton rows' own products and gradients in each of the engine's variants, at a
run's own sizes, in one run — what :class:`pbrf.newton.Fastest` chooses from.

The rows' own exact-Hessian products (float32, as the engine's model) and their float64 value and
gradient (the certificate's) over the whole training set, for K stacked rows at θ^s + noise, each
way the engine can compute them: ``vmap`` over the rows or a loop (a convolutional model on CPU).
Printed per case: seconds per full-data
pass of one row of each variant, as the engine timed them on its first call (one data chunk of
512 examples; each variant once, the first twice), the engine's choice (the first variant within
FASTEST_MARGIN of the fastest), and the ratio of
``vmap forward`` (the engine before this choice existed, where its 2-row × 16-example probe chose
``vmap``) to the choice. The values are the same up to round-off (checked on 64 examples,
relative to the norm).

Cases (the models at their initialisation on random inputs of the dataset's shape: the costs
do not depend on the values):

* ``resnet20``: ResNet-20 ×0.25, GELU (the cifar10-resnet20 quick profile), N = 1,000, K = 9;
* ``lenet``: smooth LeNet ×0.5 (GELU, average pooling), N = 500, K = 5;
* ``mlp``: MLP 64×2, GELU (mnist-mlp quick), N = 2,000, K = 65.

    python bench/bench_rows.py [--cases resnet20 lenet mlp] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.func import grad_and_value

import pbrf
from pbrf.engine import batch_fn
from pbrf.models import build
from pbrf.newton import Fastest, row_variants

CASES = {
    "resnet20": (dict(name="resnet20", width_mult=0.25, activation="gelu"), (3, 32, 32), 1000, 9),
    "lenet": (dict(name="lenet", width_mult=0.5, activation="gelu", pooling="avg"), (3, 32, 32),
              500, 5),
    "mlp": (dict(name="mlp", in_shape=(1, 28, 28), n_outputs=10, width=64, depth=2,
                 activation="gelu"), (1, 28, 28), 2000, 65),
}


def problem(spec: dict, shape: tuple, n: int) -> pbrf.Problem:
    """A float64 classification problem of ``n`` random images of ``shape`` on the model."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    args = {k: v for k, v in spec.items() if k != "name"}
    model = build(spec["name"], seed=0, **args).double()
    return pbrf.Problem(model, pbrf.tasks.Classification(), (x, y), weight_decay=1e-3)


def variants(prob, op: str) -> dict:
    """The engine's variants of ``op`` on the proximal objective's rows (as
    :class:`pbrf.newton.Batched` builds them): ``{name: fn(theta, [V,] aux, batch)}``.
    """
    obj = pbrf.kinds.get("proximal").objective(prob, 0.1)

    def value(th, a, b):
        return obj.value(prob.unflatten(th), a, b)

    if op == "value_grad":
        return row_variants(prob, grad_and_value(value), (0, 0, None))
    return row_variants(prob, value, (0, 0, 0, None), hessian=True)


def case(name: str) -> None:
    spec, shape, n, K = CASES[name]
    prob64 = problem(spec, shape, n)
    print(f"{name}: N={n}, p={prob64.n_params}, K={K}, threads={torch.get_num_threads()}")
    g = torch.Generator().manual_seed(1)
    noise = 1e-3 * torch.randn(K, prob64.n_params, generator=g, dtype=torch.float64)
    V64 = torch.randn(K, prob64.n_params, generator=g, dtype=torch.float64)
    for prob, label, op, base in (
            (prob64.astype(torch.float32), "float32 Hessian products", "hvp", "vmap forward"),
            (prob64, "float64 value and gradient", "value_grad", "vmap")):
        obj = pbrf.kinds.get("proximal").objective(prob, 0.1)
        aux = obj.make_aux(prob, [[0]] * K, 1.0)
        theta, V = (prob64.theta + noise).to(prob.dtype), V64.to(prob.dtype)
        args = (theta, V, aux) if op == "hvp" else (theta, aux)
        ways = variants(prob, op)
        engine = Fastest(prob, f"bench {op}", ways)
        batch = batch_fn(prob, obj.f_ref)(torch.arange(min(n, prob.chunk_size)))
        engine(*args, batch)  # the engine's first call: it times each variant, then chooses
        few = batch_fn(prob, obj.f_ref)(torch.arange(min(n, 64)))  # values compared on 64 examples
        outs = {v: fn(*args, few) for v, fn in ways.items()}
        outs = {v: o[0] if isinstance(o, tuple) else o for v, o in outs.items()}
        seconds = {k: v * n for k, v in engine.measured().items()}
        if len(ways) == 1:
            print(f"  {label}: one variant, {base} (nothing to choose)")
            continue
        chosen, ref = engine.choice(), outs[base]
        worst = max(float((o - ref).norm() / ref.norm()) for o in outs.values())
        print(f"  {label}, seconds per full-data pass of one row, as the engine measured them "
              f"(largest relative difference between variants {worst:.1e}):")
        for variant, s in seconds.items():
            mark = "  <- the engine's choice" if variant == chosen else ""
            print(f"    {variant:<14} {s:8.3f} s{mark}")
        print(f"    {base} / choice: {seconds[base] / seconds[chosen]:.1f}x")


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
