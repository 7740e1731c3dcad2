"""The experiment configuration's schema: one validated frozen dataclass per section.

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

Every invalid value raises :class:`ConfigError` with a one-line message naming the field and the
fix. :func:`check_type` is the one type check of a value against a field (also of ``--set``
values, :mod:`pbrf.experiment.config.overrides`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from pbrf import kinds as _kinds
from pbrf.curvature import CURVATURES
from pbrf.newton import NewtonOptions, NewtonRecipe
from pbrf.optim import OPTIMIZERS, RecipeFields, check_recipe
from pbrf.solvers import SOLVERS
from pbrf.tasks import TASKS

__all__ = [
    "ExperimentConfig",  # the whole config, then its sections in TOML order
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "InfluenceConfig",
    "ResponsesConfig",
    "RemovalsConfig",
    "RunConfig",
    "LdsConfig",
    "SECTIONS",
    "TOP_LEVEL",
    "KINDS",
    "ACCURATE_SOLVERS",
    "ConfigError",
]

#: The built-in kinds (:mod:`pbrf.kinds`; ``responses.kinds`` also takes kinds registered later).
KINDS = _kinds.names()
#: Solvers that can solve the linearised PBRF accurately (LiSSA is a stochastic approximation).
ACCURATE_SOLVERS = ("exact", "cg")


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the field and the fix."""


# ---------------------------------------------------------------------------- checks
def _fail(where: str, msg: str) -> None:
    raise ConfigError(f"{where}: {msg}")


