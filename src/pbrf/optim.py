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

__all__ = ["Recipe", "RecipeFields", "check_recipe", "optimize", "minibatches", "OPTIMIZERS",
           "SCHEDULES"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class RecipeFields:
    """The fields of a first-order recipe, declared once: :class:`Recipe` and the experiment
    config's ``[train]`` section (:class:`pbrf.experiment.config.TrainConfig`) both extend it.
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


def check_recipe(r: RecipeFields, where: str = "Recipe") -> None:
    """The one validation of a recipe's fields; ``ValueError("<where>.<field>: ...")`` naming the
    fix.

    A ``batch_size`` of ``None`` (or ``"full"``, the config files' spelling) is full batch.
    """

    def fail(name: str, msg: str):
        raise ValueError(f"{where}.{name}: {msg}" if name else f"{where}: {msg}")

    batch_size = None if r.batch_size == "full" else r.batch_size
    if r.optimizer not in OPTIMIZERS:
        fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}; got {r.optimizer!r}.")
    if r.schedule not in SCHEDULES:
        fail("schedule", f"must be one of {', '.join(SCHEDULES)}; got {r.schedule!r}.")
    if not (isinstance(r.lr, (int, float)) and r.lr > 0 and math.isfinite(r.lr)):
        fail("lr", f"must be a finite number > 0; got {r.lr!r}.")
    for name in ("momentum", "beta2"):
        if not (isinstance(getattr(r, name), (int, float)) and 0 <= getattr(r, name) < 1):
            fail(name, f"must lie in [0, 1) (e.g. 0.9); got {getattr(r, name)!r}.")
    if (r.epochs is None) == (r.steps is None):
        fail("", f"give exactly one of epochs or steps (e.g. {where}.epochs=20).")
    if r.epochs is not None and not (isinstance(r.epochs, (int, float)) and r.epochs > 0):
        fail("epochs", f"must be a finite number > 0; got {r.epochs!r}.")
    if r.steps is not None and not (isinstance(r.steps, int) and r.steps > 0):
        fail("steps", f"must be a positive int; got {r.steps!r}.")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
        fail("batch_size", f"must be a positive int or None (full batch); got {batch_size!r}.")
    if r.window < 1 or r.patience < 1:
        fail("window", f"window and patience must be >= 1; got {r.window!r}, {r.patience!r}.")


@dataclass(frozen=True)
class Recipe(RecipeFields):
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
    (``Problem.weight_decay``, ``docs/conventions.md`` §1).
    """

    def __post_init__(self) -> None:
        check_recipe(self)

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
        """The fields as a plain dict (:meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A recipe from :meth:`to_dict`'s dict; unknown fields are refused."""
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
    """Index tensors of successive minibatches: seeded reshuffle every epoch; full batch if
    ``batch_size`` is None.
    """
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
        self.v = {k: torch.zeros_like(v) for k,
                  v in params.items()} if recipe.optimizer == "adam" else None
        self.t = 0

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr: float,
             active: Tensor) -> None:
        self.t += 1
        r = self.r
        for k, p in params.items():
            g, a = grads[k], _bcast(active, params[k])
            on = a > 0
            if r.optimizer == "sgd":
                self.m[k] = torch.where(on, r.momentum * self.m[k] + g, self.m[k])
                update = self.m[k]
            else:
                self.m[k] = torch.where(on, r.momentum * self.m[k] + (1 - r.momentum) * g,
                                        self.m[k])
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
    first = next(iter(params.values()))
    K, device = first.shape[0], first.device
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
        _freeze_nonfinite(gnorm, obj, active, diverged)
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
    diag = {"steps": steps, "grad_norm": gnorm.detach(), "objective": obj.detach(),
            "diverged": diverged}
    return params, diag


def _freeze_nonfinite(gnorm: Tensor, obj: Tensor, active: Tensor, diverged: Tensor) -> None:
    """Stop (in place) the problems whose gradient or objective is not finite, flagging them
    ``diverged``.
    """
    bad = ~torch.isfinite(gnorm) | ~torch.isfinite(obj)
    diverged |= bad & active
    active &= ~bad
