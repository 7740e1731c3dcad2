"""Built-in estimators against independent references (float64), and the LDS ground truth."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pbrf
from pbrf import estimators, lds
from pbrf.curvature import CurvatureOperator
from pbrf.solvers import solve

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


# ------------------------------------------------------------------------------- solver residuals
def dense_regression_curvature(prob, damping):
    """``C = (1/N) Σ J_iᵀ J_i + (wd + λ) I`` of the regression task (output Hessian ``I``) from one
    ``torch.func.jacrev`` of all the training outputs: independent of the matrix-free products.
    """
    J = torch.func.jacrev(lambda th: prob.outputs_flat(th, prob.x))(prob.theta)
    J = J.reshape(-1, prob.n_params)
    eye = torch.eye(prob.n_params, dtype=J.dtype)
    return J.T @ J / prob.n_train + (prob.weight_decay + damping) * eye


def dense_cg(C, b, steps):
    """Textbook conjugate gradients from ``x = 0`` on one dense system, ``steps`` iterations."""
    x, r = torch.zeros_like(b), b.clone()
    d = r.clone()
    for _ in range(steps):
        alpha = (r @ r) / (d @ C @ d)
        x, r_new = x + alpha * d, r - alpha * (C @ d)
        d, r = r_new + (r_new @ r_new) / (r @ r) * d, r_new
    return x


def rel_residuals(C, X, G):
    return (X @ C - G).norm(dim=1) / G.norm(dim=1)


def test_influence_residuals_exact_and_truncated_cg_against_a_dense_brute_force():
    prob = tiny_problem("regression")
    test = held_out("regression")
    exact = estimators.get("influence-exact", damping=DAMPING).scores(prob, test, REMOVALS)
    assert exact.residual["max"] <= 1e-10 and exact.residual["median"] <= exact.residual["max"]
    assert "C x = g_t" in exact.residual["what"]
    cg = estimators.get("influence-cg", damping=DAMPING, solver_options={"max_iter": 2})
    res = cg.scores(prob, test, REMOVALS)
    assert res.residual["max"] > 1e-2 and res.residual["max"] > 1e6 * exact.residual["max"]
    assert res.diagnostics["iterations"] == 2 and not res.diagnostics["converged"]
    # brute force: a dense C, a dense two-step CG on each test gradient, its residuals
    C = dense_regression_curvature(prob, DAMPING)
    xt, tt = prob.prepare(test)
    G = dense_grads(prob, xt, tt)
    rows = rel_residuals(C, torch.stack([dense_cg(C, g, 2) for g in G]), G)
    assert res.residual["max"] == pytest.approx(float(rows.max()), rel=1e-8)
    assert res.residual["median"] == pytest.approx(float(rows.quantile(0.5)), rel=1e-8)
    assert exact.residual["max"] < 1e-10 < float(rows.min())


def test_arnoldi_and_trak_residuals_show_what_their_inverse_leaves_out():
    prob = tiny_problem("classification")
    test = held_out("classification")
    p = prob.n_params
    full = estimators.get("arnoldi", rank=p, iterations=p, damping=DAMPING)
    assert full.scores(prob, test, REMOVALS).residual["max"] <= 1e-8
    one = estimators.get("arnoldi", rank=1, damping=DAMPING).scores(prob, test, REMOVALS)
    assert one.residual["max"] > 0.1
    # with exact top eigenvectors U (iterations = p), C x_t = UᵀU g_t: the residual is the part of
    # g_t outside the top-rank eigenspace, ‖(I − UᵀU) g_t‖ / ‖g_t‖ (dense eigendecomposition)
    top = estimators.get("arnoldi", rank=3, iterations=p, damping=DAMPING)
    got = top.scores(prob, test, REMOVALS).residual
    U = torch.linalg.eigh(CurvatureOperator(prob, "ggn", DAMPING).dense())[1][:, -3:]
    xt, tt = prob.prepare(test)
    G = dense_grads(prob, xt, tt)
    rows = (G - (G @ U) @ U.T).norm(dim=1) / G.norm(dim=1)
    assert got["max"] == pytest.approx(float(rows.max()), rel=1e-7)
    assert got["median"] == pytest.approx(float(rows.quantile(0.5)), rel=1e-7)
    for dim, ensemble in ((p, 1), (p + 17, 2)):
        trak = estimators.get("trak", dim=dim, ensemble=ensemble, damping=DAMPING)
        assert trak.scores(prob, test, REMOVALS).residual["max"] <= 1e-8
    small = estimators.get("trak", dim=5, damping=DAMPING).scores(prob, test, REMOVALS)
    assert small.residual["max"] > 0.1 and "projected" in small.residual["what"]


def test_published_lissa_keeps_depth_n_with_the_smallest_stable_scale_of_its_grid():
    prob = tiny_problem("regression")
    test = held_out("regression")
    assert "influence-lissa-published" in estimators.ESTIMATORS
    res = estimators.get("influence-lissa-published", damping=DAMPING).scores(prob, test, REMOVALS)
    hp, extra = res.hyperparameters, res.diagnostics["extra"]
    assert (hp["depth"], hp["batch_size"], hp["scale"]) == (prob.n_train, 1, "tuned")
    assert res.diagnostics["iterations"] == prob.n_train  # depth N, not run to convergence
    assert math.isfinite(res.residual["max"]) and 0 < res.residual["median"] <= res.residual["max"]
    # the scale: the first of λ̂·10^k (k = 0, 1, ...) whose recursion does not diverge
    lam, trials = extra["lambda_max_estimate"], extra["scale_trials"]
    assert trials == [lam * 10.0**k for k in range(len(trials))] and extra["scale"] == trials[-1]
    vals = torch.linalg.eigvalsh(CurvatureOperator(prob, "ggn", DAMPING).dense())
    assert lam == pytest.approx(float(vals[-1]), rel=1e-6)
    op = CurvatureOperator(prob, "ggn", DAMPING)
    xt, tt = prob.prepare(test)
    G = pbrf.per_example_grads(prob, xt, tt)
    lissa = dict(depth=prob.n_train, batch_size=1)
    for s in trials[:-1]:
        assert solve(op, G, "lissa", scale=s, **lissa)[1].diverged
    fixed = estimators.get(
        "influence-lissa", damping=DAMPING, solver_options={**lissa, "scale": trials[-1]}
    ).scores(prob, test, REMOVALS)
    torch.testing.assert_close(res.scores, fixed.scores, rtol=0, atol=0)
    assert res.residual == fixed.residual
    # solver options override; a run's own LiSSA options do not leak in
    over = estimators.get(
        "influence-lissa-published", damping=DAMPING, solver_options={"depth": 5, "scale": 50.0}
    ).scores(prob, test, REMOVALS)
    assert (over.hyperparameters["depth"], over.hyperparameters["scale"]) == (5, 50.0)
    assert over.diagnostics["extra"]["scale"] == 50.0 and over.diagnostics["iterations"] == 5
    run = SimpleNamespace(n_train=7, influence_settings={"solver": "lissa",
                                                         "solver_options": {"depth": 3}})
    reported = estimators.get("influence-lissa-published").reported({"run": run})
    assert reported["depth"] == 7 and "solver_options" not in reported
    assert estimators.get("grad-dot").scores(prob, test, REMOVALS).residual is None
