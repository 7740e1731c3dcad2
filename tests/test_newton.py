"""The batched second-order optimiser and the certificates of the response functions.

References are independent: ``torch.linalg.solve`` for CG, and a dense Newton solve with full
autograd Hessians (``tests/test_respond.py``'s ``newton`` on objectives written there from the
conventions) for the response objectives.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

import pbrf
from pbrf import tasks
from pbrf.diagnostics import RemovalDiagnostics
from pbrf.engine import batch_fn
from pbrf.newton import (
    CG_STALL,
    FASTEST_MARGIN,
    OVERSOLVE,
    RUNAWAY_IDLE,
    Batched,
    Fastest,
    NewtonRecipe,
    Precision,
    _NewtonState,
    batched_cg,
    descend,
    hessian_product,
    newton_optimize,
    per_row,
    row_ways,
)
from pbrf.respond import removal_signal

from .reference import make_objective, newton, rel

F64 = torch.float64


def _problem(task: str, act=nn.Tanh, n: int = 60, seed: int = 0, steps: int = 30, width: int = 16):
    """A small float64 MLP (115 parameters at width 16) trained for a few full-batch steps only:
    θ^s is NOT a minimum of J, so proximal responses include continuation drift."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    if task == "regression":
        y, T = torch.sin(x @ torch.randn(3, 3, generator=g, dtype=F64)), tasks.Regression()
    else:
        y, T = (x @ torch.randn(3, 3, generator=g, dtype=F64)).argmax(1), tasks.Classification()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), act(), nn.Linear(width, 3)).double()
    res = pbrf.train(model, T, (x, y), pbrf.Recipe(lr=0.1, steps=steps, batch_size=None),
                     weight_decay=1e-2,
                     progress=False)
    return pbrf.Problem(res.model, T, (x, y), weight_decay=1e-2, chunk_size=25)


def test_batched_cg_matches_dense_solve_per_row():
    g = torch.Generator().manual_seed(0)
    mats = []
    for k in range(4):
        Q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=F64))[0]
        mats.append(Q @ torch.diag(torch.logspace(-2, 1 + k, 30, dtype=F64)) @ Q.T)
    A = torch.stack(mats)
    B = torch.randn(4, 30, generator=g, dtype=F64)
    atol = torch.tensor([1e-12, 1e-12, 1e-6, 1e-12], dtype=F64) * B.norm(dim=1)
    X, R, iters, neg, stalled = batched_cg(
        lambda rows, V: torch.einsum("kij,kj->ki", A[rows], V), B, atol, 500)
    ref = torch.linalg.solve(A, B)
    true_res = (B - torch.einsum("kij,kj->ki", A, X)).norm(dim=1)
    assert not neg.any() and not stalled.any()
    # CG's recursive residual met atol; the true one also carries the round-off of forming
    # B - A X, about eps·‖A‖·‖X‖ (2e-11 relative for row 3, whose condition number is 1e6)
    floor = torch.finfo(F64).eps * torch.linalg.matrix_norm(A, ord=2) * X.norm(dim=1)
    assert (true_res <= 10 * (atol + floor)).all(), (true_res, atol, floor)
    for k in (0, 1, 3):
        assert rel(X[k], ref[k]) < 1e-9
    assert iters[2] < iters[3]  # the looser row stopped earlier, on its own
    # a non-positive direction is reported, not silently used
    _, _, _, neg, _ = batched_cg(lambda rows, V: -V, B[:1], atol[:1], 10)
    assert neg.all()


def test_batched_cg_with_stall_stops_a_solve_that_does_not_halve_its_residual():
    """``stall=True`` stops a system whose residual norm has not halved in CG_STALL iterations
    where it is (the iterate of a solve capped there), flagged ``stalled``, while a system that
    keeps halving goes on to its tolerance; without ``stall`` the slow one goes on too."""
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=F64))[0]
    A = Q @ torch.diag(torch.logspace(-3, 0, 200, dtype=F64)) @ Q.T
    B = torch.randn(1, 200, generator=g, dtype=F64).expand(2, -1).clone()
    atol = 1e-10 * B.norm(dim=1)
    inv = torch.linalg.inv(A)

    def mv(rows, V):
        return V @ A.T

    def pc(rows, R):  # row 1 is preconditioned exactly, row 0 not at all
        return torch.where((rows == 1)[:, None], R @ inv.T, R)

    X, R, it, _, stalled = batched_cg(mv, B, atol, 500, pc, stall=True)
    assert stalled.tolist() == [True, False] and int(it[0]) == CG_STALL
    assert float(R[1].norm()) <= float(atol[1])
    X25 = batched_cg(mv, B[:1], atol[:1], CG_STALL)[0]
    assert rel(X[0], X25[0]) < 1e-12
    X, R, it, _, stalled = batched_cg(mv, B[:1], atol[:1], 500)
    assert not stalled.any() and int(it[0]) > 100 and float(R.norm()) <= float(atol[0])


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_newton_matches_independent_newton_on_unconverged_tanh_mlp(task):
    prob = _problem(task)
    # far from converged: proximal responses must cross the drift
    assert float(prob.objective()) > 0.2
    lam, groups = 0.1, [[0], [7], [1, 2]]
    for kind in ("pbrf", "proximal"):
        resp = pbrf.respond(prob, kind, groups, damping=lam, progress=False,
                            recipe=NewtonRecipe(tol=1e-12))
        for k, g in enumerate(groups):
            obj = make_objective(kind, prob.model, task, prob.x, prob.t, prob.theta, g,
                                 prob.weight_decay, lam)
            ref, _ = newton(obj, prob.theta)
            # required: 1e-8 relative in Δθ; observed ~1e-11 .. 1e-15
            assert rel(resp.params_flat[k] - prob.theta, ref - prob.theta) < 1e-8, (kind, g)
        assert all(resp.certified), [d["rho"] for d in resp.diagnostics]
        assert max(d["rho"] for d in resp.diagnostics) < 1e-9


