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

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pbrf.experiment.config import ConfigError, ExperimentConfig
from pbrf.experiment.run.store import CONFIG_NAME, atomic_write_text

__all__ = ["seed_runs", "seed_config", "run_seeds", "aggregate", "is_multi_seed", "SEED_DIR"]

log = logging.getLogger(__name__)

#: Name of the folder of one seed's run inside a multi-seed run directory.
SEED_DIR = "seed={}"

#: Inside these sections integer counts add up over seeds (certified 46 of 48 per seed → of 144).
_SUMMED = ("certificates", "diverged")
#: Dicts of numbers whose standard deviations go to a sibling dict ``<key>_std`` (one entry per
#: gap), not to ``<key>_std`` entries inside them.
_DICT_STD = ("gaps", "signed", "output_gaps", "mean_abs")
#: Top-level sections that describe each seed's run rather than count its results: their integers
#: are kept when equal (``theta_s.n_test``), not added up.
_KEPT = ("experiment", "theta_s", "lds", "seeds")
#: Largest value over seeds rather than the mean.
_MAXED = ("max_rho", "telescoping_residual", "literal_residual", "max_residual")


def is_multi_seed(summary: dict) -> bool:
    """Whether a summary is the aggregate of several seeds (it has ``"seeds"``)."""
    return isinstance(summary, dict) and isinstance(summary.get("seeds"), dict)


def seed_config(config: ExperimentConfig, train_seed: int) -> ExperimentConfig:
    """The config of one seed's run: ``train.seed = train_seed`` and ``run.seeds = 1``."""
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, seed=train_seed),
        run=dataclasses.replace(config.run, seeds=1))


def seed_runs(config: ExperimentConfig, run_dir: Path) -> list[tuple[int, ExperimentConfig, Path]]:
    """``(train seed, config, run directory)`` of each seed of a multi-seed run."""
    base = config.train.seed
    return [(base + k, seed_config(config, base + k), Path(run_dir) / SEED_DIR.format(base + k))
            for k in range(config.run.seeds)]


