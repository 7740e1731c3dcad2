"""``pbrf run --dry-run``: writes nothing, and its peak-memory estimate is within 30% of a run's."""

import json
import os
import subprocess
import sys

import pytest

from ..cli.test_cli import TINY, pbrf_cmd

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def test_dry_run_prints_sizes_and_writes_nothing(tmp_path):
    proc = pbrf_cmd("run", *TINY, "--dry-run", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "nothing written" in out and "parameters" in out
    assert "5 test points x 8 removal sets" in out
    assert "GiB peak resident" in out and "compute" in out
    assert not (tmp_path / "r").exists() and not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["digits-mlp", "cifar10-lenet", "cifar10-resnet20"])
def test_dry_run_memory_estimate_within_30_percent_of_the_measured_peak(tmp_path, preset):
    """Both in fresh processes: the estimate (loaded process + probes) and the real run's peak
    resident memory (ru_maxrss of the child running `pbrf run`), on the tiny profiles (one seed)
    of the default, LeNet and ResNet-20 (the CIFAR ones need $PBRF_DATA)."""
    if preset.startswith("cifar10"):
        pytest.importorskip("pbrf.data")
        from pbrf.data import DataError, load

        try:
            load("cifar10", n_train=2, n_test=2)
        except DataError as err:
            pytest.skip(f"CIFAR-10 is not available: {err}")
    # One seed. The Newton peak is an exact-Hessian product of K = chunk_size + 1 directions over
    # one data chunk; its memory does not depend on θ. An uncapped Newton run (model "auto") gets
    # there only near the optimum, after minutes (the tiny CNN profiles' capped Newton may never);
    # with model "hessian" every product is one, so two steps of at most 10 CG iterations reach
    # the same peak in seconds.
    sets = ["run.seeds=1", "responses.model=hessian", "responses.steps=2",
            "responses.cg_max_iter=10"]
    if preset == "cifar10-resnet20":  # its peak is the proximal continuation's exact Hessian
        sets += ['responses.kinds=["warm", "proximal", "pbrf", "linearized", "influence"]',
                 "removals.n_removals=1"]
    estimate = subprocess.run(
        [sys.executable, "-c",
         "import json; from pbrf.experiment import config as c; "
         "from pbrf.experiment.run.inputs import prepare_inputs; "
         "from pbrf.experiment.run.dryrun import dry_run; "
         f"cfg = c.load_preset({preset!r}, 'tiny', {sets!r}); "
         "print(json.dumps(dry_run(cfg, prepare_inputs(cfg))['estimated_peak_bytes']))"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, check=True)
    measured = subprocess.run(
        [sys.executable, "-c",
         "import resource, subprocess, sys; "
         f"subprocess.run([sys.executable, '-m', 'pbrf.cli', 'run', {preset!r}, '--profile', "
         f"'tiny', *{[x for v in sets for x in ('--set', v)]!r}, '--no-progress', '--out', 'r'], "
         "stdout=subprocess.DEVNULL, check=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, check=True)
    est = json.loads(estimate.stdout.strip().splitlines()[-1])
    peak = int(measured.stdout.split()[-1])
    assert abs(est - peak) <= 0.3 * peak, (est / 2**20, peak / 2**20)
