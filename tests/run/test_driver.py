"""Experiment configs, presets and the pipeline on tiny real runs (digits, embedded)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
import torch

import pbrf
import pbrf.models
from pbrf.experiment.config import (
    KINDS,
    ConfigError,
    ExperimentConfig,
    list_presets,
    load_config,
    load_preset,
    resolve,
)
from pbrf.experiment.run import driver as pipeline
from pbrf.experiment.run.executors import LocalExecutor
from pbrf.experiment.run.store import Store

PRESETS = (
    "digits-mlp", "mnist-mlp", "fashion-mnist-mlp", "concrete-mlp", "energy-mlp", "cifar10-lenet",
    "cifar10-alexnet", "cifar10-vgg13", "cifar10-resnet20", "mnist-autoencoder",
        "shakespeare-transformer",
    "digits-binary",
)  # fmt: skip


# ---------------------------------------------------------------------------- configs
def test_all_presets_exist_with_quick_and_paper_profiles():
    presets = list_presets()
    assert set(PRESETS) <= set(presets)
    for name in PRESETS:
        assert presets[name], f"{name} has no description"
        quick, paper = load_preset(name, "quick"), load_preset(name, "paper")
        assert quick.name == name and quick.profile == "quick" and paper.profile == "paper"
        assert quick.run.device == "cpu", f"{name}: the quick profile must run on CPU"
        assert quick.removals.n_removals <= paper.removals.n_removals


def test_preset_models_build_with_their_kwargs():
    """Every preset's [model] table is accepted by pbrf.models (shape arguments come from
    the data).
    """
    for name in PRESETS:
        cfg = load_preset(name, "quick")
        assert cfg.model.name in pbrf.models.MODELS
        import inspect

        params = inspect.signature(pbrf.models.MODELS[cfg.model.name]).parameters
        assert set(cfg.model.options) <= set(params), f"{name}: {cfg.model.options}"


def test_responses_embed_the_recipe_fields():
    """``[responses]`` takes every field of pbrf.Recipe and of pbrf.NewtonRecipe (declared there
    once); ``steps`` is the Newton ``max_iter``, ``responses.seed`` the stream of the response seed.
    """
    import dataclasses

    from pbrf.newton import NewtonOptions
    from pbrf.optim import RecipeFields

    names = {f.name for f in dataclasses.fields(pbrf.experiment.config.ResponsesConfig)}
    assert {f.name for f in dataclasses.fields(RecipeFields)} <= names
    assert {f.name for f in dataclasses.fields(NewtonOptions)} <= names
    cfg = load_preset("digits-binary", "tiny", ["responses.forcing=0.2", "responses.steps=7"])
    assert cfg.responses.recipe_dict() == {**pbrf.NewtonRecipe(max_iter=7, forcing=0.2).to_dict(),
                                           "optimizer": "newton"}
    sets = ["responses.optimizer=adam", "responses.beta2=0.99", "responses.epochs=2"]
    first = load_preset("digits-binary", "tiny", sets)
    assert first.responses.recipe_dict()["beta2"] == 0.99
    assert first.responses.recipe_dict()["epochs"] == 2 and first.responses.steps is None
    with pytest.raises(ConfigError, match="responses.forcing"):
        load_preset("digits-binary", "tiny", ["responses.forcing=2.0"])
    seeds = {pipeline.response_seed(load_preset("digits-binary", "tiny", [f"responses.seed={s}"]))
             for s in (0, 1)}
    assert len(seeds) == 2


def test_config_json_roundtrip():
    cfg = load_preset("digits-binary", "tiny", ["removals.group_fraction=0.05"])
    back = ExperimentConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg and back.fingerprint() == cfg.fingerprint()


def test_set_overrides_are_typed():
    cfg = load_preset("digits-mlp", "tiny", [
        "influence.damping=1e-2", "model.width=32", "train.weight_decay=0",
            "removals.strategy=top-influence",
        'responses.kinds=["pbrf", "influence"]', "train.steps=7",
    ])  # fmt: skip
    assert cfg.influence.damping == 0.01 and cfg.model.options["width"] == 32
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.removals.strategy == "top-influence"
    assert cfg.responses.kinds == ("pbrf", "influence")
    assert cfg.train.steps == 7 and cfg.train.epochs is None  # steps replaces the epochs budget


@pytest.mark.parametrize(
    "item, message",
    [
        ("influence.dampin=1", "unknown --set key 'influence.dampin'"),
        ("bogus.x=1", "no section 'bogus'"),
        ("influence.damping=abc", "influence.damping must be a float"),
        ("removals.n_removals=2.5", "removals.n_removals must be an int"),
        ("model.width=1.5", "model.width must be an int"),
        ("model.nope=3", "unknown --set key 'model.nope'"),
        ("influence.solver=newton", "influence.solver: must be one of lissa, cg, exact"),
        ('responses.kinds=["pbrf"]', 'must include "influence"'),
        ("train.lr=-1", "train.lr: must be a finite number > 0"),
        ("damping", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_field(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        load_preset("digits-mlp", "quick", [item])
    assert "\n" not in str(err.value)


def test_unknown_preset_and_profile():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*pbrf presets"):
        resolve("nope")
    with pytest.raises(ConfigError, match="no profile 'huge'"):
        load_preset("digits-mlp", "huge")


def test_toml_config_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'task = "classification"\n[data]\nname = "digits"\nn_train = 100\n[model]\nname = '
        '"mlp"\nwidth = 8\n'
        '[train]\nepochs = 2\n[removals]\nn_test_points = 3\nn_removals = 4\n'
        '[profiles.tiny.removals]\nn_removals = 2\n'
    )
    cfg = resolve(str(path), "quick")
    assert cfg.name == "mine" and cfg.removals.n_removals == 4 and cfg.model.options == {"width": 8}
    assert resolve(str(path), "tiny").removals.n_removals == 2
    path.write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(path))
    path.write_text("[dat]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['dat'\]"):
        resolve(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_section_validation():
    with pytest.raises(ConfigError, match="group_fraction or group_size, not both"):
        load_preset("digits-mlp", "tiny", ["removals.group_fraction=0.1", "removals.group_size=3"])
    assert load_preset("digits-mlp", "tiny",
                       ["removals.group_fraction=0.1"]).removals.resolved_group_size(200) == 20


# ----------------------------------------------------------------------- removal choices and seeds
def test_chunk_seed_is_a_pure_function():
    assert pipeline.chunk_seed(0, 3) == pipeline.chunk_seed(0, 3)
    seeds = {pipeline.chunk_seed(s, c) for s in range(3) for c in range(20)}
    assert len(seeds) == 60 and all(0 <= s < 2**31 for s in seeds)


def test_random_groups_are_deterministic_and_sized():
    cfg = load_preset("digits-mlp", "tiny", ["removals.n_removals=50"])
    a, b = pipeline.random_groups(cfg, 200), pipeline.random_groups(cfg, 200)
    assert a == b and len(a) == 50 and len({g[0] for g in a}) == 50
    cfg = load_preset("digits-mlp", "tiny", ["removals.group_fraction=0.05"])
    groups = pipeline.random_groups(cfg, 200)
    assert all(len(g) == 10 and len(set(g)) == 10 for g in groups)


def test_top_influence_groups_pick_the_largest_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 100))
    cfg = load_preset("digits-mlp", "tiny",
                      ["removals.strategy=top-influence", "removals.n_removals=5"])
    singles = pipeline.top_influence_groups(cfg, scores)
    expected = np.argsort(-np.abs(scores).mean(0))[:5]
    assert [g[0] for g in singles] == list(expected)
    cfg = load_preset("digits-mlp", "tiny",
                      ["removals.strategy=top-influence", "removals.group_size=3"])
    groups = pipeline.top_influence_groups(cfg, scores)
    assert groups[0] == sorted(np.argsort(-scores[0])[:3].tolist())  # most positive on test point 0
    assert groups[4] == sorted(np.argsort(scores[0])[:3].tolist())  # then the most negative


# ---------------------------------------------------------------------------- tiny real runs
class CountingExecutor(LocalExecutor):
    """The local executor, remembering which tasks it was given."""

    def __init__(self):
        self.tasks = []

    def run(self, ctx, tasks):
        self.tasks.extend(tasks)
        yield from super().run(ctx, tasks)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("exp") / "tiny"
    cfg = load_preset("digits-mlp", "tiny")
    executor = CountingExecutor()
    summary = pipeline.run_experiment(cfg, run_dir, executor=executor, progress=False)
    return cfg, run_dir, summary, executor.tasks


def _stored_dm(run_dir, cfg):
    ctx_chunks = -(-cfg.removals.n_removals // cfg.run.chunk_size)
    with Store(run_dir, readonly=True) as store:
        return {k: store.gather(k, ctx_chunks)[0] for k in KINDS}


def test_run_writes_every_output(tiny_run):
    cfg, run_dir, summary, tasks = tiny_run
    for name in ("config.json", "theta_s.safetensors", "results.sqlite", "report.md",
                 "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "figures").glob("*.png"))
    assert len(tasks) == 6 * 2  # six kinds x two chunks of four removals
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["n_test"] == 5 and on_disk["n_removals"] == 8
    assert set(on_disk["correlations"]) == set(KINDS)
    for entry in on_disk["correlations"].values():
        assert -1 <= entry["pearson"] <= 1
    assert ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == cfg
    removals = json.loads((run_dir / "removals.json").read_text())
    with Store(run_dir, readonly=True) as store:
        assert removals["test_index"] == store.get_array("test_index").tolist()
    assert len(removals["removals"]) == 8
    assert np.load(run_dir / "test_index.npy").tolist() == removals["test_index"]
    assert np.load(run_dir / "influence_scores.npy").shape == (5, 8)


def test_stored_shapes(tiny_run):
    cfg, run_dir, _, _ = tiny_run
    with Store(run_dir, readonly=True) as store:
        for kind in KINDS:
            dm, df, diags = store.gather(kind, 2)
            assert dm.shape == (5, 8) and df.shape == (8, 5, 10) and len(diags) == 8
            assert np.isfinite(dm).all()


def test_signed_gaps_telescope_on_stored_arrays(tiny_run):
    cfg, run_dir, summary, _ = tiny_run
    dm = _stored_dm(run_dir, cfg)
    steps = sum(dm[KINDS[j]] - dm[KINDS[j + 1]] for j in range(len(KINDS) - 1))
    np.testing.assert_allclose(steps, dm["cold"] - dm["influence"], rtol=0, atol=1e-12)
    dec = summary["decomposition"]
    assert sum(dec["signed"].values()) == pytest.approx(dec["total_signed"], rel=1e-9, abs=1e-15)
    assert dec["telescoping_residual"] < 1e-12


def test_linearized_kind_is_the_exact_influence(tiny_run):
    """The stored linearised-PBRF Δm equals pbrf.influence with the exact solver on the same
    points.
    """
    cfg, run_dir, _, _ = tiny_run
    ctx = pipeline.load_context(run_dir)
    scores = pbrf.influence(
        ctx.problem,
        ctx.test,
        [g for g in ctx.groups],
        damping=cfg.influence.damping,
        solver="exact",
        solver_options=dict(cfg.influence.accurate_options),
    )
    dm = _stored_dm(run_dir, cfg)
    np.testing.assert_allclose(dm["linearized"], scores.double().numpy(), rtol=1e-3, atol=1e-6)
    # and the influence (practical LiSSA) estimate is close to it but not identical
    assert np.corrcoef(dm["linearized"].ravel(), dm["influence"].ravel())[0, 1] > 0.5


def test_finished_run_recomputes_nothing(tiny_run):
    cfg, run_dir, summary, _ = tiny_run
    executor = CountingExecutor()
    again = pipeline.run_experiment(cfg, run_dir, executor=executor, progress=False)
    assert executor.tasks == []
    assert again == summary


def test_resume_recomputes_only_missing_chunks_and_matches(tiny_run, tmp_path):
    cfg, run_dir, summary, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for name in ("summary.json", "report.md"):
        (copy / name).unlink()
    conn = sqlite3.connect(copy / "results.sqlite")
    with conn:
        conn.execute("DELETE FROM chunks WHERE chunk = 1 OR (chunk = 0 AND kind = 'pbrf')")
    conn.close()
    executor = CountingExecutor()
    resumed = pipeline.run_experiment(cfg, copy, executor=executor, progress=False)
    assert sorted(executor.tasks) == sorted([(0, "pbrf")] + [(1, k) for k in KINDS])
    assert json.loads((copy / "summary.json").read_text()) == json.loads(
        (run_dir / "summary.json").read_text()
    )
    assert resumed == summary


def test_group_removals_are_additive(tmp_path):
    """Groups of 5% of the data: linearised Δm of a group = sum of its members' exact influence."""
    cfg = load_preset(
        "digits-mlp",
        "tiny",
        ["removals.group_fraction=0.05", 'responses.kinds=["linearized", "influence"]'],
    )
    summary = pipeline.run_experiment(cfg, tmp_path / "g", progress=False)
    assert summary["experiment"]["group_size"] == 10
    ctx = pipeline.load_context(tmp_path / "g")
    assert all(len(g) == 10 for g in ctx.groups)
    singles = (
        pbrf.influence(
            ctx.problem,
            ctx.test,
            torch.arange(ctx.problem.n_train),
            damping=cfg.influence.damping,
            solver="exact",
            solver_options=dict(cfg.influence.accurate_options),
        )
        .double()
        .numpy()
    )
    expected = np.stack([singles[:, g].sum(1) for g in ctx.groups], axis=1)
    with Store(tmp_path / "g", readonly=True) as store:
        dm = store.gather("linearized", 2)[0]
    np.testing.assert_allclose(dm, expected, rtol=1e-3, atol=1e-6)


