"""Tests for pbrf.experiment.analysis: expected values computed independently (np.corrcoef,
brute-force loops, hand arithmetic), identities and invariances."""

import itertools
import json
import math

import numpy as np
import pytest

from pbrf.experiment import analysis as A


def _random_dm(seed=0, shape=(5, 7)):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(scale=10.0 ** rng.uniform(-3, 1), size=shape) for k in A.KINDS}


def _brute_ranks(x):
    """Average ranks by counting: rank = #{smaller} + (#{equal} + 1) / 2."""
    x = list(x)
    return np.array([sum(y < v for y in x) + (sum(y == v for y in x) + 1) / 2 for v in x])


# --------------------------------------------------------------------------- constants


def test_gap_names_and_pairs():
    assert A.KINDS == ("cold", "warm", "proximal", "pbrf", "linearized", "influence")
    assert A.GAPS == (
        "warm-start gap",
        "proximity gap",
        "non-convergence gap",
        "linearisation error",
        "solver error",
    )
    assert A.GAP_PAIRS["proximity gap"] == ("warm", "proximal")
    assert A.GAP_PAIRS["solver error"] == ("linearized", "influence")


# ------------------------------------------------------------------------- rankdata / correlations


@pytest.mark.parametrize(
    "x, expected",
    [
        ([10, 20, 20, 5], [2, 3.5, 3.5, 1]),
        ([3, 3, 3], [2, 2, 2]),
        ([1.0, -1.0, 0.0, 1.0, 1.0], [4, 1, 2, 4, 4]),
        ([7.0], [1]),
    ],
)
def test_rankdata_hand_values(x, expected):
    np.testing.assert_array_equal(A.rankdata(x), np.array(expected, dtype=float))


def test_rankdata_matches_brute_force_with_many_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=40).astype(float)
    np.testing.assert_array_equal(A.rankdata(x), _brute_ranks(x))


def test_pearson_matches_corrcoef():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b = b + 0.5 * a
    assert A.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)


def test_pearson_hand_value():
    # a = [1,2,3], b = [1,3,2]: centred (-1,0,1), (-1,1,0) -> 1 / (sqrt2 sqrt2) = 0.5
    assert A.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-15)


def test_spearman_with_ties_matches_corrcoef_of_brute_ranks():
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0])
    b = np.array([2.0, 1.0, 4.0, 4.0, 3.0, 9.0, 9.0, -1.0])
    expected = np.corrcoef(_brute_ranks(a), _brute_ranks(b))[0, 1]
    assert A.spearman(a, b) == pytest.approx(expected, abs=1e-12)
    # independent of the ordering of the ties in the input
    perm = np.random.default_rng(3).permutation(a.size)
    assert A.spearman(a[perm], b[perm]) == pytest.approx(expected, abs=1e-12)


def test_spearman_invariant_under_monotone_transforms():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=60), rng.normal(size=60) + rng.normal(size=60)
    base = A.spearman(a, b)
    assert A.spearman(np.exp(3 * a), b**3 + 2) == pytest.approx(base, abs=1e-12)
    assert A.spearman(-a, b) == pytest.approx(-base, abs=1e-12)
    # ... while Pearson is not invariant
    assert abs(A.pearson(np.exp(3 * a), b**3) - A.pearson(a, b)) > 1e-3


