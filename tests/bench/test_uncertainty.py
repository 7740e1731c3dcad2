"""Two-way bootstrap intervals and seed-noise floors of ``pbrf.experiment.bench.uncertainty``."""

import math

import numpy as np
import pytest

from pbrf.experiment.analysis.decomposition import correlation_entry
from pbrf.experiment.bench import uncertainty as unc
from pbrf.lds import lds

# --------------------------------------------------------------------------- a crossed-effects Δm

#: The synthetic study (see :func:`crossed`): lognormal per-test-point scale of both sides (σ_s)
#: and of the estimator alone (σ_c), means μ, per-removal effects b (variance v_b, correlation
#: r_b between the sides), cell noise (variance v_e) whose correlation differs per test point
#: (uniform in [r_lo, r_hi]).
CROSSED = dict(ss=1.0, sc=0.3, mu=0.3, mu2=0.3, rb=0.6, vb=0.5, ve=0.5, rlo=0.1, rhi=0.9)


def crossed(rng, n, k, p=CROSSED):
    """Δm and estimator scores ``[n, k]`` shaped like the study's: test point ``i`` scales its row
    by ``s_i`` (the estimator by a further ``c_i``), removal ``j`` has an effect ``b_j`` shared by
    every test point (the estimator sees a correlated ``b'_j``), and the cell noise is correlated
    between the sides with a strength that varies across test points.
    """
    s = np.exp(p["ss"] * rng.standard_normal((n, 1)))
    c = np.exp(p["sc"] * rng.standard_normal((n, 1)))
    b = rng.standard_normal((1, k))
    b2 = p["rb"] * b + math.sqrt(1 - p["rb"] ** 2) * rng.standard_normal((1, k))
    r = rng.uniform(p["rlo"], p["rhi"], (n, 1))
    e = rng.standard_normal((n, k))
    e2 = r * e + np.sqrt(1 - r * r) * rng.standard_normal((n, k))
    truth = s * (p["mu"] + math.sqrt(p["vb"]) * b + math.sqrt(p["ve"]) * e)
    scores = s * c * (p["mu2"] + math.sqrt(p["vb"]) * b2 + math.sqrt(p["ve"]) * e2)
    return scores, truth


def crossed_population_pearson(p=CROSSED):
    """The pooled Pearson of :func:`crossed` over infinitely many test points and removals, from
    the lognormal moments ``E[exp(σZ)^k] = exp(k²σ²/2)`` (s, c, b, e, r independent)."""
    m = lambda sig, k: math.exp(k * k * sig * sig / 2)
    ex, ey = m(p["ss"], 1) * m(p["sc"], 1) * p["mu2"], m(p["ss"], 1) * p["mu"]
    r_mean = (p["rlo"] + p["rhi"]) / 2
    exy = m(p["ss"], 2) * m(p["sc"], 1) * (p["mu"] * p["mu2"] + p["rb"] * p["vb"]
                                           + r_mean * p["ve"])
    ex2 = m(p["ss"], 2) * m(p["sc"], 2) * (p["mu2"] ** 2 + p["vb"] + p["ve"])
    ey2 = m(p["ss"], 2) * (p["mu"] ** 2 + p["vb"] + p["ve"])
    return (exy - ex * ey) / math.sqrt((ex2 - ex * ex) * (ey2 - ey * ey))


def test_population_pearson_of_the_synthetic_study_matches_a_large_sample():
    # the study's scales are heavy-tailed (pooled sums weigh rows by s², lognormal with σ = 2), so
    # a large sample converges slowly; the formula is checked with lighter scales, where it is
    # the same algebra
    light = {**CROSSED, "ss": 0.3, "sc": 0.2}
    x, y = crossed(np.random.default_rng(0), 500, 4000, light)  # sd of the estimate ≈ 0.007
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] == pytest.approx(
        crossed_population_pearson(light), abs=0.025)
    assert crossed_population_pearson() == pytest.approx(0.5482, abs=1e-4)


