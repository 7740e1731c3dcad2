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
from pbrf.experiment.bench import uncertainty
from pbrf.experiment.bench.evaluate import finite_scaled, load_scores, map_scores
from pbrf.experiment.config import ConfigError
from pbrf.experiment.report import save_figure, text_table
from pbrf.experiment.run.arrays import run_arrays
from pbrf.experiment.run.lds_stage import LDS_KIND, lds_actual
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
    "floors_of",
    "check_methods",
    "board_legend",
    "md_table",
    "residual_cell",
    "format_per_test",
    "format_floors",
    "ci_cell",
    "cell",
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
    "influence-lissa-published",
    "arnoldi",
    "trak",
    "tracin",
    "grad-dot",
    "grad-cos",
)
PREFIX = "estimator:"
FOLDER = "estimators"
#: Bootstrap replicates of every interval, and their seed (the intervals are reproducible).
BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
#: Why a ground truth has no measured noise floor.
NO_FLOOR = {
    "pbrf": "deterministic and certified (ρ ≤ tol): no seed noise to measure",
    "warm_paired": "one warm-start seed: not measured",
    "warm": "one warm-start seed: not measured",
}


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
    if info.get("residual") is not None:
        row["residual"] = info["residual"]
    if info.get("solver"):
        row["solver"] = info["solver"]
    for key, _ in TRUTHS:
        if key in truths:
            entry = analysis.correlation_entry(removal_scores, truths[key])
            entry["ci"] = uncertainty.bootstrap_correlations(
                removal_scores, truths[key], n_boot=BOOTSTRAP, seed=BOOTSTRAP_SEED)
            row["correlations"][key] = entry
    notes = row_notes(removal_scores)
    if notes:
        row["notes"] = notes
    if lds_scores is not None and lds_truth is not None:
        out = lds.lds(finite_scaled(lds_scores), lds_truth[0])
        row["lds"] = {k: out[k] for k in ("lds", "stderr", "n_test")}
        row["lds"]["ci"] = uncertainty.bootstrap_lds(finite_scaled(lds_scores), lds_truth[0],
                                                     n_boot=BOOTSTRAP, seed=BOOTSTRAP_SEED)
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


def floors_of(run_dir, truths: dict, n_lds_chunks: int | None) -> dict:
    """The noise floor of each ground truth: cold LOO and the LDS between disjoint halves of
    their seeds (:mod:`~pbrf.experiment.bench.uncertainty`), or ``{"note": why not}`` (one seed,
    a run stored before per-seed Δm, the PBRF and warm start). Cold LOO leaves out the removals
    its truth leaves out.
    """
    arrays = run_arrays(run_dir)
    n_chunks = math.ceil(len(arrays["groups"]) / arrays["config"].run.chunk_size)
    with Store(run_dir, readonly=True) as store:
        cold = store.gather_extra("cold", n_chunks) if "cold" in truths else None
        per_lds = None if not n_lds_chunks else store.gather_extra(LDS_KIND, n_lds_chunks)
    out: dict = {k: {"note": v} for k, v in NO_FLOOR.items() if k in truths}
    if "cold" in truths:
        floor = None
        if cold is not None and cold.ndim == 3:
            cold = cold.copy()
            cold[:, np.isnan(truths["cold"]).all(axis=0)] = np.nan
            floor = uncertainty.seed_floor(cold, n_boot=BOOTSTRAP, seed=BOOTSTRAP_SEED)
        out["cold"] = floor or {"note": "one cold-start seed (or a run stored before per-seed "
                                         "Δm): not measured"}
    if n_lds_chunks:
        floor = None
        if per_lds is not None and per_lds.ndim == 3:
            floor = uncertainty.lds_floor(per_lds, n_boot=BOOTSTRAP, seed=BOOTSTRAP_SEED)
        out["lds"] = floor or {"note": "one retraining seed: not measured"}
    return out


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
        "bootstrap": {"replicates": BOOTSTRAP, "seed": BOOTSTRAP_SEED, "level": 0.95,
                      "resampled": "test points and removals (LDS: subsets), independently"},
        "rows": [],
        "skipped": {},
        "floors": {},
    }


