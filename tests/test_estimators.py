"""Built-in estimators against independent references (float64), and the LDS ground truth."""

import math

import numpy as np
import pytest
import torch

import pbrf
from pbrf import estimators, lds
from pbrf.curvature import CurvatureOperator

from .conftest import tiny_problem

REMOVALS = [0, 3, [1, 2, 5], [4, 11], [7]]
DAMPING = 0.3


def held_out(kind, n=4):
    other = tiny_problem(kind, n=n, seed=1)
    return other.x, (None if kind == "reconstruction" else other.t)


def dense_grads(prob, x, t, theta=None):
    """Per-example gradients from a plain autograd loop (independent of vmap)."""
    theta = prob.theta if theta is None else theta
    rows = []
    for i in range(x.shape[0]):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(
            prob.task.loss(prob.outputs_flat(th, x[i : i + 1]), t[i : i + 1]).sum(), th
        )
        rows.append(g)
    return torch.stack(rows)


def sums(G, removals):
    return torch.stack(
        [G[torch.tensor(r if isinstance(r, list) else [r])].sum(0) for r in removals]
    )


def brute(prob, test, removals, C=None, theta=None):
    """(1/N) g_test C⁻¹ Σ_r g_i from dense gradients and a dense solve (C = I when None)."""
    xt, tt = prob.prepare(test)
    gt, gr = (
        dense_grads(prob, xt, tt, theta),
        sums(dense_grads(prob, prob.x, prob.t, theta), removals),
    )
    left = gt if C is None else torch.linalg.solve(C, gt.T).T
    return left @ gr.T / prob.n_train


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_arnoldi_with_all_eigenpairs_is_exact_influence(kind):
    prob = tiny_problem(kind)
    test = held_out(kind)
    exact = estimators.get("influence-exact", damping=DAMPING).scores(prob, test, REMOVALS).scores
    arn = estimators.get("arnoldi", rank=prob.n_params, iterations=prob.n_params, damping=DAMPING)
    got = arn.scores(prob, test, REMOVALS).scores
    C = CurvatureOperator(prob, "ggn", DAMPING).dense()
    ref = brute(prob, test, REMOVALS, C)
    torch.testing.assert_close(exact, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)


def test_arnoldi_top_eigenpairs_match_dense_spectrum():
    prob = tiny_problem("classification")
    C = CurvatureOperator(prob, "ggn", DAMPING)
    vals, vecs = estimators.lanczos(C.matvec, prob.n_params, prob.n_params, prob.theta)
    dense = torch.linalg.eigvalsh(C.dense()).flip(0)
    torch.testing.assert_close(vals, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        vecs @ vecs.T, torch.eye(prob.n_params, dtype=vecs.dtype), rtol=0, atol=1e-9
    )
    # a truncated Arnoldi drops the complement: with rank < p it is not exact
    test = held_out("classification")
    low = estimators.get("arnoldi", rank=3, damping=DAMPING).scores(prob, test, REMOVALS).scores
    ref = brute(prob, test, REMOVALS, C.dense())
    assert not torch.allclose(low, ref, rtol=1e-3)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_trak_with_full_projection_is_exact_gauss_newton_influence(kind):
    prob = tiny_problem(kind)
    test = held_out(kind)
    ref = brute(prob, test, REMOVALS, CurvatureOperator(prob, "ggn", DAMPING).dense())
    for dim in (prob.n_params, prob.n_params + 17):  # square and over-complete projections
        got = estimators.get("trak", dim=dim, damping=DAMPING).scores(prob, test, REMOVALS).scores
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-11)
    # a projection much smaller than p is an approximation, and seeded
    a = estimators.get("trak", dim=5, damping=DAMPING, seed=3).scores(prob, test, REMOVALS).scores
    b = estimators.get("trak", dim=5, damping=DAMPING, seed=3).scores(prob, test, REMOVALS).scores
    assert torch.equal(a, b) and not torch.allclose(a, ref, rtol=1e-3)


@pytest.mark.parametrize("kind", ["regression", "binary"])
def test_gradient_dot_and_cosine_against_autograd(kind):
    prob = tiny_problem(kind)
    test = held_out(kind)
    dot = estimators.get("grad-dot").scores(prob, test, REMOVALS).scores
    torch.testing.assert_close(dot, brute(prob, test, REMOVALS), rtol=1e-10, atol=1e-14)
    xt, tt = prob.prepare(test)
    gt, gi = dense_grads(prob, xt, tt), dense_grads(prob, prob.x, prob.t)
    cos = (gt / gt.norm(dim=1, keepdim=True)) @ (gi / gi.norm(dim=1, keepdim=True)).T
    ref = torch.stack([cos[:, r if isinstance(r, list) else [r]].sum(1) for r in REMOVALS], dim=1)
    got = estimators.get("grad-cos").scores(prob, test, REMOVALS).scores
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_tracin_with_one_checkpoint_is_gradient_dot_and_sums_checkpoints():
    prob = tiny_problem("classification")
    test = held_out("classification")
    one = [{"params": prob.params, "lr": 1.0}]
    got = estimators.get("tracin", checkpoints=one).scores(prob, test, REMOVALS).scores
    dot = estimators.get("grad-dot").scores(prob, test, REMOVALS).scores
    torch.testing.assert_close(got, dot, rtol=1e-12, atol=1e-15)
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in prob.params.items()}
    two = [{"params": other, "lr": 0.5}, {"params": prob.params, "lr": 0.25}]
    got = estimators.get("tracin", checkpoints=two).scores(prob, test, REMOVALS).scores
    ref = 0.5 * brute(prob, test, REMOVALS, theta=prob.flatten(other)) + 0.25 * brute(
        prob, test, REMOVALS
    )
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    with pytest.raises(estimators.EstimatorUnavailable, match="train.checkpoints"):
        estimators.get("tracin").scores(prob, test, REMOVALS)


