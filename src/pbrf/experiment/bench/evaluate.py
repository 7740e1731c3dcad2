"""``pbrf evaluate``: score another library's influence estimates against a run's responses.

The scores file is ``.npy`` or ``.csv`` (comma separated, one row per test point) of shape

* ``[n_test, n_removals]`` — one column per removal set of the run, in the run's order; or
* ``[n_test, n_train]`` — one column per training point; mapped onto the run's removal sets
  (a group's score is the sum of its points' scores, as group influence is additive).

Rows are the run's test points in the order of ``test_index`` (stored in the run's database).
The sign convention is pbrf's: positive = removing the set increases the test loss; scores that
anti-correlate with the run's own influence estimate get a warning (likely the opposite sign).
Non-finite scores are left out of every correlation, and the count left out is reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pbrf.experiment import analysis
from pbrf.experiment.report import text_table
from pbrf.experiment.run.arrays import RunDataError, run_arrays

__all__ = ["EvaluateError", "load_scores", "finite_scaled", "map_scores", "run_arrays", "evaluate",
           "format_correlations", "pairs_line"]

#: Pearson correlation with the run's own influence estimate at or below which the sign is suspect.
SIGN_FLIP_PEARSON = -0.5


#: Bad scores file or run directory (one-line message naming the fix): the error of
#: :func:`~pbrf.experiment.run.arrays.run_arrays`, which reads the run.
EvaluateError = RunDataError


def load_scores(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` or ``.csv`` file of scores as a float64 2-D array."""
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"scores file {str(path)!r} does not exist; pass --scores FILE.npy or "
                            "FILE.csv.")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            if not path.read_text().strip():
                raise EvaluateError(f"scores file {str(path)!r} is empty; write one row of scores "
                                    "per test point.")
            arr = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
        else:
            raise EvaluateError(f"scores file {str(path)!r} must end in .npy or .csv.")
    except EvaluateError:
        raise
    except (ValueError, OSError, EOFError) as err:
        reason = str(err) or type(err).__name__
        raise EvaluateError(f"cannot read scores file {str(path)!r} ({reason}); write it with "
                            "numpy.save or as CSV.") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf":
        what = f"{arr.dtype} values" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise EvaluateError(f"scores file {str(path)!r} holds {what}, not real numbers; save a "
                            "float array [n_test, n_removals].")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2:
        raise EvaluateError(f"scores in {str(path)!r} have shape {arr.shape}; expected a 2-D array "
                            "[n_test, n_removals] or [n_test, n_train].")
    return arr


