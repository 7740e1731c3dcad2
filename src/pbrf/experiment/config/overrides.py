"""``--set key=value``: dotted paths into a raw config table, values parsed as TOML scalars.

:func:`apply_overrides` checks that each key exists (a model key must be an argument of the
model's constructor) and that its value has the field's type, before any config is built.
"""

from __future__ import annotations

import copy
import inspect
import tomllib
from collections.abc import Mapping
from typing import Any

from pbrf import models
from pbrf.experiment.config.schema import (
    SECTIONS,
    TOP_LEVEL,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    check_type,
    field_types,
    with_article,
)

__all__ = ["parse_set", "apply_overrides"]


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` → (``["a", "b"]``, TOML-parsed value; a bare word stays a string)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {item!r} must look like section.key=value, e.g. --set influence.damping=1e-2."
        )
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict, items: list[str]) -> dict:
    """Apply ``--set`` items to a raw config table, checking each key exists and its type fits."""
    raw = copy.deepcopy(raw)
    for item in items:
        path, value = parse_set(item)
        _check_set_key(raw, path, value, item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        if len(path) == 2 and (path[0], path[1]) in _RESETS:
            node.pop(_RESETS[path[0], path[1]], None)
    return raw


#: ``--set`` of the key on the left drops the key on the right (a new budget / a new solver's
#: options).
_RESETS = {
    ("train", "epochs"): "steps",
    ("train", "steps"): "epochs",
    ("responses", "epochs"): "steps",
    ("responses", "steps"): "epochs",
    ("influence", "solver"): "solver_options",
    ("influence", "accurate_solver"): "accurate_options",
}


def _check_set_key(raw: dict, path: list[str], value: Any, item: str) -> None:
    dotted = ".".join(path)
    head = path[0]
    if len(path) == 1:
        if head not in TOP_LEVEL:
            raise ConfigError(
                f"unknown --set key {dotted!r}; use section.key=value with sections "
                f"{', '.join(SECTIONS)}."
            )
        check_type(dotted, value, field_types(ExperimentConfig)[head])
        return
    if head not in SECTIONS:
        raise ConfigError(
            f"unknown --set key {dotted!r}: no section {head!r}; the sections are "
            f"{', '.join(SECTIONS)}."
        )
    cls = SECTIONS[head]
    if head == "model" and path[1] != "name":
        _check_model_key(raw.get("model", {}), path[1:], value, dotted)
        return
    types_ = field_types(cls)
    if path[1] not in types_:
        raise ConfigError(
            f"unknown --set key {dotted!r}; [{head}] takes {', '.join(sorted(types_))}."
        )
    if len(path) > 2:
        if types_[path[1]] is not dict:
            raise ConfigError(f"unknown --set key {dotted!r}: {head}.{path[1]} is not a table.")
        return
    check_type(dotted, value, types_[path[1]])


def _check_model_key(model: dict, path: list[str], value: Any, dotted: str) -> None:
    """Model keys must be arguments of the model's constructor (or already in the config)."""
    key = path[0]
    if len(path) > 1:
        raise ConfigError(
            f"unknown --set key {dotted!r}; model arguments are flat (e.g. model.width=64)."
        )
    options = {k: v for k, v in model.items() if k != "name"}
    if key in options:
        current = options[key]
        if (
            current is not None
            and not isinstance(value, type(current))
            and not (
                isinstance(current, float)
                and isinstance(value, int)
                and not isinstance(value, bool)
            )
        ):
            raise ConfigError(
                f"{dotted} must be {with_article(type(current).__name__)} like the preset's "
                f"{current!r}; got {value!r}."
            )
        return
    accepted = _model_arguments(model.get("name", ModelConfig.name))
    if accepted is not None and key not in accepted:
        raise ConfigError(
            f"unknown --set key {dotted!r}; model {model.get('name')!r} takes "
            f"{', '.join(sorted(accepted)) or 'no arguments'}."
        )


def _model_arguments(name: str) -> set[str] | None:
    """Keyword arguments accepted by ``pbrf.models`` for ``name`` (``None`` if unknown)."""
    registry = getattr(models, "MODELS", None)
    ctor = registry.get(name) if isinstance(registry, Mapping) else None
    if ctor is None:
        return None
    try:
        params = inspect.signature(ctor).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n not in ("seed", "dtype")}
