"""The curvature-operator protocol: an outside operator (written here, as another library would)
passes through influence, delta_theta and the linearised response, and matches a dense reference."""

from __future__ import annotations

import pytest
import torch

import pbrf
from pbrf.curvature import Curvature, CurvatureOperator

from .conftest import tiny_problem


class BlockDiagonalGGN:
    """The Gauss–Newton matrix with its cross-layer blocks dropped, built from explicit per-example
    Jacobians: ``G_bd = blockdiag_l (1/N) Σ_i J_{i,l}ᵀ H_i J_{i,l}``. Only ``@`` (no dense())."""

    def __init__(self, prob: pbrf.Problem) -> None:
        p = prob.n_params
        out = prob.outputs_flat(prob.theta, prob.x)
        B, D = out.shape[0], out[0].numel()
        J = torch.func.jacrev(lambda th: prob.outputs_flat(th, prob.x))(prob.theta).reshape(B, D, p)
        def total_loss(f):
            return prob.task.loss(f.reshape(out.shape), prob.t).sum()

        H = torch.func.hessian(total_loss)(out.reshape(B * D))
        # per-example output Hessians
        H = H.reshape(B, D, B, D).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        G = torch.einsum("bdp,bde,beq->pq", J, H, J) / prob.n_train
        mask = torch.zeros(p, p, dtype=torch.bool)
        start = 0
        for v in prob.params.values():
            mask[start : start + v.numel(), start : start + v.numel()] = True
            start += v.numel()
        self.matrix = torch.where(mask, G, torch.zeros_like(G))
        self.calls = 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.matrix @ v


def reference_scores(prob, G, test, removals, damping):
    C = G + (prob.weight_decay + damping) * torch.eye(prob.n_params, dtype=G.dtype)
    xt, tt = prob.prepare(test, "test")
    g_test = pbrf.per_example_grads(prob, xt, tt)
    grads = pbrf.per_example_grads(prob, prob.x, prob.t)
    R = torch.stack([grads[torch.tensor(r)].sum(0) for r in removals])
    return g_test @ torch.linalg.solve(C, R.T) / prob.n_train, torch.linalg.solve(C,
        R.T).T / prob.n_train


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_outside_operator_through_influence_matches_dense_reference(kind):
    prob = tiny_problem(kind)
    other = tiny_problem(kind, n=4, seed=1)
    test = (other.x, other.t)
    removals, damping = [[0], [3, 4], [7]], 0.05
    op = BlockDiagonalGGN(prob)
    assert isinstance(op, Curvature)
    ref, ref_dtheta = reference_scores(prob, op.matrix, test, removals, damping)
    for solver, options in (("exact", None), ("cg", {"tol": 1e-12})):
        scores = pbrf.influence(prob, test, removals, damping=damping, solver=solver, curvature=op,
                                solver_options=options)
        torch.testing.assert_close(scores, ref, rtol=1e-8, atol=1e-12)
    assert op.calls > 0
    dtheta, info = pbrf.delta_theta(prob, removals, damping=damping, curvature=op)
    torch.testing.assert_close(dtheta, ref_dtheta, rtol=1e-8, atol=1e-12)
    lin = pbrf.respond(prob, "linearized", removals, damping=damping, curvature=op, progress=False)
    torch.testing.assert_close(lin.delta, ref_dtheta, rtol=1e-8, atol=1e-12)
    # it is an approximation: the block-diagonal scores differ from the full Gauss–Newton's
    full = pbrf.influence(prob, test, removals, damping=damping)
    assert (full - scores).abs().max() > 1e-8
    # a plain [p, p] tensor is an operator too, and info names the curvature "custom"
    scores_t, info = pbrf.influence_with_info(prob, test, removals, damping=damping,
                                              curvature=op.matrix)
    torch.testing.assert_close(scores_t, ref, rtol=1e-8, atol=1e-12)
    assert info.curvature == "custom"


def test_outside_operator_refuses_minibatches_and_non_operators():
    prob = tiny_problem("regression")
    op = BlockDiagonalGGN(prob)
    with pytest.raises(ValueError, match="minibatch"):
        pbrf.influence(prob, (prob.x[:2], prob.t[:2]), [0], curvature=op, solver="lissa",
                       solver_options={"batch_size": 4, "depth": 10})
    with pytest.raises(TypeError, match="operator"):
        CurvatureOperator(prob, curvature=3.0)


def test_builtin_operator_follows_the_protocol_and_owns_its_cache():
    prob = tiny_problem("classification")
    op = CurvatureOperator(prob, "ggn", 0.1)
    V = torch.randn(prob.n_params, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, op.dense() @ V, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op @ V[:, 0], op.dense() @ V[:, 0], rtol=1e-9, atol=1e-12)
    pbrf.solve(op, V.T, "exact")
    assert op.factor_cache and not hasattr(prob, "_factor_cache")
    assert CurvatureOperator(prob, "ggn", 0.1).factor_cache is op.factor_cache  # shared at θ^s


def test_return_info_is_deprecated_but_works():
    prob = tiny_problem("regression")
    test = (prob.x[:2], prob.t[:2])
    with pytest.warns(DeprecationWarning, match="influence_with_info"):
        scores, info = pbrf.influence(prob, test, [0, 1], return_info=True)
    res = pbrf.influence_with_info(prob, test, [0, 1])
    torch.testing.assert_close(scores, res.scores, rtol=0, atol=0)
    assert torch.equal(pbrf.influence(prob, test, [0, 1]), res.scores)
