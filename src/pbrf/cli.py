"""The ``pbrf`` command.

::

    pbrf run [PRESET|CONFIG.toml] [--profile quick|paper|tiny] [--set key=value ...] [--out DIR]
             [--overwrite] [--executor local|ray] [--ray-address ADDR] [--device cpu|cuda]
             [--no-progress]
    pbrf sweep PRESET --factor width|depth|epochs|weight_decay|damping|fraction --values v1,v2,...
               [--seeds N] [--out DIR] (and the options of ``pbrf run``)
    pbrf reproduce [--profile cpu|paper|tiny] [--only table|factors] [--out DIR] [--report PATH]
                   [--threads N] [--executor local|ray] [--ray-address ADDR] [--device cpu|cuda]
                   [--overwrite] [--no-progress]
    pbrf table RUN_DIR [RUN_DIR ...] [--markdown]
    pbrf evaluate --scores FILE --run DIR [--json]
    pbrf presets
    pbrf download NAME [--root DIR]

``pbrf reproduce`` runs the paper's main table (five architectures) and its six factor studies
(:mod:`pbrf.experiment.studies.reproduce`), resumably: the same command again computes only what is
missing; it records the wall time of each part in ``OUT/reproduce.json`` and writes a report.

Errors in the input (unknown preset, bad ``--set``, missing data, a run directory holding another
config) print one line on stderr and exit with status 2, without a traceback and without writing
anything. A failure of the machine (disk full, ``ulimit -f``, read-only file system) prints one line
naming the file and the cause and exits with status 1; the same command resumes once it is fixed.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import torch

from pbrf import data, estimators
from pbrf.data import DataError
from pbrf.experiment import report
from pbrf.experiment.bench import evaluate, leaderboard, study
from pbrf.experiment.config import ConfigError, list_presets, parse_set, resolve
from pbrf.experiment.run.driver import prepare_inputs, run_experiment
from pbrf.experiment.run.dryrun import dry_run, format_dry_run
from pbrf.experiment.run.executors import get_executor
from pbrf.experiment.run.rundir import check_out_dir
from pbrf.experiment.studies import reproduce, sweep
from pbrf.experiment.studies.sweep import SWEEP_FACTORS
from pbrf.fileio import name_os_error

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A command-line usage error (exit 2, one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------- parser
def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="quick",
                   help="preset profile: quick (2 CPU cores, default), paper (GPU), tiny (tests)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. --set influence.damping=1e-2 "
                        "(repeatable)")
    _add_execution_options(
        p, overwrite="start the output directory afresh, discarding the run it holds (of any "
                     "config; "
                     "without it a run of the same config resumes)",
        device="override run.device",
        threads="torch intra-op threads (default: torch's choice; on a busy machine 1 or 2 "
                "is often "
                "many times faster for small models)")


def _add_execution_options(p: argparse.ArgumentParser, overwrite: str, device: str,
                           threads: str) -> None:
    """The options of ``pbrf run`` and ``pbrf reproduce`` on how runs execute (the help texts of
    ``--overwrite``, ``--device`` and ``--threads`` given).
    """
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where chunks run (default local)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a "
                                                       "local Ray with 2 CPUs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help=device)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=None, help=threads)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")


def build_parser() -> argparse.ArgumentParser:
    """The ``pbrf`` argument parser."""
    parser = _Parser(prog="pbrf", description="Influence functions vs. the proximal Bregman "
                                              "response function (Bae et al. 2022).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="run one experiment and write its report",
                         description="Train θ^s, compute influence and the five response "
                                     "functions, decompose the mismatch, write a report.")
    run.add_argument("spec", nargs="?", default="digits-mlp", metavar="PRESET|CONFIG.toml",
                     help="a built-in preset (default digits-mlp; see `pbrf presets`) or a TOML "
                          "config file")
    run.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    run.add_argument("--dry-run", action="store_true",
                     help="print sizes, budgets and estimates of peak memory and compute "
                          "(probes at small sizes, extrapolated; seconds); write nothing")
    _add_run_options(run)

    sweep = sub.add_parser("sweep",
                           help="one run per value of a factor, then a gaps-vs-factor plot",
                           description="Run a preset once per value of a factor and plot the gaps "
                                       "against it.")
    sweep.add_argument("spec", metavar="PRESET|CONFIG.toml",
                       help="a built-in preset or a TOML config file")
    sweep.add_argument("--factor", required=True, action="append", choices=tuple(SWEEP_FACTORS),
                       help="the factor to vary (repeatable, each with its own --values)")
    sweep.add_argument("--values", required=True, action="append",
                       help="comma-separated values, e.g. 16,32,64 (one --values per --factor)")
    sweep.add_argument("--seeds", type=int, default=1,
                       help="seeds per value (train.seed + 0..N-1): mean ± std error bars "
                            "(default 1)")
    sweep.add_argument("--out", default=None, help="sweep directory (default "
                                                   "runs/<name>-sweep-<factor>[-<factor>...])")
    _add_run_options(sweep)

    rep = sub.add_parser(
        "reproduce", help="the paper's main table and six factor studies, then a report",
        description="Run the five architectures of the paper's Table 1 and its six factor "
                    "studies (resumable: rerun the same command to compute what is missing), "
                    "record the wall time of each part (OUT/reproduce.json) and write a "
                    "reproduction report.")
    rep.add_argument("--profile", choices=("cpu", "paper", "tiny"), default="cpu",
                     help="cpu (a few CPU cores, default), paper (one large GPU), tiny (tests)")
    rep.add_argument("--only", choices=("table", "factors"), default=None,
                     help="run one part only (default both)")
    rep.add_argument("--out", default=None,
                     help="output folder (default runs/reproduce-<profile>)")
    rep.add_argument("--report", default=None,
                     help="report path (default OUT/reproduction.md); figures go to "
                          "<its folder>/img/reproduction/")
    _add_execution_options(rep, overwrite="start every run directory afresh",
                           device="override run.device of every run",
                           threads="torch intra-op threads (default: torch's choice)")

    table = sub.add_parser("table",
                           help="correlation table (paper Table 1 layout) of finished runs",
                           description="Print the paper's Table 1 (Pearson/Spearman of influence "
                                       "vs each response) for runs.")
    table.add_argument("runs", nargs="+", metavar="RUN_DIR")
    table.add_argument("--markdown", action="store_true",
                       help="print markdown instead of aligned text")

    ev = sub.add_parser("evaluate",
                        help="correlate another library's scores with a run's responses",
                        description="Correlate external influence scores (.npy/.csv, "
                                    "[n_test, n_removals] or [n_test, n_train]) with every "
                                    "response function stored in a run.")
    ev.add_argument("--scores", required=True, metavar="FILE",
                    help=".npy or .csv scores, rows = the run's test points")
    ev.add_argument("--run", required=True, metavar="DIR", help="a finished run directory")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")

    est = sub.add_parser(
        "estimators", help="run attribution estimators on a finished run and rank them",
        description="Score every training point with each estimator, compare with the run's PBRF, "
                    "paired warm start, cold-start LOO and LDS, and write a leaderboard "
                    "(RUN_DIR/estimators/leaderboard.md, .json, .png). Resumable per estimator.")
    est.add_argument("runs", nargs="*", metavar="RUN_DIR",
                     help="finished run directories; several (with --out) make a study across "
                          "tasks")
    est.add_argument("--out", default=None, metavar="DIR",
                     help="write the cross-task study (study.md, .json, .png) here; each run's "
                          "own leaderboard still goes in RUN_DIR/estimators")
    est.add_argument("--methods", default=None,
                     help="comma-separated estimators (default: all built-in ones but kronfluence; "
                          "`pbrf estimators --list` shows them)")
    est.add_argument("--hp", action="append", default=[], metavar="METHOD.NAME=VALUE",
                     help="an estimator hyperparameter, e.g. --hp trak.dim=1024 "
                          "--hp arnoldi.rank=20")
    est.add_argument("--scores", action="append", default=[], metavar="LABEL=FILE",
                     help="also rank scores computed elsewhere (.npy/.csv, [n_test, N] or "
                          "[n_test, n_removals])")
    est.add_argument("--threads", type=int, default=None,
                     help="torch threads (default: torch's choice)")
    est.add_argument("--json", action="store_true", help="print the leaderboard as JSON")
    est.add_argument("--list", action="store_true", help="list the estimators and exit")

    sub.add_parser("presets", help="list the built-in presets",
                   description="List the built-in presets.")

    dl = sub.add_parser("download", help="download a dataset into the data root (verified, atomic)",
                        description="Download a dataset's files into --root (default $PBRF_DATA or "
                                    "~/.cache/pbrf).")
    dl.add_argument("name", help="dataset name, e.g. mnist, fashion-mnist, cifar10, energy, "
                                 "concrete, shakespeare")
    dl.add_argument("--root", default=None,
                    help="data root (default $PBRF_DATA, else ~/.cache/pbrf)")
    dl.add_argument("--base-url", default=None,
                    help="fetch from a mirror: {base-url}/{relative path}")
    return parser


# ---------------------------------------------------------------------------- commands
def _config_from_args(args):
    return resolve(args.spec, args.profile, list(args.sets) + _device_sets(args))


def _executor(args):
    if args.executor == "ray":
        try:
            import ray  # noqa: F401, PLC0415 - optional (pbrf[ray])
        except ImportError:
            raise UsageError("pbrf: --executor ray needs ray; install it with pip install "
                             "'pbrf[ray]'.") from None
    elif args.ray_address:
        raise UsageError("pbrf: --ray-address needs --executor ray.")
    try:
        return get_executor(args.executor, args.ray_address)
    except (ConnectionError, TimeoutError) as err:
        raise UsageError(f"pbrf: {err}") from None


def _run_one(config, out: Path, args, executor, inputs=None) -> dict:
    return run_experiment(config, out, executor=executor, overwrite=args.overwrite,
                          progress=not args.no_progress, inputs=inputs)


def cmd_run(args) -> int:
    """``pbrf run``."""
    config = _config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / config.name
    if args.dry_run:
        print(format_dry_run(dry_run(config, prepare_inputs(config))))
        return 0
    check_out_dir(out, config, args.overwrite)
    inputs = prepare_inputs(config)
    executor = _executor(args)
    try:
        summary = _run_one(config, out, args, executor, inputs)
    except OSError as err:
        raise _named(err, out) from None
    finally:
        executor.close()
    print(report.print_summary(summary))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _named(err: OSError, where: Path) -> OSError:
    """``err``, naming ``where`` (the run directory) when the failed call named no file."""
    return name_os_error(err, where)


def _parse_values(text: str) -> list:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError("--values must list at least one value, e.g. --values 16,32,64.")
    return [parse_set(f"v={v}")[1] for v in values]


def _device_sets(args) -> list[str]:
    return [f"run.device={json.dumps(args.device)}"] if args.device else []


def cmd_sweep(args) -> int:
    """``pbrf sweep``: validate every value of every factor first, then run them one by one.

    With ``--seeds N`` each value runs N times (``train.seed`` + 0..N-1, i.e. a different θ^s):
    the figures show mean ± standard deviation over seeds and ``sweep.md`` states, per factor,
    in which direction each gap moved and whether the error bars separate the values
    (:mod:`pbrf.experiment.studies.sweep`).
    """
    if len(args.factor) != len(args.values):
        raise UsageError(f"pbrf sweep: {len(args.factor)} --factor but {len(args.values)} "
                         "--values; give one --values per --factor.")
    if len(set(args.factor)) != len(args.factor):
        raise UsageError("pbrf sweep: a factor is given twice; list all its values in one "
                         "--values.")
    if args.seeds < 1:
        raise UsageError("pbrf sweep: --seeds must be a positive integer, e.g. --seeds 3.")
    factors = [(f, _parse_values(text)) for f, text in zip(args.factor, args.values)]
    plan = sweep.plan_sweep(args.spec, args.profile, factors, sets=args.sets + _device_sets(args),
                            seeds=args.seeds, out=args.out, overwrite=args.overwrite)
    inputs = {id(c): prepare_inputs(c) for c in plan.configs()}
    executor = _executor(args)
    try:
        results = sweep.run_sweep(plan, executor=executor, overwrite=args.overwrite,
                                  progress=not args.no_progress, inputs=inputs)
    finally:
        executor.close()
    sweep.write_sweep(plan.out, results,
                      sweep.sweep_title(args.factor, args.spec, args.profile, args.seeds))
    for result in results:
        print(report.format_table_text(sweep.sweep_table_rows(result, args.seeds)))
    print(f"\nsweep report: {plan.out / 'sweep.md'}")
    return 0


def _reproduce_command(args) -> str:
    """The command line of ``pbrf reproduce``, as the report states it."""
    parts = ["pbrf reproduce", "--profile", args.profile]
    for flag, value in (("--only", args.only), ("--out", args.out), ("--report", args.report),
                        ("--threads", args.threads), ("--device", args.device),
                        ("--ray-address", args.ray_address)):
        if value is not None:
            parts += [flag, shlex.quote(str(value))]
    if args.executor != "local":
        parts += ["--executor", args.executor]
    return " ".join(parts + (["--overwrite"] if args.overwrite else []))


def cmd_reproduce(args) -> int:
    """``pbrf reproduce``: validate every run first, run what is missing, write the report."""
    plan = reproduce.plan_reproduction(args.profile, args.out, only=args.only,
                                       device=args.device, overwrite=args.overwrite,
                                       report=args.report)
    command = _reproduce_command(args)
    executor = _executor(args)
    try:
        results = reproduce.run_reproduction(plan, executor=executor,
                                             progress=not args.no_progress, command=command)
    finally:
        executor.close()
    path = reproduce.write_reproduction_report(plan, results, plan.report, command)
    print(f"wall times: {plan.out / reproduce.RECORD_NAME}")
    print(f"reproduction report: {path}")
    return 0


def _table_label(run: Path, summary: dict) -> str:
    """A row label: the run's preset and profile, and the sweep value when the folder is one
    (``damping=0.01``); the folder name when the summary does not say.
    """
    exp = summary.get("experiment") or {}
    name = exp.get("name")
    if not name:
        return run.name
    label = f"{name} ({exp['profile']})" if exp.get("profile") else name
    return f"{label} {run.name}" if "=" in run.name else label


def cmd_table(args) -> int:
    """``pbrf table``."""
    rows = []
    for run in args.runs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise ConfigError(
                f"{run!r} has no summary.json; finish it with `pbrf run --out {run}`."
            )
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            summary = err
        if not isinstance(summary, dict):
            raise ConfigError(
                f"{str(path)!r} is not a pbrf summary ({summary}); rerun the command "
                "that made the run "
                f"(same config, --out {run}) to rewrite it from the stored results."
            )
        rows.append((_table_label(Path(run), summary), summary))
    print(report.format_table(rows) if args.markdown else report.format_table_text(rows))
    return 0


def cmd_evaluate(args) -> int:
    """``pbrf evaluate``."""
    result = evaluate.evaluate(args.scores, args.run)
    if result.get("sign_warning"):
        print(f"pbrf: warning: {result['sign_warning']}", file=sys.stderr)
    board = leaderboard.evaluate_board(args.scores, args.run)
    if args.json:
        result["leaderboard"] = leaderboard.jsonable(board)
        print(evaluate.to_json(result))
    else:
        print(
            f"{result['scores']} ({result['layout']} layout) vs {result['run']}: "
            f"{result['n_test']} test points x {result['n_removals']} removal sets"
        )
        print(evaluate.pairs_line(result))
        print(evaluate.format_correlations(result))
        print("\nas a row of `pbrf estimators`' leaderboard:")
        print(leaderboard.format_leaderboard(board, markdown=False))
    return 0


def cmd_estimators(args) -> int:
    """``pbrf estimators``."""
    if args.list:
        for name, cls in estimators.ESTIMATORS.items():
            print(f"{name.ljust(max(map(len, estimators.ESTIMATORS)))}  {cls.summary}")
        return 0
    if not args.runs:
        raise UsageError(
            "pbrf estimators: pass a finished RUN_DIR (or --list to see the estimators).")
    if len(args.runs) > 1 or args.out is not None:
        return _estimators_study(args)
    args.run = args.runs[0]
    methods = leaderboard.DEFAULT_METHODS if args.methods is None else tuple(
        m.strip() for m in args.methods.split(",") if m.strip())
    pairs = [item.partition("=") for item in args.scores]
    for item, (label, sep, path) in zip(args.scores, pairs):
        if not sep or not label or not path:
            raise UsageError(f"pbrf: --scores {item!r}: write LABEL=FILE, e.g. "
                             "--scores kronfluence=scores.npy.")
    leaderboard.check_labels([label for label, _, _ in pairs])
    external = {label: evaluate.load_scores(path) for label, _, path in pairs}
    hp = leaderboard.parse_hyperparameters(args.hp)
    log = (lambda msg: None) if args.json else (lambda msg: print(f"pbrf: {msg}", file=sys.stderr))
    board = leaderboard.run_estimators(args.run, methods, hp, external, log=log)
    chosen = ["--methods", ",".join(methods)] if args.methods else []
    command = " ".join(["pbrf estimators", args.run] + chosen
                       + [f"--hp {shlex.quote(h)}" for h in args.hp]
                       + ([f"--threads {args.threads}"] if args.threads else []))
    paths = leaderboard.write_leaderboard(board, args.run, command=command)
    if args.json:
        print(json.dumps(leaderboard.jsonable(board), indent=2))
    else:
        print(leaderboard.format_leaderboard(board, markdown=False))
        for note in leaderboard.board_notes(board):
            print(f"note: {note}")
        if board["skipped"]:
            print("skipped: " + "; ".join(f"{k} ({v})" for k, v in board["skipped"].items()))
        print(f"leaderboard: {paths['markdown']}")
    return 0


def _estimators_study(args) -> int:
    """``pbrf estimators RUN [RUN ...] --out DIR``: each run's leaderboard and the study."""
    if args.scores:
        raise UsageError("pbrf estimators: --scores belongs to one run; score external files "
                         "run by run (pbrf estimators RUN --scores LABEL=FILE).")
    out = study.check_out(args.out, args.runs)
    methods = leaderboard.DEFAULT_METHODS if args.methods is None else tuple(
        m.strip() for m in args.methods.split(",") if m.strip())
    hp = leaderboard.parse_hyperparameters(args.hp)
    log = (lambda msg: None) if args.json else (lambda msg: print(f"pbrf: {msg}", file=sys.stderr))
    command = " ".join(["pbrf estimators", *map(shlex.quote, args.runs), "--out",
                        shlex.quote(args.out)]
                       + (["--methods", ",".join(methods)] if args.methods else [])
                       + [f"--hp {shlex.quote(h)}" for h in args.hp]
                       + ([f"--threads {args.threads}"] if args.threads else []))
    result = study.run_study(args.runs, methods, hp, log=log, command=command)
    paths = study.write_study(result, out, command=command)
    if args.json:
        print(json.dumps(leaderboard.jsonable(result), indent=2))
        return 0
    print(study.tasks_table(result, markdown=False))
    for line in study.claim_lines(result):
        print(line)
    print(f"study: {paths['markdown']}")
    return 0


