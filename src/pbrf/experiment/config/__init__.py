"""Experiment configuration: TOML files and presets mapped onto validated frozen dataclasses.

A configuration has one section per stage of an experiment::

    name = "digits-mlp"                  # label of the run (preset name by default)
    description = "..."
    task = "classification"              # optional; default: the dataset's task
    [data]        name, n_train, n_test, seed, options = {...}
    [model]       name + constructor keyword arguments (width, depth, ...)
    [train]       the base recipe (every pbrf.Recipe field; batch_size = "full" | N) + weight_decay
                  + checkpoints (for TracIn)
    [influence]   damping, curvature, solver (practical) + solver_options, accurate_solver + options
    [responses]   kinds, the PBRF/proximal recipe (newton | sgd | adam, steps, ...), cold_seeds
    [removals]    n_test_points, n_removals, strategy, group_fraction | group_size, seed
    [run]         chunk_size, device, dtype, seeds (θ^s per run: mean ± std over them)
    [lds]         subsets (0 = off), alpha, seeds, seed: the LDS ground truth for `pbrf estimators`

A preset is such a file plus ``[profiles.<name>]`` tables (``quick``, ``paper``, ``tiny``) that are
deep-merged over the base sections. :func:`apply_overrides` applies ``--set key=value`` pairs
(dotted paths, values parsed as TOML scalars) and type-checks them against the dataclass fields.
Every invalid value raises :class:`ConfigError` with a one-line message naming the field and the
fix.

Modules: :mod:`~pbrf.experiment.config.schema` (the dataclasses, :class:`ConfigError`, the
checks), :mod:`~pbrf.experiment.config.presets` (TOML files, presets, profiles) and
:mod:`~pbrf.experiment.config.overrides` (``--set``); their public names are re-exported here.
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
