"""``pbrf reproduce``: the paper's table and factor studies end to end (on tiny stand-in tables),
resume without recomputation, ``--only``, validation before anything is written, the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import pbrf
from pbrf import cli
from pbrf.experiment import ConfigError, load_preset, report
from pbrf.experiment.run import single
from pbrf.experiment.run.dryrun import dry_run
from pbrf.experiment.run.inputs import prepare_inputs
from pbrf.experiment.studies import reproduce

from ..cli.test_cli import pbrf_cmd
from ..report.test_run_report import table_blocks

# The smallest runs that fill every part of the report: the table rows run the paper's three
# response functions (cold, warm, PBRF) on 60 training points, 2 removals and a well-conditioned
# damping; the factor studies need only the cheap kinds (their sections, trends and figures do
# not depend on which ran), two values (a direction) and two seeds (error bars).
SMALL = ("data.n_train=60", "removals.n_removals=2", "removals.n_test_points=3",
         "run.chunk_size=2")
TABLE_SETS = ('responses.kinds=["cold", "warm", "pbrf", "linearized", "influence"]', *SMALL,
              "influence.damping=0.1")  # digits-binary's 1e-3 makes its Newton runs slow
FACTOR_SETS = ('responses.kinds=["linearized", "influence"]', *SMALL, "train.epochs=10")
TINY_STUDY = {"preset": "digits-mlp", "profile": "tiny", "seeds": 2, "sets": FACTOR_SETS,
              "values": {"width": [8, 12], "damping": [0.1, 1.0]}}


# The stand-in rows' labels in the report: the preset's name and the activation its config builds.
LABELS = {"digits-mlp (GELU)": "digits-mlp", "digits-binary (GELU)": "digits-binary"}


def _tiny_tables(mp) -> None:
    """Stand-in tables on presets whose tiny profiles exist (digits), few removals."""
    mp.setattr(reproduce, "TABLE_ROWS", ("digits-mlp", "digits-binary"))
    mp.setitem(reproduce.TABLE_PROFILES, "tiny", {"profile": "tiny", "sets": TABLE_SETS})
    mp.setitem(reproduce.FACTOR_STUDIES, "tiny", TINY_STUDY)


def _command(out: Path, *extra: str) -> list[str]:
    return ["reproduce", "--profile", "tiny", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``pbrf reproduce --profile tiny`` on the stand-in tables (2 rows, 2 factors x 2 values
    x 2 seeds).
    """
    out = tmp_path_factory.mktemp("reproduce") / "out"
    with pytest.MonkeyPatch.context() as mp:
        _tiny_tables(mp)
        assert cli.main(_command(out)) == 0
    return out


def _figure_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def _time_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(("| table:", "| factor:"))
            or ln.startswith("Total wall time")]


def _table(text: str, column: str) -> dict[str, dict]:
    """The markdown table with a column ``column``, as ``{first cell: {column: cell}}``."""
    for block in table_blocks(text):
        header = [c.strip() for c in block[0].strip("|").split("|")]
        if column in header:
            rows = [dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))
                    for row in block[2:]]
            return {r[header[0]]: r for r in rows}
    raise AssertionError(f"no table with a column {column!r}")


