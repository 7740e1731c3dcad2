"""``pbrf.load_run``: everything a finished (or set-up) run directory holds, rebuilt in memory.

For scoring another library's estimates against a run, or for running :mod:`pbrf.estimators` on
it. The model, data and removal sets are exactly those of the run: the same preprocessing, the
run's dtype and device, θ^s loaded from ``theta_s.safetensors``.

Conventions of every score compared with a run (see the README, "Scoring another library"):

* sign: positive = removing the set increases the test loss;
* scale: ``1/N`` — ``scores[t, k] = (1/N) ∇m_tᵀ C⁻¹ Σ_{i∈r_k} ∇L_i(θ^s)``;
* curvature: ``C = G + (wd + λ) I``; a library without a weight-decay term needs
  ``damping = wd + λ`` to use the same matrix;
* training gradients are those of the plain per-example loss ``L_i`` (no regulariser gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pbrf.experiment.config import ConfigError
from pbrf.experiment.run.arrays import run_arrays
from pbrf.experiment.run.chunks import influence_settings
from pbrf.experiment.run.context import read_config
from pbrf.experiment.run.inputs import (
    CHECKPOINT,
    TRAINING_CHECKPOINTS,
    build_model,
    build_problem,
    load_theta,
    prepare_inputs,
    test_data,
    train_data,
)
from pbrf.experiment.run.selection import groups_from_array
from pbrf.experiment.run.store import Store, run_command
from pbrf.problem import Params, Problem
from pbrf.tasks import Task
from pbrf.training import load_checkpoint

__all__ = ["Run", "load_run", "stored_responses"]


@dataclass
class Run:
    """A run directory in memory (see :func:`load_run`).

    Attributes:
        run_dir: the directory.
        config: its :class:`~pbrf.experiment.config.ExperimentConfig`.
        model: the network with θ^s loaded (run dtype and device, eval mode).
        task: the :mod:`pbrf.tasks` task.
        train: ``(x, y)`` training data as the run used it (``y`` is ``None`` for reconstruction).
        test: ``(x, y)`` of the run's test points, in the order of ``test_index``.
        test_index: indices of the test points in the dataset's test split.
        removals: the removal sets (lists of training indices), in the run's order.
        damping, weight_decay, curvature, n_train: the influence settings of the run.
        problem: the :class:`~pbrf.Problem` at θ^s in the run's dtype.
        influence_settings: keyword arguments with which ``pbrf.influence(run.measure_problem,
            run.test, run.removals, **run.influence_settings)`` reproduces the stored scores.
    """

    run_dir: Path
    config: object
    model: nn.Module
    task: Task
    train: tuple
    test: tuple
    test_index: np.ndarray
    removals: list[list[int]]
    damping: float
    weight_decay: float
    curvature: str
    n_train: int
    problem: Problem
    influence_settings: dict
    _measure: Problem | None = field(default=None, repr=False)

    @property
    def measure_problem(self) -> Problem:
        """The problem in float64, on which the run measured every response and its influence."""
        if self._measure is None:
            self._measure = self.problem.astype(torch.float64)
        return self._measure

    @property
    def n_test(self) -> int:
        """Number of test points."""
        return len(self.test_index)

    def responses(self, certified_only: bool = True) -> dict[str, np.ndarray]:
        """Stored Δm ``[n_test, n_removals]`` per response kind (see :func:`stored_responses`)."""
        return stored_responses(self.run_dir, certified_only)

    def training_checkpoints(self) -> list[dict]:
        """The base training's saved checkpoints (``train.checkpoints``): dicts ``{"step", "lr",
        "params"}`` in step order, parameters in the run's dtype on its device; ``[]`` if none.
        """
        folder = self.run_dir / TRAINING_CHECKPOINTS
        out = []
        for path in sorted(folder.glob("step_*.safetensors")) if folder.is_dir() else []:
            params, meta = load_checkpoint(path)
            out.append(
                {
                    "step": int(meta["step"]),
                    "lr": float(meta["lr"]),
                    "params": {
                        k: v.to(self.problem.dtype).to(self.problem.device)
                        for k, v in params.items()
                    },
                }
            )
        return sorted(out, key=lambda c: c["step"])


def stored_responses(run_dir: str | Path, certified_only: bool = True) -> dict[str, np.ndarray]:
    """Stored Δm ``[n_test, n_removals]`` per response kind of a finished run, plus
    ``"warm_paired"`` and ``"proximal_paired"`` (the paired chain) when stored.

    With ``certified_only`` the removals whose response diverged or (for an optimised kind) is
    not certified are NaN, as every statistic of the run leaves them out.
    """
    arrays = run_arrays(run_dir)
    out = {k: v.copy() for k, v in arrays["dm"].items()}
    n_chunks = math.ceil(len(arrays["groups"]) / arrays["config"].run.chunk_size)
    with Store(run_dir, readonly=True) as store:
        for kind in ("warm", "proximal"):
            if kind in out:
                extra = store.gather_extra(kind, n_chunks)
                if extra is not None:
                    out[f"{kind}_paired"] = extra
    if certified_only:  # both lists: a kind may have diverged removals and uncertified ones
        for kind, bad in [*arrays["diverged"].items(), *arrays["uncertified"].items()]:
            for name in (kind, f"{kind}_paired"):
                if name in out:
                    out[name][:, bad] = np.nan
    return out


def _model_with(model: nn.Module, params: Params) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model.eval()


def load_run(run_dir: str | Path, device: str | None = None) -> Run:
    """Rebuild a run directory: model at θ^s, task, data, test points, removal sets, settings.

    Args:
        run_dir: a directory written by ``pbrf run`` (set up at least: θ^s trained, test points
            and removal sets chosen).
        device: override the run's device (e.g. ``"cpu"`` for a run made on a GPU).

    Raises:
        ConfigError: not a run directory, or not set up yet (the message names the command).
        pbrf.data.DataError: the run's dataset is not available (``PBRF_DATA``).
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if device is not None:
        config = type(config).from_dict(
            {**config.to_dict(), "run": {**config.to_dict()["run"], "device": device}}
        )
    if not (run_dir / CHECKPOINT).is_file() or not (run_dir / "results.sqlite").is_file():
        raise ConfigError(
            f"{str(run_dir)!r} is not set up yet (no θ^s); finish it with `{run_command(run_dir)}`."
        )
    with Store(run_dir, readonly=True) as store:
        index, groups = store.get_array("test_index"), store.get_array("groups")
    if index is None or groups is None:
        raise ConfigError(
            f"{str(run_dir)!r} is not set up yet (no removal sets); finish it with "
            f"`{run_command(run_dir)}`."
        )
    inputs = prepare_inputs(config)
    problem = build_problem(inputs, load_theta(run_dir))
    model = _model_with(
        build_model(config, inputs.model_kwargs, seed=config.train.seed).to(config.run.device),
        problem.params,
    )
    x_train, y_train = train_data(inputs)
    dtype = problem.dtype
    as_run = lambda t: (
        None if t is None else (t.to(dtype) if t.is_floating_point() else t).to(problem.device)
    )
    x_test, y_test = test_data(inputs, index)
    return Run(
        run_dir=run_dir,
        config=config,
        model=model,
        task=problem.task,
        train=(as_run(x_train), as_run(y_train)),
        test=(as_run(x_test), as_run(y_test)),
        test_index=np.asarray(index),
        removals=groups_from_array(groups),
        damping=config.influence.damping,
        weight_decay=config.train.weight_decay,
        curvature=config.influence.curvature,
        n_train=problem.n_train,
        problem=problem,
        influence_settings=influence_settings(config),
    )