def test_correlations_are_nan_safe_and_degenerate_cases_are_nan():
    a = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    b = np.array([2.0, 1.0, 7.0, np.inf, 3.0])
    keep = [0, 1, 4]
    assert A.pearson(a, b) == pytest.approx(np.corrcoef(a[keep], b[keep])[0, 1], abs=1e-12)
    assert math.isnan(A.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(A.spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    assert math.isnan(A.pearson([1.0], [2.0]))


def test_correlations_all_pairs_and_per_test_means_brute_force():
    rng = np.random.default_rng(5)
    n_test, n_rem = 4, 9
    scores = rng.normal(size=(n_test, n_rem))
    dm = {k: scores + rng.normal(scale=s, size=scores.shape) for k,
          s in [("pbrf", 0.1), ("cold", 2.0)]}
    dm["pbrf"][2] = 3.0  # a constant row: skipped by the per-test mean
    out = A.correlations(scores, dm)
    assert list(out) == ["cold", "pbrf"]  # KINDS order
    for kind, values in dm.items():
        flat_p = np.corrcoef(scores.ravel(), values.ravel())[0, 1]
        flat_s = np.corrcoef(_brute_ranks(scores.ravel()), _brute_ranks(values.ravel()))[0, 1]
        rows = [i for i in range(n_test) if np.ptp(values[i]) > 0]
        row_p = np.mean([np.corrcoef(scores[i], values[i])[0, 1] for i in rows])
        row_s = np.mean([np.corrcoef(_brute_ranks(scores[i]), _brute_ranks(values[i]))[0,
            1] for i in rows])
        got = out[kind]
        assert got["pearson"] == pytest.approx(flat_p, abs=1e-12)
        assert got["spearman"] == pytest.approx(flat_s, abs=1e-12)
        assert got["pearson_per_test"] == pytest.approx(row_p, abs=1e-12)
        assert got["spearman_per_test"] == pytest.approx(row_s, abs=1e-12)
        assert got["n_tests_used"] == len(rows)
    assert out["pbrf"]["n_tests_used"] == n_test - 1


def test_correlations_undefined_become_none_and_shape_mismatch_raises():
    scores = np.arange(6.0).reshape(2, 3)
    out = A.correlations(scores, {"warm": np.ones((2, 3))})
    assert out["warm"]["pearson"] is None and out["warm"]["pearson_per_test"] is None
    assert out["warm"]["n_tests_used"] == 0
    with pytest.raises(ValueError, match="transpose"):
        A.correlations(scores, {"warm": np.ones((3, 2))})


# --------------------------------------------------------------------------- decomposition


def test_decompose_hand_computed_values():
    # one test point, two removals; values chosen so every number is exact in binary
    dm = {
        "cold": np.array([[1.0, -2.0]]),
        "warm": np.array([[0.5, -1.0]]),
        "proximal": np.array([[0.5, -0.5]]),
        "pbrf": np.array([[0.25, -0.5]]),
        "linearized": np.array([[0.25, -0.25]]),
        "influence": np.array([[0.0, 0.0]]),
    }
    out = A.decompose(dm)
    # |cold-warm| = (0.5, 1.0) -> 0.75; signed (0.5, -1.0) -> -0.25
    assert out["gaps"]["warm-start gap"] == 0.75
    assert out["signed"]["warm-start gap"] == -0.25
    assert out["gaps"]["proximity gap"] == 0.25  # (0, 0.5)
    assert out["signed"]["proximity gap"] == -0.25
    assert out["gaps"]["non-convergence gap"] == 0.125  # (0.25, 0)
    assert out["signed"]["non-convergence gap"] == 0.125
    assert out["gaps"]["linearisation error"] == 0.125  # (0, 0.25)
    assert out["signed"]["linearisation error"] == -0.125
    assert out["gaps"]["solver error"] == 0.25  # (0.25, 0.25) and (0.25, -0.25)
    assert out["signed"]["solver error"] == 0.0
    assert out["total"] == 1.5  # |1|, |-2|
    assert out["total_signed"] == -0.5
    assert out["n_pairs"] == 2 and out["n_valid"] == 2
    assert out["output_gaps"] is None
    assert out["mean_abs"]["cold"] == 1.5


def test_decompose_matches_brute_force_loop():
    dm = _random_dm(6)
    out = A.decompose(dm)
    n_test, n_rem = dm["cold"].shape
    for j, name in enumerate(A.GAPS):
        a, b = dm[A.KINDS[j]], dm[A.KINDS[j + 1]]
        diffs = [a[i, r] - b[i, r] for i, r in itertools.product(range(n_test), range(n_rem))]
        mean_abs = sum(abs(d) for d in diffs) / len(diffs)
        assert out["gaps"][name] == pytest.approx(mean_abs, rel=1e-12)
        assert out["signed"][name] == pytest.approx(sum(diffs) / len(diffs), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signed_gaps_telescope(seed):
    dm = _random_dm(seed, shape=(8, 11))
    out = A.decompose(dm)
    assert out["telescoping_chain"] == ["cold", "influence"]
    assert out["telescoping_residual"] <= 1e-12
    assert sum(out["signed"].values()) == pytest.approx(out["total_signed"], abs=1e-12)
    expected = np.mean(dm["cold"] - dm["influence"])
    assert out["total_signed"] == pytest.approx(expected, abs=1e-12)
    # the triangle inequality bounds the total by the sum of the gaps
    assert out["total"] <= sum(out["gaps"].values()) + 1e-12


def test_output_gaps_use_l2_norm_over_output_dims():
    rng = np.random.default_rng(7)
    df = {k: rng.normal(size=(3, 4, 2, 5)) for k in A.KINDS}  # [n_removals, n_test, 2, 5]
    dm = _random_dm(7, shape=(4, 3))
    out = A.decompose(dm, df)
    for j, name in enumerate(A.GAPS):
        a, b = df[A.KINDS[j]], df[A.KINDS[j + 1]]
        norms = [math.sqrt(((a[r, i] - b[r, i]) ** 2).sum()) for r in range(3) for i in range(4)]
        assert out["output_gaps"][name] == pytest.approx(np.mean(norms), rel=1e-12)


def test_missing_kinds_give_none_not_a_crash():
    dm = _random_dm(8)
    del dm["cold"]
    dm["proximal"] = None  # explicitly skipped
    out = A.decompose(dm, df={"pbrf": np.zeros((7, 5, 2)), "linearized": np.ones((7, 5, 2))})
    assert out["gaps"]["warm-start gap"] is None
    assert out["gaps"]["proximity gap"] is None and out["gaps"]["non-convergence gap"] is None
    assert out["gaps"]["linearisation error"] is not None
    assert out["total"] is None and out["total_signed"] is None
    assert out["telescoping_residual"] is None  # warm, pbrf, ... is not a contiguous chain
    assert out["output_gaps"]["linearisation error"] == pytest.approx(math.sqrt(2))
    assert out["output_gaps"]["solver error"] is None
    assert out["kinds"] == ["warm", "pbrf", "linearized", "influence"]
    json.dumps(out, allow_nan=False)


def test_contiguous_partial_chain_still_telescopes():
    dm = _random_dm(9)
    del dm["cold"]
    out = A.decompose(dm)
    assert out["telescoping_chain"] == ["warm", "influence"]
    assert out["telescoping_residual"] <= 1e-12


def test_nonfinite_pairs_are_dropped_consistently():
    dm = _random_dm(10, shape=(3, 4))
    dm["pbrf"][1, 2] = np.nan
    dm["warm"][0, 0] = np.inf
    out = A.decompose(dm)
    mask = np.ones((3, 4), bool)
    mask[1, 2] = mask[0, 0] = False
    assert out["n_valid"] == 10 and out["n_pairs"] == 12
    assert out["nonfinite"]["pbrf"] == 1 and out["nonfinite"]["cold"] == 0
    expected = np.abs(dm["cold"] - dm["warm"])[mask].mean()
    assert out["gaps"]["warm-start gap"] == pytest.approx(expected, rel=1e-12)
    assert sum(out["signed"].values()) == pytest.approx(out["total_signed"], abs=1e-12)
    json.dumps(out, allow_nan=False)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown kinds"):
        A.decompose({"loo": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="one shape"):
        A.decompose({"warm": np.zeros((2, 2)), "pbrf": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="no arrays"):
        A.decompose({})


# --------------------------------------------------------------------------- summarise


def test_summarise_combines_and_defaults_scores_to_influence():
    dm = _random_dm(11)
    s = A.summarise(dm, diagnostics={"pbrf": {"diverged": 0}})
    assert s["n_test"] == 5 and s["n_removals"] == 7
    assert s["decomposition"] == A.decompose(dm)
    assert s["correlations"] == A.correlations(dm["influence"], dm)
    assert s["correlations"]["influence"]["pearson"] == pytest.approx(1.0)
    assert s["diagnostics"] == {"pbrf": {"diverged": 0}}
    other = np.random.default_rng(0).normal(size=(5, 7))
    assert A.summarise(dm, scores=other)["correlations"]["pbrf"]["pearson"] == pytest.approx(
        np.corrcoef(other.ravel(), dm["pbrf"].ravel())[0, 1], abs=1e-12
    )
    no_influence = {k: v for k, v in dm.items() if k != "influence"}
    assert A.summarise(no_influence)["correlations"] == {}
    json.dumps(s, allow_nan=False)
