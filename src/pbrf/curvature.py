"""Curvature of the training objective: Gauss–Newton and Hessian products, and dense matrices.

All vectors are flat parameter vectors; a batch of vectors is a matrix of ROWS ``[m, n_params]``.

* Gauss–Newton (``docs/conventions.md`` §3): ``G = (1/N) Σ_i J_iᵀ H_i J_i`` with ``J_i = ∂f(θ,
  x_i)/∂θ`` and
  ``H_i = ∂²L/∂f²``; the damped curvature is ``C = G + (wd + λ) I``.
* Hessian: ``C = ∇²J(θ) + λ I = (1/N) Σ_i ∇²L_i + (wd + λ) I``.

Products are matrix-free (``torch.func.jvp`` / ``vjp``), vectorised over the rows with ``vmap`` and
accumulated over chunks of the training data so that memory stays bounded.

Outside operators: wherever pbrf takes ``curvature=`` (:func:`pbrf.influence`,
:func:`pbrf.delta_theta`, ``pbrf.respond(..., "linearized")``) it also takes any object that
follows the :class:`Curvature` protocol — ``op @ v`` for a flat vector ``v`` ``[p]`` and
``op @ V`` for a matrix of columns ``[p, m]``, plus an optional ``dense()`` for small ``p`` — e.g. a
K-FAC / EK-FAC approximation from another library, a curvlinops operator or a plain ``[p, p]``
tensor. It stands for the undamped data curvature (``G`` or ``∇²`` of the mean loss), and pbrf adds
``(wd + λ) I`` exactly as for the built-in ones.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .problem import Problem

__all__ = ["Curvature", "CurvatureOperator", "ggn_matvec", "hessian_matvec", "dense_ggn",
           "dense_hessian",
           "CURVATURES"]

CURVATURES = ("ggn", "hessian")


@runtime_checkable
class Curvature(Protocol):
    """An undamped curvature as a linear operator on flat parameter vectors (module docstring).

    ``op @ v`` for ``v`` ``[p]`` returns ``[p]``; ``op @ V`` for columns ``[p, m]`` returns
    ``[p, m]``. A ``dense()`` method returning ``[p, p]`` is optional (the exact solver otherwise
    applies the operator to the identity).
    """

    def __matmul__(self, v: Tensor) -> Tensor: ...


#: Factorisation stores of the operators at θ^s, one per problem (weakly keyed: a problem that is
#: gone takes its store with it). Operators own their store; those of one problem share it.
_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rows(v: Tensor) -> tuple[Tensor, bool]:
    return (v.unsqueeze(0), True) if v.dim() == 1 else (v, False)


def _chunk_ggn(prob: Problem, theta: Tensor, x: Tensor, t: Tensor, V: Tensor) -> Tensor:
    """``Σ_{i ∈ chunk} J_iᵀ H_i J_i V`` for rows ``V`` ``[m, p]`` (not divided by N)."""

    def f(th: Tensor) -> Tensor:
        return prob.outputs_flat(th, x)

    out, vjp_fn = vjp(f, theta)
    JV = vmap(lambda v: jvp(f, (theta,), (v,))[1])(V)
    HJV = vmap(lambda u: prob.task.output_hvp(out, t, u))(JV)
    return vmap(lambda u: vjp_fn(u)[0])(HJV)


def _chunk_hessian(prob: Problem, theta: Tensor, x: Tensor, t: Tensor, V: Tensor) -> Tensor:
    """``Σ_{i ∈ chunk} ∇²L_i V`` for rows ``V`` (forward-over-reverse; not divided by N)."""

    def g(th: Tensor) -> Tensor:
        return torch.func.grad(lambda p: prob.task.loss(prob.outputs_flat(p, x), t).sum())(th)

    return vmap(lambda v: jvp(g, (theta,), (v,))[1])(V)


def _accumulate(chunk_fn, prob: Problem, theta: Tensor, V: Tensor, index: Tensor | None) -> Tensor:
    x, t = (prob.x, prob.t) if index is None else (prob.x[index], prob.t[index])
    n = x.shape[0]
    out = torch.zeros_like(V)
    for s in prob.chunks(n):
        out += chunk_fn(prob, theta, x[s], t[s], V)
    return out / n


def ggn_matvec(prob: Problem, V: Tensor, theta: Tensor | None = None,
               index: Tensor | None = None) -> Tensor:
    """Undamped Gauss–Newton product ``(1/n) Σ_i J_iᵀ H_i J_i v`` over the training set or
    ``index``.

    Args:
        prob: the problem.
        V: a vector ``[p]`` or rows ``[m, p]``.
        theta: where to linearise (default θ^s).
        index: optional subset of training examples (a minibatch); the mean is over that subset.
    """
    V, single = _rows(V)
    theta = prob.theta if theta is None else theta
    out = _accumulate(_chunk_ggn, prob, theta, V, index)
    return out[0] if single else out


def hessian_matvec(prob: Problem, V: Tensor, theta: Tensor | None = None,
                   index: Tensor | None = None) -> Tensor:
    """Hessian of the mean data loss times ``V`` (weight decay not included)."""
    V, single = _rows(V)
    theta = prob.theta if theta is None else theta
    out = _accumulate(_chunk_hessian, prob, theta, V, index)
    return out[0] if single else out


class CurvatureOperator:
    """The damped curvature ``C`` as a linear operator on flat parameter vectors.

    ``C = G + (wd + λ) I`` for ``curvature="ggn"`` and ``C = ∇²J + λ I`` (which includes wd) for
    ``curvature="hessian"``; in both cases ``shift = wd + λ`` is added to the data term.

    Args:
        prob: the problem (data, θ^s, weight decay).
        curvature: ``"ggn"``, ``"hessian"``, or an outside :class:`Curvature` operator (the
            undamped data curvature; ``C = op + (wd + λ) I``).
        damping: λ ≥ 0.
        theta: linearisation point (default θ^s).

    ``C @ v`` (columns) and ``matvec`` (rows) apply it; ``dense()`` forms it for small ``p``.
    ``factor_cache`` holds the exact solver's factorisation of ``C`` (one entry); the operators
    at θ^s of one problem share it, so repeated solves with the same curvature and damping (e.g.
    chunks of removals) factorise ``C`` once.
    """

    def __init__(self, prob: Problem, curvature="ggn", damping: float = 0.0,
                 theta: Tensor | None = None):
        outside = not isinstance(curvature, str)
        if outside and not isinstance(curvature, Curvature):
            raise TypeError(f"curvature must be one of {CURVATURES} or an operator supporting op @ "
                            "v, "
                            f"got {type(curvature).__name__}.")
        if not outside and curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
        if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
            raise ValueError(
                f"damping must be a finite number >= 0, got {damping!r}; use e.g. damping=1e-3."
            )
        self.prob, self.damping = prob, float(damping)
        self.curvature = "custom" if outside else curvature
        self.outside = curvature if outside else None
        self.theta = prob.theta if theta is None else theta
        self.cache_key = (id(curvature) if outside else curvature, self.damping, prob.weight_decay)
        shared = theta is None and not outside
        self.factor_cache: dict = _STORES.setdefault(prob, {}) if shared else {}
        self.shift = prob.weight_decay + self.damping
        self.n_params = prob.n_params
        self._data_mv: Callable = {"ggn": ggn_matvec,
                                   "hessian": hessian_matvec}.get(self.curvature, _outside_matvec)

    def matvec(self, V: Tensor, index: Tensor | None = None) -> Tensor:
        """``C V`` for a vector or rows ``[m, p]``; with ``index`` the data term is the
        minibatch mean.
        """
        if self.outside is not None:
            if index is not None:
                raise ValueError("an outside curvature operator has no minibatch products; use a "
                                 "full-batch "
                                 "solver (solver='exact' or 'cg', or lissa without batch_size).")
            return _outside_matvec(self.outside, V) + self.shift * V
        return self._data_mv(self.prob, V, self.theta, index) + self.shift * V

    __call__ = matvec

    def __matmul__(self, V: Tensor) -> Tensor:
        """``C v`` for a vector ``[p]``, ``C V`` for columns ``[p, m]`` (the :class:`Curvature`
        protocol).
        """
        return self.matvec(V) if V.dim() == 1 else self.matvec(V.T).T

    def dense(self, max_params: int = 5000) -> Tensor:
        """The dense damped matrix ``[p, p]`` built from explicit Jacobians /
        ``torch.func.hessian``.
        """
        if self.n_params > max_params:
            raise ValueError(
                f"dense curvature: the model has {self.n_params} parameters, above "
                f"max_params={max_params}; "
                "use solver='cg' or 'lissa', or raise max_params if the p×p matrix fits in memory."
            )
        eye = torch.eye(self.n_params, dtype=self.theta.dtype, device=self.theta.device)
        if self.outside is not None:
            if hasattr(self.outside, "dense"):
                data = self.outside.dense()
            else:
                data = _outside_matvec(self.outside, eye)
            return data.to(eye) + self.shift * eye
        build = dense_ggn if self.curvature == "ggn" else dense_hessian
        return build(self.prob, self.theta) + self.shift * eye

    def __repr__(self) -> str:
        return (f"CurvatureOperator({self.curvature}, damping={self.damping}, shift={self.shift}, "
                f"p={self.n_params})")


def _outside_matvec(op, V: Tensor) -> Tensor:
    """An outside operator on a vector ``[p]`` or on rows ``[m, p]`` (it takes columns)."""
    return op @ V if V.dim() == 1 else (op @ V.T).T


def dense_ggn(prob: Problem, theta: Tensor | None = None) -> Tensor:
    """Dense undamped ``G = (1/N) Σ J_iᵀ H_i J_i`` from per-chunk Jacobians (small models only)."""
    theta = prob.theta if theta is None else theta
    p = prob.n_params
    G = torch.zeros(p, p, dtype=theta.dtype, device=theta.device)
    for s in prob.chunks():
        x, t = prob.x[s], prob.t[s]
        out = prob.outputs_flat(theta, x)
        B, D = out.shape[0], out[0].numel()
        J = torch.func.jacrev(lambda th: prob.outputs_flat(th, x))(theta).reshape(B, D, p)
        basis = torch.eye(D, dtype=out.dtype, device=out.device).reshape(D, 1, *out.shape[1:])
        H = vmap(lambda e: prob.task.output_hvp(out, t, e.expand_as(out)))(basis)  # [D, B, *out]
        H = H.reshape(D, B, D).permute(1, 2, 0)  # H[b, :, d] = H_b e_d
        HJ = torch.einsum("bde,beq->bdq", H, J)
        G += J.reshape(B * D, p).T @ HJ.reshape(B * D, p)
    return G / prob.n_train


def dense_hessian(prob: Problem, theta: Tensor | None = None, block: int = 256) -> Tensor:
    """Dense Hessian of the mean data loss ``(1/N) Σ ∇²L_i`` from Hessian-vector products on the
    identity.

    (``torch.func.hessian``, i.e. ``jacfwd(jacrev)``, returns wrong values for some models — e.g.
    with
    embeddings and attention in torch 2.13 — whereas ``jvp(grad)`` products agree with
    reverse-over-reverse; so the dense matrix is assembled from the latter, ``block`` columns at a
    time.)
    """
    theta = prob.theta if theta is None else theta
    p = prob.n_params
    eye = torch.eye(p, dtype=theta.dtype, device=theta.device)
    H = torch.cat([hessian_matvec(prob, eye[s : s + block], theta) for s in range(0, p, block)])
    return 0.5 * (H + H.T)
