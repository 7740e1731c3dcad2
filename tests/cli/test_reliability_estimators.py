"""Issue 20, items 2, 6 (score reuse) and 8: ``pbrf estimators``, ``pbrf evaluate`` and
``pbrf sweep --values`` through the real entry point, on one tiny run shared by the module.
"""

import hashlib
import json
import warnings

import numpy as np
import pytest

from pbrf.experiment.bench import evaluate, leaderboard
from tests.cli.test_cli import CHEAP, TINY, assert_one_line_error, pbrf_cmd


@pytest.fixture(scope="module")
def cheap_run(tmp_path_factory):
    """One tiny run (linearised PBRF + influence) with grad-dot scores stored."""
    cwd = tmp_path_factory.mktemp("rel")
    run = cwd / "r"
    proc = pbrf_cmd("run", *TINY, *CHEAP, "--out", str(run), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    proc = pbrf_cmd("estimators", str(run), "--methods", "grad-dot", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd, run


def _digest(run):
    """What the run stores and shows: the database and the leaderboard files."""
    files = [run / "results.sqlite", *sorted((run / "estimators").glob("leaderboard.*"))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("hp, key", [
    ("arnoldi.damping=-1", "damping"),
    ("influence-cg.curvature=frob", "curvature"),
    ("influence-cg.solver_options={max_iter=-1}", "max_iter"),
    ("tracin.lr_weighted=1", "lr_weighted"),
])
def test_invalid_hyperparameter_value_is_a_user_error_before_any_work(cheap_run, hp, key):
    cwd, run = cheap_run
    method = hp.split(".")[0]
    before = _digest(run)
    proc = pbrf_cmd("estimators", str(run), "--methods", f"grad-dot,{method}", "--hp", hp,
                    cwd=cwd)
    assert_one_line_error(proc, method, key, "e.g.")
    assert _digest(run) == before  # no estimator ran, the stored rows and leaderboard untouched


def test_repeated_or_builtin_external_label_is_a_user_error(cheap_run, tmp_path):
    cwd, run = cheap_run
    np.save(tmp_path / "s.npy", np.load(run / "influence_scores.npy"))
    before = _digest(run)
    proc = pbrf_cmd("estimators", str(run), "--methods", "grad-dot",
                    "--scores", f"grad-dot={tmp_path / 's.npy'}", cwd=cwd)
    assert_one_line_error(proc, "grad-dot", "name of an estimator", "--scores")
    proc = pbrf_cmd("estimators", str(run), "--methods", "grad-dot",
                    "--scores", f"x={tmp_path / 's.npy'}", "--scores", f"x={tmp_path / 's.npy'}",
                    cwd=cwd)
    assert_one_line_error(proc, "x", "twice", "--scores")
    assert _digest(run) == before


def test_sweep_repeated_value_is_a_user_error_before_any_run(tmp_path):
    out = tmp_path / "sw"
    proc = pbrf_cmd("sweep", "digits-mlp", *TINY, "--factor", "width", "--values", "8,8",
                    "--out", str(out), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "width", "twice", "--values")
    assert not out.exists()


def test_external_scores_say_what_was_dropped_and_why_na(cheap_run, tmp_path):
    cwd, run = cheap_run
    own = np.load(run / "influence_scores.npy")
    nan = own.copy()
    nan[0, :3] = np.nan
    nan[1, 0] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "const.npy", np.ones_like(own))
    proc = pbrf_cmd("estimators", str(run), "--methods", "grad-dot",
                    "--scores", f"holes={tmp_path / 'nan.npy'}",
                    "--scores", f"flat={tmp_path / 'const.npy'}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert any("holes" in n and f"4 of {own.size}" in n and "non-finite" in n for n in notes)
    assert any("flat" in n and "constant" in n and "n/a" in n for n in notes)
    md = (run / "estimators" / "leaderboard.md").read_text()
    assert "non-finite (NaN/inf)" in md and "constant" in md
    # against a ground truth (this cheap run has none on the board): n/a, with the reason
    flat = leaderboard.score_row("flat", np.ones_like(own), {"pbrf": own})
    assert flat["correlations"]["pbrf"]["spearman"] is None
    assert "constant" in flat["notes"][0]


def test_huge_external_scores_are_computed_without_numpy_warnings(cheap_run, tmp_path):
    cwd, run = cheap_run
    own = np.load(run / "influence_scores.npy")
    huge = own / np.abs(own).max() * 1.7e308
    np.save(tmp_path / "huge.npy", huge)
    proc = pbrf_cmd("estimators", str(run), "--methods", "grad-dot",
                    "--scores", f"huge={tmp_path / 'huge.npy'}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    np.save(tmp_path / "own.npy", own)
    got = {}
    for name in ("own", "huge"):
        proc = pbrf_cmd("evaluate", "--scores", str(tmp_path / f"{name}.npy"), "--run", str(run),
                        "--json", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert "Warning" not in proc.stderr, proc.stderr
        got[name] = json.loads(proc.stdout)["correlations"]["linearized"]
    assert got["huge"]["pearson"] == pytest.approx(got["own"]["pearson"], abs=1e-12)
    assert got["huge"]["spearman"] == pytest.approx(got["own"]["spearman"], abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = leaderboard.score_row("huge", huge, {"pbrf": own})
    assert row["correlations"]["pbrf"]["pearson"] == pytest.approx(1.0, abs=1e-12)
    # the callers' scaling in-process, for [n_test, N] point scores whose group sums would
    # overflow (map_scores itself sums exactly: its values are the scores' group sums)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = np.full((2, 4), 1.5e308)
        mapped, _ = evaluate.map_scores(evaluate.finite_scaled(big), [[0, 1], [2, 3]], 4)
        assert np.isfinite(mapped).all()
        assert leaderboard.row_notes(evaluate.finite_scaled(mapped))  # constant: said