def check_methods(methods, hyperparameters: dict) -> None:
    """Refuse (one line naming the fix) an empty or unknown method list, or ``--hp`` for a
    method not run.
    """
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
        "residual": res.residual,
        "solver": _solver_facts(res.diagnostics),
        "hyperparameters": res.hyperparameters,
        "requested": jsonable(est.hyperparameters),
        "threads": torch.get_num_threads(),
        "device": str(run.measure_problem.device),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    store.put_chunk(ChunkResult(PREFIX + name, 0, scores, None, [info], res.seconds, None))
    log(f"{name}: {res.seconds:.2f} s")
    return scores, info


def _solver_facts(diagnostics: dict | None) -> dict | None:
    """What a solving estimator chose at run time (e.g. the published LiSSA's tuned scale)."""
    extra = (diagnostics or {}).get("extra") or {}
    facts = {k: extra[k] for k in ("scale", "lambda_max_estimate") if k in extra}
    return facts or None


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
    check_methods(methods, hyperparameters)
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
    board.update(rows=rows, skipped=skipped, floors=floors_of(run_dir, truths, _lds_chunks(
        lds_truth, run.config)))
    return board


def _lds_chunks(lds_truth, config) -> int | None:
    return None if lds_truth is None else math.ceil(len(lds_truth[1]) / config.run.chunk_size)


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
    board["floors"] = floors_of(run_dir, truths, _lds_chunks(lds_truth, arrays["config"]))
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


def ci_cell(value, ci, digits: int = 3) -> str:
    """``0.681 ± 0.052``: a statistic and half the width of its 95% bootstrap interval (the
    interval itself is in the JSON; it need not be symmetric).
    """
    text = _f(value, digits)
    if text == "n/a" or not ci or ci[0] is None or ci[1] is None:
        return text
    return f"{text} ± {_f((ci[1] - ci[0]) / 2, digits)}"


def residual_cell(row: dict) -> str:
    """The largest relative residual of an estimator's solves (``—``: it solves no system)."""
    res = row.get("residual")
    return "—" if not res or res.get("max") is None else f"{res['max']:.1e}"


def _by_pbrf(rows: list[dict]) -> list[dict]:
    def key(row):
        s = (row["correlations"].get("pbrf") or {}).get("spearman")
        return -(s if s is not None else -math.inf)

    return sorted(rows, key=key)


def cell(row: dict, truth: str, stat: str = "spearman") -> str:
    """One cell of a row: its ``stat`` against ``truth`` ± half its interval (``"lds"``: the LDS),
    ``n/a`` where the row has none; the leaderboards and the study print exactly this.
    """
    if truth == "lds":
        lds = row.get("lds")
        return "n/a" if not lds else ci_cell(lds["lds"], lds.get("ci"))
    c = row["correlations"].get(truth)
    return "n/a" if c is None else ci_cell(c.get(stat), (c.get("ci") or {}).get(stat))


def _corr_cells(row: dict, truths, stats) -> list[str]:
    return [cell(row, k, s) for k in truths for s in stats]


def md_table(header: list[str], lines: list[list[str]], markdown: bool, last_left: bool) -> str:
    """A markdown table (numbers right-aligned; ``last_left``: the last column is text), or the
    aligned terminal table.
    """
    if not markdown:
        return text_table(header, lines)
    align = ["---"] + ["---:"] * (len(header) - 1)
    if last_left:
        align[-1] = "---"
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines])


def format_leaderboard(board: dict, markdown: bool = True) -> str:
    """The leaderboard (pooled correlations ± their 95% intervals), best Spearman against the
    PBRF first.
    """
    truths = list(board["truths"])
    header = ["estimator", "time (s)", "peak MB", "residual"]
    for key in truths:
        header += [f"{board['truths'][key]} P", f"{board['truths'][key]} S"]
    if board.get("lds"):
        header.append("LDS")
    header.append("hyperparameters")
    lines = []
    for row in _by_pbrf(board["rows"]):
        cells = [row["method"], _f(row.get("seconds"), 2), _f(row.get("peak_memory_mb"), 0),
                 residual_cell(row)] + _corr_cells(row, truths, ("pearson", "spearman"))
        if board.get("lds"):
            cells.append(cell(row, "lds"))
        chosen = {f"chosen {k}": f"{v:.3g}" for k, v in (row.get("solver") or {}).items()
                  if k == "scale"}
        cells.append(_hp_text({**(row.get("hyperparameters") or {}), **chosen}))
        lines.append(cells)
    if markdown:
        return md_table(header, lines, True, last_left=True)
    # the terminal table leaves the hyperparameters column out
    return text_table(header[:-1], [c[:-1] for c in lines])


