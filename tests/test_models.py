"""Tests for pbrf.models: shapes, parameter counts, torch.func compatibility, initialisation,
the CNNs' activation and pooling options.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

import pbrf
from pbrf.data import DataError, load
from pbrf.models import (
    DATA_ARGUMENTS,
    MODELS,
    build,
    count_parameters,
    reinitialize,
    variant_label,
)

F64 = torch.float64

# name -> (small build kwargs, input maker, target maker, eval mode?)
SMALL = {
    "logistic": dict(in_shape=(1, 4, 4), n_outputs=3),
    "mlp": dict(in_shape=(5,), n_outputs=3, width=[6, 4], activation="tanh"),
    "mlp_gelu": dict(in_shape=(2, 3), n_outputs=2, width=5, depth=3, activation="gelu"),
    "lenet": dict(in_channels=1, n_classes=3, input_size=28, width_mult=0.5),
    "alexnet": dict(in_channels=3, n_classes=3, input_size=16, width_mult=0.125),
    "vgg13": dict(in_channels=3, n_classes=3, input_size=32, width_mult=1 / 16),
    "resnet20": dict(in_channels=3, n_classes=3, width_mult=0.25),
    "resnet20_none": dict(in_channels=3, n_classes=3, width_mult=0.25, norm="none"),
    "resnet20_batch": dict(in_channels=3, n_classes=3, width_mult=0.25, norm="batch"),
    # the smooth variants (and ResNet-20's global max pooling) under torch.func
    "lenet_smooth": dict(in_channels=1, n_classes=3, input_size=28, width_mult=0.5,
                         activation="gelu", pooling="avg"),
    "alexnet_smooth": dict(in_channels=3, n_classes=3, input_size=16, width_mult=0.125,
                           activation="silu", pooling="avg"),
    "resnet20_smooth": dict(in_channels=3, n_classes=3, width_mult=0.25, activation="softplus",
                            pooling="max"),
    "autoencoder": dict(width_mult=0.02, activation="sigmoid"),
    "transformer": dict(vocab_size=7, seq_len=6, d_model=8, n_layers=2, n_heads=2),
}
INPUTS = {
    "logistic": (1, 4, 4),
    "mlp": (5,),
    "mlp_gelu": (2, 3),
    "lenet": (1, 28, 28),
    "alexnet": (3, 16, 16),
    "vgg13": (3, 32, 32),
    "resnet20": (3, 8, 8),
    "autoencoder": (1, 28, 28),
}
N_OUT = {"mlp_gelu": 2, "autoencoder": 784}


def model_name(case: str) -> str:
    return case.split("_")[0]


def make_model(case: str, seed: int = 0, dtype=F64) -> nn.Module:
    model = build(model_name(case), seed=seed, dtype=dtype, **SMALL[case])
    if case == "resnet20_batch":  # non-trivial running statistics, then frozen (pbrf's eval mode)
        with torch.no_grad():
            model(2 * torch.randn(16, 3, 8, 8, dtype=dtype) + 1)
        model.eval()
    return model


def make_data(case: str, n: int = 3, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    if case == "transformer":
        x = torch.randint(0, 7, (n, 5), generator=gen)
        return x, torch.randint(0, 7, (n, 5), generator=gen)
    shape = INPUTS.get(case, INPUTS.get(model_name(case)))
    x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    if case == "autoencoder":
        return x, x.flatten(1)
    return x, torch.randint(0, N_OUT.get(case, 3), (n,), generator=gen)


def per_example_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared error for float targets, else cross-entropy averaged over any position axes."""
    if t.is_floating_point():
        return 0.5 * (out - t).pow(2).flatten(1).sum(1)
    ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1), reduction="none")
    return ce.reshape(t.shape[0], -1).mean(1)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


CASES = list(SMALL)


# ---------------------------------------------------------------- shapes and parameter counts
CIFAR_DEFAULTS = {
    "logistic": (dict(in_shape=(3, 32, 32), n_outputs=10), 30_730),
    "mlp": (dict(in_shape=(3, 32, 32), n_outputs=10), 3072 * 128 + 128 + 128 * 128 + 128 + 1290),
    "lenet": ({}, 62_006),
    "alexnet": ({}, 1_756_426),
    "vgg13": ({}, 9_413_066),
    "resnet20": ({}, 269_722),
}


