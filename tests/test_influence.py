"""Influence scores and Δθ against brute force, closed forms and leave-one-out retraining
(float64).
"""

import numpy as np
import pytest
import torch
from torch import nn

import pbrf
from pbrf.curvature import CurvatureOperator

from .conftest import PROBLEM_KINDS, tiny_problem
from .reference import reference_damped


# ---------------------------------------------------------------------------------------- helpers
def autograd_grads(prob, x, t):
    """Per-example loss gradients [B, p] from a plain autograd loop (no vmap, no
    torch.func.grad).
    """
    rows = []
    for i in range(x.shape[0]):
        theta = prob.theta.clone().requires_grad_(True)
        loss = prob.task.loss(prob.outputs_flat(theta, x[i : i + 1]), t[i : i + 1]).sum()
        (g,) = torch.autograd.grad(loss, theta)
        rows.append(g)
    return torch.stack(rows)


def held_out(kind, n=4):
    """Fresh points with the shapes of the tiny problem's data (targets None for reconstruction)."""
    other = tiny_problem(kind, n=n, seed=1)
    return other.x, (None if kind == "reconstruction" else other.t)


REMOVALS = [0, 3, [1, 2, 5], [4, 11], [7]]


def removal_sums(G, removals):
    rows = [torch.tensor(r if isinstance(r, list) else [r]) for r in removals]
    return torch.stack([G[idx].sum(0) for idx in rows])


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def ranks(a):
    r = torch.empty_like(a)
    r[a.argsort()] = torch.arange(a.numel(), dtype=a.dtype)
    return r


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


# ------------------------------------------------------------------------------------- brute force
# enough damping that C is positive definite: with the Hessian the tiny untrained networks have
# eigenvalues down to about −1.41 (reconstruction), so wd + λ = 2.01 keeps C ≥ 0.6 I.
DAMPING = {"ggn": 0.3, "hessian": 2.0}


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("kind", PROBLEM_KINDS)
def test_scores_and_delta_theta_equal_brute_force(kind, curvature):
    prob = tiny_problem(kind)
    damping = DAMPING[curvature]
    C = reference_damped(prob, curvature, damping)
    assert torch.linalg.eigvalsh(C)[0] > 0.1  # precondition: the damping is enough
    test = held_out(kind)
    xt, tt = prob.prepare(test)
    g_test = autograd_grads(prob, xt, tt)
    g_train = autograd_grads(prob, prob.x, prob.t)
    b = removal_sums(g_train, REMOVALS) / prob.n_train  # [K, p]
    expected = g_test @ torch.linalg.solve(C, b.T)  # [n_test, K]

    scores = pbrf.influence(prob, test, REMOVALS, damping=damping, solver="exact",
                            curvature=curvature)
    assert scores.shape == (xt.shape[0], len(REMOVALS)) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)

    dtheta, info = pbrf.delta_theta(prob, REMOVALS, damping=damping, solver="exact",
                                    curvature=curvature)
    assert not info.diverged
    torch.testing.assert_close(dtheta, torch.linalg.solve(C, b.T).T, rtol=1e-8, atol=1e-12)
    # the two are consistent: score = ∇m_testᵀ Δθ_IF
    torch.testing.assert_close(scores, g_test @ dtheta.T, rtol=1e-8, atol=1e-12)


def test_cg_and_lissa_scores_agree_with_exact():
    prob = tiny_problem("classification")
    prob.chunk_size = 512
    test = held_out("classification")
    ref = pbrf.influence(prob, test, REMOVALS, damping=0.3, solver="exact")
    cg = pbrf.influence(prob, test, REMOVALS, damping=0.3, solver="cg",
                        solver_options={"tol": 1e-12})
    torch.testing.assert_close(cg, ref, rtol=1e-8, atol=1e-12)
    lissa, info = pbrf.influence_with_info(prob, test, REMOVALS, damping=0.3, solver="lissa",
                                           solver_options={"depth": 100})
    assert info.solve.solver == "lissa" and not info.solve.diverged
    assert ((lissa - ref).norm() / ref.norm()).item() < 1e-2