def test_reproduce_writes_table_factors_figures_and_times(smoke):
    path = smoke / "reproduction.md"
    text = path.read_text()
    assert f"`pbrf reproduce --profile tiny --out {smoke}`" in text  # the command that made it
    assert f"pbrf {pbrf.__version__}" in text
    # the table in the paper's layout: one row per architecture, each cell from its summary.json
    rows = _table(text, "PBRF P")
    assert set(rows) == set(LABELS)
    for label, row in rows.items():
        name = LABELS[label]
        for col in ("cold-start LOO P", "warm-start LOO S", "PBRF P", "warm-start (paired) S",
                    "proximal P"):
            assert col in row
        summary = json.loads((smoke / "table" / name / "summary.json").read_text())
        corr = summary["correlations"]
        assert row["PBRF P"] == report.fmt_corr(corr["pbrf"]["pearson"])
        assert row["cold-start LOO S"] == report.fmt_corr(corr["cold"]["spearman"])
    # certification counts, summed from the rows' certificates
    certified = _table(text, "PBRF certified")
    for label, row in certified.items():
        name = LABELS[label]
        cert = json.loads((smoke / "table" / name / "summary.json").read_text())["certificates"]
        pbrf_cert = cert["by_kind"]["pbrf"]
        assert row["PBRF certified"].startswith(f"{pbrf_cert['certified']} of ")
    assert set(certified) == set(LABELS)
    # the settings, read from each row's config.json
    settings = _table(text, "responses.tol")
    config = json.loads((smoke / "table" / "digits-mlp" / "config.json").read_text())
    assert settings["digits-mlp (GELU)"]["N"] == str(config["data"]["n_train"])
    assert settings["digits-mlp (GELU)"]["model"].startswith(config["model"]["name"])
    assert reproduce.VARIANT_NOTE in text
    # the factor studies: one section and one figure per factor
    for factor in ("width", "damping"):
        assert f"### {factor}" in text
        assert f"img/reproduction/factor-{factor}.png" in text
    links = _figure_links(text)
    assert len(links) == 4  # two decompositions, two factors
    for link in links:
        assert not Path(link).is_absolute()
        assert (path.parent / link).is_file(), link
    # the wall times
    record = json.loads((smoke / "reproduce.json").read_text())
    assert set(record["table"]) == {"digits-mlp", "digits-binary"}
    assert all(e["seconds"] > 0 for e in record["table"].values())
    assert set(record["factors"]) == {"width", "damping"}
    assert len(record["factors"]["width"]["runs"]) == 4
    assert reproduce.part_seconds(record["factors"]["width"]) > 0 and record["total_seconds"] > 0
    assert len(_time_lines(text)) == 5 and "n/a" not in "".join(_time_lines(text))
    # the sweep's own outputs
    assert (smoke / "factors" / "sweep.md").is_file()
    seeds = json.loads((smoke / "factors" / "width=8" / "seed=1" / "config.json").read_text())
    assert seeds["train"]["seed"] == 1 and seeds["model"]["options"]["width"] == 8


def test_second_invocation_recomputes_nothing_and_keeps_the_times(smoke, monkeypatch):
    record = json.loads((smoke / "reproduce.json").read_text())
    before = _time_lines((smoke / "reproduction.md").read_text())
    tasks, trained, runs = [], [], []
    real_tasks, real_train = single._run_tasks, pbrf.train
    real_run = reproduce._default_run

    def count_tasks(executor, ctx, todo, store, progress):
        tasks.append(len(todo))
        return real_tasks(executor, ctx, todo, store, progress)

    def count_train(*args, **kwargs):
        trained.append(1)
        return real_train(*args, **kwargs)

    def count_runs(config, run_dir, **kwargs):
        runs.append(run_dir)
        return real_run(config, run_dir, **kwargs)

    monkeypatch.setattr(single, "_run_tasks", count_tasks)
    monkeypatch.setattr(pbrf, "train", count_train)
    monkeypatch.setattr(reproduce, "_default_run", count_runs)
    _tiny_tables(monkeypatch)
    assert cli.main(_command(smoke)) == 0
    assert len(runs) == 2 + 2 * 2 * 2  # every run is visited (and resumes)
    assert not trained and not any(tasks)  # ... but nothing is computed
    again = json.loads((smoke / "reproduce.json").read_text())
    assert again["table"] == record["table"] and again["factors"] == record["factors"]
    assert _time_lines((smoke / "reproduction.md").read_text()) == before