def test_every_model_declares_its_dataset_arguments():
    """``DATA_ARGUMENTS`` names, for every model, arguments its builder takes."""
    import inspect

    assert set(DATA_ARGUMENTS) == set(MODELS)
    for name, args in DATA_ARGUMENTS.items():
        assert set(args) <= set(inspect.signature(MODELS[name]).parameters), name


@pytest.mark.parametrize("name", list(CIFAR_DEFAULTS))
def test_cifar_defaults_shape_and_count(name):
    kwargs, expected = CIFAR_DEFAULTS[name]
    model = build(name, **kwargs)
    assert count_parameters(model) == expected
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_is_the_027m_network():
    for norm in ("group", "batch", "none"):
        n = count_parameters(build("resnet20", norm=norm))
        assert 260_000 < n < 280_000, (norm, n)
    # 3 stages x 3 blocks x 2 convs + stem = 19 convolutions, + FC = 20 weighted layers
    model = build("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and [c.out_channels for c in convs[::6]] == [16, 16, 32, 64]


def test_autoencoder_shapes_and_count():
    model = build("autoencoder")
    # 784-1000-500-250-30 encoder and its mirror, each layer with a bias
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert count_parameters(model) == sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 784)
        x = torch.rand(2, 784)
        assert torch.equal(model(x), model(x.reshape(2, 1, 28, 28)))


def test_transformer_shape_count_and_causality():
    model = build("transformer", vocab_size=11, seq_len=8, d_model=16, n_layers=2, n_heads=4)
    d, v, t, ff = 16, 11, 8, 64
    block = 2 * 2 * d + 4 * (d * d + d) + (d * ff + ff) + (ff * d + d)
    assert count_parameters(model) == v * d + t * d + 2 * block + 2 * d + d * v + v
    tokens = torch.randint(0, 11, (3, 8))
    with torch.no_grad():
        out = model(tokens)
        assert out.shape == (3, 8, 11)
        changed = tokens.clone()
        changed[:, 5] = (changed[:, 5] + 1) % 11
        out2 = model(changed)
    assert torch.equal(out[:, :5], out2[:, :5])  # the past does not see the future
    assert not torch.allclose(out[:, 5:], out2[:, 5:])
    with pytest.raises(ValueError, match="seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_lenet_on_mnist_and_mlp_depth():
    assert build("lenet", in_channels=1, input_size=28)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    mlp = build("mlp", in_shape=(8,), n_outputs=2, width=4, depth=3)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [4, 4, 4, 2]
    assert count_parameters(build("mlp", in_shape=(8,), n_outputs=2, depth=0)) == 18


def test_width_mult_scales_channels():
    small, big = build("vgg13", width_mult=0.25), build("vgg13", width_mult=1.0)
    assert 10 * count_parameters(small) < count_parameters(big)
    assert build("resnet20", width_mult=0.5).fc.in_features == 32


# ---------------------------------------------------------------- torch.func compatibility
@pytest.mark.parametrize("case", CASES)
def test_per_example_grads_vmap_match_loop(case):
    model = make_model(case)
    x, t = make_data(case)
    params = params_of(model)

    def loss(p, xi, ti):
        return per_example_loss(functional_call(model, p, (xi[None],)), ti[None]).sum()

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)
    for i in range(x.shape[0]):
        li = per_example_loss(model(x[i : i + 1]), t[i : i + 1]).sum()
        ref = torch.autograd.grad(li, list(model.parameters()), allow_unused=True)
        for (name, _), r in zip(model.named_parameters(), ref):
            r = torch.zeros_like(params[name]) if r is None else r
            torch.testing.assert_close(batched[name][i], r, rtol=1e-8, atol=1e-12,
                                       msg=f"{case} {name} {i}")
    assert any(g.abs().sum() > 0 for g in batched.values())


