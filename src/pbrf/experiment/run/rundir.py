"""The run directory's one owner: what a folder holds, its lock, and how it is replaced.

Every command that writes a run directory goes through here: :func:`check_run_dir` decides
(read-only) whether ``--out DIR`` is new, resumed or replaced, comparing config fingerprints;
:func:`exclusive` holds the lock file beside the folder; :func:`open_run` makes that decision
again under the lock and writes ``config.json`` first; :func:`discard` deletes a folder by renaming
it aside first; :func:`check_multi_seed_dir` is the same check for a multi-seed folder
(``run.seeds > 1``), whose seeds are ordinary run directories ``seed=K/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

from pbrf.experiment.config import ConfigError, ExperimentConfig
from pbrf.experiment.run.store import CHECKPOINT_NAME, CONFIG_NAME, atomic_write_text

__all__ = ["check_out_dir", "check_run_dir", "check_multi_seed_dir", "open_run", "discard",
           "exclusive", "seed_runs", "seed_config", "SEED_DIR",
           "lock_path", "remove_trash"]

log = logging.getLogger(__name__)


def check_run_dir(run_dir: Path, config: ExperimentConfig, overwrite: bool) -> str:
    """Decide what to do with ``run_dir`` for ``config``: ``"new"``, ``"resume"`` or
    ``"overwrite"``.

    * no directory, or an empty one: ``"new"``;
    * ``overwrite``: ``"overwrite"`` — the run directory is started afresh, whatever it holds
      (also a run of the same config, e.g. with a corrupt store);
    * the same config: ``"resume"``;
    * a different config, but nothing computed yet (no θ^s at the top nor in a seed's folder
      ``seed=K/`` of a multi-seed run: e.g. base training failed):
      ``"overwrite"``
      — nothing of value is lost, so the corrected command needs no ``--overwrite``;
    * a different config with results: refused.

    Only reads; the caller decides again under the run's lock before writing.

    Raises:
        ConfigError: the directory holds results of a different config and ``overwrite`` is False,
            or it is a non-empty directory that is not a run directory (never overwritten).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_NAME
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} is a file; pass another --out DIR.")
    if not cfg_path.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):  # never delete a folder pbrf did not make
            raise ConfigError(f"{str(run_dir)!r} is not empty and is not a pbrf run directory; "
                              "pass another --out DIR.")
        return "new"
    if overwrite:
        return _overwritable(run_dir)
    readable = True
    try:
        old = ExperimentConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
        same = old.fingerprint() == config.fingerprint()
    except (ConfigError, ValueError, OSError):
        same = readable = False
    if same:
        return "resume"
    if not _holds_results(run_dir):
        log.info("%s holds a different config but no results yet; replacing it", run_dir)
        return _overwritable(run_dir)
    what = "a run of a different config" if readable else f"an unreadable {CONFIG_NAME}"
    raise ConfigError(f"{str(run_dir)!r} holds {what}; pass --overwrite to replace it or --out DIR "
                      "for a new run.")


def _holds_results(run_dir: Path) -> bool:
    """Whether a run directory holds a θ^s: at its top, or in a seed's folder ``seed=K/`` of a
    multi-seed run (whose top never has one).
    """
    return (run_dir / CHECKPOINT_NAME).exists() or any(
        (seed / CHECKPOINT_NAME).exists() for seed in run_dir.glob("seed=*"))


def _overwritable(run_dir: Path) -> str:
    """``"overwrite"``, unless the directory holds the current working directory (it is deleted)."""
    here, target = Path.cwd().resolve(), run_dir.resolve()
    if here == target or target in here.parents:
        raise ConfigError(f"cannot replace {str(run_dir)!r}: it holds the current directory; run "
                          "pbrf from "
                          "elsewhere or pass another --out DIR.")
    return "overwrite"