def test_only_table_runs_no_sweep(smoke, tmp_path, monkeypatch):
    _tiny_tables(monkeypatch)

    def no_sweep(*args, **kwargs):
        raise AssertionError("--only table ran the factor studies")

    monkeypatch.setattr(reproduce, "run_sweep", no_sweep)
    # a finished folder: the report still shows the factor studies computed earlier
    assert cli.main(_command(smoke, "--only", "table", "--report",
                             str(tmp_path / "doc" / "r.md"))) == 0
    text = (tmp_path / "doc" / "r.md").read_text()
    assert "### width" in text and "--only table" in text
    assert all((tmp_path / "doc" / link).is_file() for link in _figure_links(text))
    # a fresh folder: only the table rows run, no factors folder
    canned = json.loads((smoke / "table" / "digits-mlp" / "summary.json").read_text())
    calls = []
    monkeypatch.setattr(reproduce, "_default_run",
                        lambda config, run_dir, **kw: calls.append(run_dir) or canned)
    fresh = tmp_path / "fresh"
    assert cli.main(_command(fresh, "--only", "table")) == 0
    assert [Path(c).name for c in calls] == ["digits-mlp", "digits-binary"]
    assert not (fresh / "factors").exists()
    record = json.loads((fresh / "reproduce.json").read_text())
    assert set(record["table"]) == {"digits-mlp", "digits-binary"} and not record["factors"]
    assert "Not run yet: width, damping" in (fresh / "reproduction.md").read_text()


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_unknown_only_value_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert cli.main(_command(out, "--only", "figures")) == 2
    _one_line_error(capsys, "--only", "figures")
    assert cli.main(["reproduce", "--profile", "laptop", "--out", str(out)]) == 2
    _one_line_error(capsys, "--profile")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_dataset_exits_2_before_anything_runs(tmp_path, capsys, monkeypatch):
    _tiny_tables(monkeypatch)
    monkeypatch.setattr(reproduce, "TABLE_ROWS", ("digits-mlp", "mnist-mlp"))
    monkeypatch.setitem(reproduce.TABLE_PROFILES, "tiny", {"profile": "quick", "sets": ()})
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("PBRF_DATA", str(empty))
    monkeypatch.setattr(reproduce, "_default_run", lambda *a, **k: pytest.fail("a run started"))
    out = tmp_path / "out"
    assert cli.main(_command(out)) == 2
    _one_line_error(capsys, "mnist")
    assert not out.exists()


def test_a_run_directory_of_another_config_is_refused_first(smoke, tmp_path, capsys,
                                                            monkeypatch):
    _tiny_tables(monkeypatch)
    other = dict(TINY_STUDY, sets=FACTOR_SETS + ("train.lr=0.04",))
    monkeypatch.setitem(reproduce.FACTOR_STUDIES, "tiny", other)
    monkeypatch.setattr(reproduce, "_default_run", lambda *a, **k: pytest.fail("a run started"))
    record = (smoke / "reproduce.json").read_text()
    assert cli.main(_command(smoke)) == 2
    _one_line_error(capsys, "--overwrite")
    assert (smoke / "reproduce.json").read_text() == record


def test_fmt_mean_std_with_and_without_seeds():
    single = {"correlations": {"pbrf": {"pearson": 0.91234}},
              "decomposition": {"gaps": {"solver error": 1e-3}}}
    assert report.fmt_mean_std(single, "correlations.pbrf.pearson") == "0.912"
    assert report.fmt_mean_std(single, "correlations.cold.pearson") == "n/a"
    many = {"correlations": {"pbrf": {"pearson": 0.9, "pearson_std": 0.05}},
            "decomposition": {"gaps": {"solver error": 1e-3},
                              "gaps_std": {"solver error": 2e-4}},
            "theta_s": {"test_metric": 0.5, "test_metric_std": 0.01}}
    assert report.fmt_mean_std(many, "correlations.pbrf.pearson") == "0.900 ± 0.050"
    assert report.fmt_mean_std(many, "decomposition.gaps.solver error",
                               report.fmt_value) == "1.000e-03 ± 2.000e-04"
    assert report.mean_std(many, "theta_s.test_metric") == (0.5, 0.01)


