"""Tasks: closed-form output Hessians and Bregman divergences against autograd references."""

import pytest
import torch
from torch.func import grad, hessian

from pbrf import tasks

torch.manual_seed(0)


def _cases():
    B = 4
    return [
        (tasks.Regression(), torch.randn(B, 3, dtype=torch.float64),
         torch.randn(B, 3, dtype=torch.float64)),
        (tasks.Reconstruction(), torch.randn(B, 6, dtype=torch.float64),
         torch.randn(B, 1, 2, 3, dtype=torch.float64)),
        (tasks.Classification(), torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 5, (B,))),
        (tasks.BinaryClassification(), torch.randn(B, 1, dtype=torch.float64),
         torch.randint(0, 2, (B,)).double()),
        (tasks.BinaryClassification(), torch.randn(B, dtype=torch.float64),
         torch.randint(0, 2, (B,)).double()),
        (tasks.LanguageModel(), torch.randn(B, 3, 4, dtype=torch.float64),
         torch.randint(0, 4, (B, 3))),
    ]


@pytest.mark.parametrize("task,f,t", _cases(),
                         ids=lambda c: repr(c) if isinstance(c, tasks.Task) else "")
def test_output_hvp_equals_autograd_hessian(task, f, t):
    v = torch.randn_like(f)
    for b in range(f.shape[0]):
        H = hessian(lambda fb: task.loss(fb.unsqueeze(0), t[b : b + 1]).sum())(f[b])
        Hv = (H.reshape(f[b].numel(), -1) @ v[b].reshape(-1)).reshape(f[b].shape)
        got = task.output_hvp(f[b : b + 1], t[b : b + 1], v[b : b + 1])[0]
        torch.testing.assert_close(got, Hv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("task,f,t", _cases(),
                         ids=lambda c: repr(c) if isinstance(c, tasks.Task) else "")
def test_bregman_equals_definition(task, f, t):
    f_ref = f + 0.7 * torch.randn_like(f)
    got = task.bregman(f, f_ref, t)
    for b in range(f.shape[0]):
        L = lambda ff: task.loss(ff.unsqueeze(0), t[b : b + 1]).sum()  # noqa: E731
        expected = L(f[b]) - L(f_ref[b]) - (grad(L)(f_ref[b]) * (f[b] - f_ref[b])).sum()
        torch.testing.assert_close(got[b], expected, rtol=1e-9, atol=1e-12)
    assert (got >= -1e-12).all()
    torch.testing.assert_close(task.bregman(f, f, t), torch.zeros(f.shape[0], dtype=f.dtype),
                               atol=1e-12, rtol=0)


def test_default_output_hvp_matches_closed_form():
    f, t, v = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 4, (3,)), torch.randn(3, 4,
        dtype=torch.float64)
    closed = tasks.Classification().output_hvp(f, t, v)
    generic = tasks.Task.output_hvp(tasks.Classification(), f, t, v)
    torch.testing.assert_close(generic, closed, rtol=1e-10, atol=1e-12)


def test_get_task_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="classification"):
        tasks.get_task("nope")
    assert isinstance(tasks.get_task("binary"), tasks.BinaryClassification)
