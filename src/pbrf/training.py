"""Base training of θ^s with a :class:`~pbrf.Recipe`, and checkpoints (safetensors + JSON).

Training minimises ``J(θ) = (1/N) Σ_i L_i + (wd/2)||θ||²`` (weight decay as an explicit L2 term,
``docs/conventions.md`` §1) with the same batched engine as the response functions, so a cold-start
reference run
with the same initialisation and seed reproduces θ^s exactly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .engine import run_batched, stack
from .fileio import atomic_write, dumps
from .objectives import removal_objective
from .optim import Recipe
from .problem import Params, Problem
from .tasks import Task

__all__ = ["train", "TrainResult", "save_checkpoint", "load_checkpoint"]


@dataclass
class TrainResult:
    """Output of :func:`train`: a trained copy of the model, its parameters and diagnostics."""

    model: nn.Module
    params: Params
    recipe: Recipe
    weight_decay: float
    diagnostics: dict = field(default_factory=dict)
    checkpoints: list[dict] = field(default_factory=list)
    """Intermediate parameters when ``train(..., checkpoints=n)``: ``{"step", "lr", "params"}``
    at ``n`` evenly spaced steps, the last at the final step (θ^s) — what TracIn sums over."""

    def problem(self, task: Task, train, **kwargs) -> Problem:
        """A :class:`Problem` at the trained parameters that remembers the recipe (for warm/cold
        starts).
        """
        return Problem(self.model, task, train, weight_decay=self.weight_decay, recipe=self.recipe,
                       **kwargs)


def train(
    model: nn.Module,
    task: Task,
    train: tuple[Tensor, Tensor | None],
    recipe: Recipe,
    weight_decay: float = 0.0,
    progress: bool = True,
    checkpoints: int = 0,
) -> TrainResult:
    """Train ``model`` (from its current parameters) on ``train`` with ``recipe``.

    Deterministic: the same model, data and recipe give bit-identical parameters. The input model
    is not modified; the result holds a trained deep copy.

    ``checkpoints = n > 0`` also keeps the parameters at ``n`` evenly spaced steps (the last one
    is the final step) with the learning rate of that step, in ``TrainResult.checkpoints``.

    Returns:
        :class:`TrainResult` with ``model``, ``params`` and diagnostics (steps, final full-data
        objective and gradient norm).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"train: recipe must be a pbrf.Recipe, got {type(recipe).__name__}.")
    if not (isinstance(checkpoints, int) and checkpoints >= 0):
        raise ValueError(f"train: checkpoints must be an int >= 0, got {checkpoints!r}.")
    prob = Problem(model, task, train, weight_decay=weight_decay)
    aux = {"w": torch.ones(1, prob.n_train, dtype=prob.dtype, device=prob.device)}
    total = recipe.total_steps(prob.n_train)
    marks = set()
    if checkpoints:
        marks = {max(1, round(total * (c + 1) / checkpoints)) for c in range(checkpoints)}
    saved: list[dict] = []

    def keep(step: int, stacked: Params, lr: float) -> None:
        if step in marks:
            params = {k: v[0].detach().clone() for k, v in stacked.items()}
            saved.append({"step": step, "lr": float(lr), "params": params})

    theta, diag = run_batched(prob, removal_objective(prob), stack(prob.params, 1), aux, recipe,
                              None, progress, "train", callback=keep if checkpoints else None)
    params = {k: v[0].clone() for k, v in prob.unflatten(theta).items()}
    if checkpoints and (not saved or saved[-1]["step"] != diag[0].steps):  # stopped early
        last_lr = saved[-1]["lr"] if saved else recipe.lr_at(0, total)
        saved.append({"step": int(diag[0].steps), "lr": last_lr,
                      "params": {k: v.clone() for k, v in params.items()}})
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            p.copy_(params[name])
    return TrainResult(trained, params, recipe, float(weight_decay), diag[0].to_dict(), saved)


def save_checkpoint(path, params: Params, meta: dict | None = None) -> Path:
    """Write ``params`` to ``path`` (safetensors) and ``meta`` to ``path.with_suffix('.json')``.

    The metadata is serialised first, then both are written atomically
    (:func:`pbrf.fileio.atomic_write`; tensors
    first, then metadata), so a failure leaves no partial file and no temporary files. ``meta`` is
    written by the JSON policy of :mod:`pbrf.fileio` (NaN/inf as ``null``).
    """
    path = Path(path)
    text = dumps(meta or {}, unknown="error", indent=2)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in params.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(path.with_suffix(".json"), text)
    return path


def load_checkpoint(path) -> tuple[Params, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; returns ``(params, meta)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train first (pbrf.train) or "
                                "check the path.")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return load_file(str(path)), meta
