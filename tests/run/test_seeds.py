"""``run.seeds``: several θ^s per run, every correlation and gap as mean ± std over them."""

import json
import math
import os

import numpy as np
import pytest

import pbrf
from pbrf import cli
from pbrf.experiment import config as cfg_mod
from pbrf.experiment.analysis.aggregate import aggregate
from pbrf.experiment.run import seeds, single

GAPS = ("warm-start gap", "proximity gap")


def _fake(p, gap, certified, n_test=50, rho=1e-9, warn=False):
    return {"n_test": 5, "n_removals": 8,
            "correlations": {"pbrf": {"pearson": p, "spearman": p / 2, "n_pairs": 40}},
            "decomposition": {"gaps": {GAPS[0]: gap, GAPS[1]: None}, "n_pairs": 40,
                              "kinds": ["cold", "pbrf"]},
            "certificates": {"by_kind": {"pbrf": {"certified": certified, "max_rho": rho,
                                                  "excludes_uncertified": True}},
                             "n_removals": 8, "excluded_removals": []},
            "theta_s": {"metric": "accuracy", "test_metric": p, "n_test": n_test,
                        "near_chance": warn},
            "experiment": {"name": "x", "n_train": 100}}


def test_aggregate_means_stds_counts_and_maxima():
    a, b, c = _fake(0.9, 1e-2, 8), _fake(0.7, 3e-2, 6, rho=5e-3, warn=True), _fake(0.8, 2e-2, 7)
    out = aggregate([a, b, c], [0, 1, 2], ["seed=0", "seed=1", "seed=2"])
    vals = [0.9, 0.7, 0.8]
    assert out["correlations"]["pbrf"]["pearson"] == pytest.approx(np.mean(vals))
    assert out["correlations"]["pbrf"]["pearson_std"] == pytest.approx(np.std(vals, ddof=1))
    assert out["correlations"]["pbrf"]["n_pairs"] == 120  # pairs used add up over seeds
    assert out["decomposition"]["gaps"][GAPS[0]] == pytest.approx(2e-2)
    assert out["decomposition"]["gaps_std"][GAPS[0]] == pytest.approx(1e-2)
    assert out["decomposition"]["gaps"][GAPS[1]] is None  # never measured
    assert GAPS[1] not in out["decomposition"]["gaps_std"]
    cert = out["certificates"]
    assert cert["by_kind"]["pbrf"]["certified"] == 21 and cert["n_removals"] == 24
    assert cert["by_kind"]["pbrf"]["max_rho"] == pytest.approx(5e-3)
    assert out["n_test"] == 5 and out["n_removals"] == 8  # per seed
    assert out["theta_s"]["n_test"] == 50 and out["theta_s"]["near_chance"] is True
    assert out["theta_s"]["test_metric_std"] == pytest.approx(0.1)
    assert out["seeds"] == {"n": 3, "train_seeds": [0, 1, 2],
                            "runs": ["seed=0", "seed=1", "seed=2"]}
    assert out["experiment"]["seeds"] == 3


def test_aggregate_ignores_non_finite_seeds():
    out = aggregate([_fake(float("nan"), 1e-2, 8), _fake(0.5, 1e-2, 8)], [0, 1], ["a", "b"])
    assert out["correlations"]["pbrf"]["pearson"] == 0.5
    assert "pearson_std" not in out["correlations"]["pbrf"]  # one finite value: no spread


def test_seed_configs_vary_only_the_training_seed():
    config = cfg_mod.load_preset("digits-mlp", "tiny", ["run.seeds=3", "train.seed=5"])
    runs = seeds.seed_runs(config, "out")
    assert [s for s, _, _ in runs] == [5, 6, 7]
    assert [str(d) for _, _, d in runs] == ["out/seed=5", "out/seed=6", "out/seed=7"]
    for seed, c, _ in runs:
        assert c.run.seeds == 1 and c.train.seed == seed
        assert c.data == config.data and c.removals == config.removals
        assert c.responses == config.responses