# -------------------------------------------------------------------------------------- identities
def test_group_influence_is_the_sum_of_single_point_influences():
    prob = tiny_problem("cnn")
    test = held_out("cnn")
    groups = [[0, 1, 2], [3, 7], [11, 4, 9, 5]]
    singles = sorted({i for g in groups for i in g})
    S = pbrf.influence(prob, test, singles, damping=0.1)
    G = pbrf.influence(prob, test, groups, damping=0.1)
    col = {i: k for k, i in enumerate(singles)}
    expected = torch.stack([S[:, [col[i] for i in g]].sum(1) for g in groups], dim=1)
    torch.testing.assert_close(G, expected, rtol=1e-10, atol=1e-14)
    # the same for Δθ (the group is solved as one system)
    dS, _ = pbrf.delta_theta(prob, singles, damping=0.1)
    dG, _ = pbrf.delta_theta(prob, groups, damping=0.1)
    expected = torch.stack([dS[[col[i] for i in g]].sum(0) for g in groups])
    torch.testing.assert_close(dG, expected, rtol=1e-10, atol=1e-14)
    # removal order inside a group and tensor vs list input do not matter
    torch.testing.assert_close(
        pbrf.influence(prob, test, [[2, 0, 1]], damping=0.1)[:, 0], G[:, 0], rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        pbrf.influence(prob, test, torch.tensor(singles), damping=0.1), S, rtol=1e-12, atol=1e-15
    )


# ----------------------------------------------------------------------------- logistic regression
def newton_logistic(x, y, wd, keep=None, iters=100):
    """argmin (1/N) Σ_i keep_i ℓ_i(θ) + (wd/2)||θ||² for θ = [w, b] (1/N with the full N,
    docs/conventions.md §1).
    """
    n = x.shape[0]
    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    keep = torch.ones(n, dtype=x.dtype) if keep is None else keep

    def obj(th):
        z = X @ th
        return (keep * (nn.functional.softplus(z) - y * z)).sum() / n + 0.5 * wd * th @ th

    th = torch.zeros(X.shape[1], dtype=x.dtype)
    for _ in range(iters):
        s = torch.sigmoid(X @ th)
        g = X.T @ (keep * (s - y)) / n + wd * th
        if g.norm() < 1e-13:
            break
        H = (X * (keep * s * (1 - s))[:, None]).T @ X / n + wd * torch.eye(X.shape[1],
            dtype=x.dtype)
        step, t = torch.linalg.solve(H, g), 1.0
        while obj(th - t * step) > obj(th) + 1e-14 and t > 1e-8:  # backtracking, blind to round-off
            t /= 2
        th = th - t * step
    assert g.norm() < 1e-12, "Newton did not converge"
    return th


def logistic_model(theta, d):
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:d].reshape(1, d))
        model.bias.copy_(theta[d:])
    return model


def bce(theta, x, y):
    z = x @ theta[:-1] + theta[-1]
    return nn.functional.softplus(z) - y * z


def test_logistic_regression_influence_matches_leave_one_out_retraining():
    g = torch.Generator().manual_seed(0)
    n, d, wd = 80, 5, 1e-2
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n + 10, d, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ w_true), generator=g)
    x, y, xt, yt = x[:n], y[:n], x[n:], y[n:]
    theta_s = newton_logistic(x, y, wd)
    prob = pbrf.Problem(logistic_model(theta_s, d), pbrf.tasks.BinaryClassification(), (x, y),
                        weight_decay=wd)
    torch.testing.assert_close(prob.theta, theta_s, rtol=0, atol=0)

    removals = list(range(0, n, 2))  # 40 single removals
    base = bce(theta_s, xt, yt)
    actual = torch.empty(len(xt), len(removals), dtype=torch.float64)
    for k, m in enumerate(removals):
        keep = torch.ones(n, dtype=torch.float64)
        keep[m] = 0.0
        actual[:, k] = bce(newton_logistic(x, y, wd, keep), xt, yt) - base

    predicted = pbrf.influence(prob, (xt, yt), removals, damping=0.0)
    assert predicted.shape == actual.shape
    a, p = actual.flatten(), predicted.flatten()
    assert pearson(p, a) > 0.99, pearson(p, a)
    assert spearman(p, a) > 0.99, spearman(p, a)
    # not just correlated: the same sign and scale (first order in the O(1/N) change: 14% relative
    # error here, the influence estimate being systematically a little smaller than LOO)
    assert ((p - a).norm() / a.norm()).item() < 0.25


def test_duplicated_training_point_is_its_own_most_influential_removal():
    # Logistic regression in which point 17 is the only one with a nonzero third feature (and
    # carries
    # the minority label there); its duplicate in the test set relies on it alone.
    g = torch.Generator().manual_seed(1)
    n, wd = 40, 1e-2
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x[:, 2] = 0.0
    y = (x[:, 0] + x[:, 1] > 0).double()
    m = 17
    x[m] = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)
    y[m] = 0.0
    theta_s = newton_logistic(x, y, wd)
    prob = pbrf.Problem(logistic_model(theta_s, 3), pbrf.tasks.BinaryClassification(), (x, y),
                        weight_decay=wd)

    scores = pbrf.influence(prob, (x[m : m + 1], y[m : m + 1]), list(range(n)), damping=0.0)[0]
    assert scores[m] > 0  # removing the point the prediction relies on increases its loss
    assert int(scores.argmax()) == m
    assert scores[m] > 2 * scores[torch.arange(n) != m].max()

    # self-influence of every training point (test = train) is positive
    self_scores = pbrf.influence(prob, (x, y), list(range(n)), damping=0.0).diagonal()
    assert (self_scores > 0).all()


