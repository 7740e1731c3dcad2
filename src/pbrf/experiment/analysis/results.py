"""Typed results of an experiment: :class:`Decomposition` and :class:`Summary`.

Each is a frozen dataclass that declares its schema once; ``to_dict()`` is its JSON-facing form:
what :func:`pbrf.experiment.analysis.decompose` and :func:`pbrf.experiment.run.summary.finish` return
and what ``summary.json`` holds (written through :func:`pbrf.fileio.jsonable`, the one JSON
policy: NaN/inf become ``null`` there). Optional sections of a summary that do not apply to a run
are ``None`` and left out of ``to_dict()``, so the file holds exactly the sections that apply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["Decomposition", "Summary"]


@dataclass(frozen=True)
class Decomposition:
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

    gaps: dict[str, float | None]
    signed: dict[str, float | None]
    output_gaps: dict[str, float | None] | None
    total: float | None
    total_signed: float | None
    telescoping_residual: float | None
    telescoping_chain: list[str] | None
    mean_abs: dict[str, float | None]
    kinds: list[str]
    n_pairs: int
    n_valid: int
    nonfinite: dict[str, int]

    def to_dict(self) -> dict:
        """Every field, by name (a JSON-safe dict)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class Summary:
    """The summary of one run (``summary.json``, its sections in field order), built by
    :func:`pbrf.experiment.run.summary.finish`.

    Attributes:
        n_test: test points.
        n_removals: removal sets.
        kinds: the kinds computed, in chain order.
        decomposition: :meth:`Decomposition.to_dict` over the kept removals.
        correlations: each kind's correlations with the influence estimate.
        diagnostics: per-kind solver / optimiser diagnostics, when given.
        diverged: ``{"counts", "removals"}`` of diverged responses, when any diverged.
        certificates: which removals were left out of the statistics and why
            (:func:`pbrf.experiment.run.summary.exclusions`).
        solvers: the practical and accurate solvers' worst residuals.
        paired: the paired chain (warm start and proximal against their continuations).
        experiment: identifying facts of the run (name, dataset, model, sizes, ...).
        theta_s: the quality of θ^s.
        lds: the linear datamodeling score ground truth, when ``[lds]`` is on.
        linearized_actual: the actual change of the loss at θ^s + Δθ_IF vs the first-order one.
    """

    n_test: int
    n_removals: int
    kinds: list[str]
    decomposition: dict
    correlations: dict
    diagnostics: dict | None = None
    diverged: dict | None = None
    certificates: dict
    solvers: dict
    paired: dict | None = None
    experiment: dict
    theta_s: dict
    lds: dict | None = None
    linearized_actual: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """The sections that apply (``None`` ones left out), in field order."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in values.items() if v is not None}
