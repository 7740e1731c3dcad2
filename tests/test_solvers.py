"""Solvers (exact, CG, LiSSA) against a dense damped curvature built independently with autograd."""

import pytest
import torch

import pbrf
from pbrf.curvature import CurvatureOperator

from .conftest import tiny_problem
from .reference import reference_damped, reference_hessian


# -------------------------------------------------------------------------------------- references
def rhs(prob, m=3, seed=1):
    return torch.randn(m, prob.n_params, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def rel_residual(C, X, B):
    return ((X @ C.T - B).norm(dim=1) / B.norm(dim=1)).max().item()


# -------------------------------------------------------------------------------------- exact / CG
@pytest.mark.parametrize("kind,curvature",
                         [("classification", "ggn"), ("cnn", "ggn"), ("binary", "hessian")])
def test_exact_equals_dense_linalg_solve(kind, curvature):
    prob = tiny_problem(kind)
    damping = 0.3 if curvature == "ggn" else 1.0  # enough to make the Hessian positive definite
    C = reference_damped(prob, curvature, damping)
    B = rhs(prob)
    X, info = pbrf.solve(CurvatureOperator(prob, curvature, damping), B, "exact")
    torch.testing.assert_close(X, torch.linalg.solve(C, B.T).T, rtol=1e-9, atol=1e-12)
    assert info.converged and not info.diverged and info.residual < 1e-10
    # a single vector in, a single vector out
    x1, _ = pbrf.solve(CurvatureOperator(prob, curvature, damping), B[0], "exact")
    assert x1.shape == (prob.n_params,)
    torch.testing.assert_close(x1, X[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_cg_reaches_relative_residual_1e_10(kind):
    prob = tiny_problem(kind)
    damping = 0.1
    C = reference_damped(prob, "ggn", damping)
    B = rhs(prob, m=4)
    X, info = pbrf.solve(CurvatureOperator(prob, "ggn", damping), B, "cg", tol=1e-10)
    assert info.converged and not info.diverged
    assert 0 < info.iterations < 2000
    assert info.residual <= 1e-10
    # recomputed independently against the dense autograd matrix (a few ulps of slack for the
    # difference between the matrix-free and the dense products)
    assert rel_residual(C, X, B) <= 1e-10 * (1 + 1e-3) + 1e-13
    torch.testing.assert_close(X, torch.linalg.solve(C, B.T).T, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rank", [4, 1000])
def test_nystrom_preconditioned_cg_reaches_the_same_solution_in_fewer_iterations(rank):
    """The influence solve's CG with the Newton engine's Nyström preconditioner: the same dense
    solution and stopping rule; fewer iterations, and 1–2 when the rank covers every parameter
    (the preconditioner is then the inverse itself). A small λ makes plain CG work for it."""
    prob = tiny_problem("classification")
    damping = 1e-3
    C = reference_damped(prob, "ggn", damping)
    B = rhs(prob, m=4)
    exact = torch.linalg.solve(C, B.T).T
    _, plain = pbrf.solve(CurvatureOperator(prob, "ggn", damping), B, "cg", tol=1e-10)
    op = CurvatureOperator(prob, "ggn", damping)
    X, info = pbrf.solve(op, B, "cg", tol=1e-10, precondition=rank)
    assert info.converged and rel_residual(C, X, B) <= 1e-10 * (1 + 1e-3) + 1e-13
    torch.testing.assert_close(X, exact, rtol=1e-7, atol=1e-10)
    assert info.iterations < plain.iterations, (info.iterations, plain.iterations)
    if rank >= prob.n_params:
        assert info.iterations <= 2
    # the sketch is built once per operator's curvature and damping, then reused
    assert op.factor_cache["nystrom"][0][1] == rank
    with pytest.raises(ValueError, match="precondition"):
        pbrf.solve(CurvatureOperator(tiny_problem("classification", weight_decay=0.0), "ggn",
                                     0.0), B, "cg", precondition=rank)


def test_cg_warm_start_needs_fewer_iterations():
    prob = tiny_problem("classification")
    op = CurvatureOperator(prob, "ggn", 0.1)
    B = rhs(prob, m=2)
    X_exact = torch.linalg.solve(reference_damped(prob, "ggn", 0.1), B.T).T
    X_cold, cold = pbrf.solve(op, B, "cg", tol=1e-10)
    x0 = X_exact + 1e-6 * X_exact.norm() * rhs(prob, m=2, seed=7)
    X_warm, warm = pbrf.solve(op, B, "cg", tol=1e-10, x0=x0)
    assert warm.converged and cold.converged
    assert warm.iterations < cold.iterations, (warm.iterations, cold.iterations)
    assert warm.residual <= 1e-10
    torch.testing.assert_close(X_warm, X_exact, rtol=1e-7, atol=1e-10)
    # starting exactly at the solution: no iteration at all is needed
    _, at = pbrf.solve(op, B, "cg", tol=1e-8, x0=X_exact)
    assert at.iterations == 0 and at.converged


def test_cg_flags_non_positive_curvature_of_an_indefinite_hessian():
    # a nonconvex problem (untrained MLP) without weight decay or damping: the Hessian has a
    # negative
    # eigenvalue, and CG started along its eigenvector meets non-positive curvature at once.
    prob = tiny_problem("reconstruction", weight_decay=0.0)
    H = reference_hessian(prob)
    evals, evecs = torch.linalg.eigh(H)
    assert evals[0] < -1e-3  # precondition of the test: really indefinite
    b = evecs[:, 0]
    x, info = pbrf.solve(CurvatureOperator(prob, "hessian", 0.0), b, "cg")
    assert info.diverged and not info.converged
    assert "damping" in info.message
    # and influence(...) refuses to return such a solution (for this data CG meets non-positive
    # curvature on the test-loss gradient within a few iterations; checked deterministically)
    with pytest.raises(pbrf.SolverDivergedError, match="increase damping"):
        pbrf.influence(prob, (prob.x[:4], None), [0, 1], damping=0.0, solver="cg",
                       curvature="hessian")


def test_unknown_solver_or_option_raises_naming_the_valid_ones():
    prob = tiny_problem("regression")
    op = CurvatureOperator(prob, "ggn", 0.1)
    B = rhs(prob, m=1)
    with pytest.raises(ValueError, match=r"(?s)newton.*cg.*exact.*lissa"):
        pbrf.solve(op, B, "newton")
    with pytest.raises(ValueError, match=r"(?s)tolerance.*tol.*max_iter.*x0"):
        pbrf.solve(op, B, "cg", tolerance=1e-3)
    with pytest.raises(ValueError, match=r"(?s)steps.*scale.*depth"):
        pbrf.solve(op, B, "lissa", steps=10)
    with pytest.raises(ValueError, match="cg"):
        pbrf.influence(prob, (prob.x[:2], prob.t[:2]), [0], solver="conjugate")


# ---------------------------------------------------------------------------------------- LiSSA
def _lissa_setup():
    prob = tiny_problem("classification")
    prob.chunk_size = 512  # one chunk per product: LiSSA makes hundreds of them
    damping = 0.3  # λ_min(C) = 0.31, λ_max(C) ≈ 0.81: (1 − λ_min/scale)^100 is negligible
    C = reference_damped(prob, "ggn", damping)
    lam_max = torch.linalg.eigvalsh(C)[-1].item()
    B = rhs(prob, m=3)
    return prob, damping, C, lam_max, B, torch.linalg.solve(C, B.T).T


def _rel_err(X, ref):
    return ((X - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def test_lissa_full_batch_with_a_valid_scale_matches_exact():
    prob, damping, C, lam_max, B, X_exact = _lissa_setup()
    op = CurvatureOperator(prob, "ggn", damping)
    X, info = pbrf.solve(op, B, "lissa", scale=1.1 * lam_max, depth=100)
    assert not info.diverged and info.iterations == 100
    assert _rel_err(X, X_exact) < 1e-2
    # the default scale (power-iteration estimate of λ_max) is valid too
    X2, info2 = pbrf.solve(op, B, "lissa", depth=100)
    assert not info2.diverged
    assert abs(info2.extra["lambda_max_estimate"] - lam_max) / lam_max < 1e-2
    assert _rel_err(X2, X_exact) < 1e-2


def test_lissa_minibatch_with_repeats_matches_exact():
    prob, damping, C, lam_max, B, X_exact = _lissa_setup()
    op = CurvatureOperator(prob, "ggn", damping)
    # 12 training points, batches of 10: the stochastic error averages out over the repeats (the
    # estimator is unbiased; over seeds 0..9 the worst relative error was 0.0072, so 1% is not
    # flaky)
    X, info = pbrf.solve(op, B, "lissa", scale=1.5 * lam_max, depth=100, repeats=8, batch_size=10,
                         seed=3)
    assert not info.diverged and info.iterations == 100 * 8
    assert _rel_err(X, X_exact) < 1e-2


def test_lissa_with_too_small_a_scale_is_reported_and_raises():
    prob, damping, C, lam_max, B, _ = _lissa_setup()
    op = CurvatureOperator(prob, "ggn", damping)
    X, info = pbrf.solve(op, B, "lissa", scale=0.01 * lam_max, depth=200)
    assert info.diverged and not info.converged
    assert "scale" in info.message
    assert not torch.isfinite(X).any()  # flagged NaN, never a finite-looking wrong answer
    with pytest.raises(pbrf.SolverDivergedError, match=r"(?s)scale.*increase"):
        pbrf.influence(prob, (prob.x[:3], prob.t[:3]), [0, 1], damping=damping, solver="lissa",
                       solver_options={"scale": 0.01 * lam_max, "depth": 200})


def test_lissa_divergence_is_detected_even_with_a_short_recursion():
    # the divergence check also runs at the last step, so a recursion shorter than the check
    # interval (depth < 10) or a blow-up in its last steps is reported as diverged, not returned
    prob, damping, C, lam_max, B, _ = _lissa_setup()
    op = CurvatureOperator(prob, "ggn", damping)
    X, info = pbrf.solve(op, B, "lissa", scale=0.01 * lam_max, depth=5)
    assert info.diverged and not info.converged and "scale" in info.message
    with pytest.raises(pbrf.SolverDivergedError, match="scale"):
        pbrf.influence(prob, (prob.x[:3], prob.t[:3]), [0, 1], damping=damping, solver="lissa",
                       solver_options={"scale": 0.01 * lam_max, "depth": 5})


def test_lissa_bad_scale_is_a_value_error():
    prob = tiny_problem("regression")
    op = CurvatureOperator(prob, "ggn", 0.1)
    with pytest.raises(ValueError, match="scale"):
        pbrf.solve(op, rhs(prob, m=1), "lissa", scale=-1.0)


def test_exact_factorisation_is_cached_per_curvature_and_damping():
    from pbrf import solve

    prob = tiny_problem("classification")
    B = torch.randn(2, prob.n_params, dtype=torch.float64)
    x1, i1 = solve(CurvatureOperator(prob, "ggn", 0.1), B, "exact")
    x2, i2 = solve(CurvatureOperator(prob, "ggn", 0.1), B, "exact")
    x3, i3 = solve(CurvatureOperator(prob, "ggn", 0.2), B, "exact")
    assert "cached_factorisation" not in i1.extra and i2.extra.get("cached_factorisation") is True
    assert "cached_factorisation" not in i3.extra
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    assert (x1 - x3).abs().max() > 1e-6
    dense = CurvatureOperator(prob, "ggn", 0.2).dense()
    torch.testing.assert_close(x3, torch.linalg.solve(dense, B.T).T, rtol=1e-9, atol=1e-12)


def test_lissa_default_scale_covers_minibatch_curvature():
    from pbrf import solve

    prob = tiny_problem("classification")
    op = CurvatureOperator(prob, "ggn", 0.1)
    B = torch.randn(1, prob.n_params, dtype=torch.float64)
    _, full = solve(op, B, "lissa", depth=5)
    _, mini = solve(op, B, "lissa", depth=5, batch_size=3)
    assert mini.extra["lambda_max_estimate"] > full.extra["lambda_max_estimate"]
    lam_full = torch.linalg.eigvalsh(op.dense()).max().item()
    assert full.extra["lambda_max_estimate"] == pytest.approx(lam_full, rel=1e-2)


def test_cg_default_tolerance_follows_dtype():
    from pbrf import solve

    prob = tiny_problem("regression")
    prob32 = type(prob)(prob.model.float(), prob.task, (prob.x.float(), prob.t.float()),
                        weight_decay=prob.weight_decay)
    B = torch.randn(2, prob32.n_params)
    x, info = solve(CurvatureOperator(prob32, "ggn", 0.1), B, "cg")
    assert info.converged and info.residual < 1e-5 and x.dtype == torch.float32
    _, info64 = solve(CurvatureOperator(prob, "ggn", 0.1), B.double(), "cg")
    assert info64.residual <= 1e-10


# ----------------------------------------------------------------------------- hardening (issue 9)
class _DenseOp:
    """A curvature operator over an explicit matrix (for spectra a network does not give on
    demand).
    """

    def __init__(self, C):
        from types import SimpleNamespace

        self.C, self.n_params = C, C.shape[0]
        self.prob = SimpleNamespace(n_train=1, device=C.device)

    def matvec(self, V, index=None):
        return V @ self.C.T

    def dense(self, max_params=5000):
        return self.C


@pytest.mark.parametrize(
    "solver, options, needle",
    [
        ("cg", {"max_iter": -1}, "max_iter=-1"),
        ("cg", {"max_iter": 0}, "max_iter=0"),
        ("cg", {"tol": float("nan")}, "tol=nan"),
        ("cg", {"tol": -1e-3}, "tol=-0.001"),
        ("lissa", {"depth": 0}, "depth=0"),
        ("lissa", {"depth": -5}, "depth=-5"),
        ("lissa", {"repeats": 0}, "repeats=0"),
        ("lissa", {"batch_size": 0}, "batch_size=0"),
        ("lissa", {"scale": float("inf")}, "scale=inf"),
        ("lissa", {"tol": float("nan")}, "tol=nan"),
        ("exact", {"max_params": 0}, "max_params=0"),
    ],
)
def test_meaningless_option_values_are_refused(solver, options, needle):
    prob = tiny_problem("regression")
    op = CurvatureOperator(prob, "ggn", 0.1)
    with pytest.raises(ValueError, match=rf"{solver}: option {needle}.*must be"):
        pbrf.solve(op, rhs(prob, m=1), solver, **options)
    with pytest.raises(ValueError, match=needle):  # the public functions check too
        pbrf.solvers.SOLVERS[solver](op, rhs(prob, m=1), **options)
    with pytest.raises(ValueError, match=needle):  # and so does influence()
        pbrf.influence(prob, (prob.x[:2], prob.t[:2]), [0], damping=0.1, solver=solver,
                       solver_options=options)


def test_exact_refuses_an_indefinite_hessian_unless_asked_for_lu():
    prob = tiny_problem("reconstruction", weight_decay=0.0)
    C = reference_damped(prob, "hessian", 0.0)
    assert torch.linalg.eigvalsh(C)[0] < -1e-3  # precondition: really indefinite
    B = rhs(prob, m=2)
    X, info = pbrf.solve(CurvatureOperator(prob, "hessian", 0.0), B, "exact")
    assert info.diverged and not info.converged
    assert "not positive definite" in info.message
    assert "damping" in info.message and "ggn" in info.message
    assert not torch.isfinite(X).any()  # flagged NaN, never a finite-looking answer
    with pytest.raises(pbrf.SolverDivergedError, match="(?s)increase damping.*ggn"):
        pbrf.influence(
            prob, (prob.x[:2], None), [0, 1], damping=0.0, solver="exact", curvature="hessian"
        )
    # the explicit opt-in solves it by LU
    X, info = pbrf.solve(CurvatureOperator(prob, "hessian", 0.0), B, "exact", allow_indefinite=True)
    assert not info.diverged and "LU" in info.message
    torch.testing.assert_close(X, torch.linalg.solve(C, B.T).T, rtol=1e-6, atol=1e-9)


def test_exact_reports_a_singular_curvature_instead_of_raising_from_lu():
    C = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    B = torch.ones(1, 3, dtype=torch.float64)
    for allow in (False, True):
        X, info = pbrf.solve(_DenseOp(C), B, "exact", allow_indefinite=allow)
        assert info.diverged and not info.converged and not torch.isfinite(X).any()
        assert "singular" in info.message and "damping" in info.message


def test_lissa_is_judged_by_its_residual_not_only_by_growth():
    # one slightly negative eigenvalue: the recursion grows by (1 + 0.05/1.1)^depth, far below the
    # growth bound, yet the result is worse than returning zero
    C = torch.diag(torch.tensor([1.0, 0.5, -0.05], dtype=torch.float64))
    B = torch.ones(1, 3, dtype=torch.float64)
    X, info = pbrf.solve(_DenseOp(C), B, "lissa", scale=1.1, depth=100)
    assert info.diverged and not info.converged
    assert info.residual >= 1 and "residual" in info.message and "damping" in info.message
    assert not torch.isfinite(X).any()
    # the same recursion on a positive definite matrix converges and is not flagged
    X, info = pbrf.solve(_DenseOp(C.abs()), B, "lissa", scale=1.1, depth=300)
    assert not info.diverged and info.residual < 1e-2
    torch.testing.assert_close(X, torch.linalg.solve(C.abs(), B.T).T, rtol=1e-4, atol=1e-6)


def test_lissa_on_an_undamped_hessian_raises_instead_of_returning_garbage():
    prob = tiny_problem("reconstruction", weight_decay=0.0)
    with pytest.raises(pbrf.SolverDivergedError):
        pbrf.influence(
            prob,
            (prob.x[:2], None),
            [0, 1],
            damping=0.0,
            solver="lissa",
            curvature="hessian",
            solver_options={"depth": 50},
        )
