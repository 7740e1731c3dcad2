"""The experiment pipeline behind ``pbrf run``.

Stages (each resumable; see :mod:`pbrf.experiment.store`):

1. :func:`prepare_inputs` — load the data and build the model (config errors surface here, before
   anything is written);
2. :func:`open_run` — create or resume the run directory (a different config is refused);
3. :func:`setup` — train θ^s (cached as ``theta_s.safetensors``), choose the test points and the
   removal sets (random or top-|influence|, single points or groups), store them;
4. :func:`compute_chunk` — for one chunk of removal sets and one kind, Δm ``[n_test, k]``,
   Δf ``[k, n_test, *out]`` and per-removal diagnostics; run by an executor, stored by the driver;
5. :func:`finish` — gather the arrays, :func:`analysis.summarise`, :func:`report.write_report`.

Determinism: every random choice is seeded from the config (removal seed, train seed) and the
chunk index through :func:`chunk_seed`, never from global RNG state, so a resumed run and an
uninterrupted one end with the same numbers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pbrf import kinds

from . import analysis
from .config import ConfigError, ExperimentConfig
from .store import CONFIG_NAME, ChunkResult, Store, atomic_write_text, check_run_dir

__all__ = [
    "Context",
    "prepare_inputs",
    "open_run",
    "setup",
    "load_context",
    "compute_chunk",
    "chunk_seed",
    "pending_tasks",
    "finish",
    "run_experiment",
    "lock_path",
]

log = logging.getLogger(__name__)

CHECKPOINT = "theta_s.safetensors"
#: Folder of the base training's intermediate checkpoints (``train.checkpoints``; for TracIn).
TRAINING_CHECKPOINTS = "checkpoints"


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------- seeds
def chunk_seed(base: int, chunk: int, stream: int = 0) -> int:
    """A 31-bit seed derived from ``(base, chunk, stream)`` only (no global RNG state)."""
    return int(np.random.SeedSequence([int(base) & 0xFFFFFFFF, int(chunk), int(stream)]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The data and the freshly initialised model of a config (nothing written yet)."""

    config: ExperimentConfig
    dataset: Any
    task_name: str
    model_kwargs: dict


def load_dataset(config: ExperimentConfig):
    """``pbrf.data.load`` with the config's data section (``DataError`` propagates)."""
    from pbrf import data

    d = config.data
    return data.load(d.name, n_train=d.n_train, n_test=d.n_test, seed=d.seed, **d.options)


def _inferred_model_kwargs(dataset, signature: inspect.Signature) -> dict:
    """Shape arguments of the model builders, read off the dataset."""
    meta = dataset.meta
    shape = tuple(meta.get("input_shape") or tuple(dataset.x_train.shape[1:]))
    n_out = meta.get("n_outputs") or meta.get("n_classes") or 1
    guess = {
        "in_shape": shape,
        "n_outputs": int(n_out),
        "in_channels": shape[0] if len(shape) == 3 else None,
        "n_classes": int(n_out),
        "input_size": shape[-1] if len(shape) == 3 else None,
        "in_features": int(math.prod(shape)),
        "vocab_size": meta.get("vocab_size"),
        "seq_len": meta.get("seq_len") or (shape[0] if len(shape) == 1 else None),
    }
    return {k: v for k, v in guess.items() if k in signature.parameters and v is not None}


def model_kwargs(config: ExperimentConfig, dataset) -> dict:
    """The builder's keyword arguments: shapes from the data, the rest from ``[model]``."""
    from pbrf import models

    if config.model.name not in models.MODELS:
        raise ConfigError(f"model.name {config.model.name!r} is unknown; choose one of {', '.join(models.MODELS)}.")
    sig = inspect.signature(models.MODELS[config.model.name])
    return {**_inferred_model_kwargs(dataset, sig), **config.model.options}


