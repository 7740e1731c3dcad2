"""The ``pbrf`` command: runs, one-line errors (exit 2, nothing written), kill -9 + resume,
evaluate, table, sweep.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from pbrf import cli

TINY = ["--profile", "tiny", "--no-progress"]
CHEAP = ["--set", 'responses.kinds=["linearized", "influence"]']


def pbrf_cmd(*args, cwd, env=None, timeout=600):
    """Run ``python -m pbrf.cli ARGS`` in ``cwd``; returns the CompletedProcess."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pbrf.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``pbrf run`` without a preset argument (tiny profile), in a fresh working directory."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = pbrf_cmd("run", *TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd, cwd / "runs" / "digits-mlp", proc


# ---------------------------------------------------------------------------- run
REFERENCE = Path(__file__).parent.parent / "fixtures" / "tiny_digits_summary.json"


#: The optimiser's path, not its answer: iteration counts and the final ρ of certified responses
#: (below the certificate's threshold, wherever the engine happened to stop). The certified counts,
#: every Δm, correlation and gap stay compared.
PATH_FIELDS = {"mean_cg_iterations", "mean_iterations", "mean_steps", "mean_rho", "max_rho",
               "median_rho", "mean_grad_norm"}


def _numbers_differ(a, b, path="summary"):
    """Paths where two JSON trees differ: structure exactly, numbers to 1e-6 relative (the
    optimiser's path fields of the Newton-optimised kinds only to lie below the threshold)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in (_path_differ(a[k], b[k], f"{path}.{k}")
                                       if k in PATH_FIELDS and _newton_kind(path)
                                       else _numbers_differ(a[k], b[k], f"{path}.{k}"))]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in _numbers_differ(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(
            a, b, rel_tol=1e-6, abs_tol=1e-10)
        return [] if ok else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _newton_kind(path: str) -> bool:
    return path.endswith((".pbrf", ".proximal"))


def _path_differ(a, b, path: str) -> list[str]:
    """A path field: both numbers, and a ρ below the certificate's 1e-2 in both."""
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return [f"{path}: {a!r} != {b!r}"]
    if path.endswith("rho") and not (a <= 1e-2 and b <= 1e-2):
        return [f"{path}: {a!r}, {b!r} not both certified"]
    return []


def test_default_tiny_run_matches_the_stored_reference(default_run):
    """The default run's numbers are those of main before the experiment layer was reorganised
    (``tests/fixtures/tiny_digits_summary.json``, from ``pbrf run --profile tiny`` at d9b3fc0),
    to 1e-6 relative — also after the Newton engine moved to float32 products, a shared model and
    a preconditioner (issue 17), which changed only its path: iterations and where below the
    certificate each response stopped (``PATH_FIELDS``).
    """
    _, run_dir, _ = default_run
    got = json.loads((run_dir / "summary.json").read_text())
    want = json.loads(REFERENCE.read_text())
    assert _numbers_differ(got, want) == []
    assert _numbers_differ(want, {**want, "x": 1}) != []  # the comparison can fail
    bad = json.loads(json.dumps(want))
    bad["certificates"]["by_kind"]["pbrf"]["max_rho"] = 0.5
    assert _numbers_differ(bad, want) != []  # an uncertified ρ is a difference


def test_console_script_is_declared():
    eps = metadata.entry_points(group="console_scripts")
    assert any(ep.name == "pbrf" and ep.value == "pbrf.cli:main" for ep in eps)


def test_run_without_arguments_writes_the_report(default_run):
    cwd, run_dir, proc = default_run
    assert (run_dir / "report.md").is_file() and (run_dir / "summary.json").is_file()
    assert "PBRF" in proc.stdout and "Pearson" in proc.stdout
    assert f"report: {Path('runs') / 'digits-mlp' / 'report.md'}" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["experiment"]["name"] == "digits-mlp"


def test_help_everywhere():
    for args in ([], ["run"], ["sweep"], ["table"], ["evaluate"], ["presets"], ["download"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*args, "--help"])
        assert exc.value.code == 0


def test_presets_lists_every_preset(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("digits-mlp", "digits-binary", "mnist-mlp", "cifar10-resnet20",
                 "shakespeare-transformer"):
        assert name in out


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args, needles",
    [
        (["run", "no-such-preset"], ["unknown preset 'no-such-preset'", "pbrf presets"]),
        (["run", "--set", "influence.dampingg=1"], ["unknown --set key 'influence.dampingg'"]),
        (["run", "--set", "influence.damping=lots"], ["influence.damping must be a float"]),
        (["run", "--set", "model.width=2.5"], ["model.width must be an int"]),
        (["run", "--profile", "huge"], ["no profile 'huge'"]),
        (["run", "--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
        (["sweep", "digits-mlp", "--factor", "width", "--values", "8,x.5"],
         ["model.width must be an int"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args,
                                                        needles):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


def test_a_real_process_exits_2_with_one_line(tmp_path):
    assert_one_line_error(pbrf_cmd("run", "no-such-preset", cwd=tmp_path), "unknown preset")
    assert list(tmp_path.iterdir()) == []


def test_missing_data_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("PBRF_DATA", str(empty))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "mnist-mlp"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mnist" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-data"]
    assert list(empty.iterdir()) == []


def test_different_config_in_the_same_run_dir_is_refused(default_run):
    cwd, run_dir, _ = default_run
    before = (run_dir / "config.json").read_text()
    proc = pbrf_cmd("run", *TINY, "--set", "influence.damping=0.5", cwd=cwd)
    assert_one_line_error(proc, "different config", "--overwrite")
    assert (run_dir / "config.json").read_text() == before


def test_overwrite_replaces_a_run(tmp_path):
    out = tmp_path / "r"
    assert pbrf_cmd("run", *TINY, *CHEAP, "--out", str(out), cwd=tmp_path).returncode == 0
    proc = pbrf_cmd("run", *TINY, *CHEAP, "--set", "influence.damping=0.05", "--out", str(out),
                    cwd=tmp_path)
    assert proc.returncode == 2
    proc = pbrf_cmd("run", *TINY, *CHEAP, "--set", "influence.damping=0.05", "--out", str(out),
                    "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["influence"]["damping"] == 0.05


# ---------------------------------------------------------------------------- kill -9 and resume
def _committed(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_kill_9_then_resume_gives_the_uninterrupted_numbers(default_run, tmp_path):
    """SIGKILL once the first chunk is committed; the rerun resumes and ends with the reference
    numbers.
    """
    _, reference, _ = default_run
    killed = tmp_path / "killed"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pbrf.cli", "run", *TINY, "--out", str(killed)],
                            cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while (_committed(killed / "results.sqlite") < 1 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = _committed(killed / "results.sqlite")
    total = 6 * 2  # six kinds x two chunks
    assert 1 <= n_done < total, f"kill landed after {n_done} of {total} tasks"
    assert not (killed / "summary.json").exists()
    conn = sqlite3.connect(killed / "results.sqlite")
    before = dict(
        ((k, c), s) for k, c, s in conn.execute("SELECT kind, chunk, seconds FROM chunks")
    )
    conn.close()

    proc = pbrf_cmd("run", *TINY, "--out", str(killed), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    conn = sqlite3.connect(killed / "results.sqlite")
    after = dict(((k, c), s) for k, c, s in conn.execute("SELECT kind, chunk, seconds FROM chunks"))
    conn.close()
    assert len(after) == total
    assert all(after[key] == s for key, s in before.items()), "finished chunks were recomputed"
    assert json.loads((killed / "summary.json").read_text()) == json.loads(
        (reference / "summary.json").read_text()
    )


# ---------------------------------------------------------------------------- evaluate and table
def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_evaluate_own_scores_reproduces_the_correlations(default_run, capsys):
    _, run_dir, _ = default_run
    assert (
        cli.main(
            [
                "evaluate",
                "--scores",
                str(run_dir / "influence_scores.npy"),
                "--run",
                str(run_dir),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    expected = _summary(run_dir)["correlations"]
    for kind, entry in expected.items():
        for key in ("pearson", "spearman", "pearson_per_test", "spearman_per_test"):
            assert result["correlations"][kind][key] == pytest.approx(entry[key], abs=1e-12), (
                kind,
                key,
            )


def test_evaluate_maps_train_layout_and_reads_csv(default_run, tmp_path, capsys):
    """[n_test, n_train] scores: the run's removed points carry the run's scores, the rest
    is noise.
    """
    _, run_dir, _ = default_run
    own = np.load(run_dir / "influence_scores.npy")
    from pbrf.experiment.run.store import Store

    with Store(run_dir, readonly=True) as store:
        groups = store.get_array("groups")[:, 0]
    full = np.random.default_rng(0).normal(size=(own.shape[0], 200))
    full[:, groups] = own
    path = tmp_path / "scores.csv"
    np.savetxt(path, full, delimiter=",")
    assert cli.main(["evaluate", "--scores", str(path), "--run", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layout"] == "train"
    assert result["correlations"]["pbrf"]["pearson"] == pytest.approx(
        _summary(run_dir)["correlations"]["pbrf"]["pearson"], abs=1e-9
    )


def test_evaluate_random_scores_are_uncorrelated(default_run, tmp_path, capsys):
    _, run_dir, _ = default_run
    own = np.load(run_dir / "influence_scores.npy")
    pearsons = []
    for seed in range(30):
        path = tmp_path / f"random{seed}.npy"
        np.save(path, np.random.default_rng(seed).normal(size=own.shape))
        assert cli.main(["evaluate", "--scores", str(path), "--run", str(run_dir), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        pearsons.append(
            [result["correlations"][k]["pearson"] for k in ("pbrf", "linearized", "cold")]
        )
    mean = np.abs(np.mean(pearsons, axis=0))
    assert (mean < 0.1).all(), mean  # one draw has std ~0.16 over 40 pairs; the mean of 30 ~0.03
    assert (
        cli.main(
            ["evaluate", "--scores", str(run_dir / "influence_scores.npy"), "--run", str(run_dir)]
        )
        == 0
    )
    assert "PBRF" in capsys.readouterr().out


def test_evaluate_bad_shape_is_one_line(default_run, tmp_path):
    cwd, run_dir, _ = default_run
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((5, 7)))
    assert_one_line_error(
        pbrf_cmd("evaluate", "--scores", str(path), "--run", str(run_dir), cwd=tmp_path),
        "shape (5, 7)",
        "[5, 8]",
        "[5, 200]",
    )
    assert_one_line_error(
        pbrf_cmd(
            "evaluate", "--scores", str(tmp_path / "none.npy"), "--run", str(run_dir), cwd=tmp_path
        ),
        "does not exist",
    )
    assert_one_line_error(
        pbrf_cmd("evaluate", "--scores", str(path), "--run", str(tmp_path), cwd=tmp_path),
        "not a pbrf run directory",
    )


def test_table_has_the_paper_layout(default_run, capsys):
    _, run_dir, _ = default_run
    assert cli.main(["table", str(run_dir), str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "PBRF P" in out and "LOO S" in out and out.count("digits-mlp") == 2
    pbrf_p = _summary(run_dir)["correlations"]["pbrf"]["pearson"]
    assert f"{pbrf_p:.3f}" in out
    assert cli.main(["table", str(run_dir), "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.lstrip().startswith("|") and "PBRF P" in markdown


def test_sweep_runs_each_value_and_plots(tmp_path):
    """Two values of one factor, each a run of its own, then the sweep's table and figure. The
    responses are the cheap ones (the sweep's files do not depend on which kinds ran; the optimised
    kinds inside a sweep are exercised by ``tests/studies/test_reproduce.py``), on a smaller
    problem.
    """
    out = tmp_path / "sweep"
    proc = pbrf_cmd(
        "sweep",
        "digits-mlp",
        *TINY,
        *CHEAP,
        "--set",
        "data.n_train=60",
        "--set",
        "removals.n_removals=2",
        "--factor",
        "damping",
        "--values",
        "0.001,0.1",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "sweep.md").is_file() and (out / "sweep.png").is_file()
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["damping=0.001", "damping=0.1"]
    assert (
        json.loads((out / "damping=0.1" / "config.json").read_text())["influence"]["damping"] == 0.1
    )
    assert "proximity gap" in (out / "sweep.md").read_text()
