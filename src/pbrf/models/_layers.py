"""Small building blocks shared by the model zoo: argument checks, activations, pooling,
normalisation.

Everything here is plain :mod:`torch.nn` so that models work with
:func:`torch.func.functional_call`, :func:`torch.func.vmap` and forward-mode AD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

#: Activation name → module class. ``relu`` has a kink at 0; the others are smooth.
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus,
               "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
#: Pooling kinds of the convolutional networks: ``max`` (non-smooth) or ``avg`` (linear).
POOLINGS = ("max", "avg")
NORMS = ("group", "none", "batch")


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def check_width_mult(value) -> float:
    """Validate the channel/width multiplier (a finite number > 0)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"width_mult must be a finite number > 0 (e.g. 0.5), got {value!r}.")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def check_shape(name: str, value) -> tuple[int, ...]:
    """Validate an input shape (a non-empty tuple/list of positive ints, without the batch axis)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{name} must be a tuple of positive ints without the batch axis, e.g. "
                         f"(1, 8, 8), got {value!r}.")
    for v in value:
        check_int(f"{name} entries", v)
    return tuple(value)


def scaled(n: int, width_mult: float) -> int:
    """``max(1, round(n * width_mult))``: a layer width scaled by ``width_mult``."""
    return max(1, int(round(n * width_mult)))


def make_activation(name: str) -> nn.Module:
    """A fresh activation module, one of :data:`ACTIVATIONS` (``"relu"``, ``"gelu"``, ``"silu"``,
    ``"softplus"``, ``"tanh"``, ``"sigmoid"``).
    """
    check_choice("activation", name, list(ACTIVATIONS))
    return ACTIVATIONS[name]()


def make_pool(kind: str, kernel: int, stride: int | None = None, padding: int = 0) -> nn.Module:
    """A 2-d pooling layer: ``"max"`` (``nn.MaxPool2d``) or ``"avg"`` (``nn.AvgPool2d``, which
    averages only the real pixels of a padded window: ``count_include_pad=False``). Both give the
    same output size.
    """
    check_choice("pooling", kind, POOLINGS)
    if kind == "max":
        return nn.MaxPool2d(kernel, stride, padding=padding)
    return nn.AvgPool2d(kernel, stride, padding=padding, count_include_pad=False)


def group_count(channels: int) -> int:
    """Number of GroupNorm groups for ``channels``.

    The largest divisor of ``channels`` not exceeding ``min(32, channels // 4)`` (at least 1):
    at most 32 groups (Wu & He, 2018) and at least 4 channels per group where possible.
    """
    cap = max(1, min(32, channels // 4))
    return max(d for d in range(1, cap + 1) if channels % d == 0)


def norm2d(kind: str, channels: int) -> nn.Module:
    """A 2-d normalisation layer: ``"group"`` (GroupNorm), ``"batch"`` (BatchNorm2d) or
    ``"none"``.
    """
    check_choice("norm", kind, NORMS)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def conv_bn_act(c_in: int, c_out: int, norm: str, kernel: int = 3, stride: int = 1,
                activation: str = "relu") -> list[nn.Module]:
    """``[Conv2d, norm, activation]`` with "same" padding; the conv has a bias only when
    ``norm="none"``.
    """
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none")
    return [conv, norm2d(norm, c_out), make_activation(activation)]
