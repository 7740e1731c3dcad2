"""``pbrf.load_run`` round trip and the ``pbrf estimators`` leaderboard on a tiny run."""

import json

import numpy as np
import pytest
import torch

import pbrf
from pbrf import cli
from pbrf.experiment import config as cfg
from pbrf.experiment.bench import leaderboard
from pbrf.experiment.run import driver as pipeline
from pbrf.experiment.run import load
from pbrf.experiment.run.arrays import run_arrays
from pbrf.experiment.run.store import ChunkResult, Store

TINY_SETS = ["lds.subsets=6", "train.checkpoints=3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The digits tiny profile with TracIn checkpoints and a 6-subset LDS ground truth."""
    out = tmp_path_factory.mktemp("lb") / "run"
    config = cfg.load_preset("digits-mlp", "tiny", TINY_SETS)
    pipeline.run_experiment(config, out, progress=False)
    return out


def test_load_run_reproduces_the_stored_influence_scores(tiny_run):
    run = pbrf.load_run(tiny_run)
    stored = np.load(tiny_run / "influence_scores.npy")
    again = pbrf.influence(run.measure_problem, run.test, run.removals, **run.influence_settings)
    np.testing.assert_allclose(again.numpy(), stored, rtol=1e-10, atol=1e-14)
    # the model is θ^s in the run's dtype; the data are the run's, as the run used them
    theta, _ = pbrf.load_checkpoint(tiny_run / "theta_s.safetensors")
    for name, p in run.model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p.detach(), theta[name].to(p))
    assert run.train[0].dtype == run.problem.dtype == torch.float64
    assert run.n_train == 200 and len(run.removals) == 8 and run.test[0].shape[0] == run.n_test == 5
    meta = json.loads((tiny_run / "removals.json").read_text())
    assert meta["n_train"] == run.n_train and meta["damping"] == run.damping == 0.1
    assert meta["weight_decay"] == run.weight_decay and meta["curvature"] == "ggn"
    assert meta["model"]["in_shape"] == [1, 8, 8] and meta["model"]["n_outputs"] == 10
    # a model rebuilt from removals.json alone gives the run's outputs
    model = pbrf.models.build(
        meta["model"]["name"],
        seed=0,
        dtype=torch.float64,
        **{k: v for k, v in meta["model"].items() if k != "name"},
    )
    model.load_state_dict(dict(theta))
    torch.testing.assert_close(model(run.test[0]), run.model(run.test[0]))


def test_load_run_responses_and_checkpoints(tiny_run):
    run = pbrf.load_run(tiny_run)
    resp = run.responses()
    assert {"pbrf", "warm", "cold", "influence", "warm_paired", "proximal_paired"} <= set(resp)
    assert resp["pbrf"].shape == (5, 8)
    np.testing.assert_allclose(
        resp["influence"], np.load(tiny_run / "influence_scores.npy"), rtol=0, atol=0
    )
    cks = run.training_checkpoints()
    assert len(cks) == 3 and cks[-1]["step"] > cks[0]["step"]
    for name, v in cks[-1]["params"].items():  # the last checkpoint is θ^s
        assert torch.equal(v, run.problem.params[name])


def test_load_run_errors_name_the_fix(tmp_path):
    with pytest.raises(cfg.ConfigError, match="pbrf run"):
        pbrf.load_run(tmp_path)


