"""Stage 1 of a run: the inputs (data, model, task) checked before anything is written, and θ^s.

:func:`prepare_inputs` loads the data, builds the model once (its size checked on the meta device
first) and checks everything that can be checked without writing a file; :func:`train_theta`
trains θ^s with the base recipe (or loads it from the run's checkpoint) and :func:`build_problem`
wraps it in a :class:`pbrf.Problem`.
"""

from __future__ import annotations

import errno
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

import pbrf
from pbrf import data, models, solvers
from pbrf.estimators import available_bytes
from pbrf.experiment.config import ConfigError, ExperimentConfig
from pbrf.experiment.run.selection import choose_test_points, random_groups
from pbrf.experiment.run.store import run_command
from pbrf.fileio import jsonable

log = logging.getLogger(__name__)

CHECKPOINT = "theta_s.safetensors"
#: Folder of the base training's intermediate checkpoints (``train.checkpoints``; for TracIn).
TRAINING_CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The data and the freshly initialised model of a config (nothing written yet).

    ``model`` is built once (seed ``train.seed``, on the run's device) and shared by base training
    and the problem at θ^s (both copy it; neither changes it).
    """

    config: ExperimentConfig
    dataset: Any
    task_name: str
    model_kwargs: dict
    model: Any = None

    def initial_model(self):
        """The model at its initialisation (``train.seed``) on the run's device."""
        if self.model is None:
            self.model = build_model(self.config, self.model_kwargs, seed=self.config.train.seed)
        return self.model.to(self.config.run.device)


def load_dataset(config: ExperimentConfig):
    """``pbrf.data.load`` with the config's data section (``DataError`` propagates)."""
    d = config.data
    return data.load(d.name, n_train=d.n_train, n_test=d.n_test, seed=d.seed, **d.options)


def dataset_facts(dataset) -> dict:
    """The facts of a dataset that model builders take (:data:`pbrf.models.DATA_ARGUMENTS`);
    ``None`` where the dataset has no such fact.
    """
    meta = dataset.meta
    shape = tuple(meta.get("input_shape") or tuple(dataset.x_train.shape[1:]))
    n_out = int(meta.get("n_outputs") or meta.get("n_classes") or 1)
    image = len(shape) == 3
    return {
        "in_shape": shape,
        "n_outputs": n_out,
        "in_channels": shape[0] if image else None,
        "n_classes": n_out,
        "input_size": shape[-1] if image else None,
        "in_features": int(math.prod(shape)),
        "vocab_size": meta.get("vocab_size"),
        "seq_len": meta.get("seq_len") or (shape[0] if len(shape) == 1 else None),
    }


def model_kwargs(config: ExperimentConfig, dataset) -> dict:
    """The builder's keyword arguments: the dataset facts it declares
    (:data:`pbrf.models.DATA_ARGUMENTS`), the rest from ``[model]``.
    """
    if config.model.name not in models.MODELS:
        raise ConfigError(f"model.name {config.model.name!r} is unknown; choose one of "
                          f"{', '.join(models.MODELS)}.")
    facts = dataset_facts(dataset)
    taken = {k: facts[k] for k in models.DATA_ARGUMENTS[config.model.name]}
    return {**{k: v for k, v in taken.items() if v is not None}, **config.model.options}


def build_model(config: ExperimentConfig, kwargs: dict, seed: int):
    """``pbrf.models.build`` in the config's dtype (on the CPU; moved later)."""
    return models.build(config.model.name, seed=seed, dtype=getattr(torch, config.run.dtype),
                        **kwargs)


def prepare_inputs(config: ExperimentConfig) -> Inputs:
    """Load the data and check everything that can be checked before a file is written.

    Checked here: the data, the model (its size against the memory, built on the meta device
    first), the task against the data and the model, the device, the sizes of test points and
    removal sets, the seeded choices, the solver options (names and values) and the curvature.
    Raises ConfigError / DataError; writes nothing.
    """
    dataset = load_dataset(config)
    task_name = config.task or dataset.task
    kwargs = model_kwargs(config, dataset)
    n_params = check_model_size(config, kwargs)
    try:
        model = build_model(config, kwargs, seed=config.train.seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    except (RuntimeError, MemoryError) as err:
        raise ConfigError(f"model: cannot build {config.model.name!r} {config.model.options} "
                          f"({_first_line(err)}); "
                          "make it smaller (e.g. a lower model.width).") from None
    if config.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is available; pass --device cpu.")
    check_task(config, dataset, task_name, model)
    check_sizes(config, len(dataset.x_train), len(dataset.x_test))
    # the seeded choices work (they are redone in setup)
    choose_test_points(config, len(dataset.x_test))
    if config.removals.strategy == "random":
        random_groups(config, len(dataset.x_train))
    check_solver_options(config, n_params)
    check_curvature(config)
    return Inputs(config, dataset, task_name, kwargs, model)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_model_size(config: ExperimentConfig, kwargs: dict) -> int:
    """Build the model on the meta device (no memory) and check its parameters fit; returns
    their count.
    """
    try:
        with torch.device("meta"):
            meta = build_model(config, kwargs, seed=config.train.seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    except (RuntimeError, MemoryError, OverflowError) as err:
        raise ConfigError(f"model: cannot build {config.model.name!r} {config.model.options} "
                          f"({_first_line(err)}); "
                          "make it smaller (e.g. a lower model.width).") from None
    n_params = sum(p.numel() for p in meta.parameters())
    need = n_params * getattr(torch, config.run.dtype).itemsize
    available = available_bytes(torch.device("cpu"))
    if available is not None and need > available:
        raise ConfigError(
            f"model: {config.model.name!r} {config.model.options} has {n_params:,} parameters "
            f"({need / 2**30:.3g} GiB "
            f"in {config.run.dtype}), more than the {available / 2**30:.3g} GiB of memory "
            "available; make it smaller "
            "(e.g. a lower model.width)."
        )
    return n_params


def check_task(config: ExperimentConfig, dataset, task_name: str, model) -> None:
    """The task must fit the data and the model: a Problem on two training and two test examples."""
    try:
        task = pbrf.tasks.get_task(task_name)
    except ValueError as err:
        raise ConfigError(f"task: {err}") from None
    y_train = None if task_name == "reconstruction" else dataset.y_train[:2]
    y_test = None if task_name == "reconstruction" else dataset.y_test[:2]
    try:
        prob = pbrf.Problem(model, task, train=(dataset.x_train[:2], y_train))
        prob.prepare((dataset.x_test[:2], y_test), "test")
    except (TypeError, ValueError, RuntimeError) as err:
        fix = (
            f"omit task to use the data's own ({dataset.task!r})"
            if config.task
            else "set task to match the data"
        )
        raise ConfigError(
            f"task {task_name!r} does not fit data {config.data.name!r} with model "
            f"{config.model.name!r}: {_first_line(err)}; {fix}."
        ) from None


def check_solver_options(config: ExperimentConfig, n_params: int | None = None) -> None:
    """Solver options must be arguments of the named solver with meaningful values
    (``pbrf.solvers``);
    the dense ``exact`` solver must fit ``max_params``.
    """
    inf = config.influence
    for field_, key, solver, options in (
        ("solver_options", "solver", inf.solver, inf.solver_options),
        ("accurate_options", "accurate_solver", inf.accurate_solver, inf.accurate_options),
    ):
        try:
            solvers.check_options(solver, options)
        except ValueError as err:
            raise ConfigError(f"influence.{field_}: {err}") from None
        if solver == "exact" and n_params is not None:
            limit = options.get("max_params", solvers.EXACT_MAX_PARAMS)
            if n_params > limit:
                raise ConfigError(
                    f"influence.{key}='exact' forms the dense {n_params}x{n_params} curvature, "
                    f"above max_params={limit}; "
                    f'use influence.{key}="cg", or raise influence.{field_}.max_params if it '
                    "fits in memory."
                )


def check_curvature(config: ExperimentConfig) -> None:
    """An undamped Hessian (damping 0, weight decay 0) is singular or indefinite for a network:
    refused.
    """
    inf = config.influence
    if inf.curvature == "hessian" and inf.damping == 0 and config.train.weight_decay == 0:
        raise ConfigError(
            'influence.curvature="hessian" with influence.damping=0 and train.weight_decay=0 is '
            "singular or "
            "indefinite; set influence.damping > 0 (e.g. --set influence.damping=1e-3) or use "
            'influence.curvature="ggn".'
        )


def check_sizes(config: ExperimentConfig, n_train: int, n_test: int) -> None:
    """Test points and removal sets must fit the data (checked before anything is written)."""
    rc = config.removals
    if rc.n_test_points > n_test:
        raise ConfigError(
            f"removals.n_test_points={rc.n_test_points} exceeds the {n_test} test "
            "examples; lower it."
        )
    k = rc.resolved_group_size(n_train)
    if k == 1 and rc.n_removals > n_train:
        raise ConfigError(
            f"removals.n_removals={rc.n_removals} exceeds the {n_train} training points; lower it."
        )
    if k >= n_train:
        raise ConfigError(
            f"removal sets of {k} points leave no training data ({n_train} points); "
            "lower the group size."
        )


def make_recipe(fields: dict, seed: int):
    """A ``pbrf.Recipe`` (seeded) or, for ``optimizer = "newton"``, a ``pbrf.NewtonRecipe``."""
    if fields.get("optimizer") == "newton":
        return pbrf.NewtonRecipe(**{k: v for k, v in fields.items() if k != "optimizer"})
    return pbrf.Recipe(**{**fields, "seed": seed})


def train_theta(inputs: Inputs, run_dir: Path, progress: bool = True) -> dict:
    """θ^s: loaded from the run's checkpoint, else trained with the base recipe and saved.

    Raises:
        ConfigError: base training diverged (nothing is saved, so the corrected command replaces
            the run directory without ``--overwrite``), or the stored checkpoint is unreadable or
            not finite (the fix is ``--overwrite``).
    """
    config = inputs.config
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        task = pbrf.tasks.get_task(inputs.task_name)
        log.info("training theta_s (%s)", config.train)
        recipe = make_recipe(config.train.recipe_dict(), config.train.seed)
        result = pbrf.train(
            inputs.initial_model(),
            task,
            train=train_data(inputs),
            recipe=recipe,
            weight_decay=config.train.weight_decay,
            progress=progress,
            checkpoints=config.train.checkpoints,
        )
        _check_trained(config, result)
        try:
            for ck in result.checkpoints:  # before θ^s: a run killed in between retrains them
                pbrf.save_checkpoint(
                    Path(run_dir) / TRAINING_CHECKPOINTS / f"step_{ck['step']:07d}.safetensors",
                    {k: v.detach().cpu() for k, v in ck["params"].items()},
                    {"step": ck["step"], "lr": ck["lr"]},
                )
            pbrf.save_checkpoint(
                path,
                {k: v.detach().cpu() for k, v in result.params.items()},
                {"config": config.name, "diagnostics": jsonable(result.diagnostics or {})},
            )
        except SafetensorError as err:  # the disk refused the write (full, ulimit -f, read-only)
            raise OSError(errno.EIO, _first_line(err), str(path)) from None
    return load_theta(run_dir)


def load_theta(run_dir: str | Path) -> dict:
    """θ^s of a run directory, read back: the one reader of ``theta_s.safetensors``.

    Raises:
        ConfigError: it is unreadable (truncated, garbage) or not finite; the message names the
            file and the fix (start the run again with ``--overwrite``).
    """
    path = Path(run_dir) / CHECKPOINT
    fix = f"pass --overwrite to start this run again (`{run_command(run_dir, overwrite=True)}`)."
    try:
        params, _ = pbrf.load_checkpoint(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{str(path)!r} is unreadable ({_first_line(err)}); {fix}") from None
    if not all(bool(torch.isfinite(v).all()) for v in params.values()):
        raise ConfigError(f"{str(path)!r} holds non-finite parameters; {fix}")
    return params


def _check_trained(config: ExperimentConfig, result) -> None:
    """Refuse a diverged base training before anything of it is saved."""
    diag = result.diagnostics or {}
    finite = all(bool(torch.isfinite(v).all()) for v in result.params.values())
    if finite and not diag.get("diverged"):
        return
    tr = config.train
    raise ConfigError(
        f"base training diverged (objective {diag.get('objective', float('nan')):.3g} after "
        f"{diag.get('steps', '?')} steps "
        f"with train.lr={tr.lr:g}); lower train.lr (e.g. --set train.lr={tr.lr / 10:g}) and run "
        "again "
        "(nothing was computed, so the corrected command replaces this run directory)."
    )


def train_data(inputs: Inputs) -> tuple:
    """``(x, y)`` of the training set (``y`` is ``None`` for reconstruction)."""
    ds = inputs.dataset
    y = None if inputs.task_name == "reconstruction" else ds.y_train
    return ds.x_train, y


def build_problem(inputs: Inputs, params: dict):
    """The :class:`pbrf.Problem` at θ^s on the run's device."""
    config = inputs.config
    params = {k: v.to(config.run.device) for k, v in params.items()}
    task = pbrf.tasks.get_task(inputs.task_name)
    return pbrf.Problem(
        inputs.initial_model(),
        task,
        train=train_data(inputs),
        weight_decay=config.train.weight_decay,
        params=params,
    )


def test_data(inputs: Inputs, index: np.ndarray) -> tuple:
    """``(x, y)`` of the test points ``index`` (``y`` is ``None`` for reconstruction)."""
    ds = inputs.dataset
    idx = torch.as_tensor(index, dtype=torch.long)
    y = None if inputs.task_name == "reconstruction" else ds.y_test[idx]
    return ds.x_test[idx], y
