"""Tests for pbrf.experiment.report: files, PNGs, JSON round trip, markdown content, tables,
atomic writes and n/a rendering. Expected strings are formatted here, independently."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from pbrf.experiment import analysis as A
from pbrf.experiment import report as R
from pbrf.experiment.report import figures as F

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOISE = {"cold": 3e-2, "warm": 1.5e-2, "proximal": 5e-3, "pbrf": 1e-3, "linearized": 2e-4,
         "influence": 0.0}
CONFIG = {"dataset": "digits", "model": "mlp", "n_train": 512, "n_test": 6, "n_removals": 9,
          "damping": 1e-3, "recipe": {"optimizer": "sgd", "lr": 0.05}}  # fmt: skip


def make_dm(seed=0, shape=(6, 9), kinds=A.KINDS):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape) * 1e-2
    return {k: base + rng.normal(size=shape) * NOISE[k] for k in kinds}


def make_df(seed=0, shape=(9, 6, 3)):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=shape) * (NOISE[k] + 1e-4) for k in A.KINDS}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One report written once for the read-only tests below."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    dm = make_dm()
    diagnostics = {"pbrf": {"diverged": 0, "nan": 2, "grad_norm": 3.5e-6}}
    summary = A.summarise(dm, make_df(), diagnostics=diagnostics)
    path = R.write_report(run_dir, summary, dm, CONFIG, title="Digits MLP")
    return run_dir, summary, dm, path


def assert_png(path: Path, min_kb: float = 10):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_kb * 1024, f"{path} is suspiciously small ({len(data)} bytes)"
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.05, f"{path} is (nearly) blank"


def table_blocks(markdown: str) -> list[list[str]]:
    blocks, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


# --------------------------------------------------------------------------- write_report


def test_write_report_writes_all_files_and_valid_pngs(run):
    run_dir, _, _, path = run
    assert path == run_dir / "report.md"
    for name in ("summary.json", "report.md"):
        assert (run_dir / name).is_file()
    for name in ("decomposition", "scatter", "correlations"):
        assert_png(run_dir / "figures" / f"{name}.png")


def test_decomposition_figure_is_wider_with_output_panel(tmp_path):
    dm = make_dm()
    with_df = R.plot_decomposition(A.summarise(dm, make_df()), tmp_path / "a.png")
    without = R.plot_decomposition(A.summarise(dm), tmp_path / "b.png")
    assert mpimg.imread(with_df).shape[1] > 1.5 * mpimg.imread(without).shape[1]


def test_no_temporary_files_left(run):
    run_dir = run[0]
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []


def test_summary_json_round_trips(run):
    run_dir, summary, _, _ = run
    loaded = json.loads((run_dir / "summary.json").read_text())
    assert loaded == summary
    assert (
        loaded["decomposition"]["gaps"]["proximity gap"]
        == summary["decomposition"]["gaps"]["proximity gap"]
    )


def test_report_contains_gaps_numbers_config_and_links(run):
    run_dir, summary, _, _ = run
    text = (run_dir / "report.md").read_text()
    assert text.startswith("# Digits MLP")
    dec = summary["decomposition"]
    for gap in A.GAPS:
        assert gap in text
        for key in ("gaps", "signed", "output_gaps"):
            assert f"{dec[key][gap]:.3e}" in text
    assert f"{dec['total']:.3e}" in text
    assert f"{dec['telescoping_residual']:.3e}" in text
    for kind in ("cold", "warm", "proximal", "pbrf", "linearized"):
        row = next(
            line for line in text.splitlines() if line.startswith(f"| {A.KIND_LABELS[kind]} |")
        )
        corr = summary["correlations"][kind]
        for key in ("pearson", "spearman", "pearson_per_test", "spearman_per_test"):
            assert f"{corr[key]:.3f}" in row
    for key in ("dataset", "model", "n_train", "n_removals", "damping", "recipe.optimizer"):
        assert f"`{key}`" in text
    assert "| `damping` | 0.001 |" in text
    for name in ("decomposition", "scatter", "correlations"):
        assert f"(figures/{name}.png)" in text
    assert "## Diagnostics" in text and "grad_norm" in text and "3.5e-06" in text
    assert "increases the test loss" in text


def test_experiment_section_shows_facts_and_nested_headline_config(tmp_path):
    dm = make_dm()
    summary = A.summarise(dm)
    summary["experiment"] = {"name": "digits-mlp", "n_train": 1297, "n_params": 4810}
    config = {"data": {"name": "digits", "n_train": 1297},
              "influence": {"damping": 0.01, "solver": "lissa"},
              "train": {"weight_decay": 1e-3, "lr": 0.05}}  # fmt: skip
    R.write_report(tmp_path, summary, dm, config)
    text = (tmp_path / "report.md").read_text()
    experiment = text.split("## Experiment")[1].split("\n## ")[0]
    expected = ["| `name` | digits-mlp |", "| `n_params` | 4810 |", "| `n_test` | 6 |",
                "| `n_removals` | 9 |",
                "| `influence.damping` | 0.01 |", "| `influence.solver` | lissa |",
                "| `train.weight_decay` | 0.001 |"]  # fmt: skip
    for line in expected:
        assert line in experiment
    # duplicate / not headline
    assert "data.n_train" not in experiment and "train.lr" not in experiment
    configuration = text.split("## Configuration")[1]
    assert "| `train.lr` | 0.05 |" in configuration and "| `data.name` | digits |" in configuration


def test_report_tables_are_well_formed(run):
    text = (run[0] / "report.md").read_text()
    blocks = table_blocks(text)
    assert len(blocks) >= 4  # config, correlations, decomposition, diagnostics
    for block in blocks:
        counts = {unescaped_pipes(line) for line in block}
        assert len(counts) == 1, f"ragged markdown table: {block}"


def test_telescoping_line_for_full_partial_and_broken_chains(tmp_path):
    full = A.summarise(make_dm())
    dec = full["decomposition"]
    text = R.render_markdown(full, {}, "t", {}, tmp_path)
    assert f"Σ signed gaps = {sum(dec['signed'].values()):.3e}" in text
    assert f"mean(Δm_cold − Δm_influence) = {dec['total_signed']:.3e}" in text
    # no cold: warm ... influence still telescopes
    partial = A.summarise(make_dm(kinds=A.KINDS[1:]))
    signed = partial["decomposition"]["signed"]
    text = R.render_markdown(partial, {}, "t", {}, tmp_path)
    assert "Telescoping check (warm-start LOO → influence)" in text
    assert f"Σ signed gaps = {sum(v for v in signed.values() if v is not None):.3e}" in text
    broken = A.summarise(make_dm(kinds=("warm", "pbrf", "influence")))
    assert "Telescoping check: n/a" in R.render_markdown(broken, {}, "t", {}, tmp_path)


def test_report_without_influence_or_cold_skips_scatter(tmp_path):
    dm = make_dm(kinds=("warm", "proximal", "pbrf", "linearized"))
    summary = A.summarise(dm)
    R.write_report(tmp_path, summary, dm, {})
    assert not (tmp_path / "figures" / "scatter.png").exists()
    assert not (tmp_path / "figures" / "correlations.png").exists()
    assert_png(tmp_path / "figures" / "decomposition.png")
    text = (tmp_path / "report.md").read_text()
    assert "scatter.png" not in text
    row = next(line for line in text.splitlines() if line.startswith("| warm-start gap |"))
    assert row.count("n/a") == 3  # mean, signed, output-space
    assert "No configuration recorded" in text


# --------------------------------------------------------------------------- atomicity


def test_failed_summary_write_keeps_old_file(tmp_path, monkeypatch):
    dm = make_dm()
    R.write_report(tmp_path, A.summarise(dm), dm, CONFIG)
    old = (tmp_path / "summary.json").read_bytes()
    calls = []

    def fsync_then_fail(fd):  # report.md goes through, summary.json fails after its data is written
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", fsync_then_fail)
    dm2 = make_dm(seed=1)
    with pytest.raises(OSError, match="simulated"):
        R.write_report(tmp_path, A.summarise(dm2), dm2, CONFIG)
    assert len(calls) == 2
    assert (tmp_path / "summary.json").read_bytes() == old
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_failed_replace_and_failed_figure_leave_nothing_half_written(tmp_path, monkeypatch):
    dm = make_dm()
    R.write_report(tmp_path, A.summarise(dm), dm, CONFIG)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_MAGIC)  # a partial PNG ...
        raise RuntimeError("renderer crashed (simulated)")  # ... then failure

    monkeypatch.setattr(F.Figure, "savefig", broken_savefig)
    dm2 = make_dm(seed=2)
    with pytest.raises(RuntimeError, match="simulated"):
        R.write_report(tmp_path, A.summarise(dm2), dm2, CONFIG)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_failed_os_replace_leaves_no_tmp(tmp_path, monkeypatch):
    def no_replace(src, dst):
        raise PermissionError("simulated")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(PermissionError):
        R.write_report(tmp_path, A.summarise(make_dm()), make_dm(), CONFIG)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------- n/a rendering


def nan_summary():
    dm = make_dm()
    summary = A.summarise(dm)
    summary["correlations"]["pbrf"]["pearson"] = float("nan")
    summary["correlations"]["warm"]["spearman"] = None
    summary["decomposition"]["gaps"]["proximity gap"] = float("nan")
    summary["decomposition"]["signed"]["proximity gap"] = float("inf")
    summary["diagnostics"] = {"steps": 10, "residual": float("nan")}
    return dm, summary


def test_nan_and_none_render_as_na(tmp_path):
    dm, summary = nan_summary()
    R.write_report(tmp_path, summary, dm, {"damping": float("nan")})
    text = (tmp_path / "report.md").read_text()
    assert not re.search(r"\bnan\b|\binf\b", text, flags=re.IGNORECASE)
    pbrf_row = next(line for line in text.splitlines() if line.startswith("| PBRF |"))
    assert pbrf_row.split("|")[2].strip() == "n/a"
    prox_row = next(line for line in text.splitlines() if line.startswith("| proximity gap |"))
    assert [c.strip() for c in prox_row.split("|")[3:5]] == ["n/a", "n/a"]
    assert "- `residual`: n/a" in text
    assert "Σ signed gaps = n/a" in text  # a signed gap is missing
    loaded = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: NaN -> null
    assert loaded["correlations"]["pbrf"]["pearson"] is None
    assert loaded["decomposition"]["signed"]["proximity gap"] is None
    assert_png(tmp_path / "figures" / "decomposition.png")
    outputs = [
        R.print_summary(summary),
        R.format_table([("x", summary)]),
        R.format_table_text([("x", summary)]),
    ]
    for out in outputs:
        assert "n/a" in out and "nan" not in out.lower()


def test_formatters():
    assert R.fmt_corr(0.93449) == "0.934"
    assert R.fmt_corr(float("nan")) == R.fmt_corr(None) == R.fmt_corr("x") == "n/a"
    assert R.fmt_value(1.23456e-4) == "1.235e-04"
    assert R.fmt_value(float("inf")) == "n/a"
    assert R.fmt_value(0.0) == "0.000e+00"


# --------------------------------------------------------------------------- tables across runs


def test_format_table_has_each_run_and_its_numbers():
    runs = [("MLP | digits", A.summarise(make_dm(0))), ("CNN cifar", A.summarise(make_dm(1)))]
    table = R.format_table(runs)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(runs)
    assert "LOO P" in lines[0] and "PBRF S" in lines[0] and "Proximal P" in lines[0]
    for (name, summary), line in zip(runs, lines[2:]):
        assert name.replace("|", "\\|") in line
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[2:-1]]
        expected = [f"{summary['correlations'][k][m]:.3f}" for k in ("cold", "warm", "proximal",
            "pbrf")
                    for m in ("pearson", "spearman")]  # fmt: skip
        assert cells == expected
    assert len({unescaped_pipes(line) for line in lines}) == 1


def test_format_table_accepts_bare_correlations_and_missing_kinds():
    corr = A.correlations(make_dm()["influence"], make_dm(kinds=("pbrf", "influence")))
    table = R.format_table([("only pbrf", corr)])
    row = table.splitlines()[2]
    assert row.count("n/a") == 6 and f"{corr['pbrf']['pearson']:.3f}" in row


def test_format_table_text_is_aligned():
    runs = [("a", A.summarise(make_dm(0))), ("a much longer name", A.summarise(make_dm(1)))]
    text = R.format_table_text(runs)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[3].startswith("a much longer name")
    assert f"{runs[1][1]['correlations']['pbrf']['spearman']:.3f}" in lines[3]


def test_print_summary_is_compact_and_complete():
    summary = A.summarise(make_dm())
    text = R.print_summary(summary)
    assert len(text.splitlines()) < 25
    for gap in A.GAPS:
        assert gap in text
        assert f"{summary['decomposition']['gaps'][gap]:.3e}" in text
    for kind in A.RESPONSE_KINDS:
        assert A.KIND_LABELS[kind] in text
        assert f"{summary['correlations'][kind]['pearson']:.3f}" in text


# --------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("values", [[1e-4, 1e-3, 1e-2], [8, 16, 32], ["sgd", "adam", "sgd+cosine"]])
def test_plot_sweep_writes_png(tmp_path, values):
    summaries = [A.summarise(make_dm(seed)) for seed in range(len(values))]
    path = R.plot_sweep("factor", values, summaries, tmp_path / "sub" / "sweep.png")
    assert path == tmp_path / "sub" / "sweep.png"
    assert_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["sweep.png"]


def test_plot_sweep_tolerates_missing_values_and_checks_lengths(tmp_path):
    partial = A.summarise(make_dm(kinds=("pbrf", "linearized", "influence")))
    nan = nan_summary()[1]
    assert_png(R.plot_sweep("damping", [1e-3, 1e-2], [partial, nan], tmp_path / "s.png"))
    with pytest.raises(ValueError, match="one summary per value"):
        R.plot_sweep("damping", [1, 2, 3], [partial], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_writing_figures_does_not_import_pyplot(tmp_path):
    """The report uses the object API only, so it never switches a user's pyplot backend."""
    code = (
        "import sys, numpy as np\n"
        "from pbrf.experiment import analysis as A, report as R\n"
        "dm = {k: np.random.default_rng(0).normal(size=(3, 4)) for k in A.KINDS}\n"
        f"R.write_report({str(tmp_path)!r}, A.summarise(dm), dm, {{}})\n"
        "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'clean')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "clean"
    assert_png(tmp_path / "figures" / "scatter.png")