# -------------------------------------------------------------------------------- ridge regression
@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_ridge_regression_scores_equal_closed_form(curvature, damping):
    g = torch.Generator().manual_seed(2)
    n, d, wd = 30, 4, 0.05
    x = torch.randn(n + 6, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)  # drawn before the noise, as before
    y = x @ w + 0.3 * torch.randn(n + 6, 1, generator=g, dtype=torch.float64)
    x, y, xt, yt = x[:n], y[:n], x[n:], y[n:]
    # θ^s = argmin (1/N) Σ ½(x̃ᵀθ − y)² + (wd/2)||θ||² (bias penalised too)
    Xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    theta_s = torch.linalg.solve(Xa.T @ Xa / n + wd * torch.eye(d + 1, dtype=torch.float64),
                                 Xa.T @ y / n)[:, 0]
    model = logistic_model(theta_s, d)  # a Linear(d, 1) holding [w, b]
    prob = pbrf.Problem(model, pbrf.tasks.Regression(), (x, y), weight_decay=wd)
    removals = [0, 5, 29, [1, 2, 3]]
    scores = pbrf.influence(prob, (xt, yt), removals, damping=damping, curvature=curvature)

    # closed form in numpy
    Xn, yn, th = Xa.numpy(), y.numpy()[:, 0], theta_s.numpy()
    Xtn = np.concatenate([xt.numpy(), np.ones((len(xt), 1))], 1)
    A = Xn.T @ Xn / n + (wd + damping) * np.eye(d + 1)
    g_train = Xn * (Xn @ th - yn)[:, None]
    g_test = Xtn * (Xtn @ th - yt.numpy()[:, 0])[:, None]
    b = np.stack([g_train[np.atleast_1d(r)].sum(0) for r in removals])
    expected = g_test @ np.linalg.solve(A, b.T) / n
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-8, atol=1e-14)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_removals_name_the_problem_and_fix():
    prob = tiny_problem("regression")  # 12 training points
    test = held_out("regression")
    with pytest.raises(ValueError, match=r"(?s)index 12.*0\.\.11"):
        pbrf.influence(prob, test, [0, 12])
    with pytest.raises(ValueError, match=r"(?s)index -1.*0\.\.11"):
        pbrf.influence(prob, test, [[0, -1]])
    with pytest.raises(ValueError, match=r"removals\[1\].*empty"):
        pbrf.influence(prob, test, [[0], []])
    with pytest.raises(ValueError, match=r"removals\[0\].*repeats"):
        pbrf.influence(prob, test, [[3, 4, 3]])
    with pytest.raises(ValueError, match=r"(?s)1-D.*shape \(2, 2\)"):
        pbrf.influence(prob, test, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="1-D"):
        pbrf.influence(prob, test, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        pbrf.influence(prob, test, [])
    with pytest.raises(ValueError, match=r"(?s)index 99.*0\.\.11"):
        pbrf.delta_theta(prob, [99])


def test_removal_indices_must_be_integers():
    # a float index is refused (never truncated: [[0.7]] must not remove point 0); numpy integers
    # are
    # accepted as indices
    prob = tiny_problem("regression")
    test = held_out("regression")
    with pytest.raises(ValueError, match="integer"):
        pbrf.influence(prob, test, [[0.7]])
    with pytest.raises(ValueError, match="integer"):
        pbrf.influence(prob, test, [0.5])
    torch.testing.assert_close(
        pbrf.influence(prob, test, [np.int64(3), [np.int64(1), 2]], damping=0.1),
        pbrf.influence(prob, test, [3, [1, 2]], damping=0.1), rtol=1e-12, atol=1e-15,
    )


def test_negative_damping_and_mismatched_test_rows_are_rejected():
    prob = tiny_problem("regression")
    test = held_out("regression")
    with pytest.raises(ValueError, match="damping"):
        pbrf.influence(prob, test, [0], damping=-1e-3)
    with pytest.raises(ValueError, match="damping"):
        pbrf.influence(prob, test, [0], damping=float("nan"))
    with pytest.raises(ValueError, match="damping"):
        pbrf.delta_theta(prob, [0], damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        CurvatureOperator(prob, "ggn", -0.5)
    with pytest.raises(ValueError, match=r"(?s)4 and 3 rows"):
        pbrf.influence(prob, (test[0], test[1][:3]), [0])
    with pytest.raises(ValueError, match="shape"):
        # targets of width 3
        pbrf.influence(prob, (test[0], torch.randn(4, 3, dtype=torch.float64)), [0])
