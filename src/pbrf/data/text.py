"""Character-level language modelling on Tiny Shakespeare.

The vocabulary is the sorted set of characters of the whole file. Training sequences start at
seeded distinct positions in the first 90 % of the text, test sequences in the last 10 %, and a
sequence never crosses the boundary: ``x = tokens[i : i + T]``, ``y = tokens[i + 1 : i + T + 1]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ._dataset import DataError, Dataset
from ._files import require
from ._prepare import check_count, rng_for

__all__ = ["load_shakespeare", "tokenize"]

logger = logging.getLogger(__name__)

REL = "tinyshakespeare/input.txt"
TRAIN_FRACTION = 0.9


def tokenize(text: str) -> tuple[np.ndarray, str]:
    """Character tokens of ``text`` and the vocabulary.

    Returns:
        ``(tokens int64 [len(text)], vocab)`` with ``vocab[tokens[k]] == text[k]`` and ``vocab``
        the sorted distinct characters.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    uniq = np.unique(codes)
    vocab = "".join(map(chr, uniq))
    return np.searchsorted(uniq, codes).astype(np.int64), vocab


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text ({err}). Fix: replace it with the original."
        ) from None


def _sequences(
    tokens: np.ndarray,
    lo: int,
    hi: int,
    n,
    seq_len: int,
    seed: int,
    stream: str,
    option: str,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded distinct windows with ``lo <= i`` and ``i + seq_len + 1 <= hi``."""
    n_pos = hi - lo - seq_len
    if n_pos < 1:
        raise DataError(
            f"seq_len={seq_len}: too long for the {hi - lo} characters of the {stream} part of "
            f"{name}; "
            "pass a smaller seq_len."
        )
    n = check_count(n, n_pos, option, name)
    starts = lo + np.sort(rng_for(seed, stream).choice(n_pos, size=n, replace=False))
    windows = starts[:, None] + np.arange(seq_len + 1)
    seq = torch.from_numpy(tokens[windows])
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def load_shakespeare(
    name: str, *, root, verify: bool, n_train, n_test, seed: int, seq_len: int = 64
) -> Dataset:
    """Tiny Shakespeare as next-character prediction.

    Args:
        n_train: training sequences (default 2000); ``n_test``: test sequences (default 200).
        seq_len: ``T``, characters per sequence.

    Returns:
        A ``"language_model"`` :class:`Dataset`, ``x``/``y`` long ``[N, T]``; ``meta`` has
        ``vocab`` (str), ``vocab_size``, ``seq_len``, ``n_outputs`` (= ``vocab_size``).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len={seq_len!r}: must be a positive integer.")
    path = require(name, [REL], root, verify_checksums=verify)[REL]
    tokens, vocab = tokenize(_read_text(path))
    cut = int(TRAIN_FRACTION * len(tokens))
    n_train = 2000 if n_train is None else n_train
    n_test = 200 if n_test is None else n_test
    x_tr, y_tr = _sequences(tokens, 0, cut, n_train, seq_len, seed, "train", "n_train", name)
    x_te, y_te = _sequences(tokens, cut, len(tokens), n_test, seq_len, seed, "test", "n_test", name)
    meta = {
        "files": [str(path)],
        "n_total": len(tokens),
        "vocab": vocab,
        "vocab_size": len(vocab),
        "seq_len": seq_len,
        "n_outputs": len(vocab),
        "input_shape": (seq_len,),
        "train_chars": cut,
    }
    return Dataset(name, "language_model", x_tr, y_tr, x_te, y_te, meta=meta)