def build_model(config: ExperimentConfig, kwargs: dict, seed: int):
    """``pbrf.models.build`` in the config's dtype (on the CPU; moved later)."""
    from pbrf import models

    torch = _torch()
    return models.build(config.model.name, seed=seed, dtype=getattr(torch, config.run.dtype), **kwargs)


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
        raise ConfigError(f"model: cannot build {config.model.name!r} {config.model.options} ({_first_line(err)}); "
                          "make it smaller (e.g. a lower model.width).") from None
    if config.run.device.startswith("cuda") and not _torch().cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is available; pass --device cpu.")
    check_task(config, dataset, task_name, model)
    check_sizes(config, len(dataset.x_train), len(dataset.x_test))
    choose_test_points(config, len(dataset.x_test))  # the seeded choices work (they are redone in setup)
    if config.removals.strategy == "random":
        random_groups(config, len(dataset.x_train))
    check_solver_options(config, n_params)
    check_curvature(config)
    return Inputs(config, dataset, task_name, kwargs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_model_size(config: ExperimentConfig, kwargs: dict) -> int:
    """Build the model on the meta device (no memory) and check its parameters fit; returns their count."""
    torch = _torch()
    try:
        with torch.device("meta"):
            meta = build_model(config, kwargs, seed=config.train.seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    except (RuntimeError, MemoryError, OverflowError) as err:
        raise ConfigError(f"model: cannot build {config.model.name!r} {config.model.options} ({_first_line(err)}); "
                          "make it smaller (e.g. a lower model.width).") from None
    n_params = sum(p.numel() for p in meta.parameters())
    need = n_params * getattr(torch, config.run.dtype).itemsize
    available = _available_memory()
    if available is not None and need > available:
        raise ConfigError(
            f"model: {config.model.name!r} {config.model.options} has {n_params:,} parameters ({need / 2**30:.3g} GiB "
            f"in {config.run.dtype}), more than the {available / 2**30:.3g} GiB of memory available; make it smaller "
            "(e.g. a lower model.width)."
        )
    return n_params


def check_task(config: ExperimentConfig, dataset, task_name: str, model) -> None:
    """The task must fit the data and the model: a Problem on two training and two test examples."""
    import pbrf

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
        fix = f"omit task to use the data's own ({dataset.task!r})" if config.task else "set task to match the data"
        raise ConfigError(f"task {task_name!r} does not fit data {config.data.name!r} with model "
                          f"{config.model.name!r}: {_first_line(err)}; {fix}.") from None


def check_solver_options(config: ExperimentConfig, n_params: int | None = None) -> None:
    """Solver options must be arguments of the named solver with meaningful values (``pbrf.solvers``);
    the dense ``exact`` solver must fit ``max_params``."""
    from pbrf import solvers

    inf = config.influence
    for field_, key, solver, options in (("solver_options", "solver", inf.solver, inf.solver_options),
                                         ("accurate_options", "accurate_solver", inf.accurate_solver, inf.accurate_options)):
        params = inspect.signature(solvers.SOLVERS[solver]).parameters
        valid = [n for n in list(params)[2:]]
        bad = sorted(set(options) - set(valid))
        if bad:
            raise ConfigError(f"influence.{field_}: {bad[0]!r} is not an option of solver {solver!r}; it takes {', '.join(valid)}.")
        try:
            solvers.check_options(solver, options)
        except ValueError as err:
            raise ConfigError(f"influence.{field_}: {err}") from None
        if solver == "exact" and n_params is not None:
            limit = options.get("max_params", params["max_params"].default)
            if n_params > limit:
                raise ConfigError(
                    f"influence.{key}='exact' forms the dense {n_params}x{n_params} curvature, above max_params={limit}; "
                    f"use influence.{key}=\"cg\", or raise influence.{field_}.max_params if it fits in memory."
                )


def check_curvature(config: ExperimentConfig) -> None:
    """An undamped Hessian (damping 0, weight decay 0) is singular or indefinite for a network: refused."""
    inf = config.influence
    if inf.curvature == "hessian" and inf.damping == 0 and config.train.weight_decay == 0:
        raise ConfigError(
            "influence.curvature=\"hessian\" with influence.damping=0 and train.weight_decay=0 is singular or "
            "indefinite; set influence.damping > 0 (e.g. --set influence.damping=1e-3) or use influence.curvature=\"ggn\"."
        )


def check_sizes(config: ExperimentConfig, n_train: int, n_test: int) -> None:
    """Test points and removal sets must fit the data (checked before anything is written)."""
    rc = config.removals
    if rc.n_test_points > n_test:
        raise ConfigError(f"removals.n_test_points={rc.n_test_points} exceeds the {n_test} test examples; lower it.")
    k = rc.resolved_group_size(n_train)
    if k == 1 and rc.n_removals > n_train:
        raise ConfigError(f"removals.n_removals={rc.n_removals} exceeds the {n_train} training points; lower it.")
    if k >= n_train:
        raise ConfigError(f"removal sets of {k} points leave no training data ({n_train} points); lower the group size.")


# ---------------------------------------------------------------------------- run directory
def open_run(config: ExperimentConfig, run_dir: Path, overwrite: bool = False) -> str:
    """Create, resume or overwrite ``run_dir``; writes ``config.json`` first. Returns the mode.

    Call it holding the run's lock (:func:`_exclusive`, as :func:`run_experiment` does): the
    decision is made here, under the lock, so that no other process can be using the directory.
    An overwritten directory is first renamed aside and then deleted, so a kill in between leaves
    either the old run or the new one, never a half-deleted directory.
    """
    run_dir = Path(run_dir)
    mode = check_run_dir(run_dir, config, overwrite)
    _remove_trash(run_dir)
    if mode == "overwrite":
        trash = run_dir.parent / f".{run_dir.name}.deleting-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(run_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode != "resume":
        atomic_write_text(run_dir / CONFIG_NAME, config.to_json() + "\n")
    return mode


def _remove_trash(run_dir: Path) -> None:
    """Delete what an overwrite killed mid-way left aside (``.NAME.deleting-*`` beside the run)."""
    if run_dir.parent.is_dir():
        for trash in run_dir.parent.glob(f".{run_dir.name}.deleting-*"):
            shutil.rmtree(trash, ignore_errors=True)


def read_config(run_dir: Path) -> ExperimentConfig:
    """The config stored in a run directory."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a pbrf run directory (no {CONFIG_NAME}); run `pbrf run` first.")
    return ExperimentConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------- context
@dataclass
class Context:
    """Everything a chunk computation needs, rebuilt identically from the run directory."""

    config: ExperimentConfig
    run_dir: Path
    inputs: Inputs
    problem: Any
    test: tuple
    test_index: np.ndarray
    groups: list[list[int]]
    train_scores: np.ndarray | None = None
    _measure: Any = None

    @property
    def measure_problem(self):
        """The problem in float64: responses are optimised (PBRF, proximal, linearised, influence)
        and every Δm, Bregman value and certificate is evaluated in float64, whatever the
        training dtype."""
        if self._measure is None:
            self._measure = self.problem.astype(_torch().float64)
        return self._measure

    @property
    def n_chunks(self) -> int:
        """Number of chunks of ``run.chunk_size`` removal sets."""
        return math.ceil(len(self.groups) / self.config.run.chunk_size)

    def chunk_groups(self, chunk: int) -> list[list[int]]:
        """The removal sets (index lists) of one chunk."""
        cs = self.config.run.chunk_size
        return self.groups[chunk * cs : (chunk + 1) * cs]

    def removals(self, chunk: int):
        """The chunk's removal sets in the form ``pbrf`` takes (ints for single points)."""
        groups = self.chunk_groups(chunk)
        if all(len(g) == 1 for g in groups):
            return _torch().tensor([g[0] for g in groups], dtype=_torch().long)
        return groups


def _recipe(fields: dict, seed: int):
    """A ``pbrf.Recipe`` (seeded) or, for ``optimizer = "newton"``, a ``pbrf.NewtonRecipe``."""
    import pbrf

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
    import pbrf
    from safetensors import SafetensorError

    config = inputs.config
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        model = build_model(config, inputs.model_kwargs, seed=config.train.seed)
        task = pbrf.tasks.get_task(inputs.task_name)
        log.info("training theta_s (%s)", config.train)
        result = pbrf.train(
            model.to(config.run.device), task, train=_train_data(inputs), recipe=_recipe(config.train.recipe_dict(), config.train.seed),
            weight_decay=config.train.weight_decay, progress=progress, checkpoints=config.train.checkpoints,
        )
        _check_trained(config, result)
        try:
            for ck in result.checkpoints:  # before θ^s: a run killed in between retrains and rewrites them
                pbrf.save_checkpoint(Path(run_dir) / TRAINING_CHECKPOINTS / f"step_{ck['step']:07d}.safetensors",
                                     {k: v.detach().cpu() for k, v in ck["params"].items()},
                                     {"step": ck["step"], "lr": ck["lr"]})
            pbrf.save_checkpoint(path, {k: v.detach().cpu() for k, v in result.params.items()},
                                 {"config": config.name, "diagnostics": _plain(result.diagnostics or {})})
        except SafetensorError as err:  # the disk refused the write (full, ulimit -f, read-only)
            raise OSError(errno.EIO, _first_line(err), str(path)) from None
    try:
        params, _ = pbrf.load_checkpoint(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{str(path)!r} is unreadable ({_first_line(err)}); pass --overwrite to start this run again.") from None
    if not all(bool(_torch().isfinite(v).all()) for v in params.values()):
        raise ConfigError(f"{str(path)!r} holds non-finite parameters; pass --overwrite to start this run again.")
    return params


def _check_trained(config: ExperimentConfig, result) -> None:
    """Refuse a diverged base training before anything of it is saved."""
    diag = result.diagnostics or {}
    finite = all(bool(_torch().isfinite(v).all()) for v in result.params.values())
    if finite and not diag.get("diverged"):
        return
    tr = config.train
    raise ConfigError(
        f"base training diverged (objective {diag.get('objective', float('nan')):.3g} after {diag.get('steps', '?')} steps "
        f"with train.lr={tr.lr:g}); lower train.lr (e.g. --set train.lr={tr.lr / 10:g}) and run again "
        "(nothing was computed, so the corrected command replaces this run directory)."
    )


def _plain(d: dict) -> dict:
    """A JSON-safe copy of a flat diagnostics dict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, str)) or v is None:
            out[k] = v
        elif hasattr(v, "__float__") and getattr(v, "numel", lambda: 1)() == 1:
            out[k] = float(v)
        else:
            out[k] = str(v)
    return out


def _train_data(inputs: Inputs) -> tuple:
    ds = inputs.dataset
    y = None if inputs.task_name == "reconstruction" else ds.y_train
    return ds.x_train, y


def build_problem(inputs: Inputs, params: dict):
    """The :class:`pbrf.Problem` at θ^s on the run's device."""
    import pbrf

    config = inputs.config
    model = build_model(config, inputs.model_kwargs, seed=config.train.seed).to(config.run.device)
    params = {k: v.to(config.run.device) for k, v in params.items()}
    task = pbrf.tasks.get_task(inputs.task_name)
    return pbrf.Problem(model, task, train=_train_data(inputs), weight_decay=config.train.weight_decay, params=params)


def choose_test_points(config: ExperimentConfig, n_available: int) -> np.ndarray:
    """Sorted indices of ``n_test_points`` test examples, seeded by ``removals.seed``."""
    n = config.removals.n_test_points
    if n > n_available:
        raise ConfigError(f"removals.n_test_points={n} exceeds the {n_available} test examples; lower it.")
    rng = np.random.default_rng([config.removals.seed, 1])
    return np.sort(rng.choice(n_available, size=n, replace=False))


def _test_data(inputs: Inputs, index: np.ndarray) -> tuple:
    ds = inputs.dataset
    idx = _torch().as_tensor(index, dtype=_torch().long)
    y = None if inputs.task_name == "reconstruction" else ds.y_test[idx]
    return ds.x_test[idx], y


def random_groups(config: ExperimentConfig, n_train: int) -> list[list[int]]:
    """``n_removals`` random removal sets of the configured size, seeded by ``removals.seed``."""
    rc = config.removals
    k = rc.resolved_group_size(n_train)
    rng = np.random.default_rng([rc.seed, 2])
    if k == 1:
        if rc.n_removals > n_train:
            raise ConfigError(f"removals.n_removals={rc.n_removals} exceeds the {n_train} training points; lower it.")
        return [[int(i)] for i in rng.choice(n_train, size=rc.n_removals, replace=False)]
    return [sorted(int(i) for i in rng.choice(n_train, size=k, replace=False)) for _ in range(rc.n_removals)]


def top_influence_groups(config: ExperimentConfig, scores: np.ndarray) -> list[list[int]]:
    """Removal sets with the largest influence (``scores`` ``[n_test, N]`` over all training points).

    Single points: the ``n_removals`` points of largest mean |score| over the test points.
    Groups of ``k``: removal ``r`` takes test point ``j = r mod n_test`` and, alternately, the
    ``k`` most positive or most negative scores on it (later rounds take the next ``k``).
    """
    rc = config.removals
    n_test, n_train = scores.shape
    k = rc.resolved_group_size(n_train)
    if k == 1:
        if rc.n_removals > n_train:
            raise ConfigError(f"removals.n_removals={rc.n_removals} exceeds the {n_train} training points; lower it.")
        order = np.argsort(-np.abs(scores).mean(axis=0), kind="stable")
        return [[int(i)] for i in order[: rc.n_removals]]
    groups = []
    for r in range(rc.n_removals):
        j, rnd = r % n_test, r // n_test
        sign = 1.0 if rnd % 2 == 0 else -1.0
        block = rnd // 2
        order = np.argsort(-sign * scores[j], kind="stable")
        start = (block * k) % max(1, n_train - k + 1)
        groups.append(sorted(int(i) for i in order[start : start + k]))
    return groups


def all_train_scores(problem, config: ExperimentConfig, test: tuple) -> np.ndarray:
    """Influence of every single training point on every test point ``[n_test, N]`` (practical solver).

    ``scores[t, i] = (1/N) ∇m_tᵀ C⁻¹ ∇L_i``; positive means removing point ``i`` increases test loss ``t``.
    """
    import pbrf

    inf = config.influence
    options = _solver_options(inf.solver, inf.solver_options, config.removals.seed)
    scores = pbrf.influence(problem, test=test, removals=_torch().arange(problem.n_train), damping=inf.damping,
                            solver=inf.solver, curvature=inf.curvature, solver_options=options)
    return scores.detach().cpu().double().numpy()


def _solver_options(solver: str, options: dict, seed: int) -> dict:
    out = dict(options)
    if solver == "lissa":
        out.setdefault("seed", int(seed))
    return out


def _groups_array(groups: list[list[int]]) -> np.ndarray:
    width = max(len(g) for g in groups)
    arr = np.full((len(groups), width), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        arr[i, : len(g)] = g
    return arr


def _groups_from_array(arr: np.ndarray) -> list[list[int]]:
    return [[int(i) for i in row if i >= 0] for row in arr]


def setup(inputs: Inputs, run_dir: Path, store: Store, progress: bool = True) -> Context:
    """Train (or load) θ^s, choose (or load) test points and removal sets; returns the context."""
    config = inputs.config
    params = train_theta(inputs, run_dir, progress)
    problem = build_problem(inputs, params)
    test_index = store.get_array("test_index")
    if test_index is None:
        test_index = choose_test_points(config, len(inputs.dataset.x_test))
    test = _test_data(inputs, test_index)
    groups_arr, scores = store.get_array("groups"), store.get_array("train_scores")
    if groups_arr is None:
        if config.removals.strategy == "top-influence":
            scores = all_train_scores(problem, config, test)
            groups = top_influence_groups(config, scores)
        else:
            groups = random_groups(config, problem.n_train)
        arrays = {"test_index": test_index, "groups": _groups_array(groups)}
        if scores is not None:
            arrays["train_scores"] = scores
        store.put_arrays(arrays)
        store.set_meta("n_train", int(problem.n_train))
        groups_arr = arrays["groups"]
    return Context(config, Path(run_dir), inputs, problem, test, test_index, _groups_from_array(groups_arr), scores)


_CONTEXTS: dict[str, Context] = {}


def load_context(run_dir: str | Path) -> Context:
    """Rebuild the context of a prepared run directory (config + checkpoint + stored choices).

    Used by executors' workers; cached per process and run directory.
    """
    key = str(Path(run_dir).resolve())
    if key not in _CONTEXTS:
        config = read_config(run_dir)
        inputs = prepare_inputs(config)
        with Store(run_dir, readonly=True) as store:
            index, groups = store.get_array("test_index"), store.get_array("groups")
        if index is None or groups is None:
            raise RuntimeError(f"{run_dir}: the run is not set up yet (no test points / removal sets stored).")
        import pbrf

        params, _ = pbrf.load_checkpoint(Path(run_dir) / CHECKPOINT)
        problem = build_problem(inputs, params)
        _CONTEXTS[key] = Context(config, Path(run_dir), inputs, problem, _test_data(inputs, index), index,
                                 _groups_from_array(groups))
    return _CONTEXTS[key]


# ---------------------------------------------------------------------------- chunks
def pending_tasks(ctx: Context, done: set[tuple[str, int]]) -> list[tuple[int, str]]:
    """(chunk, kind) pairs still to compute, chunk-major, influence first within a chunk."""
    kinds = ctx.config.responses.ordered_kinds()
    return [(c, k) for c in range(ctx.n_chunks) for k in kinds if (k, c) not in done]


def response_seed(config: ExperimentConfig) -> int:
    """The one seed of every response optimisation in a run (minibatch order, LiSSA sampling):
    identical for every removal whatever the chunk, so results do not depend on ``run.chunk_size``."""
    return chunk_seed(config.train.seed, 0)


def _config_recipe(config: ExperimentConfig, section: str) -> dict:
    """The recipe fields of the ``[train]`` or ``[responses]`` section."""
    return (config.train if section == "train" else config.responses).recipe_dict()


def _respond_kwargs(ctx: Context, kind: str) -> dict:
    """The keyword arguments of ``pbrf.respond`` for one kind (one seed for the whole run), read
    off the kind's record: its config recipe and the kind-specific arguments it takes."""
    config, inf, resp = ctx.config, ctx.config.influence, ctx.config.responses
    spec = kinds.get(kind)
    kw: dict[str, Any] = {"damping": inf.damping, "rho_threshold": resp.rho_threshold, "curvature": inf.curvature}
    if spec.config_recipe:
        kw["recipe"] = _recipe(_config_recipe(config, spec.config_recipe), response_seed(config))
    args = set(spec.arguments)
    if "solver" in args:
        kw.update(solver=inf.accurate_solver, solver_options=dict(inf.accurate_options))
    if "paired" in args:
        kw["paired"] = resp.paired
    if "seeds" in args:
        kw["seeds"] = tuple(resp.cold_seeds)
    if "model_init" in args:
        inputs = ctx.inputs
        kw["model_init"] = lambda s: build_model(config, inputs.model_kwargs, seed=int(s)).to(config.run.device)
    return kw


def _respond(ctx: Context, chunk: int, kind: str):
    import pbrf

    kw = _respond_kwargs(ctx, kind)
    prob = ctx.measure_problem if kinds.get(kind).float64 else ctx.problem
    resp = pbrf.respond(prob, kind, removals=ctx.removals(chunk), progress=False, **kw)
    return resp.to(ctx.measure_problem)


def _influence_chunk(ctx: Context, chunk: int) -> tuple[np.ndarray, list[dict]]:
    """The run's influence estimate: :func:`pbrf.influence` (one solve per test point, practical
    solver) on the float64 problem; ``pbrf.influence`` with the run's settings reproduces it."""
    import pbrf

    scores, info = pbrf.influence_with_info(ctx.measure_problem, test=ctx.test, removals=ctx.removals(chunk),
                                            **influence_settings(ctx.config))
    row = {k: v for k, v in info.solve.to_dict().items() if k != "extra"}
    row["residual_flag"] = bool(not (row["residual"] < 1.0))
    n = len(ctx.chunk_groups(chunk))
    return scores.detach().cpu().double().numpy(), [dict(row) for _ in range(n)]


def influence_settings(config: ExperimentConfig) -> dict:
    """The keyword arguments with which ``pbrf.influence(problem_float64, test, removals, **kw)``
    reproduces the run's stored influence scores."""
    inf = config.influence
    return {"damping": inf.damping, "solver": inf.solver, "curvature": inf.curvature,
            "solver_options": _solver_options(inf.solver, inf.solver_options, response_seed(config))}


def compute_chunk(ctx: Context, chunk: int, kind: str) -> ChunkResult:
    """Δm ``[n_test, k]``, Δf ``[k, n_test, *out]`` and diagnostics of one kind on one chunk.

    ``extra``: linearized — the actual change ``m(θ^s + Δθ) − m(θ^s)``; warm and proximal (paired)
    — Δm against the no-removal continuation of the same recipe and seed.
    """
    start = time.perf_counter()
    spec = kinds.get(kind)
    if spec.method == "estimate":
        dm, diagnostics = _influence_chunk(ctx, chunk)
        df = _influence_output_change(ctx, chunk)
        return ChunkResult(kind, chunk, dm, df, diagnostics, time.perf_counter() - start, None)
    resp = _respond(ctx, chunk, kind)
    dm = resp.loss_change(test=ctx.test).detach().cpu().double().numpy()
    df = resp.output_change(test=ctx.test).detach().cpu().float().numpy()
    extra = None
    if resp.first_order:  # also the actual change m(θ^s + Δθ) − m(θ^s), DESIGN §1
        extra = resp.loss_change(test=ctx.test, first_order=False).detach().cpu().double().numpy()
    elif resp.paired_reference is not None:
        extra = resp.loss_change(test=ctx.test, paired=True).detach().cpu().double().numpy()
    diagnostics = [dict(d) for d in (resp.diagnostics or [])]
    if spec.method == "linear":
        for d in diagnostics:
            d["residual_flag"] = bool(not (d.get("residual", math.nan) < 1.0))
    return ChunkResult(kind, chunk, dm, df, diagnostics, time.perf_counter() - start, extra)


def _influence_output_change(ctx: Context, chunk: int) -> np.ndarray:
    """Δf of the influence estimate, ``J Δθ`` with the practical solver (one solve per removal)."""
    import pbrf

    resp = pbrf.respond(ctx.measure_problem, "linearized", removals=ctx.removals(chunk), progress=False,
                        **influence_settings(ctx.config))
    return resp.output_change(test=ctx.test).detach().cpu().float().numpy()


# ---------------------------------------------------------------------------- summary and report
def gather(store: Store, ctx: Context) -> tuple[dict, dict, dict]:
    """All stored arrays: ``dm``, ``df`` and diagnostics per kind."""
    dm, df, diags = {}, {}, {}
    for kind in ctx.config.responses.ordered_kinds():
        dm[kind], df[kind], diags[kind] = store.gather(kind, ctx.n_chunks)
    return dm, df, diags


_TIMING_KEYS = ("seconds", "time", "wall_seconds")


def diagnostics_summary(diags: dict[str, list[dict]]) -> dict:
    """Per kind: number of removals, diverged count, mean of numeric diagnostics."""
    out = {}
    for kind, rows in diags.items():
        entry: dict[str, Any] = {"n": len(rows)}
        entry["diverged"] = int(sum(bool(r.get("diverged")) for r in rows))
        entry["diverged_removals"] = [i for i, r in enumerate(rows) if r.get("diverged")]  # excluded by summarise
        keys = sorted({k for r in rows for k, v in r.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _TIMING_KEYS})
        for k in keys:
            vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                entry[f"mean_{k}"] = float(np.mean(vals))
        out[kind] = entry
    return out


def objective_defined(config: ExperimentConfig, kind: str) -> bool:
    """Whether ``kind``'s response is defined as the solution of an objective (PBRF, proximal,
    full-batch warm start): its uncertified pairs are left out of every statistic. Responses
    defined by a training recipe (cold start, minibatch warm start) are kept whatever their ρ."""
    spec = kinds.get(kind)
    if spec.certificate == "exclude_if_full_batch":
        section = config.train if spec.config_recipe == "train" else config.responses
        return section.recipe_dict().get("batch_size") is None
    return spec.certificate == "exclude"


def exclusions(config: ExperimentConfig, diags: dict[str, list[dict]], certified_key: str = "certified") -> dict:
    """Which removals stay in the statistics: ``{"keep": bool [K], "by_kind": {kind: {...}}}``.

    A removal is left out when any kind diverged on it, or when an objective-defined kind is not
    certified there (``certified_key``: ``"certified"``, or ``"paired_certified"`` for the paired
    chain). The counts say how many and why.
    """
    n = len(next(iter(diags.values())))
    keep = np.ones(n, dtype=bool)
    by_kind, own = {}, {}
    for kind, rows in diags.items():
        diverged = np.array([bool(r.get("diverged")) for r in rows], dtype=bool)
        entry = {"diverged": int(diverged.sum())}
        keep &= ~diverged
        own[kind] = ~diverged
        if "rho" in (rows[0] if rows else {}):
            key = certified_key if certified_key in rows[0] else "certified"
            cert = np.array([bool(r.get(key)) for r in rows], dtype=bool)
            entry["certified"] = int(cert.sum())
            rhos = np.array([float(r["rho"]) if r.get("rho") is not None else np.inf for r in rows])
            entry["max_rho"] = float(rhos.max()) if rhos.size else None
            entry["median_rho"] = float(np.median(rhos)) if rhos.size else None
            entry["excludes_uncertified"] = objective_defined(config, kind)
            if objective_defined(config, kind):
                entry["uncertified"] = int((~cert & ~diverged).sum())
                keep &= cert
                own[kind] &= cert
        by_kind[kind] = entry
    return {"keep": keep, "own": own, "by_kind": by_kind, "n_removals": n, "n_kept": int(keep.sum()),
            "threshold": config.responses.rho_threshold}


def _own_correlations(dm: dict, own: dict) -> dict:
    """Each kind's correlation with the influence estimate over the removals where that kind (and
    the influence estimate) is certified and finite — a kind that cannot be certified elsewhere
    does not take the others' correlations with it. (The gaps use the joint set.)"""
    base = own.get("influence", np.ones(dm["influence"].shape[1], dtype=bool))
    scores = np.where(base[None, :], dm["influence"], np.nan)
    return analysis.correlations(scores, {k: np.where(own[k][None, :], v, np.nan) for k, v in dm.items()})


def _masked(dm: dict, keep: np.ndarray) -> dict:
    return {k: np.where(keep[None, :], v, np.nan) for k, v in dm.items()}


def _solver_report(diags: dict[str, list[dict]]) -> dict:
    """Largest relative residual of the practical (influence) and accurate (linearized) solves."""
    out = {}
    for kind, label in (("influence", "practical"), ("linearized", "accurate")):
        rows = diags.get(kind) or []
        res = [float(r["residual"]) for r in rows if isinstance(r.get("residual"), (int, float))]
        if rows:
            worst = max(res) if res else math.nan
            out[label] = {"kind": kind, "solver": rows[0].get("solver"), "max_residual": worst,
                          "max_iterations": max(int(r.get("iterations", 0)) for r in rows),
                          "flagged": bool(not worst < 1.0)}
    return out


def finish(ctx: Context, store: Store, title: str | None = None) -> dict:
    """Summarise the stored arrays and write the report (report.md, figures, summary.json).

    Statistics use the certified, non-diverged removals only (see :func:`exclusions`): the gaps
    over the removals where every kind is, each correlation over those where its kind is; the
    summary says how many were left out and why. The paired chain (warm start and proximal against
    their no-removal continuation) is summarised next to the paper-literal one.
    """
    from . import report

    dm, df, diags = gather(store, ctx)
    excl = exclusions(ctx.config, diags)
    keep, own = excl.pop("keep"), excl.pop("own")
    summary = analysis.summarise(_masked(dm, keep), {k: v for k, v in df.items() if v is not None},
                                 diagnostics=diagnostics_summary(diags))
    summary["correlations"] = _own_correlations(dm, own)
    excl["excluded_removals"] = [int(i) for i in np.flatnonzero(~keep)]
    summary["certificates"] = excl
    summary["solvers"] = _solver_report(diags)
    paired = {k: store.gather_extra(k, ctx.n_chunks) for k in dm if kinds.get(k).continuation}
    paired = {k: v for k, v in paired.items() if v is not None}
    if paired:
        pexcl = exclusions(ctx.config, diags, certified_key="paired_certified")
        pkeep = pexcl.pop("keep")
        pexcl.pop("own")
        summary["paired"] = analysis.paired_chain(_masked(dm, pkeep), _masked(paired, pkeep))
        summary["paired"]["certificates"] = pexcl
    summary["experiment"] = _experiment_info(ctx, store)
    summary["theta_s"] = theta_s_quality(ctx)
    from .lds_stage import lds_summary

    lds_info = lds_summary(ctx, store)
    if lds_info is not None:
        summary["lds"] = lds_info
    actual = store.gather_extra("linearized", ctx.n_chunks) if "linearized" in dm else None
    if actual is not None:
        summary["linearized_actual"] = {
            "description": "m(θ^s + Δθ_IF) − m(θ^s) with the accurate solver, vs the first-order Δm",
            "pearson_vs_first_order": analysis.pearson(actual, dm["linearized"]),
            "pearson_vs_influence": analysis.pearson(actual, dm["influence"]),
            "mean_abs_difference": float(np.mean(np.abs(actual - dm["linearized"]))),
        }
    report.write_report(ctx.run_dir, summary, _masked(dm, keep), ctx.config.to_dict(),
                        title=title or f"pbrf run: {ctx.config.name}")
    _write_inputs_for_evaluate(ctx, dm["influence"])
    return summary


def _write_inputs_for_evaluate(ctx: Context, scores: np.ndarray) -> None:
    """What another library needs to produce comparable scores: test points, removal sets, our scores."""
    _save_npy(ctx.run_dir / "influence_scores.npy", scores)
    _save_npy(ctx.run_dir / "test_index.npy", np.asarray(ctx.test_index))
    config = ctx.config
    removals = {
        "test_index": [int(i) for i in ctx.test_index], "removals": [list(map(int, g)) for g in ctx.groups],
        "scores_shape": ["n_test", "n_removals"], "sign": "positive = removing the set increases the test loss",
        "scale": "1/N: scores[t, k] = (1/N) grad m_t^T C^-1 sum_{i in r_k} grad L_i",
        "n_train": int(ctx.problem.n_train), "n_params": int(ctx.problem.n_params),
        "damping": config.influence.damping, "weight_decay": config.train.weight_decay,
        "curvature": config.influence.curvature,
        "curvature_matrix": "C = G + (weight_decay + damping) I (ggn) or Hessian of J + damping I (hessian)",
        "task": ctx.inputs.task_name, "dtype": config.run.dtype,
        "model": {"name": config.model.name, **{k: list(v) if isinstance(v, tuple) else v
                                               for k, v in ctx.inputs.model_kwargs.items()}},
        "theta_s": CHECKPOINT, "load": "pbrf.load_run(RUN_DIR)",
    }
    tmp = ctx.run_dir / ".removals.json.tmp"
    tmp.write_text(json.dumps(removals))
    os.replace(tmp, ctx.run_dir / "removals.json")


def theta_s_quality(ctx: Context) -> dict:
    """Train/test loss and metric of θ^s (the whole test split), ‖∇J(θ^s)‖, near-chance warning."""
    from .quality import base_quality

    ds = ctx.inputs.dataset
    y = None if ctx.inputs.task_name == "reconstruction" else ds.y_test
    return base_quality(ctx.measure_problem, ctx.inputs.task_name, (ds.x_test, y))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file renamed into place (never a half-written .npy)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _experiment_info(ctx: Context, store: Store) -> dict:
    """Identifying facts of the run (no timings, so a resumed run's summary equals a fresh one's)."""
    sizes = sorted({len(g) for g in ctx.groups})
    return {
        "name": ctx.config.name,
        "profile": ctx.config.profile,
        "dataset": ctx.config.data.name,
        "model": ctx.config.model.name,
        "task": ctx.inputs.task_name,
        "n_train": int(ctx.problem.n_train),
        "n_params": int(ctx.problem.n_params),
        "group_size": sizes[0] if len(sizes) == 1 else sizes,
        "strategy": ctx.config.removals.strategy,
    }


# ---------------------------------------------------------------------------- driver
def run_experiment(
    config: ExperimentConfig,
    run_dir: str | Path,
    executor=None,
    overwrite: bool = False,
    progress: bool = True,
    inputs: Inputs | None = None,
) -> dict:
    """Run (or resume) one experiment end to end; returns the summary.

    Args:
        config: the experiment.
        run_dir: its run directory (created; a different config there is refused).
        executor: a :mod:`pbrf.experiment.executors` executor (default: local).
        overwrite: start ``run_dir`` afresh, discarding whatever run it holds (also one of the
            same config); without it a run of the same config resumes.
        progress: show progress bars.
        inputs: already prepared :class:`Inputs` (else prepared here).

    Raises:
        ConfigError: invalid config or run-directory mismatch (nothing written); another process
            holds the run; base training or a solver diverged (the message names the fix).
        pbrf.data.DataError: missing data (nothing written).
        OSError: the disk refused a write (the same command resumes once the cause is fixed).
    """
    from pbrf.solvers import SolverDivergedError

    from .executors import LocalExecutor

    run_dir = Path(run_dir)
    check_run_dir(run_dir, config, overwrite)  # read-only: refuse before anything is written
    inputs = inputs or prepare_inputs(config)
    executor = executor or LocalExecutor()
    t0 = time.perf_counter()
    with _exclusive(run_dir):  # taken before the resume/overwrite decision, on a file beside run_dir
        mode = open_run(config, run_dir, overwrite)
        log.info("%s run directory %s", mode, run_dir)
        with Store(run_dir) as store:
            try:
                ctx = setup(inputs, run_dir, store, progress)
                _CONTEXTS[str(run_dir.resolve())] = ctx
                tasks = pending_tasks(ctx, store.done())
                _run_tasks(executor, ctx, tasks, store, progress)
                from .lds_stage import run_lds

                run_lds(ctx, store, progress)
            except SolverDivergedError as err:
                msg = str(err).split(" Diagnostics:")[0].rstrip(".")
                raise ConfigError(f"{msg}. Change the [influence] settings and rerun with --overwrite "
                                  "(the same command stops here again).") from None
            summary = finish(ctx, store)
            store.set_meta("wall_seconds_last", time.perf_counter() - t0)
    return summary


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run directory: ``.NAME.lock`` beside it, so it survives an overwrite."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def _exclusive(run_dir: Path):
    """Hold an exclusive lock on the run directory (released by the OS even after kill -9).

    The lock file lives beside the run directory, not inside it, so ``--overwrite`` cannot delete
    it from under a running process; it is taken before the resume/overwrite decision.
    """
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"another pbrf process is running in {str(run_dir)!r}; wait for it or pass --out DIR.") from None
        yield


def _run_tasks(executor, ctx: Context, tasks: list[tuple[int, str]], store: Store, progress: bool) -> None:
    from tqdm.auto import tqdm

    if not tasks:
        return
    bar = tqdm(total=len(tasks), desc="responses", unit="task", disable=not progress)
    try:
        for result in executor.run(ctx, tasks):
            store.put_chunk(result)
            bar.set_postfix_str(f"{result.kind} chunk {result.chunk}")
            bar.update(1)
    finally:
        bar.close()
