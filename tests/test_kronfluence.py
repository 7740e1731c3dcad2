"""pbrf.kron: kronfluence's scores in pbrf's sign and scale, checked against pbrf.influence."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import pbrf
from pbrf import tasks

pytest.importorskip("kronfluence")

from pbrf.kron import INSTALL, _sampler, kronfluence_scores  # noqa: E402

N = 48


def _mlp_problem(kind: str, seed: int = 0, n: int = N):
    """A 1-hidden-layer tanh MLP of nn.Linear modules, weight decay 1e-2, and 4 test points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 4, 4, generator=g, dtype=torch.float64)
    if kind == "regression":
        y, d_out, task = (
            torch.randn(n + 4, 2, generator=g, dtype=torch.float64),
            2,
            tasks.Regression(),
        )
    else:
        y, d_out, task = torch.randint(0, 3, (n + 4,), generator=g), 3, tasks.Classification()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, d_out)).double()
    prob = pbrf.Problem(model, task, (x[:n], y[:n]), weight_decay=1e-2)
    return prob, (x[n:], y[n:])


def _linear_problem(seed: int = 0, n: int = N):
    """One nn.Linear with one output, regression, targets f(x_i) ± 1 (every |r_i| = 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        y = model(x) + (2 * torch.randint(0, 2, (n, 1), generator=g) - 1).double()
    prob = pbrf.Problem(model, tasks.Regression(), (x, y), weight_decay=1e-2)
    test = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 1, generator=g, dtype=torch.float64),
    )
    return prob, test


REMOVALS = [0, 5, 17, [1, 2, 3], [10, 40, 41, 47]]


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_identity_is_the_gradient_dot_product_in_pbrf_sign_and_scale(kind):
    # Acceptance: with C = I kronfluence's score is ∇m_tᵀ ∇L_m; after the conversion it must be
    # (1/N) ∇L_testᵀ Σ_{m∈r} ∇L_m, computed here independently with pbrf.per_example_grads.
    prob, test = _mlp_problem(kind)
    scores = kronfluence_scores(prob, test, REMOVALS, strategy="identity")
    g_test = pbrf.per_example_grads(prob, *prob.prepare(test))
    g_train = pbrf.per_example_grads(prob, prob.x, prob.t)
    groups = [[r] if isinstance(r, int) else r for r in REMOVALS]
    ref = torch.stack([g_test @ g_train[g].sum(0) for g in groups], dim=1) / prob.n_train
    assert scores.shape == (4, len(REMOVALS)) and scores.dtype == torch.float64
    assert torch.allclose(scores, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_kfac_and_ekfac_are_exact_for_one_linear_output_with_unit_residuals(strategy):
    # One nn.Linear with a scalar output under ½(f − y)²: the per-example gradient is r_i x̃_i
    # (x̃ = [x, 1]) and G = (1/N) Σ x̃ x̃ᵀ ⊗ 1 is exactly Kronecker. kronfluence's true Fisher would
    # replace r_i² by sampled ε_i² (a Monte-Carlo estimate of 1, ~10% off at N = 48), so the exact
    # check uses the empirical Fisher with targets y_i = f(x_i) ± 1: then r_i² = 1, the gradient
    # factor S = mean r_i² = 1 and K-FAC's A ⊗ S equals G, and EK-FAC's corrected eigenvalues
    # mean_i (q_jᵀ x̃_i)² r_i² are exactly A's. Only round-off separates the two solves: 1e-9.
    prob, test = _linear_problem()
    removals = list(range(N)) + [[0, 1, 2], [5, 7]]
    exact = pbrf.influence(prob, test, removals, damping=1e-3, solver="exact")
    scores = kronfluence_scores(
        prob, test, removals, strategy=strategy, damping=1e-3, empirical_fisher=True, batch_size=16
    )
    assert torch.allclose(scores, exact, rtol=0, atol=1e-9 * exact.abs().max().item())


def test_ekfac_tracks_exact_ggn_influence_on_an_mlp_classifier():
    # True-Fisher EK-FAC on a 1-hidden-layer classifier is an approximation (block-diagonal,
    # Kronecker, one Fisher sample per point): measured Pearson r 0.97–0.99 over 4 problem seeds and
    # 2 sampling seeds (EK-FAC and K-FAC); the bound keeps a margin.
    prob, test = _mlp_problem("classification")
    removals = list(range(N))
    exact = pbrf.influence(prob, test, removals, damping=1e-2, solver="exact")
    scores = kronfluence_scores(prob, test, removals, strategy="ekfac", damping=1e-2)
    r = torch.corrcoef(torch.stack([scores.ravel(), exact.ravel()]))[0, 1].item()
    assert r > 0.9, r


def test_true_fisher_is_deterministic_for_a_seed():
    prob, test = _linear_problem()
    a = kronfluence_scores(prob, test, [0, 1, 2], strategy="kfac", seed=3)
    b = kronfluence_scores(prob, test, [0, 1, 2], strategy="kfac", seed=3)
    c = kronfluence_scores(prob, test, [0, 1, 2], strategy="kfac", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "task, shape",
    [
        (tasks.Regression(), (1, 3)),
        (tasks.Classification(), (1, 3)),
        (tasks.BinaryClassification(), (1,)),
        (tasks.LanguageModel(), (1, 2, 3)),
    ],
)
def test_sampled_loss_has_the_ggn_output_hessian_as_its_fisher(task, shape):
    # E[∇_f ∇_fᵀ] of the sampled loss must equal pbrf's output Hessian ∂²L/∂f² (so the true Fisher
    # estimates G, including the √T of the per-position mean of LanguageModel). M = 40000 samples:
    # the Monte-Carlo error of each entry is ≲ 2·sqrt(2/M)·max|H| ≈ 0.014·max|H|; tolerance 0.03.
    M = 40_000
    draw, scale = _sampler(task)
    f0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = f0.expand(M, *shape[1:]).clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    t = draw(f.detach(), gen)
    (gf,) = torch.autograd.grad((scale(f) * task.loss(f, t)).sum(), f)
    gf = gf.reshape(M, -1)
    fisher = gf.T @ gf / M
    d = gf.shape[1]
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *shape[1:])
    H = torch.stack([task.output_hvp(f0, None, e.unsqueeze(0)).reshape(-1) for e in eye])
    assert torch.allclose(fisher, H, atol=0.03 * H.abs().max().item(), rtol=0)


def test_missing_kronfluence_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "kronfluence", None)
    prob, test = _linear_problem()
    with pytest.raises(ImportError) as err:
        kronfluence_scores(prob, test, [0])
    msg = str(err.value)
    assert "\n" not in msg and INSTALL in msg
    assert "--no-deps kronfluence==1.0.1" in msg and "accelerate einops einconv opt-einsum" in msg


def test_model_without_linear_or_conv_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return x * self.w

    x = torch.randn(6, 2, dtype=torch.float64)
    prob = pbrf.Problem(Scale(), tasks.Regression(), (x, x.flip(1)))
    with pytest.raises(ValueError, match=r"only tracks nn\.Linear and nn\.Conv2d"):
        kronfluence_scores(prob, (x[:1], x[:1]), [0])


def test_bad_strategy_is_refused():
    prob, test = _linear_problem()
    with pytest.raises(ValueError, match="strategy"):
        kronfluence_scores(prob, test, [0], strategy="lissa")
    assert math.isfinite(kronfluence_scores(prob, test, [0], strategy="diagonal").sum().item())
