"""``pbrf reproduce``: the paper's main table and its six factor studies, resumably, and a report.

Bae et al. (2022) compare influence estimates with cold-start LOO, warm-start LOO and the PBRF on
five architectures (their Table 1) and study how the gaps move with six factors (width, depth,
training epochs, weight decay, damping, fraction of data removed). This module runs both:

1. :func:`plan_reproduction` — resolve every table row's config (:data:`TABLE_ROWS`, preset profile
   from :data:`TABLE_PROFILES`) and every factor-study run (:data:`FACTOR_STUDIES`, through
   :func:`pbrf.experiment.studies.sweep.plan_sweep`), check every run directory and that the data
   load; nothing is written, and a mistake raises ``ConfigError`` / ``DataError``;
2. :func:`run_reproduction` — run them (``OUT/table/<row>``, ``OUT/factors/<factor>=<value>/...``;
   each run resumes, so rerunning computes only what is missing) and record the seconds each part
   took in ``OUT/reproduce.json`` (a part complete before the command keeps its recorded time; a
   run interrupted and resumed counts the time of the command that finished it);
3. :func:`write_reproduction_report` — the report: the table in the paper's layout (mean ± std
   over seeds), θ^s accuracy against the acceptance thresholds, certification counts, the settings
   of each row (read from its ``config.json``), a decomposition figure per architecture and a
   figure plus "how each gap moved" per factor. Each row is labelled with the activation and
   pooling its config builds (:func:`row_label`): the CIFAR-10 presets' smooth GELU /
   average-pooling variants by default (:data:`VARIANT_NOTE` says why), each CNN row followed by
   its literal ReLU / max-pooling variant (:data:`LITERAL`), a run of its own, so that a reader
   sees what smoothness changes (its certification counts) and what it does not.

The plan lives in data (:data:`TABLE_ROWS`, :data:`TABLE_PROFILES`, :data:`LITERAL`,
:data:`ACCEPTANCE`, :data:`FACTOR_STUDIES`): changing what is run means editing those tables
only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import pbrf
from pbrf.experiment import analysis, report
from pbrf.experiment.config import ConfigError, ExperimentConfig, load_preset
from pbrf.experiment.run.driver import run_experiment
from pbrf.experiment.run.inputs import prepare_inputs
from pbrf.experiment.run.rundir import check_out_dir, check_run_dir
from pbrf.experiment.studies.sweep import (
    SWEEP_FACTORS,
    FactorResult,
    SweepPlan,
    plan_sweep,
    run_sweep,
    sweep_markdown,
    sweep_title,
    write_sweep,
)
from pbrf.fileio import atomic_write, dumps, name_os_error
from pbrf.models import variant_label

__all__ = [
    "TABLE_ROWS",
    "TABLE_PROFILES",
    "LITERAL",
    "LITERAL_SUFFIX",
    "table_rows",
    "ACCEPTANCE",
    "ARCHITECTURES",
    "row_label",
    "FACTOR_STUDIES",
    "PROFILE_NOTES",
    "VARIANT_NOTE",
    "PROFILES",
    "PARTS",
    "RECORD_NAME",
    "ReproductionPlan",
    "plan_reproduction",
    "run_reproduction",
    "write_reproduction_report",
    "check_report_path",
    "reproduce",
]

#: The rows of the paper's Table 1, one preset each.
TABLE_ROWS = ("mnist-mlp", "cifar10-lenet", "cifar10-alexnet", "cifar10-vgg13", "cifar10-resnet20")

#: The profiles of ``pbrf reproduce``.
PROFILES = ("cpu", "paper", "tiny")

#: The parts that ``--only`` can choose.
PARTS = ("table", "factors")

#: Per profile of ``pbrf reproduce``: the preset profile the table rows run with, ``--set``
#: overrides applied to every row, and whether each row of :data:`LITERAL` is followed by its
#: literal variant (``"literal"``, default true).
TABLE_PROFILES = {
    "cpu": {"profile": "cpu", "sets": ()},
    "paper": {"profile": "paper", "sets": ()},
    "tiny": {"profile": "tiny", "sets": ()},
}

#: The rows whose presets build a smooth variant of the paper's architecture, and the ``--set``
#: overrides of its literal one (ReLU, and max-pooling where the architecture pools that way;
#: ResNet-20's global average pooling is its own). Each such row is followed in the table by a
#: run of the literal variant, ``<row>`` + :data:`LITERAL_SUFFIX`.
LITERAL = {
    "cifar10-lenet": ("model.activation=relu", "model.pooling=max"),
    "cifar10-alexnet": ("model.activation=relu", "model.pooling=max"),
    "cifar10-vgg13": ("model.activation=relu", "model.pooling=max"),
    "cifar10-resnet20": ("model.activation=relu",),
}
LITERAL_SUFFIX = "-literal"

#: Minimum test accuracy of θ^s per row (the base model must be a reasonable classifier).
ACCEPTANCE = {
    "mnist-mlp": 0.95,
    "cifar10-lenet": 0.40,
    "cifar10-alexnet": 0.45,
    "cifar10-vgg13": 0.45,
    "cifar10-resnet20": 0.50,
}

#: The row labels of the report's table (:func:`row_label` adds the model's activation and
#: pooling, read from the row's config).
ARCHITECTURES = {
    "mnist-mlp": "MLP (MNIST)",
    "cifar10-lenet": "LeNet (CIFAR-10)",
    "cifar10-alexnet": "AlexNet (CIFAR-10)",
    "cifar10-vgg13": "VGG13 (CIFAR-10)",
    "cifar10-resnet20": "ResNet-20 (CIFAR-10)",
}

#: Under the report's table: which variant the rows build, and how to get the literal one.
VARIANT_NOTE = (
    "Each label names the activation (and pooling) of the row's model, read from its config. The "
    "CIFAR-10 presets build smooth variants (GELU, average pooling; ResNet-20 keeps its global "
    "average pooling): ReLU and max-pooling make the PBRF objective non-smooth, and at a kink no "
    "gradient certificate can hold. Each such row is followed by its literal variant (ReLU, "
    "max-pooling where the architecture pools that way), a run of its own, e.g. `pbrf run "
    "cifar10-lenet --set model.activation=relu --set model.pooling=max`: its correlations use "
    "only the removals it certified (the other ones are left out of its statistics), and its "
    "certification counts are in the table below."
)

#: Per profile: the preset and preset profile of the factor studies, the seeds per value,
#: optional ``--set`` overrides (``"sets"``) and the values of each of the six factors.
FACTOR_STUDIES = {
    "tiny": {
        "preset": "digits-mlp", "profile": "tiny", "seeds": 2,
        "sets": ("data.n_train=60", "removals.n_removals=2", "removals.n_test_points=2",
                 "run.chunk_size=2"),
        "values": {"width": [8, 16, 32], "depth": [1, 2, 3], "epochs": [10, 20, 40],
                   "weight_decay": [1e-4, 1e-3, 1e-2], "damping": [1e-2, 1e-1, 1.0],
                   "fraction": [0.01, 0.02, 0.05]},
    },
    "cpu": {
        "preset": "digits-mlp", "profile": "factors", "seeds": 3,
        "values": {"width": [8, 32, 128], "depth": [1, 2, 3], "epochs": [10, 40, 160],
                   "weight_decay": [1e-4, 1e-3, 1e-2], "damping": [1e-3, 1e-2, 1e-1],
                   "fraction": [0.005, 0.02, 0.08]},
    },
    "paper": {
        "preset": "mnist-mlp", "profile": "paper", "seeds": 3, "sets": ("run.seeds=1",),
        "values": {"width": [16, 64, 256, 1024], "depth": [1, 2, 3, 4],
                   "epochs": [10, 40, 160, 640], "weight_decay": [1e-5, 1e-4, 1e-3, 1e-2],
                   "damping": [1e-4, 1e-3, 1e-2, 1e-1], "fraction": [0.001, 0.005, 0.02, 0.08]},
    },
}

#: What a reader must know about a profile's scale, printed near the top of its report.
PROFILE_NOTES = {
    "cpu": (
        "**Scale.** The `cpu` profile is sized for 2 CPU cores. Certifying a PBRF takes Newton "
        "steps whose float64 curvature products cost, per training image and vector, about 1 ms "
        "(LeNet, width ×0.5), 4.5 ms (AlexNet ×0.125), 13 ms (ResNet-20 ×0.25) and 14 ms "
        "(VGG13 ×0.125) on this machine (`pbrf run PRESET --profile cpu --dry-run` estimates it "
        "for any size), so a CNN row with 3 seeds × 6 removals fits in about half an hour only "
        "with 64–256 CIFAR-10 training images: those base models are far below the paper's "
        "accuracy and below this project's acceptance thresholds, and their rows test the "
        "machinery, not the paper's claim. The CNN rows omit the proximal response (its "
        "continuation from a non-converged θ^s took over 15 minutes per seed for LeNet); each "
        "is followed by its literal ReLU / max-pooling variant at the same sizes. The MLP "
        "row (MNIST, 5,000 training images) and the factor studies (digits, 300 training "
        "images) are at a scale where the numbers mean something. The `paper` profile (full "
        "data, one large GPU) is the reproduction proper."
    ),
    "tiny": "**Scale.** A smoke test: every size is minimal and the numbers mean nothing.",
}

#: The record of wall times, in the output folder.
RECORD_NAME = "reproduce.json"


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def table_rows(profile: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(row, preset, --set overrides of the row)`` of every table row of ``profile``, in the
    report's order: :data:`TABLE_ROWS`, each row of :data:`LITERAL` followed by its literal variant
    (``row`` + :data:`LITERAL_SUFFIX`) unless the profile's ``"literal"`` is false.
    """
    literal = TABLE_PROFILES[profile].get("literal", True)
    out = []
    for row in TABLE_ROWS:
        out.append((row, row, ()))
        if literal and row in LITERAL:
            out.append((row + LITERAL_SUFFIX, row, tuple(LITERAL[row])))
    return out