def test_the_plan_is_data():
    assert reproduce.TABLE_ROWS == ("mnist-mlp", "cifar10-lenet", "cifar10-alexnet",
                                    "cifar10-vgg13", "cifar10-resnet20")
    assert set(reproduce.ACCEPTANCE) == set(reproduce.TABLE_ROWS)
    for profile in reproduce.PROFILES:
        study = reproduce.FACTOR_STUDIES[profile]
        assert set(study["values"]) == set(cli.SWEEP_FACTORS)
        assert all(len(v) >= 3 for v in study["values"].values()) and study["seeds"] >= 2
        assert profile in reproduce.TABLE_PROFILES


def test_each_cnn_row_is_followed_by_its_literal_relu_max_pool_variant():
    """Every CIFAR-10 row builds a smooth variant and is followed, in every profile, by a run of
    its literal variant (ReLU, and max-pooling where the architecture pools that way): same
    preset, profile and sizes, only the activation and pooling differ; the MLP has none."""
    assert set(reproduce.LITERAL) == set(reproduce.TABLE_ROWS) - {"mnist-mlp"}
    for profile in reproduce.PROFILES:
        rows = reproduce.table_rows(profile)
        keys = [r for r, _, _ in rows]
        assert keys[0] == "mnist-mlp" and len(keys) == 9
        for smooth in reproduce.LITERAL:
            literal = smooth + reproduce.LITERAL_SUFFIX
            assert keys.index(literal) == keys.index(smooth) + 1
            base = reproduce._row_config(smooth, profile, [])
            lit = reproduce._row_config(smooth, profile, [], dict(
                (r, v) for r, _, v in rows)[literal])
            assert lit.model.options["activation"] == "relu"
            assert base.model.options["activation"] == "gelu"
            pooled = "max" if smooth != "cifar10-resnet20" else "avg"
            assert lit.model.options["pooling"] == pooled
            strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "model"}  # noqa: E731
            assert strip(lit) == strip(base)
            assert reproduce.row_label(literal, lit).endswith(
                "; ReLU, max-pool)" if pooled == "max" else "; ReLU, avg-pool)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(reproduce.TABLE_PROFILES, "cpu", {"profile": "cpu", "sets": (),
                                                     "literal": False})
        assert [r for r, _, _ in reproduce.table_rows("cpu")] == list(reproduce.TABLE_ROWS)


def test_row_labels_say_the_variant_their_config_builds():
    """The CIFAR-10 rows build GELU + average pooling by default and say so; the literal ReLU /
    max-pool variant is one ``--set`` away and is labelled as such.
    """
    label = reproduce.row_label
    assert label("cifar10-lenet", load_preset("cifar10-lenet", "cpu")) == (
        "LeNet (CIFAR-10; GELU, avg-pool)")
    literal = load_preset("cifar10-lenet", "cpu", ["model.activation=relu", "model.pooling=max"])
    assert label("cifar10-lenet", literal) == "LeNet (CIFAR-10; ReLU, max-pool)"
    for row in ("cifar10-alexnet", "cifar10-vgg13", "cifar10-resnet20"):
        for profile in reproduce.PROFILES:
            assert label(row, load_preset(row, profile)).endswith("; GELU, avg-pool)")
    assert label("mnist-mlp", load_preset("mnist-mlp", "cpu")) == "MLP (MNIST; GELU)"
    assert label("cifar10-vgg13", None) == "VGG13 (CIFAR-10)"  # a row whose config is unknown
    assert label("digits-mlp", load_preset("digits-mlp", "tiny")) == "digits-mlp (GELU)"


