"""``pbrf estimators``: run attribution estimators on a finished run and rank them.

Every estimator scores all N training points on the run's test points once (``[n_test, N]``,
stored in the run's ``results.sqlite`` as kind ``estimator:NAME`` with its wall time, peak memory
and hyperparameters, so a rerun skips it unless its hyperparameters changed). The leaderboard
lists every estimator stored in the run, also those of earlier invocations. Group scores are
sums of point scores, so the same scores are compared with

* the run's ground truths on its removal sets: the PBRF, the paired warm start (warm start
  against its no-removal continuation), the literal warm start and cold-start LOO, each over the
  removals where that response is certified and did not diverge, as in the run's report;
* the LDS (``[lds] subsets > 0`` in the run's config): the mean over test points of the
  Spearman correlation between the summed scores of each subset's removed points and the
  retrained change of the test loss.

Outputs in ``RUN_DIR/estimators/``: ``leaderboard.md``, ``leaderboard.json`` and
``leaderboard.png`` (fidelity against wall time).
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from pbrf import estimators, lds, load_run
from pbrf.experiment import analysis
from pbrf.experiment.bench.evaluate import finite_scaled, load_scores, map_scores
from pbrf.experiment.config import ConfigError
from pbrf.experiment.report import save_figure, text_table
from pbrf.experiment.run.arrays import run_arrays
from pbrf.experiment.run.lds_stage import lds_actual
from pbrf.experiment.run.load import stored_responses
from pbrf.experiment.run.rundir import exclusive
from pbrf.experiment.run.store import ChunkResult, Store, atomic_write_text

__all__ = [
    "TRUTHS",
    "DEFAULT_METHODS",
    "run_estimators",
    "external_row",
    "score_row",
    "truths_of",
    "board_header",
    "format_leaderboard",
    "write_leaderboard",
    "parse_hyperparameters",
    "check_labels",
    "row_notes",
    "board_notes",
]

#: Ground truths of the leaderboard: (key in Run.responses(), column label).
TRUTHS = (
    ("pbrf", "PBRF"),
    ("warm_paired", "warm (paired)"),
    ("warm", "warm LOO"),
    ("cold", "cold LOO"),
)
DEFAULT_METHODS = (
    "influence-exact",
    "influence-cg",
    "influence-lissa",
    "arnoldi",
    "trak",
    "tracin",
    "grad-dot",
    "grad-cos",
)
PREFIX = "estimator:"
FOLDER = "estimators"


def parse_hyperparameters(items: list[str]) -> dict[str, dict]:
    """``["trak.dim=1024"]`` → ``{"trak": {"dim": 1024}}`` (values read as TOML scalars)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not (sep and dot and name and field):
            raise ConfigError(f"--hp {item!r}: write METHOD.NAME=VALUE, e.g. --hp trak.dim=1024.")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()
        out.setdefault(name, {})[field] = parsed
    return out


def _stored(store, name: str) -> tuple[np.ndarray, dict] | None:
    got = store.get_chunk(PREFIX + name, 0)
    if got is None:
        return None
    return got.dm, (got.diagnostics or [{}])[0]


def score_row(
    label: str,
    removal_scores: np.ndarray,
    truths: dict,
    info: dict | None = None,
    lds_scores: np.ndarray | None = None,
    lds_truth=None,
) -> dict:
    """One leaderboard row: correlations of ``removal_scores`` ``[n_test, n_removals]`` with each
    ground truth, and the LDS of ``lds_scores`` (group scores of the LDS subsets) when given.
    """
    info = info or {}
    removal_scores = finite_scaled(removal_scores)
    row = {
        "method": label,
        "seconds": info.get("seconds"),
        "peak_memory_mb": info.get("peak_memory_mb"),
        "hyperparameters": info.get("hyperparameters", {}),
        "correlations": {},
    }
    for key, _ in TRUTHS:
        if key in truths:
            row["correlations"][key] = analysis.correlation_entry(removal_scores, truths[key])
    notes = row_notes(removal_scores)
    if notes:
        row["notes"] = notes
    if lds_scores is not None and lds_truth is not None:
        out = lds.lds(finite_scaled(lds_scores), lds_truth[0])
        row["lds"] = {k: out[k] for k in ("lds", "stderr", "n_test")}
    return row


def row_notes(removal_scores: np.ndarray) -> list[str]:
    """Why a row's correlations leave pairs out or are n/a: non-finite scores (dropped from every
    correlation) and scores without variance (no correlation is defined).
    """
    finite = np.isfinite(removal_scores)
    notes = []
    bad = int((~finite).sum())
    if bad:
        notes.append(f"{bad} of {removal_scores.size} (test, removal) pairs dropped for "
                     "non-finite (NaN/inf) scores")
    values = removal_scores[finite]
    if values.size and float(values.max()) == float(values.min()):
        notes.append("the scores are constant, so every correlation is n/a")
    elif not values.size:
        notes.append("no finite score, so every correlation is n/a")
    return notes


