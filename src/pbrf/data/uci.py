"""UCI regression sets (Energy Efficiency, Concrete) from whitespace-separated text.

Convention of the regression literature: columns 0–7 are the features, column 8 the target; a
seeded 70/20/10 train/validation/test split; ``x`` and ``y`` standardised with the mean/std of the
(subsetted) training split. ``meta['y_mean']``/``meta['y_std']`` undo the target scaling.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ._dataset import DataError, Dataset
from ._files import require
from ._prepare import choose, rng_for, standardise, to_dtype

__all__ = ["load_uci", "split_sizes"]

logger = logging.getLogger(__name__)

N_FEATURES = 8
FRACTIONS = (0.7, 0.2, 0.1)


def split_sizes(n: int) -> tuple[int, int, int]:
    """Train/validation/test sizes of ``n`` rows: ``round(0.7 n)``, ``round(0.2 n)``, the rest."""
    n_train = round(FRACTIONS[0] * n)
    n_val = round(FRACTIONS[1] * n)
    return n_train, n_val, n - n_train - n_val


def _read_table(path: Path) -> np.ndarray:
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise DataError(
            f"{path}: not a whitespace-separated numeric table ({err}). Fix: replace it with the "
            "original."
        ) from None
    if table.shape[1] <= N_FEATURES or len(table) < 10:
        raise DataError(
            f"{path}: expected at least 10 rows of {N_FEATURES} feature columns plus a target "
            "column; "
            f"got shape {table.shape}. Fix: replace it with the original."
        )
    return table


def load_uci(name: str, *, root, verify: bool, n_train, n_test, seed: int, target: int = N_FEATURES,
             normalize=True, dtype=torch.float32) -> Dataset:
    """Energy or Concrete from ``<root>/uci/<name>.txt``.

    Args:
        target: target column (8; for a 10-column Energy file 9 is the cooling load).
        normalize: standardise ``x`` and ``y`` with training statistics.

    Returns:
        A ``"regression"`` :class:`Dataset` with ``x`` ``[N, 8]`` and ``y`` ``[N, 1]`` float,
        train/val/test = 70/20/10 % of the rows; ``n_train``/``n_test`` take seeded subsets of
        the train/test parts (the validation part is kept whole).
    """
    dtype = to_dtype(dtype)
    rel = f"uci/{name}.txt"
    path = require(name, [rel], root, verify_checksums=verify)[rel]
    table = _read_table(path)
    if not (isinstance(target, int) and N_FEATURES <= target < table.shape[1]):
        raise DataError(f"target={target!r}: {path} has target columns "
                        f"{N_FEATURES}..{table.shape[1] - 1}.")
    perm = rng_for(seed, "split").permutation(len(table))
    a, b, _ = split_sizes(len(table))
    tr = choose(np.sort(perm[:a]), n_train, seed, "train", option="n_train", name=name)
    va = np.sort(perm[a:a + b])
    te = choose(np.sort(perm[a + b:]), n_test, seed, "test", option="n_test", name=name)
    x, y = table[:, :N_FEATURES], table[:, [target]]
    xs, ys = [x[tr], x[va], x[te]], [y[tr], y[va], y[te]]
    meta = {"files": [str(path)], "n_total": len(table), "input_shape": (N_FEATURES,),
            "n_outputs": 1}
    if normalize:
        xs, meta["x_mean"], meta["x_std"] = standardise(*xs)
        ys, meta["y_mean"], meta["y_std"] = standardise(*ys)
        meta = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}
    t = [torch.from_numpy(a).to(dtype) for a in (*xs, *ys)]
    return Dataset(name, "regression", t[0], t[3], t[2], t[5], x_val=t[1], y_val=t[4], meta=meta)