@pytest.mark.parametrize("case", CASES)
def test_vmap_over_stacked_params_matches_calls(case):
    model = make_model(case)
    x, _ = make_data(case)
    copies = [params_of(make_model(case, seed=s)) for s in (1, 2, 3)]
    stacked = {k: torch.stack([c[k] for c in copies]) for k in copies[0]}
    out = vmap(lambda p: functional_call(model, p, (x,)))(stacked)
    for j, p in enumerate(copies):
        torch.testing.assert_close(out[j], functional_call(model, p, (x,)), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out[0], out[1])


def _model_and_tangent(case, seed: int):
    """Model, two examples, its float64 parameters and a random tangent dict (plus the
    generator).
    """
    model = make_model(case)
    x, t = make_data(case, n=2)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=gen, dtype=F64) for k, p in params.items()}
    return model, x, t, params, gen, v


@pytest.mark.parametrize("case", CASES)
def test_forward_mode_jvp_matches_reverse_mode(case):
    """<u, J v> from jvp equals <Jᵀ u, v> from vjp (float64, exact up to rounding)."""
    model, x, _, params, gen, v = _model_and_tangent(case, seed=7)

    def f(p):
        return functional_call(model, p, (x,))

    out, jv = jvp(f, (params,), (v,))
    torch.testing.assert_close(out, f(params))
    u = torch.randn(out.shape, generator=gen, dtype=F64)
    _, pullback = vjp(f, params)
    (jtu,) = pullback(u)
    lhs = (u * jv).sum()
    rhs = sum((jtu[k] * v[k]).sum() for k in params)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)
    assert jv.abs().sum() > 0


@pytest.mark.parametrize("case", CASES)
def test_forward_over_reverse_hvp_matches_double_backward(case):
    model, x, t, params, gen, v = _model_and_tangent(case, seed=8)

    def loss(p):
        return per_example_loss(functional_call(model, p, (x,)), t).sum()

    _, hv = jvp(grad(loss), (params,), (v,))
    # reference: reverse-over-reverse on the module itself
    ps = list(model.parameters())
    g = torch.autograd.grad(per_example_loss(model(x), t).sum(), ps, create_graph=True,
                            allow_unused=True)
    named = model.named_parameters()
    pairs = [(gi, v[n]) for gi, (n, _) in zip(g, named) if gi is not None and gi.requires_grad]
    ref = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in pairs), ps, allow_unused=True)
    for (name, _), r in zip(model.named_parameters(), ref):
        r = torch.zeros_like(params[name]) if r is None else r
        torch.testing.assert_close(hv[name], r, rtol=1e-8, atol=1e-10, msg=f"{case} {name}")


def test_transformer_jvp_matches_finite_differences():
    model = make_model("transformer")
    x, _ = make_data("transformer")
    params = params_of(model)
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=gen, dtype=F64) for k, p in params.items()}

    def f(eps):
        return functional_call(model, {k: params[k] + eps * v[k] for k in params}, (x,))

    _, jv = jvp(lambda p: functional_call(model, p, (x,)), (params,), (v,))
    eps = 1e-6
    fd = (f(eps) - f(-eps)) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["resnet20", "transformer", "mlp"])
def test_float64_end_to_end(name):
    case = name
    model = make_model(case, dtype=F64)
    assert all(p.dtype == F64 for p in model.parameters())
    x, _ = make_data(case)
    assert model(x).dtype == F64
    model32 = make_model(case, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model32.parameters())


# ---------------------------------------------------------------- initialisation
@pytest.mark.parametrize(
    "case", ["mlp", "resnet20", "resnet20_batch", "transformer", "autoencoder"]
)
def test_reinitialize_determinism(case):
    name = model_name(case)
    a = build(name, seed=5, **SMALL[case])
    b = build(name, seed=5, **SMALL[case])
    c = build(name, seed=6, **SMALL[case])
    assert_params_equal(a, b)
    for (k, pa), pc in zip(a.named_parameters(), c.parameters()):
        if pa.numel() > 1 and pa.std() > 0:  # skip constant-initialised (norm weights/biases)
            assert not torch.equal(pa, pc), k
    assert_params_equal(reinitialize(c, 5), a)
    assert_params_equal(reinitialize(a, 5), reinitialize(c, 5))
    before = params_of(c)
    d = reinitialize(c, 9)
    assert d is not c and all(torch.equal(before[k], p) for k, p in c.named_parameters())


