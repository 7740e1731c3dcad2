"""Tests of pbrf.data: loaders on tiny fixture files, checksums, download on loopback, real mirror.

The fixture files are written by the tests (IDX via struct + gzip, CIFAR pickle and JPEG tarballs,
UCI text, a text corpus). Pixels encode their label and index, so every test can check that inputs
stay aligned with targets through subsetting and class selection. Tests against the real mirror
run when ``PBRF_DATA`` points at it and skip cleanly otherwise.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pbrf.data as data
from pbrf.data import DATASETS, DataError, Dataset, _files, data_root, download, images, load

_MIRROR_ENV = os.environ.get("PBRF_DATA")
MIRROR = Path(_MIRROR_ENV).absolute() if _MIRROR_ENV else None
IDX = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# written in this (non-alphabetical) order; the labels must follow the alphabetical airplane, cat,
# dog
JPEG_COLOURS = {"dog": (20, 20, 230), "airplane": (230, 20, 20), "cat": (20, 230, 20)}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No test sees the real PBRF_DATA or the user's cache unless it asks for MIRROR explicitly."""
    monkeypatch.delenv("PBRF_DATA", raising=False)
    monkeypatch.setenv("PBRF_CACHE", str(tmp_path_factory.getbasetemp() / "pbrf-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))


# ---------------------------------------------------------------------------------------------
# fixture writers


def write_idx(path: Path, array: np.ndarray, compresslevel: int = 9) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
        *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=compresslevel) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def coded_images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images whose (first-channel) pixel (0, 0) is the label and (0, 1) the index."""
    x = np.random.default_rng(seed).integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    lead = (slice(None),) + (0,) * (len(shape) - 2)  # first channel, if any
    x[lead + (0, 0)] = labels
    x[lead + (0, 1)] = np.arange(len(labels)) % 256
    return x


def make_idx_dataset(root: Path, name: str = "mnist", n_train: int = 60, n_test: int = 30) -> dict:
    y_tr, y_te = np.arange(n_train) % 10, (np.arange(n_test) * 7) % 10
    arrays = {
        IDX[0]: coded_images(y_tr, (28, 28), 1), IDX[1]: y_tr,
        IDX[2]: coded_images(y_te, (28, 28), 2), IDX[3]: y_te,
    }
    for file, arr in arrays.items():
        write_idx(root / name / file, arr)
    return arrays


def cifar_batch(labels: np.ndarray, offset: int) -> dict:
    x = coded_images(labels, (3, 32, 32), offset)
    # green channel carries the global index
    x[:, 1, 5, 5] = (np.arange(len(labels)) + offset) % 256
    return {b"data": x.reshape(len(labels), 3072), b"labels": labels.tolist(), b"batch_label": b"x"}


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_cifar_pickle(root: Path, per_batch: int = 6, n_test: int = 12) -> tuple[np.ndarray,
    np.ndarray]:
    path = root / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    train_labels = []
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            y = (np.arange(per_batch) + b) % 10
            train_labels.append(y)
            batch = pickle.dumps(cifar_batch(y, (b - 1) * per_batch), protocol=2)
            add_member(tar, f"cifar-10-batches-py/data_batch_{b}", batch)
        y_te = np.arange(n_test) % 10
        add_member(tar, "cifar-10-batches-py/test_batch",
                   pickle.dumps(cifar_batch(y_te, 200), protocol=2))
        names = [n.encode() for n in images.CIFAR_CLASSES]
        add_member(tar, "cifar-10-batches-py/batches.meta",
                   pickle.dumps({b"label_names": names}, protocol=2))
    return np.concatenate(train_labels), y_te


def jpeg_bytes(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_cifar_jpeg(root: Path, n_per_class: int = 5, n_test_per_class: int = 3) -> Path:
    path = root / "cifar10" / "cifar10-jpeg.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    members = [
        (f"{split}/{cls}/{k:04d}.jpg", jpeg_bytes(colour))
        for split, n in (("train", n_per_class), ("test", n_test_per_class))
        for cls, colour in JPEG_COLOURS.items()
        for k in range(n)
    ]
    order = np.random.default_rng(0).permutation(len(members))  # archive order must not matter
    with tarfile.open(path, "w:gz") as tar:
        for i in order:
            add_member(tar, *members[i])
    return path


def make_uci(root: Path, name: str = "energy", n: int = 768) -> np.ndarray:
    rng = np.random.default_rng(3)
    table = np.column_stack([np.arange(n), rng.normal(5, 3, (n, 7)), rng.normal(20, 4, n)])
    path = root / "uci" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" \t".join(f"{v:.6f}" for v in row) + " \n" for row in table) + "\n")
    return table


def make_corpus(root: Path, n: int = 1000) -> str:
    """Text whose first 90 % uses "abcd \\n" and last 10 % "WXYZ" (so windows reveal their part)."""
    rng = np.random.default_rng(4)
    head = "".join(rng.choice(list("abcd \n"), size=n * 9 // 10))
    tail = "".join(rng.choice(list("WXYZ"), size=n - n * 9 // 10))
    path = root / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + tail)
    return head + tail


def md5_content(path: Path) -> str:
    opener = gzip.open if str(path).endswith(".gz") and not str(path).endswith(".tar.gz") else open
    with opener(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def assert_standardised(x: torch.Tensor, channel_axis: int = 1) -> None:
    """Per-channel (or per-column) mean 0 and population std 1, within float32 rounding."""
    dims = [d for d in range(x.dim()) if d != channel_axis]
    mean, std = x.double().mean(dims), x.double().std(dims, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)


def pixel_codes(x: torch.Tensor, channel: int = 0, h: int = 0, w: int = 0) -> np.ndarray:
    """Recover the uint8 code stored at one pixel of un-normalised images."""
    return np.rint(x[:, channel, h, w].double().numpy() * 255).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# data root


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "pbrf"
    monkeypatch.setenv("PBRF_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_data_root_relative_env_is_relative_to_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PBRF_DATA", "../shared/datasets")
    assert data_root() == tmp_path / ".." / "shared" / "datasets"


def test_env_var_is_used_by_load(monkeypatch, tmp_path):
    make_idx_dataset(tmp_path)
    monkeypatch.setenv("PBRF_DATA", str(tmp_path))
    assert len(load("mnist", verify=False).x_train) == 60


def test_datasets_names():
    expected = {"digits", "mnist", "fashion-mnist", "cifar10", "energy", "concrete", "shakespeare",
                "synthetic-regression", "synthetic-classification", "synthetic-binary"}
    assert set(DATASETS) == expected


# ---------------------------------------------------------------------------------------------
# digits (embedded)


def test_digits_default_split():
    ds = load("digits")
    assert ds.task == "classification"
    assert ds.x_train.shape == (1297, 1, 8, 8) and ds.x_test.shape == (500, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.long
    assert set(ds.y_train.tolist()) == set(range(10)) and ds.meta["n_classes"] == 10
    assert ds.meta["n_total"] == 1797 and ds.meta["input_shape"] == (1, 8, 8)
    assert_standardised(ds.x_train)


def test_digits_split_is_disjoint_and_covers_all_rows():
    raw = load("digits", normalize=False)
    rows = torch.cat([raw.x_train, raw.x_test]).reshape(1797, 64)
    table = np.loadtxt(images.DIGITS_FILE, delimiter=",")
    assert np.array_equal(np.sort(rows.numpy() * 16, axis=0).round(),
                          np.sort(table[:, :64], axis=0))
    assert len({tuple(r) for r in rows.tolist()}) == len({tuple(r) for r in table[:, :64].tolist()})


def test_digits_subsets_deterministic_nested_and_seeded():
    a = load("digits", n_train=100, n_test=50, seed=3, normalize=False)
    b = load("digits", n_train=100, n_test=50, seed=3, normalize=False)
    big = load("digits", n_train=300, n_test=50, seed=3, normalize=False)
    other = load("digits", n_train=100, n_test=50, seed=4, normalize=False)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert torch.equal(a.x_test, big.x_test)  # n_train does not move the test split
    big_rows = {tuple(r) for r in big.x_train.flatten(1).tolist()}
    assert all(tuple(r) in big_rows for r in a.x_train.flatten(1).tolist())
    assert not torch.equal(a.x_train, other.x_train)


def test_digits_classes_and_binary():
    ds = load("digits", classes=(8, 3), seed=1)
    assert set(ds.y_train.tolist()) == {0, 1} and ds.meta["classes"] == [8, 3]
    full = load("digits", seed=1, normalize=False)
    y_all = torch.cat([full.y_train, full.y_test])
    n_pool = int(((y_all == 3) | (y_all == 8)).sum())
    assert len(ds.y_train) + len(ds.y_test) == n_pool
    b = load("digits", classes=(8, 3), binary=True, seed=1)
    assert b.task == "binary" and b.y_train.dtype == torch.float32 and b.meta["n_outputs"] == 1
    assert torch.equal(b.y_train, ds.y_train.float()) and torch.equal(b.x_train, ds.x_train)


def test_digits_relabelling_keeps_images_with_their_labels():
    full = load("digits", normalize=False)
    sub = load("digits", classes=(8, 3), normalize=False)
    lookup = {tuple(x): int(y) for x,
              y in zip(full.x_train.flatten(1).tolist(), full.y_train.tolist())}
    lookup.update({tuple(x): int(y) for x,
                   y in zip(full.x_test.flatten(1).tolist(), full.y_test.tolist())})
    original = np.array([lookup[tuple(x)] for x in sub.x_train.flatten(1).tolist()])
    assert np.array_equal(np.where(sub.y_train.numpy() == 0, 8, 3), original)


def test_binary_requires_two_classes():
    with pytest.raises(DataError, match="exactly two classes"):
        load("digits", binary=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 1800}, "n_train=1800 exceeds"),
        ({"n_train": 0}, "n_train=0"),
        ({"classes": (3, 11)}, "11 is not a class"),
        ({"classes": (3, 3)}, "once"),
        ({"seed": -1}, "seed=-1"),
        ({"colour": True}, "unknown option"),
        ({"task": "regression"}, "task='regression'"),
    ],
)
def test_bad_options_raise_one_line_errors(kwargs, match):
    with pytest.raises(DataError, match=match) as err:
        load("digits", **kwargs)
    assert "\n" not in str(err.value)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load("imagenet")


def test_reconstruction_task_and_float64():
    ds = load("digits", n_train=20, n_test=10, task="reconstruction", dtype=torch.float64)
    assert ds.task == "reconstruction" and ds.x_train.dtype == torch.float64
    assert ds.meta["n_outputs"] == 64


# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_load_shapes_labels_and_normalisation(tmp_path, name):
    arrays = make_idx_dataset(tmp_path, name)
    ds = load(name, root=tmp_path, verify=False)
    assert ds.task == "classification"
    assert ds.x_train.shape == (60, 1, 28, 28) and ds.x_test.shape == (30, 1, 28, 28)
    assert ds.y_train.dtype == torch.long and torch.equal(
        ds.y_train, torch.from_numpy(arrays[IDX[1]]).long()
    )
    assert torch.equal(ds.y_test, torch.from_numpy(arrays[IDX[3]]).long())
    assert_standardised(ds.x_train)
    raw = arrays[IDX[0]].astype(np.float64) / 255
    assert ds.meta["mean"][0] == pytest.approx(raw.mean()) and ds.meta["std"][0] == pytest.approx(
        raw.std()
    )
    # test split uses train statistics
    expected = (arrays[IDX[2]][:, None] / 255 - raw.mean()) / raw.std()
    np.testing.assert_allclose(ds.x_test.numpy(), expected, atol=1e-5)


def test_idx_subset_deterministic_aligned_and_nested(tmp_path):
    make_idx_dataset(tmp_path)
    a = load("mnist", root=tmp_path, verify=False, n_train=17, n_test=9, seed=5, normalize=False)
    b = load("mnist", root=tmp_path, verify=False, n_train=17, n_test=9, seed=5, normalize=False)
    c = load("mnist", root=tmp_path, verify=False, n_train=30, n_test=9, seed=5, normalize=False)
    d = load("mnist", root=tmp_path, verify=False, n_train=17, n_test=9, seed=6, normalize=False)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    idx_a, idx_c, idx_d = (pixel_codes(ds.x_train, 0, 0, 1) for ds in (a, c, d))
    assert len(set(idx_a)) == 17 and set(idx_a) <= set(idx_c) and set(idx_a) != set(idx_d)
    # label pixel matches the label
    assert np.array_equal(pixel_codes(a.x_train), a.y_train.numpy())


def test_idx_subset_normalisation_uses_the_subset(tmp_path):
    make_idx_dataset(tmp_path)
    ds = load("mnist", root=tmp_path, verify=False, n_train=13, n_test=5, seed=2)
    assert_standardised(ds.x_train)


def test_idx_classes_relabel_and_binary(tmp_path):
    make_idx_dataset(tmp_path)
    ds = load("mnist", root=tmp_path, verify=False, classes=(7, 3), normalize=False)
    assert len(ds.y_train) == 12 and ds.meta["n_classes"] == 2 and ds.meta["n_outputs"] == 2
    original = pixel_codes(ds.x_train)
    assert np.array_equal(np.where(ds.y_train.numpy() == 0, 7, 3), original)
    b = load("mnist", root=tmp_path, verify=False, classes=(7, 3), binary=True, n_train=5, seed=1)
    assert (
        b.task == "binary"
        and b.y_train.dtype == torch.float32
        and set(b.y_train.tolist()) <= {0.0, 1.0}
    )
    assert len(b.y_train) == 5


def test_fashion_class_names(tmp_path):
    make_idx_dataset(tmp_path, "fashion-mnist")
    ds = load(
        "fashion-mnist", root=tmp_path, verify=False, classes=("Bag", "Trouser"), normalize=False
    )
    assert ds.meta["class_names"] == ["Bag", "Trouser"]
    assert np.array_equal(np.where(ds.y_train.numpy() == 0, 8, 1), pixel_codes(ds.x_train))


def test_idx_truncated_file_raises(tmp_path):
    arrays = make_idx_dataset(tmp_path)
    bad = tmp_path / "mnist" / IDX[0]
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 60, 28, 28) + arrays[IDX[0]].tobytes()[:-10])
    with pytest.raises(DataError, match="truncated") as err:
        load("mnist", root=tmp_path, verify=False)
    assert str(bad) in str(err.value)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar_pickle_tarball(tmp_path):
    y_tr, y_te = make_cifar_pickle(tmp_path)
    ds = load("cifar10", root=tmp_path, verify=False, normalize=False)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (12, 3, 32, 32)
    assert torch.equal(ds.y_train, torch.from_numpy(y_tr)) and torch.equal(
        ds.y_test, torch.from_numpy(y_te)
    )
    # channel-major layout: R plane first
    assert np.array_equal(pixel_codes(ds.x_train, 0, 0, 0), y_tr)
    # batches concatenated 1..5
    assert np.array_equal(pixel_codes(ds.x_train, 1, 5, 5), np.arange(30))
    assert ds.meta["class_names"][0] == "airplane" and ds.meta["source"].endswith(
        "cifar-10-python.tar.gz"
    )
    normed = load("cifar10", root=tmp_path, verify=False, n_train=20, seed=1)
    assert_standardised(normed.x_train)
    assert len(normed.meta["mean"]) == 3


def test_cifar_pickle_rejects_code_in_pickle(tmp_path):
    make_cifar_pickle(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps(Evil()))
        add_member(
            tar, "cifar-10-batches-py/test_batch", pickle.dumps(cifar_batch(np.arange(3), 0))
        )
    with pytest.raises(DataError, match="not allowed") as err:
        load("cifar10", root=tmp_path, verify=False)
    assert str(path) in str(err.value)


def test_cifar_jpeg_image_folder(tmp_path):
    make_cifar_jpeg(tmp_path)
    ds = load("cifar10", root=tmp_path, verify=False, normalize=False)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (9, 3, 32, 32)
    assert ds.meta["class_names"] == ["airplane", "cat", "dog"]
    colours = np.array([JPEG_COLOURS[c] for c in ds.meta["class_names"]])
    mean_rgb = ds.x_train.mean((2, 3)).numpy() * 255
    # label = alphabetical class
    np.testing.assert_allclose(mean_rgb, colours[ds.y_train.numpy()], atol=4)
    np.testing.assert_allclose(
        ds.x_test.mean((2, 3)).numpy() * 255, colours[ds.y_test.numpy()], atol=4
    )
    assert_standardised(load("cifar10", root=tmp_path, verify=False).x_train)


def test_cifar_jpeg_decodes_only_the_subset(tmp_path, monkeypatch):
    make_cifar_jpeg(tmp_path)
    calls = []
    original = images._JpegArchive._decode_one

    def counting(self, member):
        calls.append(member.name)
        return original(self, member)

    monkeypatch.setattr(images._JpegArchive, "_decode_one", counting)
    a = load("cifar10", root=tmp_path, verify=False, n_train=4, n_test=2, seed=7)
    assert len(calls) == 6
    b = load("cifar10", root=tmp_path, verify=False, n_train=4, n_test=2, seed=7)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_cifar_jpeg_full_split_is_cached(tmp_path, monkeypatch):
    make_cifar_jpeg(tmp_path)
    first = load("cifar10", root=tmp_path, verify=False)
    monkeypatch.setattr(
        images._JpegArchive, "_decode_one", lambda *_: pytest.fail("decoded despite the cache")
    )
    again = load("cifar10", root=tmp_path, verify=False)
    sub = load("cifar10", root=tmp_path, verify=False, n_train=5, n_test=3)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert sub.x_train.shape == (5, 3, 32, 32)


def test_cifar_source_choice_and_missing(tmp_path):
    with pytest.raises(DataError, match="missing") as err:
        load("cifar10", root=tmp_path)
    assert "cifar-10-python.tar.gz" in str(err.value) and "cifar10-jpeg.tar.gz" in str(err.value)
    make_cifar_jpeg(tmp_path)
    make_cifar_pickle(tmp_path)
    assert load("cifar10", root=tmp_path, verify=False).meta["source"].endswith("python.tar.gz")
    assert len(load("cifar10", root=tmp_path, verify=False, source="jpeg").x_train) == 15


# ---------------------------------------------------------------------------------------------
# UCI


@pytest.mark.parametrize(
    "name, n, sizes", [("energy", 768, (538, 154, 76)), ("concrete", 1030, (721, 206, 103))]
)
def test_uci_split_sizes_and_standardisation(tmp_path, name, n, sizes):
    table = make_uci(tmp_path, name, n)
    ds = load(name, root=tmp_path, verify=False, seed=1)
    assert ds.task == "regression"
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == sizes
    assert (
        ds.x_train.shape[1] == 8
        and ds.y_train.shape == (sizes[0], 1)
        and ds.y_train.dtype == torch.float32
    )
    assert_standardised(ds.x_train, channel_axis=1)
    assert_standardised(ds.y_train, channel_axis=1)
    rows = [
        np.rint(x[:, 0].double().numpy() * ds.meta["x_std"][0] + ds.meta["x_mean"][0]).astype(int)
        for x in (ds.x_train, ds.x_val, ds.x_test)
    ]
    assert sorted(np.concatenate(rows).tolist()) == list(range(n))  # disjoint and complete
    y = ds.y_train[:, 0].double().numpy() * ds.meta["y_std"][0] + ds.meta["y_mean"][0]
    # target column 8 stays with its row
    np.testing.assert_allclose(y, table[rows[0], 8], atol=1e-4)


def test_uci_seed_determinism_and_subsets(tmp_path):
    make_uci(tmp_path)
    a = load("energy", root=tmp_path, verify=False, seed=2, n_train=100, n_test=20)
    b = load("energy", root=tmp_path, verify=False, seed=2, n_train=100, n_test=20)
    c = load("energy", root=tmp_path, verify=False, seed=3, n_train=100, n_test=20)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (100, 154, 20)
    assert_standardised(a.x_train, channel_axis=1)
    with pytest.raises(DataError, match="n_test=77 exceeds the 76"):
        load("energy", root=tmp_path, verify=False, n_test=77)


def test_uci_malformed_text(tmp_path):
    path = tmp_path / "uci" / "concrete.txt"
    path.parent.mkdir(parents=True)
    path.write_text("1 2 3\n4 5 x\n")
    with pytest.raises(DataError) as err:
        load("concrete", root=tmp_path, verify=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# text


def test_shakespeare_windows_vocab_and_split(tmp_path):
    text = make_corpus(tmp_path)
    ds = load("shakespeare", root=tmp_path, verify=False, n_train=50, n_test=20, seq_len=16)
    vocab = ds.meta["vocab"]
    assert (
        ds.task == "language_model"
        and vocab == "".join(sorted(set(text)))
        and ds.meta["vocab_size"] == 10
    )
    assert (
        ds.x_train.shape == (50, 16)
        and ds.y_test.shape == (20, 16)
        and ds.x_train.dtype == torch.long
    )
    assert torch.equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
    for x, y in zip(ds.x_train.tolist(), ds.y_train.tolist()):
        window = "".join(vocab[t] for t in x + y[-1:])
        assert window in text[:900]  # first 90 %, never crossing into the test part
    for x, y in zip(ds.x_test.tolist(), ds.y_test.tolist()):
        assert "".join(vocab[t] for t in x + y[-1:]) in text[900:]
    assert len(set(map(tuple, ds.x_train.tolist()))) == 50  # distinct start positions
    again = load("shakespeare", root=tmp_path, verify=False, n_train=50, n_test=20, seq_len=16)
    assert torch.equal(ds.x_train, again.x_train)


def test_shakespeare_defaults_and_bad_seq_len(tmp_path):
    make_corpus(tmp_path, 30_000)
    ds = load("shakespeare", root=tmp_path, verify=False)
    assert (
        ds.x_train.shape == (2000, 64) and ds.x_test.shape == (200, 64) and ds.meta["seq_len"] == 64
    )
    with pytest.raises(DataError, match="seq_len=3000"):
        load("shakespeare", root=tmp_path, verify=False, seq_len=3000)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_regression_is_deterministic_and_linear():
    a = load("synthetic-regression", n_train=400, n_test=30, seed=1, n_features=4, noise=0.05)
    b = load("synthetic-regression", n_train=400, n_test=30, seed=1, n_features=4, noise=0.05)
    c = load("synthetic-regression", n_train=400, n_test=10, seed=1, n_features=4, noise=0.05)
    assert a.task == "regression" and a.x_train.shape == (400, 4) and a.y_train.shape == (400, 1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_train, c.x_train)
    w = torch.linalg.lstsq(a.x_train.double(), a.y_train.double()).solution
    residual = a.y_train.double() - a.x_train.double() @ w
    assert 0.03 < residual.std().item() < 0.07
    torch.testing.assert_close(
        w, torch.tensor(a.meta["weights"], dtype=torch.float64), atol=0.02, rtol=0
    )


def test_synthetic_classification_and_binary():
    ds = load("synthetic-classification", n_train=300, n_classes=4, noise=0.1, seed=2)
    assert ds.task == "classification" and set(ds.y_train.tolist()) == {0, 1, 2, 3}
    centroids = torch.stack([ds.x_train[ds.y_train == k].mean(0) for k in range(4)])
    nearest = torch.cdist(ds.x_test, centroids).argmin(1)
    assert (nearest == ds.y_test).float().mean() > 0.95  # labels match the blobs
    sub = load(
        "synthetic-classification", n_train=300, n_classes=4, classes=(3, 1), binary=True, seed=2
    )
    assert (
        sub.task == "binary" and len(sub.y_train) == 300 and set(sub.y_train.tolist()) == {0.0, 1.0}
    )
    bin_ = load("synthetic-binary", seed=0)
    assert (
        bin_.task == "binary"
        and bin_.y_train.shape == (100,)
        and bin_.y_train.dtype == torch.float32
    )
    assert 0.2 < bin_.y_train.mean() < 0.8


# ---------------------------------------------------------------------------------------------
# checksums and missing files


def test_missing_file_error_names_path_and_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load("mnist", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "mnist" / IDX[0]) in msg and "missing" in msg
    assert "PBRF_DATA" in msg and "download('mnist')" in msg and "\n" not in msg


def test_corrupted_file_fails_verification(tmp_path):
    make_idx_dataset(tmp_path)  # fixture content cannot match the real MNIST checksums
    with pytest.raises(DataError, match="checksum mismatch") as err:
        load("mnist", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "mnist" / IDX[0]) in msg and "6bbc9ace898e44ae57da46a324031adb" in msg
    assert md5_content(tmp_path / "mnist" / IDX[0]) in msg and "\n" not in msg


def test_verification_passes_is_cached_and_detects_change(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path)
    for name in IDX:
        monkeypatch.setitem(
            _files.CHECKSUMS, f"mnist/{name}", md5_content(tmp_path / "mnist" / name)
        )
    hashed = []
    original = _files.md5sum
    monkeypatch.setattr(_files, "md5sum", lambda p, **kw: hashed.append(p) or original(p, **kw))
    load("mnist", root=tmp_path)
    assert len(hashed) == 4
    load("mnist", root=tmp_path)
    assert len(hashed) == 4  # second load served from the sidecar
    labels = tmp_path / "mnist" / IDX[1]
    write_idx(labels, np.arange(60) % 10 + 0, compresslevel=1)  # same content, different gzip bytes
    os.utime(labels, ns=(1, 1))
    load("mnist", root=tmp_path)
    assert len(hashed) == 5  # changed file re-hashed; content md5 still matches
    write_idx(labels, (np.arange(60) + 1) % 10)
    with pytest.raises(DataError, match="checksum mismatch") as err:
        load("mnist", root=tmp_path)
    assert str(labels) in str(err.value)


def test_not_gzip_raises_data_error(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path)
    bad = tmp_path / "mnist" / IDX[0]
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(DataError) as err:
        load("mnist", root=tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# download on loopback


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """HTTP server on 127.0.0.1 (ephemeral port) serving a mirror-shaped fixture folder."""
    served = tmp_path / "served"
    served.mkdir()
    _QuietHandler.requests = []
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_download_fetches_verifies_and_skips_present_files(server, tmp_path):
    served, url = server
    make_idx_dataset(served)
    sums = {f"mnist/{n}": md5_content(served / "mnist" / n) for n in IDX}
    dest = tmp_path / "dest"
    paths = download("mnist", root=dest, base_url=url, progress=False, checksums=sums)
    assert paths == [dest / "mnist" / n for n in IDX]
    for n in IDX:
        assert (dest / "mnist" / n).read_bytes() == (served / "mnist" / n).read_bytes()
    assert sorted(p.name for p in (dest / "mnist").iterdir()) == sorted(IDX)  # no temp files left
    assert len(_QuietHandler.requests) == 4
    download("mnist", root=dest, base_url=url, progress=False, checksums=sums)
    assert len(_QuietHandler.requests) == 4  # already present and verified: nothing fetched
    assert len(load("mnist", root=dest, verify=False).x_train) == 60


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    served, url = server
    make_uci(served, "energy", 50)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        download("energy", root=dest, base_url=url, progress=False)
    assert "uci/energy.txt" in str(err.value) and "\n" not in str(err.value)
    assert not (dest / "uci").exists() or list((dest / "uci").iterdir()) == []


def test_download_http_error_leaves_nothing(server, tmp_path):
    _, url = server
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="download failed"):
        download("shakespeare", root=dest, base_url=url, progress=False)  # not served: 404
    assert (
        not (dest / "tinyshakespeare").exists() or list((dest / "tinyshakespeare").iterdir()) == []
    )


def test_download_nothing_for_embedded_and_unknown(tmp_path):
    assert (
        download("digits", root=tmp_path) == []
        and download("synthetic-binary", root=tmp_path) == []
    )
    with pytest.raises(DataError, match="unknown dataset"):
        download("imagenet", root=tmp_path)


def test_download_sources_are_canonical():
    for name, rels in _files.DOWNLOADS.items():
        assert name in DATASETS
        for rel in rels:
            assert (
                _files.SOURCES[rel].startswith(("https://", "http://")) and rel in _files.CHECKSUMS
            )
    sources = _files.SOURCES
    assert (
        sources["cifar10/cifar-10-python.tar.gz"]
        == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )
    assert sources["mnist/train-images-idx3-ubyte.gz"].startswith(
        "https://ossci-datasets.s3.amazonaws.com/mnist/"
    )


# ---------------------------------------------------------------------------------------------
# the real mirror (PBRF_DATA)


def mirror_file(rel: str) -> Path:
    if MIRROR is None:
        pytest.skip("PBRF_DATA is not set; full-size dataset tests need the dataset mirror")
    if not (MIRROR / rel).is_file():
        pytest.skip(f"{MIRROR / rel} is absent")
    return MIRROR / rel


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mirror_idx(name):
    for n in IDX:
        path = mirror_file(f"{name}/{n}")
        assert md5_content(path) == _files.CHECKSUMS[f"{name}/{n}"]
    ds = load(name, root=MIRROR)  # verify=True
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    if name == "fashion-mnist":  # balanced test set
        assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    assert ds.meta["n_total"] == 70000 and sorted(set(ds.y_train.tolist())) == list(range(10))
    if name == "mnist":
        assert ds.meta["mean"][0] == pytest.approx(0.1307, abs=1e-4)
        assert ds.meta["std"][0] == pytest.approx(0.3081, abs=1e-4)


def test_mirror_cifar10_jpeg_subset():
    path = mirror_file("cifar10/cifar10-jpeg.tar.gz")
    assert _files.md5sum(path, content=False) == "f60a0a931394f53a632f4121f637bbf5"
    ds = load("cifar10", root=MIRROR, n_train=200, n_test=100, source="jpeg")
    assert ds.x_train.shape == (200, 3, 32, 32) and ds.x_test.shape == (100, 3, 32, 32)
    assert ds.meta["n_total"] == 60000 and ds.meta["class_names"][0] == "airplane"
    assert set(ds.y_train.tolist()) <= set(range(10)) and len(set(ds.y_train.tolist())) > 5
    assert_standardised(ds.x_train)


@pytest.mark.parametrize("name, sizes", [("energy", (538, 154, 76)), ("concrete", (721, 206, 103))])
def test_mirror_uci(name, sizes):
    mirror_file(f"uci/{name}.txt")
    ds = load(name, root=MIRROR)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == sizes and ds.x_train.shape[1] == 8


def test_mirror_shakespeare():
    mirror_file("tinyshakespeare/input.txt")
    ds = load("shakespeare", root=MIRROR)
    assert ds.meta["n_total"] == 1_115_394 and ds.meta["vocab_size"] == 65
    assert ds.x_train.shape == (2000, 64) and ds.x_test.shape == (200, 64)


def test_mirror_via_env(monkeypatch):
    mirror_file("uci/energy.txt")
    monkeypatch.setenv("PBRF_DATA", _MIRROR_ENV)
    assert data_root() == MIRROR and len(load("energy").x_train) == 538


def test_dataset_repr_and_pairs():
    ds = load("synthetic-regression", n_train=3, n_test=2)
    assert isinstance(ds, Dataset) and "x_train=(3, 5)" in repr(ds)
    assert (
        ds.train[0] is ds.x_train
        and ds.val is None
        and data.options("shakespeare") == {"seq_len": 64}
    )