def _preset(row: str) -> str:
    """The preset of a table row (a literal variant's is its smooth row's)."""
    return row.removesuffix(LITERAL_SUFFIX)


def row_label(row: str, config: ExperimentConfig | None) -> str:
    """A table row's name in the report: its :data:`ARCHITECTURES` label (else the preset's name)
    with the activation and pooling that ``config`` builds (:func:`pbrf.models.variant_label`),
    e.g. ``"LeNet (CIFAR-10; GELU, avg-pool)"``; the bare label when ``config`` is ``None``.
    """
    base = ARCHITECTURES.get(_preset(row), row)
    variant = "" if config is None else variant_label(config.model.name, config.model.options)
    if not variant:
        return base
    return f"{base[:-1]}; {variant})" if base.endswith(")") else f"{base} ({variant})"


@dataclass
class ReproductionPlan:
    """A validated reproduction: what runs where; nothing written yet."""

    profile: str
    out: Path
    parts: tuple[str, ...]
    rows: list[tuple[str, ExperimentConfig | None, Path]] = field(default_factory=list)
    sweep: SweepPlan | None = None
    overwrite: bool = False
    #: run directories (as strings) already finished, with the same config, when planned
    finished: set = field(default_factory=set)
    #: where the report goes (checked writable when planned)
    report: Path | None = None

    def configs(self, one_seed: bool = False) -> list[ExperimentConfig]:
        """Every config that this plan runs (with ``one_seed``, one per factor value)."""
        out = [c for _, c, _ in self.rows] if "table" in self.parts else []
        if "factors" in self.parts and self.sweep is not None:
            out += ([cfgs[0] for fp in self.sweep.factors for cfgs in fp.configs] if one_seed
                    else self.sweep.configs())
        return out


