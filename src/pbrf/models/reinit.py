"""Deterministic (re-)initialisation and parameter counting.

Initialisation is defined as: call ``reset_parameters()`` of every submodule that has one, in
``model.modules()`` order, under :func:`torch.random.fork_rng` with ``torch.manual_seed(seed)``.
:func:`pbrf.models.build` uses exactly this procedure, so ``build(name, seed=s, **kw)`` and
``reinitialize(build(name, seed=t, **kw), s)`` give identical parameters, and the global RNG state
is never changed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["reinitialize", "reset_parameters_", "count_parameters"]


def _check_resettable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        owns = next(module.parameters(recurse=False), None) is not None
        if owns and not callable(getattr(module, "reset_parameters", None)):
            label = name or "<root>"
            raise ValueError(
                f"reinitialize: module '{label}' ({type(module).__name__}) owns parameters but has "
                "no "
                "reset_parameters() method; add one (re-drawing its own parameters) or move its "
                "parameters into a submodule that has one (e.g. nn.Linear, nn.Embedding)."
            )


def _devices(model: nn.Module) -> list[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def reset_parameters_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``model`` in place (see module docstring); returns ``model``.

    Raises:
        ValueError: if ``seed`` is not an int, or a module owns parameters directly but has no
            ``reset_parameters`` (the message names the module).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    _check_resettable(model)
    with torch.random.fork_rng(devices=_devices(model)):
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
    return model


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` re-initialised deterministically from ``seed``.

    Every submodule's ``reset_parameters()`` is called in ``model.modules()`` order under
    ``torch.random.fork_rng`` + ``torch.manual_seed(seed)`` (the global RNG is untouched). Buffers
    reset by those methods (e.g. BatchNorm running statistics) are reset too. The training flag,
    dtype and device are kept. ``model`` itself is not modified.

    Args:
        model: any ``nn.Module``.
        seed: integer seed.

    Returns:
        The re-initialised copy.

    Raises:
        ValueError: if a module owns parameters directly but has no ``reset_parameters``.
    """
    _check_resettable(model)
    return reset_parameters_(copy.deepcopy(model), seed)


def count_parameters(model: nn.Module) -> int:
    """Total number of scalar parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