def test_newton_certifies_pbrf_on_relu_mlp():
    prob = _problem("classification", act=nn.ReLU, n=300, steps=200)
    resp = pbrf.respond(prob, "pbrf", [[0], [7], [11], [1, 2]], damping=0.1, progress=False)
    rhos = [d["rho"] for d in resp.diagnostics]
    assert max(rhos) <= 1e-6, rhos


def test_signal_is_the_pbrf_gradient_at_theta_s():
    """At θ^s the Bregman and proximity terms are stationary, so ||∇F_PBRF(θ^s)|| is exactly the
    removal's signal (1/N)||Σ ∇L_m||: ρ = 1 before any optimisation."""
    prob = _problem("classification")
    groups = [[3], [4, 9]]
    sig = removal_signal(prob, groups)
    resp = pbrf.respond(prob, "pbrf", groups, damping=0.1, progress=False, max_iter=1)
    for d, s in zip(resp.diagnostics, sig.tolist()):
        assert d["initial_grad_norm"] == pytest.approx(s, rel=1e-12)
        assert d["signal"] == pytest.approx(s, rel=1e-15)


def _certify(row: dict, signal: float, threshold: float) -> RemovalDiagnostics:
    return RemovalDiagnostics(**row).certify(signal, threshold)


def test_certificate_rules():
    ok = {"grad_norm": 1e-9, "objective": -1.0, "initial_objective": 0.0, "diverged": False}
    assert _certify(ok, 1e-6, 1e-2).certified
    assert _certify(ok, 1e-6, 1e-2).rho == pytest.approx(1e-3)
    assert not _certify(ok, 1e-8, 1e-2).certified  # ρ = 0.1 above the threshold
    assert not _certify({**ok, "objective": 0.5}, 1e-6, 1e-2).certified  # ended above its start
    assert not _certify({**ok, "diverged": True}, 1e-6, 1e-2).certified
    assert not _certify({**ok, "grad_norm": math.nan}, 1e-6, 1e-2).certified
    # ending one ulp above the start is round-off (a removal fitted to ~0 loss barely moves the
    # objective; seen on MNIST: 0.01259936264252914 -> 0.012599362642529144), not a failure
    start = 0.01259936264252914
    assert _certify({**ok, "initial_objective": start, "objective": math.nextafter(start, 1)},
                    1e-6, 1e-2).certified
    assert _certify({**ok, "initial_objective": -3.62519746333754e-16,
                     "objective": -3.6228153961552276e-16}, 1e-6, 1e-2).certified
    assert not _certify({**ok, "initial_objective": start, "objective": start + 1e-12},
                        1e-6, 1e-2).certified  # well beyond round-off
    # a record without a starting objective (cold start) is judged on ρ and divergence alone
    assert _certify({"grad_norm": 1e-9, "objective": 5.0, "diverged": False}, 1e-6, 1e-2).certified


def test_first_order_stall_is_not_certified():
    """A first-order run that stops short says so: its ρ is large and it is not certified."""
    prob = _problem("classification")
    resp = pbrf.respond(prob, "proximal", [[0], [5]], damping=0.1, progress=False,
                        recipe=pbrf.Recipe(optimizer="adam", lr=1e-4, steps=20, batch_size=None))
    assert not any(resp.certified)
    assert min(d["rho"] for d in resp.diagnostics) > 1.0


def test_default_pbrf_is_certified_on_digits():
    from pbrf.data import load
    from pbrf.models import build

    ds = load("digits")
    model = build("mlp", seed=0, in_shape=(1, 8, 8), n_outputs=10, width=32, depth=2,
                  activation="gelu",
                  dtype=F64)
    task = tasks.Classification()
    recipe = pbrf.Recipe(lr=0.05, momentum=0.9, epochs=10, batch_size=128)
    trained = pbrf.train(model, task, (ds.x_train, ds.y_train), recipe, weight_decay=1e-3,
                         progress=False)
    prob = trained.problem(task, (ds.x_train, ds.y_train))
    # all defaults (λ = 1e-2; at λ = 1e-3 the removed point's own curvature/N can exceed wd + λ: the
    # PBRF then has no minimum near θ^s, and that removal is reported as a runaway, not certified)
    resp = pbrf.respond(prob, "pbrf", torch.arange(0, 1200, 150), progress=False)
    assert all(resp.certified), [d["rho"] for d in resp.diagnostics]