def test_reinitialize_keeps_dtype_mode_and_resets_buffers():
    model = build("resnet20", seed=1, dtype=F64, **SMALL["resnet20_batch"])
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8, dtype=F64) + 3)
    model.eval()
    fresh = reinitialize(model, 1)
    assert not fresh.training and all(p.dtype == F64 for p in fresh.parameters())
    bn = next(m for m in fresh.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert_params_equal(fresh, build("resnet20", seed=1, dtype=F64, **SMALL["resnet20_batch"]))


def test_build_and_reinitialize_leave_global_rng_untouched():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = build("vgg13", seed=3, width_mult=0.125)
    reinitialize(model, 4)
    assert torch.equal(torch.get_rng_state(), state)


def test_reinitialize_rejects_module_without_reset_parameters():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.gain * x

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(ValueError, match=r"module '1' \(Scale\).*reset_parameters"):
        reinitialize(model, 0)


# ---------------------------------------------------------------- the CNNs' activation and pooling
ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus}
POOL_MODULES = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
CNNS = {"lenet": dict(width_mult=0.25), "alexnet": dict(width_mult=0.125),
        "vgg13": dict(width_mult=1 / 16), "resnet20": dict(width_mult=0.25)}


@pytest.mark.parametrize("name", list(CNNS))
def test_every_activation_and_pooling_builds_with_the_same_parameters(name):
    """Each activation × pooling builds the modules asked for (ResNet-20: its global pooling),
    runs on CIFAR-sized inputs, and has the parameter count of the default (literal) network.
    """
    x = torch.randn(2, 3, 32, 32)
    literal = count_parameters(build(name, **CNNS[name]))
    for activation, act_module in ACTIVATION_MODULES.items():
        for pooling, pool_module in POOL_MODULES.items():
            model = build(name, activation=activation, pooling=pooling, **CNNS[name])
            assert count_parameters(model) == literal, (activation, pooling)
            kinds = {type(m) for m in model.modules()}
            assert kinds & set(ACTIVATION_MODULES.values()) == {act_module}
            if name == "resnet20":
                assert model.pooling == pooling and not kinds & set(POOL_MODULES.values())
            else:
                assert kinds & set(POOL_MODULES.values()) == {pool_module}
            with torch.no_grad():
                assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", list(CNNS))
def test_default_is_the_literal_network_and_the_smooth_one_has_no_kink(name):
    literal = build(name, seed=0, **CNNS[name])
    kinds = {type(m) for m in literal.modules()}
    assert nn.ReLU in kinds and nn.GELU not in kinds
    assert (literal.pooling == "avg") if name == "resnet20" else nn.MaxPool2d in kinds
    assert variant_label(name, {}) == "ReLU, " + ("avg-pool" if name == "resnet20" else "max-pool")
    smooth = build(name, seed=0, activation="gelu", pooling="avg", **CNNS[name])
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in smooth.modules())
    assert variant_label(name, {"activation": "gelu", "pooling": "avg"}) == "GELU, avg-pool"
    # the same parameters, initialised the same: only the non-linearities differ
    assert_params_equal(literal, smooth)


def test_variant_label_of_other_models():
    assert variant_label("mlp", {"activation": "gelu"}) == "GELU"
    assert variant_label("mlp", {}) == "ReLU" and variant_label("autoencoder", {}) == "tanh"
    assert variant_label("transformer", {}) == "" and variant_label("logistic", {}) == ""
    assert variant_label("no-such-model", {}) == ""


def _cifar10_subset(n_train: int):
    """A tiny CIFAR-10 subset in float64, or a skip when $PBRF_DATA has no CIFAR-10."""
    try:
        return load("cifar10", n_train=n_train, n_test=2, dtype=torch.float64)
    except DataError as err:
        pytest.skip(f"CIFAR-10 is not available: {err}")