def test_run_seeds_must_be_a_positive_int():
    with pytest.raises(cfg_mod.ConfigError, match="run.seeds"):
        cfg_mod.load_preset("digits-mlp", "tiny", ["run.seeds=0"])


FAST = ["--profile", "tiny", "--no-progress", "--set", "removals.n_removals=4",
        "--set", "removals.n_test_points=3", "--set", 'responses.kinds=["influence","pbrf"]']


def _mtimes(path):
    return {p: os.stat(p).st_mtime_ns for p in sorted(path.rglob("theta_s.safetensors"))}


def test_multi_seed_run_end_to_end_resume_and_table(tmp_path, capsys, monkeypatch):
    pending = []
    original = single.pending_tasks

    def counting(ctx, done):
        tasks = original(ctx, done)
        pending.append(len(tasks))
        return tasks

    monkeypatch.setattr(single, "pending_tasks", counting)  # where run_one looks it up
    out = tmp_path / "run"
    assert cli.main(["run", "digits-mlp", *FAST, "--set", "run.seeds=2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    per = [json.loads((out / f"seed={k}" / "summary.json").read_text()) for k in (0, 1)]
    assert summary["seeds"]["train_seeds"] == [0, 1]
    for k in (0, 1):  # each seed is an ordinary run of its own, with its own θ^s
        sub = json.loads((out / f"seed={k}" / "config.json").read_text())
        assert sub["train"]["seed"] == k and sub["run"]["seeds"] == 1
    a, b = (s["correlations"]["pbrf"]["pearson"] for s in per)
    assert a != b  # different base models
    assert summary["correlations"]["pbrf"]["pearson"] == pytest.approx((a + b) / 2)
    assert summary["correlations"]["pbrf"]["pearson_std"] == pytest.approx(abs(a - b) / 2 ** .5)
    cert = summary["certificates"]["by_kind"]["pbrf"]
    assert summary["certificates"]["n_removals"] == 8 and cert["certified"] == sum(
        s["certificates"]["by_kind"]["pbrf"]["certified"] for s in per)
    text = (out / "report.md").read_text()
    assert "## Seeds" in text and "(seed=0/report.md)" in text and " ± " in text
    assert (out / "figures" / "decomposition.png").is_file()
    capsys.readouterr()

    before = _mtimes(out)
    assert pending == [2, 2]
    assert cli.main(["run", "digits-mlp", *FAST, "--set", "run.seeds=2", "--out", str(out)]) == 0
    assert _mtimes(out) == before and pending == [2, 2, 0, 0]  # resumed: nothing recomputed
    assert json.loads((out / "summary.json").read_text()) == summary

    assert cli.main(["table", str(out)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    pbrf_p = f"{summary['correlations']['pbrf']['pearson']:.3f}"
    assert f"{pbrf_p} ± " in row

    # more seeds later: the two computed ones are kept as they are
    assert cli.main(["run", "digits-mlp", *FAST, "--set", "run.seeds=3", "--out", str(out)]) == 0
    after = _mtimes(out)
    assert {p: after[p] for p in before} == before and len(after) == 3
    assert pending[4:] == [0, 0, 2]
    three = json.loads((out / "summary.json").read_text())
    assert three["seeds"]["n"] == 3 and math.isfinite(three["correlations"]["pbrf"]["pearson"])

    # the multi-seed folder is not itself a run: evaluate / load_run name a seed's folder
    capsys.readouterr()
    np.save(tmp_path / "s.npy", np.zeros((3, 4)))
    assert cli.main(["evaluate", "--scores", str(tmp_path / "s.npy"), "--run", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed=0" in err[0] and "one per θ^s seed" in err[0]
    with pytest.raises(cfg_mod.ConfigError, match="seed=0"):
        pbrf.load_run(out)


def test_multi_seed_run_refuses_a_single_seed_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "config.json").write_text(cfg_mod.load_preset("digits-mlp", "tiny").to_json())
    assert cli.main(["run", "digits-mlp", *FAST, "--set", "run.seeds=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single-seed run" in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
