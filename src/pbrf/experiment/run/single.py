"""One run end to end, resumable: the stages of :mod:`pbrf.experiment.run.driver` in order.

:func:`run_one` is a single-seed run; :func:`pbrf.experiment.run.driver.run_experiment` calls it
directly, or once per θ^s seed through :mod:`pbrf.experiment.run.seeds`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from pbrf.experiment.config import ConfigError, ExperimentConfig
from pbrf.experiment.run.chunks import pending_tasks
from pbrf.experiment.run.context import Context, setup
from pbrf.experiment.run.executors import LocalExecutor
from pbrf.experiment.run.inputs import Inputs, prepare_inputs
from pbrf.experiment.run.lds_stage import run_lds
from pbrf.experiment.run.rundir import check_run_dir, exclusive, open_run
from pbrf.experiment.run.store import Store
from pbrf.experiment.run.summary import finish
from pbrf.newton import exact_matmul
from pbrf.solvers import SolverDivergedError

__all__ = ["run_one"]

log = logging.getLogger(__name__)


def run_one(
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
    if inputs is None:  # refuse a mismatched run directory before the (slow) data load; a caller
        check_run_dir(run_dir, config, overwrite)  # that prepared the inputs checked it already
        inputs = prepare_inputs(config)
    executor = executor or LocalExecutor()
    t0 = time.perf_counter()
    # taken before the resume/overwrite decision, on a file beside run_dir; TF32 off for the
    # whole run on CUDA (float32 matmuls and convolutions rounded to ~1e-3 would blur the 1/N
    # effects every kind measures; float64 never uses it)
    with exact_matmul(), exclusive(run_dir):
        mode = open_run(config, run_dir, overwrite)
        log.info("%s run directory %s", mode, run_dir)
        with Store(run_dir) as store:
            store.check_config(config.fingerprint(), record=True)  # what load_run checks against
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


def _run_tasks(executor, ctx: Context, tasks: list[tuple[int, str]], store: Store,
               progress: bool) -> None:
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