def test_paired_warm_start_is_exact_leave_one_out_for_converged_logistic_regression():
    g = torch.Generator().manual_seed(1)
    n, d = 80, 4
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = (x @ torch.randn(d, 3, generator=g, dtype=F64) + torch.randn(n, 3, generator=g,
        dtype=F64)).argmax(1)
    torch.manual_seed(0)
    model = nn.Linear(d, 3).double()
    wd = 1e-2
    obj_full = make_objective("warm", model, "classification", x, y, torch.zeros(15, dtype=F64),
                              [], wd, 0.0)
    theta_star, _ = newton(obj_full, torch.zeros(15, dtype=F64))
    prob = pbrf.Problem(model, tasks.Classification(), (x, y), weight_decay=wd,
                        params={"weight": theta_star[:12].reshape(3, 4), "bias": theta_star[12:]})
    groups = [[0], [5], [17], [3, 4]]
    test = (x[40:50] + 0.1, y[40:50])
    resp = pbrf.respond(prob, "warm", groups, recipe=NewtonRecipe(tol=1e-12), paired=True,
                        progress=False)
    dm = resp.loss_change(test, paired=True)
    xt, tt = prob.prepare(test)
    loss = lambda th: prob.task.loss(prob.outputs_flat(th, xt), tt)  # noqa: E731
    for k, grp in enumerate(groups):
        obj = make_objective("warm", model, "classification", x, y, theta_star, grp, wd, 0.0)
        loo, _ = newton(obj, theta_star)
        exact = loss(loo) - loss(theta_star)
        assert (dm[:, k] - exact).abs().max() <= 1e-6 * exact.abs().max() + 1e-12
    assert all(d["paired_certified"] for d in resp.diagnostics)


