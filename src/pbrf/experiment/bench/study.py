"""``pbrf estimators RUN [RUN ...] --out DIR``: the estimator study across tasks.

Each run gets its own leaderboard (:mod:`~pbrf.experiment.bench.leaderboard`, written in
``RUN_DIR/estimators/``, resumable per estimator: stored scores are reused at the same resolved
hyperparameters), and ``DIR`` gets the cross-task view: ``study.md``, ``study.json`` and
``study.png``. Every cell of a cross-task table is the string of the same cell in that run's own
leaderboard (same statistic, same bootstrap interval), so the two cannot disagree.

The claim people cite from Bae et al. (2022) — "EK-FAC ≈ LiSSA > gradient dot product in agreement
with the PBRF, on every task" — is checked per task from the intervals (:func:`claim_check`), under
the published LiSSA (depth N, truncated) and the converged one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from pbrf.experiment.bench import leaderboard
from pbrf.experiment.bench.leaderboard import cell, ci_cell, md_table, residual_cell
from pbrf.experiment.config import ConfigError
from pbrf.experiment.report import save_figure
from pbrf.experiment.run.arrays import run_arrays
from pbrf.experiment.run.store import Store, atomic_write_text

__all__ = [
    "run_study",
    "task_labels",
    "study_table",
    "residual_table",
    "tasks_table",
    "claim_check",
    "write_study",
    "claim_lines",
    "run_facts",
    "check_out",
]

#: The ground truths of the cross-task tables: the leaderboard's, then the LDS.
COLUMNS = (*leaderboard.TRUTHS, ("lds", "LDS"))
#: The three methods of the published claim, and the two LiSSA settings it is checked under.
CLAIM = {"ekfac": "kronfluence-ekfac", "grad": "grad-dot",
         "lissa": {"published": "influence-lissa-published", "converged": "influence-lissa"}}


LEGEND = (
    "S: Spearman correlation over all (test point, removal) pairs with the ground truth, over the "
    "removals where it is certified and did not diverge; S/test: each test point's Spearman "
    "across removals, averaged over test points (the per-test protocol). ± is half the width of "
    "the 95% bootstrap interval (test points and removals resampled independently; the LDS: test "
    "points and subsets). Per test point, warm LOO and warm (paired) agree exactly: they differ by "
    "the drift of the continuation, one constant per test point. Each run's leaderboard "
    "(RUN_DIR/estimators/leaderboard.md) has the same cells, the Pearson correlations and the "
    "intervals' end points in its JSON. Noise floor: "
    "the agreement of two disjoint halves of the ground truth's seeds; ceiling: the correlation "
    "that implies for a perfect estimator against the all-seed average (Spearman–Brown "
    "√(2r/(1+r))). Residual: the largest relative residual ‖(C + λI)x − g‖/‖g‖ over test points "
    "of the inverse-curvature product a solving estimator implies (— where none is solved)."
)


def check_out(out, run_dirs) -> Path:
    """The study's output folder: refused (one line naming the fix) when missing for several
    runs, or when it is a file.
    """
    if out is None:
        raise ConfigError("pbrf estimators: several runs make a study; pass --out DIR for its "
                          "cross-task tables (each run's leaderboard goes in RUN_DIR/estimators).")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a folder for the study.")
    return out


def run_study(run_dirs, methods, hyperparameters: dict | None = None, external=None, log=print,
              command: str | None = None) -> dict:
    """Run (or resume) ``methods`` on every run and write each run's leaderboard; returns the
    study ``{"tasks": [labels], "boards": [leaderboard dicts]}``. Every run is checked to be a
    finished run, and the methods and hyperparameters to be valid, before any is scored.
    """
    hyperparameters = hyperparameters or {}
    leaderboard.check_methods(methods, hyperparameters)
    for run_dir in run_dirs:
        run_arrays(run_dir)  # a missing or unfinished run is refused before any work
    if len(set(map(str, map(Path, run_dirs)))) != len(run_dirs):
        raise ConfigError("pbrf estimators: a run is named twice; name each run once.")
    boards = []
    for run_dir in run_dirs:
        log(f"study: {run_dir}")
        board = leaderboard.run_estimators(run_dir, methods, hyperparameters, external, log=log)
        leaderboard.write_leaderboard(board, run_dir, command=command)
        boards.append(board)
    return {"tasks": task_labels(boards), "boards": boards,
            "facts": [run_facts(r) for r in run_dirs]}


def run_facts(run_dir) -> dict:
    """What the run's own summary says of θ^s (test metric) and of its certified PBRF."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    theta = summary.get("theta_s") or {}
    pbrf = ((summary.get("certificates") or {}).get("by_kind") or {}).get("pbrf") or {}
    with Store(run_dir, readonly=True) as store:
        seconds = store.kind_seconds()
    ground = sum(v for k, v in seconds.items() if not k.startswith(leaderboard.PREFIX))
    return {"metric": theta.get("metric"), "test_metric": theta.get("test_metric"),
            "pbrf_certified": pbrf.get("certified"),
            "pbrf_median_rho": pbrf.get("median_rho"),
            # compute time of the run's ground truths (responses and LDS; base training aside)
            "ground_truth_seconds": ground,
            "estimator_seconds": sum(v for k, v in seconds.items()
                                     if k.startswith(leaderboard.PREFIX))}


