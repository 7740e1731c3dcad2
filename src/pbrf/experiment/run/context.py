"""The context of a run: everything a chunk computation needs, built by :func:`setup` (train or
load θ^s, choose or load the test points and removal sets) or rebuilt from a run directory by
:func:`load_context` (an executor's worker).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pbrf.experiment.config import ConfigError, ExperimentConfig
from pbrf.experiment.run.inputs import (
    Inputs,
    build_problem,
    load_theta,
    prepare_inputs,
    test_data,
    torch,
    train_theta,
)
from pbrf.experiment.run.selection import (
    all_train_scores,
    choose_test_points,
    groups_from_array,
    groups_to_array,
    random_groups,
    top_influence_groups,
)
from pbrf.experiment.run.store import CONFIG_NAME, DB_NAME, Store


def read_config(run_dir: Path) -> ExperimentConfig:
    """The config stored in a run directory: the one reader of a run's ``config.json``.

    Raises:
        ConfigError: no run directory, a multi-seed folder, an unreadable ``config.json``, or one
            that differs from the config the stored results were computed for (each message
            names the file and the fix).
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a pbrf run directory (no {CONFIG_NAME}); run "
                          "`pbrf run` first.")
    try:
        config = ExperimentConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError, ConfigError
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{str(path)!r} is unreadable ({cause}); restore it from a copy of the "
                          f"run, or start the run again with the command that made it and "
                          f"--out {shlex.quote(str(run_dir))} --overwrite.") from None
    if config.run.seeds > 1:  # the aggregate of several runs, not a run
        first = run_dir / f"seed={config.train.seed}"
        raise ConfigError(f"{str(run_dir)!r} holds {config.run.seeds} runs, one per θ^s seed "
                          f"(run.seeds = {config.run.seeds}); pass one of them, e.g. "
                          f"{str(first)!r}.")
    if (run_dir / DB_NAME).is_file():
        with Store(run_dir, readonly=True) as store:
            store.check_config(config.fingerprint())
    return config


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
        training dtype.
        """
        if self._measure is None:
            self._measure = self.problem.astype(torch.float64)
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
            return torch.tensor([g[0] for g in groups], dtype=torch.long)
        return groups


def setup(inputs: Inputs, run_dir: Path, store: Store, progress: bool = True) -> Context:
    """Train (or load) θ^s, choose (or load) test points and removal sets; returns the context."""
    config = inputs.config
    params = train_theta(inputs, run_dir, progress)
    problem = build_problem(inputs, params)
    test_index = store.get_array("test_index")
    if test_index is None:
        test_index = choose_test_points(config, len(inputs.dataset.x_test))
    test = test_data(inputs, test_index)
    groups_arr, scores = store.get_array("groups"), store.get_array("train_scores")
    if groups_arr is None:
        if config.removals.strategy == "top-influence":
            scores = all_train_scores(problem, config, test)
            groups = top_influence_groups(config, scores)
        else:
            groups = random_groups(config, problem.n_train)
        arrays = {"test_index": test_index, "groups": groups_to_array(groups)}
        if scores is not None:
            arrays["train_scores"] = scores
        store.put_arrays(arrays)
        store.set_meta("n_train", int(problem.n_train))
        groups_arr = arrays["groups"]
    return Context(config, Path(run_dir), inputs, problem, test, test_index,
                   groups_from_array(groups_arr), scores)


def load_context(run_dir: str | Path) -> Context:
    """Rebuild the context of a prepared run directory (config + checkpoint + stored choices).

    Used by executors' workers (each builds it once, see :mod:`pbrf.experiment.run.executors`).
    """
    config = read_config(run_dir)
    inputs = prepare_inputs(config)
    with Store(run_dir, readonly=True) as store:
        index, groups = store.get_array("test_index"), store.get_array("groups")
    if index is None or groups is None:
        raise RuntimeError(f"{run_dir}: the run is not set up yet (no test points / removal sets "
                           "stored).")
    problem = build_problem(inputs, load_theta(run_dir))
    return Context(config, Path(run_dir), inputs, problem, test_data(inputs, index), index,
                   groups_from_array(groups))
