"""Shared set-up of the benchmarks: a digits MLP trained with pbrf.train (the default preset's
recipe).
"""

import pbrf
from pbrf.data import load
from pbrf.models import build

RECIPE = pbrf.Recipe(optimizer="sgd", lr=0.05, momentum=0.9, epochs=20, batch_size=64,
                     schedule="cosine")


def trained_digits_mlp(width: int, progress: bool = False):
    """``(dataset, task, TrainResult, Problem)`` for a 2-layer MLP of ``width`` on digits (wd
    = 1e-3).
    """
    ds = load("digits")
    model = build("mlp", seed=0, in_shape=(1, 8, 8), n_outputs=10, width=width, depth=2)
    task = pbrf.tasks.Classification()
    trained = pbrf.train(model, task, (ds.x_train, ds.y_train), RECIPE, weight_decay=1e-3,
                         progress=progress)
    return ds, task, trained, trained.problem(task, (ds.x_train, ds.y_train))