def task_labels(boards: list[dict]) -> list[str]:
    """One label per run: the preset name, with the run folder where two share a name."""
    names = [b["name"] for b in boards]
    return [n if names.count(n) == 1 else f"{n} ({Path(b['run']).name})"
            for n, b in zip(names, boards)]


def _methods(study: dict) -> list[str]:
    """Every estimator of the study, best mean Spearman against the PBRF first."""
    scores: dict[str, list[float]] = {}
    for board in study["boards"]:
        for row in board["rows"]:
            s = (row["correlations"].get("pbrf") or {}).get("spearman")
            scores.setdefault(row["method"], []).append(-math.inf if s is None else s)
    return sorted(scores, key=lambda m: -float(np.mean(scores[m])))


def _row(board: dict, method: str) -> dict | None:
    return next((r for r in board["rows"] if r["method"] == method), None)


def _cell(board: dict, method: str, truth: str, stat: str) -> str:
    row = _row(board, method)
    return "—" if row is None else cell(row, truth, stat)


def _floor_cells(board: dict, truth: str, stats) -> tuple[list[str], list[str]]:
    floor = (board.get("floors") or {}).get(truth) or {"note": ""}
    if "note" in floor:
        return ["—"] * len(stats), ["—"] * len(stats)
    if truth == "lds":
        return ([ci_cell(floor.get("lds"), floor.get("lds_ci"))],
                [ci_cell(floor.get("ceiling_lds"), None)])
    return ([ci_cell(floor.get(s), floor.get(f"{s}_ci")) for s in stats],
            [ci_cell(floor.get(f"ceiling_{s}"), None) for s in stats])


def study_table(study: dict, truth: str, markdown: bool = True) -> str:
    """Estimator × task for one ground truth: pooled Spearman and the per-test mean (``S``,
    ``S/test``; the LDS alone for ``"lds"``), each ± half its 95% interval, then the truth's noise
    floor and ceiling where measured.
    """
    stats = ("spearman",) if truth == "lds" else ("spearman", "spearman_per_test")
    heads = ("LDS",) if truth == "lds" else ("S", "S/test")
    header = ["estimator"] + [f"{t} {h}" for t in study["tasks"] for h in heads]
    lines = [[m] + [_cell(b, m, truth, s) for b in study["boards"] for s in stats]
             for m in _methods(study)]
    floors = [_floor_cells(b, truth, stats) for b in study["boards"]]
    if any(c != "—" for f, _ in floors for c in f):
        lines.append(["noise floor (seed halves)"] + [c for f, _ in floors for c in f])
        lines.append(["ceiling (Spearman–Brown)"] + [c for _, g in floors for c in g])
    return md_table(header, lines, markdown, last_left=False)


def residual_table(study: dict, markdown: bool = True) -> str:
    """Estimator × task: the largest relative residual of each solving estimator's systems."""
    header = ["estimator"] + list(study["tasks"])
    lines = []
    for m in _methods(study):
        rows = [_row(b, m) for b in study["boards"]]
        lines.append([m] + ["—" if r is None else residual_cell(r) for r in rows])
    return md_table(header, lines, markdown, last_left=False)


