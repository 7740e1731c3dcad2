"""Small generated datasets for tests and examples, deterministic by seed.

The ground-truth parameters come from stream ``"params"`` of the seed and the train / test
inputs from streams ``"train"`` / ``"test"``, so changing ``n_test`` never changes the training
set. Inputs are already standard normal and are not re-normalised.

* ``synthetic-regression``: ``y = x w + noise · ε``, ``w ~ N(0, I / d)``; ``y`` ``[N, n_outputs]``.
* ``synthetic-classification``: Gaussian blobs, class means ``~ N(0, 4 I / d)`` (about 2 apart),
  labels uniform, within-class standard deviation ``noise``; ``y`` long.
* ``synthetic-binary``: ``t = 1[x w + noise · ε > 0]`` as float 0./1.
"""

from __future__ import annotations

import numpy as np
import torch

from ._dataset import DataError, Dataset
from ._prepare import check_count, labelled, relabel, resolve_classes, rng_for, to_dtype

__all__ = ["load_synthetic"]

DEFAULT_N_TRAIN = 100
DEFAULT_N_TEST = 50


def _positive_int(value, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{option}={value!r}: must be a positive integer.")
    return int(value)


def _counts(n_train, n_test, name: str) -> tuple[int, int]:
    big = 10**7
    n_train = check_count(DEFAULT_N_TRAIN if n_train is None else n_train, big, "n_train", name)
    return n_train, check_count(DEFAULT_N_TEST if n_test is None else n_test, big, "n_test", name)


def _inputs(seed: int, n_train: int, n_test: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng_for(seed, "train").standard_normal((n_train, d)),
            rng_for(seed, "test").standard_normal((n_test, d)))


def _regression(name, seed, n_train, n_test, n_features, noise, n_outputs, dtype) -> Dataset:
    n_outputs = _positive_int(n_outputs, "n_outputs")
    w = rng_for(seed, "params").standard_normal((n_features, n_outputs)) / np.sqrt(n_features)
    xs = _inputs(seed, n_train, n_test, n_features)
    eps = [rng_for(seed, f"noise-{k}").standard_normal((len(x), n_outputs)) for k,
           x in enumerate(xs)]
    ys = [x @ w + noise * e for x, e in zip(xs, eps)]
    t = [torch.from_numpy(a).to(dtype) for a in (*xs, *ys)]
    meta = {"input_shape": (n_features,), "n_outputs": n_outputs, "noise": noise,
            "weights": w.tolist(),
            "n_total": n_train + n_test}
    return Dataset(name, "regression", t[0], t[2], t[1], t[3], meta=meta)


def _blobs(seed, n_train, n_test, n_features, n_classes, noise,
           keep) -> list[tuple[np.ndarray, np.ndarray]]:
    """Gaussian blobs with labels drawn uniformly from ``keep`` (original labels)."""
    means = rng_for(seed, "params").standard_normal((n_classes, n_features))
    means = means * 2.0 / np.sqrt(n_features)
    out = []
    for stream, n in (("train", n_train), ("test", n_test)):
        rng = rng_for(seed, stream)
        y = np.asarray(keep)[rng.integers(0, len(keep), size=n)]
        out.append((means[y] + noise * rng.standard_normal((n, n_features)), y.astype(np.int64)))
    return out


def _classification(name, seed, n_train, n_test, n_features, n_classes, noise, classes, binary,
                    dtype) -> Dataset:
    n_classes = _positive_int(n_classes, "n_classes")
    if n_classes < 2:
        raise DataError(f"n_classes={n_classes}: a classification set needs at least 2 classes.")
    keep = resolve_classes(classes, n_classes, None, name)
    (x_tr, y_tr), (x_te, y_te) = _blobs(seed, n_train, n_test, n_features, n_classes, noise, keep)
    meta = {"input_shape": (n_features,), "noise": noise, "n_total": n_train + n_test}
    return labelled(
        name, torch.from_numpy(x_tr).to(dtype), relabel(y_tr, keep),
        torch.from_numpy(x_te).to(dtype), relabel(y_te, keep),
        keep=keep, binary=binary, task=None, dtype=dtype, meta=meta,
    )


def _binary(name, seed, n_train, n_test, n_features, noise, dtype) -> Dataset:
    w = rng_for(seed, "params").standard_normal(n_features) / np.sqrt(n_features)
    xs = _inputs(seed, n_train, n_test, n_features)
    ys = [(x @ w + noise * rng_for(seed,
                                   f"noise-{k}").standard_normal(len(x)) > 0).astype(np.float64)
          for k, x in enumerate(xs)]
    t = [torch.from_numpy(a).to(dtype) for a in (*xs, *ys)]
    meta = {"input_shape": (n_features,), "n_outputs": 1, "n_classes": 2, "noise": noise,
            "weights": w.tolist(), "n_total": n_train + n_test}
    return Dataset(name, "binary", t[0], t[2], t[1], t[3], meta=meta)


def load_synthetic(name: str, *, root, verify: bool, n_train, n_test, seed: int,
                   n_features: int = 5,
                   n_classes: int = 3, noise: float | None = None, n_outputs: int = 1, classes=None,
                   binary: bool = False, dtype=torch.float32) -> Dataset:
    """Generate ``synthetic-regression``, ``synthetic-classification`` or ``synthetic-binary``.

    Args:
        n_train, n_test: sizes (defaults 100 and 50).
        n_features: input dimension ``d``.
        n_classes: classes of ``synthetic-classification``.
        noise: target noise std (regression, default 0.1), within-class std (classification,
            default 1.0) or logit noise std (binary, default 0.5).
        n_outputs: target dimension of ``synthetic-regression``.
        classes, binary: class selection / binary relabelling for ``synthetic-classification``.
        dtype: float dtype of the inputs (and float targets).

    Returns:
        The :class:`Dataset`; ``root``/``verify`` are unused.
    """
    dtype = to_dtype(dtype)
    n_features = _positive_int(n_features, "n_features")
    n_train, n_test = _counts(n_train, n_test, name)
    kind = name.removeprefix("synthetic-")
    noise = {"regression": 0.1, "classification": 1.0,
             "binary": 0.5}[kind] if noise is None else float(noise)
    if noise < 0:
        raise DataError(f"noise={noise}: must be >= 0.")
    if kind != "classification" and (classes is not None or binary):
        raise DataError(f"classes=/binary= apply to synthetic-classification, not {name}.")
    if kind == "regression":
        return _regression(name, seed, n_train, n_test, n_features, noise, n_outputs, dtype)
    if kind == "binary":
        return _binary(name, seed, n_train, n_test, n_features, noise, dtype)
    return _classification(name, seed, n_train, n_test, n_features, n_classes, noise, classes,
                           binary, dtype)