# ---------------------------------------------------------------------------- plan
def _finished(config: ExperimentConfig, run_dir: Path, overwrite: bool) -> bool:
    """Whether ``run_dir`` already holds a finished run of ``config`` (read only)."""
    if overwrite or not (run_dir / "summary.json").is_file():
        return False
    try:
        return check_run_dir(run_dir, config, False) == "resume"
    except ConfigError:
        return False


def _row_config(preset: str, profile: str, sets: Sequence[str],
                variant: Sequence[str] = ()) -> ExperimentConfig:
    table = TABLE_PROFILES[profile]
    return load_preset(preset, table["profile"],
                       list(table.get("sets", ())) + list(variant) + list(sets))


def _factor_plan(profile: str, out: Path, sets: Sequence[str], overwrite: bool) -> SweepPlan:
    study = FACTOR_STUDIES[profile]
    factors = [(f, list(study["values"][f])) for f in SWEEP_FACTORS if f in study["values"]]
    return plan_sweep(study["preset"], study["profile"], factors,
                      sets=list(study.get("sets", ())) + list(sets), seeds=int(study["seeds"]),
                      out=out / "factors", overwrite=overwrite)


def plan_reproduction(
    profile: str = "cpu",
    out: str | Path | None = None,
    *,
    only: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    check_data: bool = True,
    report: str | Path | None = None,
) -> ReproductionPlan:
    """Resolve and check everything a reproduction runs; nothing is written.

    Args:
        profile: one of :data:`PROFILES`.
        out: the output folder (default ``runs/reproduce-<profile>``).
        only: ``"table"`` or ``"factors"`` to run one part (default both).
        device: ``"cpu"`` or ``"cuda"``: ``run.device`` of every run.
        overwrite: start every run directory afresh.
        check_data: load each run's data and build its model (:func:`prepare_inputs`, then
            dropped) so that missing data or a model too big stop the command before any run.
        report: the report's path (default ``OUT/reproduction.md``), checked by
            :func:`check_report_path` before anything else is read.

    Returns:
        The :class:`ReproductionPlan`.

    Raises:
        ConfigError: unknown profile or part, a config that does not resolve, a run directory
            that holds another config.
        pbrf.data.DataError: missing or corrupt data.
    """
    if profile not in PROFILES:
        raise ConfigError(f"pbrf reproduce: unknown profile {profile!r}; choose one of "
                          f"{', '.join(PROFILES)}.")
    if only is not None and only not in PARTS:
        raise ConfigError(f"pbrf reproduce: --only {only!r} is not a part; choose one of "
                          f"{', '.join(PARTS)}.")
    out = Path(out) if out else Path("runs") / f"reproduce-{profile}"
    report = check_report_path(report if report else out / "reproduction.md", out)
    sets = [f"run.device={json.dumps(device)}"] if device else []
    parts = (only,) if only else PARTS
    plan = ReproductionPlan(profile, out, parts, overwrite=overwrite, report=report)
    plan.rows = _plan_rows(profile, out, sets, "table" in parts, overwrite)
    if "factors" in parts:
        plan.sweep = _factor_plan(profile, out, sets, overwrite)
    else:
        try:
            plan.sweep = _factor_plan(profile, out, sets, False)
        except ConfigError:
            plan.sweep = None
    if check_data:
        # the seeds of a value differ only in train.seed: one check per value
        for config in plan.configs(one_seed=True):
            prepare_inputs(config)  # raises on missing data; the inputs are not kept
    plan.finished = _finished_runs(plan, overwrite)
    return plan


