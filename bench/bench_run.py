"""Benchmark: ``pbrf run`` on the default preset from scratch, in a temporary directory.

Prints the wall time of the whole run (training θ^s, all six response functions, report) and the
Pearson / Spearman correlations of the influence estimate with the PBRF (the acceptance figure:
both >= 0.9), plus the per-kind compute seconds recorded in the run's database.

    python bench/bench_run.py [--profile quick] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pbrf-bench-") as tmp:
        cmd = [sys.executable, "-m", "pbrf.cli", "run", "--profile", args.profile, "--no-progress"]
        for item in args.sets:
            cmd += ["--set", item]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        run_dir = Path(tmp) / "runs" / "digits-mlp"
        summary = json.loads((run_dir / "summary.json").read_text())
        from pbrf.experiment.run.store import Store

        with Store(run_dir, readonly=True) as store:
            seconds = store.kind_seconds()
    corr = summary["correlations"]["pbrf"]
    print(proc.stdout)
    print(
        f"pbrf run (digits-mlp, profile {args.profile}, {os.cpu_count()} CPUs): wall {wall:.1f} s"
    )
    print(
        "compute seconds per kind: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(seconds.items()))
    )
    print(
        f"influence vs PBRF: Pearson {corr['pearson']:.3f}, Spearman {corr['spearman']:.3f} "
        "(target >= 0.9)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
