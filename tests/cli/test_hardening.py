"""Issue 9: no run that can never finish, no silent nonsense, no half-written run directory, no
traceback for a user's mistake. One test (or a few) per numbered case of the issue; CLI cases go
through the real ``pbrf`` entry point in a subprocess (``python -m pbrf.cli``).

The behaviours that already held (kill -9 / signals + resume, concurrent identical runs, pickle
and path-traversal refusals, checksums) keep their tests in cli/test_cli.py, run/test_driver.py and
test_data.py.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from pbrf import cli
from pbrf.experiment import analysis, report
from pbrf.experiment.run import rundir

from .test_cli import CHEAP, TINY, pbrf_cmd

CHEAP_RUN = ["run", *TINY, *CHEAP]


def one_line_error(proc, code: int, *needles: str) -> str:
    """The process exited with ``code`` and printed exactly one line on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def leftovers(path: Path) -> list[str]:
    """Temporary files that a half-finished write would leave (``.*.tmp`` / ``.*.part``)."""
    return sorted(p.name for p in path.rglob(".*") if p.suffix in (".tmp", ".part"))


@pytest.fixture(scope="module")
def cheap_reference(tmp_path_factory):
    """An uninterrupted tiny run (influence + linearised PBRF only): the numbers a resumed run must
    end with.
    """
    cwd = tmp_path_factory.mktemp("reference")
    proc = pbrf_cmd(*CHEAP_RUN, "--out", "ref", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "ref"


# ------------------------------------------------------------- 1. --overwrite vs a running process
def test_overwrite_while_another_process_runs_is_refused_and_the_run_finishes_intact(tmp_path,
    cheap_reference):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    a = subprocess.Popen([sys.executable, "-m", "pbrf.cli", *CHEAP_RUN, "--out", "d"],
                         cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (
            not (tmp_path / "d" / "config.json").exists()
            and a.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert a.poll() is None, "the first run ended before it could be paused"
        a.send_signal(signal.SIGSTOP)  # holds its lock, mid-run, for as long as the test needs
        try:
            b = pbrf_cmd(
                *CHEAP_RUN,
                "--set",
                "influence.damping=0.5",
                "--out",
                "d",
                "--overwrite",
                cwd=tmp_path,
            )
            one_line_error(b, 2, "another pbrf process is running", "'d'")
            assert (
                json.loads((tmp_path / "d" / "config.json").read_text())["influence"]["damping"]
                != 0.5
            )
        finally:
            a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=300) == 0, a.stderr.read()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert summary(tmp_path / "d") == summary(cheap_reference)  # not a mix of two runs
    # the lock lives beside the run
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- 2. diverged responses
def test_diverged_responses_are_excluded_named_and_the_run_finishes(tmp_path):
    args = [
        "run",
        *TINY,
        "--set",
        'responses.kinds=["proximal", "pbrf", "linearized", "influence"]',
        "--set",
        "responses.optimizer=sgd",
        "--set",
        "responses.lr=1e6",
        "--out",
        "d",
    ]
    proc = pbrf_cmd(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr
    run = tmp_path / "d"
    first = summary(run)
    diverged = first["diverged"]
    assert diverged["counts"]["pbrf"] >= 1 and diverged["counts"]["pbrf"] == len(
        diverged["removals"]["pbrf"]
    )
    assert first["diagnostics"]["pbrf"]["diverged"] == diverged["counts"]["pbrf"]
    text = (run / "report.md").read_text()
    assert "Diverged responses, excluded from every statistic and plot" in text
    assert (
        "PBRF " + str(diverged["counts"]["pbrf"]) in text
        and f"#{diverged['removals']['pbrf'][0]}" in text
    )
    assert "Diverged responses" in proc.stdout  # the terminal summary says so too
    for name in ("decomposition.png", "scatter.png", "correlations.png"):
        assert (run / "figures" / name).stat().st_size > 0
    # excluded means excluded: the PBRF correlations use only the removal sets that did not diverge
    n_ok = first["n_removals"] - diverged["counts"]["pbrf"]
    assert first["correlations"]["pbrf"]["n_pairs"] == first["n_test"] * n_ok
    # pbrf evaluate leaves them out the same way
    proc = pbrf_cmd(
        "evaluate",
        "--scores",
        str(run / "influence_scores.npy"),
        "--run",
        "d",
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["diverged"]["pbrf"] == diverged["counts"]["pbrf"]
    assert result["correlations"]["pbrf"] == first["correlations"]["pbrf"]
    # the stored chunks finish the same way on every rerun: remove the report and resume
    for name in ("summary.json", "report.md"):
        (run / name).unlink()
    before = (
        sqlite3.connect(run / "results.sqlite")
        .execute("SELECT kind, chunk, seconds FROM chunks")
        .fetchall()
    )
    proc = pbrf_cmd(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = (
        sqlite3.connect(run / "results.sqlite")
        .execute("SELECT kind, chunk, seconds FROM chunks")
        .fetchall()
    )
    assert sorted(after) == sorted(before), "stored chunks were recomputed"
    assert summary(run) == first


def test_summarise_masks_flagged_removals_and_report_survives_huge_values(tmp_path):
    rng = np.random.default_rng(0)
    inf = rng.normal(size=(4, 6))
    dm = {
        "pbrf": inf + 0.01 * rng.normal(size=inf.shape),
        "linearized": inf.copy(),
        "influence": inf.copy(),
    }
    dm["pbrf"][:, [1, 4]] = 1e301  # diverged optimisations: finite, absurd
    s = analysis.summarise(
        dm, diagnostics={"pbrf": {"n": 6, "diverged": 2, "diverged_removals": [1, 4]}}
    )
    assert s["diverged"] == {"counts": {"pbrf": 2}, "removals": {"pbrf": [1, 4]}}
    assert "diverged_removals" not in s["diagnostics"]["pbrf"]
    assert s["decomposition"]["n_valid"] == 4 * 4 and s["correlations"]["pbrf"]["n_pairs"] == 16
    # the absurd values are not averaged in
    assert s["decomposition"]["gaps"]["linearisation error"] < 1
    assert dm["pbrf"][0, 1] == 1e301  # the caller's arrays are not modified
    # flags as booleans do the same; a wrong length is refused
    same = analysis.summarise(dm, diverged={"pbrf": np.isin(np.arange(6), [1, 4])})
    assert same["decomposition"] == s["decomposition"]
    with pytest.raises(ValueError, match="one per removal"):
        analysis.summarise(dm, diverged={"pbrf": [True, False]})
    # correlations of huge values do not overflow into a made-up number
    a, b = np.array([1.0, 2, 3, 4]), np.array([1e301, -1e301, 1e300, 5e300])
    assert analysis.pearson(a, b) == pytest.approx(np.corrcoef(a, b / 1e300)[0, 1], rel=1e-12)
    # unflagged huge values: plotting must not raise, and the report still renders
    raw = analysis.summarise(dm)
    assert report.write_report(tmp_path, raw, dm, {}).is_file()
    assert (tmp_path / "figures" / "scatter.png").is_file() and (
        tmp_path / "figures" / "decomposition.png"
    ).is_file()


# ------------------------------------------------------------------- 3. meaningless solver options
@pytest.mark.parametrize(
    "sets, needle",
    [
        (["influence.solver_options={max_iter=-1}"], "max_iter=-1"),
        (['influence.solver="lissa"', "influence.solver_options={depth=0}"], "depth=0"),
        (["influence.solver_options={tol=nan}"], "tol=nan"),
    ],
)
def test_meaningless_solver_option_values_are_refused_before_writing(tmp_path, sets, needle):
    args = [a for s in sets for a in ("--set", s)]
    proc = pbrf_cmd(*CHEAP_RUN, *args, "--out", "d", cwd=tmp_path)
    one_line_error(proc, 2, "influence.solver_options", needle, "must be")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ 4. checks before writing
@pytest.mark.parametrize(
    "sets, needles",
    [
        (["removals.seed=-1"], ["removals.seed", ">= 0"]),
        (['task="regression"'], ["task 'regression' does not fit data 'digits'", "omit task"]),
        (
            ['influence.curvature="hessian"', "influence.damping=0", "train.weight_decay=0"],
            ["singular or indefinite", "influence.damping", "ggn"],
        ),
        (["model.width=64"], ["dense", "max_params=5000", 'influence.accurate_solver="cg"']),
    ],
)
def test_config_mistakes_are_caught_before_anything_is_written(tmp_path, sets, needles):
    args = [a for s in sets for a in ("--set", s)]
    one_line_error(pbrf_cmd(*CHEAP_RUN, *args, "--out", "d", cwd=tmp_path), 2, *needles)
    assert list(tmp_path.iterdir()) == []


def test_diverged_base_training_saves_nothing_and_the_corrected_command_just_works(
    tmp_path, cheap_reference
):
    proc = pbrf_cmd(*CHEAP_RUN, "--set", "train.lr=1e308", "--out", "d", cwd=tmp_path)
    one_line_error(proc, 2, "base training diverged", "lower train.lr")
    assert not (tmp_path / "d" / "theta_s.safetensors").exists()  # no NaN θ^s is ever saved
    assert leftovers(tmp_path) == []
    # the corrected command, without --overwrite
    proc = pbrf_cmd(*CHEAP_RUN, "--out", "d", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(tmp_path / "d") == summary(cheap_reference)


# ----------------------------------------------------------- 5. exact solver, indefinite curvature
def test_solver_failure_after_training_is_one_line_naming_the_fix_and_repeats(tmp_path):
    args = [
        *CHEAP_RUN,
        "--set",
        'influence.curvature="hessian"',
        "--set",
        "influence.damping=1e-9",
        "--set",
        'influence.solver="exact"',
        "--out",
        "d",
    ]
    first = one_line_error(
        pbrf_cmd(*args, cwd=tmp_path), 2, "not positive definite", "damping", "ggn", "--overwrite"
    )
    assert (tmp_path / "d" / "theta_s.safetensors").is_file()
    # the same command resumes (θ^s is not retrained) and explains again
    assert one_line_error(pbrf_cmd(*args, cwd=tmp_path), 2) == first


# ------------------------------------------------------------------ 6. corrupt store or checkpoint
def _garbage_header(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.write(b"garbage!" * 16)


def _cut_in_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    "name, damage, recover",
    [
        ("results.sqlite", _garbage_header, True),
        ("results.sqlite", _cut_in_half, False),
        ("theta_s.safetensors", _garbage_header, False),
        ("theta_s.safetensors", _cut_in_half, True),
    ],
)
def test_a_corrupt_file_is_named_and_overwrite_starts_clean(
    tmp_path, cheap_reference, name, damage, recover
):
    run = tmp_path / "d"
    shutil.copytree(cheap_reference, run)
    damage(run / name)
    line = one_line_error(pbrf_cmd(*CHEAP_RUN, "--out", "d", cwd=tmp_path), 2, name, "--overwrite")
    assert "corrupt" in line or "unreadable" in line
    if name == "results.sqlite":  # evaluate names it too
        one_line_error(
            pbrf_cmd(
                "evaluate",
                "--scores",
                str(run / "influence_scores.npy"),
                "--run",
                "d",
                cwd=tmp_path,
            ),
            2,
            name,
        )
    if recover:
        # same config: starts clean
        proc = pbrf_cmd(*CHEAP_RUN, "--out", "d", "--overwrite", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert summary(run) == summary(cheap_reference)
        assert not list(tmp_path.glob(".d.deleting-*"))


# ------------------------------------------------------------ 7. disk full / ulimit -f / read-only
def test_file_size_limit_is_one_line_and_the_run_resumes(tmp_path, cheap_reference):
    # above θ^s and SQLite's 32 KiB shared-memory file, below the finished store and figures
    limit = 40_000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pbrf.cli", *CHEAP_RUN, "--out", "d"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_files,
    )
    line = one_line_error(proc, 1, "d/", "ulimit -f", "run the same command again")
    assert "File too large" in line or "disk I/O error" in line, line
    assert not (tmp_path / "d" / "summary.json").exists()
    assert leftovers(tmp_path) == []
    proc = pbrf_cmd(*CHEAP_RUN, "--out", "d", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(tmp_path / "d") == summary(cheap_reference)


_DISK_FULL_DRIVER = """
import errno, os, sys
from pbrf import cli
from pbrf.experiment.run.store import Store

real, calls = Store.put_chunk, []

def full_after_one(self, result):
    calls.append(result.kind)
    if len(calls) > 1:
        # as write() reports it: no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(self, result)

Store.put_chunk = full_after_one
sys.exit(cli.main(sys.argv[1:]))
"""


def test_disk_full_mid_run_is_one_line_and_resumes(tmp_path, cheap_reference):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_DRIVER, *CHEAP_RUN, "--out", "d"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    one_line_error(
        proc, 1, "d/", "No space left on device", "free some space", "run the same command again"
    )
    assert (
        sqlite3.connect(tmp_path / "d" / "results.sqlite")
        .execute("SELECT COUNT(*) FROM chunks")
        .fetchone()[0]
        == 1
    )
    proc = pbrf_cmd(*CHEAP_RUN, "--out", "d", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(tmp_path / "d") == summary(cheap_reference)


def test_read_only_run_directory_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "atomic_write_text", read_only)  # config.json is written first
    assert cli.main([*CHEAP_RUN, "--out", "d"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d/config.json" in err[0] and "Read-only file system" in err[0], err


# ---------------------------------------------------------------------------- 8. evaluate
def test_evaluate_bad_scores_files_are_one_line(tmp_path, cheap_reference):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([["a", "b"], ["c", "d"]]))
    run = str(cheap_reference)
    one_line_error(
        pbrf_cmd("evaluate", "--scores", str(empty), "--run", run, cwd=tmp_path),
        2,
        "empty.npy",
        "numpy.save",
    )
    one_line_error(
        pbrf_cmd("evaluate", "--scores", str(strings), "--run", run, cwd=tmp_path),
        2,
        "strings.npy",
        "not real numbers",
    )


def test_evaluate_counts_dropped_pairs_and_warns_on_a_sign_flip(tmp_path, cheap_reference):
    own = np.load(cheap_reference / "influence_scores.npy")
    holes = own.copy()
    holes[0, :3] = np.nan
    holes[1, 0] = np.inf
    np.save(tmp_path / "holes.npy", holes)
    np.save(tmp_path / "flipped.npy", -own)
    total = own.size
    proc = pbrf_cmd(
        "evaluate",
        "--scores",
        str(tmp_path / "holes.npy"),
        "--run",
        str(cheap_reference),
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (
        f"pairs used: {total - 4} of {total}; 4 dropped for non-finite (NaN/inf) scores"
        in proc.stdout
    )
    proc = pbrf_cmd(
        "evaluate",
        "--scores",
        str(tmp_path / "flipped.npy"),
        "--run",
        str(cheap_reference),
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0
    warning = proc.stderr.strip().splitlines()
    assert (
        len(warning) == 1 and warning[0].startswith("pbrf: warning:") and "negate" in warning[0]
    ), proc.stderr
    assert json.loads(proc.stdout)["pearson_vs_own_influence"] == pytest.approx(-1.0)
    proc = pbrf_cmd(
        "evaluate",
        "--scores",
        str(cheap_reference / "influence_scores.npy"),
        "--run",
        str(cheap_reference),
        cwd=tmp_path,
    )
    assert (
        proc.returncode == 0
        and proc.stderr == ""
        and f"pairs used: {total} of {total}\n" in proc.stdout
    )


# ---------------------------------------------------------------------------- 10. downloads
def test_download_gives_usual_permissions_and_removes_a_killed_downloads_part(
    tmp_path, monkeypatch
):
    from pbrf.data import _files, download

    monkeypatch.setenv("PBRF_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served" / "uci"
    served.mkdir(parents=True)
    (served / "energy.txt").write_text("1 2 3\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after kill -9 of a download
    dest = tmp_path / "data" / "uci"
    dest.mkdir(parents=True)
    stale = dest / f".energy.txt.{dead.pid}.abc123.part"
    stale.write_bytes(b"half a file")
    mine = dest / f".energy.txt.{os.getpid()}.xyz.part"  # a live process's part is left alone
    mine.write_bytes(b"in progress")
    md5 = _files.md5sum(served / "energy.txt", content=False)
    paths = download(
        "energy",
        root=tmp_path / "data",
        base_url=(tmp_path / "served").as_uri(),
        progress=False,
        checksums={"uci/energy.txt": md5},
    )
    assert paths == [dest / "energy.txt"] and paths[0].read_text() == "1 2 3\n"
    umask = os.umask(0)
    os.umask(umask)
    assert paths[0].stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert not stale.exists() and mine.exists()


# ---------------------------------------------------------------------------- 11. more tracebacks
def test_table_with_a_corrupt_summary_is_one_line(tmp_path, cheap_reference):
    run = tmp_path / "d"
    shutil.copytree(cheap_reference, run)
    (run / "summary.json").write_text('{"correlations": ')
    one_line_error(pbrf_cmd("table", str(run), cwd=tmp_path), 2, "summary.json", "rewrite it")


def test_evaluate_into_a_closed_pipe_is_silent(tmp_path, cheap_reference):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pbrf.cli",
            "evaluate",
            "--scores",
            str(cheap_reference / "influence_scores.npy"),
            "--run",
            str(cheap_reference),
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first byte (like `| head -0`)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert err == "", err
    assert proc.returncode == 141


@pytest.mark.parametrize("width, needle", [(10**12, "cannot build"), (10**6, "parameters")])
def test_absurd_model_width_is_one_line_before_allocating(tmp_path, width, needle):
    proc = pbrf_cmd(
        *CHEAP_RUN, "--set", f"model.width={width}", "--out", "d", cwd=tmp_path, timeout=120
    )
    one_line_error(proc, 2, "model", needle, "model.width")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cifar_pickle_is_a_data_error(tmp_path):
    from pbrf.data import DataError, load

    from ..test_data import add_member, cifar_batch

    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)
    # a damaged stream that reaches the allowed _codecs.encode with a bogus codec: LookupError
    bogus = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\r\x00\x00\x00no-such-codec\x86R."
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/data_batch_1", bogus)
        add_member(
            tar,
            "cifar-10-batches-py/test_batch",
            pickle.dumps(cifar_batch(np.arange(3), 0), protocol=2),
        )
    with pytest.raises(DataError, match="not a CIFAR pickle batch") as err:
        load("cifar10", root=tmp_path, verify=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------- 12. unreachable Ray address
def test_unreachable_ray_address_fails_fast_with_one_line(tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = pbrf_cmd(  # fails fast: a hang would end in TimeoutExpired after 120 s
        *CHEAP_RUN,
        "--executor",
        "ray",
        "--ray-address",
        f"127.0.0.1:{port}",
        "--out",
        "d",
        cwd=tmp_path,
        timeout=120,
    )
    one_line_error(proc, 2, f"127.0.0.1:{port}", "ray start --head")
    assert list(tmp_path.iterdir()) == []
