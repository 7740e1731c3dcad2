"""Base training on the embedded digits data: accuracy and bit-identical reruns."""

import torch

import pbrf
from pbrf.data import load
from pbrf.models import build

RECIPE = pbrf.Recipe(optimizer="sgd", lr=0.05, momentum=0.9, epochs=20, batch_size=64,
                     schedule="cosine", seed=3)


def _train():
    ds = load("digits")
    model = build("mlp", seed=0, in_shape=(1, 8, 8), n_outputs=10, width=64, depth=2)
    result = pbrf.train(model, pbrf.tasks.Classification(), (ds.x_train, ds.y_train), RECIPE,
                        weight_decay=1e-3, progress=False)
    with torch.no_grad():
        acc = (result.model(ds.x_test).argmax(1) == ds.y_test).double().mean().item()
    return result, acc


def test_digits_mlp_accuracy_and_bit_identical_reruns():
    a, acc = _train()
    b, _ = _train()
    assert acc > 0.95, acc
    assert a.params.keys() == b.params.keys()
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not a.diagnostics["diverged"]
