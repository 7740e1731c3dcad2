"""The run directory and its SQLite store.

One run directory per experiment::

    RUN_DIR/
      config.json            the resolved config (written first; a different config is refused)
      theta_s.safetensors    θ^s (+ theta_s.json sidecar), via pbrf.save_checkpoint
      results.sqlite         every measurement and diagnostic (arrays as .npy bytes)
      report.md, summary.json, figures/*.png

Tables of ``results.sqlite``:

* ``meta(key, value)`` — JSON values (fingerprint of the config, timings);
* ``arrays(name, data)`` — setup arrays (test indices, removal sets, all-train influence scores);
* ``chunks(kind, chunk, dm, df, diagnostics, seconds)`` — one row per (response kind, chunk of
  removals): ``dm`` ``[n_test, chunk]`` loss changes, ``df`` ``[chunk, n_test, *out]`` output
  changes, ``diagnostics`` a JSON list of per-removal dicts, ``extra`` an optional array (for
  ``linearized``: the actual change ``m(θ^s + Δθ) − m(θ^s)`` ``[n_test, chunk]``).

Each row is written in its own transaction, so a run killed at any moment keeps every finished
(kind, chunk) and loses nothing else; :meth:`Store.done` tells the resumed run what to skip.

A database that SQLite finds corrupt raises :class:`StoreError` (a :class:`ConfigError`: one line
naming the file and the fix, ``--overwrite``); a write the disk refuses (full, ``ulimit -f``,
read-only) raises ``OSError`` naming the file, and the run resumes once the cause is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import shlex
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from pbrf.experiment.config import ConfigError
from pbrf.fileio import atomic_write, dumps, npy_bytes

__all__ = ["Store", "StoreError", "ChunkResult", "to_blob", "from_blob", "atomic_write_text",
           "run_command", "config_digest"]

log = logging.getLogger(__name__)

DB_NAME = "results.sqlite"
CONFIG_NAME = "config.json"
#: θ^s of a run (written by the pipeline once base training succeeded); without it nothing is
#: computed yet.
CHECKPOINT_NAME = "theta_s.safetensors"


#: ``meta`` key of the SHA-256 of the config fingerprint the results were computed for (written
#: when the run is created; a run made before it was recorded has none and is trusted).
FINGERPRINT_KEY = "config_sha256"


class StoreError(ConfigError):
    """The run's database is corrupt or unreadable; the message names the file and the fix."""


def run_command(run_dir: str | Path, overwrite: bool = False) -> str:
    """The command that resumes (or, with ``overwrite``, restarts) the run in ``run_dir``, rebuilt
    from its own ``config.json``: ``pbrf run RUN/config.json --out RUN``.
    """
    run_dir = Path(run_dir)
    cmd = f"pbrf run {shlex.quote(str(run_dir / CONFIG_NAME))} --out {shlex.quote(str(run_dir))}"
    return cmd + (" --overwrite" if overwrite else "")


def config_digest(fingerprint: str) -> str:
    """SHA-256 (hex) of a config fingerprint (:meth:`ExperimentConfig.fingerprint`)."""
    return hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS arrays (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    kind TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    dm BLOB NOT NULL,
    df BLOB,
    diagnostics TEXT NOT NULL,
    seconds REAL NOT NULL,
    extra BLOB,
    PRIMARY KEY (kind, chunk)
);
"""


to_blob = npy_bytes  #: an array as ``.npy`` bytes (dtype and shape preserved, no pickle)


def from_blob(blob: bytes) -> np.ndarray:
    """Inverse of :func:`to_blob`."""
    return np.load(io.BytesIO(blob), allow_pickle=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`pbrf.fileio.atomic_write`)."""
    atomic_write(path, text)


class ChunkResult:
    """What one (kind, chunk) computation returns: ``dm [n_test, k]``, ``df [k, n_test, *out]``,
    diagnostics.
    """

    def __init__(self, kind: str, chunk: int, dm: np.ndarray, df: np.ndarray | None,
                 diagnostics: list[dict], seconds: float = 0.0,
                     extra: np.ndarray | None = None) -> None:
        self.kind, self.chunk = kind, int(chunk)
        self.dm, self.df = np.asarray(dm), None if df is None else np.asarray(df)
        self.diagnostics, self.seconds = list(diagnostics), float(seconds)
        self.extra = None if extra is None else np.asarray(extra)

    def __repr__(self) -> str:
        return f"ChunkResult({self.kind!r}, chunk={self.chunk}, dm={self.dm.shape})"


_SQLITE_ERRNO = {13: errno.ENOSPC, 8: errno.EROFS, 10: errno.EIO, 14: errno.EACCES,
                 23: errno.EACCES}


def _corrupt(path: Path, err: Exception) -> StoreError:
    return StoreError(
        f"{str(path)!r} is corrupt ({err}); pass --overwrite to start this run again "
        "(it discards the stored results), or --out DIR for a new run."
    )


@contextlib.contextmanager
def _sqlite_errors(path: Path, reading: bool = False):
    """Turn SQLite failures into one-line errors naming the file: StoreError (corrupt) or OSError
    (disk).

    With ``reading``, undecodable stored values (``.npy`` blobs, JSON) count as corruption too.
    """
    try:
        yield
    except sqlite3.DatabaseError as err:
        code = getattr(err, "sqlite_errorcode", 0) & 0xFF
        if code in (11, 26) or type(err) is sqlite3.DatabaseError:  # SQLITE_CORRUPT, SQLITE_NOTADB
            raise _corrupt(path, err) from None
        if code in _SQLITE_ERRNO:
            name = getattr(err, "sqlite_errorname", "")
            raise OSError(_SQLITE_ERRNO[code], f"{err}{f' ({name})' if name else ''}",
                          str(path)) from None
        raise
    except (ValueError, EOFError) as err:
        if not reading or isinstance(err, ConfigError):
            raise
        raise _corrupt(path, err) from None


