"""The model registry: :data:`MODELS` and :func:`build`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import nn

from .conv import alexnet, lenet, resnet20, vgg13
from .mlp import autoencoder, logistic, mlp
from .reinit import reset_parameters_
from .transformer import transformer

__all__ = ["MODELS", "DATA_ARGUMENTS", "ACTIVATION_LABELS", "build", "variant_label"]

#: Model name → builder function (read-only). ``build(name, **kwargs)`` calls
#: ``MODELS[name](**kwargs)``.
MODELS: MappingProxyType[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "logistic": logistic,
        "mlp": mlp,
        "lenet": lenet,
        "alexnet": alexnet,
        "vgg13": vgg13,
        "resnet20": resnet20,
        "autoencoder": autoencoder,
        "transformer": transformer,
    }
)

#: Model name → the builder's arguments that are facts of the dataset, not choices of the model
#: (the experiment config reads them off the data: ``in_shape``, ``n_outputs``, ``in_channels``,
#: ``n_classes``, ``input_size``, ``in_features``, ``vocab_size``, ``seq_len``; see
#: :func:`pbrf.experiment.run.inputs.dataset_facts`). Every other argument comes from ``[model]``.
DATA_ARGUMENTS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "logistic": ("in_shape", "n_outputs"),
        "mlp": ("in_shape", "n_outputs"),
        "lenet": ("in_channels", "n_classes", "input_size"),
        "alexnet": ("in_channels", "n_classes", "input_size"),
        "vgg13": ("in_channels", "n_classes", "input_size"),
        "resnet20": ("in_channels", "n_classes"),
        "autoencoder": ("in_features",),
        "transformer": ("vocab_size", "seq_len"),
    }
)


#: How :func:`variant_label` writes an activation.
ACTIVATION_LABELS = MappingProxyType({"relu": "ReLU", "gelu": "GELU", "silu": "SiLU",
                                      "softplus": "softplus", "tanh": "tanh", "sigmoid": "sigmoid"})


def variant_label(name: str, options: Mapping) -> str:
    """The activation and pooling of ``build(name, **options)``, for a report's label.

    The options given, else the builder's defaults: ``"GELU, avg-pool"`` for
    ``("lenet", {"activation": "gelu", "pooling": "avg"})``, ``"ReLU, max-pool"`` for
    ``("lenet", {})`` (the literal LeNet), ``"GELU"`` for an ``mlp`` with ``activation="gelu"``;
    ``""`` for a model with neither argument (``logistic``, ``transformer``) or an unknown name.
    """
    if name not in MODELS:
        return ""
    params = inspect.signature(MODELS[name]).parameters
    parts = []
    for key in ("activation", "pooling"):
        if key in params:
            value = options.get(key, params[key].default)
            parts.append(ACTIVATION_LABELS.get(value, str(value)) if key == "activation"
                         else f"{value}-pool")
    return ", ".join(parts)


def _check_kwargs(name: str, kwargs: dict) -> None:
    params = inspect.signature(MODELS[name]).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise ValueError(
            f"build('{name}'): unknown keyword argument {unknown[0]!r}; "
            f"'{name}' accepts {list(params)} (plus seed and dtype)."
        )
    missing = [
        k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs
    ]
    if missing:
        raise ValueError(
            f"build('{name}'): missing required keyword argument {missing[0]!r}; pass "
            f"{missing[0]}=... ."
        )


def build(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """Build a model of the zoo, deterministically initialised from ``seed``.

    Initialisation calls every submodule's ``reset_parameters()`` in module order under
    ``torch.random.fork_rng`` + ``torch.manual_seed(seed)``, in ``dtype`` — exactly what
    :func:`pbrf.models.reinitialize` does, so ``build(name, seed=s, **kw)`` equals
    ``reinitialize(build(name, seed=t, **kw), s)``. The global RNG state is not changed. The model
    is returned on the CPU, in training mode (``nn.Module``'s default).

    Args:
        name: one of :data:`MODELS` (``logistic``, ``mlp``, ``lenet``, ``alexnet``, ``vgg13``,
            ``resnet20``, ``autoencoder``, ``transformer``).
        seed: integer seed of the initialisation.
        dtype: floating-point dtype of the parameters (e.g. ``torch.float64``).
        **kwargs: the builder's arguments, e.g. ``in_shape=(1, 8, 8), n_outputs=10`` for ``mlp``;
            see the builder functions in :mod:`pbrf.models.mlp`, :mod:`pbrf.models.conv` and
            :mod:`pbrf.models.transformer`.

    Returns:
        The ``nn.Module``.

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`MODELS`), unknown or missing keyword
            arguments, or invalid values (the message names the argument).
    """
    if name not in MODELS:
        raise ValueError(f"build: unknown model {name!r}; choose one of {list(MODELS)}.")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"build: dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"build: seed must be an int, got {seed!r}.")
    _check_kwargs(name, kwargs)
    with torch.random.fork_rng(devices=[]):
        model = MODELS[name](**kwargs)
    return reset_parameters_(model.to(dtype), seed)
