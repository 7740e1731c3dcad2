"""Report properties proven on data: the cold-start seed row of the experiment table, the axes of
the sweep figure, the verdicts behind "How to read this", the empty decomposition figure, the
trends of a sweep, the labels of ``pbrf table`` and a whole sweep's files and tables.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from pbrf import cli
from pbrf.experiment import report
from pbrf.experiment.analysis import GAPS
from pbrf.experiment.analysis.results import Summary
from pbrf.experiment.report import figures, sections

from .test_run_report import table_blocks


def md_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table under ``heading``: first cell (backticks removed) -> cells."""
    body = markdown.split(heading, 1)[1]
    rows = table_blocks(body)[0][2:]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
    return {c[0].strip("`"): c[1:] for c in cells}


def _config(seeds):
    return {"responses": {"cold_seeds": seeds}, "train": {"seed": 0}}


@pytest.mark.parametrize("seeds, same_seed, others", [([0], True, 0), ([0, 1, 2], True, 2),
                                                      ([1, 2], False, 2)])
def test_experiment_table_names_the_cold_start_seeds(tmp_path, seeds, same_seed, others):
    summary = {"kinds": ["cold", "pbrf"]}
    text = report.render_markdown(summary, _config(seeds), "t", {}, tmp_path)
    value = md_rows(text, "## Experiment")["cold-start seeds"][0]
    assert value.startswith(str(seeds))
    assert ("same-seed" in value) is same_seed  # θ^s's seed 0 is retrained with
    assert (f"{others} other" in value) is (same_seed and others > 0)


def test_no_cold_start_seed_row_without_cold_start(tmp_path):
    text = report.render_markdown({"kinds": ["pbrf"]}, _config([0]), "t", {}, tmp_path)
    assert "cold-start seeds" not in md_rows(text, "## Experiment")


def _gap_summary(warm, lin=1e-6, pbrf=0.9, cold=0.3):
    return {"decomposition": {"gaps": dict(zip(GAPS, [warm, 1e-3, 1e-3, lin, 1e-8]))},
            "correlations": {"pbrf": {"pearson": pbrf}, "cold": {"pearson": cold}}}


@pytest.mark.parametrize("factor, values, xscale, ticks", [
    ("epochs", [5, 10, 20], "log", None),  # epochs are read on a log scale
    ("width", [16, 32, 64], "linear", None),
    ("width", [1e-3, 1e-1], "log", None),  # spans 100x
    ("epochs", ["a", "b"], "linear", ["a", "b"]),  # categorical: labelled ticks
])
def test_sweep_figure_axes(tmp_path, factor, values, xscale, ticks):
    summaries = [_gap_summary(1e-3 * (i + 1)) for i in range(len(values))]
    fig = figures.sweep_figure(factor, values, summaries)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xscale() == xscale and ax.get_xlabel() == factor
        if ticks:
            assert [t.get_text() for t in ax.get_xticklabels()] == ticks
    assert fig.axes[0].get_yscale() == "log"  # gaps
    gap_lines = {c.get_label(): c.lines[0].get_ydata() for c in fig.axes[0].containers}
    assert list(gap_lines["warm-start gap"]) == pytest.approx([1e-3 * (i + 1) for i in
                                                               range(len(values))])
    path = report.plot_sweep(factor, values, summaries, tmp_path / "s.png")
    assert path.is_file()


def _reading_summary(pbrf_p, pbrf_s, gaps):
    return Summary.from_dict({"correlations": {"pbrf": {"pearson": pbrf_p, "spearman": pbrf_s},
                                               "cold": {"pearson": 0.2, "spearman": 0.1}},
                              "decomposition": {"gaps": dict(zip(GAPS, gaps))}})


@pytest.mark.parametrize("p, s, gaps, agreement, finding, solver", [
    (0.98, 0.99, [1e-2, 3e-3, 8e-3, 2e-5, 1e-7], "close", "paper", False),
    (0.95, 0.96, [1e-2, 3e-3, 8e-3, 5e-3, 1e-7], "close", "unlike", False),
    (0.5, 0.4, [1e-2, 3e-3, 8e-3, 2e-3, 4e-3], "poor", "unlike", True),
    (0.6, 0.95, [1e-2, 3e-3, 8e-3, 2e-5, 1e-7], "ranks", "paper", False),
    (0.8, 0.5, [1e-2, 3e-3, 8e-3, 2e-5, 1e-7], "moderate", "paper", False),
])
def test_how_to_read_follows_the_measured_numbers(p, s, gaps, agreement, finding, solver):
    summary = _reading_summary(p, s, gaps)
    assert sections.pbrf_agreement(summary) == agreement
    assert sections.gap_finding(summary) == (finding, solver)
    reading = report.how_to_read(summary).split("**This run.**")[1]
    big, small = max(gaps[:3]), max(gaps[3:])
    for number in (f"{p:.3f}", f"{s:.3f}", "0.200", report.fmt_value(big), GAPS[0]):
        assert number in reading
    if finding == "paper":
        assert f"{big / small:.0f}" in reading
    else:
        assert report.fmt_value(small) in reading