def _check_choice(where: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(where, f"must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _check_positive(where: str, value: Any, allow_zero: bool = False,
                    allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        _fail(where, f"must be a finite number {bound}; got {value!r}.")


def _check_seed(where: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63):
        _fail(where, f"must be an integer >= 0 (e.g. 0); got {value!r}.")


def _check_recipe(section: str, build) -> None:
    """Validate a section's recipe by building it (the recipe's own checks: one validation path)."""
    try:
        build()
    except ValueError as err:
        msg = str(err).replace("NewtonRecipe.max_iter", f"{section}.steps")
        raise ConfigError(msg.replace("NewtonRecipe.", f"{section}.").replace("Recipe.",
            f"{section}.")) from None


def _full_batch(section: str, config) -> None:
    """``batch_size = "full"`` is full batch; ``0``, its old spelling, is read as ``"full"``."""
    value = config.batch_size
    if value == 0 and not isinstance(value, bool):
        warnings.warn(f'{section}.batch_size = 0 is deprecated; write batch_size = "full".',
                      DeprecationWarning,
                      stacklevel=5)
        object.__setattr__(config, "batch_size", "full")
    elif isinstance(value, str) and value != "full":
        _fail(f"{section}.batch_size", f'must be a positive int or "full"; got {value!r}.')


def _batch(value) -> int | None:
    return None if value == "full" else value


# ---------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """Which data: ``pbrf.data.load(name, n_train=, n_test=, seed=, **options)``.

    Attributes:
        name: dataset name (``digits`` is embedded; others read ``$PBRF_DATA``).
        n_train: training examples kept (``None`` = all).
        n_test: test examples kept (``None`` = all).
        seed: seed of the subsampling.
        options: extra keyword arguments of the loader (e.g. ``classes = [3, 8]``).
    """

    name: str = "digits"
    n_train: int | None = None
    n_test: int | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_seed("data.seed", self.seed)
        for key in ("n_train", "n_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                _fail(f"data.{key}", f"must be a positive int or omitted (= all); got {value!r}.")


@dataclass(frozen=True)
class ModelConfig:
    """Which network: ``pbrf.models.build(name, seed=train.seed, dtype=run.dtype, **options)``.

    In TOML every key of ``[model]`` other than ``name`` is a constructor argument.
    """

    name: str = "mlp"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig(RecipeFields):
    """The base training recipe and the L2 weight decay of the objective.

    Every field of :class:`pbrf.Recipe` (declared once, in :class:`pbrf.optim.RecipeFields`),
    flat in ``[train]``, plus ``weight_decay``: ``J(θ) = (1/N) Σ L_i + (weight_decay/2) ||θ||²``.
    ``epochs`` or ``steps`` sets the budget; ``batch_size = "full"`` means full batch.
    ``checkpoints = n`` also saves the parameters at ``n`` evenly spaced steps under
    ``RUN_DIR/checkpoints/`` (for TracIn; the last one is θ^s).
    """

    batch_size: int | str = 128
    weight_decay: float = 0.0
    checkpoints: int = 0

    def __post_init__(self) -> None:
        _full_batch("train", self)
        _check_positive("train.checkpoints", self.checkpoints, allow_zero=True)
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_seed("train.seed", self.seed)
        _check_recipe("train", lambda: check_recipe(self, "train"))

    def recipe_dict(self) -> dict:
        """The ``pbrf.Recipe`` keyword arguments (everything but ``weight_decay``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(RecipeFields)}
        d["batch_size"] = _batch(self.batch_size)
        return d


@dataclass(frozen=True)
class InfluenceConfig:
    """Damping, curvature and the two linear solvers.

    ``solver`` is the practical solver of the influence estimate (kind ``influence``);
    ``accurate_solver`` solves the linearised PBRF (kind ``linearized``).
    """

    damping: float = 1e-3
    curvature: str = "ggn"
    solver: str = "lissa"
    solver_options: dict = field(default_factory=dict)
    accurate_solver: str = "exact"
    accurate_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_positive("influence.damping", self.damping, allow_zero=True)
        _check_choice("influence.curvature", self.curvature, CURVATURES)
        _check_choice("influence.solver", self.solver, tuple(reversed(SOLVERS)))  # cheapest first
        _check_choice("influence.accurate_solver", self.accurate_solver, ACCURATE_SOLVERS)


@dataclass(frozen=True)
class ResponsesConfig(NewtonOptions, RecipeFields):
    """Which response functions to compute, the PBRF / proximal optimiser, and their certificates.

    The recipe fields are those of :class:`pbrf.Recipe` (:class:`pbrf.optim.RecipeFields`) and of
    :class:`pbrf.NewtonRecipe` (:class:`pbrf.newton.NewtonOptions`), declared there once, with
    defaults for the responses: ``optimizer = "newton"``, ``lr = 1e-3``, ``batch_size = "full"``
    and, unless ``epochs`` is given, ``steps = 100``.
    ``optimizer = "newton"`` (default) is the batched Gauss–Newton / Newton–CG trust-region
    optimiser (:class:`pbrf.NewtonRecipe`, full batch): ``steps`` caps its outer iterations
    (``max_iter``), ``cg_max_iter`` the CG iterations per step, ``tol`` stops a removal once
    ``ρ ≤ tol``; ``forcing``, ``model``, ``switch``, ``products``, ``precondition`` and ``warmup``
    (the continuation's L-BFGS budget) are its other settings (the first-order
    fields are then unused).
    ``optimizer = "sgd" | "adam"`` is a first-order :class:`pbrf.Recipe` (``batch_size = "full"``
    means full batch; the Newton settings are then unused). Cold- and warm-start retraining use the
    base ``[train]`` recipe; ``cold_seeds`` are the initialisation seeds averaged over for cold
    start. ``seed`` selects the stream of the one response seed derived from ``train.seed``
    (minibatch order, LiSSA sampling; 0 by default).

    ``rho_threshold``: a response is certified when ``ρ = ||∇F(θ_r)|| / signal ≤ rho_threshold``
    (``signal = (1/N)||Σ_{m∈r} ∇L_m(θ^s)||``); it lies in (0, 1), since ρ = 1 at θ^s.
    ``paired``: also measure warm start and proximal against a no-removal continuation with the
    same seed and recipe.
    """

    optimizer: str = "newton"
    lr: float = 1e-3
    batch_size: int | str = "full"
    kinds: tuple = KINDS
    cold_seeds: tuple = (0,)
    rho_threshold: float = 1e-2
    paired: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "cold_seeds", tuple(self.cold_seeds))
        for kind in self.kinds:
            _check_choice("responses.kinds entries", kind, _kinds.names())
        if "influence" not in self.kinds:
            _fail("responses.kinds", 'must include "influence" (the estimate every response is '
                                     'compared with).')
        if len(set(self.kinds)) != len(self.kinds):
            _fail("responses.kinds", f"has duplicates: {list(self.kinds)}.")
        _check_choice("responses.optimizer", self.optimizer, OPTIMIZERS + (NewtonRecipe.optimizer,))
        _full_batch("responses", self)
        if self.epochs is None and self.steps is None:  # the budget defaults to NewtonRecipe's
            object.__setattr__(self, "steps", NewtonRecipe.max_iter)
        _check_seed("responses.seed", self.seed)
        first_order = {f.name: getattr(self, f.name) for f in dataclasses.fields(RecipeFields)}
        first_order["optimizer"] = "sgd" if self._newton else self.optimizer
        _check_recipe("responses",
                      lambda: check_recipe(types.SimpleNamespace(**first_order), "responses"))
        if self._newton and self.steps is None:
            _fail("responses.steps", 'caps the iterations of optimizer = "newton"; give steps, '
                                     "not epochs.")
        newton = {**self._newton_fields(), "max_iter": self.steps or NewtonRecipe.max_iter}
        _check_recipe("responses", lambda: NewtonRecipe(**newton))
        _check_positive("responses.rho_threshold", self.rho_threshold)
        if self.rho_threshold >= 1:  # ρ = 1 at θ^s for the PBRF: an unoptimised response passes
            _fail("responses.rho_threshold", "must be < 1 (ρ = 1 at θ^s, so any larger threshold "
                  f"certifies unoptimised responses), e.g. 1e-2; got {self.rho_threshold!r}.")
        if not self.cold_seeds or not all(isinstance(s, int) and not isinstance(s,
            bool) for s in self.cold_seeds):
            _fail("responses.cold_seeds", "must be a non-empty list of ints, e.g. [0, 1]; got "
                                          f"{list(self.cold_seeds)}.")
        for s in self.cold_seeds:
            _check_seed("responses.cold_seeds entries", s)

    @property
    def _newton(self) -> bool:
        return self.optimizer == NewtonRecipe.optimizer

    def _newton_fields(self) -> dict:
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(NewtonOptions)}
        return {"max_iter": self.steps, **options}

    def recipe_dict(self) -> dict:
        """The recipe keyword arguments of the PBRF / proximal optimisation: ``pbrf.NewtonRecipe``'s
        (with ``optimizer = "newton"``) or ``pbrf.Recipe``'s.
        """
        if self._newton:
            return {"optimizer": self.optimizer, **self._newton_fields()}
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(RecipeFields)}
        d["batch_size"] = _batch(self.batch_size)
        return d

    def ordered_kinds(self) -> tuple[str, ...]:
        """The configured kinds in registry order, the estimate (influence) first: it is
        computed first.
        """
        ordered = [k for k in _kinds.names() if k in self.kinds]
        return tuple(sorted(ordered, key=lambda k: _kinds.get(k).is_response))


