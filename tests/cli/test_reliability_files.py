"""Files and wording of a shared run: θ^s and checkpoints honour the umask; removals left out as
uncertified are reported as such (not as non-finite Δm); a command without ``--out`` does not
tell the user to pass one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest
import torch

from pbrf import cli
from pbrf.experiment.run.rundir import lock_path
from pbrf.training import save_checkpoint

from .test_cli import TINY, pbrf_cmd

UMASK = 0o027
# PBRF at a certificate threshold no response meets: every removal is left out as uncertified
NONE_CERTIFIED = ["--set", 'responses.kinds=["pbrf", "influence"]',
                  "--set", "responses.rho_threshold=1e-300", "--set", "run.seeds=1"]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One tiny run made under umask 027 (as for a group-shared folder)."""
    tmp = tmp_path_factory.mktemp("shared")
    old = os.umask(UMASK)
    try:
        proc = pbrf_cmd("run", "mnist-mlp", *TINY, *NONE_CERTIFIED, "--out", "r", cwd=tmp)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    return tmp / "r"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_theta_s_honours_the_umask(shared_run):
    want = 0o666 & ~UMASK
    assert _mode(shared_run / "theta_s.safetensors") == want  # was 0600
    assert _mode(shared_run / "theta_s.json") == want
    assert _mode(shared_run / "config.json") == want


def test_a_checkpoint_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.zeros(3)}, {"step": 1})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ck.safetensors") == 0o644  # was 0600
    assert _mode(tmp_path / "ck.json") == 0o644


def test_left_out_removals_are_not_reported_as_non_finite(shared_run):
    text = (shared_run / "report.md").read_text()
    assert "Non-finite Δm" not in text  # was "Non-finite Δm ...: PBRF 4, influence 4"
    line = next(ln for ln in text.splitlines() if ln.startswith("Pairs used"))
    assert "left out of every statistic as uncertified or diverged" in line, line


def test_estimators_on_a_busy_run_names_no_out_option(shared_run):
    """``pbrf estimators`` has no --out: the lock message says to wait, not to pass --out."""
    with open(lock_path(shared_run), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = pbrf_cmd("estimators", str(shared_run), "--methods", "grad-dot",
                        cwd=shared_run.parent, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert "another pbrf process" in lines[0] and "--out" not in lines[0], lines[0]
    assert "run the same command again" in lines[0]


@pytest.mark.parametrize("command, option", [("estimators", None), ("evaluate", None),
                                             ("run", "--out DIR"), ("download", "--root DIR")])
def test_permission_error_names_the_commands_own_option(command, option):
    line = cli._os_error_line(PermissionError(errno.EACCES, "Permission denied", "x"), command)
    if option is None:
        assert "--out" not in line and "make it writable" in line, line
    else:
        assert f"pass another {option}" in line, line
