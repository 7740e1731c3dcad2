"""Experiments: configs and presets, the run pipeline, its SQLite store, executors and reports.

``pbrf run`` is :func:`pbrf.experiment.run.driver.run_experiment` on a config from
:func:`pbrf.experiment.config.resolve`. Importing this package is cheap (no torch, no ray).
"""

from pbrf.experiment.config import (
    KINDS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    list_presets,
    load_config,
    load_preset,
    resolve,
)

__all__ = [
    "KINDS",
    "ConfigError",
    "ExperimentConfig",
    "apply_overrides",
    "list_presets",
    "load_config",
    "load_preset",
    "resolve",
]
