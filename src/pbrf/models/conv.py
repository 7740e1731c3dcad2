"""Convolutional networks for CIFAR-sized images: LeNet-5, small AlexNet, VGG13, ResNet-20.

Normalisation (``norm=``) is GroupNorm by default; see :mod:`pbrf.models` for why. Convolutions
that are followed by a normalisation layer carry no bias (the norm's affine shift replaces it);
with ``norm="none"`` they do.

Every builder takes ``activation`` (``"relu"``, ``"gelu"``, ``"silu"``, ``"softplus"``, also
``"tanh"``, ``"sigmoid"``) and ``pooling`` (``"max"`` or ``"avg"``). The defaults (ReLU; max-pooling
in LeNet, AlexNet and VGG13, the global average pooling of ResNet-20) are the literal
architectures. ReLU and max-pooling are not differentiable everywhere, so a PBRF optimum at a kink
has no gradient certificate; a smooth variant (e.g. ``activation="gelu", pooling="avg"``, what the
CIFAR-10 presets use) has the same parameters and makes every certificate meaningful. Neither
option changes the parameter count.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import (
    ACTIVATIONS,
    NORMS,
    POOLINGS,
    check_choice,
    check_int,
    check_width_mult,
    conv_bn_act,
    make_activation,
    make_pool,
    scaled,
)

__all__ = ["lenet", "alexnet", "vgg13", "resnet20", "VGG13_CFG", "ResNet20", "BasicBlock"]

#: Channel configuration of VGG13 ("M" = 2x2 pooling, max by default).
VGG13_CFG = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _check_common(in_channels: int, n_classes: int, width_mult: float, activation: str,
                  pooling: str) -> float:
    check_int("in_channels", in_channels)
    check_int("n_classes", n_classes)
    check_choice("activation", activation, list(ACTIVATIONS))
    check_choice("pooling", pooling, POOLINGS)
    return check_width_mult(width_mult)


def _spatial_after(name: str, input_size: int, steps) -> int:
    """Apply ``steps`` (callables ``int -> int``) to ``input_size``; error if the map vanishes."""
    check_int("input_size", input_size)
    size = input_size
    for step in steps:
        size = step(size)
        if size < 1:
            raise ValueError(f"{name}: input_size={input_size} is too small for this architecture.")
    return size


def lenet(in_channels: int = 3, n_classes: int = 10, input_size: int = 32,
          width_mult: float = 1.0, activation: str = "relu", pooling: str = "max") -> nn.Sequential:
    """LeNet-5 (LeCun et al., 1998), with ReLU and max-pooling by default.

    ``conv5x5(6) → pool → conv5x5(16) → pool → FC(120) → FC(84) → FC(n_classes)``, widths times
    ``width_mult``. For inputs smaller than 32x32 (e.g. 28x28 MNIST) the first convolution is
    zero-padded by 2, as in the original, so both 28 and 32 give a 5x5 final map.

    Args:
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        n_classes: number of logits.
        input_size: input height = width.
        width_mult: multiplies every channel count and hidden width.
        activation: after every convolution and hidden FC layer: ``"relu"`` (default),
            ``"gelu"``, ``"silu"``, ``"softplus"``, ``"tanh"`` or ``"sigmoid"``.
        pooling: the two 2x2 pools: ``"max"`` (default) or ``"avg"``.
    """
    width_mult = _check_common(in_channels, n_classes, width_mult, activation, pooling)
    pad = 2 if check_int("input_size", input_size) < 32 else 0
    size = _spatial_after("lenet", input_size,
                          [lambda s: s + 2 * pad - 4, lambda s: s // 2, lambda s: s - 4,
                           lambda s: s // 2])
    c1, c2, h1, h2 = (scaled(n, width_mult) for n in (6, 16, 120, 84))
    act = lambda: make_activation(activation)  # noqa: E731 - a fresh module per use
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=pad), act(), make_pool(pooling, 2),
        nn.Conv2d(c1, c2, 5), act(), make_pool(pooling, 2),
        nn.Flatten(),
        nn.Linear(c2 * size * size, h1), act(),
        nn.Linear(h1, h2), act(),
        nn.Linear(h2, n_classes),
    )  # fmt: skip


def alexnet(in_channels: int = 3, n_classes: int = 10, input_size: int = 32,
            width_mult: float = 1.0, activation: str = "relu",
            pooling: str = "max") -> nn.Sequential:
    """The small CIFAR AlexNet of Zhang et al. (2017), without local response normalisation.

    ``conv5x5(64) → act → pool3x3/2 → conv5x5(64) → act → pool3x3/2 → FC(384) → FC(192) →
    FC(n_classes)``, widths times ``width_mult`` (about 1.76 M parameters on 3x32x32 inputs), with
    ReLU and max-pooling by default.

    Args:
        in_channels: input channels.
        n_classes: number of logits.
        input_size: input height = width (32 for CIFAR).
        width_mult: multiplies every channel count and hidden width.
        activation: after every convolution and hidden FC layer: ``"relu"`` (default),
            ``"gelu"``, ``"silu"``, ``"softplus"``, ``"tanh"`` or ``"sigmoid"``.
        pooling: the two 3x3/2 pools: ``"max"`` (default) or ``"avg"`` (over the window's real
            pixels at the border).
    """
    width_mult = _check_common(in_channels, n_classes, width_mult, activation, pooling)
    pool = lambda s: (s - 1) // 2 + 1  # noqa: E731 - a 3x3 pool, stride 2, padding 1
    size = _spatial_after("alexnet", input_size, [pool, pool])
    c, h1, h2 = (scaled(n, width_mult) for n in (64, 384, 192))
    act = lambda: make_activation(activation)  # noqa: E731 - a fresh module per use
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 5, padding=2), act(), make_pool(pooling, 3, 2, padding=1),
        nn.Conv2d(c, c, 5, padding=2), act(), make_pool(pooling, 3, 2, padding=1),
        nn.Flatten(),
        nn.Linear(c * size * size, h1), act(),
        nn.Linear(h1, h2), act(),
        nn.Linear(h2, n_classes),
    )  # fmt: skip


def vgg13(
    in_channels: int = 3, n_classes: int = 10, input_size: int = 32, width_mult: float = 1.0,
        norm: str = "group", activation: str = "relu", pooling: str = "max"
) -> nn.Sequential:
    """CIFAR VGG13 (Simonyan & Zisserman, 2015): ten 3x3 convolutions, five 2x2 pools (max by
    default), one FC layer.

    Args:
        in_channels: input channels.
        n_classes: number of logits.
        input_size: input height = width; must be at least 32 (five 2x2 pools).
        width_mult: multiplies every channel count.
        norm: ``"group"`` (default), ``"none"`` or ``"batch"``; applied after every convolution.
        activation: after every normalisation: ``"relu"`` (default), ``"gelu"``, ``"silu"``,
            ``"softplus"``, ``"tanh"`` or ``"sigmoid"``.
        pooling: the five 2x2 pools: ``"max"`` (default) or ``"avg"``.
    """
    width_mult = _check_common(in_channels, n_classes, width_mult, activation, pooling)
    check_choice("norm", norm, NORMS)
    size = _spatial_after("vgg13", input_size, [lambda s: s // 2] * 5)
    layers: list[nn.Module] = []
    c_in = in_channels
    for item in VGG13_CFG:
        if item == "M":
            layers.append(make_pool(pooling, 2))
        else:
            c_out = scaled(item, width_mult)
            layers += conv_bn_act(c_in, c_out, norm, activation=activation)
            c_in = c_out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * size * size, n_classes))


class BasicBlock(nn.Module):
    """ResNet basic block ``x + F(x)`` with an option-A (parameter-free) shortcut.

    When the block downsamples, the shortcut takes every second pixel and zero-pads the new
    channels (He et al., 2016, CIFAR experiments), so ResNet-20 keeps its 0.27 M parameters.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str,
                 activation: str = "relu") -> None:
        super().__init__()
        self.conv1, self.norm1, self.act1 = conv_bn_act(c_in, c_out, norm, stride=stride,
                                                        activation=activation)
        self.conv2, self.norm2, self.act2 = conv_bn_act(c_out, c_out, norm, activation=activation)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: Tensor) -> Tensor:
        """Identity, or subsample by ``stride`` and zero-pad channels up to ``c_out`` (option A)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """The residual block on ``x`` ``[B, C, H, W]``."""
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al., 2016): a 3x3 stem, 3 stages of 3 basic blocks, global
    pooling (``"avg"``, the original, or ``"max"``), FC.
    """

    def __init__(self, in_channels: int, n_classes: int, widths: tuple[int, int, int],
                 norm: str, activation: str = "relu", pooling: str = "avg") -> None:
        super().__init__()
        self.pooling = check_choice("pooling", pooling, POOLINGS)
        self.stem = nn.Sequential(*conv_bn_act(in_channels, widths[0], norm,
                                               activation=activation))
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, norm, activation))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → logits ``[B, n_classes]``."""
        out = self.blocks(self.stem(x))
        pooled = out.mean(dim=(2, 3)) if self.pooling == "avg" else out.amax(dim=(2, 3))
        return self.fc(pooled)


def resnet20(in_channels: int = 3, n_classes: int = 10, width_mult: float = 1.0,
             norm: str = "group", activation: str = "relu", pooling: str = "avg") -> ResNet20:
    """CIFAR ResNet-20 with option-A shortcuts, 16/32/64 channels times ``width_mult``.

    About 0.27 M parameters at ``width_mult=1``: 269,722 with GroupNorm or BatchNorm, 269,034
    with ``norm="none"`` (the often-quoted 272,474 counts option-B projection shortcuts). Any
    input size works (global pooling).

    Args:
        in_channels: input channels.
        n_classes: number of logits.
        width_mult: multiplies the channel counts 16, 32, 64.
        norm: ``"group"`` (default), ``"none"`` or ``"batch"``.
        activation: after every normalisation and every residual sum: ``"relu"`` (default),
            ``"gelu"``, ``"silu"``, ``"softplus"``, ``"tanh"`` or ``"sigmoid"``.
        pooling: the final global pooling, its only pooling: ``"avg"`` (default, the original)
            or ``"max"``.
    """
    width_mult = _check_common(in_channels, n_classes, width_mult, activation, pooling)
    check_choice("norm", norm, NORMS)
    widths = tuple(scaled(c, width_mult) for c in (16, 32, 64))
    return ResNet20(in_channels, n_classes, widths, norm, activation, pooling)
