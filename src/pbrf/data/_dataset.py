"""The :class:`Dataset` container and :class:`DataError`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Dataset", "DataError", "TASKS", "DATASETS"]

#: Task names a dataset can carry (the names of :func:`pbrf.tasks.get_task`).
TASKS = ("classification", "regression", "binary", "language_model", "reconstruction")

#: Dataset name -> one-line description. ``name in DATASETS`` tells whether ``load`` knows it.
DATASETS: dict[str, str] = {
    "digits": "scikit-learn 8x8 digits, 1797 images, embedded (classification)",
    "mnist": "MNIST 28x28, 60000/10000, IDX gzip files (classification)",
    "fashion-mnist": "Fashion-MNIST 28x28, 60000/10000, IDX gzip files (classification)",
    "cifar10": "CIFAR-10 32x32 RGB, 50000/10000, python-pickle or JPEG tarball (classification)",
    "energy": "UCI Energy Efficiency, 768 rows, 70/20/10 split (regression)",
    "concrete": "UCI Concrete Compressive Strength, 1030 rows, 70/20/10 split (regression)",
    "shakespeare": "Tiny Shakespeare, character-level (language_model)",
    "synthetic-regression": "generated linear regression (regression)",
    "synthetic-classification": "generated Gaussian blobs (classification)",
    "synthetic-binary": "generated linearly separable-ish labels (binary)",
}


class DataError(ValueError):
    """A dataset cannot be loaded: missing or corrupt file, or a bad option.

    The message is one line naming the file (or option), what is wrong, and the fix.
    """


@dataclass
class Dataset:
    """A loaded dataset: train / (optional) validation / test tensors plus metadata.

    Attributes:
        name: dataset name as passed to :func:`pbrf.data.load`.
        task: ``"classification"`` (``y`` long class indices ``[N]``), ``"binary"`` (``y``
            float 0./1. ``[N]``), ``"regression"`` (``y`` float ``[N, n_outputs]``),
            ``"language_model"`` (``x``, ``y`` long ``[N, T]``, ``y`` = ``x`` shifted by one) or
            ``"reconstruction"`` (the target is ``x`` itself; ``y`` keeps the labels).
        x_train, y_train, x_test, y_test: the splits; the first axis indexes examples.
        x_val, y_val: validation split where the dataset defines one (UCI), else ``None``.
        meta: everything else: ``n_classes``, ``input_shape``, ``n_outputs``, normalisation
            ``mean``/``std``, ``files``, ``n_total``, ``vocab`` (language model), ...
    """

    name: str
    task: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Dataset.task={self.task!r}: choose one of {TASKS}.")
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if (x is None) != (y is None):
                raise ValueError(f"Dataset {self.name}: x_{split} and y_{split} must both be set "
                                 "or both None.")
            if x is not None and len(x) != len(y):
                raise ValueError(
                    f"Dataset {self.name}: x_{split} has {len(x)} examples but y_{split} has "
                    f"{len(y)}."
                )

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        """``(x_train, y_train)``, the form :class:`pbrf.Problem` takes."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    @property
    def val(self) -> tuple[Tensor, Tensor] | None:
        """``(x_val, y_val)`` or ``None``."""
        return None if self.x_val is None else (self.x_val, self.y_val)

    def __repr__(self) -> str:
        def shape(t):
            return (
                "None" if t is None else f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            )

        parts = [f"x_train={shape(self.x_train)}", f"y_train={shape(self.y_train)}"]
        if self.x_val is not None:
            parts += [f"x_val={shape(self.x_val)}"]
        parts += [f"x_test={shape(self.x_test)}", f"y_test={shape(self.y_test)}"]
        return f"Dataset({self.name!r}, task={self.task!r}, {', '.join(parts)})"