def cmd_presets(args) -> int:
    """``pbrf presets``."""
    presets = list_presets()
    width = max(map(len, presets))
    for name, desc in presets.items():
        print(f"{name.ljust(width)}  {desc}")
    return 0


def cmd_download(args) -> int:
    """``pbrf download``."""
    if args.name not in data.DATASETS:
        raise ConfigError(
            f"unknown dataset {args.name!r}; choose one of {', '.join(data.DATASETS)}."
        )
    try:
        paths = data.download(args.name, root=args.root, base_url=args.base_url)
    except OSError as err:
        raise ConfigError(
            f"download of {args.name} failed ({err}); check the network or pass --base-url."
        ) from None
    for path in paths:
        print(path)
    return 0


COMMANDS = {
    "run": cmd_run,
    "sweep": cmd_sweep,
    "reproduce": cmd_reproduce,
    "table": cmd_table,
    "evaluate": cmd_evaluate,
    "estimators": cmd_estimators,
    "presets": cmd_presets,
    "download": cmd_download,
}


# ---------------------------------------------------------------------------- entry point
def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="pbrf: %(message)s"
    )
    if not verbose:  # solver tolerances are recorded in the diagnostics and the report
        logging.getLogger("pbrf.influence").setLevel(logging.ERROR)


def _expected_errors() -> tuple:
    errors: list[type] = [ConfigError, UsageError]
    try:
        errors.append(DataError)
    except ImportError:  # pragma: no cover - the data package is part of pbrf
        pass
    return tuple(errors)


