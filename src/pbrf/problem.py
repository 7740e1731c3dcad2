"""Problem: a model, a task, the training data and the trained parameters θ^s.

The user's model is never mutated: :class:`Problem` keeps a private copy of the module in eval
mode and calls it through :func:`torch.func.functional_call` with parameter dicts. Batch
normalisation is therefore evaluated with its stored running statistics (a fixed affine map),
which makes every example's output a function of θ alone — the setting in which per-example
gradients, the Gauss–Newton matrix and the response functions are defined.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .tasks import Task

__all__ = ["Problem", "Params"]

Params = dict[str, Tensor]


def _check_params_dict(params, where: str) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{where}: parameters must be a dict name -> Tensor, got {type(params).__name__}. "
            "Use dict(model.named_parameters()) instead of a list."
        )


class Problem:
    """A trained model on its training set, in the form every pbrf computation needs.

    Args:
        model: the network; its current parameters are θ^s (copied, never modified).
        task: a :mod:`pbrf.tasks` instance defining the per-example loss.
        train: ``(x, y)`` training inputs and targets (``y`` may be ``None`` for reconstruction).
        weight_decay: ``wd`` in ``J(θ) = (1/N) Σ L_i + (wd/2) ||θ||²``.
        params: optional dict overriding θ^s (e.g. loaded from a checkpoint).
        chunk_size: examples per chunk in data passes (bounds memory).
        recipe: the :class:`~pbrf.Recipe` that trained θ^s (the default for warm and cold starts).

    A Problem is treated as immutable (nothing pbrf does writes to it; the curvature operators
    own their factorisation caches, see :class:`~pbrf.CurvatureOperator`).

    Attributes:
        params: θ^s as a dict of detached tensors.
        theta: θ^s as one flat vector of length ``n_params``.
        x, t: training inputs and targets on the model's device/dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: tuple[Tensor, Tensor | None],
        weight_decay: float = 0.0,
        params: Mapping[str, Tensor] | None = None,
        chunk_size: int = 512,
        recipe=None,
    ) -> None:
        _check_arguments(model, task, train, weight_decay, chunk_size)
        self.task = task
        self.recipe = recipe
        self.weight_decay = float(weight_decay)
        self.chunk_size = chunk_size
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        own = _own_params(self.model, params)
        self.params: Params = own
        self.buffers: Params = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        ref = next(iter(own.values()))
        self.dtype, self.device = ref.dtype, ref.device
        self.names = list(own)
        self.shapes = [own[n].shape for n in self.names]
        self.numels = [own[n].numel() for n in self.names]
        self.n_params = sum(self.numels)
        self._set_train(*train)
        self._check_shapes()

    def _set_train(self, x, y) -> None:
        """The training inputs ``x`` and targets ``t`` on the parameters' device and dtype."""
        self.x = self._as_input(x, "train x")
        y = None if y is None else self._as_target(y, "train y")
        if y is not None and y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"Problem: train=(x, y) have {self.x.shape[0]} and {y.shape[0]} rows; "
                "they must have one row per training example."
            )
        self.t = self.task.targets(self.x, y)
        self.n_train = self.x.shape[0]
        if self.n_train == 0:
            raise ValueError("Problem: the training set is empty.")

    # ------------------------------------------------------------------ data helpers
    def _as_input(self, x, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def _as_target(self, y, what: str) -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(y).__name__}.")
        y = y.to(self.device)
        return y.to(self.dtype) if y.is_floating_point() else y

    def prepare(
        self, data: tuple[Tensor, Tensor | None], what: str = "test"
    ) -> tuple[Tensor, Tensor]:
        """Validate and move ``(x, y)`` to the problem's device/dtype; returns ``(x, targets)``."""
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(f"{what} must be a pair (x, y) of tensors.")
        x = self._as_input(data[0], f"{what} x")
        y = None if data[1] is None else self._as_target(data[1], f"{what} y")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{what}=(x, y) have {x.shape[0]} and {y.shape[0]} rows; they must match."
            )
        t = self.task.targets(x, y)
        self._check_shapes(x[:1], t[:1], what)
        return x, t

    def _check_shapes(
        self, x: Tensor | None = None, t: Tensor | None = None, what: str = "train"
    ) -> None:
        x = self.x[:1] if x is None else x
        t = self.t[:1] if t is None else t
        try:
            out = self.outputs(self.params, x)
            loss = self.task.loss(out, t)
        except Exception as err:  # noqa: BLE001 - re-raised with a clearer message
            raise ValueError(
                f"Problem: the model's output on {what} x (input shape {tuple(x.shape[1:])}) does "
                "not fit "
                f"the targets (shape {tuple(t.shape[1:])}) for {self.task!r}: {err}"
            ) from err
        if loss.shape != (x.shape[0],):
            raise ValueError(
                f"Problem: {self.task!r} returned a loss of shape {tuple(loss.shape)} for "
                f"{x.shape[0]} "
                "examples; the model output and target shapes do not match."
            )

    def chunks(self, n: int | None = None, chunk_size: int | None = None) -> Iterator[slice]:
        """Slices over ``range(n)`` (default the training set) of at most ``chunk_size``."""
        n = self.n_train if n is None else n
        cs = chunk_size or self.chunk_size
        for start in range(0, n, cs):
            yield slice(start, min(start + cs, n))

    def astype(self, dtype: torch.dtype) -> "Problem":
        """This problem in another floating dtype (model, θ^s and data cast; ``self`` if equal).

        Used to measure responses in float64 when the model was trained in float32.
        """
        if dtype == self.dtype:
            return self
        model = copy.deepcopy(self.model).to(dtype)
        params = {k: v.to(dtype) for k, v in self.params.items()}
        return Problem(
            model,
            self.task,
            (self.x, self.t),
            weight_decay=self.weight_decay,
            params=params,
            chunk_size=self.chunk_size,
            recipe=self.recipe,
        )

    # ------------------------------------------------------------------ parameters
    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """Concatenate a (possibly batched, leading dims ``*B``) parameter dict into ``[*B,
        n_params]``.
        """
        _check_params_dict(params, "flatten")
        lead = params[self.names[0]].shape[: params[self.names[0]].dim() - len(self.shapes[0])]
        return torch.cat([params[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, vec: Tensor) -> Params:
        """Inverse of :meth:`flatten`: ``[*B, n_params]`` → dict of ``[*B, *shape]`` tensors."""
        if vec.shape[-1] != self.n_params:
            raise ValueError(
                f"unflatten: expected last dimension {self.n_params}, got {tuple(vec.shape)}."
            )
        lead = vec.shape[:-1]
        parts = torch.split(vec, self.numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)}

    @property
    def theta(self) -> Tensor:
        """θ^s as a flat vector ``[n_params]``."""
        return self.flatten(self.params)

    # ------------------------------------------------------------------ functions of θ
    def outputs(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Network outputs ``f(θ, x)`` through ``functional_call`` (buffers fixed)."""
        return torch.func.functional_call(self.model, ({**self.buffers, **params},), (x,))

    def outputs_flat(self, theta: Tensor, x: Tensor) -> Tensor:
        """``f(θ, x)`` for a flat parameter vector."""
        return self.outputs(self.unflatten(theta), x)

    def losses(self, params: Mapping[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        """Per-example losses ``[B]``."""
        return self.task.loss(self.outputs(params, x), t)

    def objective(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``J(θ) = (1/N) Σ_i L_i + (wd/2)||θ||²`` over the whole training set (chunked)."""
        params = self.params if params is None else params
        total = sum(self.losses(params, self.x[s], self.t[s]).sum() for s in self.chunks())
        sq = sum(p.pow(2).sum() for p in params.values())
        return total / self.n_train + 0.5 * self.weight_decay * sq

    @torch.no_grad()
    def train_outputs(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Outputs on the whole training set ``[N, ...]`` (chunked)."""
        params = self.params if params is None else params
        return torch.cat([self.outputs(params, self.x[s]) for s in self.chunks()])

    def __repr__(self) -> str:
        return (
            f"Problem({type(self.model).__name__}, {self.task!r}, n_train={self.n_train}, "
            f"n_params={self.n_params}, weight_decay={self.weight_decay}, dtype={self.dtype}, "
            f"device={self.device})"
        )


def _check_arguments(model, task, train, weight_decay, chunk_size) -> None:
    """The argument checks of :class:`Problem` (one line each)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Problem: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    if not isinstance(task, Task):
        raise TypeError(
            "Problem: task must be a pbrf.tasks.Task instance such as "
            "pbrf.tasks.Classification(), "
            f"got {task!r}."
        )
    if not (isinstance(train, (tuple, list)) and len(train) == 2):
        raise TypeError("Problem: train must be a pair (x, y) of tensors.")
    if not (
        isinstance(weight_decay, (int, float))
        and weight_decay >= 0
        and math.isfinite(weight_decay)
    ):
        raise ValueError(
            f"Problem: weight_decay must be a finite number >= 0, got {weight_decay!r}."
        )
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"Problem: chunk_size must be a positive int, got {chunk_size!r}.")


def _own_params(model: nn.Module, params: Mapping[str, Tensor] | None) -> Params:
    """θ^s: the model's parameters (detached copies), or ``params`` cast to them."""
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    if params is not None:
        _check_params_dict(params, "Problem(params=...)")
        missing = set(own) - set(params)
        if missing:
            raise ValueError(f"Problem(params=...): missing parameters {sorted(missing)[:5]}.")
        own = {n: params[n].detach().clone().to(own[n]) for n in own}
    if not own:
        raise ValueError("Problem: the model has no parameters.")
    return own
