"""Experiment configuration: TOML files and presets mapped onto validated frozen dataclasses.

:mod:`~pbrf.experiment.config.schema` holds the dataclasses (one section per stage of an
experiment: ``[data]``, ``[model]``, ``[train]``, ``[influence]``, ``[responses]``, ``[removals]``,
``[run]``, ``[lds]``), :class:`ConfigError` and the checks; :mod:`~pbrf.experiment.config.presets`
the TOML files, the built-in presets and their ``[profiles.<name>]`` tables (``quick``, ``paper``,
``tiny``, deep-merged over the base sections); :mod:`~pbrf.experiment.config.overrides` the
``--set key=value`` pairs (dotted paths, values parsed as TOML scalars, type-checked against the
dataclass fields). Every invalid value raises :class:`ConfigError` with a one-line message naming
the field and the fix. The public names of the three modules are re-exported here.
"""

from pbrf.experiment.config import overrides, presets, schema
from pbrf.experiment.config.overrides import *  # noqa: F403 - the package's API is its modules'
from pbrf.experiment.config.presets import *  # noqa: F403
from pbrf.experiment.config.schema import *  # noqa: F403

__all__ = [*schema.__all__, *presets.__all__, *overrides.__all__]
