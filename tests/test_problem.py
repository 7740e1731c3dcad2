"""Problem: the user's model is never touched, parameters round-trip, the objective, dtype, chunking
and input validation."""

import pytest
import torch
from torch import nn

import pbrf

from .conftest import mlp, tiny_problem


def regression_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g,
        dtype=torch.float64)


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


@pytest.mark.parametrize("training", [True, False])
def test_user_model_is_never_mutated(training):
    torch.manual_seed(0)
    # BatchNorm in train mode would update its running statistics if pbrf ran the user's module
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    model.train(training)
    x, y = regression_data()
    before = snapshot(model)

    prob = pbrf.Problem(model, pbrf.tasks.Regression(), (x, y), weight_decay=1e-2)
    scores = pbrf.influence(prob, (x[:3], y[:3]), [0, [1, 2]], damping=0.1)
    pbrf.delta_theta(prob, [0], damping=0.1, solver="cg")
    prob.objective()

    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(scores).all()

    # θ^s is a copy: later changes to the user's model do not leak into the problem
    theta = prob.theta.clone()
    with torch.no_grad():
        model[3].weight.add_(1.0)
    assert torch.equal(prob.theta, theta)
    # and the frozen parameter is still part of θ^s (influence is over all parameters)
    assert prob.n_params == sum(p.numel() for p in model.parameters())


def test_flatten_unflatten_round_trip_with_batch_dims():
    prob = tiny_problem("cnn")
    model_order = torch.cat([p.detach().reshape(-1) for p in prob.model.parameters()])
    torch.testing.assert_close(prob.theta, model_order, rtol=0, atol=0)
    back = prob.unflatten(prob.theta)
    assert list(back) == prob.names
    for n, p in prob.params.items():
        assert torch.equal(back[n], p)

    V = torch.randn(3, 2, prob.n_params, dtype=torch.float64)
    d = prob.unflatten(V)
    for n, shape in zip(prob.names, prob.shapes):
        assert d[n].shape == (3, 2, *shape)
    assert torch.equal(prob.flatten(d), V)
    # the batched unflatten agrees with unflattening each vector on its own
    assert torch.equal(prob.unflatten(V[2, 1])[prob.names[0]], d[prob.names[0]][2, 1])
    with pytest.raises(ValueError, match=str(prob.n_params)):
        prob.unflatten(torch.zeros(prob.n_params + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="dict"):
        prob.flatten(list(prob.params.values()))


def test_objective_equals_hand_computation():
    model = mlp(3, 2)
    x, y = regression_data(n=13)
    wd = 0.03
    prob = pbrf.Problem(model, pbrf.tasks.Regression(), (x, y), weight_decay=wd, chunk_size=4)
    with torch.no_grad():
        data = (0.5 * (model(x) - y).pow(2).sum(1)).mean()
        penalty = 0.5 * wd * sum(p.pow(2).sum() for p in model.parameters())
    torch.testing.assert_close(prob.objective(), data + penalty, rtol=1e-13, atol=0)
    # at other parameters too
    other = {n: p + 0.1 for n, p in prob.params.items()}
    with torch.no_grad():
        out = torch.func.functional_call(model, other, (x,))
        expected = (0.5 * (out - y).pow(2).sum(1)).mean() + 0.5 * wd * sum(
            p.pow(2).sum() for p in other.values()
        )
    torch.testing.assert_close(prob.objective(other), expected, rtol=1e-13, atol=0)


def test_float64_end_to_end():
    model = mlp(3, 3)
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(12, 3, generator=g)  # float32 inputs are cast to the model's dtype
    y = torch.randint(0, 3, (12,), generator=g)
    prob = pbrf.Problem(model, pbrf.tasks.Classification(), (x32, y), weight_decay=1e-2)
    assert (
        prob.dtype == torch.float64
        and prob.x.dtype == torch.float64
        and prob.theta.dtype == torch.float64
    )
    for solver in ("exact", "cg"):
        scores = pbrf.influence(prob, (x32[:4], y[:4]), [0, 1, [2, 3]], damping=0.1, solver=solver)
        assert scores.dtype == torch.float64
    dtheta, _ = pbrf.delta_theta(prob, [0, 1], damping=0.1)
    assert dtheta.dtype == torch.float64
    # the same as a problem built from float64 data (so nothing was computed in float32)
    prob64 = pbrf.Problem(model, pbrf.tasks.Classification(), (x32.double(), y), weight_decay=1e-2)
    torch.testing.assert_close(
        pbrf.influence(prob64, (x32[:4].double(), y[:4]), [0, 1, [2, 3]], damping=0.1, solver="cg"),
        scores,
        rtol=1e-12,
        atol=1e-15,
    )


@pytest.mark.parametrize(
    "kind,curvature,solver",
    [
        ("classification", "ggn", "exact"),
        ("regression", "hessian", "cg"),
        ("cnn", "ggn", "cg"),
    ],
)
def test_chunk_size_does_not_change_scores(kind, curvature, solver):
    base = tiny_problem(kind)
    test = (tiny_problem(kind, n=5, seed=1).x, tiny_problem(kind, n=5, seed=1).t)
    scores = []
    for cs in (1, 512):
        prob = pbrf.Problem(
            base.model, base.task, (base.x, base.t), weight_decay=base.weight_decay, chunk_size=cs
        )
        scores.append(
            pbrf.influence(
                prob,
                test,
                [0, 5, [2, 3, 11]],
                damping=2.0,
                curvature=curvature,
                solver=solver,
                solver_options={"tol": 1e-13} if solver == "cg" else None,
            )
        )
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-12, atol=1e-15)


