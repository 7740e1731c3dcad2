"""Report details: cold-start seed note, log axis for epochs sweeps, table labels of sweep runs."""

import json
from pathlib import Path

import pytest

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


def _summary(pbrf_p, pbrf_s, gaps):
    names = ("warm-start gap", "proximity gap", "non-convergence gap", "linearisation error",
             "solver error")
    return {"correlations": {"pbrf": {"pearson": pbrf_p, "spearman": pbrf_s},
                             "cold": {"pearson": 0.2, "spearman": 0.1}},
            "decomposition": {"gaps": dict(zip(names, gaps))}}


def test_how_to_read_follows_the_measured_numbers():
    paper = report.how_to_read(_summary(0.98, 0.99, [1e-2, 3e-3, 8e-3, 2e-5, 1e-7]))
    assert "tracks the PBRF closely" in paper and "the paper's finding" in paper
    assert "Unlike" not in paper
    lin = report._measured_reading(_summary(0.95, 0.96, [1e-2, 3e-3, 8e-3, 5e-3, 1e-7]))
    assert "Unlike the paper's finding" in lin and "linearisation" in lin
    solver = report._measured_reading(_summary(0.5, 0.4, [1e-2, 3e-3, 8e-3, 2e-3, 4e-3]))
    assert "does not track the PBRF well" in solver and "not converged enough" in solver
    ranks = report._measured_reading(_summary(0.6, 0.95, [1e-2, 3e-3, 8e-3, 2e-5, 1e-7]))
    assert "ranks the removals as the PBRF does" in ranks
    partial = report._measured_reading({"decomposition": {"gaps": {"proximity gap": 1e-3}}})
    assert "do not form the whole chain" in partial


def test_no_empty_decomposition_figure_when_no_gap_is_measured(tmp_path, monkeypatch):
    import numpy as np
    from matplotlib.axes import Axes

    texts, real = [], Axes.text

    def spy(self, *args, **kwargs):
        texts.append(args[2])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "text", spy)
    summary = {"correlations": {}, "decomposition": {"gaps": {"proximity gap": None}}}
    report.write_report(tmp_path, summary, {"pbrf": np.zeros((2, 3))}, {})
    assert (tmp_path / "figures" / "decomposition.png").is_file()  # it says why it is empty
    assert any("no gap measured" in t for t in texts), texts


def _gap_summary(warm, lin=1e-6):
    names = ("warm-start gap", "proximity gap", "non-convergence gap", "linearisation error",
             "solver error")
    return {"decomposition": {"gaps": dict(zip(names, [warm, 1e-3, 1e-3, lin, 1e-8]))},
            "correlations": {"pbrf": {"pearson": 0.9}, "cold": {"pearson": 0.3}}}


def test_sweep_trends_direction_and_error_bar_separation(tmp_path):
    # three values x three seeds; the warm-start gap grows and its bars separate
    per_value = [[_gap_summary(w + d) for d in (-1e-4, 0.0, 1e-4)] for w in (1e-3, 2e-3, 4e-3)]
    t = report.sweep_trends([1, 2, 3], per_value)
    warm = t["warm-start gap"]
    assert warm["direction"] == "increases" and warm["separated"] is True
    assert warm["means"] == pytest.approx([1e-3, 2e-3, 4e-3])
    assert warm["stds"][0] == pytest.approx(1e-4)
    # a gap that does not move: non-monotone noise, bars overlap
    noisy = [[_gap_summary(1e-3, lin=v) for v in vals] for vals in
             ((1e-6, 3e-6, 2e-6), (2e-6, 1e-6, 3e-6), (1.5e-6, 2.5e-6, 2e-6))]
    lin = report.sweep_trends([1, 2, 3], noisy)["linearisation error"]
    assert lin["separated"] is False
    single = report.sweep_trends([1, 2], [_gap_summary(1e-3), _gap_summary(2e-3)])
    assert single["warm-start gap"]["separated"] is None
    assert report.plot_sweep("width", [1, 2, 3], per_value, tmp_path / "s.png").is_file()
    assert report.plot_sweep("width", [1, 2], [{}, {}], tmp_path / "empty.png").is_file()



def test_sweep_several_factors_and_seeds(tmp_path):
    from .test_cli import CHEAP, TINY, pbrf_cmd

    out = tmp_path / "sweep"
    proc = pbrf_cmd("sweep", "digits-mlp", *TINY, *CHEAP, "--factor", "damping", "--values",
                    "0.1,1", "--factor", "width", "--values", "8,16", "--seeds", "2",
                    "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "sweep-damping.png").is_file() and (out / "sweep-width.png").is_file()
    seeds = sorted(p.name for p in (out / "width=8").iterdir() if p.is_dir())
    assert seeds == ["seed=0", "seed=1"]
    cfg = json.loads((out / "width=8" / "seed=1" / "config.json").read_text())
    assert cfg["train"]["seed"] == 1 and cfg["model"]["options"]["width"] == 8
    text = (out / "sweep.md").read_text()
    assert "## damping" in text and "## width" in text and " ± " in text
    assert "with damping (the error bars" in text
    bad = pbrf_cmd("sweep", "digits-mlp", *TINY, "--factor", "damping", "--values", "0.1",
                   "--factor", "width", cwd=tmp_path)
    assert bad.returncode == 2 and "one --values per --factor" in bad.stderr