def test_smooth_lenet_pbrf_responses_are_certified_on_cifar10():
    """GELU + average pooling: the PBRF objective is smooth, and its Newton optimum certifies
    (ρ ≤ the threshold) for every removal, on a tiny LeNet trained on 32 CIFAR-10 images.
    """
    ds = _cifar10_subset(32)
    data = (ds.x_train, ds.y_train)
    model = build("lenet", seed=0, width_mult=0.25, activation="gelu", pooling="avg", dtype=F64)
    task = pbrf.tasks.Classification()
    recipe = pbrf.Recipe(lr=0.05, momentum=0.9, epochs=10, batch_size=None)
    prob = pbrf.train(model, task, data, recipe, weight_decay=1e-3, progress=False).problem(
        task, data)
    resp = pbrf.respond(prob.astype(torch.float64), "pbrf", [0, 1], damping=0.1, progress=False)
    assert resp.certified == [True, True], [d["rho"] for d in resp.diagnostics]


# ---------------------------------------------------------------- errors
def test_unknown_model_lists_models():
    with pytest.raises(ValueError, match="resnet20") as err:
        build("resnet18")
    assert all(name in str(err.value) for name in MODELS)


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("resnet20", dict(widht_mult=2), "widht_mult"),
        ("mlp", dict(n_outputs=2), "in_shape"),
        ("mlp", dict(in_shape=(4,), n_outputs=2, activation="swish"), "activation"),
        ("vgg13", dict(norm="layer"), "norm"),
        ("lenet", dict(pooling="mean"), r"pooling must be one of \['max', 'avg'\], got 'mean'"),
        ("alexnet", dict(activation="swish"), r"activation must be one of \['relu', 'gelu'"),
        ("vgg13", dict(pooling="Max"), "pooling"),
        ("resnet20", dict(activation="ReLU"), "activation.*softplus"),
        ("resnet20", dict(pooling=None), "pooling"),
        ("lenet", dict(width_mult=0), "width_mult"),
        ("vgg13", dict(input_size=16), "input_size"),
        ("transformer", dict(vocab_size=5, seq_len=4, d_model=10, n_heads=4), "n_heads"),
        ("logistic", dict(in_shape=(0, 3), n_outputs=2), "in_shape"),
        ("mlp", dict(in_shape=(4,), n_outputs=2, width=[]), "width"),
    ],
)
def test_bad_arguments_name_the_argument(name, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build(name, **kwargs)


def test_bad_dtype_and_seed():
    with pytest.raises(ValueError, match="dtype"):
        build("lenet", dtype=torch.int64)
    with pytest.raises(ValueError, match="seed"):
        build("lenet", seed=1.5)


# ---------------------------------------------------------------- BatchNorm under pbrf.Problem
def test_problem_with_batchnorm_leaves_user_model_untouched():
    from pbrf.problem import Problem
    from pbrf.tasks import Classification

    model = build(
        "resnet20", seed=0, dtype=F64, in_channels=3, n_classes=3, width_mult=0.25, norm="batch"
    )
    with torch.no_grad():  # user training: running statistics move away from (0, 1)
        model(2 * torch.randn(16, 3, 8, 8, dtype=F64) + 1)
    assert model.training
    state = copy.deepcopy(model.state_dict())
    x, y = make_data("resnet20", n=4)

    prob = Problem(model, Classification(), train=(x, y), weight_decay=0.0)
    out = prob.outputs(prob.params, x)
    per_example = vmap(
        grad(lambda p, xi, ti: prob.losses(p, xi[None], ti[None]).sum()), in_dims=(None, 0, 0)
    )
    grads = per_example(prob.params, x, y)

    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    new_state = model.state_dict()
    assert new_state.keys() == state.keys()
    for k in state:
        assert torch.equal(new_state[k], state[k]), k

    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out, copy.deepcopy(model)(x))  # train-mode BN would differ
    torch.testing.assert_close(prob.outputs(prob.params, x[:1]), out[:1])  # no batch dependence
    li = per_example_loss(reference(x[1:2]), y[1:2]).sum()
    ref = torch.autograd.grad(li, list(reference.parameters()))
    for (name, _), r in zip(reference.named_parameters(), ref):
        torch.testing.assert_close(grads[name][1], r, rtol=1e-8, atol=1e-12)
