"""Factor sweeps: one run per value of a factor (and per seed), gaps and correlations against it.

``pbrf sweep`` and ``pbrf reproduce`` (its six factor studies) are both:

1. :func:`plan_sweep` — resolve every value's config (one per seed) and check every run directory,
   before anything runs (``ConfigError`` on a mistake; nothing written);
2. :func:`run_sweep` — run them one by one (resumable: each is a
   :func:`~pbrf.experiment.run.driver.run_experiment` run directory);
3. :func:`write_sweep` — one figure per factor (mean ± std over seeds) and ``sweep.md``, whose
   sections (:func:`sweep_markdown`) say in which direction each gap moved and whether the error
   bars separate.

Layout: ``OUT/<factor>=<value>`` (one seed) or ``OUT/<factor>=<value>/seed=<train.seed + k>``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pbrf.experiment import analysis, report
from pbrf.experiment.config import ConfigError, ExperimentConfig, resolve
from pbrf.experiment.run.driver import run_experiment
from pbrf.experiment.run.rundir import check_out_dir
from pbrf.experiment.run.store import atomic_write_text
from pbrf.fileio import name_os_error

__all__ = [
    "SWEEP_FACTORS",
    "FactorPlan",
    "FactorResult",
    "SweepPlan",
    "plan_sweep",
    "run_sweep",
    "sweep_markdown",
    "sweep_title",
    "write_sweep",
]

#: The factors a sweep can vary and the config key each one sets.
SWEEP_FACTORS = {
    "width": "model.width",
    "depth": "model.depth",
    "epochs": "train.epochs",
    "weight_decay": "train.weight_decay",
    "damping": "influence.damping",
    "fraction": "removals.group_fraction",
}

#: Settings a factor needs besides its own key: a removal set is a fraction of the training set
#: only with ``group_size = 1`` (the config refuses both at once), so a fraction sweep sets it.
FACTOR_REQUIRES = {"fraction": ("removals.group_size=1",)}


@dataclass
class FactorPlan:
    """One factor of a sweep: its values and, per value, one config and run directory per seed."""

    factor: str
    values: list
    configs: list[list[ExperimentConfig]]
    dirs: list[list[Path]]

    def runs(self):
        """``(value, config, run_dir)`` of every run of this factor, in order."""
        for v, cfgs, ds in zip(self.values, self.configs, self.dirs):
            for cfg, d in zip(cfgs, ds):
                yield v, cfg, d


@dataclass
class SweepPlan:
    """A validated sweep: its folder, base config, seeds per value and factors."""

    out: Path
    base: ExperimentConfig
    seeds: int
    factors: list[FactorPlan] = field(default_factory=list)

    def configs(self) -> list[ExperimentConfig]:
        """Every config of the sweep (one per run)."""
        return [cfg for f in self.factors for _, cfg, _ in f.runs()]


@dataclass
class FactorResult:
    """The summaries of one factor: per value, one summary per seed; and the seconds it took."""

    factor: str
    values: list
    per_value: list[list[dict]]
    seconds: float = 0.0


def plan_sweep(
    spec: str | None,
    profile: str,
    factors: Sequence[tuple[str, Sequence]],
    *,
    sets: Sequence[str] = (),
    seeds: int = 1,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> SweepPlan:
    """Resolve and check every run of a sweep; nothing is written.

    Args:
        spec: a preset name or a TOML config (as ``pbrf run``).
        profile: the preset profile.
        factors: ``(factor, values)`` pairs, factors from :data:`SWEEP_FACTORS`, each once.
        sets: ``--set`` overrides applied to every run (``run.device=...`` included).
        seeds: runs per value (``train.seed`` + 0..seeds-1).
        out: the sweep folder (default ``runs/<name>-sweep-<factor>[-<factor>...]``).
        overwrite: start every run directory afresh.

    Returns:
        The :class:`SweepPlan`.

    Raises:
        ConfigError: unknown or repeated factor, no values, a repeated value, ``seeds < 1``, a
            config that does not resolve, or a run directory that holds another config.
    """
    names = [f for f, _ in factors]
    _check_factors(names, seeds)
    for factor, values in factors:
        _check_values(factor, list(values))
    sets = list(sets)
    base = resolve(spec, profile, sets)
    name = f"{base.name}-sweep-{'-'.join(names)}"
    out = Path(out) if out else Path("runs") / name
    plan = SweepPlan(out, base, seeds)
    for factor, values in factors:
        entry = _plan_factor(spec, profile, factor, list(values), sets, base, seeds, out)
        for _, cfg, d in entry.runs():
            check_out_dir(d, cfg, overwrite)
        plan.factors.append(entry)
    return plan


def _check_factors(names: Sequence[str], seeds: int) -> None:
    """Known factors, each once, and a positive number of seeds (else ``ConfigError``)."""
    unknown = [f for f in names if f not in SWEEP_FACTORS]
    if unknown:
        raise ConfigError(f"pbrf sweep: unknown factor {unknown[0]!r}; choose one of "
                          f"{', '.join(SWEEP_FACTORS)}.")
    if len(set(names)) != len(names):
        raise ConfigError("pbrf sweep: a factor is given twice; list all its values in one "
                          "--values.")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError("pbrf sweep: --seeds must be a positive integer, e.g. --seeds 3.")


def _check_values(factor: str, values: list) -> None:
    """Each value once (``8`` and ``8.0`` are one value): a repeat would be one run listed twice."""
    for i, v in enumerate(values):
        if any(v == w for w in values[:i]):
            raise ConfigError(f"pbrf sweep: {factor} value {v!r} is given twice; list each value "
                              "once, e.g. --values 8,16.")


def _plan_factor(spec: str | None, profile: str, factor: str, values: list, sets: list[str],
                 base: ExperimentConfig, seeds: int, out: Path) -> FactorPlan:
    """One factor's configs (one per value and seed) and run directories under ``out``."""
    if not values:
        raise ConfigError(f"pbrf sweep: factor {factor!r} has no values; list at least one, "
                          "e.g. --values 16,32,64.")
    key = SWEEP_FACTORS[factor]
    extra = list(FACTOR_REQUIRES.get(factor, ()))
    configs, dirs = [], []
    for v in values:
        value_sets = extra + [f"{key}={json.dumps(v)}"]
        configs.append([resolve(spec, profile, sets + value_sets
                                + [f"train.seed={base.train.seed + k}"])
                        for k in range(seeds)])
        folder = out / f"{factor}={v}"
        dirs.append([folder] if seeds == 1 else [folder / f"seed={base.train.seed + k}"
                                                 for k in range(seeds)])
    return FactorPlan(factor, values, configs, dirs)