def test_top_influence_strategy_stores_all_train_scores(tmp_path):
    cfg = load_preset(
        "digits-mlp",
        "tiny",
        ["removals.strategy=top-influence", 'responses.kinds=["linearized", "influence"]'],
    )
    pipeline.run_experiment(cfg, tmp_path / "t", progress=False)
    with Store(tmp_path / "t", readonly=True) as store:
        scores, groups = store.get_array("train_scores"), store.get_array("groups")
    assert scores.shape == (5, 200)
    assert [g[0] for g in groups] == list(np.argsort(-np.abs(scores).mean(0), kind="stable")[:8])


def test_config_errors_write_nothing(tmp_path):
    cfg = load_preset("digits-mlp", "tiny", ["removals.n_test_points=500"])
    with pytest.raises(ConfigError, match="n_test_points=500 exceeds the 50 test examples"):
        pipeline.run_experiment(cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_switching_solver_drops_the_old_solver_options():
    cfg = load_preset("digits-mlp", "quick", ["influence.solver=lissa"])
    assert cfg.influence.solver == "lissa" and cfg.influence.solver_options == {}
    cfg = load_preset(
        "digits-mlp", "quick", ["influence.solver=lissa", "influence.solver_options={depth = 10}"]
    )
    assert cfg.influence.solver_options == {"depth": 10}


def test_unknown_solver_option_is_a_config_error_before_writing(tmp_path):
    # depth is LiSSA's
    cfg = load_preset("digits-mlp", "tiny", ["influence.solver_options={depth = 10}"])
    with pytest.raises(ConfigError, match="'depth' is not an option of solver 'cg'"):
        pipeline.run_experiment(cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_evaluate_maps_train_scores_onto_groups():
    from pbrf.experiment.bench.evaluate import EvaluateError, map_scores

    scores = np.arange(12, dtype=float).reshape(2, 6)
    mapped, layout = map_scores(scores, [[0, 2], [5]], n_train=6)
    assert layout == "train"
    np.testing.assert_array_equal(mapped, [[0 + 2, 5], [6 + 8, 11]])
    same, layout = map_scores(scores[:, :2], [[0, 2], [5]], n_train=6)
    assert layout == "removals" and same is not None
    with pytest.raises(EvaluateError, match=r"\[2, 2\].*\[2, 6\]"):
        map_scores(scores[:, :4], [[0, 2], [5]], n_train=6)


DATA = os.environ.get("PBRF_DATA")


@pytest.mark.skipif(
    not DATA or not os.path.isdir(DATA), reason="PBRF_DATA (the dataset mirror) is not available"
)
def test_every_quick_preset_loads_its_data_and_builds_its_model():
    for name in PRESETS:
        cfg = load_preset(name, "quick")
        inputs = pipeline.prepare_inputs(cfg)
        model = pipeline.build_model(cfg, inputs.model_kwargs, seed=0)
        x = inputs.dataset.x_train[:2]
        # token ids stay integers
        x = x.to(getattr(torch, cfg.run.dtype)) if x.is_floating_point() else x
        assert model(x).shape[0] == 2, name


def test_a_second_process_on_the_same_run_dir_is_refused(tiny_run):
    import fcntl

    cfg, run_dir, _, _ = tiny_run
    with open(pipeline.lock_path(run_dir), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = (
            "import sys; from pbrf.experiment import config\n"
            "from pbrf.experiment.run import driver as pipeline\n"
            f"cfg = config.load_preset('digits-mlp', 'tiny')\n"
            f"try:\n    pipeline.run_experiment(cfg, {str(run_dir)!r}, progress=False)\n"
            "except config.ConfigError as e:\n    print(e)\n"
        )
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        ).stdout
    assert "another pbrf process is running" in out


def test_a_run_computes_with_tf32_off_and_restores_it(tmp_path, monkeypatch):
    """On CUDA, TF32 rounds float32 matmuls and convolutions to ~1e-3, which would blur the 1/N
    effects a run measures: θ^s's training and every chunk (also in a Ray worker, a process of
    its own) compute with it off; the caller's setting is restored afterwards."""
    from pbrf.experiment.run import chunks, context

    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    seen = []

    def flags(where):
        seen.append((where, cuda.allow_tf32, cudnn.allow_tf32))

    train, chunk = context.train_theta, chunks._compute_chunk
    monkeypatch.setattr(context, "train_theta",
                        lambda *a, **k: (flags("train"), train(*a, **k))[1])
    monkeypatch.setattr(chunks, "_compute_chunk",
                        lambda *a, **k: (flags("chunk"), chunk(*a, **k))[1])
    saved = (cuda.allow_tf32, cudnn.allow_tf32)  # backend flags: set and restored by hand
    cuda.allow_tf32 = cudnn.allow_tf32 = True
    try:
        cfg = load_preset("digits-mlp", "tiny", ['responses.kinds=["linearized", "influence"]'])
        pipeline.run_experiment(cfg, tmp_path / "r", progress=False)
        assert {w for w, _, _ in seen} == {"train", "chunk"}
        assert all(not a and not b for _, a, b in seen)
        assert cuda.allow_tf32 and cudnn.allow_tf32
        seen.clear()  # a chunk computed by itself (what a Ray worker runs) switches it off too
        with Store(tmp_path / "r") as store:
            ctx = context.setup(pipeline.prepare_inputs(cfg), tmp_path / "r", store, False)
            chunks.compute_chunk(ctx, 0, "influence")
        assert seen[-1] == ("chunk", False, False) and cuda.allow_tf32 and cudnn.allow_tf32
    finally:
        cuda.allow_tf32, cudnn.allow_tf32 = saved