def _check_top(config: ExperimentConfig, run_dir: Path, overwrite: bool) -> None:
    """The multi-seed folder itself: a file, or a non-empty folder pbrf did not make, is refused;
    a different run's folder is refused when its seeds hold results (unless ``overwrite``).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} is a file; pass another --out DIR.")
    cfg = run_dir / CONFIG_NAME
    if not cfg.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise ConfigError(f"{str(run_dir)!r} is not empty and is not a pbrf run directory; "
                              "pass another --out DIR.")
        return
    try:
        old = json.loads(cfg.read_text(encoding="utf-8"))
        old_seeds = int((old.get("run") or {}).get("seeds", 1))
    except (ValueError, OSError, TypeError, AttributeError):
        old, old_seeds = None, 1
    if old_seeds <= 1 and old is not None and not overwrite:
        raise ConfigError(f"{str(run_dir)!r} holds a single-seed run; pass --overwrite to replace "
                          "it or --out DIR for the multi-seed run.")


def prepare_seed_inputs(config: ExperimentConfig, inputs=None) -> list:
    """The :class:`~pbrf.experiment.run.inputs.Inputs` of every seed, sharing one loaded dataset."""
    from pbrf.experiment.run.inputs import Inputs, prepare_inputs

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
    from pbrf.experiment.run.driver import _exclusive

    run_dir = Path(run_dir)
    with _exclusive(run_dir):
        return _run_seeds(config, run_dir, executor, overwrite, progress, inputs)


def _run_seeds(config: ExperimentConfig, run_dir: Path, executor, overwrite: bool,
               progress: bool, inputs) -> dict:
    from pbrf.experiment.run.driver import discard, run_experiment
    from pbrf.experiment.run.store import check_run_dir

    _check_top(config, run_dir, overwrite)
    runs = seed_runs(config, run_dir)
    if not overwrite:
        for _, cfg, d in runs:
            check_run_dir(d, cfg, False)
    per_seed_inputs = prepare_seed_inputs(config, inputs)
    if overwrite and run_dir.is_dir():
        discard(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_NAME, config.to_json() + "\n")
    summaries = []
    for k, ((seed, cfg, d), inp) in enumerate(zip(runs, per_seed_inputs)):
        if progress:
            print(f"== seed {k + 1}/{len(runs)}: train.seed = {seed} ({d}) ==", file=sys.stderr)
        summaries.append(run_experiment(cfg, d, executor=executor, overwrite=False,
                                        progress=progress, inputs=inp))
    summary = aggregate(summaries, [s for s, _, _ in runs], [d.name for _, _, d in runs])
    from pbrf.experiment.report import write_seeds_report

    write_seeds_report(run_dir, summary, summaries, config.to_dict())
    return summary


# ---------------------------------------------------------------------------- aggregation
class _Mean:
    """A float leaf averaged over seeds (``std`` is None with fewer than two finite values)."""

    def __init__(self, values: list) -> None:
        finite = [float(v) for v in values if _number(v) and math.isfinite(float(v))]
        self.mean = float(np.mean(finite)) if finite else None
        self.std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _merge(values: list, key: str, summed: bool) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, dict) for v in present):
        return _merge_dicts(present, summed or key in _SUMMED)
    if all(isinstance(v, bool) for v in present):
        return any(present)
    if all(_number(v) for v in present):
        if key in _MAXED:
            finite = [float(v) for v in present if math.isfinite(float(v))]
            return max(finite) if finite else None
        if all(isinstance(v, int) for v in present):
            if summed or len(set(present)) > 1:
                return int(sum(present))
            return present[0]
        return _Mean(values)
    if all(v == present[0] for v in present):
        return present[0]
    if all(isinstance(v, str) for v in present):
        return "; ".join(dict.fromkeys(present))
    return list(values)  # e.g. per-seed lists of excluded removals


def _merge_dicts(dicts: list[dict], summed: bool, top: bool = False,
                 std_out: dict | None = None) -> dict:
    """Merge same-shaped dicts; the deviation of a mean goes beside it as ``<key>_std``, or into
    ``std_out[key]`` when given (the gap dicts).
    """
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    out: dict = {}
    for k in keys:
        values = [d.get(k) for d in dicts]
        if top:  # counts inside the result sections add up; the top-level sizes are per seed
            both = any(isinstance(v, dict) for v in values) and k not in _KEPT
        else:
            both = summed
        present = [v for v in values if v is not None]
        if k in _DICT_STD and present and all(isinstance(v, dict) for v in present):
            std: dict = {}
            out[k] = _merge_dicts(present, both, std_out=std)
            out[f"{k}_std"] = std
            continue
        merged = _merge(values, k, both)
        if isinstance(merged, _Mean):
            out[k] = merged.mean
            if merged.std is not None:
                if std_out is None:
                    out[f"{k}_std"] = merged.std
                else:
                    std_out[k] = merged.std
        else:
            out[k] = merged
    return out


def aggregate(summaries: list[dict], train_seeds: list[int], runs: list[str]) -> dict:
    """The summary of a multi-seed run from its seeds' summaries.

    Every float is the mean over the seeds where it is finite, with the sample standard deviation
    beside it as ``<key>_std`` (``correlations.pbrf.pearson`` / ``pearson_std``,
    ``theta_s.test_metric`` / ``test_metric_std``); for the gap dicts of a decomposition the
    deviations are a sibling dict (``decomposition.gaps`` / ``decomposition.gaps_std``). Counts
    in ``certificates`` and ``diverged`` add up over seeds; ``max_rho`` and residuals are the
    largest over seeds; flags are true when
    true in any seed. Inside the result sections (all but ``experiment``, ``theta_s`` and ``lds``)
    integer counts add up over seeds (pairs used, certified removals); the top-level ``n_test``
    and ``n_removals`` are per seed. ``seeds`` names the seeds and their run folders.
    """
    if not summaries:
        raise ValueError("aggregate needs at least one summary.")
    out = _merge_dicts(summaries, False, top=True)
    out["seeds"] = {"n": len(summaries), "train_seeds": list(train_seeds), "runs": list(runs)}
    exp = dict(out.get("experiment") or {})
    exp["seeds"] = len(summaries)
    out["experiment"] = exp
    return out
