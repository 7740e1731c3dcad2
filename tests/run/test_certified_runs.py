"""Certified response functions in ``pbrf run``: certificates stored and used, results independent
of chunking, one influence, float64 measurement, the paired chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pbrf
from pbrf.experiment import analysis
from pbrf.experiment.config import load_preset
from pbrf.experiment.run import driver as pipeline
from pbrf.experiment.run.store import Store

KINDS = ("influence", "cold", "warm", "proximal", "pbrf", "linearized")
#: The tiny profile on 60 training points (every property below holds there, at a third of the
#: cost).
SMALL = ["data.n_train=60"]
#: The two kinds whose difference is the linearisation error, and the influence every run needs.
LINEARISATION = ['responses.kinds=["pbrf", "linearized", "influence"]']


def _run(tmp_path_factory, name, overrides=()):
    run_dir = tmp_path_factory.mktemp("cert") / name
    cfg = load_preset("digits-mlp", "tiny", [*SMALL, *overrides])
    summary = pipeline.run_experiment(cfg, run_dir, progress=False)
    return cfg, run_dir, summary


def _stored(run_dir, cfg):
    n_chunks = -(-cfg.removals.n_removals // cfg.run.chunk_size)
    with Store(run_dir, readonly=True) as store:
        out = {k: store.gather(k, n_chunks) for k in KINDS}
        extra = {k: store.gather_extra(k, n_chunks) for k in ("warm", "proximal", "linearized")}
    return out, extra


@pytest.fixture(scope="module")
def chunked_runs(tmp_path_factory):
    return [_run(tmp_path_factory, f"c{cs}", [f"run.chunk_size={cs}"]) for cs in (4, 16)]


def test_every_stored_dm_is_independent_of_chunk_size(chunked_runs):
    (cfg4, dir4, _), (cfg16, dir16, _) = chunked_runs
    a, ea = _stored(dir4, cfg4)
    b, eb = _stored(dir16, cfg16)
    for kind in KINDS:
        dm4, dm16 = a[kind][0], b[kind][0]
        scale = np.abs(dm16).max()
        assert np.abs(dm4 - dm16).max() <= 1e-9 * scale, kind
    for kind in ("warm", "proximal", "linearized"):
        assert np.abs(ea[kind] - eb[kind]).max() <= 1e-9 * np.abs(eb[kind]).max(), kind


def test_certificates_are_stored_reported_and_all_pass_on_tiny(chunked_runs):
    cfg, run_dir, summary = chunked_runs[0]
    stored, _ = _stored(run_dir, cfg)
    for kind in ("pbrf", "proximal"):
        rows = stored[kind][2]
        assert all(r["certified"] and r["rho"] <= cfg.responses.rho_threshold for r in rows)
        assert kind == "pbrf" or all(r["paired_certified"] for r in rows)
    cert = summary["certificates"]
    assert cert["n_kept"] == cert["n_removals"] == 8
    assert cert["by_kind"]["pbrf"]["certified"] == 8
    report = (run_dir / "report.md").read_text()
    assert "PBRF: certified 8 of 8" in report and "proximal: certified 8 of 8" in report
    assert "Paired chain" in report and "drift (warm-start LOO)" in report
    # the practical and accurate solves' residuals are stored and shown
    assert summary["solvers"]["practical"]["max_residual"] < 1 and "practical solve" in report


def test_run_influence_is_pbrf_influence(chunked_runs):
    cfg, run_dir, _ = chunked_runs[0]
    ctx = pipeline.load_context(run_dir)
    scores = pbrf.influence(ctx.measure_problem, ctx.test, ctx.groups,
                            **pipeline.influence_settings(cfg))
    stored = np.load(run_dir / "influence_scores.npy")
    np.testing.assert_allclose(stored, scores.double().numpy(), rtol=1e-10,
                               atol=1e-10 * np.abs(stored).max())


def test_uncertified_pairs_are_left_out_and_counted(tmp_path_factory):
    cfg, run_dir, summary = _run(tmp_path_factory, "short", [
        "responses.optimizer=adam", "responses.steps=3", "responses.lr=1e-4",
            "responses.batch_size=0"])
    cert = summary["certificates"]
    assert cert["by_kind"]["pbrf"]["certified"] == 0 and cert["by_kind"]["pbrf"]["uncertified"] == 8
    assert cert["n_kept"] == 0 and cert["excluded_removals"] == list(range(8))
    assert summary["decomposition"]["n_valid"] == 0  # no statistic uses an uncertified pair
    assert summary["correlations"]["pbrf"]["pearson"] is None
    report = (run_dir / "report.md").read_text()
    assert "PBRF: certified 0 of 8" in report and "left out: 8" in report


def test_float32_model_is_measured_in_float64(tmp_path_factory):
    """θ^s trained in float32; the same θ^s in a float64 run gives the same linearisation error."""
    cfg32, dir32, s32 = _run(tmp_path_factory, "f32", [*LINEARISATION, "run.dtype=float32"])
    dir64 = dir32.parent / "f64"
    dir64.mkdir()
    params, meta = pbrf.load_checkpoint(dir32 / pipeline.CHECKPOINT)
    pbrf.save_checkpoint(dir64 / pipeline.CHECKPOINT, {k: v.double() for k, v in params.items()},
                         meta)
    cfg64 = load_preset("digits-mlp", "tiny", [*SMALL, *LINEARISATION, "run.dtype=float64"])
    (dir64 / "config.json").write_text(cfg64.to_json() + "\n")
    s64 = pipeline.run_experiment(cfg64, dir64, progress=False)
    a = s32["decomposition"]["gaps"]["linearisation error"]
    b = s64["decomposition"]["gaps"]["linearisation error"]
    assert abs(a - b) <= 0.1 * b, (a, b)


def test_paired_gaps_and_drift_telescope():
    rng = np.random.default_rng(0)
    dm = {k: rng.normal(size=(6, 9)) for k in analysis.KINDS}
    paired = {"warm": rng.normal(size=(6, 9)), "proximal": rng.normal(size=(6, 9))}
    dm["pbrf"][0, 3] = np.nan  # an excluded pair drops out of both chains
    out = analysis.paired_chain(dm, paired)
    dec = out["decomposition"]
    assert dec["telescoping_residual"] < 1e-12 and out["literal_residual"] < 1e-12
    assert dec["n_valid"] == 53
    # paired chain: Σ signed gaps = cold − influence
    assert sum(dec["signed"].values()) == pytest.approx(dec["total_signed"], abs=1e-12)
    # literal gaps = paired gaps ± drift (means over the same pairs)
    lit = analysis.decompose({k: np.where(np.isnan(dm["pbrf"]), np.nan, v) for k, v in dm.items()})
    dw, dp = out["drift"]["warm"]["signed"], out["drift"]["proximal"]["signed"]
    warm_gap = dec["signed"]["warm-start gap"] - dw
    assert lit["signed"]["warm-start gap"] == pytest.approx(warm_gap, abs=1e-12)
    expected = dec["signed"]["proximity gap"] + dw - dp
    assert lit["signed"]["proximity gap"] == pytest.approx(expected, abs=1e-12)
    assert lit["signed"]["non-convergence gap"] == pytest.approx(
        dec["signed"]["non-convergence gap"] + dp, abs=1e-12
    )


def test_summary_json_has_no_nan(chunked_runs):
    _, run_dir, _ = chunked_runs[1]
    json.loads((run_dir / "summary.json").read_text())  # allow_nan=False on write; must parse
    assert torch.isfinite(torch.tensor(np.load(run_dir / "influence_scores.npy"))).all()
