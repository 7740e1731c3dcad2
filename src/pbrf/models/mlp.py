"""Fully connected models: logistic regression, MLP and the MNIST deep autoencoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ._layers import (
    ACTIVATIONS,
    check_choice,
    check_int,
    check_shape,
    check_width_mult,
    make_activation,
    scaled,
)

__all__ = ["logistic", "mlp", "autoencoder", "AUTOENCODER_WIDTHS"]

#: Encoder widths of the MNIST autoencoder of Hinton & Salakhutdinov (2006) / Martens (2010).
AUTOENCODER_WIDTHS = (1000, 500, 250, 30)


def _dense_stack(widths: Sequence[int], act: str, final_act: bool) -> list[nn.Module]:
    """``Linear(widths[i], widths[i+1])`` layers with ``act`` between them (and after the last if
    asked).
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if final_act or i < len(widths) - 2:
            layers.append(make_activation(act))
    return layers


def logistic(in_shape, n_outputs: int) -> nn.Sequential:
    """Multinomial (or binary, ``n_outputs=1``) logistic regression: ``Flatten`` + ``Linear``.

    Args:
        in_shape: input shape without the batch axis, e.g. ``(1, 8, 8)`` or ``(64,)``.
        n_outputs: number of logits.

    Returns:
        A module mapping ``[B, *in_shape]`` to logits ``[B, n_outputs]``.
    """
    in_shape = check_shape("in_shape", in_shape)
    check_int("n_outputs", n_outputs)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), n_outputs))


def _hidden_widths(width, depth: int) -> list[int]:
    if isinstance(width, (list, tuple)):
        if not width:
            raise ValueError("width must be a positive int or a non-empty list of positive ints, "
                             "got [].")
        return [check_int("width entries", w) for w in width]
    return [check_int("width", width)] * check_int("depth", depth, minimum=0)


def mlp(in_shape, n_outputs: int, width=128, depth: int = 2,
        activation: str = "relu") -> nn.Sequential:
    """Multilayer perceptron on flattened inputs.

    Args:
        in_shape: input shape without the batch axis.
        n_outputs: output dimension.
        width: hidden width (int, used ``depth`` times) or a list of hidden widths (``depth``
            ignored).
        depth: number of hidden layers when ``width`` is an int (0 gives logistic regression).
        activation: ``"relu"``, ``"gelu"``, ``"silu"``, ``"softplus"``, ``"tanh"`` or
            ``"sigmoid"``.

    Returns:
        A module mapping ``[B, *in_shape]`` to ``[B, n_outputs]`` (last layer linear).
    """
    in_shape = check_shape("in_shape", in_shape)
    check_int("n_outputs", n_outputs)
    check_choice("activation", activation, list(ACTIVATIONS))
    widths = [math.prod(in_shape), *_hidden_widths(width, depth), n_outputs]
    return nn.Sequential(nn.Flatten(), *_dense_stack(widths, activation, final_act=False))


class Autoencoder(nn.Module):
    """Deep autoencoder ``784-1000-500-250-30-250-500-1000-784`` (times ``width_mult``).

    Hidden layers use ``activation``; the 30-unit code layer and the output layer are linear, so
    the output is a real-valued reconstruction for the squared-error loss
    ``½ ||f − x||²`` of :class:`pbrf.tasks.Reconstruction`.
    """

    def __init__(self, in_features: int, widths: Sequence[int], act: str) -> None:
        super().__init__()
        self.in_features = in_features
        enc = [in_features, *widths]
        self.encoder = nn.Sequential(*_dense_stack(enc, act, final_act=False))
        self.decoder = nn.Sequential(*_dense_stack(enc[::-1], act, final_act=False))

    def forward(self, x):
        """``[B, 1, 28, 28]`` or ``[B, 784]`` → reconstruction ``[B, 784]``."""
        return self.decoder(self.encoder(x.flatten(1)))


def autoencoder(in_features: int = 784, width_mult: float = 1.0,
                activation: str = "tanh") -> Autoencoder:
    """The MNIST deep autoencoder of Hinton & Salakhutdinov (2006), Martens (2010), Bae et al.
    (2022).

    Args:
        in_features: flattened input size (784 for MNIST; inputs ``[B, 1, 28, 28]`` or ``[B,
            784]``).
        width_mult: multiplies the hidden widths (1000, 500, 250, 30).
        activation: hidden activation. ``"tanh"`` by default (zero-centred, trains well with
            SGD on the squared-error loss); the original papers used ``"sigmoid"``.

    Returns:
        An :class:`Autoencoder` mapping inputs to ``[B, in_features]``.
    """
    check_int("in_features", in_features)
    width_mult = check_width_mult(width_mult)
    check_choice("activation", activation, list(ACTIVATIONS))
    return Autoencoder(in_features, [scaled(w, width_mult) for w in AUTOENCODER_WIDTHS], activation)