@dataclass(frozen=True)
class RemovalsConfig:
    """Which test points and which removal sets.

    Attributes:
        n_test_points: test examples whose loss is measured.
        n_removals: number of removal sets.
        strategy: ``"random"`` training points, or ``"top-influence"`` (largest |influence| under
            the practical solver over all training points).
        group_fraction: if > 0, each removal set holds ``round(group_fraction * N)`` points.
        group_size: otherwise the size of each removal set (1 = leave-one-out).
        seed: seed of the random choices.
    """

    n_test_points: int = 30
    n_removals: int = 64
    strategy: str = "random"
    group_fraction: float = 0.0
    group_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("removals.n_test_points", self.n_test_points)
        _check_positive("removals.n_removals", self.n_removals)
        _check_choice("removals.strategy", self.strategy, ("random", "top-influence"))
        _check_positive("removals.group_size", self.group_size)
        if not (0.0 <= self.group_fraction < 1.0):
            _fail("removals.group_fraction", f"must be in [0, 1); got {self.group_fraction!r}.")
        if self.group_fraction > 0 and self.group_size != 1:
            _fail("removals", "set group_fraction or group_size, not both.")
        _check_seed("removals.seed", self.seed)

    def resolved_group_size(self, n_train: int) -> int:
        """Points per removal set for a training set of ``n_train`` examples."""
        if self.group_fraction > 0:
            return max(1, round(self.group_fraction * n_train))
        return self.group_size


@dataclass(frozen=True)
class RunConfig:
    """Execution: removals per chunk (the unit of work and of resumption), device and dtype, and
    ``seeds``: how many θ^s (``train.seed + 0 .. seeds-1``) the run trains and measures, each in
    its own ``seed=K`` folder, the correlations and gaps reported as mean ± std over them
    (:mod:`pbrf.experiment.run.seeds`).
    """

    chunk_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    seeds: int = 1

    def __post_init__(self) -> None:
        _check_positive("run.chunk_size", self.chunk_size)
        _check_positive("run.seeds", self.seeds)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            _fail("run.device", f'must be "cpu" or "cuda" (or "cuda:N"); got {self.device!r}.')
        _check_choice("run.dtype", self.dtype, ("float32", "float64"))


