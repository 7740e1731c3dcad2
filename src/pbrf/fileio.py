"""Files: one atomic write and one JSON policy for everything pbrf writes.

* :func:`atomic_write` writes a file through a temporary file beside it and a rename, so an
  interrupted write leaves the previous file intact and no partial file behind; the new file
  gets the usual permissions (0666 minus the umask).
* :func:`jsonable` / :func:`dumps`: the one JSON sanitiser (``summary.json``, the SQLite store's
  diagnostics and meta, checkpoint sidecars, ``removals.json``). The output is always strict JSON
  (``allow_nan=False``); numpy and torch scalars and arrays become numbers and lists. Non-finite
  floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (raw records: the store, sidecars;
  ``float()`` reads them back) or, with ``nonfinite="null"``, ``None`` (summaries, where an
  undefined statistic is ``None`` anyway, see :mod:`pbrf.experiment.analysis`). Other objects
  become their ``str``, or raise ``TypeError`` with ``unknown="error"`` (checkpoint metadata).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "jsonable", "dumps", "npy_bytes", "name_os_error", "current_umask"]


def current_umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``content`` to ``path`` atomically; returns ``path``.

    ``content``: text (UTF-8), bytes, or ``write(tmp_path)`` that creates the file itself. The
    parent folder is created. A failed write names ``path`` in its ``OSError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if not callable(content):
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
                fh.flush()
                os.fsync(fh.fileno())
        if callable(content):
            content(tmp)
        # mkstemp creates 0600, and a writer may recreate the file (safetensors' save_file does):
        # the mode is set on whatever file now stands at tmp, just before it takes path's place
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # a failed write names no file: name it
        if isinstance(err, OSError) and err.filename is None:
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from None
        raise
    return path


def name_os_error(err: OSError, where: str | Path) -> OSError:
    """``err``, naming ``where`` (e.g. a run directory) when the failed call named no file."""
    if err.filename is not None or isinstance(err, BrokenPipeError):
        return err
    return type(err)(err.errno, err.strerror or str(err), f"{where}{os.sep}")


def jsonable(obj: Any, nonfinite: str = "string", unknown: str = "str") -> Any:
    """A copy of ``obj`` that strict JSON accepts, by the module's policy (module docstring)."""
    if nonfinite not in ("string", "null") or unknown not in ("str", "error"):
        raise ValueError("jsonable: nonfinite must be 'string' or 'null', unknown 'str' or "
                         "'error'; "
                         f"got {nonfinite!r}, {unknown!r}.")
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, nonfinite, unknown) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, nonfinite, unknown) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if math.isfinite(obj):
            return float(obj)
        return str(float(obj)) if nonfinite == "string" else None
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays, torch tensors (also 0-d)
        return jsonable(obj.tolist(), nonfinite, unknown)
    if unknown == "error":
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
    return str(obj)


def dumps(obj: Any, nonfinite: str = "string", unknown: str = "str", **kwargs) -> str:
    """``json.dumps`` of :func:`jsonable` ``(obj, nonfinite, unknown)`` (strict JSON)."""
    return json.dumps(jsonable(obj, nonfinite, unknown), allow_nan=False, **kwargs)


def npy_bytes(array) -> bytes:
    """An array as ``.npy`` bytes (dtype and shape preserved, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