def board_notes(board: dict) -> list[str]:
    """One line per row with notes (``row_notes``), e.g. ``ext: 3 of 40 pairs dropped …``."""
    return [f"{row['method']}: {'; '.join(row['notes'])}" for row in board["rows"]
            if row.get("notes")]


def check_labels(labels, stored=()) -> None:
    """Labels of external scores must name one row each: not repeated, not a built-in estimator
    (nor a stored one), so every row of the leaderboard has its own name.
    """
    seen = set()
    for label in labels:
        if label in estimators.ESTIMATORS or label in stored:
            raise ConfigError(f"--scores {label}=…: {label!r} is the name of an estimator; give "
                              f"the external scores another label, e.g. --scores {label}-ext=FILE.")
        if label in seen:
            raise ConfigError(f"--scores {label}=… is given twice; give each scores file its own "
                              f"label, e.g. --scores {label}-2=FILE.")
        seen.add(label)


def _row(
    name: str, point_scores: np.ndarray, info: dict, removals, truths: dict, lds_truth
) -> dict:
    point_scores = finite_scaled(point_scores)  # group sums of values near 1e308 stay finite
    lds_scores = None if lds_truth is None else lds.group_scores(point_scores, lds_truth[1])
    return score_row(
        name, lds.group_scores(point_scores, removals), truths, info, lds_scores, lds_truth
    )


def external_row(
    label: str,
    scores: np.ndarray,
    removals: list[list[int]],
    n_train: int,
    truths: dict,
    lds_truth=None,
) -> dict:
    """A row for scores computed elsewhere, ``[n_test, N]`` (also scored on the LDS) or
    ``[n_test, n_removals]``.
    """
    info = {"hyperparameters": {"source": "external"}}
    if scores.shape[1] == n_train:
        return _row(label, scores, info, removals, truths, lds_truth)
    mapped, _ = map_scores(scores, removals, n_train)
    return score_row(label, mapped, truths, info)


def truths_of(run_dir) -> dict:
    """The leaderboard's ground truths of a finished run (uncertified / diverged removals NaN)."""
    return {
        k: v for k, v in stored_responses(run_dir, certified_only=True).items() if k in dict(TRUTHS)
    }


def board_header(
    config,
    n_train: int,
    n_params: int | None,
    n_test: int,
    n_removals: int,
    truths: dict,
    lds_truth,
    run_dir,
) -> dict:
    """The facts of a leaderboard (everything but its rows)."""
    return {
        "run": str(run_dir),
        "name": config.name,
        "profile": config.profile,
        "n_train": n_train,
        "n_params": n_params,
        "n_test": n_test,
        "n_removals": n_removals,
        "damping": config.influence.damping,
        "weight_decay": config.train.weight_decay,
        "truths": {k: lbl for k, lbl in TRUTHS if k in truths},
        "excluded_removals": {k: int(np.isnan(v).all(axis=0).sum()) for k, v in truths.items()},
        "lds": None
        if lds_truth is None
        else {
            "subsets": len(lds_truth[1]),
            "alpha": config.lds.alpha,
            "seeds": list(config.lds.seeds or config.responses.cold_seeds),
        },
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "rows": [],
        "skipped": {},
    }


def _check_methods(methods, hyperparameters: dict) -> None:
    if not methods:
        raise ConfigError("--methods lists no estimator; name at least one, e.g. --methods trak.")
    unknown = [m for m in methods if m not in estimators.ESTIMATORS]
    if unknown:
        raise ConfigError(
            f"unknown estimator(s) {unknown}; choose from {', '.join(estimators.ESTIMATORS)}."
        )
    for m in hyperparameters:
        if m not in methods:
            raise ConfigError(
                f"--hp {m}.*: {m!r} is not among the methods run ({', '.join(methods)})."
            )