def test_interval_of_the_pooled_pearson_covers_the_population_value_at_about_95_percent():
    # 10 test points x 80 removals (the study has 10 x 500). Measured: this test covers 0.955;
    # resampling the test points alone covers 0.84 here, the removals alone 0.78, so the test
    # fails unless both are resampled. The same design at 10 x 500 (200 data seeds, 300
    # replicates) covers 0.915. On i.i.d. cells the two-way bootstrap is conservative (1.00).
    true = crossed_population_pearson()
    hits = 0
    for rep in range(200):
        scores, truth = crossed(np.random.default_rng([rep, 11]), 10, 80)
        reps = unc.bootstrap_replicates(scores, truth, n_boot=250, seed=rep, stats=("pearson",))
        lo, hi = unc.percentile_interval(reps["pearson"], 0.95)
        hits += lo <= true <= hi
    assert 0.90 <= hits / 200 <= 0.99


# --------------------------------------------------------------------------- the replicates


def test_replicates_are_the_statistics_of_the_explicitly_resampled_matrix():
    rng = np.random.default_rng(1)
    scores = np.round(rng.standard_normal((6, 40)), 1)  # ties, which duplicates multiply
    truth = np.round(0.5 * scores + rng.standard_normal((6, 40)), 1)
    truth[2, 5], scores[0, 7] = np.nan, np.inf
    reps = unc.bootstrap_replicates(scores, truth, n_boot=40, seed=3)
    rows, cols = unc.resample_indices(6, 40, 40, 3)
    for b in range(40):
        entry = correlation_entry(scores[rows[b]][:, cols[b]], truth[rows[b]][:, cols[b]])
        for stat in unc.STATS:
            assert reps[stat][b] == pytest.approx(entry[stat], abs=1e-12)


def test_a_replicate_that_draws_one_removal_is_undefined_per_test_point():
    rng = np.random.default_rng(2)
    scores, truth = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    reps = unc.bootstrap_replicates(scores, truth, n_boot=64, seed=0)
    _, cols = unc.resample_indices(5, 2, 64, 0)
    one = cols.min(axis=1) == cols.max(axis=1)
    assert one.any() and (~one).any()
    assert np.isnan(reps["spearman_per_test"][one]).all()
    assert np.isfinite(reps["spearman_per_test"][~one]).all()


def test_intervals_are_deterministic_for_a_seed_and_bracket_the_estimate():
    scores, truth = crossed(np.random.default_rng(3), 8, 50)
    first = unc.bootstrap_correlations(scores, truth, n_boot=200, seed=5)
    assert first == unc.bootstrap_correlations(scores, truth, n_boot=200, seed=5)
    assert first != unc.bootstrap_correlations(scores, truth, n_boot=200, seed=6)
    entry = correlation_entry(scores, truth)
    for stat in unc.STATS:
        lo, hi = first[stat]
        assert isinstance(lo, float) and isinstance(hi, float)
        assert -1 <= lo < entry[stat] < hi <= 1


def test_an_all_nan_column_changes_nothing():
    scores, truth = crossed(np.random.default_rng(4), 8, 50)
    holed = truth.copy()
    holed[:, 17] = np.nan  # an uncertified removal
    kept = np.delete(np.arange(50), 17)
    a, b = correlation_entry(scores, holed), correlation_entry(scores[:, kept], truth[:, kept])
    assert all(a[k] == b[k] for k in unc.STATS)  # the point values, bit for bit
    assert (unc.bootstrap_correlations(scores, holed, n_boot=100)
            == unc.bootstrap_correlations(scores[:, kept], truth[:, kept], n_boot=100))
    per_seed = np.stack([truth, truth + 0.1, truth - 0.2], axis=2)
    per_seed[:, 17, 1] = np.nan
    holed_floor = unc.seed_floor(per_seed, n_boot=50)
    kept_floor = unc.seed_floor(per_seed[:, kept], n_boot=50)
    assert holed_floor == kept_floor


def test_undefined_statistics_have_no_interval():
    scores = np.random.default_rng(5).standard_normal((4, 30))
    assert unc.bootstrap_correlations(scores, np.ones((4, 30)), n_boot=50) == dict.fromkeys(
        unc.STATS)
    assert unc.bootstrap_correlations(scores, np.full((4, 30), np.nan), n_boot=50) == dict.fromkeys(
        unc.STATS)
    assert unc.bootstrap_lds(scores, np.ones((4, 30)), n_boot=50) is None
    with pytest.raises(ValueError, match="must both be"):
        unc.bootstrap_correlations(scores, scores.T)