def open_run(config: ExperimentConfig, run_dir: Path, overwrite: bool = False) -> str:
    """Create, resume or overwrite ``run_dir``; writes ``config.json`` first. Returns the mode.

    Call it holding the run's lock (:func:`exclusive`, as :func:`run_experiment` does): the
    decision is made here, under the lock, so that no other process can be using the directory.
    An overwritten directory is first renamed aside and then deleted, so a kill in between leaves
    either the old run or the new one, never a half-deleted directory.
    """
    run_dir = Path(run_dir)
    mode = check_run_dir(run_dir, config, overwrite)
    remove_trash(run_dir)
    if mode == "overwrite":
        discard(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode != "resume":
        atomic_write_text(run_dir / CONFIG_NAME, config.to_json() + "\n")
    return mode


def discard(run_dir: Path) -> None:
    """Delete ``run_dir``: renamed aside first, so a kill in between leaves it whole or gone."""
    trash = run_dir.parent / f".{run_dir.name}.deleting-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(run_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_trash(run_dir: Path) -> None:
    """Delete what an overwrite killed mid-way left aside (``.NAME.deleting-*`` beside the run)."""
    if run_dir.parent.is_dir():
        for trash in run_dir.parent.glob(f".{run_dir.name}.deleting-*"):
            shutil.rmtree(trash, ignore_errors=True)


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run directory: ``.NAME.lock`` beside it, so it survives an overwrite."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def exclusive(run_dir: Path, elsewhere: str | None = "pass --out DIR"):
    """Hold an exclusive lock on the run directory (released by the OS even after kill -9).

    The lock file lives beside the run directory, not inside it, so ``--overwrite`` cannot delete
    it from under a running process; it is taken before the resume/overwrite decision.
    ``elsewhere``: how the caller's command names another folder (None: it has no such option).
    """
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fix = (f"wait for it or {elsewhere}" if elsewhere
                   else "wait for it to finish, then run the same command again")
            raise ConfigError(f"another pbrf process is running in {str(run_dir)!r}; {fix}.") \
                from None
        yield


def check_multi_seed_dir(config: ExperimentConfig, run_dir: Path, overwrite: bool) -> None:
    """The multi-seed folder itself: a file, or a non-empty folder pbrf did not make, is refused;
    a different run's folder is refused when its seeds hold results (unless ``overwrite``).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} is a file; pass another --out DIR.")
    cfg = run_dir / CONFIG_NAME
    if not cfg.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise ConfigError(f"{str(run_dir)!r} is not empty and is not a pbrf run directory; "
                              "pass another --out DIR.")
        return
    try:
        old = json.loads(cfg.read_text(encoding="utf-8"))
        old_seeds = int((old.get("run") or {}).get("seeds", 1))
    except (ValueError, OSError, TypeError, AttributeError):
        old, old_seeds = None, 1
    if old_seeds <= 1 and old is not None and not overwrite:
        raise ConfigError(f"{str(run_dir)!r} holds a single-seed run; pass --overwrite to replace "
                          "it or --out DIR for the multi-seed run.")


#: Name of the folder of one seed's run inside a multi-seed run directory.
SEED_DIR = "seed={}"


def seed_config(config: ExperimentConfig, train_seed: int) -> ExperimentConfig:
    """The config of one seed's run: ``train.seed = train_seed`` and ``run.seeds = 1``."""
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, seed=train_seed),
        run=dataclasses.replace(config.run, seeds=1))


def seed_runs(config: ExperimentConfig, run_dir: Path) -> list[tuple[int, ExperimentConfig, Path]]:
    """``(train seed, config, run directory)`` of each seed of a multi-seed run."""
    base = config.train.seed
    return [(base + k, seed_config(config, base + k), Path(run_dir) / SEED_DIR.format(base + k))
            for k in range(config.run.seeds)]


def check_out_dir(run_dir: Path, config: ExperimentConfig, overwrite: bool) -> None:
    """The read-only check of ``--out DIR`` for a run of ``config``, before any data is loaded:
    :func:`check_run_dir` for a single-seed run; for ``run.seeds > 1`` :func:`check_multi_seed_dir`
    and, unless ``overwrite``, :func:`check_run_dir` on every seed's folder.
    """
    run_dir = Path(run_dir)
    if config.run.seeds <= 1:
        check_run_dir(run_dir, config, overwrite)
        return
    check_multi_seed_dir(config, run_dir, overwrite)
    if not overwrite:
        for _, cfg, seed_dir in seed_runs(config, run_dir):
            check_run_dir(seed_dir, cfg, False)