def test_estimators_command_writes_a_resumable_leaderboard(tiny_run, capsys):
    methods = "influence-exact,influence-cg,arnoldi,trak,tracin,grad-dot"
    assert (
        cli.main(
            ["estimators", str(tiny_run), "--methods", methods, "--hp", "arnoldi.rank=20", "--json"]
        )
        == 0
    )
    board = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in board["rows"]}
    assert set(rows) == set(methods.split(","))
    # exact influence is the run's own influence estimate up to the practical solver's error
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert rows["influence-cg"]["correlations"]["pbrf"]["pearson"] == pytest.approx(
        summary["correlations"]["pbrf"]["pearson"], abs=1e-9
    )
    assert rows["influence-cg"]["lds"]["lds"] == pytest.approx(
        summary["lds"]["influence"]["lds"], abs=1e-9
    )
    assert rows["arnoldi"]["hyperparameters"]["rank"] == 20
    assert all(r["seconds"] > 0 for r in rows.values())
    for name in ("leaderboard.md", "leaderboard.json", "leaderboard.png"):
        assert (tiny_run / "estimators" / name).is_file()
    md = (tiny_run / "estimators" / "leaderboard.md").read_text()
    assert "| influence-exact |" in md and "LDS" in md
    with Store(tiny_run, readonly=True) as store:
        first = store.get_chunk("estimator:trak", 0).diagnostics[0]["when"]
    # resumed: stored estimators are not recomputed; a changed hyperparameter is
    assert (
        cli.main(["estimators", str(tiny_run), "--methods", "trak,grad-dot", "--hp", "trak.dim=64"])
        == 0
    )
    err = capsys.readouterr().err
    assert "grad-dot: stored" in err and "trak: running" in err
    with Store(tiny_run, readonly=True) as store:
        diag = store.get_chunk("estimator:trak", 0).diagnostics[0]
    assert diag["hyperparameters"]["dim"] == 64 and diag["when"] >= first


def test_estimators_command_errors(tiny_run, tmp_path, capsys):
    assert cli.main(["estimators", str(tiny_run), "--methods", "nope"]) == 2
    assert "unknown estimator" in capsys.readouterr().err
    assert (
        cli.main(["estimators", str(tiny_run), "--methods", "trak", "--hp", "arnoldi.rank=3"]) == 2
    )
    assert "not among the methods" in capsys.readouterr().err
    assert cli.main(["estimators", str(tiny_run), "--methods", "trak", "--hp", "trak.dim=-1"]) == 2
    assert "dim" in capsys.readouterr().err
    # a typo in a hyperparameter is refused before any estimator runs
    args = ["estimators", str(tiny_run), "--methods", "grad-cos,trak", "--hp", "trak.rank=3"]
    assert cli.main(args) == 2
    assert "trak has no hyperparameter rank" in capsys.readouterr().err
    with Store(tiny_run, readonly=True) as store:
        assert store.get_chunk("estimator:grad-cos", 0) is None
    assert cli.main(["estimators", str(tmp_path)]) == 2
    assert "pbrf run" in capsys.readouterr().err


def test_estimators_command_ranks_external_scores(tiny_run, tmp_path, capsys):
    own = np.load(tiny_run / "influence_scores.npy")
    np.save(tmp_path / "own.npy", own)
    assert (
        cli.main(
            [
                "estimators",
                str(tiny_run),
                "--methods",
                "grad-dot",
                "--scores",
                f"mine={tmp_path / 'own.npy'}",
                "--json",
            ]
        )
        == 0
    )
    board = json.loads(capsys.readouterr().out)
    mine = next(r for r in board["rows"] if r["method"] == "mine")
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert mine["correlations"]["pbrf"]["spearman"] == pytest.approx(
        summary["correlations"]["pbrf"]["spearman"], abs=1e-12
    )
    assert mine["seconds"] is None


def test_readme_scoring_another_library_example_runs(tiny_run, tmp_path, monkeypatch):
    """The README's example, on the tiny run: EK-FAC scores through load_run, ranked by evaluate."""
    pytest.importorskip("kronfluence")
    import re
    from pathlib import Path

    from pbrf.experiment.bench import leaderboard

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Scoring another library.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its 'Scoring another library' example"
    monkeypatch.chdir(tmp_path)
    code = block.group(1).replace('"runs/digits-mlp"', repr(str(tiny_run)))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    scores = np.load(tmp_path / "ekfac.npy")
    assert scores.shape == (5, 200)
    board = leaderboard.evaluate_board(tmp_path / "ekfac.npy", tiny_run)
    row = board["rows"][0]
    # EK-FAC approximates the same damped Gauss–Newton influence that the PBRF tracks
    assert row["correlations"]["pbrf"]["pearson"] > 0.8, row


