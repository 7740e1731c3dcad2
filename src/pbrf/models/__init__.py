"""The model zoo of Bae et al. (2022), in plain ``torch.nn``, ready for ``torch.func``.

Every model is a deterministic function ``f(θ, x)`` of its parameters: it works with
:func:`torch.func.functional_call`, with :func:`torch.func.vmap` over examples (per-example
gradients ``vmap(grad(loss))``) and over stacked parameter dicts (many copies of θ on one batch),
with forward-mode :func:`torch.func.jvp` (and forward-over-reverse), and in float64.

Usage::

    from pbrf.models import build, MODELS, count_parameters, reinitialize
    model = build("resnet20", seed=0, width_mult=1.0)         # 269,722 parameters
    fresh = reinitialize(model, seed=1)                       # deep copy, re-initialised

Models (``build(name, **kwargs)``; CIFAR-style defaults where an input is implied):

* ``logistic(in_shape, n_outputs)`` and ``mlp(in_shape, n_outputs, width=128, depth=2,
  activation="relu")`` flatten their input;
* ``lenet``, ``alexnet``, ``vgg13``, ``resnet20`` (``in_channels=3, n_classes=10``, ``width_mult``,
  ``activation="relu"``, ``pooling``: ``"max"`` for the first three, ``"avg"`` (the final global
  pooling, its only one) for ResNet-20; ``norm`` for VGG13 and ResNet-20; ``input_size=32`` for
  the first three);
* ``autoencoder(in_features=784, width_mult=1.0, activation="tanh")``, the MNIST
  784-1000-500-250-30 autoencoder with a mirrored decoder;
* ``transformer(vocab_size, seq_len, d_model=64, n_layers=2, n_heads=4, d_ff=4*d_model)``.

Normalisation. Batch normalisation in training mode makes an example's output depend on the
rest of its batch, which breaks per-example gradients and the response-function framework, and
its running statistics are buffers that a functional (parameter-dict) evaluation cannot update.
The convolutional networks with a ``norm`` argument therefore use ``norm="group"``
(``nn.GroupNorm``: per-example, no buffers) by default; ``norm="none"`` removes normalisation.
``norm="batch"`` (``nn.BatchNorm2d``) is accepted for users who want it, but note that pbrf
evaluates every model in eval mode (:class:`pbrf.Problem` keeps an eval-mode copy): the running
statistics are frozen and BN acts as a fixed affine map. With ``norm="batch"`` the trained
parameters θ^s (and the running statistics) must therefore come from outside pbrf's functional
trainer, e.g. from your own training loop.

Smooth variants. ``activation`` is one of ``"relu"``, ``"gelu"``, ``"silu"``, ``"softplus"``,
``"tanh"``, ``"sigmoid"``; ``pooling`` (convolutional networks) is ``"max"`` or ``"avg"``. The
defaults are the literal architectures, but ReLU and max-pooling make the training objective
non-smooth, and at a kink no gradient certificate of a PBRF optimum can hold; the CIFAR-10
presets therefore build ``activation="gelu", pooling="avg"`` (same parameters, same count), e.g.
``build("lenet", activation="gelu", pooling="avg")``.

Shortcuts. ResNet-20 uses option-A (parameter-free: subsample + zero-pad channels) shortcuts,
as in He et al. (2016)'s CIFAR experiments.

Initialisation. Every parameter is drawn by a submodule's ``reset_parameters()`` (PyTorch's
default initialisers), called in module order under a forked RNG seeded with ``seed``;
:func:`reinitialize` repeats that procedure on a deep copy.
"""

from .conv import alexnet, lenet, resnet20, vgg13
from .mlp import autoencoder, logistic, mlp
from .registry import DATA_ARGUMENTS, MODELS, build, variant_label
from .reinit import count_parameters, reinitialize
from .transformer import transformer

__all__ = [
    "MODELS",
    "DATA_ARGUMENTS",
    "build",
    "variant_label",
    "count_parameters",
    "reinitialize",
    "logistic",
    "mlp",
    "lenet",
    "alexnet",
    "vgg13",
    "resnet20",
    "autoencoder",
    "transformer",
]
