"""Report details: cold-start seed note, log axis for epochs sweeps, table labels of sweep runs."""

import json
from pathlib import Path

from pbrf import cli
from pbrf.experiment import report


def test_cold_seed_note_says_when_cold_start_reuses_the_seed_of_theta_s():
    summary = {"kinds": ["cold", "pbrf"]}

    def config(seeds):
        return {"responses": {"cold_seeds": seeds}, "train": {"seed": 0}}

    same = report._cold_seeds_note(summary, config([0]))
    assert "same-seed retraining" in same and "only" in same
    assert "2 other seeds" in report._cold_seeds_note(summary, config([0, 1, 2]))
    assert "all different" in report._cold_seeds_note(summary, config([1, 2]))
    assert report._cold_seeds_note({"kinds": ["pbrf"]}, config([0])) is None
    assert "cold-start seeds" in report._experiment_section(summary, config([0]))


def test_epochs_sweep_uses_a_log_axis():
    assert report._sweep_x([5, 10, 20], "epochs")[2] is True
    assert report._sweep_x([16, 32, 64], "width")[2] is False
    assert report._sweep_x([1e-3, 1e-1], "width")[2] is True  # spans 100x
    assert report._sweep_x(["a", "b"], "epochs")[2] is False


def test_table_labels_sweep_runs_with_preset_and_value(tmp_path, capsys):
    summary = {"experiment": {"name": "digits-mlp", "profile": "tiny"},
               "correlations": {"pbrf": {"pearson": 0.5, "spearman": 0.4}}}
    runs = [tmp_path / "sweep" / "damping=0.01", tmp_path / "plain"]
    for run in runs:
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(summary))
    assert cli.main(["table", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "digits-mlp (tiny) damping=0.01" in out
    assert "digits-mlp (tiny)" in out.splitlines()[-1]
    assert cli._table_label(Path("x"), {}) == "x"