def _default_run(config: ExperimentConfig, run_dir: Path, inputs=None, **kwargs) -> dict:
    return run_experiment(config, run_dir, inputs=inputs, **kwargs)


def run_sweep(
    plan: SweepPlan,
    *,
    executor=None,
    overwrite: bool = False,
    progress: bool = True,
    inputs: Mapping[int, object] | None = None,
    run: Callable[..., dict] | None = None,
    factors: Sequence[str] | None = None,
    on_factor: Callable[[int, int, FactorPlan], None] | None = None,
) -> list[FactorResult]:
    """Run every run of a planned sweep (each one resumes), factor by factor.

    Args:
        plan: from :func:`plan_sweep`.
        executor: passed to :func:`~pbrf.experiment.run.driver.run_experiment`.
        overwrite: start each run directory afresh.
        progress: show progress bars.
        inputs: prepared inputs by ``id(config)`` (else each run prepares its own).
        run: ``run(config, run_dir, inputs=..., executor=..., overwrite=..., progress=...)``
            returning the summary (default :func:`~pbrf.experiment.run.driver.run_experiment`).
        factors: run only these factors of the plan (default all).
        on_factor: called as ``on_factor(i, n, factor_plan)`` before each factor (1-based ``i``).

    Returns:
        One :class:`FactorResult` per factor run. Its ``seconds`` is the time this call spent on
        it.

    Raises:
        OSError: the disk refused a write; the error names the run directory.
    """
    run = run or _default_run
    chosen = [f for f in plan.factors if factors is None or f.factor in factors]
    results = []
    for i, fp in enumerate(chosen, 1):
        if on_factor is not None:
            on_factor(i, len(chosen), fp)
        t0 = time.perf_counter()
        per_value = []
        for v, cfgs, ds in zip(fp.values, fp.configs, fp.dirs):
            seeds = []
            for cfg, d in zip(cfgs, ds):
                print(f"== {fp.factor} = {v}, train.seed = {cfg.train.seed} ==", file=sys.stderr)
                try:
                    seeds.append(run(cfg, d, inputs=None if inputs is None else inputs[id(cfg)],
                                     executor=executor, overwrite=overwrite, progress=progress))
                except OSError as err:
                    raise name_os_error(err, d) from None
            per_value.append(seeds)
        results.append(FactorResult(fp.factor, fp.values, per_value,
                                    time.perf_counter() - t0))
    return results