def tasks_table(study: dict, markdown: bool = True) -> str:
    """One line per task: sizes, damping, and the removals each ground truth leaves out."""
    header = ["task", "profile", "N", "p", "test × removals", "λ", "θ^s test", "PBRF certified",
              "left out (uncertified or diverged)", "ground truths (min)", "estimators (min)"]
    lines = []
    facts = study.get("facts") or [{} for _ in study["boards"]]
    for task, b, f in zip(study["tasks"], study["boards"], facts):
        left = ", ".join(f"{lbl} {b['excluded_removals'].get(k, 0)}" for k, lbl in
                         leaderboard.TRUTHS if k in b["truths"])
        metric = ("n/a" if f.get("test_metric") is None
                  else f"{f['metric']} {f['test_metric']:.3f}")
        rho = f.get("pbrf_median_rho")
        cert = ("n/a" if f.get("pbrf_certified") is None else
                f"{f['pbrf_certified']} of {b['n_removals']}"
                + ("" if rho is None else f" (median ρ {rho:.0e})"))
        lines.append([task, str(b["profile"]), str(b["n_train"]), str(b["n_params"]),
                      f"{b['n_test']} × {b['n_removals']}", f"{b['damping']:g}", metric, cert,
                      left, _minutes(f.get("ground_truth_seconds")),
                      _minutes(f.get("estimator_seconds"))])
    return md_table(header, lines, markdown, last_left=False)


