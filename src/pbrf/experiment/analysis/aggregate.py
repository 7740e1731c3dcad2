"""The aggregate of several θ^s seeds' summaries: every float as mean ± sample standard
deviation over the seeds where it is finite, counts added up, largest residuals kept.

Pure Python/numpy on JSON-safe summaries (:func:`aggregate`); :class:`SeedStats` is the mean and
deviation of one list of values, used by the aggregate and by the sweep figures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["aggregate", "is_multi_seed", "SeedStats", "is_number"]


#: Inside these sections integer counts add up over seeds (certified 46 of 48 per seed → of 144).
_SUMMED = ("certificates", "diverged")


#: Dicts of numbers whose standard deviations go to a sibling dict ``<key>_std`` (one entry per
#: gap), not to ``<key>_std`` entries inside them.
_DICT_STD = ("gaps", "signed", "output_gaps", "mean_abs")


#: Top-level sections that describe each seed's run rather than count its results: their integers
#: are kept when equal (``theta_s.n_test``), not added up.
_KEPT = ("experiment", "theta_s", "lds", "seeds")


#: Largest value over seeds rather than the mean.
_MAXED = ("max_rho", "telescoping_residual", "literal_residual", "max_residual")


def is_multi_seed(summary: dict) -> bool:
    """Whether a summary is the aggregate of several seeds (it has ``"seeds"``)."""
    return isinstance(summary, dict) and isinstance(summary.get("seeds"), dict)


class SeedStats:
    """A float leaf averaged over seeds (``std`` is None with fewer than two finite values)."""

    def __init__(self, values: list) -> None:
        finite = [float(v) for v in values if is_number(v) and math.isfinite(float(v))]
        self.mean = float(np.mean(finite)) if finite else None
        self.std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None


def is_number(v: Any) -> bool:
    """A real number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _merge(values: list, key: str, summed: bool) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, dict) for v in present):
        return _merge_dicts(present, summed or key in _SUMMED)
    if all(isinstance(v, bool) for v in present):
        return any(present)
    if all(is_number(v) for v in present):
        if key in _MAXED:
            finite = [float(v) for v in present if math.isfinite(float(v))]
            return max(finite) if finite else None
        if all(isinstance(v, int) for v in present):
            if summed or len(set(present)) > 1:
                return int(sum(present))
            return present[0]
        return SeedStats(values)
    if all(v == present[0] for v in present):
        return present[0]
    if all(isinstance(v, str) for v in present):
        return "; ".join(dict.fromkeys(present))
    return list(values)  # e.g. per-seed lists of excluded removals


def _merge_dicts(dicts: list[dict], summed: bool, top: bool = False,
                 std_out: dict | None = None) -> dict:
    """Merge same-shaped dicts; the deviation of a mean goes beside it as ``<key>_std``, or into
    ``std_out[key]`` when given (the gap dicts).
    """
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    out: dict = {}
    for k in keys:
        values = [d.get(k) for d in dicts]
        if top:  # counts inside the result sections add up; the top-level sizes are per seed
            both = any(isinstance(v, dict) for v in values) and k not in _KEPT
        else:
            both = summed
        present = [v for v in values if v is not None]
        if k in _DICT_STD and present and all(isinstance(v, dict) for v in present):
            std: dict = {}
            out[k] = _merge_dicts(present, both, std_out=std)
            out[f"{k}_std"] = std
            continue
        merged = _merge(values, k, both)
        if isinstance(merged, SeedStats):
            out[k] = merged.mean
            if merged.std is not None:
                if std_out is None:
                    out[f"{k}_std"] = merged.std
                else:
                    std_out[k] = merged.std
        else:
            out[k] = merged
    return out


def aggregate(summaries: list[dict], train_seeds: list[int], runs: list[str]) -> dict:
    """The summary of a multi-seed run from its seeds' summaries.

    Every float is the mean over the seeds where it is finite, with the sample standard deviation
    beside it as ``<key>_std`` (``correlations.pbrf.pearson`` / ``pearson_std``,
    ``theta_s.test_metric`` / ``test_metric_std``); for the gap dicts of a decomposition the
    deviations are a sibling dict (``decomposition.gaps`` / ``decomposition.gaps_std``). Counts
    in ``certificates`` and ``diverged`` add up over seeds; ``max_rho`` and residuals are the
    largest over seeds; flags are true when
    true in any seed. Inside the result sections (all but ``experiment``, ``theta_s`` and ``lds``)
    integer counts add up over seeds (pairs used, certified removals); the top-level ``n_test``
    and ``n_removals`` are per seed. ``seeds`` names the seeds and their run folders.
    """
    if not summaries:
        raise ValueError("aggregate needs at least one summary.")
    out = _merge_dicts(summaries, False, top=True)
    out["seeds"] = {"n": len(summaries), "train_seeds": list(train_seeds), "runs": list(runs)}
    exp = dict(out.get("experiment") or {})
    exp["seeds"] = len(summaries)
    out["experiment"] = exp
    return out

