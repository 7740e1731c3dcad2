"""Benchmark: time to certify K PBRF removals, the certified Newton engine of today vs the one
before it, on the same θ^s and removals, in one run.

* ``old``: ``NewtonRecipe(model="auto", products="float64", precondition=0, switch=0.1)`` — each
  removal's own Gauss–Newton, then (once the gradient fell 10-fold) exact-Hessian model with
  float64 products, plain CG: the engine before issue 17, with today's trust-region rules (the
  round-off floor of the objective's differences and the μ reset, which both engines share and
  which only make the old one faster);
* ``new``: ``NewtonRecipe()`` — float32 products (objective, gradient and certificate float64), the
  shared curvature at θ^s plus each removal's exact term as the first model, a rank-256 Nyström
  preconditioner for every CG solve.

Cases (each needs ``$PBRF_DATA``):

1. ``mnist-mlp``: the preset's quick profile (2,000 MNIST images, MLP 64×2), K = 64;
2. ``lenet``: smooth LeNet ×0.5 (GELU, average pooling) on N = 500 CIFAR-10 images, 30 epochs of
   SGD, K = 4, λ = 0.1, wd = 1e-3 (issue 17's setting);
3. ``lenet-4000``: the same LeNet on N = 4,000 images, K = 16, the new engine alone.

Printed per engine: wall time, certified count (ρ ≤ 1e-2), largest ρ, CG iterations (mean per
removal) and, for a pair, the time ratio and the largest ``|Δm_new − Δm_old| / |Δm_old|`` (test
loss change on 20 test points, element-wise and per removal over its test points) over removals
both certify, and over those both brought to ρ ≤ 1e-8 (the stopping tolerance).

    PBRF_DATA=../shared/datasets python bench/bench_certify.py [--cases mnist-mlp lenet lenet-4000]
    [--threads 2] [--only old|new]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import pbrf
from pbrf.data import load
from pbrf.experiment.config import load_preset
from pbrf.experiment.run import driver as pipeline
from pbrf.models import build

OLD = pbrf.NewtonRecipe(model="auto", products="float64", precondition=0, switch=0.1)
NEW = pbrf.NewtonRecipe()


def mnist_mlp():
    """``(float64 problem, test set, damping)`` of the mnist-mlp quick profile."""
    cfg = load_preset("mnist-mlp", "quick")
    inputs = pipeline.prepare_inputs(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        params = pipeline.train_theta(inputs, tmp, progress=False)
    prob = pipeline.build_problem(inputs, params).astype(torch.float64)
    ds = inputs.dataset
    return prob, (ds.x_test, ds.y_test), cfg.influence.damping


def smooth_lenet(n_train: int):
    """``(float64 problem, test set, damping)``: smooth LeNet ×0.5 on ``n_train`` CIFAR-10
    images, 30 epochs of SGD (lr 0.05, momentum 0.9, cosine, batch 32), wd = 1e-3, λ = 0.1.
    """
    ds = load("cifar10", n_train=n_train, n_test=500, seed=0)
    model = build("lenet", seed=0, width_mult=0.5, activation="gelu", pooling="avg")
    task = pbrf.tasks.Classification()
    recipe = pbrf.Recipe(optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine", epochs=30,
                         batch_size=32)
    res = pbrf.train(model, task, ds.train, recipe, weight_decay=1e-3, progress=False)
    acc = float((res.model(ds.test[0]).argmax(1) == ds.test[1]).float().mean())
    print(f"  θ^s test accuracy {acc:.1%}")
    return res.problem(task, ds.train).astype(torch.float64), ds.test, 0.1


def run(name: str, prob, removals, damping: float, recipe, test):
    """One engine on ``removals``; prints its line and returns ``(seconds, response, Δm)``."""
    start = time.perf_counter()
    resp = pbrf.respond(prob, "pbrf", removals, damping=damping, recipe=recipe, progress=False)
    seconds = time.perf_counter() - start
    rhos = [d.rho for d in resp.diagnostics]
    cg = sum(d.cg_iterations for d in resp.diagnostics) / len(rhos)
    print(f"  {name:<4} {seconds:9.1f} s   certified {sum(resp.certified):3d}/{len(rhos)}   "
          f"max rho {max(rhos):.1e}   CG iterations per removal {cg:6.1f}")
    xt, yt = test
    return seconds, resp, resp.loss_change((xt[:20], yt[:20]))


def compare(old, new) -> None:
    """The time ratio and the Δm agreement over removals both engines certify, and over those
    both brought to the stopping tolerance (ρ ≤ 1e-8; a removal stopped above it, at the
    round-off floor of its float64 gradient, is certified but its Δm known only as well as its
    conditioning allows).
    """
    (t_old, r_old, dm_old), (t_new, r_new, dm_new) = old, new
    print(f"  old / new time = {t_old / t_new:.1f}x; certified old {sum(r_old.certified)}, new "
          f"{sum(r_new.certified)}")
    rho_old = [d.rho for d in r_old.diagnostics]
    rho_new = [d.rho for d in r_new.diagnostics]
    both = [k for k, (a, b) in enumerate(zip(r_old.certified, r_new.certified)) if a and b]
    tight = [k for k in both if max(rho_old[k], rho_new[k]) <= NEW.tol]
    for name, ks in (("certify", both), (f"reach rho <= {NEW.tol:g}", tight)):
        if not ks:
            continue
        a, b = dm_old[:, ks], dm_new[:, ks]
        elem = float(((b - a).abs() / a.abs().clamp_min(1e-300)).max())
        # an entry of Δm_old near zero inflates the element-wise ratio; per removal, over the
        # test points, the relative distance of the two vectors
        per = (b - a).norm(dim=0) / a.norm(dim=0).clamp_min(1e-300)
        w = ks[int(per.argmax())]
        print(f"  over the {len(ks)} removals both {name}: largest |Δm_new − Δm_old| / |Δm_old| "
              f"{elem:.1e} (element-wise, 20 test points); per removal ‖·‖ {float(per.max()):.1e} "
              f"(removal {w}: rho old {rho_old[w]:.1e}, new {rho_new[w]:.1e})")


def case(name: str, only: str | None = None) -> None:
    """One benchmark case (module docstring); ``only``: run that engine alone."""
    if name == "mnist-mlp":
        (prob, test, lam), K, engines = mnist_mlp(), 64, ("old", "new")
    elif name == "lenet":
        (prob, test, lam), K, engines = smooth_lenet(500), 4, ("old", "new")
    else:
        (prob, test, lam), K, engines = smooth_lenet(4000), 16, ("new",)
    engines = engines if only is None else (only,)
    removals = torch.arange(K) * (prob.n_train // K)
    print(f"{name}: N={prob.n_train}, p={prob.n_params}, K={K}, damping={lam}, "
          f"threads={torch.get_num_threads()}")
    results = {e: run(e, prob, removals, lam, OLD if e == "old" else NEW, test) for e in engines}
    if len(results) == 2:
        compare(results["old"], results["new"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", nargs="+", default=["mnist-mlp", "lenet", "lenet-4000"],
                    choices=["mnist-mlp", "lenet", "lenet-4000"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["old", "new"], default=None,
                    help="run one engine alone (no ratio)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.cases:
        case(name, args.only)


if __name__ == "__main__":
    main()