def _minutes(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"


def _stat(board: dict, method: str, stat: str):
    """``(value, [lo, hi])`` of an estimator's correlation with the PBRF, or ``None``."""
    row = _row(board, method)
    entry = None if row is None else row["correlations"].get("pbrf")
    if not entry or entry.get(stat) is None:
        return None
    ci = (entry.get("ci") or {}).get(stat)
    return entry[stat], ci if ci and None not in ci else [entry[stat], entry[stat]]


def claim_check(board: dict, lissa: str, stat: str = "spearman") -> str:
    """Whether "EK-FAC ≈ LiSSA > gradient dot" holds against the PBRF on one task: ≈ when the
    two 95% intervals overlap, > when both intervals lie above grad-dot's. Returns ``"holds"``
    or what fails (``"n/a"`` when a method is missing).
    """
    got = {k: _stat(board, m, stat) for k, m in
           (("ekfac", CLAIM["ekfac"]), ("lissa", lissa), ("grad", CLAIM["grad"]))}
    missing = [k for k, v in got.items() if v is None]
    if missing:
        return f"n/a ({', '.join(missing)} not on the board)"
    (_, e), (_, li), (_, g) = got["ekfac"], got["lissa"], got["grad"]
    fails = []
    if e[1] < li[0] or li[1] < e[0]:
        fails.append("EK-FAC ≉ LiSSA")
    for name, ci in (("EK-FAC", e), ("LiSSA", li)):
        if not ci[0] > g[1]:
            fails.append(f"{name} not > grad-dot")
    return "holds" if not fails else "; ".join(fails)


def claim_lines(study: dict) -> list[str]:
    """The claim per LiSSA setting and statistic, a sentence each, with the per-task verdicts."""
    out = []
    for setting, lissa in CLAIM["lissa"].items():
        for stat, what in (("spearman", "pooled Spearman"), ("spearman_per_test",
                                                              "per-test Spearman")):
            verdicts = [claim_check(b, lissa, stat) for b in study["boards"]]
            held = sum(v == "holds" for v in verdicts)
            detail = "; ".join(f"{t}: {v}{_residual_note(b, lissa)}"
                               for t, v, b in zip(study["tasks"], verdicts, study["boards"]))
            out.append(f"- {setting} LiSSA (`{lissa}`), {what} against the PBRF: holds on "
                       f"{held} of {len(verdicts)} tasks ({detail}).")
    return out


def _residual_note(board: dict, method: str) -> str:
    """`` (LiSSA residual 3.6e-01)``: how far the LiSSA of a verdict is from solving C x = g."""
    row = _row(board, method)
    return "" if row is None or residual_cell(row) == "—" else (
        f" (LiSSA residual {residual_cell(row)})")


def _figure(study: dict, path: Path) -> Path | None:
    """One panel per ground truth: each estimator's Spearman (LDS) per task, 95% error bars, and
    the ceiling implied by the noise floor where measured.
    """
    matplotlib.use("Agg")
    methods, tasks = _methods(study), study["tasks"]
    if not methods:
        return None
    fig, axes = plt.subplots(len(COLUMNS), 1, figsize=(max(8, 1.1 * len(methods) * len(tasks)
                                                           / 3), 3.0 * len(COLUMNS)), squeeze=False)
    width = 0.8 / max(len(tasks), 1)
    for ax, (truth, label) in zip(axes[:, 0], COLUMNS):
        for j, board in enumerate(study["boards"]):
            ys, lo, hi = _bars(board, methods, truth)
            xs = np.arange(len(methods)) + (j - (len(tasks) - 1) / 2) * width
            ax.bar(xs, ys, width, label=tasks[j], yerr=[ys - lo, hi - ys], capsize=2)
            ceiling = _ceiling(board, truth)
            if ceiling is not None:
                ax.hlines(ceiling, xs[0] - width / 2, xs[-1] + width / 2, colors=f"C{j}",
                          linestyles="dashed", linewidth=0.8)
        ax.set_ylabel(label if truth == "lds" else f"{label}: Spearman")
        ax.set_xticks(np.arange(len(methods)), methods, rotation=20, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=len(tasks))
    fig.suptitle("estimators across tasks (95% bootstrap intervals; dashed: noise-floor ceiling)")
    fig.tight_layout()
    return save_figure(fig, path)


def _bars(board: dict, methods: list[str], truth: str):
    ys, lo, hi = [], [], []
    for m in methods:
        row = _row(board, m)
        entry = None if row is None else (row.get("lds") if truth == "lds"
                                          else row["correlations"].get(truth))
        value = None if not entry else entry.get("lds" if truth == "lds" else "spearman")
        ci = None if not entry else (entry.get("ci") if truth == "lds"
                                     else (entry.get("ci") or {}).get("spearman"))
        v = math.nan if value is None else value
        ys.append(v)
        lo.append(v if not ci or ci[0] is None else ci[0])
        hi.append(v if not ci or ci[1] is None else ci[1])
    return np.array(ys), np.array(lo), np.array(hi)


def _ceiling(board: dict, truth: str):
    floor = (board.get("floors") or {}).get(truth) or {}
    return floor.get("ceiling_lds" if truth == "lds" else "ceiling_spearman")


def write_study(study: dict, out: str | Path, command: str | None = None) -> dict[str, Path]:
    """Write ``study.md``, ``study.json`` and ``study.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig = _figure(study, out / "study.png")
    parts = ["# Estimator study across tasks", ""]
    if command:
        parts += ["Regenerate with:", "", "```sh", command, "```", ""]
    b0 = study["boards"][0]
    parts += [tasks_table(study), "",
              "θ^s test: the base model's test metric. Times: compute seconds stored with the "
              "results (responses and LDS retraining; the estimators' scoring), "
              f"{b0.get('threads')} torch thread(s) per process on a {b0.get('cpus')}-CPU "
              "machine.", "", "## The published claim", "",
              "\"EK-FAC ≈ LiSSA > gradient dot product\" against the PBRF, per task: ≈ when the "
              "95% intervals overlap, > when both lie above grad-dot's.", "", *claim_lines(study)]
    for truth, label in COLUMNS:
        if any(truth in b["truths"] or (truth == "lds" and b.get("lds"))
               for b in study["boards"]):
            parts += ["", f"## {label}", "", study_table(study, truth)]
    parts += ["", "## Solver residuals", "", residual_table(study), "", LEGEND]
    if fig is not None:
        parts += ["", f"![estimators across tasks]({fig.name})"]
    atomic_write_text(out / "study.md", "\n".join(parts) + "\n")
    atomic_write_text(out / "study.json", json.dumps(leaderboard.jsonable(study), indent=2))
    return {"markdown": out / "study.md", "json": out / "study.json", "figure": fig}