def check_report_path(path: str | Path, out: Path) -> Path:
    """``path`` if the report can be written there: not a folder, not the record
    ``OUT/reproduce.json``, and its folder (with ``img/reproduction/``) creatable and writable —
    tried the way the writer will, by creating a temporary file in the nearest existing folder,
    which is removed again. Returns ``path``.

    Raises:
        ConfigError: naming the path and the fix.
    """
    text, path = str(path), Path(path)
    if path.is_dir() or text.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise ConfigError(f"pbrf reproduce: --report {text!r} is a folder; pass a file path, "
                          f"e.g. --report {os.path.join(text, 'reproduction.md')!r}.")
    where, out_dir = path.resolve(), Path(out).resolve()
    if where == out_dir or where in out_dir.parents:  # the runs will make it a folder
        raise ConfigError(f"pbrf reproduce: --report {text!r} is the --out folder or holds it; "
                          "pass a file path, e.g. --report "
                          f"{str(Path(out) / 'reproduction.md')!r}.")
    if where == out_dir / RECORD_NAME:
        raise ConfigError(f"pbrf reproduce: --report {text!r} is the wall-time record of --out; "
                          "pass another report path, e.g. --report "
                          f"{str(Path(out) / 'reproduction.md')!r}.")
    for folder in (path.parent, path.parent / "img" / "reproduction"):
        _check_creatable(folder, text)
    return path


