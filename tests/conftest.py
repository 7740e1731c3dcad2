"""Shared fixtures: tiny float64 problems for every task."""

from __future__ import annotations

import os

# One thread per process: the suite runs in two pytest-xdist workers on two cores, and the CLI
# subprocesses that tests start inherit this (torch reads it at import).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import pbrf  # noqa: E402
from pbrf import tasks  # noqa: E402

# Tiny problems are dominated by per-op overhead; one intra-op thread is fastest and immune to
# oversubscription when several test processes share the cores.
torch.set_num_threads(1)


def mlp(d_in: int, d_out: int, width: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.Tanh(),
                         nn.Linear(width, d_out)).double()


def small_cnn(n_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, n_classes)
    ).double()


def tiny_problem(kind: str, n: int = 12, seed: int = 0, weight_decay: float = 1e-2) -> pbrf.Problem:
    """A tiny float64 problem of the given kind with deterministic data."""
    g = torch.Generator().manual_seed(seed)
    if kind == "regression":
        x, y = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g,
            dtype=torch.float64)
        model, task = mlp(3, 2, seed=seed), tasks.Regression()
    elif kind == "classification":
        x, y = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
            generator=g)
        model, task = mlp(3, 3, seed=seed), tasks.Classification()
    elif kind == "binary":
        x, y = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,),
            generator=g).double()
        model, task = mlp(3, 1, seed=seed), tasks.BinaryClassification()
    elif kind == "reconstruction":
        x, y = torch.randn(n, 4, generator=g, dtype=torch.float64), None
        model, task = mlp(4, 4, width=2, seed=seed), tasks.Reconstruction()
    elif kind == "language_model":
        from pbrf.models import build

        x = torch.randint(0, 5, (n, 4), generator=g)
        y = torch.randint(0, 5, (n, 4), generator=g)
        model = build("transformer", seed=seed, dtype=torch.float64, vocab_size=5, seq_len=4,
                      d_model=4,
                      n_layers=1, n_heads=2)
        task = tasks.LanguageModel()
    elif kind == "cnn":
        x, y = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
            generator=g)
        model, task = small_cnn(seed=seed), tasks.Classification()
    else:
        raise KeyError(kind)
    return pbrf.Problem(model, task, (x, y), weight_decay=weight_decay, chunk_size=5)


PROBLEM_KINDS = ["regression", "classification", "binary", "reconstruction", "language_model",
                 "cnn"]


@pytest.fixture(params=PROBLEM_KINDS)
def any_problem(request) -> pbrf.Problem:
    return tiny_problem(request.param)
