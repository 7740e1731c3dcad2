"""θ^s quality in the summary: metrics (chosen by the task object) against brute-force values,
the near-chance warning."""

import math

import pytest
import torch

import pbrf
from pbrf.experiment import report
from pbrf.experiment.report import quality_lines
from pbrf.experiment.run.quality import base_quality

from ..conftest import tiny_problem


def _classification(n=300, d=5, classes=3, seed=0, informative=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, classes, generator=g, dtype=torch.float64)
    y = (x @ w).argmax(1) if informative else torch.randint(0, classes, (n,), generator=g)
    return x, y


def test_trained_classifier_reports_accuracy_and_no_warning():
    x, y = _classification()
    model = torch.nn.Linear(5, 3).double()
    res = pbrf.train(
        model,
        pbrf.tasks.Classification(),
        (x[:200], y[:200]),
        pbrf.Recipe(lr=0.5, steps=300, batch_size=None),
        weight_decay=1e-3,
        progress=False,
    )
    prob = res.problem(pbrf.tasks.Classification(), (x[:200], y[:200]))
    q = base_quality(prob, (x[200:], y[200:]))
    with torch.no_grad():
        acc = float((res.model(x[200:]).argmax(1) == y[200:]).double().mean())
        loss = float(torch.nn.functional.cross_entropy(res.model(x[200:]), y[200:]))
    assert q["test_metric"] == pytest.approx(acc) and q["test_loss"] == pytest.approx(
        loss, rel=1e-12
    )
    assert q["test_metric"] > 0.8 and not q["near_chance"] and q["warning"] is None
    grad = torch.func.grad(lambda p: prob.objective(p))(prob.params)
    assert q["grad_norm"] == pytest.approx(
        float(torch.sqrt(sum(v.pow(2).sum() for v in grad.values()))), rel=1e-10
    )
    assert q["metric"] == "accuracy"
    assert len(quality_lines(q)) == 1


def test_untrained_classifier_is_flagged_near_chance():
    x, y = _classification(informative=False)
    prob = pbrf.Problem(
        torch.nn.Linear(5, 3).double(), pbrf.tasks.Classification(), (x[:200], y[:200])
    )
    q = base_quality(prob, (x[200:], y[200:]))
    majority = torch.bincount(y[:200]).argmax()
    assert q["chance"] == pytest.approx(float((y[200:] == majority).double().mean()))
    assert q["near_chance"] and "chance level" in q["warning"]
    lines = quality_lines(q)
    assert len(lines) == 2 and lines[1] == f"WARNING: {q['warning']}"
    assert "train.epochs" in q["warning"]
    assert report.print_summary({"theta_s": q}).splitlines()[:2] == lines


def test_regression_r2_against_a_direct_computation():
    prob = tiny_problem("regression", n=40)
    other = tiny_problem("regression", n=20, seed=1)
    q = base_quality(prob, (other.x, other.t))
    with torch.no_grad():
        f = prob.outputs(prob.params, other.x)
    mse = float((f - other.t).pow(2).mean())
    var = float((other.t - prob.t.mean(0)).pow(2).mean())
    assert q["metric"] == "R²" and q["chance"] == 0.0
    assert q["test_metric"] == pytest.approx(1 - mse / var, rel=1e-12)
    assert math.isfinite(q["train_loss"])


@pytest.mark.parametrize("task", ["binary", "language_model"])
def test_accuracy_comes_from_the_task_predictions(task):
    prob = tiny_problem(task, n=40)
    q = base_quality(prob, (prob.x, prob.t))
    with torch.no_grad():
        f = prob.outputs(prob.params, prob.x)
    pred = (f.reshape(-1) > 0).long() if task == "binary" else f.argmax(-1).reshape(-1)
    labels = prob.t.reshape(-1).long()
    assert q["metric"] == ("next-token accuracy" if task == "language_model" else "accuracy")
    assert q["test_metric"] == pytest.approx(float((pred == labels).double().mean()))
    assert q["train_metric"] == q["test_metric"]
    majority = torch.bincount(labels).argmax()
    assert q["chance"] == pytest.approx(float((labels == majority).double().mean()))


def test_reconstruction_scores_r2_without_targets():
    prob = tiny_problem("reconstruction", n=30)
    q = base_quality(prob, (prob.x, None))
    assert q["metric"] == "R²" and q["chance"] == 0.0 and q["n_test"] == 30
    assert q["test_metric"] == pytest.approx(q["train_metric"])