def _check_creatable(folder: Path, report: str) -> None:
    """Raise ConfigError unless ``folder`` exists or can be created, and a file can be created in
    it (tried in its nearest existing ancestor; nothing is left behind).
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = None
    if not existing.is_dir():
        why = f"{str(existing)!r} is not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            why = f"{str(existing)!r} is not writable ({err.strerror or err})"
    if why is not None:
        raise ConfigError(f"pbrf reproduce: cannot write the report {report!r}: {why}; pass "
                          "--report PATH in a writable folder.")


def _plan_rows(profile: str, out: Path, sets: Sequence[str], run: bool,
               overwrite: bool) -> list[tuple[str, ExperimentConfig | None, Path]]:
    """``(row, config, run_dir)`` of every table row; with ``run`` each run directory is checked,
    else (the rows are only reported, when already finished) a row whose config does not resolve
    has ``None``.
    """
    rows = []
    for row, preset, variant in table_rows(profile):
        run_dir = out / "table" / row
        if run:
            config = _row_config(preset, profile, sets, variant)
            check_out_dir(run_dir, config, overwrite)
        else:  # only reported, when already finished
            try:
                config = _row_config(preset, profile, sets, variant)
            except ConfigError:
                config = None
        rows.append((row, config, run_dir))
    return rows


def _finished_runs(plan: ReproductionPlan, overwrite: bool) -> set[str]:
    """The run directories of the plan that already hold a finished run of their config."""
    finished = set()
    for _, config, run_dir in plan.rows:
        if config is not None and _finished(config, run_dir, overwrite):
            finished.add(str(run_dir))
    if plan.sweep is not None:
        for fp in plan.sweep.factors:
            for _, config, run_dir in fp.runs():
                if _finished(config, run_dir, overwrite):
                    finished.add(str(run_dir))
    return finished


# ---------------------------------------------------------------------------- record
def read_record(out: Path) -> dict:
    """``OUT/reproduce.json`` (an empty record when absent or unreadable)."""
    try:
        record = json.loads((Path(out) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    record.setdefault("table", {})
    record.setdefault("factors", {})
    return record


def _write_record(out: Path, record: dict) -> None:
    atomic_write(Path(out) / RECORD_NAME, dumps(record, nonfinite="null", indent=2) + "\n")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _timed_entry(previous: dict | None, seconds: float, was_finished: bool) -> dict:
    """A run's record: kept when it was finished before this command and has a recorded time."""
    if was_finished and previous and previous.get("seconds") is not None:
        return previous
    return {"seconds": seconds, "recorded": _now(),
            # finished before this command, with no recorded time: ``seconds`` is only the read
            "finished_before_record": was_finished}


def part_seconds(entry: dict | None) -> float | None:
    """The seconds a part took: its own (a table row) or the sum over its runs (a factor)."""
    if not entry:
        return None
    if "runs" in entry:
        secs = [r.get("seconds") for r in entry["runs"].values()]
        return float(sum(secs)) if secs and None not in secs else None
    return entry.get("seconds")


def _current(plan: ReproductionPlan, record: dict) -> dict:
    """The record without entries of runs that are not in the plan (e.g. of other values)."""
    rows = {row for row, _, _ in plan.rows}
    record["table"] = {k: v for k, v in record["table"].items() if k in rows}
    if plan.sweep is not None:
        root = plan.sweep.out
        planned = {fp.factor: {Path(d).relative_to(root).as_posix() for _, _, d in fp.runs()}
                   for fp in plan.sweep.factors}
        factors = {}
        for factor, entry in record["factors"].items():
            runs = {k: v for k, v in (entry.get("runs") or {}).items()
                    if k in planned.get(factor, ())}
            if runs:
                factors[factor] = {**entry, "runs": runs}
        record["factors"] = factors
    return record


# ---------------------------------------------------------------------------- run
def _default_run(config, run_dir, **kwargs) -> dict:
    return run_experiment(config, run_dir, **kwargs)


def run_reproduction(
    plan: ReproductionPlan,
    *,
    executor=None,
    progress: bool = True,
    run: Callable[..., dict] | None = None,
    command: str | None = None,
) -> dict:
    """Run the planned parts (each run resumes) and record their wall times.

    Args:
        plan: from :func:`plan_reproduction`.
        executor: passed to every :func:`~pbrf.experiment.run.driver.run_experiment`.
        progress: show progress bars.
        run: ``run(config, run_dir, executor=..., overwrite=..., progress=..., inputs=...)``
            returning the summary (default ``run_experiment``).
        command: the command line, stored in the record.

    Returns:
        ``{"table": {row: summary}, "factors": [FactorResult, ...], "record": record}`` for the
        parts run.
    """
    record = _current(plan, read_record(plan.out))
    record.update(profile=plan.profile, command=command, updated=_now())
    plan.out.mkdir(parents=True, exist_ok=True)
    timed = _TimedRun(plan, run or _default_run, command, record)
    table = _run_table(plan, timed, executor, progress) if "table" in plan.parts else {}
    factors = []
    if "factors" in plan.parts and plan.sweep is not None:
        factors = _run_factors(plan, timed, executor, progress)
    record = _current(plan, read_record(plan.out)) | {"profile": plan.profile,
                                                       "command": command, "updated": _now()}
    parts = [part_seconds(e) for e in [*record["table"].values(), *record["factors"].values()]]
    record["total_seconds"] = float(sum(x for x in parts if x is not None))
    _write_record(plan.out, record)
    return {"table": table, "factors": factors, "record": record}


