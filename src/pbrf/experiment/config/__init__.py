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

from pbrf.experiment.config.overrides import apply_overrides, parse_set
from pbrf.experiment.config.presets import (
    PROFILES,
    deep_merge,
    list_presets,
    load_config,
    load_preset,
    preset_table,
    resolve,
    resolve_profile,
)
from pbrf.experiment.config.schema import (
    ACCURATE_SOLVERS,
    KINDS,
    SECTIONS,
    TOP_LEVEL,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    InfluenceConfig,
    LdsConfig,
    ModelConfig,
    RemovalsConfig,
    ResponsesConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "InfluenceConfig",
    "ResponsesConfig",
    "RemovalsConfig",
    "RunConfig",
    "LdsConfig",
    "ExperimentConfig",
    "KINDS",
    "PROFILES",
    "ACCURATE_SOLVERS",
    "SECTIONS",
    "TOP_LEVEL",
    "list_presets",
    "load_config",
    "load_preset",
    "preset_table",
    "resolve_profile",
    "resolve",
    "deep_merge",
    "apply_overrides",
    "parse_set",
]