def test_threads_option_sets_torch_threads(capsys, monkeypatch):
    monkeypatch.setenv(
        "OMP_NUM_THREADS", "1"
    )  # restored afterwards: --threads writes both for Ray workers
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert cli.main(["estimators", "--list", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert cli.main(["estimators", "--list", "--threads", "0"]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err


def test_lds_stage_resumes_only_what_is_missing(tiny_run, tmp_path):
    """A run killed during the LDS stage: the finished chunks are kept, the rest recomputed, and
    the summary equals the uninterrupted run's."""
    import shutil
    import sqlite3

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    full = json.loads((tiny_run / "summary.json").read_text())["lds"]
    with Store(copy, readonly=True) as store:
        kept = store.get_chunk("lds", 0).dm
    conn = sqlite3.connect(copy / "results.sqlite")
    with conn:
        conn.execute("DELETE FROM chunks WHERE kind = 'lds' AND chunk = 1")
        conn.execute("DELETE FROM meta WHERE key = 'lds_done'")
    conn.close()
    config = cfg.load_preset("digits-mlp", "tiny", TINY_SETS)
    resumed = pipeline.run_experiment(config, copy, progress=False)["lds"]
    assert resumed == full
    with Store(copy, readonly=True) as store:
        assert np.array_equal(store.get_chunk("lds", 0).dm, kept)
        assert store.get_chunk("lds", 1) is not None


def test_lds_retraining_reports_how_far_from_converged(tiny_run):
    """The LDS retrainings carry ρ = ‖∇J‖ / signal like every trained response; the report shows
    it."""
    lds = json.loads((tiny_run / "summary.json").read_text())["lds"]
    conv = lds["convergence"]
    with Store(tiny_run, readonly=True) as store:
        rho = [d["rho"] for c in (0, 1) for d in store.get_chunk("lds", c).diagnostics]
    assert conv["max_rho"] == pytest.approx(max(rho)) and conv["diverged"] == 0
    assert "ρ = ‖∇J‖ / signal" in (tiny_run / "report.md").read_text()


def test_stored_scores_are_reused_only_at_the_resolved_hyperparameters(tiny_run):
    """Scores stored at another damping (e.g. before config.json was edited) are recomputed, and
    the log says why; the request alone (no --hp) is the same in both cases.
    """
    leaderboard.run_estimators(tiny_run, ("grad-dot", "influence-exact"), log=lambda m: None)
    with Store(tiny_run) as store:
        got = store.get_chunk("estimator:influence-exact", 0)
        info = dict(got.diagnostics[0])
        now = info["hyperparameters"]["damping"]
        info["hyperparameters"] = {**info["hyperparameters"], "damping": now * 7}
        store.put_chunk(ChunkResult("estimator:influence-exact", 0, got.dm + 1.0, None, [info],
                                    got.seconds, None))
    lines = []
    board = leaderboard.run_estimators(tiny_run, ("grad-dot", "influence-exact"), log=lines.append)
    assert "grad-dot: stored" in lines[0]
    assert any("influence-exact" in m and "recomputing" in m and "damping" in m for m in lines)
    row = next(r for r in board["rows"] if r["method"] == "influence-exact")
    assert row["hyperparameters"]["damping"] == now
    with Store(tiny_run, readonly=True) as store:
        again = store.get_chunk("estimator:influence-exact", 0)
    assert again.diagnostics[0]["hyperparameters"]["damping"] == now
    assert np.allclose(again.dm, got.dm)


def test_ground_truths_leave_out_both_diverged_and_uncertified_removals(tiny_run, monkeypatch):
    """A kind with a diverged removal *and* uncertified ones loses all of them (a dict merge once
    kept only the uncertified list, so a diverged PBRF entered the leaderboard's ground truth).
    """
    real = run_arrays(tiny_run)
    fake = {**real, "diverged": {"pbrf": [0]}, "uncertified": {"pbrf": [1, 2]}}
    monkeypatch.setattr(load, "run_arrays", lambda run_dir: fake)
    truth = load.stored_responses(tiny_run)["pbrf"]
    assert np.isnan(truth[:, [0, 1, 2]]).all()
    assert np.isfinite(truth[:, 3:]).all()
