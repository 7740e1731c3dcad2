"""Image classification sets: digits (embedded), MNIST, Fashion-MNIST (IDX), CIFAR-10.

CIFAR-10 is read from either standard distribution, straight from the tarball (no extraction):

* ``cifar10/cifar-10-python.tar.gz``: the python-pickle batches (``data_batch_1..5``,
  ``test_batch``), unpickled with an allow-list that admits only numpy arrays and builtins;
* ``cifar10/cifar10-jpeg.tar.gz``: an image folder ``{train,test}/<class>/<file>.jpg`` with the
  label = alphabetical index of the class folder. Only the JPEGs of the requested subset are
  decoded; when a whole split is decoded it is cached as ``.npy`` in :func:`cache_dir`.

All image inputs are float ``[N, C, H, W]``, scaled to [0, 1] (digits: ``/16``) and then
standardised per channel with the mean/std of the (subsetted) training split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ._dataset import DataError, Dataset
from ._files import atomic_write_bytes, cache_dir, data_root, fix_hint, require
from ._prepare import Split, check_count, class_pool, image_classification, resolve_classes, rng_for

__all__ = ["load_digits", "load_idx_dataset", "load_cifar10", "read_idx"]

logger = logging.getLogger(__name__)

DIGITS_FILE = Path(__file__).with_name("digits.csv.gz")
CIFAR_PICKLE = "cifar10/cifar-10-python.tar.gz"
CIFAR_JPEG = "cifar10/cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
        "Ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8}


# ---------------------------------------------------------------------------------------------
# digits


def load_digits(name: str, *, root, verify: bool, n_train, n_test, seed: int, classes=None,
                binary=False,
                normalize=True, task=None, dtype=torch.float32) -> Dataset:
    """scikit-learn's 8×8 digits (1797 images, embedded): a seeded train/test split.

    The seeded permutation of the (class-selected) rows gives the first ``n_test`` rows to the
    test split (default: 500 of 1797, proportionally fewer with ``classes``) and the next
    ``n_train`` to the training split (default: all remaining rows). ``root``/``verify`` are
    unused (the file ships with the package).
    """
    table = np.loadtxt(DIGITS_FILE, delimiter=",", dtype=np.int64)
    raw = table[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = table[:, 64]
    keep = resolve_classes(classes, 10, None, name)
    pool = class_pool(labels, keep)
    perm = pool[rng_for(seed, "split").permutation(len(pool))]
    n_te = check_count(n_test if n_test is not None else round(len(pool) * 500 / 1797),
                       len(pool) - 1, "n_test", name)
    n_tr = check_count(n_train, len(pool) - n_te, "n_train", name)
    tr, te = np.sort(perm[n_te:n_te + n_tr]), np.sort(perm[:n_te])
    return image_classification(
        name, Split(labels[tr], lambda i: raw[tr][i]), Split(labels[te], lambda i: raw[te][i]),
        n_train=None, n_test=None, seed=seed, classes=classes, binary=binary, normalize=normalize,
        task=task, dtype=dtype, scale=16.0, n_classes=10,
        meta={"files": [str(DIGITS_FILE)], "n_total": len(labels)},
    )


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (unsigned-byte data) into a numpy array of its declared shape.

    Raises:
        DataError: the file is not a valid unsigned-byte IDX stream.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read as gzip ({err}). Fix: delete it and download it "
                        "again.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an unsigned-byte IDX file (bad magic). Fix: replace it with the original."
        )
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(
            f"{path}: IDX header declares shape {shape} but holds {len(body)} bytes; the file is "
            "truncated. Fix: replace it with the original."
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _idx_split(images: Path, labels: Path) -> Split:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{images}: expected images [N, H, W] matching {labels} [N]; got {x.shape} and "
            f"{y.shape}. "
            "Fix: replace the files with the originals."
        )
    return Split(y.astype(np.int64), lambda i: x[i][:, None])


def load_idx_dataset(name: str, *, root, verify: bool, n_train, n_test, seed: int, classes=None,
                     binary=False, normalize=True, task=None, dtype=torch.float32) -> Dataset:
    """MNIST or Fashion-MNIST from the four gzipped IDX files in ``<root>/<name>/``.

    Returns ``x`` float ``[N, 1, 28, 28]`` normalised with training-split statistics, ``y`` long.
    """
    rels = [f"{name}/{n}-{k}" for n in ("train", "t10k") for k in ("images-idx3-ubyte.gz",
        "labels-idx1-ubyte.gz")]
    files = require(name, rels, root, verify_checksums=verify)
    train = _idx_split(files[rels[0]], files[rels[1]])
    test = _idx_split(files[rels[2]], files[rels[3]])
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return image_classification(
        name, train, test, n_train=n_train, n_test=n_test, seed=seed, classes=classes,
            binary=binary,
        normalize=normalize, task=task, dtype=dtype, n_classes=n_classes,
        class_names=FASHION_CLASSES if name == "fashion-mnist" else None,
        meta={"files": [str(p) for p in files.values()],
              "n_total": len(train.labels) + len(test.labels)},
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def load_cifar10(name: str, *, root, verify: bool, n_train, n_test, seed: int, source="auto",
                 classes=None,
                 binary=False, normalize=True, task=None, dtype=torch.float32) -> Dataset:
    """CIFAR-10 from the python-pickle tarball or the JPEG image-folder tarball.

    Args:
        source: ``"pickle"``, ``"jpeg"``, or ``"auto"`` (the pickle tarball when present, as it
            holds the original pixels; else the JPEG one).

    Returns ``x`` float ``[N, 3, 32, 32]`` normalised per channel with training statistics.
    """
    rel = _cifar_source(source, data_root(root), name)
    path = require(name, [rel], root, verify_checksums=verify)[rel]
    if rel == CIFAR_PICKLE:
        train, test, class_names = _read_cifar_pickle(path)
    else:
        train, test, class_names = _jpeg_splits(path)
    return image_classification(
        name, train, test, n_train=n_train, n_test=n_test, seed=seed, classes=classes,
            binary=binary,
        normalize=normalize, task=task, dtype=dtype, n_classes=len(class_names),
            class_names=class_names,
        meta={"files": [str(path)], "n_total": len(train.labels) + len(test.labels), "source": rel},
    )


def _cifar_source(source: str, base: Path, name: str) -> str:
    choices = {"pickle": CIFAR_PICKLE, "jpeg": CIFAR_JPEG}
    if source in choices:
        return choices[source]
    if source != "auto":
        raise DataError(f"source={source!r}: use 'auto', 'pickle' or 'jpeg'.")
    for rel in (CIFAR_PICKLE, CIFAR_JPEG):
        if (base / rel).is_file():
            return rel
    raise DataError(f"{base / CIFAR_PICKLE}: file missing (nor {base / CIFAR_JPEG}). Fix: "
                    f"{fix_hint(name)}.")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only admits builtins plus numpy array reconstruction (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _unpickle(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> dict:
    try:
        batch = _ArrayUnpickler(tar.extractfile(member), encoding="bytes").load()
    except (tarfile.TarError, OSError):
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt pickle fails in many ways (LookupError, struct errors, ...)
        raise DataError(f"{path}: member {member.name} is not a CIFAR pickle batch "
                        f"({type(err).__name__}: {err}). "
                        "Fix: delete it and download it again.") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: member {member.name} is not a CIFAR pickle batch (a "
                        f"{type(batch).__name__}, "
                        "not a dict). Fix: delete it and download it again.")
    return batch


def _batch_arrays(batch: dict, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise DataError(
            f"{path}: member {member} lacks b'data' [N, 3072] / b'labels' ({err})."
        ) from None
    if len(data) != len(labels):
        raise DataError(f"{path}: member {member} has {len(data)} images but {len(labels)} labels.")
    return data, labels


def _read_cifar_pickle(path: Path) -> tuple[Split, Split, tuple[str, ...]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            batches = (k for k in members if re.fullmatch(r"data_batch_\d+", k))
            names = sorted(batches, key=lambda k: int(k.removeprefix("data_batch_")))
            if not names or "test_batch" not in members:
                raise DataError(
                    f"{path}: no data_batch_* / test_batch members; not the CIFAR-10 python "
                    "tarball."
                )
            train = [_batch_arrays(_unpickle(tar, members[k], path), k, path) for k in names]
            test = _batch_arrays(_unpickle(tar, members["test_batch"], path), "test_batch", path)
            class_names = _label_names(tar, members.get("batches.meta"), path)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise _unreadable(path, err) from None
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    return Split(y, lambda i: x[i]), Split(test[1], lambda i: test[0][i]), class_names


def _unreadable(path: Path, err: Exception) -> DataError:
    return DataError(
        f"{path}: cannot read the tarball ({err}). Fix: delete it and download it again."
    )


def _label_names(tar, member, path) -> tuple[str, ...]:
    if member is None:
        return CIFAR_CLASSES
    names = _unpickle(tar, member, path).get(b"label_names")
    return (
        tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        if names
        else CIFAR_CLASSES
    )


_IMAGE_MEMBER = re.compile(r"(?:.*/)?(train|test)/([^/]+)/([^/]+\.(?:jpe?g|png))", re.IGNORECASE)


class _JpegArchive:
    """Index of an image-folder tarball; decodes selected members on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            raw = path.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            self.tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
            found = [
                (m, _IMAGE_MEMBER.fullmatch(m.name)) for m in self.tar.getmembers() if m.isfile()
            ]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise _unreadable(path, err) from None
        self.members = {"train": [], "test": []}
        for m, match in sorted(((m, h) for m, h in found if h), key=lambda t: t[1].groups()):
            self.members[match[1].lower()].append((match[2], m))
        self.classes = tuple(sorted({c for c, _ in self.members["train"]}))
        if not self.classes or not self.members["test"]:
            raise DataError(
                f"{path}: no train/<class>/*.jpg and test/<class>/*.jpg members; not an "
                "image-folder tarball."
            )

    def labels(self, split: str) -> np.ndarray:
        index = {c: k for k, c in enumerate(self.classes)}
        try:
            return np.array([index[c] for c, _ in self.members[split]], dtype=np.int64)
        except KeyError as err:
            raise DataError(
                f"{self.path}: class folder {err} of {split}/ is not in train/."
            ) from None

    def decode(self, split: str, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[n, C, H, W]`` of the given members (sorted indices into the split)."""
        members = self.members[split]
        bar = tqdm(indices, desc=f"decoding {split} JPEGs", unit="img", disable=len(indices) < 5000)
        images = [self._decode_one(members[k][1]) for k in bar]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise DataError(
                f"{self.path}: images of different sizes {sorted(shapes)}; expected one size."
            )
        return np.stack(images) if images else np.zeros((0, 3, 32, 32), np.uint8)

    def _decode_one(self, member: tarfile.TarInfo) -> np.ndarray:
        try:
            with Image.open(self.tar.extractfile(member)) as im:
                return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        except OSError as err:
            raise DataError(
                f"{self.path}: member {member.name} is not a readable image ({err})."
            ) from None


def _jpeg_cache_file(path: Path, split: str) -> Path:
    st = path.stat()
    key = hashlib.md5(f"{path.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"cifar10-jpeg-{key}-{split}.npy"


def _cached_pixels(archive: _JpegArchive, split: str, indices: np.ndarray) -> np.ndarray:
    cache = _jpeg_cache_file(archive.path, split)
    n_all = len(archive.members[split])
    if cache.is_file():
        try:
            full = np.load(cache, mmap_mode="r")
            if len(full) == n_all:
                return np.ascontiguousarray(full[indices])
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable cache %s: %s", cache, err)
    pixels = archive.decode(split, indices)
    if len(indices) == n_all:
        _save_cache(cache, pixels)
    return pixels


def _save_cache(cache: Path, pixels: np.ndarray) -> None:
    try:
        atomic_write_bytes(cache, lambda f: np.save(f, pixels))
        logger.info("cached decoded images in %s", cache)
    except OSError as err:
        logger.debug("could not write image cache %s: %s", cache, err)


def _jpeg_splits(path: Path) -> tuple[Split, Split, tuple[str, ...]]:
    archive = _JpegArchive(path)
    splits = tuple(
        Split(archive.labels(s), lambda i, s=s: _cached_pixels(archive, s, i))
        for s in ("train", "test")
    )
    return splits[0], splits[1], archive.classes
