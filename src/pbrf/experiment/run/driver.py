"""The experiment pipeline behind ``pbrf run``: the resumable driver.

Stages (each resumable; see :mod:`pbrf.experiment.run.store`), one module each:

1. :mod:`~pbrf.experiment.run.inputs` — :func:`prepare_inputs`: load the data and build the model
   (config errors surface here, before anything is written); train θ^s (cached as
   ``theta_s.safetensors``);
2. :func:`open_run` (here) — create or resume the run directory (a different config is refused);
3. :mod:`~pbrf.experiment.run.selection` and :mod:`~pbrf.experiment.run.context` — :func:`setup`: choose
   the test points and the removal sets (random or top-|influence|, single points or groups), store
   them, and hold everything a chunk needs in a :class:`Context`;
4. :mod:`~pbrf.experiment.run.chunks` — :func:`compute_chunk`: for one chunk of removal sets and one
   kind, Δm ``[n_test, k]``, Δf ``[k, n_test, *out]`` and per-removal diagnostics; run by an
   executor, stored by the driver;
5. :mod:`~pbrf.experiment.run.summary` — :func:`finish`: gather the arrays, :func:`analysis.summarise`,
   :func:`report.write_report`.

Determinism: every random choice is seeded from the config and the chunk index
(:func:`~pbrf.experiment.run.selection.chunk_seed`), never from global RNG state, so a resumed run and
an uninterrupted one end with the same numbers. The names of the stages are re-exported here.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path

from pbrf.solvers import SolverDivergedError

from pbrf.experiment.run.chunks import compute_chunk, influence_settings, pending_tasks
from pbrf.experiment.config import ConfigError, ExperimentConfig
from pbrf.experiment.run.context import Context, load_context, read_config, setup
from pbrf.experiment.run.executors import LocalExecutor
from pbrf.experiment.run.inputs import (
    CHECKPOINT,
    TRAINING_CHECKPOINTS,
    Inputs,
    build_model,
    build_problem,
    prepare_inputs,
    train_theta,
)
from pbrf.experiment.run.lds_stage import run_lds
from pbrf.experiment.run.selection import (
    all_train_scores,
    choose_test_points,
    chunk_seed,
    random_groups,
    response_seed,
    top_influence_groups,
)
from pbrf.experiment.run.store import CONFIG_NAME, Store, atomic_write_text, check_run_dir
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

log = logging.getLogger(__name__)


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
        discard(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode != "resume":
        atomic_write_text(run_dir / CONFIG_NAME, config.to_json() + "\n")
    return mode


def discard(run_dir: Path) -> None:
    """Delete ``run_dir``: renamed aside first, so a kill in between leaves it whole or gone."""
    trash = run_dir.parent / f".{run_dir.name}.deleting-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(run_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_trash(run_dir: Path) -> None:
    """Delete what an overwrite killed mid-way left aside (``.NAME.deleting-*`` beside the run)."""
    if run_dir.parent.is_dir():
        for trash in run_dir.parent.glob(f".{run_dir.name}.deleting-*"):
            shutil.rmtree(trash, ignore_errors=True)


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

    The run directory is checked twice, and both checks are needed: the read-only check before
    the data load refuses a mismatched directory early and writes nothing (not even the lock file
    beside it, so a refused or failed run leaves its parent folder untouched); the decisive check
    is made again under the run's lock (:func:`open_run`), since another process may have changed
    the directory between the two. Taking the lock before the data load would make one check
    enough, but would write the lock file for runs that then fail on their data.

    With ``run.seeds = S > 1`` it runs one such run per θ^s seed in ``run_dir/seed=K`` and
    returns their aggregate (:mod:`pbrf.experiment.run.seeds`).

    Args:
        config: the experiment.
        run_dir: its run directory (created; a different config there is refused).
        executor: a :mod:`pbrf.experiment.run.executors` executor (default: local).
        overwrite: start ``run_dir`` afresh, discarding whatever run it holds (also one of the
            same config); without it a run of the same config resumes.
        progress: show progress bars.
        inputs: already prepared :class:`Inputs` (else prepared here, after a read-only check of
            ``run_dir``; a caller that passes them has made that check, as ``pbrf run`` does).

    Raises:
        ConfigError: invalid config or run-directory mismatch (nothing written); another process
            holds the run; base training or a solver diverged (the message names the fix).
        pbrf.data.DataError: missing data (nothing written).
        OSError: the disk refused a write (the same command resumes once the cause is fixed).
    """
    run_dir = Path(run_dir)
    if config.run.seeds > 1:  # one run per θ^s seed in run_dir/seed=K, then their aggregate
        from pbrf.experiment.run.seeds import run_seeds

        return run_seeds(config, run_dir, executor, overwrite, progress, inputs)
    if inputs is None:  # refuse a mismatched run directory before the (slow) data load; a caller
        check_run_dir(run_dir, config, overwrite)  # that prepared the inputs checked it already
        inputs = prepare_inputs(config)
    executor = executor or LocalExecutor()
    t0 = time.perf_counter()
    # taken before the resume/overwrite decision, on a file beside run_dir
    with _exclusive(run_dir):
        mode = open_run(config, run_dir, overwrite)
        log.info("%s run directory %s", mode, run_dir)
        with Store(run_dir) as store:
            try:
                ctx = setup(inputs, run_dir, store, progress)
                tasks = pending_tasks(ctx, store.done())
                _run_tasks(executor, ctx, tasks, store, progress)
                run_lds(ctx, store, progress)
            except SolverDivergedError as err:
                msg = str(err).split(" Diagnostics:")[0].rstrip(".")
                raise ConfigError(f"{msg}. Change the [influence] settings and rerun with "
                                  "--overwrite "
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
            raise ConfigError(f"another pbrf process is running in {str(run_dir)!r}; wait for it "
                              "or pass --out DIR.") from None
        yield


def _run_tasks(executor, ctx: Context, tasks: list[tuple[int, str]], store: Store,
               progress: bool) -> None:
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
