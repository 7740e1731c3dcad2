"""The stored arrays of a finished run, read back from its ``results.sqlite``.

What :func:`pbrf.load_run` (``Run.responses``), ``pbrf evaluate`` and ``pbrf estimators`` compare
against: Δm per response kind, the removal sets, the test points and which removals diverged or
are not certified.
"""

from __future__ import annotations

import math
from pathlib import Path

from pbrf.experiment.config import ConfigError
from pbrf.experiment.run.context import read_config
from pbrf.experiment.run.selection import groups_from_array
from pbrf.experiment.run.store import Store, run_command
from pbrf.experiment.run.summary import objective_defined

__all__ = ["RunDataError", "run_arrays"]


class RunDataError(ConfigError):
    """Bad scores file or run directory; one-line message naming the fix."""


def run_arrays(run_dir: str | Path) -> dict:
    """The stored arrays of a finished run: ``dm`` per kind, ``groups``, ``test_index``,
    ``n_train``.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if not (run_dir / "results.sqlite").is_file():
        raise RunDataError(f"{str(run_dir)!r} has no results yet; finish it with "
                           f"`{run_command(run_dir)}`.")
    with Store(run_dir, readonly=True) as store:
        groups_arr = store.get_array("groups")
        if groups_arr is None:
            raise RunDataError(f"{str(run_dir)!r} is not set up yet; finish it with "
                               f"`{run_command(run_dir)}`.")
        groups = groups_from_array(groups_arr)
        n_chunks = math.ceil(len(groups) / config.run.chunk_size)
        dm, diverged, uncertified = {}, {}, {}
        for kind in config.responses.ordered_kinds():
            try:
                dm[kind], _, diags = store.gather(kind, n_chunks)
                diverged[kind] = [i for i, d in enumerate(diags) if d.get("diverged")]
                if objective_defined(config, kind):
                    uncertified[kind] = [
                        i for i, d in enumerate(diags)
                        if "certified" in d and not d["certified"] and not d.get("diverged")
                    ]
            except KeyError:
                raise RunDataError(
                    f"{str(run_dir)!r} is not finished ({kind} missing); resume it with "
                    f"`{run_command(run_dir)}`."
                ) from None
        n_train = store.get_meta("n_train")
        index = store.get_array("test_index")
    diverged = {k: v for k, v in diverged.items() if v}
    uncertified = {k: v for k, v in uncertified.items() if v}
    return {
        "config": config,
        "dm": dm,
        "groups": groups,
        "test_index": index,
        "n_train": n_train,
        "diverged": diverged,
        "uncertified": uncertified,
    }
