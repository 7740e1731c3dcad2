"""The response-kind registry: one :class:`ResponseKind` record per kind.

A record says everything the library and the experiment layer need to know about a kind: its
label and colour (report), its objective and default recipe (:func:`pbrf.respond`), the
arguments of ``respond`` that apply to it, and how an experiment computes and summarises it
(which config section's recipe, in which precision, whether uncertified pairs are excluded).
``respond``, the config validation, the pipeline, the analysis and the report all read the
records; none of them branches on a kind's name. Adding a kind is one :func:`register` call::

    from pbrf import kinds, objectives

    kinds.register(kinds.ResponseKind(
        name="half-proximal", label="half proximal", colour="#a6761d",
        objective=lambda prob, lam: objectives.proximal_objective(prob, lam / 2)))

The built-in kinds, in the order of the decomposition chain (``docs/conventions.md`` §5–6), are
``cold``, ``warm``, ``proximal``, ``pbrf``, ``linearized`` and the estimate ``influence``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import objectives

__all__ = ["ResponseKind", "register", "unregister", "get", "names", "response_names", "chain",
           "view",
           "METHODS", "CERTIFICATES", "METHOD_ARGUMENTS"]

#: How a kind is computed: ``optimise`` its objective from θ^s (:func:`pbrf.respond`),
#: ``retrain`` from a fresh initialisation (cold start), ``linear`` (one linear solve, the
#: linearised PBRF) or ``estimate`` (the influence estimate itself, :func:`pbrf.influence`).
METHODS = ("optimise", "retrain", "linear", "estimate")
#: Which pairs an experiment leaves out of its statistics: uncertified ones (``exclude``: the kind
#: is defined as the solution of its objective), uncertified ones only when the kind's recipe is
#: full batch (``exclude_if_full_batch``), or none (``report``: the kind is defined by its recipe).
CERTIFICATES = ("exclude", "exclude_if_full_batch", "report")
#: The arguments of :func:`pbrf.respond` that every kind of a method uses, besides ``prob``,
#: ``kind``, ``removals``, ``progress``, ``damping`` (:attr:`ResponseKind.uses_damping`) and the
#: kind's own :attr:`ResponseKind.arguments`; ``recipe_changes`` stands for recipe fields passed
#: as keywords.
METHOD_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "optimise": ("recipe", "recipe_changes", "removal_weight", "chunk_size", "rho_threshold"),
    "retrain": ("recipe", "recipe_changes", "removal_weight", "chunk_size", "rho_threshold"),
    "linear": ("removal_weight",),
    "estimate": (),
}


@dataclass(frozen=True)
class ResponseKind:
    """One response kind.

    Attributes:
        name: the key (``respond(prob, name, ...)``, ``responses.kinds`` entries).
        label: human-readable name (report, figures).
        colour: matplotlib colour shared by every figure.
        short: column header of the comparison table (default: ``label``).
        method: see :data:`METHODS`.
        objective: ``(prob, damping) -> pbrf.objectives.Objective`` (optimise and retrain).
        default_recipe: ``"newton"`` (:class:`pbrf.NewtonRecipe()`) or ``"base"`` (the recipe that
            trained θ^s, ``prob.recipe``) when ``respond`` gets no recipe.
        arguments: the kind-specific arguments of :func:`pbrf.respond` that apply to it
            (``seeds``, ``model_init``, ``paired``, ``solver``, ``solver_options``, ``curvature``).
        uses_damping: its objective (or solve) reads ``damping`` (λ); ``respond`` refuses a
            damping for a kind that does not.
        continuation: with a :class:`pbrf.NewtonRecipe`, removals start from the no-removal
            continuation (solved once), and ``paired=True`` measures against it.
        config_recipe: the experiment-config section whose recipe a run passes (``"train"``,
            ``"responses"``, or ``None``).
        float64: an experiment computes it on the float64 copy of the problem (else in the run's
            dtype, like base training).
        certificate: see :data:`CERTIFICATES`.
        in_chain: a link of the decomposition chain (the gaps); only the built-in kinds are.
        table: a column of the paper's Table 1 (influence vs this kind).
    """

    name: str
    label: str
    colour: str
    short: str = ""
    method: str = "optimise"
    objective: Callable[..., objectives.Objective] | None = None
    default_recipe: str = "newton"
    arguments: tuple[str, ...] = ()
    uses_damping: bool = True
    continuation: bool = False
    config_recipe: str | None = "responses"
    float64: bool = True
    certificate: str = "exclude"
    in_chain: bool = False
    table: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ResponseKind {self.name!r}: method must be one of {METHODS}, got "
                             f"{self.method!r}.")
        if self.certificate not in CERTIFICATES:
            raise ValueError(f"ResponseKind {self.name!r}: certificate must be one of "
                             f"{CERTIFICATES}.")
        if self.method in ("optimise", "retrain") and self.objective is None:
            raise ValueError(f"ResponseKind {self.name!r}: an {self.method} kind needs an "
                             "objective.")
        if self.default_recipe not in ("newton", "base"):
            raise ValueError(f"ResponseKind {self.name!r}: default_recipe must be 'newton' or "
                             "'base'.")
        if not self.short:
            object.__setattr__(self, "short", self.label)

    @property
    def respond_arguments(self) -> tuple[str, ...]:
        """Every argument of :func:`pbrf.respond` this kind uses (besides ``prob``, ``kind``,
        ``removals`` and ``progress``); see :data:`METHOD_ARGUMENTS`.
        """
        damping = ("damping",) if self.uses_damping else ()
        return damping + METHOD_ARGUMENTS[self.method] + self.arguments

    @property
    def is_response(self) -> bool:
        """Computed by :func:`pbrf.respond` (every kind but the influence estimate)."""
        return self.method != "estimate"


_REGISTRY: dict[str, ResponseKind] = {}


def register(kind: ResponseKind, replace: bool = False) -> ResponseKind:
    """Add ``kind`` to the registry (after the kinds already there); returns it."""
    if not isinstance(kind, ResponseKind):
        raise TypeError(f"register: expected a ResponseKind, got {type(kind).__name__}.")
    if kind.name in _REGISTRY and not replace:
        raise ValueError(f"response kind {kind.name!r} is already registered; pass replace=True.")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (built-in kinds cannot be removed)."""
    if _REGISTRY.get(name) is not None and _REGISTRY[name].in_chain:
        raise ValueError(f"{name!r} is a built-in kind; it cannot be unregistered.")
    _REGISTRY.pop(name, None)