@dataclass
class _TimedRun:
    """One run through ``run``, timed, its entry added to ``OUT/reproduce.json`` at once."""

    plan: ReproductionPlan
    run: Callable[..., dict]
    command: str | None
    record: dict

    def __call__(self, config, run_dir, entry_of, **kwargs) -> dict:
        """Run ``config`` in ``run_dir`` and record its seconds under ``entry_of(record)``, a
        ``(holder, key)`` pair; returns the summary.
        """
        plan = self.plan
        t0 = time.perf_counter()
        summary = self.run(config, run_dir, **kwargs)
        seconds = time.perf_counter() - t0
        was = str(run_dir) in plan.finished
        holder, key = entry_of(self.record)
        holder[key] = _timed_entry(holder.get(key), seconds, was)
        # another command may run the other part at the same time (--only table next to --only
        # factors): add this entry to the record as it is on disk now, not to the one read at start
        fresh = read_record(plan.out)
        fresh_holder, _ = entry_of(fresh)
        fresh_holder[key] = holder[key]
        _write_record(plan.out, {**fresh, "profile": plan.profile, "command": self.command,
                                 "updated": _now()})
        return summary


def _run_table(plan: ReproductionPlan, timed: _TimedRun, executor, progress: bool) -> dict:
    """Run every table row; returns ``{row: summary}``."""
    table = {}
    for i, (row, config, run_dir) in enumerate(plan.rows, 1):
        print(f"== table row {i}/{len(plan.rows)}: {row} ==", file=sys.stderr)
        try:
            table[row] = timed(config, run_dir, lambda rec, r=row: (rec["table"], r),
                               executor=executor, overwrite=plan.overwrite,
                               progress=progress, inputs=None)
        except OSError as err:
            raise name_os_error(err, run_dir) from None
    return table


def _run_factors(plan: ReproductionPlan, timed: _TimedRun, executor,
                 progress: bool) -> list[FactorResult]:
    """Run every factor study of the plan's sweep, each run's time recorded under its factor."""
    root = plan.sweep.out

    def sweep_run(config, run_dir, **kwargs):
        key = Path(run_dir).relative_to(root).as_posix()
        factor = key.split("=", 1)[0]

        def entry_of(rec):
            return rec["factors"].setdefault(factor, {"runs": {}})["runs"], key

        return timed(config, run_dir, entry_of, **kwargs)

    def announce(i, n, fp):
        print(f"== factor {i}/{n}: {fp.factor} ==", file=sys.stderr)

    return run_sweep(plan.sweep, executor=executor, overwrite=plan.overwrite,
                     progress=progress, run=sweep_run, on_factor=announce)


# ---------------------------------------------------------------------------- report
def _load_summary(config: ExperimentConfig | None, run_dir: Path) -> dict | None:
    """A finished run's summary (same config), else None."""
    if config is None or not _finished(config, run_dir, False):
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _available(plan: ReproductionPlan, results: dict) -> tuple[dict, list[FactorResult]]:
    """Summaries of every finished part: those run now and those finished before."""
    table = dict(results.get("table") or {})
    for row, config, run_dir in plan.rows:
        if row not in table:
            summary = _load_summary(config, run_dir)
            if summary is not None:
                table[row] = summary
    done = {r.factor: r for r in results.get("factors") or []}
    factors = []
    for fp in plan.sweep.factors if plan.sweep is not None else []:
        if fp.factor in done:
            factors.append(done[fp.factor])
            continue
        per_value = [[_load_summary(c, d) for c, d in zip(cfgs, ds)]
                     for cfgs, ds in zip(fp.configs, fp.dirs)]
        if all(s is not None for seeds in per_value for s in seeds):
            factors.append(FactorResult(fp.factor, fp.values, per_value))
    return table, factors


def _stored_config(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _settings_row(name: str, config: dict) -> list[str]:
    """The key settings of a row (labelled ``name``), from its stored ``config.json``."""
    def get(*keys):
        v = report.nested_get(config, *keys)
        return "—" if v is None else report.fmt_setting(v)

    model = config.get("model") or {}
    opts = model.get("options") or {}
    size = ", ".join(f"{k} {report.fmt_setting(opts[k])}" for k in ("width", "width_mult",
                                                                           "depth") if k in opts)
    removals = config.get("removals") or {}
    group = removals.get("group_fraction") or 0
    what = (f" (groups of {100 * group:g}% of N)" if group
            else f" (groups of {removals['group_size']})" if removals.get("group_size", 1) != 1
            else "")
    return [name, get("data", "n_train"),
            f"{model.get('name', '—')}" + (f" ({size})" if size else ""), get("train", "epochs"),
            get("influence", "damping"), get("train", "weight_decay"),
            f"{get('removals', 'n_test_points')} × {get('removals', 'n_removals')}{what}",
            get("responses", "cold_seeds"), get("run", "seeds") if report.nested_get(
                config, "run", "seeds") is not None else "1",
            get("responses", "tol")]


_TABLE_COLUMNS = (
    ("cold-start LOO", "correlations.cold"),
    ("warm-start LOO", "correlations.warm"),
    ("PBRF", "correlations.pbrf"),
    ("warm-start (paired)", "paired.correlations.warm"),
    ("proximal", "correlations.proximal"),
)


def _seconds(x) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    if x < 120:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.2f} h"


