"""``pbrf estimators RUN RUN --out DIR``: the cross-task study on two tiny runs."""

import json
import re

import numpy as np
import pytest

from pbrf import cli, estimators
from pbrf.experiment import config as cfg
from pbrf.experiment.bench import leaderboard, study
from pbrf.experiment.run import driver as pipeline
from pbrf.experiment.run.store import Store

#: two cold-start seeds and two LDS retraining seeds, so both noise floors are measured
SETS = ["lds.subsets=6", "lds.seeds=[0, 1]", "responses.cold_seeds=[1, 2]",
        "responses.kinds=['influence', 'pbrf', 'warm', 'cold']"]
METHODS = "influence-cg,grad-dot,trak,arnoldi"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    runs = []
    for preset in ("digits-mlp", "digits-binary"):
        out = root / preset
        pipeline.run_experiment(cfg.load_preset(preset, "tiny", SETS), out, progress=False)
        runs.append(out)
    return runs


def _study(runs, out, capsys):
    args = ["estimators", *map(str, runs), "--out", str(out), "--methods", METHODS,
            "--hp", "trak.dim=32", "--hp", "arnoldi.rank=8"]
    assert cli.main(args) == 0
    capsys.readouterr()
    return json.loads((out / "study.json").read_text())


def test_the_cross_task_table_reproduces_each_runs_own_leaderboard(two_runs, tmp_path, capsys):
    result = _study(two_runs, tmp_path / "study", capsys)
    assert result["tasks"] == ["digits-mlp", "digits-binary"]
    md = (tmp_path / "study" / "study.md").read_text()
    assert (tmp_path / "study" / "study.png").is_file()
    for run, board in zip(two_runs, result["boards"]):
        own = json.loads((run / "estimators" / "leaderboard.json").read_text())
        assert own["rows"] == board["rows"]  # the same numbers, intervals included
        own_md = (run / "estimators" / "leaderboard.md").read_text()
        for row in own["rows"]:
            entry = row["correlations"]["pbrf"]
            cell = leaderboard.ci_cell(entry["spearman"], entry["ci"]["spearman"])
            # the cell is the same string in the run's leaderboard and in the study's PBRF table
            assert f"| {cell} |" in own_md
            line = next(ln for ln in md.split("## PBRF")[1].splitlines()
                        if ln.startswith(f"| {row['method']} |"))
            assert cell in line
    # both ground truths measured with two seeds have a floor, in each run's board and the study
    for board in result["boards"]:
        assert set(board["floors"]["cold"]) >= {"spearman", "spearman_ci", "ceiling_spearman"}
        assert board["floors"]["lds"]["lds"] is not None
        assert "note" in board["floors"]["pbrf"]
    assert "noise floor (seed halves)" in md.split("## cold LOO")[1]


def test_a_rerun_of_the_study_recomputes_nothing(two_runs, tmp_path, capsys, monkeypatch):
    first = _study(two_runs, tmp_path / "a", capsys)

    def refuse(*args, **kwargs):
        raise AssertionError("a stored estimator was recomputed")

    monkeypatch.setattr(estimators.Estimator, "scores", refuse)
    second = _study(two_runs, tmp_path / "b", capsys)
    assert second == {**first}
    a = (tmp_path / "a" / "study.md").read_text()
    b = (tmp_path / "b" / "study.md").read_text()
    assert a.replace(str(tmp_path / "a"), "") == b.replace(str(tmp_path / "b"), "")


def test_the_study_checks_every_run_before_any_work(two_runs, tmp_path, capsys):
    missing = tmp_path / "nope"
    args = ["estimators", str(two_runs[0]), str(missing), "--out", str(tmp_path / "s"),
            "--methods", "grad-dot"]
    before = _stored(two_runs[0])
    assert cli.main(args) == 2
    assert "nope" in capsys.readouterr().err
    assert _stored(two_runs[0]) == before  # nothing was scored for the first run
    assert not (tmp_path / "s").exists()
    assert cli.main(["estimators", *map(str, two_runs), "--methods", "grad-dot"]) == 2
    assert "--out" in capsys.readouterr().err


def _stored(run) -> set:
    with Store(run, readonly=True) as store:
        return {k for k, _ in store.done() if k.startswith(leaderboard.PREFIX)}


def test_the_claim_check_reads_the_intervals():
    def board(ekfac, lissa, grad):
        rows = [{"method": m, "correlations": {"pbrf": {"spearman": v[0],
                                                        "ci": {"spearman": list(v[1])}}}}
                for m, v in (("kronfluence-ekfac", ekfac), ("influence-lissa", lissa),
                             ("grad-dot", grad))]
        return {"rows": rows}

    holds = board((0.8, (0.7, 0.9)), (0.85, (0.75, 0.95)), (0.2, (0.1, 0.3)))
    assert study.claim_check(holds, "influence-lissa") == "holds"
    apart = board((0.5, (0.45, 0.55)), (0.9, (0.85, 0.95)), (0.2, (0.1, 0.3)))
    assert study.claim_check(apart, "influence-lissa") == "EK-FAC ≉ LiSSA"
    tied = board((0.3, (0.2, 0.4)), (0.35, (0.25, 0.45)), (0.3, (0.2, 0.4)))
    assert re.fullmatch(r"EK-FAC not > grad-dot; LiSSA not > grad-dot",
                        study.claim_check(tied, "influence-lissa"))
    assert study.claim_check(holds, "influence-lissa-published").startswith("n/a")
    assert np.isfinite(holds["rows"][0]["correlations"]["pbrf"]["spearman"])