def test_lds_interval_is_the_per_test_spearman_interval_around_the_lds():
    scores, actual = crossed(np.random.default_rng(6), 12, 40)
    ci = unc.bootstrap_lds(scores, actual, n_boot=300, seed=2)
    assert ci == unc.bootstrap_correlations(scores, actual, n_boot=300,
                                            seed=2)["spearman_per_test"]
    assert ci[0] < lds(scores, actual)["lds"] < ci[1]


# --------------------------------------------------------------------------- seed floors


@pytest.mark.parametrize("n_seeds", [2, 3, 4])
def test_seed_floor_reports_the_half_split_agreement_and_its_ceiling(n_seeds):
    rng = np.random.default_rng(7)
    per_seed = rng.standard_normal((6, 30, 1)) + 0.7 * rng.standard_normal((6, 30, n_seeds))
    floor = unc.seed_floor(per_seed, n_boot=100, seed=1)
    a = per_seed[:, :, 0::2].mean(axis=2)
    b = per_seed[:, :, 1::2].mean(axis=2)
    entry = correlation_entry(a, b)
    assert floor["halves"] == [list(range(0, n_seeds, 2)), list(range(1, n_seeds, 2))]
    assert floor["n_seeds"] == n_seeds
    for stat in unc.STATS:
        assert floor[stat] == entry[stat]  # bit for bit
        r = entry[stat]
        assert floor[f"ceiling_{stat}"] == pytest.approx(math.sqrt(2 * r / (1 + r)), rel=1e-15)
        assert r < floor[f"ceiling_{stat}"] < 1
        assert floor[f"{stat}_ci"] == unc.bootstrap_correlations(a, b, n_boot=100,
                                                                 seed=1)[stat]
    ldsf = unc.lds_floor(per_seed, n_boot=100, seed=1)
    assert ldsf["lds"] == lds(a, b)["lds"] == floor["spearman_per_test"]
    assert ldsf["lds_ci"] == floor["spearman_per_test_ci"]
    assert ldsf["ceiling_lds"] == floor["ceiling_spearman_per_test"]
    assert ldsf["halves"] == floor["halves"] and ldsf["n_seeds"] == n_seeds


def test_one_seed_has_no_floor_and_the_ceiling_needs_a_positive_correlation():
    one = np.random.default_rng(8).standard_normal((5, 20, 1))
    assert unc.seed_floor(one) is None and unc.lds_floor(one) is None
    assert unc.spearman_brown(0.0) is None and unc.spearman_brown(-0.3) is None
    assert unc.spearman_brown(None) is None and unc.spearman_brown(math.nan) is None
    assert unc.spearman_brown(1.0) == 1.0
    assert unc.spearman_brown(0.5) == pytest.approx(math.sqrt(2 / 3))


def test_planted_signal_gives_a_floor_near_one_and_pure_noise_near_zero():
    rng = np.random.default_rng(9)
    signal = rng.standard_normal((10, 200, 1)) * np.exp(rng.standard_normal((10, 1, 1)))
    clean = signal + 0.05 * rng.standard_normal((10, 200, 4)) * np.abs(signal).mean()
    floor = unc.seed_floor(clean, n_boot=200)
    for stat in unc.STATS:
        assert floor[stat] > 0.98 and floor[f"{stat}_ci"][0] > 0.95
        assert floor[f"ceiling_{stat}"] > 0.99
    assert unc.lds_floor(clean, n_boot=200)["lds"] > 0.98
    noise = unc.seed_floor(rng.standard_normal((10, 200, 4)), n_boot=200)
    for stat in unc.STATS:
        assert abs(noise[stat]) < 0.1
        lo, hi = noise[f"{stat}_ci"]
        assert lo < 0 < hi
    noise_lds = unc.lds_floor(rng.standard_normal((10, 200, 4)), n_boot=200)
    assert abs(noise_lds["lds"]) < 0.1 and noise_lds["lds_ci"][0] < 0 < noise_lds["lds_ci"][1]
