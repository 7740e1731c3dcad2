"""The experiment pipeline behind ``pbrf run``: the resumable driver.

Stages (each resumable; see :mod:`pbrf.experiment.run.store`), one module each:

1. :mod:`~pbrf.experiment.run.inputs` — :func:`prepare_inputs`: load the data and build the model
   (config errors surface here, before anything is written); train θ^s (cached as
   ``theta_s.safetensors``);
2. :func:`~pbrf.experiment.run.rundir.open_run` — create or resume the run directory (a
   different config is refused);
3. :mod:`~pbrf.experiment.run.selection` and :mod:`~pbrf.experiment.run.context` —
   :func:`setup`: choose the test points and the removal sets (random or top-|influence|, single
   points or groups), store them, and hold everything a chunk needs in a :class:`Context`;
4. :mod:`~pbrf.experiment.run.chunks` — :func:`compute_chunk`: for one chunk of removal sets and one
   kind, Δm ``[n_test, k]``, Δf ``[k, n_test, *out]`` and per-removal diagnostics; run by an
   executor, stored by the driver;
5. :mod:`~pbrf.experiment.run.summary` — :func:`finish`: gather the arrays,
   :func:`analysis.summarise`, :func:`report.write_report`.

Determinism: every random choice is seeded from the config and the chunk index
(:func:`~pbrf.experiment.run.selection.chunk_seed`), never from global RNG state, so a resumed
run and an uninterrupted one end with the same numbers. The names of the stages are re-exported
here.
"""

from __future__ import annotations

from pathlib import Path

from pbrf.experiment.config import ExperimentConfig
from pbrf.experiment.run.chunks import compute_chunk, influence_settings, pending_tasks
from pbrf.experiment.run.context import Context, load_context, read_config, setup
from pbrf.experiment.run.inputs import (
    CHECKPOINT,
    TRAINING_CHECKPOINTS,
    Inputs,
    build_model,
    build_problem,
    prepare_inputs,
    train_theta,
)
from pbrf.experiment.run.rundir import lock_path, open_run
from pbrf.experiment.run.seeds import run_seeds
from pbrf.experiment.run.selection import (
    all_train_scores,
    choose_test_points,
    chunk_seed,
    random_groups,
    response_seed,
    top_influence_groups,
)
from pbrf.experiment.run.single import run_one
from pbrf.experiment.run.summary import exclusions, finish, objective_defined

__all__ = [
    "Context",
    "Inputs",
    "prepare_inputs",
    "open_run",
    "setup",
    "load_context",
    "read_config",
    "compute_chunk",
    "chunk_seed",
    "pending_tasks",
    "finish",
    "run_experiment",
    "run_one",
    "lock_path",
    "CHECKPOINT",
    "TRAINING_CHECKPOINTS",
    "build_model",
    "build_problem",
    "train_theta",
    "choose_test_points",
    "random_groups",
    "top_influence_groups",
    "all_train_scores",
    "influence_settings",
    "response_seed",
    "exclusions",
    "objective_defined",
]


def run_experiment(config: ExperimentConfig, run_dir: str | Path, executor=None,
                   overwrite: bool = False, progress: bool = True,
                   inputs: Inputs | None = None) -> dict:
    """Run (or resume) one experiment end to end; returns the summary.

    With ``run.seeds = 1`` this is :func:`pbrf.experiment.run.single.run_one` (its docstring has
    the arguments and the errors); with ``run.seeds = S > 1`` it runs one such run per θ^s seed in
    ``run_dir/seed=K`` and returns their aggregate (:func:`pbrf.experiment.run.seeds.run_seeds`).
    """
    if config.run.seeds > 1:
        return run_seeds(config, Path(run_dir), executor, overwrite, progress, inputs)
    return run_one(config, run_dir, executor, overwrite, progress, inputs)