@dataclass(frozen=True)
class LdsConfig:
    """The linear datamodeling score's ground truth (:mod:`pbrf.lds`), computed by ``pbrf run``.

    ``subsets = K > 0`` retrains the model from scratch on ``K`` random subsets keeping a fraction
    ``alpha`` of the training set (cold start, batched over the subsets, the same ``seeds`` for
    every subset; default ``responses.cold_seeds``); ``pbrf estimators`` scores every estimator's
    summed group scores against the retrained test-loss changes. ``0`` (default) skips it.
    """

    subsets: int = 0
    alpha: float = 0.5
    seeds: tuple = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        _check_positive("lds.subsets", self.subsets, allow_zero=True)
        if self.subsets == 1:
            _fail("lds.subsets",
                  "must be 0 (off) or at least 2 (a rank correlation needs two subsets); got 1.")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1):
            _fail("lds.alpha", "is the fraction of training points kept; it must lie in (0, 1), "
                  f"got {self.alpha!r}.")
        for s in self.seeds:
            _check_seed("lds.seeds", s)
        _check_seed("lds.seed", self.seed)


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "influence": InfluenceConfig,
    "responses": ResponsesConfig,
    "removals": RemovalsConfig,
    "run": RunConfig,
    "lds": LdsConfig,
}
TOP_LEVEL = ("name", "description", "profile", "task")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. Build with :func:`load_preset`, :func:`load_config` or
    :meth:`from_dict`.
    """

    name: str = "experiment"
    description: str = ""
    profile: str = ""
    task: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10))
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    removals: RemovalsConfig = field(default_factory=RemovalsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lds: LdsConfig = field(default_factory=LdsConfig)

    def __post_init__(self) -> None:
        if self.task is not None:
            _check_choice("task", self.task, TASKS)

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        """A JSON-able nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); two configs are the same experiment iff these are equal."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def fingerprint(self) -> str:
        """Canonical JSON of everything that determines the numbers (not the description)."""
        d = self.to_dict()
        d.pop("description", None)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        """Build from a nested dict (TOML layout or :meth:`to_dict` layout); raises ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a table, got {type(d).__name__}.")
        unknown = set(d) - set(SECTIONS) - set(TOP_LEVEL) - {"profiles"}
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {sorted(unknown)}; the sections are "
                f"{', '.join(TOP_LEVEL + tuple(SECTIONS))}."
            )
        kwargs = {k: check_type(k, d[k], field_types(cls)[k]) for k in TOP_LEVEL if k in d}
        for section, sub in SECTIONS.items():
            kwargs[section] = _build_section(section, sub, d.get(section, {}))
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config: {err}") from None


def field_types(cls) -> dict[str, Any]:
    """The type hints of a config dataclass's fields, by name."""
    return typing.get_type_hints(cls)


def _build_section(section: str, cls, table: Any):
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table, got {table!r}.")
    table = dict(table)
    if cls is ModelConfig and "options" not in table:
        name = table.pop("name", ModelConfig.name)
        table = {"name": name, "options": table}
    types_ = field_types(cls)
    unknown = set(table) - set(types_)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"unknown config key {section}.{key}; [{section}] takes {', '.join(sorted(types_))}."
        )
    values = {k: check_type(f"{section}.{k}", v, types_[k]) for k, v in table.items()}
    return cls(**values)


def check_type(where: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint (int → float allowed; list → tuple); returns
    the value.
    """
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is bool and isinstance(value, bool):
            return value
        if opt is str and isinstance(value, str):
            return value
        if opt is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if opt is dict and isinstance(value, dict):
            return value
    names = " or ".join(
        "none" if o is type(None) else getattr(o, "__name__", str(o)) for o in options
    )
    raise ConfigError(f"{where} must be {with_article(names)}; got {value!r} "
                      f"({_toml_type(value)}).")


def with_article(names: str) -> str:
    """A type name for a message, in TOML's words with its article: ``"dict"`` → ``"a table"``."""
    names = names.replace("tuple", "list").replace("dict", "table").replace("str", "string")
    return ("an " if names[0] in "aeiou" else "a ") + names


def _toml_type(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
        tuple: "array",
    }.get(type(value), type(value).__name__)
