"""Tasks: the loss on network outputs, its output-space curvature and its Bregman divergence.

A task splits "network outputs" from "loss on outputs" (``docs/conventions.md`` §2). Everything that
the
Gauss–Newton matrix, the PBRF and the measurements need is expressed on outputs ``f``:

* ``loss(f, t)`` — per-example loss, shape ``[B]``;
* ``output_hvp(f, t, v)`` — ``H_i v`` with ``H_i = ∂²L/∂f²`` at each example, same shape as ``f``;
* ``bregman(f, f_ref, t)`` — ``D_L(f, f_ref) = L(f,t) − L(f_ref,t) − ∂_f L(f_ref,t)ᵀ (f − f_ref)``,
  shape ``[B]``, written in closed form (the targets cancel).

Shapes: ``f`` is ``[B, ...]`` (one leading example axis); targets are whatever the task needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Task",
    "Regression",
    "Classification",
    "BinaryClassification",
    "LanguageModel",
    "Reconstruction",
    "get_task",
    "TASKS",
]


class Task:
    """Base class. Subclasses implement :meth:`loss`, :meth:`output_hvp` and :meth:`bregman`."""

    name = "task"

    def targets(self, x: Tensor, y: Tensor | None) -> Tensor:
        """The target tensor used by :meth:`loss` (``y`` except for reconstruction)."""
        if y is None:
            raise ValueError(f"{type(self).__name__} needs targets: pass train=(x, y), not (x, "
                             "None).")
        return y

    def loss(self, f: Tensor, t: Tensor) -> Tensor:
        """Per-example loss ``L(f_i, t_i)``, shape ``[B]``."""
        raise NotImplementedError

    def output_hvp(self, f: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``(∂²L/∂f²) v`` per example (same shape as ``f``).

        The default differentiates :meth:`loss` twice (forward-over-reverse); subclasses override
        it with the closed form.
        """

        def grad_f(ff: Tensor) -> Tensor:
            return torch.func.grad(lambda g: self.loss(g, t).sum())(ff)

        return torch.func.jvp(grad_f, (f,), (v,))[1]

    def bregman(self, f: Tensor, f_ref: Tensor, t: Tensor) -> Tensor:
        """Bregman divergence ``D_L(f, f_ref)`` per example, shape ``[B]``."""
        raise NotImplementedError

    def predictions(self, f: Tensor) -> Tensor:
        """Model predictions in the target space (used for accuracy in reports)."""
        return f

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _flat(f: Tensor) -> Tensor:
    return f.reshape(f.shape[0], -1)


class Regression(Task):
    """Squared error ``L = ½ ||f − t||²`` summed over output dimensions (output Hessian = I)."""

    name = "regression"

    def loss(self, f: Tensor, t: Tensor) -> Tensor:
        return 0.5 * _flat(f - t.reshape(f.shape).to(f.dtype)).pow(2).sum(1)

    def output_hvp(self, f: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return v

    def bregman(self, f: Tensor, f_ref: Tensor, t: Tensor) -> Tensor:
        return 0.5 * _flat(f - f_ref).pow(2).sum(1)


class Reconstruction(Regression):
    """Reconstruction ``L = ½ ||f − x||²``: the target is the input itself, reshaped to ``f``."""

    name = "reconstruction"

    def targets(self, x: Tensor, y: Tensor | None) -> Tensor:
        return x


class Classification(Task):
    """Softmax cross-entropy on logits ``f`` of shape ``[B, C]``; targets are class indices."""

    name = "classification"

    def loss(self, f: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(f, t.long(), reduction="none")

    def output_hvp(self, f: Tensor, t: Tensor, v: Tensor) -> Tensor:
        # H = diag(p) − p pᵀ  ⇒  H v = p ⊙ v − p (pᵀ v)
        p = torch.softmax(f, dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)

    def bregman(self, f: Tensor, f_ref: Tensor, t: Tensor) -> Tensor:
        # KL(softmax(f_ref) || softmax(f))
        logp_ref = torch.log_softmax(f_ref, dim=-1)
        logp = torch.log_softmax(f, dim=-1)
        return (logp_ref.exp() * (logp_ref - logp)).sum(-1)

    def predictions(self, f: Tensor) -> Tensor:
        return f.argmax(-1)


class BinaryClassification(Task):
    """Logistic loss on one logit per example (``f`` of shape ``[B]`` or ``[B, 1]``), ``t ∈
    {0, 1}``.
    """

    name = "binary"

    def loss(self, f: Tensor, t: Tensor) -> Tensor:
        f = f.reshape(f.shape[0])
        target = t.reshape(f.shape).to(f.dtype)
        return F.binary_cross_entropy_with_logits(f, target, reduction="none")

    def output_hvp(self, f: Tensor, t: Tensor, v: Tensor) -> Tensor:
        s = torch.sigmoid(f)
        return s * (1 - s) * v

    def bregman(self, f: Tensor, f_ref: Tensor, t: Tensor) -> Tensor:
        # KL(Bernoulli(σ(f_ref)) || Bernoulli(σ(f))) = q (log q − log p) + (1−q)(log(1−q) −
        # log(1−p))
        f, f_ref = f.reshape(f.shape[0]), f_ref.reshape(f.shape[0])
        q = torch.sigmoid(f_ref)
        return q * (F.logsigmoid(f_ref) - F.logsigmoid(f)) + (1 - q) * (
            F.logsigmoid(-f_ref) - F.logsigmoid(-f)
        )

    def predictions(self, f: Tensor) -> Tensor:
        return (f.reshape(f.shape[0]) > 0).long()


class LanguageModel(Task):
    """Token cross-entropy averaged over the ``T`` positions of one sequence (one sequence = one
    example).

    ``f``: logits ``[B, T, V]``; ``t``: next-token indices ``[B, T]``. The Bregman divergence is the
    mean over positions of ``KL(softmax(f_ref_t) || softmax(f_t))``.
    """

    name = "language_model"

    def loss(self, f: Tensor, t: Tensor) -> Tensor:
        B, T, V = f.shape
        ce = F.cross_entropy(f.reshape(B * T, V), t.reshape(B * T).long(), reduction="none")
        return ce.reshape(B, T).mean(1)

    def output_hvp(self, f: Tensor, t: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        return (p * v - p * (p * v).sum(-1, keepdim=True)) / f.shape[1]

    def bregman(self, f: Tensor, f_ref: Tensor, t: Tensor) -> Tensor:
        logp_ref = torch.log_softmax(f_ref, dim=-1)
        logp = torch.log_softmax(f, dim=-1)
        return (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean(1)

    def predictions(self, f: Tensor) -> Tensor:
        return f.argmax(-1)


_TASKS = {
    cls.name: cls
    for cls in (Regression, Classification, BinaryClassification, LanguageModel, Reconstruction)
}
#: The task names (``get_task``'s choices).
TASKS = tuple(_TASKS)


def get_task(name: str) -> Task:
    """Task by name: ``regression``, ``classification``, ``binary``, ``language_model``,
    ``reconstruction``.
    """
    try:
        return _TASKS[name]()
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(_TASKS)}.") from None