def tiny_smooth_cnn(n: int = 40):
    """A float64 GELU + average-pooling CNN (3 classes, 8×8 inputs, 64 parameters) trained for a
    few full-batch steps on random images with a learnable rule."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=F64)
    y = (x.mean((1, 2)) @ torch.randn(8, 3, generator=g, dtype=F64)).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(18, 3)).double()
    T = tasks.Classification()
    res = pbrf.train(model, T, (x, y), pbrf.Recipe(lr=0.2, steps=100, batch_size=None),
                     weight_decay=1e-2, progress=False)
    return pbrf.Problem(res.model, T, (x, y), weight_decay=1e-2, chunk_size=16)


def test_float32_products_reach_the_float64_optimum_on_atiny_smooth_cnn():
    """The default engine (float32 curvature products, shared first model, Nyström
    preconditioner) and the all-float64 per-row engine find the same PBRF and proximal
    responses: the certificate is computed from float64 gradients, so the products' precision
    changes the path, never the optimum."""
    prob = tiny_smooth_cnn()
    groups = [[0], [5], [11], [2, 3]]
    old = NewtonRecipe(tol=1e-12, model="auto", products="float64", precondition=0)
    for kind in ("pbrf", "proximal"):
        ref = pbrf.respond(prob, kind, groups, damping=0.05, recipe=old, progress=False)
        new = pbrf.respond(prob, kind, groups, damping=0.05, recipe=NewtonRecipe(tol=1e-12),
                           progress=False)
        assert all(ref.certified) and all(new.certified)
        assert max(d.rho for d in new.diagnostics) <= 1e-10
        dref = ref.params_flat - prob.theta
        err = (new.params_flat - ref.params_flat).norm(dim=1) / dref.norm(dim=1)
        assert float(err.max()) <= 1e-8, (kind, err)


def test_the_engine_stays_safe_where_unguarded_shared_newton_diverges():
    """Removal 24 of this tanh MLP at λ = 1e-2: the PBRF's Hessian at θ^s is positive definite,
    yet Newton steps that keep that Hessian (the shared model, no trust region) blow the gradient
    up 10⁴-fold. The engine either certifies each such removal or reports it uncertified, with a
    finite objective no larger than at the start — never a silent divergence."""
    prob = _problem("classification", steps=300)
    lam, groups = 1e-2, [[24], [30]]
    obj = pbrf.kinds.get("pbrf").objective(prob, lam)
    batch = pbrf.engine.batch_fn(prob, obj.f_ref)(torch.arange(prob.n_train))
    for g in groups:
        aux = {a: b[0] for a, b in obj.make_aux(prob, [g], 1.0).items()}

        def F(th, aux=aux):
            return obj.value(prob.unflatten(th), aux, batch)

        H = torch.func.hessian(F)(prob.theta)
        assert float(torch.linalg.eigvalsh(H)[0]) > 0
        th, g0 = prob.theta.clone(), torch.func.grad(F)(prob.theta).norm()
        for _ in range(8):
            th = th - torch.linalg.solve(H, torch.func.grad(F)(th))
        gn = torch.func.grad(F)(th).norm()
        assert not bool(torch.isfinite(gn)) or float(gn / g0) > 1e2  # unguarded: it diverges
    resp = pbrf.respond(prob, "pbrf", groups, damping=lam, progress=False)
    for d in resp.diagnostics:
        assert math.isfinite(d.objective) and d.objective <= d.initial_objective
        assert not d.diverged
    assert sum(resp.certified) == len(groups)  # here it certifies both


def test_rows_whose_low_precision_model_stalls_continue_in_float64(monkeypatch):
    """Products too coarse for the problem (bfloat16 at λ = 1e-3 on the tiny CNN: its round-off
    times the curvature's condition number is above one) stall the trust region at a gradient
    of ~2e-9. The engine does not stop those rows: they continue with float64 products on their
    own model and reach the tolerance (1e-12), so the products' precision costs iterations,
    never a certificate; a bfloat16 CG solve that stops halving its residual stops (CG_STALL)
    and its row widens; no solve is asked beyond what the stopping tolerance needs (OVERSOLVE)."""
    prob, groups, lam = tiny_smooth_cnn(), [[0], [5], [11], [2, 3]], 1e-3
    obj = pbrf.kinds.get("pbrf").objective(prob, lam)
    low = prob.astype(torch.bfloat16)
    lobj = pbrf.kinds.get("pbrf").objective(low, lam)
    aux0 = {k: v[0] for k, v in lobj.make_aux(low, [[]], 1.0).items()}
    products = Precision(Batched(low, lobj.value, lobj.gn, lobj.make_aux(low, groups, 1.0),
                                 batch_fn(low, lobj.f_ref), lobj.removal), F64)
    theta0 = prob.theta.unsqueeze(0).expand(len(groups), -1).clone()
    solves = []

    def watched(*args, **kw):  # each solve's tolerance and which rows stalled (CG_STALL)
        out = batched_cg(*args, **kw)
        solves.append((args[2], out[4]))
        return out

    monkeypatch.setattr("pbrf.newton.batched_cg", watched)
    theta, d = newton_optimize(
        prob, obj.value, obj.gn, obj.shift, theta0, obj.make_aux(prob, groups, 1.0),
        torch.ones(len(groups), dtype=F64), NewtonRecipe(tol=1e-12, max_iter=60),
        batch_fn(prob, obj.f_ref), False, removal_fn=obj.removal, aux0=aux0, low=products)
    assert bool(d["wide"].any())  # the case needs it
    # some bfloat16 solves stalled at their round-off and stopped there (measured, before
    # OVERSOLVE: 366 CG products in all, 2,254 without the rule, every row certified both ways)
    assert any(bool(s.any()) for _, s in solves)
    # and no solve was asked for more than the stopping tolerance needs (OVERSOLVE; measured
    # without it, the smallest residual asked for was 3e-22)
    assert min(float(a.min()) for a, _ in solves) >= OVERSOLVE * 1e-12 * (1 - 1e-9)
    assert not bool(d["stalled"].any())
    assert float(d["grad_norm"].max()) <= 1e-12  # float64 gradients: certified
    assert bool(torch.isfinite(theta).all())


#: the continuation's scale: below its starting gradient (1.4e-2), so that it takes Gauss–Newton
#: steps while its gradient is above that start, and tol · scale = 1e-13 (its round-off, ~1e-15)
SCALE = torch.tensor([1e-4], dtype=F64)


def _continuation_of_tiny_cnn(monkeypatch, refresh: bool):
    """The tiny CNN's no-removal proximal continuation (one row, float32 products, λ = 1e-3)
    with its first float32 solve far from the optimum (gradient above its start) forced to
    stall; returns ``(θ, diagnostics, fresh sketches (point, row's point, stalled again?),
    problem)``. ``refresh=False`` turns :func:`pbrf.newton._refresh` off."""
    import pbrf.newton as engine
    prob, lam = tiny_smooth_cnn(), 1e-3
    obj = pbrf.kinds.get("proximal").objective(prob, lam)
    low = prob.astype(torch.float32)
    lobj = pbrf.kinds.get("proximal").objective(low, lam)
    aux0 = {k: v[0] for k, v in lobj.make_aux(low, [[]], 1.0).items()}
    products = Precision(Batched(low, lobj.value, lobj.gn, lobj.make_aux(low, [[]], 1.0),
                                 batch_fn(low, lobj.f_ref), lobj.removal), F64)
    forced, fresh = [], []
    step, refresher = engine._step, engine._refresh

    def stalling_step(M, recipe, rows, th, gr, m, atol, near, own, wide):
        out = step(M, recipe, rows, th, gr, m, atol, near, own, wide)
        far = own & ~near & ~wide
        if not forced and bool(far.any()):
            forced.append(True)
            return (*out[:4], out[4] | far)
        return out

    def watched(M, st, far, rank):
        M2, got = refresher(M, st, far, rank)
        if bool(got.any()):  # and at the fresh sketch's own point, a stall widens instead
            fresh.append((M2.fresh_at.clone(), st.theta[0].clone(),
                          bool(refresher(M2, st, far, rank)[1].any())))
        return M2, got

    monkeypatch.setattr("pbrf.newton._step", stalling_step)
    monkeypatch.setattr("pbrf.newton._refresh", watched if refresh
                        else (lambda M, st, far, rank: (M, torch.zeros_like(far))))
    theta, d = newton_optimize(
        prob, obj.value, obj.gn, obj.shift, prob.theta[None].clone(),
        obj.make_aux(prob, [[]], 1.0), SCALE, NewtonRecipe(tol=1e-9),
        batch_fn(prob, obj.f_ref), False, aux0=aux0, low=products,
        bounded=torch.ones(1, dtype=torch.bool))
    assert forced  # the case has a float32 solve far from the optimum
    return theta, d, fresh, prob


def test_a_continuation_whose_float32_solve_stalls_far_from_its_optimum_gets_a_fresh_sketch(
        monkeypatch):
    """A one-row problem (a continuation) whose float32 solve stalls while its gradient is above
    its start gets its preconditioner sketched anew at its point and stays in float32 (without
    the refresh the same stall puts it on float64 products for good); a second stall at that
    point widens it. Either way the certified optimum is the all-float64 engine's."""
    theta, d, fresh, prob = _continuation_of_tiny_cnn(monkeypatch, refresh=True)
    assert len(fresh) == 1 and torch.equal(fresh[0][0], fresh[0][1]) and not fresh[0][2]
    assert not bool(d["wide"].any())
    theta_off, d_off, _, _ = _continuation_of_tiny_cnn(monkeypatch, refresh=False)
    assert bool(d_off["wide"].all())
    monkeypatch.undo()
    obj = pbrf.kinds.get("proximal").objective(prob, 1e-3)
    ref, d_ref = newton_optimize(
        prob, obj.value, obj.gn, obj.shift, prob.theta[None].clone(),
        obj.make_aux(prob, [[]], 1.0), SCALE,
        NewtonRecipe(tol=1e-9, model="auto", products="float64", precondition=0),
        batch_fn(prob, obj.f_ref), False, bounded=torch.ones(1, dtype=torch.bool))
    drift = float((ref[0] - prob.theta).norm())
    for th, dd in ((theta, d), (theta_off, d_off), (ref, d_ref)):
        assert float(dd["grad_norm"][0]) <= 1e-9 * float(SCALE)
        assert float((th[0] - ref[0]).norm()) <= 1e-8 * drift


def _pbrf_rows_with_a_forced_stall(monkeypatch, scale: float):
    """Two PBRF removals of the tiny CNN (own models, float32 products, λ = 1e-2) whose first
    float32 solve is forced to report a stall, its step multiplied by ``scale`` (1: the solve's
    own residual, within its tolerance; 0.5: half the gradient left); returns ``(θ,
    diagnostics, signal, cut)``, ``cut`` whether each row's forced step was accepted and cut its
    gradient 4-fold."""
    prob, lam, groups = tiny_smooth_cnn(), 1e-2, [[0], [5]]
    obj = pbrf.kinds.get("pbrf").objective(prob, lam)
    low = prob.astype(torch.float32)
    lobj = pbrf.kinds.get("pbrf").objective(low, lam)
    products = Precision(Batched(low, lobj.value, lobj.gn, lobj.make_aux(low, groups, 1.0),
                                 batch_fn(low, lobj.f_ref), lobj.removal), F64)
    step, take, forced, cut = pbrf.newton._step, pbrf.newton._NewtonState.take, [], []

    def stalling_step(M, recipe, rows, th, gr, m, atol, near, own, wide):
        d, Ad, ci, neg, stuck = step(M, recipe, rows, th, gr, m, atol, near, own, wide)
        if not forced:
            forced.append(True)
            return scale * d, scale * Ad, ci, neg, stuck | (own & ~wide)
        return d, Ad, ci, neg, stuck

    def watched_take(self, rows, accept, d, F_new, g_new, mu):
        if not cut:  # the forced iteration
            ratio = g_new.norm(dim=1) / self.g[rows].norm(dim=1)
            cut.extend((accept & (ratio <= pbrf.newton.KEEP_CUT)).tolist())
        return take(self, rows, accept, d, F_new, g_new, mu)

    monkeypatch.setattr("pbrf.newton._step", stalling_step)
    monkeypatch.setattr("pbrf.newton._NewtonState.take", watched_take)
    signal = removal_signal(prob, groups, 1.0)
    theta, d = newton_optimize(
        prob, obj.value, obj.gn, obj.shift, prob.theta.expand(2, -1).clone(),
        obj.make_aux(prob, groups, 1.0), signal, NewtonRecipe(tol=1e-9, model="auto"),
        batch_fn(prob, obj.f_ref), False, removal_fn=obj.removal, low=products)
    monkeypatch.undo()
    return theta, d, signal, cut


def test_a_float32_solve_that_stalls_far_above_its_round_off_keeps_its_row_in_float32(
        monkeypatch):
    """A stalled float32 solve widens its row to float64 products only where it ended within
    the loosest tolerance Newton asks (``forcing``), where round-off can be what stopped it, and
    its step did not cut the gradient 4-fold (one that did keeps float32: the outer iteration
    refines it); one that stalled with half its right-hand side left keeps its row in float32
    (float64 would stall there too), the trust region judging the truncated step. All reach the
    certified optimum."""
    theta_w, d_w, signal, cut = _pbrf_rows_with_a_forced_stall(monkeypatch, 1.0)
    assert d_w["wide"].tolist() == [not c for c in cut]
    assert cut.count(True) == 1  # here one row of each: measured, not chosen
    theta_f, d_f, _, _ = _pbrf_rows_with_a_forced_stall(monkeypatch, 0.5)
    assert d_f["wide"].tolist() == [False, False]
    for d in (d_w, d_f):
        assert bool((d["grad_norm"] <= 1e-9 * signal).all())
    prob = tiny_smooth_cnn()
    size = (theta_w - prob.theta).norm(dim=1)
    assert float(((theta_f - theta_w).norm(dim=1) / size).max()) <= 1e-8


def test_a_stall_widens_only_within_forcing_or_the_products_round_off():
    """``_coarse``: a stalled solve's row widens where its relative residual is within
    ``forcing`` or within its products' round-off (10 ε times the preconditioned condition
    number): float32 stalls at half the gradient do not widen, bfloat16 ones do (measured on the
    tiny CNN: residuals up to 9.8 of the gradient, top eigenvalue 3.8, shift 0.011)."""
    from pbrf.newton import Preconditioner, _coarse, _Model

    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=F64)
    d = torch.zeros_like(g)
    Ad = -g * torch.tensor([[0.95], [0.5], [-8.8]], dtype=F64)  # residuals 0.05, 0.5 and 9.8
    m = torch.zeros(3, dtype=F64)
    pre = Preconditioner(torch.tensor([3.8], dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64))
    for dtype, expect in ((torch.float32, [True, False, False]),
                          (torch.bfloat16, [True, True, True])):
        M = _Model(None, 0.011, "shared", floor=10 * torch.finfo(dtype).eps, precond=pre)
        assert _coarse(M, g, d, Ad, m, 0.1).tolist() == expect, dtype


def test_steps_below_the_losses_round_off_are_judged_by_the_gradient():
    """A PBRF whose removal is tiny (weight 1e-6 on the tiny CNN): its value is ~1e-9 but it is
    computed from losses of size J(θ^s) ≈ 0.2, so near the optimum its float64 differences are
    round-off. Judged by them (a floor of 1e3·eps·|F|, the rule before), Newton steps that cut
    the gradient are rejected and rows stall as far up as ρ ~ 1e-1; with the floor set by
    J(θ^s), those steps are judged by the gradient and every row reaches the float64 gradient's
    own floor."""
    prob, groups, lam, w = tiny_smooth_cnn(), [[0], [5], [11], [24], [30]], 1e-2, 1e-6
    recipe = NewtonRecipe(tol=1e-10, max_iter=60, model="auto", products="float64",
                          precondition=0)
    resp = pbrf.respond(prob, "pbrf", groups, damping=lam, recipe=recipe, removal_weight=w,
                        progress=False)
    assert max(d.rho for d in resp.diagnostics) <= 1e-6
    obj = pbrf.kinds.get("pbrf").objective(prob, lam)
    theta0 = prob.theta.unsqueeze(0).expand(len(groups), -1).clone()
    signal = removal_signal(prob, groups, w)
    _, d = newton_optimize(prob, obj.value, obj.gn, obj.shift, theta0,
                           obj.make_aux(prob, groups, w), signal, recipe,
                           batch_fn(prob, obj.f_ref), False, removal_fn=obj.removal,
                           magnitude=0.0)
    assert float((d["grad_norm"] / signal).max()) >= 1e-3  # the case needs it


def test_rows_looped_or_vmapped_forward_or_reverse_give_the_same_values():
    """The rows' own products and gradients ``vmap`` over the K parameter sets or loop over them,
    and the Hessian products are forward- or reverse-over-reverse (whichever :class:`Fastest`
    measures faster): the same values, per-row aux dicts and tuple outputs included, equal to
    the dense Hessian's products."""
    prob = tiny_smooth_cnn()
    assert row_ways(prob) == ("vmap", "loop")  # a CNN on CPU may loop
    obj = pbrf.kinds.get("pbrf").objective(prob, 0.05)
    groups = [[0], [5], [2, 3]]
    aux = obj.make_aux(prob, groups, 1.0)
    batch = batch_fn(prob, obj.f_ref)(torch.arange(prob.n_train))
    g = torch.Generator().manual_seed(0)
    theta = prob.theta + 0.1 * torch.randn(3, prob.n_params, generator=g, dtype=F64)
    V = torch.randn(3, prob.n_params, generator=g, dtype=F64)

    def value(th, a, b):
        return obj.value(prob.unflatten(th), a, b)

    vg = [per_row(torch.func.grad_and_value(value), (0, 0, None), loop)(theta, aux, batch)
          for loop in (False, True)]
    hv = [per_row(hessian_product(value, reverse), (0, 0, 0, None), loop)(theta, V, aux, batch)
          for loop in (False, True) for reverse in (False, True)]
    for a, b in ((vg[0][0], vg[1][0]), (vg[0][1], vg[1][1]), *((hv[0], h) for h in hv[1:])):
        assert a.shape == b.shape and rel(b, a) <= 1e-12
    one = {k: v[1] for k, v in aux.items()}
    assert rel(vg[1][0][1], torch.func.grad(lambda t: value(t, one, batch))(theta[1])) <= 1e-12
    dense = torch.func.hessian(lambda t: value(t, one, batch))(theta[1])
    assert rel(hv[3][1], dense @ V[1]) <= 1e-12  # row 1 sees its own aux


def test_fastest_measures_the_variants_on_the_first_call_then_keeps_one_within_its_margin():
    """:class:`Fastest` runs every variant on its first call (the first variant once more), keeps
    the first, in the declared order, within FASTEST_MARGIN of the fastest, returns its result
    from that call on and runs it alone after; one row is chosen apart, among the loops only;
    the choice belongs to the problem, so another chunk's operator shares it."""
    prob, calls = tiny_smooth_cnn(), []

    def variant(name: str, seconds: float, tag: float):
        def fn(theta, b):
            calls.append(name)
            time.sleep(seconds)
            return theta + tag
        return fn

    # the fastest (0.015 s) is "vmap reverse"; "loop forward" comes before it and within 2x
    variants = {"vmap forward": variant("vf", 0.06, 0.0), "loop forward": variant("lf", 0.02, 1.0),
                "vmap reverse": variant("vr", 0.015, 2.0), "loop reverse": variant("lr", 0.05, 3.0)}
    assert FASTEST_MARGIN == 2.0
    op = Fastest(prob, "test-op", variants)
    b = {"idx": torch.arange(8)}
    theta = torch.zeros(3, 2)
    assert op.choice() is None
    assert torch.equal(op(theta, b), theta + 1.0)  # the chosen one's result, already
    assert calls == ["vf", "lf", "vr", "lr", "vf"]
    assert op.choice() == "loop forward" and set(op.measured()) == set(variants)
    for _ in range(3):
        assert torch.equal(op(theta, b), theta + 1.0)
    assert calls[5:] == ["lf"] * 3
    calls.clear()
    assert torch.equal(op(theta[:1], b), theta[:1] + 1.0)
    assert calls == ["lf", "lr", "lf"] and op.choice(one_row=True) == "loop forward"
    again = Fastest(prob, "test-op", variants)  # another chunk of the same run
    calls.clear()
    again(theta, b)
    assert calls == ["lf"]


def test_a_row_bounded_below_is_never_a_runaway():
    """A gradient grown 1000-fold along accepted steps makes a removal row a runaway (its PBRF may
    have no minimum near θ^s), but not a row without a removal term: its objective is bounded
    below (nonnegative losses and quadratics), so it is a long descent to a minimum that exists
    (ResNet-20 ×0.25's proximal continuation at λ = 1e-3 was wrongly stopped so)."""
    prob = _problem("classification")
    obj = pbrf.kinds.get("proximal").objective(prob, 0.05)
    B = Batched(prob, obj.value, obj.gn, obj.make_aux(prob, [[], [0]], 1.0),
                batch_fn(prob, obj.f_ref))
    theta0, rows = prob.theta.expand(2, -1).clone(), torch.arange(2)
    for bounded, runaway in ((None, [True, True]), (torch.tensor([True, False]), [False, True])):
        st = _NewtonState.start(B, theta0, torch.ones(2, dtype=F64), 1e-8, False, False, 0.0,
                                bounded)
        st.g = 1e3 * st.g / st.g.norm(dim=1, keepdim=True) * st.gn0.clamp_min(1.0)[:, None]
        st.watch(rows, torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=F64),
                 torch.ones(2, dtype=F64), torch.zeros(2, dtype=torch.bool), False)
        assert st.runaway.tolist() == runaway
        assert st.active.tolist() == [not r for r in runaway]