def sweep_title(factors: Sequence[str], spec: str | None, profile: str, seeds: int) -> str:
    """The first line of ``sweep.md``."""
    title = f"# Sweep of {', '.join(factors)} ({spec}, profile {profile}"
    return title + (f", {seeds} seeds per value)" if seeds > 1 else ")")


def figure_name(factor: str, n_factors: int) -> str:
    """The file name of a factor's figure in the sweep folder."""
    return "sweep.png" if n_factors == 1 else f"sweep-{factor}.png"


def write_sweep(out: Path, results: Sequence[FactorResult], title: str) -> dict[str, Path]:
    """Write one figure per factor and ``out/sweep.md``; returns ``{factor: figure path}``."""
    out = Path(out)
    figures, sections = {}, []
    for r in results:
        figure = report.plot_sweep(r.factor, r.values, r.per_value,
                                   out / figure_name(r.factor, len(results)))
        figures[r.factor] = figure
        sections.append(sweep_markdown(r.factor, r.values, r.per_value, figure, out))
    atomic_write_text(out / "sweep.md", "\n\n".join([title, *sections]) + "\n")
    return figures


def sweep_table_rows(result: FactorResult, seeds: int) -> list[tuple[str, dict]]:
    """``(label, summary)`` rows of one factor for :func:`report.format_table_text`."""
    return [(f"{result.factor}={v}" + (f" seed {k}" if seeds > 1 else ""), s)
            for v, per_seed in zip(result.values, result.per_value)
            for k, s in enumerate(per_seed)]


def sweep_gap_lines(factor: str, values: Sequence, per_value: Sequence) -> list[str]:
    """Per gap: "- gap: increases with factor (the error bars ... separate)."."""
    trends = report.sweep_trends(values, per_value)
    lines = []
    for g in analysis.GAPS:
        t = trends[g]
        ends = "the error bars of the smallest and largest value"
        sep = {None: "one seed per value, no error bars", True: f"{ends} separate",
               False: f"{ends} overlap"}[t["separated"]]
        lines.append(f"- {g}: {t['direction']} with {factor} ({sep}).")
    return lines


def sweep_markdown(factor: str, values: list, per_value: list, figure, out: Path,
                   heading: str = "##") -> str:
    """The markdown section of one factor: gap and correlation tables, how each gap moved, and
    the figure (linked relative to ``out``).
    """

    def cell(mean, std, n, fmt=report.fmt_value):
        return report.fmt_ms(mean, std if n > 1 else None, fmt)

    n = min(len(s) for s in per_value)
    trends = report.sweep_trends(values, per_value)
    gap_rows = [["value"] + list(analysis.GAPS)]
    for i, v in enumerate(values):
        gap_rows.append([str(v)] + [cell(trends[g]["means"][i], trends[g]["stds"][i], n)
                                    for g in analysis.GAPS])
    corr_rows = [["value", "PBRF Pearson", "cold LOO Pearson"]]
    for v, seeds in zip(values, per_value):
        row = [str(v)]
        for kind in ("pbrf", "cold"):
            vals = [c for c in (report.plottable(report.nested_get(s, "correlations", kind,
                                                                   "pearson"))
                                for s in seeds) if c is not None]
            row.append(cell(float(np.mean(vals)) if vals else None,
                            float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, n,
                            report.fmt_corr))
        corr_rows.append(row)
    fig = Path(figure).relative_to(out).as_posix() if figure else None
    sub = heading + "#"
    parts = [f"{heading} {factor}", f"Values {values}, {n} seed{'s' if n != 1 else ''} each "
             + ("(mean ± standard deviation over seeds)." if n > 1 else "."),
             f"{sub} Mean gaps |Δm|", report.md_table(gap_rows[0], gap_rows[1:]),
             f"{sub} Influence vs response", report.md_table(corr_rows[0], corr_rows[1:]),
             f"{sub} How each gap moved", "\n".join(sweep_gap_lines(factor, values, per_value))]
    if fig:
        parts.append(f"![gaps vs {factor}]({fig})")
    return "\n\n".join(parts)
