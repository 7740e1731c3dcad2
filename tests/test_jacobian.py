"""Stored output Jacobians (pbrf.jacobian): the shared Gauss–Newton products through them are the
products through the network, within the memory they are given."""

from __future__ import annotations

import torch
from torch import nn

import pbrf
from pbrf import jacobian, tasks
from pbrf.curvature import dense_ggn
from pbrf.engine import batch_fn
from pbrf.newton import Batched

from .test_newton import tiny_smooth_cnn

F64 = torch.float64


def _shared(prob, kind: str, theta, V):
    obj = pbrf.kinds.get(kind).objective(prob, 0.05)
    aux0 = {k: v[0] for k, v in obj.make_aux(prob, [[]], 1.0).items()}
    B = Batched(prob, obj.value, obj.gn, obj.make_aux(prob, [[]], 1.0), batch_fn(prob, obj.f_ref))
    return B.shared("gn", theta, aux0, V)


def test_the_rule_reads_the_model_cnns_store_jacobians_mlps_do_not():
    """4·C·p against 3 forward FLOPs: the tiny CNN's product through its Jacobian is cheaper, an
    MLP's is not (its product through the network costs about as much as one through J)."""
    cnn = tiny_smooth_cnn()
    assert jacobian.pays(cnn)
    x = torch.randn(20, 3, dtype=F64)
    mlp = pbrf.Problem(nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double(),
                       tasks.Classification(), (x, x.argmax(1)), weight_decay=1e-2)
    assert not jacobian.pays(mlp)
    assert jacobian.forward_flops(cnn) == 2 * (6 * 6 * 2 * 9 + 18 * 3)


def test_stored_jacobian_products_are_the_networks_and_the_dense_gauss_newton(monkeypatch):
    """At θ^s and at another point, for the PBRF's and the proximal objective's shared model:
    through the stored Jacobians, through the network, and the dense matrix (brute force) agree
    to 1e-12; with memory for one chunk only, the others go through the network, same values."""
    prob = tiny_smooth_cnn()
    g = torch.Generator().manual_seed(0)
    V = torch.randn(5, prob.n_params, generator=g, dtype=F64)
    other = prob.theta + 0.1 * torch.randn(prob.n_params, generator=g, dtype=F64)
    dense = dense_ggn(prob)
    for theta in (prob.theta, other):
        for kind in ("pbrf", "proximal"):
            stored = _shared(prob, kind, theta, V)
            assert all(J is not None for J in jacobian._STORE[prob][1])
            with monkeypatch.context() as m:
                m.setattr(jacobian, "pays", lambda p: False)
                network = _shared(prob, kind, theta, V)
            with monkeypatch.context() as m:
                m.setattr(jacobian, "JACOBIAN_BYTES", 20 * 3 * prob.n_params * 8)
                jacobian._STORE.pop(prob)
                partial = _shared(prob, kind, theta, V)
                assert [J is None for J in jacobian._STORE[prob][1]] == [False, True, True]
                jacobian._STORE.pop(prob)
            scale = network.norm()
            assert float((stored - network).norm() / scale) <= 1e-12
            assert float((partial - network).norm() / scale) <= 1e-12
            if theta is prob.theta and kind == "proximal":
                assert float((stored - V @ dense).norm() / scale) <= 1e-12