def test_a_removal_row_that_does_not_halve_its_gradient_for_runaway_idle_iterations_runs_away():
    """Rows whose gradient never halves: a removal row whose gradient stays above its start runs
    away after exactly RUNAWAY_IDLE iterations (mnist-mlp's removal 32 spent 60% of its call's CG
    products so); not one below its start (a stall at a kink: it stops by the stall rules or the
    iteration cap, reported uncertified, not diverged); not a bounded row."""
    prob = _problem("classification")
    obj = pbrf.kinds.get("pbrf").objective(prob, 0.05)
    B = Batched(prob, obj.value, obj.gn, obj.make_aux(prob, [[0], [1], [2]], 1.0),
                batch_fn(prob, obj.f_ref))
    rows = torch.arange(3)
    st = _NewtonState.start(B, prob.theta.expand(3, -1).clone(), torch.zeros(3, dtype=F64), 1e-8,
                            False, False, 0.0, torch.tensor([False, False, True]))
    ratio = torch.tensor([2.0, 0.6, 2.0], dtype=F64)[:, None]
    st.g = st.g * ratio
    for it in range(1, RUNAWAY_IDLE + 1):
        assert not st.runaway.any(), it
        st.watch(rows, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=F64),
                 torch.ones(3, dtype=F64), torch.zeros(3, dtype=torch.bool), False)
    assert st.runaway.tolist() == [True, False, False]
    assert st.active.tolist() == [False, True, True]


