"""The Ray executor gives the local executor's numbers (tiny config, local Ray with 2 CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'pbrf[ray]')")

# small (60 training points) but still several chunks per kind (4 removals in chunks of 2)
ARGS = ["run", "--profile", "tiny", "--no-progress", "--set",
        'responses.kinds=["warm", "pbrf", "linearized", "influence"]', "--set", "data.n_train=60",
        "--set", "removals.n_removals=4", "--set", "run.chunk_size=2"]


def _run(out, cwd, *extra):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "pbrf.cli", *ARGS, "--out", str(out), *extra],
                          cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _numbers(summary):
    """Every correlation and gap of a summary, flattened to {path: float}."""
    out = {}
    for kind, entry in summary["correlations"].items():
        for key in ("pearson", "spearman"):
            out[f"corr.{kind}.{key}"] = entry[key]
    dec = summary["decomposition"]
    for part in ("gaps", "signed"):
        for gap, value in dec[part].items():
            if value is not None:
                out[f"{part}.{gap}"] = value
    return out


def test_local_executor_does_not_import_ray(tmp_path):
    code = (
        "import sys; from pbrf.experiment import config; "
        "from pbrf.experiment.run import driver as pipeline; "
        "cfg = config.load_preset('digits-mlp', 'tiny', ['responses.kinds=[\"linearized\", "
        "\"influence\"]']); "
        f"pipeline.run_experiment(cfg, {str(tmp_path / 'r')!r}, progress=False); "
        "print('ray' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_ray_executor_matches_local(tmp_path):
    local = _run(tmp_path / "local", tmp_path)
    remote = _run(tmp_path / "ray", tmp_path, "--executor", "ray")
    a, b = _numbers(local), _numbers(remote)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
