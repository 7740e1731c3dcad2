"""Shared test oracles, written from ``docs/conventions.md`` independently of ``pbrf``'s own code.

* dense curvature references (``reference_ggn``, ``reference_hessian``, ``reference_damped``) from
  ``torch.autograd.functional`` Jacobians and Hessians (§3);
* the response objectives (``make_objective``: own losses, own Bregman divergence through
  autograd, own forward through ``functional_call``; §2, §5) and a plain Newton solver (``newton``).

Nothing here is borrowed from ``pbrf.respond``, ``pbrf.curvature`` or ``pbrf.tasks`` except the
network itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

F64 = torch.float64


def reference_ggn(prob):
    """(1/N) Σ_i J_iᵀ H_i J_i from torch.autograd.functional Jacobians of the outputs of all N
    examples
    and the autograd Hessian of each example's loss in output space (independent of
    pbrf.curvature)."""
    theta = prob.theta
    out = prob.outputs_flat(theta, prob.x)
    n, d = out.shape[0], out[0].numel()
    J = torch.autograd.functional.jacobian(
        lambda th: prob.outputs_flat(th, prob.x).reshape(n, d), theta, vectorize=True
    )  # [N, D, p]
    G = torch.zeros(prob.n_params, prob.n_params, dtype=torch.float64)
    for i in range(n):
        ti = prob.t[i : i + 1]
        H = torch.autograd.functional.hessian(
            lambda f: prob.task.loss(f.reshape(1, *out.shape[1:]), ti).sum(),
                out[i].reshape(-1).detach()
        )
        G += J[i].T @ H @ J[i]
    return G / n


def reference_hessian(prob):
    """Reverse-over-reverse autograd Hessian of the mean data loss (torch.func.hessian is wrong for
    the
    tiny transformer, see tests/test_curvature.py)."""

    def data_loss(th):
        return prob.task.loss(prob.outputs_flat(th, prob.x), prob.t).mean()

    return torch.autograd.functional.hessian(data_loss, prob.theta, vectorize=True)


def reference_damped(prob, curvature, damping):
    """Dense C = G + (wd + λ) I, or ∇²J + λ I = ∇²(mean loss) + (wd + λ) I
    (docs/conventions.md §3).
    """
    M = reference_ggn(prob) if curvature == "ggn" else reference_hessian(prob)
    return M + (prob.weight_decay + damping) * torch.eye(prob.n_params, dtype=torch.float64)


def _fwd(model: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
    """f(θ, x) for a flat θ in ``named_parameters`` order."""
    params, i = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    assert i == theta.numel()
    return torch.func.functional_call(model, (params,), (x,))


def _rows(z: Tensor) -> Tensor:
    return z.flatten(1) if z.dim() > 1 else z[:, None]


def _loss(task: str, f: Tensor, t: Tensor) -> Tensor:
    """Per-example loss [B] written from docs/conventions.md §2."""
    if task == "regression":
        return 0.5 * _rows(f - t.reshape(f.shape)).pow(2).sum(1)
    if task == "classification":
        return -torch.log_softmax(f, -1).gather(1, t.long()[:, None])[:, 0]
    if task == "binary":
        f = f.reshape(-1)
        return torch.nn.functional.softplus(f) - t.reshape(-1) * f
    raise KeyError(task)


def _bregman(task: str, f: Tensor, fs: Tensor, t: Tensor) -> Tensor:
    """D_L(f, f^s) = L(f) − L(f^s) − ∂_f L(f^s)ᵀ(f − f^s), per example, via autograd (no
    closed form).
    """
    fs = fs.detach()
    gs = torch.func.grad(lambda g: _loss(task, g, t).sum())(fs)
    return _loss(task, f, t) - _loss(task, fs, t) - _rows(gs * (f - fs)).sum(1)


def make_objective(kind: str, model, task: str, x, t, theta_s, group, wd: float, lam: float,
                   weight: float = 1.0):
    """The docs/conventions.md §5 objective of response ``kind`` (warm / proximal / pbrf) for one
    removal set.
    """
    n = x.shape[0]
    r = torch.tensor(group, dtype=torch.long)
    fs = _fwd(model, theta_s, x).detach()

    def obj(theta: Tensor) -> Tensor:
        removed = weight * _loss(task, _fwd(model, theta, x[r]), t[r]).sum() / n
        if kind == "pbrf":
            div = _bregman(task, _fwd(model, theta, x), fs, t).sum() / n
            return div - removed + 0.5 * (wd + lam) * (theta - theta_s).pow(2).sum()
        val = _loss(task, _fwd(model, theta, x),
                    t).sum() / n - removed + 0.5 * wd * theta.pow(2).sum()
        if kind == "proximal":
            val = val + 0.5 * lam * (theta - theta_s).pow(2).sum()
        return val

    return obj


def newton(obj, theta0: Tensor, iters: int = 100) -> tuple[Tensor, Tensor]:
    """Newton's method with a backtracking (Armijo) line search, to machine precision;
    returns (θ*, Hessian at θ*). Asserts a vanishing gradient and a positive definite Hessian."""
    theta = theta0.clone()
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(obj, theta)
        if g.norm() < 1e-14:
            break
        H = torch.autograd.functional.hessian(obj, theta)
        ev_min = float(torch.linalg.eigvalsh(H).min())
        if ev_min <= 0:  # not locally convex yet: shift to a descent direction
            H = H + (1e-3 - ev_min) * torch.eye(H.shape[0], dtype=H.dtype)
        step = torch.linalg.solve(H, g)
        t = 1.0
        if g.norm() > 1e-6:  # globalisation far from the solution; pure Newton steps near it
            f0 = obj(theta)
            while obj(theta - t * step) > f0 - 1e-4 * t * (g @ step) and t > 1e-8:
                t /= 2
        theta = theta - t * step
        if t == 1.0 and step.norm() <= 1e-15 * (1 + theta.norm()):
            break
    g = torch.autograd.functional.jacobian(obj, theta)
    H = torch.autograd.functional.hessian(obj, theta)
    assert g.norm() < 1e-12, f"reference Newton solve did not converge: |grad| = {g.norm():.3g}"
    assert torch.linalg.eigvalsh(H).min() > 0, "reference Newton solve reached no local minimum"
    return theta, H


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())