class Store:
    """The SQLite database of one run directory (open with :meth:`open`, close with :meth:`close`).

    Args:
        run_dir: the run directory (must exist).
        readonly: open the database read-only (workers).
    """

    def __init__(self, run_dir: str | Path, readonly: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = path = self.run_dir / DB_NAME
        self.conn = None
        with self._errors():
            if readonly:
                self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
                # a garbage file fails here
                self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            else:
                self.conn = sqlite3.connect(path, timeout=60)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
                self.conn.executescript(_SCHEMA)
                self.conn.commit()
                self._check_integrity()

    def _errors(self, reading: bool = False):
        return _sqlite_errors(self.path, reading)

    def _check_integrity(self) -> None:
        """A cheap structural check (``PRAGMA quick_check``) so that a truncated file fails at open,
        not mid-run.
        """
        row = self.conn.execute("PRAGMA quick_check(1)").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")

    def close(self) -> None:
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- meta and arrays
    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (own transaction)."""
        with self._errors(), self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The JSON value under ``key`` (``default`` if absent)."""
        with self._errors(reading=True):
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return default if row is None else json.loads(row[0])

    def put_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Store several named arrays in one transaction."""
        blobs = [(k, to_blob(v)) for k, v in arrays.items()]
        with self._errors(), self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO arrays VALUES (?, ?)", blobs)

    def get_array(self, name: str) -> np.ndarray | None:
        """A named array (``None`` if absent)."""
        with self._errors(reading=True):
            row = self.conn.execute("SELECT data FROM arrays WHERE name = ?", (name,)).fetchone()
            return None if row is None else from_blob(row[0])

    def check_config(self, fingerprint: str, record: bool = False) -> None:
        """Refuse a ``config.json`` other than the one the stored results were computed for
        (compared by :func:`config_digest`); with ``record``, store it when none is stored yet.

        Raises:
            ConfigError: the stored digest differs (one line naming ``config.json`` and the fix).
        """
        stored, digest = self.get_meta(FINGERPRINT_KEY), config_digest(fingerprint)
        if stored is None and record:
            self.set_meta(FINGERPRINT_KEY, digest)
        elif stored is not None and stored != digest:
            run_dir = self.run_dir
            raise ConfigError(
                f"{str(run_dir / CONFIG_NAME)!r} is not the config the results in "
                f"{str(self.path)!r} were computed for (it was edited); restore the run's "
                f"config, or run the edited one in a new folder: `pbrf run "
                f"{shlex.quote(str(run_dir / CONFIG_NAME))} --out NEW_DIR`."
            )

    # -------------------------------------------------------------- chunks
    def put_chunk(self, result: ChunkResult) -> None:
        """Store one (kind, chunk) result atomically (one transaction)."""
        df = None if result.df is None else to_blob(result.df)
        extra = None if result.extra is None else to_blob(result.extra)
        diag = dumps(result.diagnostics)
        with self._errors(), self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (result.kind, result.chunk, to_blob(result.dm), df, diag, result.seconds, extra),
            )

    def done(self) -> set[tuple[str, int]]:
        """The (kind, chunk) pairs already stored."""
        with self._errors(reading=True):
            return {(k, int(c)) for k, c in self.conn.execute("SELECT kind, chunk FROM chunks")}

    def get_chunk(self, kind: str, chunk: int) -> ChunkResult | None:
        """One stored result (``None`` if absent)."""
        with self._errors(reading=True):
            row = self.conn.execute(
                "SELECT dm, df, diagnostics, seconds, extra FROM chunks WHERE kind = ? AND chunk = "
                "?", (kind, chunk)
            ).fetchone()
            if row is None:
                return None
            df = None if row[1] is None else from_blob(row[1])
            extra = None if row[4] is None else from_blob(row[4])
            return ChunkResult(kind, chunk, from_blob(row[0]), df, json.loads(row[2]), row[3],
                               extra)

    def gather(self, kind: str, n_chunks: int) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
        """Concatenate the chunks of one kind: ``dm [n_test, K]``, ``df [K, n_test, *out]``,
        diagnostics.

        Raises:
            KeyError: a chunk is missing (the run is not finished).
        """
        parts = [self.get_chunk(kind, c) for c in range(n_chunks)]
        missing = [c for c, p in enumerate(parts) if p is None]
        if missing:
            raise KeyError(f"kind {kind!r}: chunks {missing} are not stored yet")
        dm = np.concatenate([p.dm for p in parts], axis=1)
        df = None if any(p.df is None for p in parts) else np.concatenate([p.df for p in parts],
            axis=0)
        diags = [d for p in parts for d in p.diagnostics]
        return dm, df, diags

    def gather_extra(self, kind: str, n_chunks: int) -> np.ndarray | None:
        """Concatenated ``extra`` arrays of one kind along removals (``None`` if any is missing)."""
        parts = [self.get_chunk(kind, c) for c in range(n_chunks)]
        if any(p is None or p.extra is None for p in parts):
            return None
        return np.concatenate([p.extra for p in parts], axis=1)

    def kind_seconds(self) -> dict[str, float]:
        """Total compute seconds per kind."""
        with self._errors(reading=True):
            rows = self.conn.execute("SELECT kind, SUM(seconds) FROM chunks GROUP BY kind")
            return {k: float(s) for k, s in rows}
