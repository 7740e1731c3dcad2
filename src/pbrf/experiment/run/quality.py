"""How good is θ^s? Train and test loss, the task's metric, the final gradient norm, and a warning
when the base model is near chance level (then every number of the run describes an untrained
network, not the paper's setting).

Metrics per task: accuracy (classification, binary, language model: next-token accuracy) against
the chance level of always predicting the most frequent class of the training labels; R² for
regression and reconstruction (``1 − MSE / variance of the targets``; chance = 0). The lines that
show it are :func:`pbrf.experiment.report.quality_lines`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["base_quality", "NEAR_CHANCE"]

#: A metric within this share of the distance from chance to perfect counts as "near chance".
NEAR_CHANCE = 0.1


@torch.no_grad()
def _outputs(problem, x: Tensor) -> Tensor:
    return torch.cat([problem.outputs(problem.params, x[s]) for s in problem.chunks(x.shape[0])])


def _metric(task: str, f: Tensor, t: Tensor, train_t: Tensor) -> tuple[str, float, float]:
    """``(name, value, chance)`` of the task's metric."""
    if task in ("classification", "language_model", "binary"):
        if task == "binary":
            pred, labels, train_labels = (
                (f.reshape(-1) > 0).long(),
                t.reshape(-1).long(),
                train_t.reshape(-1).long(),
            )
        else:
            pred, labels, train_labels = (
                f.argmax(-1).reshape(-1),
                t.reshape(-1).long(),
                train_t.reshape(-1).long(),
            )
        majority = torch.bincount(train_labels).argmax()
        name = "next-token accuracy" if task == "language_model" else "accuracy"
        return (
            name,
            float((pred == labels).double().mean()),
            float((labels == majority).double().mean()),
        )
    y = t.reshape(f.shape).to(f.dtype)
    mse = float((f - y).pow(2).mean())
    var = float((y - train_t.reshape(-1, *f.shape[1:]).to(f.dtype).mean(0)).pow(2).mean())
    return "R²", (1.0 - mse / var) if var > 0 else math.nan, 0.0


def base_quality(problem, task_name: str, test: tuple[Tensor, Tensor]) -> dict:
    """Quality of θ^s on the whole training set and on ``test`` (``(x, y)``, the full test split).

    Returns ``{"metric", "train_loss", "test_loss", "train_metric", "test_metric", "chance",
    "grad_norm", "near_chance", "warning"}``; ``grad_norm`` is ``‖∇J(θ^s)‖`` over the full batch.
    """
    x_test, t_test = problem.prepare(test, "test")
    f_train, f_test = _outputs(problem, problem.x), _outputs(problem, x_test)
    train_loss = float(problem.task.loss(f_train, problem.t).mean())
    test_loss = float(problem.task.loss(f_test, t_test).mean())
    name, train_m, chance = _metric(task_name, f_train, problem.t, problem.t)
    _, test_m, test_chance = _metric(task_name, f_test, t_test, problem.t)
    params = {k: v.detach().requires_grad_(True) for k, v in problem.params.items()}
    grads = torch.autograd.grad(problem.objective(params), list(params.values()))
    gnorm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    near = bool(math.isfinite(test_m) and test_m <= test_chance + NEAR_CHANCE * (1 - test_chance))
    warning = None
    if near:
        warning = (
            f"θ^s is near chance level (test {name} {test_m:.3f}, chance {test_chance:.3f}): "
            "the base model has not learnt the task, so this run measures an untrained network; "
            "train longer or with "
            "another learning rate (train.epochs, train.lr)."
        )
    return {
        "metric": name,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "train_metric": train_m,
        "test_metric": test_m,
        "chance": test_chance,
        "grad_norm": gnorm,
        "n_test": int(x_test.shape[0]),
        "near_chance": near,
        "warning": warning,
    }