def _certified(summary: dict, kind: str) -> str:
    cert = summary.get("certificates") or {}
    entry = (cert.get("by_kind") or {}).get(kind) or {}
    if "certified" not in entry:
        return "n/a"
    return f"{entry['certified']} of {cert.get('n_removals', 'n/a')}"


def _machine(plan: ReproductionPlan) -> dict:
    devices = sorted({c.run.device for c in plan.configs() if c is not None}) or ["cpu"]
    gpu = any(d.startswith("cuda") for d in devices) and torch.cuda.is_available()
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "devices": devices, "gpu": torch.cuda.get_device_name(0) if gpu else None,
            "platform": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "torch": torch.__version__}


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def write_reproduction_report(
    plan: ReproductionPlan, results: dict, path: str | Path, command: str,
) -> Path:
    """Write the reproduction report (markdown) and its figures; returns its path.

    Figures go to ``<report dir>/img/reproduction/`` and are linked relatively. Parts finished by
    an earlier command are included; parts not run yet are listed as such.
    """
    path = Path(path)
    img = path.parent / "img" / "reproduction"
    img.mkdir(parents=True, exist_ok=True)
    record = results.get("record") or _current(plan, read_record(plan.out))
    table, factors = _available(plan, results)
    lines = _report_head(plan, record, table, factors, command)
    lines += _table_section(plan, table, img, path)
    lines += _factor_section(plan, factors, img, path)
    atomic_write(path, "\n".join(lines).rstrip() + "\n")
    return path


def _report_head(plan: ReproductionPlan, record: dict, table: dict,
                 factors: list[FactorResult], command: str) -> list[str]:
    """The report's title, the command, the machine, the profile's scale and the wall times."""
    machine = _machine(plan)
    finished = {r.factor for r in factors}  # an unfinished part has no time yet
    row_secs = {row_label(row, config): part_seconds(record["table"].get(row)) if row in table
                else None for row, config, _ in plan.rows}
    factor_secs = {f: part_seconds(record["factors"].get(f)) if f in finished else None
                   for f in (FACTOR_STUDIES[plan.profile]["values"])}
    known = [s for s in [*row_secs.values(), *factor_secs.values()] if s is not None]

    lines = [f"# Reproduction of Bae et al. (2022), profile `{plan.profile}`", "",
             f"Produced by `{command}` on {_now()} with pbrf {pbrf.__version__} "
             f"(torch {machine['torch']}, Python {machine['python']}).", "",
             f"Machine: {machine['cpus']} CPUs ({machine['platform']}), "
             f"{machine['torch_threads']} torch threads, device "
             f"{', '.join(machine['devices'])}.", "",
             (f"GPU: used ({machine['gpu']})." if machine["gpu"]
              else "GPU: not used (every run on the CPU)."), ""]
    if plan.profile != "paper":
        lines += [f"The `paper` profile (sized for one large GPU) was not run here; these are the "
                  f"`{plan.profile}` profile's numbers.", ""]
    if PROFILE_NOTES.get(plan.profile):
        lines += [PROFILE_NOTES[plan.profile], ""]
    lines += [f"Total wall time of the computation: {_seconds(sum(known)) if known else 'n/a'} "
              "(each part's time is the time it took when it was computed; a part finished by "
              "an earlier command keeps that time).", ""]
    time_rows = [[f"table: {name}", _seconds(s)] for name, s in row_secs.items()]
    time_rows += [[f"factor: {f}", _seconds(s)] for f, s in factor_secs.items()]
    lines += [report.md_table(["part", "wall time"], time_rows), ""]
    return lines


