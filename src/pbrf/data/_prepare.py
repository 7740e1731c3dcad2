"""Shared steps of every loader: seeded subsets, class selection, normalisation, tensors.

Determinism: every random choice comes from ``numpy.random.default_rng([seed, crc32(stream)])``
with a fixed stream name per purpose ("train", "test", "split", ...), so the same arguments give
the same examples in any process, and the train subset does not depend on ``n_test``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._dataset import DataError, Dataset

__all__ = [
    "rng_for",
    "check_seed",
    "check_count",
    "choose",
    "resolve_classes",
    "class_pool",
    "relabel",
    "uint8_stats",
    "normalise_uint8",
    "standardise",
    "Split",
    "image_classification",
    "to_dtype",
]


def to_dtype(dtype) -> torch.dtype:
    """Float dtype option: a ``torch.dtype`` or ``"float32"`` / ``"float64"``."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.float64):
        raise DataError(f"dtype={dtype!r}: use torch.float32 (default) or torch.float64.")
    return dtype


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def check_seed(seed) -> int:
    """Validate the ``seed`` option (a non-negative int)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed={seed!r}: must be a non-negative integer.")
    return int(seed)


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """Generator for one purpose (``stream``) of one seed; stable across processes."""
    return np.random.default_rng([check_seed(seed), zlib.crc32(stream.encode())])


def check_count(n, available: int, option: str, name: str) -> int:
    """Validate ``n_train``/``n_test``: ``None`` means all ``available`` examples.

    Raises:
        DataError: ``n`` is not a positive int or exceeds ``available``.
    """
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{option}={n!r}: must be a positive integer or None (all examples).")
    if n > available:
        raise DataError(
            f"{option}={n} exceeds the {available} examples available for {name}; "
            f"pass {option}<={available}."
        )
    return int(n)


def choose(pool: np.ndarray, n, seed: int, stream: str, *, option: str, name: str) -> np.ndarray:
    """A seeded subset of ``n`` entries of ``pool`` (all of it for ``None``), in pool order.

    The subset is the first ``n`` of a seeded permutation, so smaller subsets are contained in
    larger ones for the same seed.
    """
    n = check_count(n, len(pool), option, name)
    if n == len(pool):
        return np.asarray(pool)
    pick = rng_for(seed, stream).permutation(len(pool))[:n]
    return np.asarray(pool)[np.sort(pick)]


def resolve_classes(classes, n_classes: int, class_names: Sequence[str] | None,
                    name: str) -> list[int]:
    """The original labels to keep, in the order given (new label = position).

    Args:
        classes: ``None`` (all), or a sequence of label ints and/or class names.
        n_classes: number of classes of the dataset.
        class_names: names of the classes, if known.
        name: dataset name for messages.
    """
    if classes is None:
        return list(range(n_classes))
    if isinstance(classes, (str, int)) or not isinstance(classes, Sequence):
        raise DataError(f"classes={classes!r}: pass a tuple of labels, e.g. classes=(3, 8).")
    keep = [_class_index(c, n_classes, class_names, name) for c in classes]
    if len(set(keep)) != len(keep) or not keep:
        raise DataError(f"classes={tuple(classes)!r}: list each class once (at least one).")
    return keep


def _class_index(c, n_classes: int, class_names, name: str) -> int:
    if isinstance(c, str) and class_names is not None and c in class_names:
        return list(class_names).index(c)
    if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < n_classes:
        return int(c)
    names = f" or one of {list(class_names)}" if class_names is not None else ""
    raise DataError(f"classes: {c!r} is not a class of {name}; use a label in "
                    f"0..{n_classes - 1}{names}.")


def class_pool(labels: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Indices of the examples whose label is in ``keep``."""
    return np.flatnonzero(np.isin(labels, np.asarray(keep)))


