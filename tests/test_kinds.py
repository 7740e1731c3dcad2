"""The response-kind registry: a new kind is one record, and it runs through respond, the
pipeline and the report without touching any other file."""

from __future__ import annotations

import json

import pytest
import torch

import pbrf
from pbrf import kinds, objectives
from pbrf.experiment import analysis, report
from pbrf.experiment.config import load_preset
from pbrf.experiment.run import driver as pipeline

from .conftest import tiny_problem

#: The toy kind: the proximal response at half the damping (one record, nothing else).
TOY = kinds.ResponseKind(
    name="half-proximal",
    label="half-damped proximal",
    colour="#a6761d",
    short="Half-prox",
    objective=lambda prob, damping: objectives.proximal_objective(prob, damping / 2),
)


@pytest.fixture
def toy():
    kinds.register(TOY)
    yield TOY
    kinds.unregister(TOY.name)


def test_builtin_records_drive_the_old_constants():
    assert pbrf.KINDS == ("cold", "warm", "proximal", "pbrf", "linearized")
    assert kinds.chain() == analysis.KINDS == ("cold", "warm", "proximal", "pbrf", "linearized",
                                               "influence")
    assert (
        report.KIND_COLORS["pbrf"] == "#e7298a" and analysis.KIND_LABELS["cold"] == "cold-start LOO"
    )
    assert report.TABLE_KINDS == ("cold", "warm", "proximal", "pbrf")
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(kinds.get("pbrf"))
    with pytest.raises(ValueError, match="built-in"):
        kinds.unregister("pbrf")
    with pytest.raises(ValueError, match="objective"):
        kinds.ResponseKind("bad", "bad", "#000000")


def test_toy_kind_through_respond(toy):
    prob = tiny_problem("regression")
    groups = [[0], [3, 4]]
    # a large damping: the optimum lies near θ^s and Newton needs few steps (from 0.2 it needs 12)
    out = pbrf.respond(prob, toy.name, groups, damping=2.0, progress=False)
    same = pbrf.respond(prob, "proximal", groups, damping=1.0, progress=False)
    assert out.kind == toy.name and all(out.certified)
    # the same objective (proximal starts from its continuation, the toy from θ^s): both certified
    torch.testing.assert_close(out.params_flat, same.params_flat, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="paired"):
        pbrf.respond(prob, toy.name, groups, paired=True, progress=False)
    kinds.unregister(toy.name)
    with pytest.raises(ValueError, match="Unknown response kind"):
        pbrf.respond(prob, toy.name, groups, progress=False)
    kinds.register(toy)


def test_toy_kind_through_pipeline_and_report(toy, tmp_path):
    cfg = load_preset(
        "digits-mlp", "tiny", ['responses.kinds=["influence", "pbrf", "half-proximal"]']
    )
    assert cfg.responses.ordered_kinds() == ("influence", "pbrf", "half-proximal")
    run_dir = tmp_path / "toy"
    summary = pipeline.run_experiment(cfg, run_dir, progress=False)
    assert set(summary["correlations"]) == {"influence", "pbrf", "half-proximal"}
    assert summary["certificates"]["by_kind"]["half-proximal"]["excludes_uncertified"] is True
    assert (
        summary["certificates"]["by_kind"]["half-proximal"]["certified"] == cfg.removals.n_removals
    )
    assert (
        json.loads((run_dir / "summary.json").read_text())["correlations"]["half-proximal"][
            "pearson"
        ]
        > 0.5
    )
    text = (run_dir / "report.md").read_text()
    assert "| half-damped proximal |" in text
    assert "half-damped proximal" in report.print_summary(summary)
    assert (run_dir / "figures" / "scatter.png").is_file()
