"""Gauss–Newton and Hessian products against dense references built independently."""

import pytest
import torch
from torch.func import hessian, jacrev

from pbrf.curvature import CurvatureOperator

from .conftest import PROBLEM_KINDS, tiny_problem


def reference_ggn(prob):
    """Σ_i J_iᵀ H_i J_i / N from explicit per-example Jacobians and autograd output Hessians."""
    p = prob.n_params
    G = torch.zeros(p, p, dtype=torch.float64)
    for i in range(prob.n_train):
        xi, ti = prob.x[i : i + 1], prob.t[i : i + 1]
        out = prob.outputs_flat(prob.theta, xi)
        J = jacrev(lambda th: prob.outputs_flat(th, xi))(prob.theta).reshape(out.numel(), p)
        H = hessian(lambda f: prob.task.loss(f.reshape(out.shape), ti).sum())(out.reshape(-1))
        G += J.T @ H @ J
    return G / prob.n_train


def reference_hessian(prob):
    """Reverse-over-reverse autograd Hessian (torch.func.hessian is wrong for the tiny
    transformer).
    """

    def data_loss(th):
        return prob.task.loss(prob.outputs_flat(th, prob.x), prob.t).mean()

    return torch.autograd.functional.hessian(data_loss, prob.theta)


@pytest.mark.parametrize("kind", PROBLEM_KINDS)
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_matvec_and_dense_equal_reference(kind, curvature):
    prob = tiny_problem(kind)
    damping = 0.3
    ref = reference_ggn(prob) if curvature == "ggn" else reference_hessian(prob)
    ref = ref + (prob.weight_decay + damping) * torch.eye(prob.n_params, dtype=torch.float64)
    op = CurvatureOperator(prob, curvature, damping)
    V = torch.randn(3, prob.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matvec(V), V @ ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op.matvec(V[0]), ref @ V[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op.dense(), ref, rtol=1e-8, atol=1e-10)


def test_ggn_is_psd_and_symmetric():
    prob = tiny_problem("classification")
    G = CurvatureOperator(prob, "ggn", 0.0).dense() - prob.weight_decay * torch.eye(prob.n_params,
        dtype=torch.float64)
    torch.testing.assert_close(G, G.T, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-10


def test_minibatch_matvec_is_the_subset_mean():
    prob = tiny_problem("regression")
    op = CurvatureOperator(prob, "ggn", 0.0)
    idx = torch.tensor([1, 4, 7])
    v = torch.randn(prob.n_params, dtype=torch.float64)
    sub = tiny_problem("regression")
    sub_prob = type(prob)(prob.model, prob.task, (prob.x[idx], prob.t[idx]),
                          weight_decay=prob.weight_decay)
    torch.testing.assert_close(op.matvec(v, index=idx),
                               CurvatureOperator(sub_prob, "ggn", 0.0).matvec(v))
    del sub


def test_chunk_size_does_not_change_products():
    a, b = tiny_problem("classification"), tiny_problem("classification")
    b.chunk_size = 1
    v = torch.randn(a.n_params, dtype=torch.float64)
    torch.testing.assert_close(CurvatureOperator(a).matvec(v), CurvatureOperator(b).matvec(v),
                               rtol=1e-12, atol=1e-14)


def test_bad_arguments_name_the_fix():
    prob = tiny_problem("regression")
    with pytest.raises(ValueError, match="damping"):
        CurvatureOperator(prob, "ggn", -1.0)
    with pytest.raises(ValueError, match="curvature"):
        CurvatureOperator(prob, "fisher", 0.0)
    with pytest.raises(ValueError, match="max_params"):
        CurvatureOperator(prob).dense(max_params=3)