def _real_tiny_profiles_missing() -> str | None:
    try:
        load_preset("cifar10-lenet", "tiny")
    except ConfigError as err:
        return f"the presets have no tiny profile for the table rows yet ({err})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_real_tiny_profiles_missing() is not None,
                    reason=str(_real_tiny_profiles_missing()))
def test_reproduce_tiny_with_the_real_tables(tmp_path, monkeypatch):
    """The real ``pbrf reproduce --profile tiny``, cheaply: (1) its plan — every table row and every
    factor-study run resolves and its data load, nothing written; (2) every row's architecture
    through the heavy operations of a run, up to its tiny size (the ``--dry-run`` probes:
    Gauss–Newton and Newton products, per-example gradients, a stacked training step); (3) the
    command end to end on one real row (LeNet, its tiny profile as is) and the real factor studies
    (their sets and first values, one seed, the cheap kinds). The full-size command takes many
    minutes; the stand-in smoke test above covers the report's every part on several seeds and
    values.
    """
    out = tmp_path / "out"
    plan = reproduce.plan_reproduction("tiny", out)  # check_data: each run's data and model
    assert not out.exists()
    assert [row for row, _, _ in plan.rows] == [r for r, _, _ in reproduce.table_rows("tiny")]
    assert [fp.factor for fp in plan.sweep.factors] == list(cli.SWEEP_FACTORS)
    study = reproduce.FACTOR_STUDIES["tiny"]
    assert all(len(cfgs) == int(study["seeds"]) for fp in plan.sweep.factors for cfgs in fp.configs)
    for row, config, _ in plan.rows:
        if row.endswith(reproduce.LITERAL_SUFFIX):
            continue  # the same sizes as its smooth row
        probe = dry_run(config, prepare_inputs(config))
        assert all(probe["probe_peak_bytes"][k] > 0 for k in ("gauss_newton", "newton_product",
                                                             "per_example_grads", "training_step"))
        assert probe["estimated_total_seconds"] > 0, row

    row = "cifar10-lenet"
    monkeypatch.setattr(reproduce, "TABLE_ROWS", (row,))
    monkeypatch.setitem(reproduce.FACTOR_STUDIES, "tiny", {
        **study, "seeds": 1, "values": {f: v[:1] for f, v in study["values"].items()},
        "sets": (*study.get("sets", ()), 'responses.kinds=["linearized", "influence"]')})
    assert cli.main(_command(out)) == 0
    text = (out / "reproduction.md").read_text()
    lines = text.splitlines()
    smooth, literal = (next(i for i, ln in enumerate(lines) if ln.startswith(f"| {name} |"))
                       for name in ("LeNet (CIFAR-10; GELU, avg-pool)",
                                    "LeNet (CIFAR-10; ReLU, max-pool)"))
    assert literal == smooth + 1  # the literal variant's line right below the smooth one's
    assert "not run" not in lines[smooth] and "not run" not in lines[literal]
    certified = _table(text, "PBRF certified")
    for name, key in (("LeNet (CIFAR-10; GELU, avg-pool)", row),
                      ("LeNet (CIFAR-10; ReLU, max-pool)", row + reproduce.LITERAL_SUFFIX)):
        cert = json.loads((out / "table" / key / "summary.json").read_text())["certificates"]
        assert certified[name]["PBRF certified"].startswith(
            f"{cert['by_kind']['pbrf']['certified']} of ")
    lit_cfg = json.loads((out / "table" / (row + reproduce.LITERAL_SUFFIX) / "config.json")
                         .read_text())
    assert lit_cfg["model"]["options"]["activation"] == "relu"
    summary = json.loads((out / "table" / row / "summary.json").read_text())
    assert "test_metric_std" in summary["theta_s"]  # the profile's two seeds, aggregated
    for factor in cli.SWEEP_FACTORS:
        assert f"### {factor}" in text
    assert all((out / link).is_file() for link in _figure_links(text))
    record = json.loads((out / "reproduce.json").read_text())
    assert set(record["table"]) == {row, row + reproduce.LITERAL_SUFFIX}
    assert set(record["factors"]) == set(cli.SWEEP_FACTORS)


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--only" in out and "--report" in out and "cpu" in out