def format_per_test(board: dict, markdown: bool = True) -> str:
    """The per-test protocol: each test point's correlation across removals, averaged over test
    points (± the 95% bootstrap interval), in the order of :func:`format_leaderboard`.
    """
    truths = list(board["truths"])
    header = ["estimator"]
    for key in truths:
        header += [f"{board['truths'][key]} P/test", f"{board['truths'][key]} S/test"]
    lines = [[row["method"]] + _corr_cells(row, truths, ("pearson_per_test", "spearman_per_test"))
             for row in _by_pbrf(board["rows"])]
    return md_table(header, lines, markdown, last_left=False)


def format_floors(board: dict, markdown: bool = True) -> str:
    """The noise floor of each ground truth: the agreement of two disjoint halves of its seeds
    (± 95% interval) and the Spearman–Brown ceiling it implies for the full average; or why none.
    """
    header = ["ground truth", "P", "S", "P/test", "S/test", "ceiling P / S", "how"]
    labels = {**dict(TRUTHS), "lds": "LDS"}
    lines = []
    for key, floor in (board.get("floors") or {}).items():
        if "note" in floor:
            lines.append([labels.get(key, key)] + ["—"] * 5 + [floor["note"]])
            continue
        if key == "lds":
            cells = ["—", ci_cell(floor.get("lds"), floor.get("lds_ci")), "—", "—",
                     f"— / {_f(floor.get('ceiling_lds'))}"]
        else:
            cells = [ci_cell(floor.get(s), floor.get(f"{s}_ci")) for s in
                     ("pearson", "spearman", "pearson_per_test", "spearman_per_test")]
            ceilings = (_f(floor.get("ceiling_pearson")), _f(floor.get("ceiling_spearman")))
            cells.append(" / ".join(ceilings))
        lines.append([labels.get(key, key)] + cells
                     + [f"seed halves {floor.get('halves')} of {floor.get('n_seeds')} seeds"])
    return md_table(header, lines, markdown, last_left=True)


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


def board_legend(board: dict) -> list[str]:
    """What the leaderboard's columns mean (one paragraph each)."""
    boot = board.get("bootstrap") or {}
    parts = [
        "P / S: Pearson / Spearman correlation over all (test point, removal) pairs with each "
        "ground truth, over the removals where it is certified and did not diverge "
        f"(removals left out: {board['excluded_removals']}); ± is half the width of the 95% "
        f"bootstrap interval ({boot.get('replicates', BOOTSTRAP)} replicates resampling "
        f"{boot.get('resampled', 'test points and removals')}). Time and peak memory (resident "
        "set above the start, sampled) cover scoring all N training points, fitting included. "
        "Residual: the largest relative residual ‖(C + λI)x − g‖/‖g‖ over test points of the "
        "inverse-curvature product each solving estimator implies (— for methods that solve no "
        "system)."
    ]
    if board.get("lds"):
        l = board["lds"]  # noqa: E741
        parts.append(
            "LDS: mean over test points of the Spearman correlation across "
            f"{l['subsets']} random subsets "
            f"(each keeping {100 * l['alpha']:.0f}% of the data, retrained from scratch with seeds "
            f"{l['seeds']}), ± half its 95% bootstrap interval (test points and subsets "
            "resampled)."
        )
    return parts


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
    parts += [format_leaderboard(board), "", *board_legend(board), "",
              "Per test point (each test point's correlation across removals, averaged over test "
              "points: the protocol of the published per-test numbers; warm LOO and warm (paired) "
              "agree exactly here, as they differ by one constant per test point, the drift):", "",
              format_per_test(board), ""]
    if board.get("floors"):
        parts += ["Noise floors: how well two disjoint halves of a ground truth's seeds agree, "
                  "and the ceiling that implies for any estimator against the all-seed average "
                  "(Spearman–Brown, √(2r/(1+r))):", "", format_floors(board)]
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