def test_how_to_read_without_the_whole_chain():
    partial = Summary.from_dict({"decomposition": {"gaps": {"proximity gap": 1e-3}}})
    assert sections.pbrf_agreement(partial) is None
    assert sections.gap_finding(partial) == ("partial", False)
    assert "**This run.**" in report.how_to_read(partial)
    nothing = Summary.from_dict({})
    assert sections.gap_finding(nothing) == (None, False)
    assert "**This run.**" not in report.how_to_read(nothing)


def test_decomposition_figure_without_a_gap_says_so(tmp_path):
    summary = {"correlations": {}, "decomposition": {"gaps": {"proximity gap": None}}}
    ax = figures.decomposition_figure(summary).axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert labels.count(report.NA) == len(GAPS)  # every bar is marked missing
    assert len(labels) == len(GAPS) + 1  # and one note says why the axes are empty
    report.write_report(tmp_path, summary, {"pbrf": np.zeros((2, 3))}, {})
    assert (tmp_path / "figures" / "decomposition.png").is_file()


def test_sweep_trends_direction_and_error_bar_separation(tmp_path):
    # three values x three seeds; the warm-start gap grows and its bars separate
    per_value = [[_gap_summary(w + d) for d in (-1e-4, 0.0, 1e-4)] for w in (1e-3, 2e-3, 4e-3)]
    t = report.sweep_trends([1, 2, 3], per_value)
    warm = t["warm-start gap"]
    assert warm["direction"] == "increases" and warm["separated"] is True
    assert warm["means"] == pytest.approx([1e-3, 2e-3, 4e-3])
    assert warm["stds"][0] == pytest.approx(1e-4)
    # a gap that does not move: non-monotone noise, bars overlap
    noisy = [[_gap_summary(1e-3, lin=v) for v in vals] for vals in
             ((1e-6, 3e-6, 2e-6), (2e-6, 1e-6, 3e-6), (1.5e-6, 2.5e-6, 2e-6))]
    lin = report.sweep_trends([1, 2, 3], noisy)["linearisation error"]
    assert lin["separated"] is False
    single = report.sweep_trends([1, 2], [_gap_summary(1e-3), _gap_summary(2e-3)])
    assert single["warm-start gap"]["separated"] is None
    assert report.plot_sweep("width", [1, 2, 3], per_value, tmp_path / "s.png").is_file()
    assert report.plot_sweep("width", [1, 2], [{}, {}], tmp_path / "empty.png").is_file()


def test_table_labels_sweep_runs_with_preset_and_value(tmp_path, capsys):
    summary = {"experiment": {"name": "digits-mlp", "profile": "tiny"},
               "correlations": {"pbrf": {"pearson": 0.5, "spearman": 0.4}}}
    runs = [tmp_path / "sweep" / "damping=0.01", tmp_path / "plain"]
    for run in runs:
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(summary))
    assert cli.main(["table", *map(str, runs)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]  # header, rule, then one row per run
    assert len(rows) == 2
    assert rows[0].startswith("digits-mlp (tiny) damping=0.01")
    assert rows[1].startswith("digits-mlp (tiny) ") and "damping" not in rows[1]
    assert rows[0].split()[-2:] == ["0.500", "0.400"]  # PBRF P, S
    assert cli._table_label(Path("x"), {}) == "x"


def test_sweep_several_factors_and_seeds(tmp_path):
    from ..cli.test_cli import CHEAP, TINY, pbrf_cmd

    out = tmp_path / "sweep"
    proc = pbrf_cmd("sweep", "digits-mlp", *TINY, *CHEAP, "--factor", "damping", "--values",
                    "0.1,1", "--factor", "width", "--values", "8,16", "--seeds", "2",
                    "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "sweep-damping.png").is_file() and (out / "sweep-width.png").is_file()
    seeds = sorted(p.name for p in (out / "width=8").iterdir() if p.is_dir())
    assert seeds == ["seed=0", "seed=1"]
    cfg = json.loads((out / "width=8" / "seed=1" / "config.json").read_text())
    assert cfg["train"]["seed"] == 1 and cfg["model"]["options"]["width"] == 8
    text = (out / "sweep.md").read_text()
    for factor, values in (("damping", ["0.1", "1"]), ("width", ["8", "16"])):
        section = text.split(f"## {factor}\n", 1)[1]
        gaps = md_rows(section, "### Mean gaps")
        assert list(gaps) == values and all(len(cells) == len(GAPS) for cells in gaps.values())
        assert all(" ± " in c for cells in gaps.values() for c in cells if c != report.NA)
        corr = md_rows(section, "### Influence vs response")
        assert list(corr) == values
        moved = section.split("### How each gap moved", 1)[1].split("\n\n")[1].splitlines()
        assert [line.split(":")[0] for line in moved] == [f"- {g}" for g in GAPS]
        assert all(f"with {factor}" in line for line in moved)
    bad = pbrf_cmd("sweep", "digits-mlp", *TINY, "--factor", "damping", "--values", "0.1",
                   "--factor", "width", cwd=tmp_path)
    assert bad.returncode == 2 and "one --values per --factor" in bad.stderr

