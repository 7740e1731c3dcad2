"""Several θ^s per run: ``run.seeds = S`` trains θ^s for ``train.seed + 0 .. S-1`` and reports
every correlation and gap as mean ± standard deviation over those seeds.

Layout: each seed is an ordinary, self-contained run in ``RUN_DIR/seed=<train.seed + k>/`` whose
config is the run's with that ``train.seed`` and ``run.seeds = 1`` (so ``pbrf run --set
train.seed=K --out RUN_DIR/seed=K`` resumes it, and ``pbrf evaluate``/``estimators``/``load_run``
take it). ``RUN_DIR`` holds the run's ``config.json``, the aggregate ``summary.json`` (see
:func:`aggregate`), ``report.md`` and its figures. Each seed's run resumes on its own, so a killed
multi-seed run loses at most the chunk in flight, and raising ``run.seeds`` later keeps the seeds
already computed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pbrf.experiment.analysis.aggregate import aggregate
from pbrf.experiment.config import ExperimentConfig
from pbrf.experiment.report import write_seeds_report
from pbrf.experiment.run.inputs import Inputs, prepare_inputs
from pbrf.experiment.run.rundir import (
    SEED_DIR,
    check_out_dir,
    discard,
    exclusive,
    seed_config,
    seed_runs,
)
from pbrf.experiment.run.single import run_one
from pbrf.experiment.run.store import CONFIG_NAME, atomic_write_text

__all__ = ["seed_runs", "seed_config", "run_seeds", "SEED_DIR"]

log = logging.getLogger(__name__)


def prepare_seed_inputs(config: ExperimentConfig, inputs=None) -> list:
    """The :class:`~pbrf.experiment.run.inputs.Inputs` of every seed, sharing one loaded dataset."""
    first = inputs if inputs is not None else prepare_inputs(seed_config(config,
                                                                         config.train.seed))
    return [Inputs(cfg, first.dataset, first.task_name, first.model_kwargs)
            for _, cfg, _ in seed_runs(config, Path("."))]


def run_seeds(config: ExperimentConfig, run_dir: str | Path, executor=None,
              overwrite: bool = False, progress: bool = True, inputs=None) -> dict:
    """Run (or resume) every seed of a multi-seed run, then write the aggregate; returns it.

    Every seed's run directory is checked before any is written; ``overwrite`` replaces the whole
    multi-seed folder. See :func:`pbrf.experiment.run.driver.run_experiment` for the arguments.
    """
    run_dir = Path(run_dir)
    with exclusive(run_dir):
        return _run_seeds(config, run_dir, executor, overwrite, progress, inputs)


def _run_seeds(config: ExperimentConfig, run_dir: Path, executor, overwrite: bool,
               progress: bool, inputs) -> dict:
    check_out_dir(run_dir, config, overwrite)
    runs = seed_runs(config, run_dir)
    per_seed_inputs = prepare_seed_inputs(config, inputs)
    if overwrite and run_dir.is_dir():
        discard(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_NAME, config.to_json() + "\n")
    summaries = []
    for k, ((seed, cfg, d), inp) in enumerate(zip(runs, per_seed_inputs)):
        if progress:
            print(f"== seed {k + 1}/{len(runs)}: train.seed = {seed} ({d}) ==", file=sys.stderr)
        summaries.append(run_one(cfg, d, executor=executor, overwrite=False,
                                        progress=progress, inputs=inp))
    summary = aggregate(summaries, [s for s, _, _ in runs], [d.name for _, _, d in runs])
    write_seeds_report(run_dir, summary, summaries, config.to_dict())
    return summary