def names(responses_only: bool = False) -> tuple[str, ...]:
    """The registered kinds in registration order (``responses_only``: without the estimate)."""
    return tuple(n for n, k in _REGISTRY.items() if k.is_response or not responses_only)


def response_names() -> tuple[str, ...]:
    """The kinds :func:`pbrf.respond` computes."""
    return names(responses_only=True)


def get(name: str, responses_only: bool = False) -> ResponseKind:
    """The record of ``name``; ``ValueError`` naming the choices when unknown."""
    kind = _REGISTRY.get(name) if isinstance(name, str) else None
    if kind is None or (responses_only and not kind.is_response):
        choices = names(responses_only)
        raise ValueError(f"Unknown response kind {name!r}; choose one of {choices}.")
    return kind


def chain() -> tuple[str, ...]:
    """The kinds of the decomposition chain, in order (cold … influence)."""
    return tuple(n for n, k in _REGISTRY.items() if k.in_chain)


class _View(Mapping):
    """A read-only, live ``{name: record.<attribute>}`` mapping over the registry."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __getitem__(self, name: str) -> Any:
        return getattr(_REGISTRY[name], self.attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


def view(attribute: str) -> Mapping[str, Any]:
    """``{kind: getattr(record, attribute)}``, live (kinds registered later appear in it)."""
    return _View(attribute)


# ---------------------------------------------------------------------------- the built-in kinds
for _kind in (
    ResponseKind("cold", "cold-start LOO", "#1b9e77", short="LOO", method="retrain",
                 objective=objectives.warm_objective, default_recipe="base",
                     arguments=("seeds", "model_init"), uses_damping=False,
                 config_recipe="train", float64=False, certificate="report", in_chain=True,
                     table=True),
    ResponseKind("warm", "warm-start LOO", "#d95f02", short="Warm",
                 objective=objectives.warm_objective,
                 default_recipe="base", arguments=("paired",), uses_damping=False,
                 continuation=True,
                     config_recipe="train",
                 float64=False, certificate="exclude_if_full_batch", in_chain=True, table=True),
    ResponseKind("proximal", "proximal", "#7570b3", short="Proximal",
                 objective=objectives.proximal_objective,
                 arguments=("paired",), continuation=True, in_chain=True, table=True),
    ResponseKind("pbrf", "PBRF", "#e7298a", objective=objectives.pbrf_response_objective,
                 in_chain=True,
                 table=True),
    ResponseKind("linearized", "linearised PBRF", "#66a61e", short="Lin. PBRF", method="linear",
                 arguments=("solver", "solver_options", "curvature"), config_recipe=None,
                     certificate="report",
                 in_chain=True),
    ResponseKind("influence", "influence", "#444444", method="estimate", config_recipe=None,
                 certificate="report",
                 in_chain=True),
):
    register(_kind)
del _kind
