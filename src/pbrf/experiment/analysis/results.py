"""Typed results of an experiment: :class:`Summary` and its sections.

Each section is a frozen dataclass (a :class:`Record`) that declares its fields once. A field the
JSON form does not have is ``None`` by design (a partial summary, a section that does not apply).
``to_dict()`` is the JSON-facing form: what :func:`pbrf.experiment.analysis.decompose` and
:func:`pbrf.experiment.run.summary.finish` return and what ``summary.json`` holds (written through
:func:`pbrf.fileio.jsonable`, the one JSON policy: NaN/inf become ``null`` there).

``Record.from_dict(d).to_dict()`` gives back ``d`` with its keys in the same order: a record keeps
the keys it was read from, and any key it does not declare in :attr:`Record.extra` -- such as the
``<key>_std`` siblings of a multi-seed aggregate (:mod:`pbrf.experiment.analysis.aggregate`), read
through :meth:`Record.std` and :meth:`Record.mean_std`. A record built from its fields instead
writes every declared field in order (a :class:`Summary` leaves out its ``None`` sections: those
that do not apply to a run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "Record",
    "Correlation",
    "Decomposition",
    "Diverged",
    "KindCertificate",
    "Certificates",
    "Solver",
    "Drift",
    "Paired",
    "Quality",
    "LdsScore",
    "LdsConvergence",
    "Lds",
    "LinearizedActual",
    "Summary",
]


def _one(cls):
    """Field metadata: the value is a ``cls`` record (read from its dict)."""
    return {"record": cls}


def _each(cls):
    """Field metadata: the value is ``{name: cls record}``."""
    return {"each": cls}


def _read(f: dataclasses.Field, value):
    """A field's value as declared: dicts of a record field become records."""
    if "record" in f.metadata and isinstance(value, Mapping):
        return f.metadata["record"].from_dict(value)
    if "each" in f.metadata and isinstance(value, Mapping):
        cls = f.metadata["each"]
        return {k: cls.from_dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
    return value


def _write(value):
    """The JSON-facing form of a field's value (records as dicts)."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict) and any(isinstance(v, Record) for v in value.values()):
        return {k: _write(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of the typed sections (see the module docstring).

    Attributes:
        extra: keys of the JSON form that the record does not declare, by name (a multi-seed
            aggregate's ``<key>_std`` siblings, a multi-seed summary's ``seeds``).
        keys: the keys of the dict the record was read from, in order (``None`` when built
            from its fields).
    """

    _SPECIAL: ClassVar[tuple[str, ...]] = ("extra", "keys")
    #: Built from its fields, whether ``to_dict`` leaves out the fields that are None.
    omit_none: ClassVar[bool] = False

    extra: dict = field(default_factory=dict, repr=False)
    keys: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in self.declared():
            object.__setattr__(self, f.name, _read(f, getattr(self, f.name)))

    @classmethod
    def declared(cls) -> list[dataclasses.Field]:
        """The section's own fields (not :attr:`extra` / :attr:`keys`)."""
        return [f for f in dataclasses.fields(cls) if f.name not in cls._SPECIAL]

    @classmethod
    def from_dict(cls, data: Mapping | None):
        """The record of a JSON form (a record is returned as is; ``None`` reads as ``{}``)."""
        if isinstance(data, cls):
            return data
        data = dict(data or {})
        names = {f.name for f in cls.declared()}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names}, keys=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-facing form (see the module docstring)."""
        fields = {f.name: f for f in self.declared()}
        if self.keys is None:
            order = [n for n in fields if not (self.omit_none and getattr(self, n) is None)]
            order += [k for k in self.extra if k not in fields]
        else:
            order = list(self.keys)
        return {k: _write(getattr(self, k)) if k in fields else self.extra[k] for k in order}

    def std(self, name: str):
        """The standard deviation over seeds of field ``name`` (the ``<name>_std`` sibling of a
        multi-seed aggregate: a number, or a dict for a dict of numbers), else None.
        """
        return self.extra.get(f"{name}_std")

    def mean_std(self, name: str, key: str | None = None) -> tuple[Any, Any]:
        """``(value, std over seeds)`` of field ``name`` (or of entry ``key`` of that dict field);
        the std is None in a single-seed summary.
        """
        value, std = getattr(self, name, self.extra.get(name)), self.std(name)
        if key is None:
            return value, std
        value = value.get(key) if isinstance(value, Mapping) else None
        return value, std.get(key) if isinstance(std, Mapping) else None


@dataclass(frozen=True, kw_only=True)
class Correlation(Record):
    """One kind's correlations with the influence estimate (:func:`~pbrf.experiment.analysis.
    correlations`): over all pairs, and the mean over test points of the per-test correlation.
    """

    pearson: float | None = None
    spearman: float | None = None
    pearson_per_test: float | None = None
    spearman_per_test: float | None = None
    n_pairs: int | None = None
    n_tests_used: int | None = None


@dataclass(frozen=True, kw_only=True)
class Decomposition(Record):
    """The gaps between consecutive response functions (``docs/conventions.md`` §6), averaged over
    the valid (test, removal) pairs; see :func:`pbrf.experiment.analysis.decompose`.

    Attributes:
        gaps: ``{gap: mean |Δm_a − Δm_b| | None}`` for consecutive kinds ``a``, ``b``.
        signed: ``{gap: mean (Δm_a − Δm_b) | None}``.
        output_gaps: ``{gap: mean ||Δf_a − Δf_b||₂ | None}``, or ``None`` without Δf.
        total: mean |Δm_cold − Δm_influence| (``None`` unless both are present).
        total_signed: mean (Δm_cold − Δm_influence).
        telescoping_residual: max over pairs of |Σ signed differences − (Δm_first − Δm_last)|
            over the contiguous chain of present kinds (round-off; ``None`` if not contiguous).
        telescoping_chain: ``[first kind, last kind]`` of that chain, or ``None``.
        mean_abs: ``{kind: mean |Δm|}``.
        kinds: the present kinds, in chain order.
        n_pairs: (test, removal) pairs.
        n_valid: pairs where every present kind is finite.
        nonfinite: ``{kind: number of non-finite Δm}``.
    """

    gaps: dict[str, float | None] | None = None
    signed: dict[str, float | None] | None = None
    output_gaps: dict[str, float | None] | None = None
    total: float | None = None
    total_signed: float | None = None
    telescoping_residual: float | None = None
    telescoping_chain: list[str] | None = None
    mean_abs: dict[str, float | None] | None = None
    kinds: list[str] | None = None
    n_pairs: int | None = None
    n_valid: int | None = None
    nonfinite: dict[str, int] | None = None


@dataclass(frozen=True, kw_only=True)
class Diverged(Record):
    """Diverged responses: ``counts`` ``{kind: n}`` and ``removals`` ``{kind: [indices]}``."""

    counts: dict[str, int] | None = None
    removals: dict[str, list[int]] | None = None


@dataclass(frozen=True, kw_only=True)
class KindCertificate(Record):
    """One kind's certificates (:func:`pbrf.experiment.run.summary.exclusions`): ``certified``
    and the ρ statistics only for kinds that carry a certificate; ``uncertified`` only for kinds
    whose uncertified removals are left out (``excludes_uncertified``).
    """

    diverged: int | None = None
    certified: int | None = None
    max_rho: float | None = None
    median_rho: float | None = None
    excludes_uncertified: bool | None = None
    uncertified: int | None = None


@dataclass(frozen=True, kw_only=True)
class Certificates(Record):
    """Which removals were left out of the statistics and why."""

    by_kind: dict[str, KindCertificate] | None = field(default=None,
                                                       metadata=_each(KindCertificate))
    n_removals: int | None = None
    n_kept: int | None = None
    threshold: float | None = None
    excluded_removals: list | None = None


@dataclass(frozen=True, kw_only=True)
class Solver(Record):
    """The worst relative residual of one linear solve (practical or accurate)."""

    kind: str | None = None
    solver: str | None = None
    max_residual: float | None = None
    max_iterations: int | None = None
    flagged: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Drift(Record):
    """The drift of a kind: ``Δm_literal − Δm_paired`` (mean of its magnitude, signed mean)."""

    mean_abs: float | None = None
    signed: float | None = None


@dataclass(frozen=True, kw_only=True)
class Paired(Record):
    """The paired chain (:func:`pbrf.experiment.analysis.paired_chain`) and its certificates."""

    decomposition: Decomposition | None = field(default=None, metadata=_one(Decomposition))
    correlations: dict[str, Correlation] | None = field(default=None, metadata=_each(Correlation))
    drift: dict[str, Drift] | None = field(default=None, metadata=_each(Drift))
    literal_residual: float | None = None
    certificates: Certificates | None = field(default=None, metadata=_one(Certificates))


@dataclass(frozen=True, kw_only=True)
class Quality(Record):
    """The quality of θ^s (:func:`pbrf.experiment.run.quality.base_quality`)."""

    metric: str | None = None
    train_loss: float | None = None
    test_loss: float | None = None
    train_metric: float | None = None
    test_metric: float | None = None
    chance: float | None = None
    grad_norm: float | None = None
    n_test: int | None = None
    near_chance: bool | None = None
    warning: str | None = None


@dataclass(frozen=True, kw_only=True)
class LdsScore(Record):
    """The LDS of the run's influence estimate and its standard error over test points."""

    lds: float | None = None
    stderr: float | None = None
    n_test: int | None = None


@dataclass(frozen=True, kw_only=True)
class LdsConvergence(Record):
    """How far the LDS retrainings are from a stationary point (ρ), and how many diverged."""

    max_rho: float | None = None
    median_rho: float | None = None
    diverged: int | None = None


@dataclass(frozen=True, kw_only=True)
class Lds(Record):
    """The linear datamodeling score section (:func:`pbrf.experiment.run.lds_stage.lds_summary`)."""

    subsets: int | None = None
    alpha: float | None = None
    seeds: list[int] | None = None
    removed_per_subset: int | None = None
    influence: LdsScore | None = field(default=None, metadata=_one(LdsScore))
    convergence: LdsConvergence | None = field(default=None, metadata=_one(LdsConvergence))


@dataclass(frozen=True, kw_only=True)
class LinearizedActual(Record):
    """The actual change of the loss at θ^s + Δθ_IF against the first-order one."""

    description: str | None = None
    pearson_vs_first_order: float | None = None
    pearson_vs_influence: float | None = None
    mean_abs_difference: float | None = None


def _section(cls):
    return field(default=None, metadata=_one(cls))


@dataclass(frozen=True, kw_only=True)
class Summary(Record):
    """The summary of one run (``summary.json``, its sections in field order), built by
    :func:`pbrf.experiment.run.summary.finish`; any summary (partial, or a multi-seed aggregate)
    reads back with :meth:`Record.from_dict`.

    Attributes:
        n_test: test points.
        n_removals: removal sets.
        kinds: the kinds computed, in chain order.
        decomposition: the gaps over the kept removals.
        correlations: each kind's correlations with the influence estimate.
        diagnostics: per-kind solver / optimiser diagnostics (free-form), when given.
        diverged: diverged responses, when any diverged.
        certificates: which removals were left out of the statistics and why
            (:func:`pbrf.experiment.run.summary.exclusions`).
        solvers: the practical and accurate solvers' worst residuals.
        paired: the paired chain (warm start and proximal against their continuations).
        experiment: identifying facts of the run (name, dataset, model, sizes, ...; free-form).
        theta_s: the quality of θ^s.
        lds: the linear datamodeling score ground truth, when ``[lds]`` is on.
        linearized_actual: the actual change of the loss at θ^s + Δθ_IF vs the first-order one.
        seeds: a multi-seed run's seeds (``n``, ``train_seeds``, ``runs``: their folders); its
            other numbers are means over them, each with a ``<key>_std`` sibling
            (:func:`pbrf.experiment.analysis.aggregate.aggregate`).
    """

    omit_none: ClassVar[bool] = True

    n_test: int | None = None
    n_removals: int | None = None
    kinds: list[str] | None = None
    decomposition: Decomposition | None = _section(Decomposition)
    correlations: dict[str, Correlation] | None = field(default=None, metadata=_each(Correlation))
    diagnostics: dict | None = None
    diverged: Diverged | None = _section(Diverged)
    certificates: Certificates | None = _section(Certificates)
    solvers: dict[str, Solver] | None = field(default=None, metadata=_each(Solver))
    paired: Paired | None = _section(Paired)
    experiment: dict | None = None
    theta_s: Quality | None = _section(Quality)
    lds: Lds | None = _section(Lds)
    linearized_actual: LinearizedActual | None = _section(LinearizedActual)
    seeds: dict | None = None