def _table_section(plan: ReproductionPlan, table: dict, img: Path, path: Path) -> list[str]:
    """The paper's Table 1 from the rows' summaries, θ^s quality, certificates, settings and a
    decomposition figure per row (written to ``img``, linked relative to the report ``path``).
    """
    lines = ["## Influence vs the response functions (the paper's Table 1)", ""]
    header = ["architecture"] + [f"{label} {m}" for label, _ in _TABLE_COLUMNS
                                 for m in ("P", "S")]
    body, quality, certs, settings, figures = [], [], [], [], []
    for row, config, run_dir in plan.rows:
        name = row_label(row, config)
        s = table.get(row)
        if s is None:
            body.append([name] + ["not run"] * (len(header) - 1))
            continue
        body.append([name] + [report.fmt_mean_std(s, f"{key}.{m}") for _, key in _TABLE_COLUMNS
                              for m in ("pearson", "spearman")])
        acc, _ = report.mean_std(s, "theta_s.test_metric")
        threshold = ACCEPTANCE.get(_preset(row))
        verdict = ("—" if threshold is None or acc is None
                   else "met" if acc >= threshold else "NOT met")
        quality.append([name, report.fmt_mean_std(s, "theta_s.test_metric", fmt=_percent),
                        "—" if threshold is None else f"≥ {_percent(threshold)}", verdict])
        certs.append([name, _certified(s, "pbrf"), _certified(s, "proximal")])
        settings.append(_settings_row(name, _stored_config(run_dir)))
        fig = report.plot_decomposition(s, img / f"decomposition-{row}.png")
        figures += [f"#### {name}", "", f"![decomposition of {name}]({_rel(fig, path.parent)})",
                    ""]
    not_run = [row_label(r, c) for r, c, _ in plan.rows if r not in table]
    lines += [report.md_table(header, body), ""]
    if not_run:
        lines += [f"Not run yet: {', '.join(not_run)} (`pbrf reproduce --profile {plan.profile}` "
                  "computes what is missing).", ""]
    lines += ["P = Pearson, S = Spearman correlation of the influence estimate with each response "
              "function over the certified (test point, removal) pairs; mean ± standard deviation "
              "over seeds where a row ran several. The first three response functions are the "
              "paper's columns; \"warm-start (paired)\" is measured against the no-removal "
              "continuation (the removal's own effect), \"proximal\" is the literal chain's.", "",
              VARIANT_NOTE, ""]
    if quality:
        lines += ["### Quality of θ^s", "", report.md_table(
            ["architecture", "test accuracy of θ^s", "acceptance", "verdict"], quality), ""]
        lines += ["### Certified responses", "",
                  report.md_table(["architecture", "PBRF certified", "proximal certified"],
                                   certs), "",
                  "Counts of removals whose optimised response is certified (ρ ≤ threshold), "
                  "summed over seeds where a row ran several.", ""]
        lines += ["### Settings", "", report.md_table(
            ["architecture", "N", "model", "epochs", "damping", "weight decay",
             "test points × removals", "cold seeds", "seeds", "responses.tol"], settings),
            "", "Read from each run's `config.json`.", ""]
        lines += ["### Decomposition of the mismatch", "", *figures]
    return lines


def _factor_section(plan: ReproductionPlan, factors: list[FactorResult], img: Path,
                    path: Path) -> list[str]:
    """The factor studies: the sweep's outputs (rewritten), and per factor its section with the
    figure copied to ``img``; the factors not run yet are named.
    """
    study = FACTOR_STUDIES[plan.profile]
    lines = [f"## Factor studies ({study['preset']}, profile {study['profile']}, "
             f"{study['seeds']} seeds per value)", ""]
    swept = {}
    if plan.sweep is not None and factors:
        swept = write_sweep(plan.sweep.out, factors, sweep_title(
            [r.factor for r in factors], study["preset"], study["profile"], int(study["seeds"])))
    done = {r.factor for r in factors}
    for r in factors:
        copied = _copy(swept[r.factor], img / f"factor-{r.factor}.png")
        lines += [sweep_markdown(r.factor, r.values, r.per_value, copied, path.parent,
                                 heading="###"), ""]
    missing = [f for f in study["values"] if f not in done]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)} (`pbrf reproduce --profile {plan.profile}` "
                  "computes what is missing).", ""]
    lines += ["Gaps: " + ", ".join(analysis.GAPS) + " (see the README's conventions).", ""]
    return lines


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def reproduce(
    profile: str = "cpu",
    out: str | Path | None = None,
    *,
    only: str | None = None,
    report: str | Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
    executor=None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Plan, run and report a reproduction in one call; returns the report's path."""
    plan = plan_reproduction(profile, out, only=only, device=device, overwrite=overwrite,
                             report=report)
    command = command or f"pbrf reproduce --profile {profile}"
    results = run_reproduction(plan, executor=executor, progress=progress, command=command)
    return write_reproduction_report(plan, results, plan.report, command)
