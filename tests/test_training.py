"""pbrf.train (determinism, seeds, no mutation, diagnostics) and checkpoints (exact, atomic)."""

from __future__ import annotations

import pytest
import torch

import pbrf
from pbrf.training import load_checkpoint, save_checkpoint, train

from .conftest import tiny_problem

MINIBATCH = pbrf.Recipe(optimizer="sgd", lr=0.05, momentum=0.9, steps=20, batch_size=4, seed=0)


def _data(kind="classification"):
    p = tiny_problem(kind)
    return p, p.model, p.task, (p.x, p.t)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_is_bit_identical_and_seeds_differ():
    _, model, task, data = _data()
    a = train(model, task, data, MINIBATCH, weight_decay=1e-2, progress=False)
    b = train(model, task, data, MINIBATCH, weight_decay=1e-2, progress=False)
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    c = train(model, task, data, MINIBATCH.replace(seed=1), weight_decay=1e-2, progress=False)
    assert max(float((a.params[k] - c.params[k]).abs().max()) for k in a.params) > 1e-6
    # full batch: the seed only orders minibatches, so it does not matter
    fb = MINIBATCH.replace(batch_size=None)
    d = train(model, task, data, fb, weight_decay=1e-2, progress=False)
    e = train(model, task, data, fb.replace(seed=5), weight_decay=1e-2, progress=False)
    assert all(torch.equal(d.params[k], e.params[k]) for k in d.params)


def test_train_does_not_mutate_model_and_returns_consistent_copy():
    prob, model, task, data = _data()
    before = _state(model)
    res = train(model, task, data, MINIBATCH, weight_decay=1e-2, progress=False)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.model is not model
    for name, p in res.model.named_parameters():
        assert torch.equal(p.detach(), res.params[name])
        assert p.dtype == torch.float64
    # it trained
    assert max(float((res.params[k] - before[k]).abs().max()) for k in res.params) > 1e-4
    # training decreases the objective J(θ) = (1/N) Σ L + (wd/2)||θ||², and the diagnostics report
    # it exactly
    p_res = pbrf.Problem(res.model, task, data, weight_decay=1e-2)
    before_obj = float(pbrf.Problem(model, task, data, weight_decay=1e-2).objective())
    assert float(p_res.objective()) < before_obj
    assert res.diagnostics["objective"] == pytest.approx(float(p_res.objective()), rel=1e-12)
    assert res.diagnostics["steps"] == 20 and res.diagnostics["diverged"] is False
    assert res.recipe == MINIBATCH and res.weight_decay == 1e-2
    # TrainResult.problem remembers the recipe (the default for warm / cold starts)
    assert res.problem(task, data).recipe == MINIBATCH


def test_train_full_batch_sgd_matches_manual_gradient_descent():
    """Full-batch heavy-ball SGD, PyTorch convention: m ← μ m + ∇J, θ ← θ − lr m."""
    prob, model, task, data = _data("regression")
    recipe = pbrf.Recipe(optimizer="sgd", lr=0.1, momentum=0.5, steps=5, batch_size=None)
    res = train(model, task, data, recipe, weight_decay=1e-2, progress=False)
    theta, m = prob.theta.clone(), torch.zeros_like(prob.theta)
    for _ in range(5):
        g = torch.autograd.functional.jacobian(
            lambda th: prob.task.loss(prob.outputs_flat(th, prob.x),
                                      prob.t).mean() + 5e-3 * th.pow(2).sum(), theta)
        m = 0.5 * m + g
        theta = theta - 0.1 * m
    flat = torch.cat([res.params[n].reshape(-1) for n in prob.names])
    torch.testing.assert_close(flat, theta, rtol=1e-12, atol=1e-14)


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    _, model, task, data = _data()
    res = train(model, task, data, MINIBATCH, weight_decay=1e-2, progress=False)
    meta = {"recipe": res.recipe.to_dict(), "weight_decay": 1e-2, "note": "θ^s"}
    path = tmp_path / "ckpt" / "model.safetensors"
    out = save_checkpoint(path, res.params, meta)
    assert out == path and path.exists()
    params, meta2 = load_checkpoint(path)
    assert meta2 == meta
    assert params.keys() == res.params.keys()
    for k in params:
        assert params[k].dtype == res.params[k].dtype and torch.equal(params[k], res.params[k])
    assert pbrf.Recipe.from_dict(meta2["recipe"]) == res.recipe
    # overwrite in place; no temporary files are left behind
    save_checkpoint(path, {k: v + 1 for k, v in res.params.items()}, {"v": 2})
    params3, meta3 = load_checkpoint(path)
    assert meta3 == {"v": 2} and torch.equal(params3[next(iter(params3))],
                                             res.params[next(iter(params3))] + 1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]
    # a Problem built from the loaded parameters has θ^s = the trained parameters
    prob = pbrf.Problem(model, task, data, weight_decay=1e-2, params=params)
    assert torch.equal(prob.theta, pbrf.Problem(res.model, task, data).theta)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def _saved(path):
    params, meta = load_checkpoint(path)
    return {k: v.clone() for k, v in params.items()}, meta


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"a": torch.zeros(3)}, {"v": 1})
    with pytest.raises(TypeError):  # meta not JSON-serialisable
        save_checkpoint(path, {"a": torch.ones(3)}, {"v": object()})
    params, meta = _saved(path)
    assert meta == {"v": 1} and torch.equal(params["a"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_failed_tensor_write_does_not_half_update_checkpoint(tmp_path, monkeypatch):
    import pbrf.training as training

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"a": torch.zeros(3)}, {"v": 1})

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(training, "save_file", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(path, {"a": torch.ones(3)}, {"v": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    params, meta = _saved(path)
    assert torch.equal(params["a"], torch.zeros(3))
    assert meta == {"v": 1}  # not {"v": 2} next to the old parameters


def test_train_rejects_non_recipe():
    _, model, task, data = _data()
    with pytest.raises(TypeError, match="Recipe"):
        train(model, task, data, {"lr": 0.1}, progress=False)
