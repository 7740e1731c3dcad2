"""How good is θ^s? Train and test loss, the task's metric, the final gradient norm, and a warning
when the base model is near chance level (then every number of the run describes an untrained
network, not the paper's setting).

The metric comes from the problem's task: accuracy of :meth:`pbrf.tasks.Task.predictions` for the
tasks that predict labels (classification, binary; next-token accuracy for a language model)
against the chance level of always predicting the most frequent class of the training labels;
R² for regression and reconstruction, whose outputs are the prediction (``1 − MSE / variance of
the targets``; chance = 0). The lines that show it are
:func:`pbrf.experiment.report.quality_lines`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pbrf.tasks import Regression, Task

__all__ = ["base_quality", "NEAR_CHANCE"]

#: A metric within this share of the distance from chance to perfect counts as "near chance".
NEAR_CHANCE = 0.1
#: The name of the accuracy of a task's predictions, where it is not "accuracy".
_ACCURACY_NAMES = {"language_model": "next-token accuracy"}


def _metric(task: Task, f: Tensor, t: Tensor, train_t: Tensor) -> tuple[str, float, float]:
    """``(name, value, chance)`` of the task's metric on outputs ``f`` and targets ``t``."""
    if isinstance(task, Regression):  # the outputs are the prediction: R²
        y = t.reshape(f.shape).to(f.dtype)
        mse = float((f - y).pow(2).mean())
        var = float((y - train_t.reshape(-1, *f.shape[1:]).to(f.dtype).mean(0)).pow(2).mean())
        return "R²", (1.0 - mse / var) if var > 0 else math.nan, 0.0
    pred = task.predictions(f).reshape(-1)
    labels, train_labels = t.reshape(-1).long(), train_t.reshape(-1).long()
    majority = torch.bincount(train_labels).argmax()
    return (
        _ACCURACY_NAMES.get(task.name, "accuracy"),
        float((pred == labels).double().mean()),
        float((labels == majority).double().mean()),
    )


@torch.no_grad()
def _test_outputs(problem, x: Tensor) -> Tensor:
    """Outputs at θ^s on ``x``, in the problem's chunks (as :meth:`pbrf.Problem.train_outputs`)."""
    return torch.cat([problem.outputs(problem.params, x[s]) for s in problem.chunks(x.shape[0])])


def base_quality(problem, test: tuple[Tensor, Tensor | None]) -> dict:
    """Quality of θ^s on the whole training set and on ``test`` (``(x, y)``, the full test split;
    ``y`` is None for reconstruction), with the metric of ``problem.task``.

    Returns ``{"metric", "train_loss", "test_loss", "train_metric", "test_metric", "chance",
    "grad_norm", "n_test", "near_chance", "warning"}``; ``grad_norm`` is ``‖∇J(θ^s)‖`` over the
    full batch.
    """
    task = problem.task
    x_test, t_test = problem.prepare(test, "test")
    f_train, f_test = problem.train_outputs(), _test_outputs(problem, x_test)
    train_loss = float(task.loss(f_train, problem.t).mean())
    test_loss = float(task.loss(f_test, t_test).mean())
    name, train_m, _ = _metric(task, f_train, problem.t, problem.t)
    _, test_m, test_chance = _metric(task, f_test, t_test, problem.t)
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
