"""One record of per-removal diagnostics for every optimiser: :class:`RemovalDiagnostics`.

:func:`pbrf.respond` returns one record per removal set, whatever computed it: the batched
Newton trust region (:mod:`pbrf.newton`), a first-order recipe (:mod:`pbrf.engine`), the
cold-start retraining (one record per seed inside the removal's record) or the linear solve of the
linearised PBRF. A field that does not apply to the optimiser that made the record is ``None`` by
design; :meth:`RemovalDiagnostics.to_dict` leaves it out, so that the JSON of every record is the
one a run stores (the same keys, in the same order, as the dicts of earlier versions).

The certificate (``signal``, ``rho``, ``certified``; paired: ``reference_grad_norm``,
``reference_rho``, ``paired_certified``) is added by :meth:`RemovalDiagnostics.certify` and
:meth:`RemovalDiagnostics.certify_paired`, which return new records.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .solvers import SolveInfo

__all__ = ["RemovalDiagnostics", "ROUNDOFF_ULPS", "not_worse"]

#: Round-off allowance of the "did not end above its starting objective" check, in units of the
#: float64 machine epsilon times max(1, |objective|): a removal whose own signal is tiny (a point
#: fitted to ~0 loss) changes the objective by less than the round-off of its O(1) terms, and an
#: end 1 ulp above the start is not a failure of the optimiser.
ROUNDOFF_ULPS = 64


def not_worse(objective: float | None, initial_objective: float | None) -> bool:
    """The objective did not end above its start (beyond float64 round-off); a record without
    an objective is worse, one without a starting objective is not.
    """
    end = math.nan if objective is None else objective
    start = math.inf if initial_objective is None else initial_objective
    slack = ROUNDOFF_ULPS * 2.0**-52 * max(1.0, abs(start)) if math.isfinite(start) else 0.0
    return end <= start + slack


@dataclass(frozen=True)
class RemovalDiagnostics:
    """What the optimiser (or the solver) reports for one removal set.

    Attributes:
        optimizer: ``"newton"`` for the trust region; ``None`` for the others.
        steps: accepted steps (Newton) or optimiser steps taken (first order; cold start: the
            largest over seeds).
        iterations, cg_iterations: Newton only: outer iterations and CG iterations in total.
        objective: final full-batch objective (cold start: the mean over seeds).
        grad_norm: final full-batch gradient norm (cold start: the largest over seeds).
        last_minibatch_grad_norm: first order only: the gradient norm of the last minibatch.
        initial_objective: the objective at the start (Newton, first order).
        initial_grad_norm: Newton only: the gradient norm at the start.
        stalled, runaway: Newton only (see :func:`pbrf.newton.newton_optimize`).
        diverged: non-finite values, or a blow-up (cold start: any seed or reference run).
        start: ``"continuation"`` when a Newton removal started from the no-removal continuation.
        seed: a cold-start seed's own record: its seed.
        seeds, reference: cold start: the per-seed records of the removal runs and of the
            full-data reference runs.
        solve: linearised PBRF: the :class:`~pbrf.SolveInfo` of the accurate solve (its record is
            the solve's, ``extra`` reduced to scalars).
        signal, rho, certified: the certificate (:meth:`certify`).
        reference_grad_norm, reference_rho, paired_certified: the paired certificate
            (:meth:`certify_paired`).
    """

    optimizer: str | None = None
    steps: int | None = None
    iterations: int | None = None
    cg_iterations: int | None = None
    objective: float | None = None
    grad_norm: float | None = None
    last_minibatch_grad_norm: float | None = None
    initial_objective: float | None = None
    initial_grad_norm: float | None = None
    stalled: bool | None = None
    runaway: bool | None = None
    diverged: bool | None = None
    start: str | None = None
    seed: int | None = None
    seeds: tuple[RemovalDiagnostics, ...] | None = None
    reference: tuple[RemovalDiagnostics, ...] | None = None
    solve: SolveInfo | None = None
    signal: float | None = None
    rho: float | None = None
    certified: bool | None = None
    reference_grad_norm: float | None = None
    reference_rho: float | None = None
    paired_certified: bool | None = None

    # ------------------------------------------------------------------------------ builders
    @classmethod
    def newton_rows(cls, d: dict[str, Tensor]) -> list[RemovalDiagnostics]:
        """One record per row of :func:`pbrf.newton.newton_optimize`'s ``[K]`` diagnostics."""
        return [
            cls(
                optimizer="newton",
                steps=int(d["steps"][k]),
                iterations=int(d["iterations"][k]),
                cg_iterations=int(d["cg_iterations"][k]),
                objective=float(d["objective"][k]),
                grad_norm=float(d["grad_norm"][k]),
                initial_objective=float(d["initial_objective"][k]),
                initial_grad_norm=float(d["initial_grad_norm"][k]),
                stalled=bool(d["stalled"][k]),
                runaway=bool(d["runaway"][k]),
                diverged=bool(d["diverged"][k]),
            )
            for k in range(d["steps"].shape[0])
        ]

    @classmethod
    def from_solve(cls, info: SolveInfo) -> RemovalDiagnostics:
        """The record of a linear solve (linearised PBRF)."""
        return cls(iterations=info.iterations, diverged=info.diverged, solve=info)

    @classmethod
    def cold(cls, per_seed: list[RemovalDiagnostics],
             references: list[RemovalDiagnostics]) -> RemovalDiagnostics:
        """A cold-start removal over its seeds (each record carrying its ``seed``)."""
        return cls(
            steps=max(x.steps for x in per_seed),
            objective=sum(x.objective for x in per_seed) / len(per_seed),
            grad_norm=max(x.grad_norm for x in per_seed),
            diverged=any(r.diverged for r in references) or any(x.diverged for x in per_seed),
            seeds=tuple(per_seed),
            reference=tuple(references),
        )

    def replace(self, **changes: Any) -> RemovalDiagnostics:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------------------- certificates
    def certify(self, signal: float, threshold: float) -> RemovalDiagnostics:
        """With ``signal``, ``rho = grad_norm / signal`` and ``certified`` (ρ ≤ ``threshold``, the
        objective not above its start, finite, not diverged).
        """
        gn = math.nan if self.grad_norm is None else self.grad_norm
        rho = gn / signal if signal > 0 else (0.0 if gn == 0 else math.inf)
        ok = (math.isfinite(rho) and rho <= threshold and self.not_worse()
              and not self.diverged)
        return self.replace(signal=float(signal), rho=float(rho), certified=bool(ok))

    def certify_paired(self, ref: RemovalDiagnostics, threshold: float) -> RemovalDiagnostics:
        """With the paired certificate against the no-removal continuation ``ref``: its gradient
        norm, its ρ relative to this removal's signal, and ``paired_certified`` (both certified).
        """
        sig = self.signal
        ref_rho = ref.grad_norm / sig if sig > 0 else math.inf
        ref_ok = (math.isfinite(ref_rho) and ref_rho <= threshold and not ref.diverged
                  and ref.not_worse())
        return self.replace(reference_grad_norm=ref.grad_norm, reference_rho=float(ref_rho),
                            paired_certified=bool(self.certified and ref_ok))

    def not_worse(self) -> bool:
        """The objective did not end above its start (beyond float64 round-off)."""
        return not_worse(self.objective, self.initial_objective)

    # ----------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON a run stores: the fields that apply, in declaration order
        (``seeds`` and ``reference`` as lists of dicts; a solve: the solve's own dict).
        """
        if self.solve is not None:
            extra = {k: v for k, v in self.solve.extra.items()
                     if isinstance(v, (int, float, bool, str))}
            return {**self.solve.to_dict(), "extra": extra}
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in ("seeds", "reference"):
                value = [r.to_dict() for r in value]
            out[f.name] = value
        return out

    def __getitem__(self, key: str) -> Any:
        """``record["rho"]``: the entry of :meth:`to_dict` (``KeyError`` for a field that does not
        apply), for code written against the dicts of earlier versions.
        """
        return self.to_dict()[key]
