"""Issue 20, items 3-7: reading a run back (``pbrf estimators``, ``pbrf evaluate``,
``pbrf.load_run``) names the damaged file and the fix; the unfinished-run hint is a command that
resumes; the store's config fingerprint; ``--threads`` and ``trak.dim`` sizes; ``rho_threshold``.

Every case copies one module-scoped cheap tiny run before damaging it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3

import numpy as np
import pytest

import pbrf
from pbrf import estimators
from pbrf.experiment.config import ConfigError, resolve
from pbrf.experiment.run.arrays import run_arrays
from tests.cli.test_cli import CHEAP, TINY, assert_one_line_error, pbrf_cmd


@pytest.fixture(scope="module")
def cheap_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reliability")
    proc = pbrf_cmd("run", *TINY, *CHEAP, "--out", "R", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "R"


def _copy(run, tmp_path, name="C"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _listing(folder):
    """Files and sizes (SQLite's -wal/-shm of a reader are not the run's content)."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                  if not p.name.endswith(("-wal", "-shm")))


# ---------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("damage", ["config", "theta"])
def test_damaged_run_files_are_one_line_errors_naming_the_file(cheap_run, tmp_path, damage):
    run = _copy(cheap_run, tmp_path)
    if damage == "config":
        name = "config.json"
        (run / name).write_text('{"name": ')
    else:
        name = "theta_s.safetensors"
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 3])
    before = _listing(run)
    scores = tmp_path / "s.npy"
    np.save(scores, np.load(cheap_run / "influence_scores.npy"))
    for args in (["estimators", str(run), "--methods", "grad-dot"],
                 ["evaluate", "--scores", str(scores), "--run", str(run)]):
        if damage == "theta" and args[0] == "evaluate":
            continue  # evaluate reads the stored arrays only, never θ^s
        proc = pbrf_cmd(*args, cwd=tmp_path)
        assert_one_line_error(proc, f"{run / name}", "--overwrite")
    with pytest.raises(ConfigError, match=name):
        pbrf.load_run(run)
    assert _listing(run) == before  # nothing written


# ---------------------------------------------------------------------------- item 5
def test_unfinished_run_hint_is_a_command_that_resumes_it(cheap_run, tmp_path):
    run = _copy(cheap_run, tmp_path, "U")
    with sqlite3.connect(run / "results.sqlite") as conn:
        conn.execute("DELETE FROM chunks WHERE kind = 'influence'")
    conn.close()
    proc = pbrf_cmd("estimators", str(run), "--methods", "grad-dot", cwd=tmp_path)
    assert_one_line_error(proc, "not finished", "resume it with")
    hint = proc.stderr.split("`")[1]
    argv = shlex.split(hint)
    assert argv[0] == "pbrf"
    resumed = pbrf_cmd(*argv[1:], "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = run_arrays(run), run_arrays(cheap_run)
    assert a["dm"].keys() == b["dm"].keys()
    for kind in a["dm"]:
        np.testing.assert_array_equal(a["dm"][kind], b["dm"][kind])


# ---------------------------------------------------------------------------- item 6
def test_edited_config_is_refused_against_the_store(cheap_run, tmp_path):
    run = _copy(cheap_run, tmp_path, "E")
    cfg = json.loads((run / "config.json").read_text())
    cfg["influence"]["damping"] = 0.5
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json"):
        pbrf.load_run(run)
    proc = pbrf_cmd("estimators", str(run), "--methods", "grad-dot", cwd=tmp_path)
    assert_one_line_error(proc, f"{run / 'config.json'}", "restore")
    before = _listing(run)
    proc = pbrf_cmd("run", str(run / "config.json"), "--out", str(run), *TINY, cwd=tmp_path)
    assert_one_line_error(proc, "config.json")  # pbrf run does not resume it either
    assert _listing(run) == before


def test_run_without_a_stored_fingerprint_still_loads(cheap_run, tmp_path):
    run = _copy(cheap_run, tmp_path, "O")
    with sqlite3.connect(run / "results.sqlite") as conn:
        assert conn.execute("DELETE FROM meta WHERE key = 'config_sha256'").rowcount == 1
    conn.close()
    loaded = pbrf.load_run(run)
    assert loaded.n_test == len(np.load(cheap_run / "test_index.npy"))


# ---------------------------------------------------------------------------- item 4
def test_threads_far_beyond_the_machine_is_refused_before_starting(tmp_path):
    huge = 1000 * (os.cpu_count() or 1)
    proc = pbrf_cmd("run", *TINY, *CHEAP, "--threads", str(huge), "--out", "T", cwd=tmp_path)
    assert_one_line_error(proc, "--threads", f"{os.cpu_count()} cores")
    assert not (tmp_path / "T").exists()


def test_trak_dim_beyond_memory_is_refused_before_allocating(cheap_run):
    run = pbrf.load_run(cheap_run)
    with pytest.raises(ValueError, match=r"trak: dim=.*GiB.*trak\.dim") as err:
        estimators.get("trak", dim=10**12).scores(run)
    assert "\n" not in str(err.value)


def test_trak_dim_beyond_memory_is_a_user_error_in_estimators(cheap_run, tmp_path):
    """Through the CLI: exit 2 and one line before any work, not a 'skipped' row and exit 0."""
    run = _copy(cheap_run, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    proc = pbrf_cmd("estimators", str(run), "--methods", "trak", "--hp", "trak.dim=1000000000000",
                    cwd=tmp_path)
    assert_one_line_error(proc, "trak.dim")
    assert sorted(p.name for p in run.iterdir()) == before


# ---------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("value", ["1", "1.0", "5"])
def test_rho_threshold_of_one_or_more_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"responses\.rho_threshold.*< 1"):
        resolve("digits-mlp", "tiny", [f"responses.rho_threshold={value}"])
    resolve("digits-mlp", "tiny", ["responses.rho_threshold=0.5"])


def test_rho_threshold_cli(tmp_path):
    proc = pbrf_cmd("run", *TINY, "--set", "responses.rho_threshold=1", "--out", "X",
                    cwd=tmp_path)
    assert_one_line_error(proc, "responses.rho_threshold")
    assert not (tmp_path / "X").exists()


