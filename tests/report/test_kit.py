"""The formatting kit: one markdown table, one fixed-width text table (used by the run, the
table of runs, ``pbrf evaluate`` and the leaderboard), number formats with the missing marker."""

import pytest

from pbrf.experiment.bench import evaluate, leaderboard
from pbrf.experiment.report import kit


def test_md_table_has_one_row_per_record_and_escapes_pipes():
    text = kit.md_table(["name", "x"], [["a|b", "1"], ["c\nd", kit.fmt_corr(None)]])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[1] == "| :--- | ---: |"
    assert lines[2] == "| a\\|b | 1 |" and lines[3] == f"| c d | {kit.NA} |"
    assert kit.md_table(["a", "b"], [], align="rl").splitlines()[1] == "| ---: | :--- |"


def test_text_table_aligns_columns():
    text = kit.text_table(["run", "P"], [["a", "0.5"], ["longer", "10.25"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[1] == "------  -----"
    assert lines[2] == "a         0.5" and lines[3] == "longer  10.25"  # left, then right


def test_evaluate_and_leaderboard_tables_are_the_kits():
    corr = {"pbrf": {"pearson": 0.5, "spearman": None, "n_pairs": 3}}
    text = evaluate.format_correlations({"correlations": corr})
    rows = [["PBRF", "0.500", kit.NA, kit.NA, kit.NA, "3"]]
    assert text == kit.text_table(["scores vs", "Pearson", "Spearman", "P/test", "S/test",
                                   "pairs"], rows)
    board = {"truths": {"pbrf": "PBRF"}, "rows": [
        {"method": "ekfac", "seconds": 1.5, "peak_memory_mb": 12.0,
         "correlations": {"pbrf": {"pearson": 0.9, "spearman": 0.8}},
         "hyperparameters": {"damping": 0.1}}]}
    text = leaderboard.format_leaderboard(board, markdown=False)
    # the terminal table leaves out the hyperparameters column
    assert text == kit.text_table(["estimator", "time (s)", "peak MB", "residual", "PBRF P",
                                   "PBRF S"], [["ekfac", "1.50", "12", "—", "0.900", "0.800"]])


@pytest.mark.parametrize("value, std, expected", [
    (0.5, None, "0.500"), (0.5, 0.01, "0.500 ± 0.010"), (None, 0.01, kit.NA),
    (0.5, float("nan"), "0.500"),
])
def test_fmt_ms(value, std, expected):
    assert kit.fmt_ms(value, std) == expected


def test_mean_std_reads_dotted_keys_and_std_blocks():
    summary = {"correlations": {"pbrf": {"pearson": 0.5, "pearson_std": 0.1}},
               "decomposition": {"gaps": {"g": 2.0}, "gaps_std": {"g": 0.5}}}
    assert kit.mean_std(summary, "correlations.pbrf.pearson") == (0.5, 0.1)
    assert kit.mean_std(summary, "decomposition.gaps.g") == (2.0, 0.5)
    assert kit.mean_std(summary, "decomposition.gaps.missing") == (None, None)
    assert kit.fmt_mean_std(summary, "decomposition.gaps.g", kit.fmt_value) == \
        "2.000e+00 ± 5.000e-01"
    assert kit.nested_get(summary, "correlations", "pbrf", "pearson") == 0.5
    assert kit.nested_get(summary, "correlations", "x", "y") is None


def test_fmt_setting():
    assert kit.fmt_setting(0.001) == "0.001" and kit.fmt_setting(float("nan")) == kit.NA
    assert kit.fmt_setting(list(range(10))) == "[0, 1, 2, 3, 4, 5, 6, 7, … (10 items)]"
    assert kit.fmt_setting("a\nb") == "a b"