def _score(store, run, name: str, est, log) -> tuple[np.ndarray, dict]:
    """One estimator's ``[n_test, N]`` scores and cost: stored ones when they were computed with
    the hyperparameters that would be used now (resolved against the run: damping, curvature,
    solver options, checkpoints), else computed and stored (raises EstimatorUnavailable).
    """
    want = jsonable(est.reported({"damping": run.damping, "curvature": run.curvature, "run": run}))
    stored = _stored(store, name)
    if stored is not None:
        have = stored[1].get("hyperparameters") or {}
        if have == want:
            log(f"{name}: stored ({stored[1].get('seconds', math.nan):.2f} s)")
            return stored
        log(f"{name}: the stored scores were computed with {_changed(have, want)}; recomputing")
    log(f"{name}: running ({_hp_text(want)})")
    res = est.scores(run, removals=torch.arange(run.n_train))
    scores = res.scores.detach().cpu().double().numpy()
    peak = None if res.peak_memory_bytes is None else res.peak_memory_bytes / 2**20
    info = {
        "seconds": res.seconds,
        "peak_memory_mb": peak,
        "hyperparameters": res.hyperparameters,
        "requested": jsonable(est.hyperparameters),
        "threads": torch.get_num_threads(),
        "device": str(run.measure_problem.device),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    store.put_chunk(ChunkResult(PREFIX + name, 0, scores, None, [info], res.seconds, None))
    log(f"{name}: {res.seconds:.2f} s")
    return scores, info


def _changed(have: dict, want: dict) -> str:
    keys = sorted(set(have) | set(want))
    return ", ".join(f"{k}={have.get(k)} (now {want.get(k)})" for k in keys
                     if have.get(k) != want.get(k))


def run_estimators(
    run_dir: str | Path,
    methods=DEFAULT_METHODS,
    hyperparameters: dict | None = None,
    external: dict[str, np.ndarray] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run (or resume) ``methods`` on a finished run; returns the leaderboard dict.

    A method that cannot run here (no checkpoints for TracIn, kronfluence not installed, exact
    influence above its size limit) is listed under ``"skipped"`` with the reason. Estimators
    stored by earlier invocations stay on the board.
    """
    hyperparameters = hyperparameters or {}
    _check_methods(methods, hyperparameters)
    chosen = {}
    for name in methods:  # every estimator and hyperparameter checked before any is computed
        try:
            chosen[name] = estimators.get(name, **hyperparameters.get(name, {}))
        except (TypeError, ValueError) as err:
            msg = str(err).removeprefix(f"{name}: ")
            raise ConfigError(f"--hp {name}: {msg}") from None
    check_labels(external or {})
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    for label, arr in (external or {}).items():
        if arr.shape[0] != run.n_test:
            raise ConfigError(
                f"--scores {label}: {arr.shape[0]} rows, but the run has {run.n_test} test points."
            )
    for est in chosen.values():  # sizes that cannot fit are the user's to change, before any work
        try:
            est.check_size(run.measure_problem)
        except ValueError as err:
            raise ConfigError(str(err).splitlines()[0]) from None
    truths = truths_of(run_dir)
    rows, skipped = [], {}
    with exclusive(run_dir, elsewhere=None), Store(run_dir) as store:
        lds_truth = lds_actual(store, run.config)
        for name, est in chosen.items():
            try:
                scores, info = _score(store, run, name, est, log)
            except (estimators.EstimatorUnavailable, ValueError) as err:
                skipped[name] = str(err).splitlines()[0]
                log(f"{name}: skipped — {skipped[name]}")
                continue
            rows.append(_row(name, scores, info, run.removals, truths, lds_truth))
        earlier = [k[len(PREFIX):] for k, _ in sorted(store.done()) if k.startswith(PREFIX)]
        for name in (n for n in earlier if n not in methods):
            scores, info = _stored(store, name)
            rows.append(_row(name, scores, info, run.removals, truths, lds_truth))
    for label, arr in (external or {}).items():
        rows.append(external_row(label, arr, run.removals, run.n_train, truths, lds_truth))
    board = board_header(run.config, run.n_train, run.problem.n_params, run.n_test,
                         len(run.removals), truths, lds_truth, run_dir)
    board.update(rows=rows, skipped=skipped)
    return board


def evaluate_board(scores_path, run_dir) -> dict:
    """``pbrf evaluate``'s scores as a one-row leaderboard (``pbrf estimators``' format)."""
    arrays = run_arrays(run_dir)
    scores = load_scores(scores_path)
    truths = truths_of(run_dir)
    with Store(run_dir, readonly=True) as store:
        lds_truth = lds_actual(store, arrays["config"])
    n_test = arrays["dm"]["influence"].shape[0]
    board = board_header(
        arrays["config"],
        arrays["n_train"],
        None,
        n_test,
        len(arrays["groups"]),
        truths,
        lds_truth,
        run_dir,
    )
    board["rows"] = [
        external_row(
            Path(scores_path).stem, scores, arrays["groups"], arrays["n_train"], truths, lds_truth
        )
    ]
    return board


def jsonable(d: dict) -> dict:
    """``d`` as plain JSON types (what is not JSON becomes its ``str``)."""
    return json.loads(json.dumps(d, default=str))


def _hp_text(hp: dict) -> str:
    return (
        ", ".join(f"{k}={v}" for k, v in hp.items() if not isinstance(v, (dict, list)))
        or "defaults"
    )


def _f(x, digits: int = 3) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
    )


def format_leaderboard(board: dict, markdown: bool = True) -> str:
    """The leaderboard as a table, best Spearman against the PBRF first."""
    truths = list(board["truths"])
    header = ["estimator", "time (s)", "peak MB"]
    for key in truths:
        header += [f"{board['truths'][key]} P", f"{board['truths'][key]} S"]
    if board.get("lds"):
        header.append("LDS")
    header.append("hyperparameters")

    def key(row):
        s = (row["correlations"].get("pbrf") or {}).get("spearman")
        return -(s if s is not None else -math.inf)

    lines = []
    for row in sorted(board["rows"], key=key):
        cells = [row["method"], _f(row.get("seconds"), 2), _f(row.get("peak_memory_mb"), 0)]
        for k in truths:
            c = row["correlations"].get(k) or {}
            cells += [_f(c.get("pearson")), _f(c.get("spearman"))]
        if board.get("lds"):
            lds = row.get("lds")
            cells.append("n/a" if not lds else f"{_f(lds['lds'])} ± {_f(lds['stderr'])}")
        cells.append(_hp_text(row.get("hyperparameters") or {}))
        lines.append(cells)
    if markdown:
        out = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header) - 1)) + "|---|",
        ]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    # the terminal table leaves the hyperparameters column out
    return text_table(header[:-1], [c[:-1] for c in lines])


def _threads(board: dict) -> str:
    n = board.get("threads")
    cpus = board.get("cpus")
    text = f"{n} torch thread{'s' if n != 1 else ''}"
    return text + (f" on a {cpus}-CPU machine" if cpus else "")


def _figure(board: dict, path: Path) -> Path | None:
    matplotlib.use("Agg")

    rows = [r for r in board["rows"] if r.get("seconds")]
    if not rows:
        return None
    panels = [("pbrf", "Spearman vs PBRF")] + ([("lds", "LDS")] if board.get("lds") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for r in rows:
            y = (
                (r.get("lds") or {}).get("lds")
                if key == "lds"
                else (r["correlations"].get("pbrf") or {}).get("spearman")
            )
            if y is None or not math.isfinite(y):
                continue
            ax.scatter(r["seconds"], y, s=30)
            ax.annotate(
                r["method"],
                (r["seconds"], y),
                fontsize=8,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"wall time (s, {_threads(board)})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{board['name']} ({board['profile']}): fidelity against cost")
    fig.tight_layout()

    return save_figure(fig, path)


def write_leaderboard(
    board: dict, run_dir: str | Path, command: str | None = None
) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``.json`` and ``.png`` under ``RUN_DIR/estimators``."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    fig = _figure(board, folder / "leaderboard.png")
    parts = [
        f"# Estimator leaderboard: {board['name']} ({board['profile']})",
        "",
        f"N = {board['n_train']} training points, p = {board['n_params']} parameters, "
        f"{board['n_test']} test points × {board['n_removals']} removal sets; "
        f"damping λ = {board['damping']:g}, "
        f"weight decay {board['weight_decay']:g}; {_threads(board)}.",
        "",
    ]
    if command:
        parts += ["Regenerate with:", "", "```sh", command, "```", ""]
    parts += [
        format_leaderboard(board),
        "",
        "P / S: Pearson / Spearman correlation over all (test point, removal) pairs with each "
        "ground truth, "
        "over the removals where it is certified and did not diverge "
        f"(removals left out: {board['excluded_removals']}). Time and peak memory (resident set "
        "above the "
        "start, sampled) cover scoring all N training points, fitting included.",
    ]
    if board.get("lds"):
        l = board["lds"]  # noqa: E741
        parts.append(
            "LDS: mean over test points of the Spearman correlation across "
            f"{l['subsets']} random subsets "
            f"(each keeping {100 * l['alpha']:.0f}% of the data, retrained from scratch with seeds "
            f"{l['seeds']}), ± its standard error."
        )
    if board_notes(board):
        parts += ["", "Notes: " + "; ".join(board_notes(board)) + "."]
    if board.get("skipped"):
        parts += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in board["skipped"].items())]
    if fig is not None:
        parts += ["", f"![fidelity against cost]({fig.name})"]
    atomic_write_text(folder / "leaderboard.md", "\n".join(parts) + "\n")
    atomic_write_text(folder / "leaderboard.json", json.dumps(jsonable(board), indent=2))
    return {
        "markdown": folder / "leaderboard.md",
        "json": folder / "leaderboard.json",
        "figure": fig,
    }
