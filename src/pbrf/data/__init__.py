"""Datasets without torchvision and without network access.

>>> from pbrf.data import load
>>> ds = load("digits", n_train=200, n_test=100, seed=0)
>>> ds.x_train.shape, ds.task
(torch.Size([200, 1, 8, 8]), 'classification')

Files are looked up under :func:`data_root` (``root=`` argument, else ``$PBRF_DATA``, else
``~/.cache/pbrf``) in the layout of the shared dataset mirror, verified by md5, and can be fetched
with :func:`download`. ``digits`` ships with the package and the ``synthetic-*`` sets are
generated, so those two never touch the disk.
"""

from __future__ import annotations

import inspect
import logging
import os

from ._dataset import DATASETS, DataError, Dataset
from ._files import data_root, download
from ._prepare import check_seed
from .images import load_cifar10, load_digits, load_idx_dataset
from .synthetic import load_synthetic
from .text import load_shakespeare
from .uci import load_uci

__all__ = ["load", "Dataset", "DataError", "download", "data_root", "DATASETS"]

logger = logging.getLogger(__name__)

_LOADERS = {
    "digits": load_digits,
    "mnist": load_idx_dataset,
    "fashion-mnist": load_idx_dataset,
    "cifar10": load_cifar10,
    "energy": load_uci,
    "concrete": load_uci,
    "shakespeare": load_shakespeare,
    "synthetic-regression": load_synthetic,
    "synthetic-classification": load_synthetic,
    "synthetic-binary": load_synthetic,
}

_COMMON = ("root", "verify", "n_train", "n_test", "seed")


def options(name: str) -> dict[str, object]:
    """The dataset-specific options of ``load(name, ...)`` and their defaults."""
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    params = inspect.signature(_LOADERS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON}


def load(
    name: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    verify: bool = True,
    **opts,
) -> Dataset:
    """Load a dataset as tensors.

    Args:
        name: one of :data:`DATASETS`.
        n_train, n_test: sizes of seeded subsets of the training / test split (``None``: all;
            ``shakespeare`` defaults to 2000 / 200 sequences, ``synthetic-*`` to 100 / 50,
            ``digits`` to the 1297 / 500 split). The same arguments always give the same examples,
            and a smaller subset is contained in a larger one.
        seed: seed of every random choice (subsets, the digits and UCI splits, synthetic data).
        root: data folder; default ``$PBRF_DATA``, else ``~/.cache/pbrf`` (see :func:`data_root`).
        verify: check the md5 of every file used against the known checksums (results are cached
            by path, size and mtime). ``False`` skips it, e.g. for small test fixtures.
        **opts: dataset options, see :func:`options`: for classification sets ``classes=(a, b,
            ...)`` keeps those classes relabelled ``0..k-1`` in the given order, ``binary=True``
            (two classes) gives task ``"binary"`` with float 0./1. targets, ``normalize=False``
            keeps ``[0, 1]`` pixels, ``task="reconstruction"``, ``dtype=torch.float64``;
            ``cifar10``: ``source="auto"|"pickle"|"jpeg"``; UCI: ``target``; ``shakespeare``:
            ``seq_len`` (64); synthetic: ``n_features``, ``n_classes``, ``noise``, ``n_outputs``.

    Returns:
        A :class:`Dataset`; normalisation statistics are fitted on its (subsetted) training split
        and recorded in ``meta``.

    Raises:
        DataError: unknown name or option, bad option value, missing or corrupt file (one line
            naming the file and the fix).
    """
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        accepted = sorted(allowed) + list(_COMMON)
        raise DataError(f"load({name!r}): unknown option(s) {unknown}; {name} accepts {accepted}.")
    seed = check_seed(seed)
    ds = _LOADERS[name](name, root=root, verify=bool(verify), n_train=n_train, n_test=n_test,
                        seed=seed, **opts)
    ds.meta.setdefault("seed", seed)
    logger.info("loaded %r", ds)
    return ds
