"""Stored output Jacobians: Gauss–Newton products at one fixed point as matrix products.

The shared model of :mod:`pbrf.newton` (the Gauss–Newton curvature at θ^s, one for every removal
row) and its Nyström preconditioner apply ONE curvature to many vectors. Through automatic
differentiation each vector costs a forward and a backward pass, and for a convolutional network
``vmap`` over the vectors runs them as grouped convolutions, no cheaper per vector than one at a
time: 3.0 s per vector and pass for ResNet-20 ×0.25 on N = 1,000 CIFAR-10 images (2 threads).
At a fixed θ the product is ``G v = Σ_i J_iᵀ H_i J_i v``: with the per-example output Jacobians
``J_i [C, p]`` and output Hessians ``H_i [C, C]`` stored, a vector costs two matrix products —
6.6 ms for that ResNet after a 4.7 s build (661 MiB in float32), about 450× less per vector.

When (:func:`pays`): the Jacobian is used when a product through it takes fewer floating-point
operations than through the network, ``4·C·p ≤ 3 × (forward FLOPs of one example)`` (a
Gauss–Newton product costs about three forward passes): the CNNs (ResNet-20 ×0.25 22.7×, AlexNet
×0.125 5.6×, VGG13 ×0.25 3.7×, LeNet ×0.5 2.4× fewer), not the MLPs (an MLP 64×2 on MNIST 0.15×:
its product through the network is the cheaper). The rule reads the model, never a clock, so a
resumed run computes what the uninterrupted one did.

Memory: at most :data:`JACOBIAN_BYTES` per problem (one point stored at a time); the chunks of
the training set past it keep the products through the network, so a large N costs time, never
memory. Values: the same products as through the network, up to the dtype's round-off (1.8e-6
relative in float32 on that ResNet).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vmap
from torch.utils.flop_counter import FlopCounterMode

from .problem import Problem

__all__ = ["JACOBIAN_BYTES", "JACOBIAN_BLOCK", "pays", "forward_flops", "jacobians",
           "example_jacobians", "stored_examples", "outputs_per_example", "output_hessians",
           "gn_product"]

#: The most memory one problem's stored Jacobians may take (the chunks past it use products).
JACOBIAN_BYTES = 2**30
#: Examples per ``vmap``-ed Jacobian call (bounds the build's own memory).
JACOBIAN_BLOCK = 64
#: Each problem's stored Jacobians ``(key, [J [B, C, p] or None per chunk])`` (weakly keyed).
_STORE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Each problem's forward FLOPs and outputs per example.
_FLOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward_flops(prob: Problem) -> int:
    """Floating-point operations of one example's forward pass (matrix products and
    convolutions, as :class:`torch.utils.flop_counter.FlopCounterMode` counts them).
    """
    return _measured(prob)[0]


def outputs_per_example(prob: Problem) -> int:
    """``C``: the model's outputs per example (rows of one example's Jacobian)."""
    return _measured(prob)[1]


def _measured(prob: Problem) -> tuple[int, int]:
    """``(forward FLOPs, outputs)`` of one example, from one counted forward pass per problem
    (:func:`pays` is asked on every shared product).
    """
    if prob not in _FLOPS:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = prob.outputs(prob.params, prob.x[:1])
        _FLOPS[prob] = (int(counter.get_total_flops()), int(out[0].numel()))
    return _FLOPS[prob]


def pays(prob: Problem) -> bool:
    """Whether a Gauss–Newton product at a fixed point is cheaper through the stored Jacobian
    (module docstring): ``4·C·p ≤ 3 × forward FLOPs`` per example.
    """
    return 4 * outputs_per_example(prob) * prob.n_params <= 3 * forward_flops(prob)


def example_jacobians(prob: Problem, theta: Tensor, x: Tensor) -> Tensor:
    """``[B, C, p]``: each example's Jacobian of its flattened outputs at ``theta``."""

    def one(th: Tensor, xi: Tensor) -> Tensor:
        return prob.outputs_flat(th, xi[None]).reshape(-1)

    per = vmap(jacrev(one), in_dims=(None, 0))
    return torch.cat([per(theta, x[i:i + JACOBIAN_BLOCK]).detach()
                      for i in range(0, x.shape[0], JACOBIAN_BLOCK)])


def stored_examples(prob: Problem, dtype: torch.dtype | None = None) -> int:
    """How many training examples' Jacobians :func:`jacobians` stores (whole chunks, in order,
    within :data:`JACOBIAN_BYTES`) for ``prob`` in ``dtype`` (default its own).
    """
    itemsize = torch.finfo(dtype or prob.dtype).bits // 8
    room = JACOBIAN_BYTES // (outputs_per_example(prob) * prob.n_params * itemsize)
    stored = 0
    for s in prob.chunks():
        if s.stop - s.start > room - stored:
            break
        stored += s.stop - s.start
    return stored


def jacobians(prob: Problem, theta: Tensor, key: tuple) -> list[Tensor | None]:
    """Per chunk of ``prob.chunks()``: the output Jacobians ``[B, C, p]`` at ``theta`` (stored
    under ``key``, the point's fingerprint: the last point asked for is kept), ``None`` for the
    chunks past :data:`JACOBIAN_BYTES`.
    """
    held = _STORE.get(prob)
    if held is not None and held[0] == key:
        return held[1]
    _STORE.pop(prob, None)  # the previous point's go first
    stored = stored_examples(prob)
    out = [example_jacobians(prob, theta.detach(), prob.x[s]) if s.stop <= stored else None
           for s in prob.chunks()]
    _STORE[prob] = (key, out)
    return out


def output_hessians(fn: Callable[[Tensor], Tensor], out: Tensor) -> Tensor:
    """``[B, C, C]``: the per-example blocks of the output Hessian of ``fn`` (a sum of
    per-example terms, such as a mean loss) at ``out [B, ...]``, one forward-over-reverse
    product per output coordinate.
    """
    B = out.shape[0]
    flat = out.reshape(B, -1)
    C, g = flat.shape[1], grad(fn)
    cols = []
    for c in range(C):
        e = torch.zeros_like(flat)
        e[:, c] = 1
        cols.append(jvp(g, (out,), (e.reshape(out.shape),))[1].reshape(B, C))
    return torch.stack(cols, dim=-1)


def gn_product(J: Tensor, H: Tensor, V: Tensor) -> Tensor:
    """``Σ_i J_iᵀ H_i J_i v`` for every row ``v`` of ``V [k, p]`` (``J [B, C, p]``,
    ``H [B, C, C]``): ``[k, p]``.
    """
    JV = torch.einsum("bcp,kp->kbc", J, V)
    return torch.einsum("bcp,kbc->kp", J, torch.einsum("bcd,kbd->kbc", H, JV))