def test_the_proximal_and_warm_start_objectives_are_bounded_below_the_pbrf_is_not():
    """Which kinds' removal rows may be called runaways. The proximal and warm-start objectives
    are the kept points' nonnegative losses plus quadratics: nonnegative anywhere, however far
    (random points up to 1e3 away from θ^s). The PBRF's removal term ``−(1/N) L(z, θ)`` is
    bounded by nothing but the quadratic: its objective is already negative at θ^s."""
    prob = _problem("classification")
    aux = {k: v[0] for k, v in pbrf.objectives.removed_aux(prob, [[0]], 1.0).items()}
    g = torch.Generator().manual_seed(0)
    far = prob.theta + torch.randn(8, prob.n_params, generator=g, dtype=F64) * torch.logspace(
        0, 3, 8, dtype=F64)[:, None]
    for name in ("pbrf", "proximal", "warm"):
        obj = pbrf.kinds.get(name).objective(prob, 0.05)
        assert obj.bounded == (name != "pbrf")
        batch = batch_fn(prob, obj.f_ref)(torch.arange(prob.n_train))
        values = [float(obj.value(prob.unflatten(th), aux, batch)) for th in far]
        at_start = float(obj.value(prob.params, aux, batch))
        if obj.bounded:
            assert min(values) >= 0.0 and at_start >= 0.0
        else:
            assert at_start < 0.0