def test_train_saves_evenly_spaced_checkpoints_ending_at_theta_s():
    prob = tiny_problem("regression")
    recipe = pbrf.Recipe(lr=0.05, steps=10, batch_size=4)
    res = pbrf.train(
        prob.model,
        prob.task,
        (prob.x, prob.t),
        recipe,
        weight_decay=0.01,
        progress=False,
        checkpoints=3,
    )
    assert [c["step"] for c in res.checkpoints] == [3, 7, 10]
    assert all(torch.equal(res.checkpoints[-1]["params"][k], res.params[k]) for k in res.params)
    plain = pbrf.train(
        prob.model, prob.task, (prob.x, prob.t), recipe, weight_decay=0.01, progress=False
    )
    assert all(
        torch.equal(plain.params[k], res.params[k]) for k in res.params
    )  # saving changes nothing


def test_estimator_result_reports_cost_and_hyperparameters():
    prob = tiny_problem("regression")
    res = estimators.get("trak", dim=8, damping=DAMPING).scores(
        prob, held_out("regression"), REMOVALS
    )
    assert res.scores.shape == (4, len(REMOVALS))
    assert (
        res.seconds > 0
        and res.hyperparameters["dim"] == 8
        and res.hyperparameters["damping"] == DAMPING
    )
    assert res.peak_memory_bytes is None or res.peak_memory_bytes >= 0
    with pytest.raises(ValueError, match="unknown estimator"):
        estimators.get("nope")


# ---------------------------------------------------------------------------------------- LDS
def _logistic_problem(n=120, d=4, wd=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
    model = torch.nn.Linear(d, 1).double()
    return model, x, y


def test_lds_of_exact_influence_on_converged_logistic_regression():
    model, x, y = _logistic_problem()
    task = pbrf.tasks.BinaryClassification()
    recipe = pbrf.Recipe(optimizer="sgd", lr=1.0, momentum=0.9, steps=400, batch_size=None)
    res = pbrf.train(model, task, (x, y), recipe, weight_decay=0.05, progress=False)
    prob = res.problem(task, (x, y))
    assert (
        float(
            torch.linalg.vector_norm(
                torch.func.grad(lambda p: prob.objective(p))(prob.params)["weight"]
            )
        )
        < 1e-8
    )
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(30, 4, generator=g, dtype=torch.float64)
    yt = (torch.rand(30, generator=g, dtype=torch.float64) < 0.5).double()
    groups = lds.subsets(prob.n_train, 40, alpha=0.9, seed=0)  # removing 10%: the linear regime
    init = lambda s: {k: v.clone() for k, v in prob.params.items()}  # noqa: E731 - convex: any start
    actual, _ = lds.retrain(prob, (xt, yt), groups, recipe, seeds=(0,), model_init=init)
    points = torch.arange(prob.n_train)
    exact = estimators.get("influence-exact", damping=0.0).scores(prob, (xt, yt), points).scores
    good = lds.lds(lds.group_scores(exact, groups), actual)
    chance = lds.lds(lds.random_scores(actual.shape, seed=1), actual)
    assert good["lds"] >= 0.9, good
    # 30 test points x 40 subsets: a random ranking's LDS has standard error ≈ 1/sqrt(39·30) ≈ 0.03
    assert abs(chance["lds"]) < 0.1, chance


def test_lds_subsets_and_spearman():
    groups = lds.subsets(50, 10, alpha=0.5, seed=2)
    assert len(groups) == 10 and all(len(g) == 25 and len(set(g)) == 25 for g in groups)
    assert groups == lds.subsets(50, 10, alpha=0.5, seed=2) and groups != lds.subsets(
        50, 10, alpha=0.5, seed=3
    )
    a = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    b = np.array([[10.0, 20.0, 35.0, 100.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    out = lds.lds(a, b)
    assert out["per_test"][0] == pytest.approx(1.0) and out["per_test"][1] == pytest.approx(-1.0)
    assert (
        math.isnan(out["per_test"][2])
        and out["n_undefined"] == 1
        and out["lds"] == pytest.approx(0.0)
    )
    with pytest.raises(ValueError, match="alpha"):
        lds.subsets(10, 4, alpha=1.5)


def test_cg_and_lissa_influence_estimators_against_a_dense_solve():
    prob = tiny_problem("regression")
    test = held_out("regression")
    ref = brute(prob, test, REMOVALS, CurvatureOperator(prob, "ggn", DAMPING).dense())
    cg = estimators.get(
        "influence-cg", damping=DAMPING, solver_options={"tol": 1e-12, "max_iter": 500}
    )
    torch.testing.assert_close(cg.scores(prob, test, REMOVALS).scores, ref, rtol=1e-8, atol=1e-12)
    lissa = estimators.get(
        "influence-lissa", damping=DAMPING, solver_options={"depth": 200, "batch_size": None}
    )
    got = lissa.scores(
        prob, test, REMOVALS
    ).scores  # full-batch LiSSA is a convergent Neumann series
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)