def _reproducible_math() -> None:
    """Environment for run-to-run identical numbers (read when torch/MKL first load, so set early).

    MKL otherwise picks its kernels by memory alignment and shrinks its thread count when the
    machine is busy, both of which change the last bits of large matrix products; a resumed run
    must reproduce an uninterrupted one exactly. Ray workers inherit this environment.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


#: ``--threads`` above this many per CPU core is refused (thread start-up fails long before).
THREADS_PER_CORE = 4


def _set_threads(n: int | None) -> None:
    """``--threads N``: torch's intra-op threads here and, through the environment, in Ray
    workers.
    """
    if n is None:
        return
    if n < 1:
        raise UsageError("pbrf: --threads must be a positive integer, e.g. --threads 2.")
    cores = os.cpu_count() or 1
    if n > THREADS_PER_CORE * cores:  # before any thread starts: torch would fail to start them
        raise UsageError(f"pbrf: --threads {n} is more than {THREADS_PER_CORE} per CPU core of "
                         f"this machine ({cores} cores); pass at most --threads "
                         f"{THREADS_PER_CORE * cores}, e.g. --threads {cores}.")

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)


#: The option that names another output folder, per command (commands absent have none).
_OUTPUT_OPTION = {"run": "--out DIR", "sweep": "--out DIR", "reproduce": "--out DIR",
                  "download": "--root DIR"}


def _os_error_line(err: OSError, command: str | None = None) -> str:
    """One line for a failure of the machine: the file, the cause, and what to do (naming the
    option of ``command`` that writes elsewhere, when it has one).
    """
    where = err.filename if err.filename is not None else None
    cause = err.strerror or str(err)
    name = errno.errorcode.get(err.errno or 0)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space"
    elif err.errno == errno.EFBIG:
        fix = "raise the file-size limit (ulimit -f)"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        option = _OUTPUT_OPTION.get(command or "")
        fix = f"make it writable or pass another {option}" if option else "make it writable"
    elif err.errno == errno.EIO:
        fix = "check the free space, the file-size limit (ulimit -f) and that the disk is writable"
    else:
        fix = "fix the cause"
    head = f"{where}: " if where else ""
    return (
        f"pbrf: error: {head}{cause}{f' ({name})' if name else ''}; {fix}, then run the same "
        "command again "
        "(finished work is kept)."
    )


def _quiet_stdout() -> None:
    """After a broken pipe (``pbrf ... | head``): send what is left to /dev/null, so exit is
    silent.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pbrf`` console script; returns the exit status."""
    _reproducible_math()
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        if args.command is None:
            build_parser().print_help()
            return 2
        _setup_logging(getattr(args, "verbose", False))
        _set_threads(getattr(args, "threads", None))
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # as if killed by SIGPIPE, silently (the reader stopped reading)
    except _expected_errors() as err:
        msg = str(err).replace("\n", " ")
        print(msg if msg.startswith("pbrf") else f"pbrf: error: {msg}", file=sys.stderr)
        return 2
    except OSError as err:
        print(_os_error_line(err, command).replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pbrf: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
