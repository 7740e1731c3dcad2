"""Optimisation recipes and the batched optimiser behind training and every response function.

One engine serves base training (K = 1) and the response functions (K removal problems at once):
K parameter dicts are stacked along a leading axis and optimised together with
``vmap(grad_and_value(objective))`` on the *same* minibatch indices for every problem. SGD with
momentum and Adam act coordinate-wise, so the stacked run produces, problem by problem, what K
separate runs with the same seed would produce.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from tqdm.auto import tqdm

__all__ = ["Recipe", "optimize", "minibatches"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class Recipe:
    """How to optimise: optimiser, learning rate and schedule, budget, batch size, seed.

    Args:
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: peak learning rate.
        momentum: SGD momentum (heavy ball, PyTorch convention) or Adam's β₁.
        schedule: ``"constant"``, ``"cosine"`` (to 0) or ``"linear"`` (to 0).
        epochs: passes over the training set (fractional allowed); exclusive with ``steps``.
        steps: number of optimiser steps; exclusive with ``epochs``.
        batch_size: minibatch size; ``None`` = full batch.
        seed: seeds the minibatch order (and, for cold starts, the initialisation).
        until_plateau: stop a problem early once its gradient norm stops decreasing
            (window means of ``window`` steps, no 1% improvement in ``patience`` windows);
            ``steps``/``epochs`` is then the cap.
        beta2: Adam's β₂.

    Weight decay is not part of the recipe: it is the explicit L2 term of the objective
    (``Problem.weight_decay``, DESIGN §1).
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    schedule: str = "constant"
    epochs: float | None = None
    steps: int | None = None
    batch_size: int | None = 128
    seed: int = 0
    until_plateau: bool = False
    window: int = 20
    patience: int = 5
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Recipe.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Recipe.schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"Recipe.lr must be a positive number, got {self.lr!r}.")
        if not 0 <= self.momentum < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("Recipe.momentum and Recipe.beta2 must lie in [0, 1).")
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("Recipe: give exactly one of epochs=... or steps=....")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"Recipe.epochs must be > 0, got {self.epochs!r}.")
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps > 0):
            raise ValueError(f"Recipe.steps must be a positive int, got {self.steps!r}.")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"Recipe.batch_size must be a positive int or None (full batch), got {self.batch_size!r}.")
        if self.window < 1 or self.patience < 1:
            raise ValueError("Recipe.window and Recipe.patience must be >= 1.")

    def total_steps(self, n_train: int) -> int:
        """Number of optimiser steps for a training set of ``n_train`` points."""
        if self.steps is not None:
            return self.steps
        per_epoch = 1 if self.batch_size is None else math.ceil(n_train / self.batch_size)
        return max(1, round(self.epochs * per_epoch))

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate at ``step`` (0-based) of ``total``."""
        frac = step / max(total, 1)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return self.lr * (1 - frac)
        return self.lr

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Recipe: unknown field(s) {sorted(unknown)}.")
        return cls(**d)

    @classmethod
    def response_default(cls, n_train: int) -> "Recipe":
        """Default for the PBRF and proximal objectives: Adam until the gradient norm plateaus."""
        return cls(
            optimizer="adam", lr=1e-3, momentum=0.9, steps=3000,
            batch_size=None if n_train <= 4096 else 512, until_plateau=True,
        )


def minibatches(n: int, recipe: Recipe, device=None) -> Iterator[Tensor]:
    """Index tensors of successive minibatches: seeded reshuffle every epoch; full batch if ``batch_size`` is None."""
    if recipe.batch_size is None or recipe.batch_size >= n:
        full = torch.arange(n, device=device)
        while True:
            yield full
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    while True:
        perm = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, recipe.batch_size):
            yield perm[s : s + recipe.batch_size]


class _Plateau:
    """Per-problem early stopping on window means of the gradient norm."""

    def __init__(self, K: int, recipe: Recipe, device) -> None:
        self.recipe = recipe
        self.acc = torch.zeros(K, device=device, dtype=torch.float64)
        self.best = torch.full((K,), float("inf"), device=device, dtype=torch.float64)
        self.bad = torch.zeros(K, dtype=torch.long, device=device)

    def update(self, step: int, gnorm: Tensor, active: Tensor) -> Tensor:
        self.acc += gnorm.to(self.acc.dtype)
        if (step + 1) % self.recipe.window:
            return active
        mean = self.acc / self.recipe.window
        self.acc.zero_()
        improved = mean < self.best * (1 - 1e-2)
        self.best = torch.where(improved, mean, torch.minimum(self.best, mean))
        self.bad = torch.where(improved, torch.zeros_like(self.bad), self.bad + 1)
        return active & (self.bad < self.recipe.patience)


def _sq_norm(tree: dict[str, Tensor]) -> Tensor:
    return sum(v.pow(2).reshape(v.shape[0], -1).sum(1) for v in tree.values())


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class _Stepper:
    """SGD-momentum / Adam on stacked tensors, with a per-problem ``active`` mask."""

    def __init__(self, params: dict[str, Tensor], recipe: Recipe) -> None:
        self.r = recipe
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()} if recipe.optimizer == "adam" else None
        self.t = 0

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr: float, active: Tensor) -> None:
        self.t += 1
        r = self.r
        for k, p in params.items():
            g, a = grads[k], _bcast(active, params[k])
            on = a > 0
            if r.optimizer == "sgd":
                self.m[k] = torch.where(on, r.momentum * self.m[k] + g, self.m[k])
                update = self.m[k]
            else:
                self.m[k] = torch.where(on, r.momentum * self.m[k] + (1 - r.momentum) * g, self.m[k])
                self.v[k] = torch.where(on, r.beta2 * self.v[k] + (1 - r.beta2) * g * g, self.v[k])
                mhat = self.m[k] / (1 - r.momentum**self.t)
                vhat = self.v[k] / (1 - r.beta2**self.t)
                update = mhat / (vhat.sqrt() + 1e-8)
            p.copy_(torch.where(on, p - lr * update, p))


ObjectiveFn = Callable[[dict, dict, dict], Tensor]


def optimize(
    objective: ObjectiveFn,
    params: dict[str, Tensor],
    aux: dict[str, Tensor],
    n_train: int,
    recipe: Recipe,
    batch_fn: Callable[[Tensor], dict],
    progress: bool = True,
    desc: str = "optimise",
    callback: Callable[[int, dict[str, Tensor], float], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Minimise ``objective(params_k, aux_k, batch)`` for K stacked problems at once.

    Args:
        objective: scalar objective of ONE problem's parameter dict, its auxiliary tensors and
            the shared minibatch dict ``batch_fn(idx)``.
        params: initial parameters, every tensor stacked ``[K, ...]`` (not modified).
        aux: per-problem tensors stacked ``[K, ...]`` (masks, removed points, ...).
        n_train: training-set size (minibatches are drawn from ``range(n_train)``).
        recipe: the :class:`Recipe`.
        batch_fn: maps minibatch indices to the shared batch dict.
        callback: called as ``callback(step, params, lr)`` after every optimiser step (``step``
            counts from 1; ``params`` are the stacked parameters after it, not to be modified;
            ``lr`` the learning rate of that step). Used to save training checkpoints (TracIn).

    Returns:
        ``(params [K, ...], diagnostics)`` with diagnostics tensors ``[K]``: ``steps`` (steps taken
        before stopping), ``grad_norm`` (last minibatch gradient norm), ``objective`` (last
        minibatch objective), ``diverged`` (non-finite values met; the problem was frozen).
    """
    params = {k: v.detach().clone() for k, v in params.items()}
    K = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    total = recipe.total_steps(n_train)
    vg = vmap(grad_and_value(objective), in_dims=(0, 0, None))
    stepper = _Stepper(params, recipe)
    active = torch.ones(K, dtype=torch.bool, device=device)
    diverged = torch.zeros(K, dtype=torch.bool, device=device)
    steps = torch.zeros(K, dtype=torch.long, device=device)
    plateau = _Plateau(K, recipe, device) if recipe.until_plateau else None
    gnorm = obj = torch.full((K,), float("nan"), device=device)
    batches = minibatches(n_train, recipe, device)
    bar = tqdm(range(total), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        grads, obj = vg(params, aux, batch_fn(next(batches)))
        gnorm = _sq_norm(grads).sqrt()
        bad = ~torch.isfinite(gnorm) | ~torch.isfinite(obj)
        diverged |= bad & active
        active &= ~bad
        lr = recipe.lr_at(step, total)
        stepper.step(params, grads, lr, active)
        steps += active.long()
        if callback is not None:
            callback(step + 1, params, lr)
        if plateau is not None:
            active = plateau.update(step, gnorm, active)
        if not bool(active.any()):
            break
    bar.close()
    diag = {"steps": steps, "grad_norm": gnorm.detach(), "objective": obj.detach(), "diverged": diverged}
    return params, diag