def relabel(labels: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Map original label ``keep[j]`` to ``j`` (int64)."""
    table = np.full(int(max(labels.max(initial=0), max(keep))) + 1, -1, dtype=np.int64)
    table[np.asarray(keep)] = np.arange(len(keep))
    return table[labels]


def uint8_stats(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std (population) of uint8 images ``[N, C, H, W]``."""
    mean, std = [], []
    values = np.arange(256, dtype=np.float64)
    for c in range(raw.shape[1]):
        counts = np.bincount(raw[:, c].ravel(), minlength=256).astype(np.float64)
        m = counts @ values / counts.sum()
        mean.append(m)
        std.append(np.sqrt(counts @ (values - m) ** 2 / counts.sum()))
    return np.array(mean), np.array(std)


def normalise_uint8(raw: np.ndarray, scale: float, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """``(raw / scale - mean_c) / std_c`` per channel via a 256-entry lookup table.

    ``mean``/``std`` are in the scaled units (``raw / scale``); ``None`` means no normalisation.
    """
    values = np.arange(256, dtype=np.float64) / scale
    out = np.empty(raw.shape, dtype=_np_dtype(dtype))
    for c in range(raw.shape[1]):
        lut = values if mean is None else (values - mean[c]) / std[c]
        out[:, c] = lut.astype(out.dtype)[raw[:, c]]
    return torch.from_numpy(out)


def standardise(train: np.ndarray, *others: np.ndarray) -> tuple[list[np.ndarray], np.ndarray,
    np.ndarray]:
    """Column-wise ``(a - mean) / std`` with mean/std of ``train`` (std 0 is replaced by 1).

    Returns:
        ``([train, *others] standardised, mean, std)``.
    """
    mean = train.mean(0)
    std = train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)], mean, std


@dataclass(frozen=True)
class Split:
    """One split of an image classification source.

    Attributes:
        labels: int64 labels of every example ``[N]`` (cheap to read).
        pixels: ``indices -> uint8 [n, C, H, W]`` for sorted indices (may decode lazily).
    """

    labels: np.ndarray
    pixels: Callable[[np.ndarray], np.ndarray]


def image_classification(name: str, train: Split, test: Split, *, n_train, n_test, seed,
                         classes=None,
                         binary=False, normalize=True, task=None, dtype=torch.float32, scale=255.0,
                         n_classes: int, class_names=None, meta=None) -> Dataset:
    """Subset, select classes, normalise and tensorise an image classification source.

    Normalisation is per channel with the mean/std of the selected training images (after
    dividing by ``scale``); ``meta['mean']``/``meta['std']`` report them in those units.
    """
    dtype = to_dtype(dtype)
    keep = resolve_classes(classes, n_classes, class_names, name)
    tr = choose(class_pool(train.labels, keep), n_train, seed, "train", option="n_train", name=name)
    te = choose(class_pool(test.labels, keep), n_test, seed, "test", option="n_test", name=name)
    raw_tr, raw_te = train.pixels(tr), test.pixels(te)
    mean = std = None
    if normalize:
        mean, std = (s / scale for s in uint8_stats(raw_tr))
        std = np.where(std > 0, std, 1.0)
    meta = dict(meta or {})
    meta.update(
        input_shape=tuple(raw_tr.shape[1:]),
        mean=None if mean is None else [float(m) for m in mean],
        std=None if std is None else [float(s) for s in std],
        scale=scale,
    )
    if class_names is not None:
        meta["class_names"] = [class_names[k] for k in keep]
    return labelled(
        name, normalise_uint8(raw_tr, scale, mean, std, dtype), relabel(train.labels[tr], keep),
        normalise_uint8(raw_te, scale, mean, std, dtype), relabel(test.labels[te], keep),
        keep=keep, binary=binary, task=task, dtype=dtype, meta=meta,
    )


def labelled(name: str, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor,
             y_test: np.ndarray,
             *, keep: Sequence[int], binary: bool, task, dtype: torch.dtype, meta: dict) -> Dataset:
    """Build a classification / binary / reconstruction :class:`Dataset` from relabelled targets."""
    if task not in (None, "classification", "reconstruction"):
        raise DataError(
            f"task={task!r}: {name} supports task='classification' or 'reconstruction'."
        )
    if binary and len(keep) != 2:
        raise DataError(
            f"binary=True needs exactly two classes but {name} has {len(keep)} selected; "
            "pass classes=(a, b) as well."
        )
    if binary and task == "reconstruction":
        raise DataError("binary=True and task='reconstruction' cannot be combined; choose one.")
    meta.update(n_classes=len(keep), classes=[int(k) for k in keep])
    if binary:
        task, conv = "binary", lambda y: torch.from_numpy(y).to(dtype)
        meta["n_outputs"] = 1
    else:
        task, conv = task or "classification", torch.from_numpy
        meta["n_outputs"] = len(keep)
    if task == "reconstruction":
        meta["n_outputs"] = int(np.prod(tuple(x_train.shape[1:])))
    return Dataset(name, task, x_train, conv(y_train), x_test, conv(y_test), meta=meta)