def finite_scaled(scores: np.ndarray) -> np.ndarray:
    """``scores`` divided by their largest finite magnitude (when that is > 0): correlations do not
    change, and sums and products of values near the float64 limit (1e308) stay finite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    return scores / top if top > 0 else scores


def map_scores(scores: np.ndarray, groups: list[list[int]], n_train: int) -> tuple[np.ndarray, str]:
    """Scores ``[n_test, n_removals]`` for the run's removal sets; also says which layout was read.

    Raises:
        EvaluateError: the shape matches neither layout.
    """
    n_test, n_removals = scores.shape[0], len(groups)
    if scores.shape[1] == n_removals:
        return scores, "removals"
    if scores.shape[1] == n_train:
        mapped = np.stack([scores[:, g].sum(axis=1) for g in groups], axis=1)
        return mapped, "train"
    raise EvaluateError(
        f"scores have shape {scores.shape}; the run needs [{n_test}, {n_removals}] (one column per "
        "removal set) "
        f"or [{n_test}, {n_train}] (one column per training point)."
    )


def evaluate(scores_path: str | Path, run_dir: str | Path) -> dict:
    """Correlations of external scores with every stored response function of a run.

    Returns:
        ``{"scores", "run", "layout", "n_test", "n_removals", "correlations": {kind: {...}}}`` with
        the entries of :func:`pbrf.experiment.analysis.correlations`.
    """
    arrays = run_arrays(run_dir)
    raw = load_scores(scores_path)
    n_test = arrays["dm"]["influence"].shape[0]
    if raw.shape[0] != n_test:
        raise EvaluateError(
            f"scores have {raw.shape[0]} rows but the run has {n_test} test points; one row per "
            "test point (run order)."
        )
    n_train = arrays["n_train"] or -1
    # scaled first: correlations do not change, and group sums of values near 1e308 stay finite
    scores, layout = map_scores(finite_scaled(raw), arrays["groups"], n_train)
    scores = finite_scaled(scores)
    diverged = arrays.get("diverged") or {}
    # as in the run's report: diverged responses measure nothing
    dm = analysis.exclude_removals(arrays["dm"], diverged, axis=1)
    uncertified = arrays.get("uncertified") or {}
    # and an uncertified PBRF/proximal response is no ground truth
    dm = analysis.exclude_removals(dm, uncertified, axis=1)
    corr = analysis.correlations(scores, dm)
    own = analysis.pearson(scores, arrays["dm"]["influence"])
    sign_warning = None
    if math.isfinite(own) and own <= SIGN_FLIP_PEARSON:
        sign_warning = (
            "the scores anti-correlate with the run's own influence estimate (Pearson "
            f"{own:.3f}); "
            "pbrf's sign is positive = removing the set increases the test loss, so "
            "negate scores "
            "that use the opposite convention."
        )
    return {
        "scores": str(scores_path),
        "run": str(run_dir),
        "layout": layout,
        "n_test": int(n_test),
        "n_removals": len(arrays["groups"]),
        "n_pairs_total": int(scores.size),
        "n_nonfinite_scores": int((~np.isfinite(scores)).sum()),
        "pearson_vs_own_influence": analysis.finite_or_none(own),
        "sign_warning": sign_warning,
        "diverged": {k: len(v) for k, v in diverged.items()},
        "uncertified": {k: len(v) for k, v in uncertified.items()},
        "correlations": corr,
    }


def pairs_line(result: dict) -> str:
    """How many (test, removal) pairs the correlations use, and how many were left out and why."""
    total, bad = result["n_pairs_total"], result["n_nonfinite_scores"]
    counts = sorted({int(e["n_pairs"]) for e in result["correlations"].values()})
    used = (
        "n/a"
        if not counts
        else str(counts[0])
        if len(counts) == 1
        else f"{counts[0]} to {counts[-1]}"
    )
    text = f"pairs used: {used} of {total}"
    if bad:
        text += f"; {bad} dropped for non-finite (NaN/inf) scores"
    if result.get("diverged"):
        named = ", ".join(
            f"{analysis.KIND_LABELS.get(k, k)} {v}" for k, v in result["diverged"].items()
        )
        text += f"; removal sets whose response diverged are excluded ({named})"
    if result.get("uncertified"):
        named = ", ".join(
            f"{analysis.KIND_LABELS.get(k, k)} {v}" for k, v in result["uncertified"].items()
        )
        text += f"; uncertified responses are excluded ({named})"
    elif counts and counts[0] < total - bad:
        text += "; more dropped where a response is non-finite (pairs column)"
    return text


def format_correlations(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s correlations."""
    header = ["scores vs", "Pearson", "Spearman", "P/test", "S/test", "pairs"]
    rows = []
    for kind, entry in result["correlations"].items():
        cells = [
            entry.get(k) for k in ("pearson", "spearman", "pearson_per_test", "spearman_per_test")
        ]
        rows.append(
            [analysis.KIND_LABELS.get(kind, kind)]
            + ["n/a" if c is None else f"{c:.3f}" for c in cells]
            + [str(entry.get("n_pairs", "n/a"))]
        )
    return text_table(header, rows)


def to_json(result: dict) -> str:
    """JSON text of :func:`evaluate`'s result."""
    return json.dumps(result, indent=2)