def test_descend_lowers_the_objective_to_its_gradient_target_within_its_budget():
    """The continuation's L-BFGS warm-up, on the proximal objective of an unconverged MLP
    without removal: it decreases the objective and reaches its gradient target within the
    evaluations it is given, and never spends more than them."""
    prob = _problem("classification")
    obj = pbrf.kinds.get("proximal").objective(prob, 0.05)
    B = Batched(prob, obj.value, obj.gn, obj.make_aux(prob, [[]], 1.0),
                batch_fn(prob, obj.f_ref))
    rows = torch.zeros(1, dtype=torch.long)
    F0, g0 = B.value_grad(rows, prob.theta[None])
    theta, evals = descend(B, prob.theta, 500, target=1e-4)
    F, g = B.value_grad(rows, theta[None])
    assert float(F[0]) < float(F0[0])
    assert float(g.norm()) <= 1e-4 * float(g0.norm())
    assert 2 < evals <= 500
    for budget in (1, 5):
        theta_b, evals_b = descend(B, prob.theta, budget)
        assert evals_b <= budget
        assert float(B.value_grad(rows, theta_b[None])[0][0]) <= float(F0[0])


def test_the_warm_up_changes_the_continuations_path_not_its_certified_answer():
    """Proximal responses from a continuation warmed up by L-BFGS and from Newton alone: both
    certified, the same parameters (the tiny MLP's continuation has one minimum nearby)."""
    prob = _problem("regression")
    groups = [[7], [2, 3]]
    out = {w: pbrf.respond(prob, "proximal", groups, damping=0.05,
                           recipe=NewtonRecipe(tol=1e-12, warmup=w), paired=True, progress=False)
           for w in (0, 600)}
    for resp in out.values():
        assert all(resp.certified) and all(d["paired_certified"] for d in resp.diagnostics)
    drift = (out[0].params_flat - prob.theta).norm(dim=1)
    err = (out[600].params_flat - out[0].params_flat).norm(dim=1) / drift
    assert float(err.max()) <= 1e-8, err


def test_rows_stop_at_the_gradients_round_off_floor():
    """A problem stops once its gradient norm is at the round-off floor it is given, even where
    ``tol · signal`` lies below it (there, steps cannot be told apart from round-off); without
    the floor the same rows iterate on."""
    prob, groups = _problem("classification"), [[0], [3]]
    obj = pbrf.kinds.get("proximal").objective(prob, 0.05)
    signal = removal_signal(prob, groups)
    theta0 = prob.theta.unsqueeze(0).expand(len(groups), -1).clone()
    floor = 1e-4 * float(signal.min())
    runs = {f: newton_optimize(prob, obj.value, obj.gn, obj.shift, theta0,
                               obj.make_aux(prob, groups, 1.0), signal,
                               NewtonRecipe(tol=1e-12, model="auto"),
                               batch_fn(prob, obj.f_ref), False, grad_floor=f)[1]
            for f in (0.0, floor)}
    assert bool((runs[floor]["grad_norm"] <= floor).all())
    assert bool((runs[0.0]["grad_norm"] < 1e-2 * floor).all())
    assert int(runs[floor]["iterations"].sum()) < int(runs[0.0]["iterations"].sum())
