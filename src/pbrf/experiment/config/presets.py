"""Config files and the built-in presets, with their profiles.

A preset is a TOML file in ``pbrf/experiment/presets/`` (the layout of
:mod:`pbrf.experiment.config.schema`) plus ``[profiles.<name>]`` tables (``quick``, ``paper``,
``tiny``) that are deep-merged over the base sections; ``--set`` overrides
(:mod:`pbrf.experiment.config.overrides`) are applied last.
"""

from __future__ import annotations

import copy
import json
import tomllib
from importlib import resources
from pathlib import Path

from pbrf.experiment.config.overrides import apply_overrides
from pbrf.experiment.config.schema import ConfigError, ExperimentConfig

__all__ = [
    "PROFILES",
    "deep_merge",
    "load_run_config",
    "list_presets",
    "preset_table",
    "resolve_profile",
    "load_preset",
    "load_config",
    "resolve",
]

#: The profiles of the presets (``quick``, the default, is the base tables where a preset has none).
PROFILES = ("quick", "paper", "tiny", "study")

_REPLACED = ("solver_options", "accurate_options")


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` updated recursively with ``over`` (new dict; tables merge, other values replace).

    Solver option tables are replaced whole: they belong to the solver named next to them.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and not key.endswith(_REPLACED)
        ):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML ({err}); fix the file.") from None


def _preset_dir():
    return resources.files("pbrf.experiment") / "presets"


def list_presets() -> dict[str, str]:
    """Built-in presets: name → one-line description (sorted by name)."""
    out = {}
    for entry in sorted(_preset_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            raw = _read_toml(entry.read_text(encoding="utf-8"), entry.name)
            lines = str(raw.get("description", "")).strip().splitlines()
            out[entry.name[:-5]] = lines[0] if lines else ""
    return out


def preset_table(name: str) -> dict:
    """The raw TOML table of a built-in preset (with its ``profiles``)."""
    entry = _preset_dir() / f"{name}.toml"
    if not entry.is_file():
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {', '.join(list_presets())} "
            "(`pbrf presets` lists them) or pass a CONFIG.toml path."
        )
    return _read_toml(entry.read_text(encoding="utf-8"), f"preset {name}")


def resolve_profile(raw: dict, profile: str, where: str) -> dict:
    """Merge ``[profiles.<profile>]`` over the base tables; a missing profile is an error."""
    profiles = raw.get("profiles", {})
    base = {k: v for k, v in raw.items() if k != "profiles"}
    if profile not in profiles:
        if profile == "quick":  # the base tables are the quick profile unless it says more
            return base | {"profile": profile}
        raise ConfigError(
            f"{where} has no profile {profile!r}; choose one of {', '.join(profiles) or '(none)'} "
            "with --profile."
        )
    return deep_merge(base, profiles[profile]) | {"profile": profile}


def load_preset(
    name: str, profile: str = "quick", overrides: list[str] | None = None
) -> ExperimentConfig:
    """A built-in preset, with one profile applied and ``--set`` overrides."""
    raw = resolve_profile(preset_table(name), profile, f"preset {name!r}")
    raw.setdefault("name", name)
    return ExperimentConfig.from_dict(apply_overrides(raw, overrides or []))


def load_config(
    path: str | Path, profile: str = "quick", overrides: list[str] | None = None
) -> ExperimentConfig:
    """A TOML config file (preset layout; ``profiles`` optional) with ``--set`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass a preset name or an "
            "existing .toml file."
        )
    raw = resolve_profile(
        _read_toml(path.read_text(encoding="utf-8"), str(path)), profile, str(path)
    )
    raw.setdefault("name", path.stem)
    return ExperimentConfig.from_dict(apply_overrides(raw, overrides or []))


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """A run directory's ``config.json`` (resolved already: its profile is the one stored, so
    ``--profile`` does not apply) with ``--set`` overrides; ``pbrf run RUN/config.json --out RUN``
    resumes that run.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a preset name, a .toml "
                          "file or a run's config.json.") from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{str(path)!r} is unreadable ({str(err).splitlines()[0]}); pass a "
                          "preset name, a .toml file or a run's config.json.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} is not a run's config (a JSON object); pass a preset "
                          "name, a .toml file or a run's config.json.")
    return ExperimentConfig.from_dict(apply_overrides(raw, overrides or []))


def resolve(
    spec: str | None, profile: str = "quick", overrides: list[str] | None = None
) -> ExperimentConfig:
    """A preset name or a ``.toml`` path (default preset ``digits-mlp``) → config."""
    spec = spec or "digits-mlp"
    if spec.endswith(".json"):
        return load_run_config(spec, overrides)
    if spec.endswith(".toml") or Path(spec).is_file():
        return load_config(spec, profile, overrides)
    return load_preset(spec, profile, overrides)