def test_record_keeps_only_the_planned_runs(tmp_path, monkeypatch):
    _tiny_tables(monkeypatch)
    plan = reproduce.plan_reproduction("tiny", tmp_path / "out", check_data=False)
    entry = {"seconds": 2.0}
    record = {"table": {"digits-mlp": entry, "gone": entry},
              "factors": {"width": {"runs": {"width=8/seed=0": entry, "width=99/seed=0": entry}},
                          "depth": {"runs": {"depth=1/seed=0": entry}}}}
    kept = reproduce._current(plan, record)
    assert kept["table"] == {"digits-mlp": entry}
    assert kept["factors"] == {"width": {"runs": {"width=8/seed=0": entry}}}
    assert reproduce.part_seconds(kept["factors"]["width"]) == 2.0
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_table_and_factors_run_side_by_side_keep_each_others_times(tmp_path, monkeypatch):
    """``--only table`` and ``--only factors`` in two processes share ``reproduce.json``: each
    adds its entries to the record as it is on disk, not to the one it read at its start.
    """
    _tiny_tables(monkeypatch)
    out = tmp_path / "out"
    factors = reproduce.plan_reproduction("tiny", out, only="factors", check_data=False)
    table = reproduce.plan_reproduction("tiny", out, only="table", check_data=False)
    calls = []

    def fake(config, run_dir, **kwargs):
        if not calls:  # the other command finishes its part while this one runs
            reproduce.run_reproduction(table, run=lambda *a, **k: {})
        calls.append(run_dir)
        return {}

    reproduce.run_reproduction(factors, run=fake)
    record = reproduce.read_record(out)
    assert set(record["table"]) == set(reproduce.TABLE_ROWS)
    assert set(record["factors"]) == set(TINY_STUDY["values"])
    assert record["total_seconds"] == pytest.approx(sum(
        reproduce.part_seconds(e) for e in [*record["table"].values(),
                                            *record["factors"].values()]))


# ---------------------------------------------------------------- --report checked before any work
def _report_cases(tmp: Path) -> dict[str, str]:
    (tmp / "folder").mkdir()
    (tmp / "a-file").write_text("keep me\n")
    return {
        "folder": str(tmp / "folder"),  # an existing folder
        "slash": str(tmp / "new-folder") + "/",  # a folder, by its trailing separator
        "under-a-file": str(tmp / "a-file" / "reproduction.md"),  # a folder that cannot be made
        "img-is-a-file": str(tmp / "a-file").replace("a-file", "img-parent") + "/r.md",
        "record": str(tmp / "out" / reproduce.RECORD_NAME),  # would overwrite the wall times
        "out-itself": str(tmp / "out"),  # not a folder yet, but the runs will make it one
    }


@pytest.mark.parametrize("case", ["folder", "slash", "under-a-file", "img-is-a-file", "record",
                                  "out-itself"])
def test_report_path_is_refused_before_any_run(tmp_path, case):
    """Through the real entry point: exit 2, one line naming --report, no traceback, nothing
    written (the report path used to be checked only after every run, minutes later).
    """
    report_path = _report_cases(tmp_path)[case]
    if case == "img-is-a-file":  # the report's folder is fine, but its img/ is a file
        (tmp_path / "img-parent").mkdir()
        (tmp_path / "img-parent" / "img").write_text("not a folder\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = pbrf_cmd("reproduce", "--profile", "tiny", "--only", "table", "--no-progress",
                    "--out", str(tmp_path / "out"), "--report", report_path, cwd=tmp_path,
                    timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "--report" in lines[0], lines
    assert "table row" not in proc.stdout  # nothing ran
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "a-file").read_text() == "keep me\n"
