"""Benchmark: base training of the digits MLP (the default preset's θ^s) — wall time and test
accuracy.

    python bench/bench_train.py
"""

import time

import torch

import pbrf
from _digits import RECIPE
from pbrf.data import load
from pbrf.models import build


def main() -> None:
    ds = load("digits")
    model = build("mlp", seed=0, in_shape=(1, 8, 8), n_outputs=10, width=64, depth=2)
    recipe = RECIPE
    t0 = time.perf_counter()
    result = pbrf.train(model, pbrf.tasks.Classification(), (ds.x_train, ds.y_train), recipe,
                        weight_decay=1e-3)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (result.model(ds.x_test).argmax(1) == ds.y_test).double().mean().item()
    print(f"digits MLP 64x2, {recipe.total_steps(len(ds.x_train))} SGD steps, "
          f"{torch.get_num_threads()} threads: "
          f"{seconds:.1f} s, test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