def test_params_override():
    model = mlp(3, 2)
    x, y = regression_data()
    other = {n: p.detach() * 2 for n, p in model.named_parameters()}
    prob = pbrf.Problem(model, pbrf.tasks.Regression(), (x, y), params=other)
    assert torch.equal(prob.theta, torch.cat([p.reshape(-1) for p in other.values()]))
    with pytest.raises(ValueError, match="missing"):
        pbrf.Problem(model, pbrf.tasks.Regression(), (x, y), params={"1.weight": other["1.weight"]})


def test_bad_input_names_the_problem_and_the_fix():
    model = mlp(3, 2)
    x, y = regression_data()
    task = pbrf.tasks.Regression()
    with pytest.raises(TypeError, match=r"dict\(model\.named_parameters\(\)\)"):
        pbrf.Problem(model, task, (x, y), params=list(model.parameters()))
    with pytest.raises(ValueError, match=r"(?s)12 and 11 rows"):
        pbrf.Problem(model, task, (x, y[:11]))
    with pytest.raises(ValueError, match=r"(?s)does not fit.*shape"):
        # model outputs width 2
        pbrf.Problem(model, task, (x, torch.randn(12, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"(?s)does not fit.*shape"):
        # two logits for a binary task
        pbrf.Problem(mlp(3, 2), pbrf.tasks.BinaryClassification(), (x, y[:, 0]))
    with pytest.raises(ValueError, match="needs targets"):
        pbrf.Problem(model, task, (x, None))
    with pytest.raises(ValueError, match="weight_decay"):
        pbrf.Problem(model, task, (x, y), weight_decay=-1e-3)
    with pytest.raises(ValueError, match="chunk_size"):
        pbrf.Problem(model, task, (x, y), chunk_size=0)
    with pytest.raises(TypeError, match="Task"):
        pbrf.Problem(model, "regression", (x, y))
    prob = pbrf.Problem(model, task, (x, y))
    with pytest.raises(ValueError, match=r"(?s)test.*does not fit.*shape"):
        prob.prepare((x[:2], torch.randn(2, 5, dtype=torch.float64)))
