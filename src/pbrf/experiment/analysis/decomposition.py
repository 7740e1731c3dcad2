"""Decomposition of the influence/LOO mismatch into five gaps, and correlations
(``docs/conventions.md`` §6).

Pure numpy. The inputs are the measured changes of one experiment, one array per *kind*::

    dm[kind]  float array [n_test, n_removals]      Δm = m(θ_r) − m(θ^s)  (cold: vs the cold
                                                     full-data run), as returned by
                                                     ``Response.loss_change``
    df[kind]  float array [n_removals, n_test, *out] Δf = f(θ_r, x) − f(reference, x), as returned
                                                     by ``Response.output_change`` (optional)

with ``kind`` in :data:`KINDS` = response functions 1..6 of ``docs/conventions.md`` §5. Sign
convention: a positive
Δm means that removing the set *increases* the test loss. Any kind may be missing (e.g. the
cold-start runs were skipped); the statistics that involve it are then ``None``.

Non-finite values (a diverged optimisation) are never silently averaged in: a (test, removal) pair
is *valid* when every present kind is finite there, and every gap statistic is computed over the
same valid pairs, so the signed means still telescope exactly. The counts are reported.

Every function returns plain Python floats / ints / lists / ``None`` (non-finite numbers become
``None``), so the result can be written with ``json.dump(..., allow_nan=False)``;
:func:`decomposition` returns the same as a typed
:class:`~pbrf.experiment.analysis.results.Decomposition`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pbrf import kinds as _kinds
from pbrf.experiment.analysis.results import Decomposition
from pbrf.stats import pearson, rankdata, spearman

__all__ = [
    "KINDS",
    "GAPS",
    "GAP_PAIRS",
    "KIND_LABELS",
    "RESPONSE_KINDS",
    "rankdata",
    "pearson",
    "spearman",
    "decompose",
    "decomposition",
    "correlations",
    "correlation_entry",
    "exclude_removals",
    "finite_or_none",
    "summarise",
]

#: The kinds of the decomposition chain, in order (the built-in records of :mod:`pbrf.kinds`).
KINDS = _kinds.chain()
#: Gap j lies between ``KINDS[j]`` and ``KINDS[j + 1]``.
GAPS = (
    "warm-start gap",
    "proximity gap",
    "non-convergence gap",
    "linearisation error",
    "solver error",
)
#: ``{gap name: (kind a, kind b)}``: the gap is Δm_a − Δm_b.
GAP_PAIRS = {name: (KINDS[j], KINDS[j + 1]) for j, name in enumerate(GAPS)}
#: The response functions the influence estimate is compared with (the paper's table rows).
RESPONSE_KINDS = KINDS[:-1]
#: Human-readable names, as in the paper (a live view of the registry: registered kinds included).
KIND_LABELS = _kinds.view("label")


# --------------------------------------------------------------------------- small helpers


def finite_or_none(x) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf/None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_array(name: str, value) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be an array of measurements, got a scalar.")
    return arr


def _present(arrays: Mapping | None, what: str) -> dict[str, np.ndarray]:
    """The arrays of the known kinds that are present (not None), as float64, with one shape."""
    if arrays is None:
        return {}
    known = _kinds.names()
    unknown = sorted(set(arrays) - set(known))
    if unknown:
        raise ValueError(f"{what} has unknown kinds {unknown}; use keys from {known}.")
    out = {k: _as_array(f"{what}[{k!r}]", arrays[k]) for k in known if arrays.get(k) is not None}
    shapes = {k: a.shape for k, a in out.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"all {what} arrays must have one shape; got {shapes}.")
    return out


# --------------------------------------------------------------------------- correlations


def _per_test_mean(fn, scores: np.ndarray, values: np.ndarray) -> tuple[float, int]:
    """Mean over test points (rows) of ``fn(row_scores, row_values)``, skipping NaN rows."""
    per_row = np.array([fn(s, v) for s, v in zip(scores, values)], dtype=np.float64)
    ok = np.isfinite(per_row)
    return (float(per_row[ok].mean()) if ok.any() else math.nan), int(ok.sum())


def correlation_entry(scores: np.ndarray, values: np.ndarray) -> dict:
    """Pearson and Spearman of ``scores`` with ``values`` (over all pairs and per test point),
    JSON-safe, with the number of finite pairs and of test points used.
    """
    p_row, n_rows = _per_test_mean(pearson, scores, values)
    s_row, _ = _per_test_mean(spearman, scores, values)
    n_pairs = int((np.isfinite(scores) & np.isfinite(values)).sum())
    return {
        "pearson": finite_or_none(pearson(scores, values)),
        "spearman": finite_or_none(spearman(scores, values)),
        "pearson_per_test": finite_or_none(p_row),
        "spearman_per_test": finite_or_none(s_row),
        "n_pairs": n_pairs,
        "n_tests_used": n_rows,
    }


def correlations(scores, dm: Mapping) -> dict[str, dict]:
    """Correlations between influence scores and each kind's measured change
    (``docs/conventions.md`` §6).

    Args:
        scores: influence estimates Δm_IF, shape [n_test, n_removals].
        dm: ``{kind: Δm}``, each [n_test, n_removals]; missing/None kinds are skipped.

    Returns:
        ``{kind: {"pearson", "spearman", "pearson_per_test", "spearman_per_test", "n_pairs",
        "n_tests_used"}}`` for every present kind in :data:`KINDS` order. ``pearson``/``spearman``
        are over all finite (test, removal) pairs; the ``*_per_test`` values are the mean over
        test points of the correlation across removals, skipping rows with fewer than two finite
        pairs or zero variance (``n_tests_used`` counts the rows kept). Undefined values are None.
    """
    scores = _as_array("scores", scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_test, n_removals], got shape {scores.shape}.")
    out = {}
    for kind, values in _present(dm, "dm").items():
        if values.shape != scores.shape:
            raise ValueError(
                f"dm[{kind!r}] has shape {values.shape} but scores has {scores.shape}; both must "
                "be [n_test, n_removals] (transpose one of them)."
            )
        out[kind] = correlation_entry(scores, values)
    return out


# --------------------------------------------------------------------------- decomposition


def _valid_mask(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Boolean mask of the pairs where every array is finite (over trailing output dims too)."""
    if not arrays:
        return None
    first = next(iter(arrays.values()))
    mask = np.ones(first.shape[:2] if first.ndim >= 2 else first.shape, dtype=bool)
    for a in arrays.values():
        finite = np.isfinite(a)
        mask &= finite.reshape(mask.shape + (-1,)).all(axis=-1)
    return mask


def _output_norm(diff: np.ndarray) -> np.ndarray:
    """L2 norm over the output dims of ``diff`` [n_pairs, *out] (abs for scalar outputs)."""
    return np.sqrt((diff.reshape(diff.shape[0], -1) ** 2).sum(axis=-1))


def _gap_stats(dm: dict[str, np.ndarray], mask: np.ndarray) -> tuple[dict, dict]:
    absolute, signed = {}, {}
    for name, (a, b) in GAP_PAIRS.items():
        if a in dm and b in dm and mask.any():
            diff = dm[a][mask] - dm[b][mask]
            absolute[name] = finite_or_none(np.abs(diff).mean())
            signed[name] = finite_or_none(diff.mean())
        else:
            absolute[name] = signed[name] = None
    return absolute, signed


def _output_gaps(df: dict[str, np.ndarray]) -> dict | None:
    if not df:
        return None
    mask = _valid_mask(df)
    out = {}
    for name, (a, b) in GAP_PAIRS.items():
        ok = a in df and b in df and mask.any()
        out[name] = finite_or_none(_output_norm(df[a][mask] - df[b][mask]).mean()) if ok else None
    return out


def _chain(kinds) -> tuple[str, str] | None:
    """First and last present kinds when they form one contiguous block of :data:`KINDS`
    (kinds outside the chain are ignored).
    """
    idx = [KINDS.index(k) for k in kinds if k in KINDS]
    if len(idx) < 2 or idx != list(range(idx[0], idx[-1] + 1)):
        return None
    return KINDS[idx[0]], KINDS[idx[-1]]


def _telescoping_residual(dm: dict[str, np.ndarray], mask: np.ndarray) -> tuple[float | None,
    list | None]:
    """max over valid pairs of |Σ_j (Δm_j − Δm_{j+1}) − (Δm_first − Δm_last)|, and [first, last]."""
    chain = _chain(list(dm))
    if chain is None or not mask.any():
        return None, list(chain) if chain else None
    lo, hi = KINDS.index(chain[0]), KINDS.index(chain[1])
    with np.errstate(invalid="ignore"):  # inf − inf at invalid pairs, masked out below
        total = sum(dm[KINDS[j]] - dm[KINDS[j + 1]] for j in range(lo, hi))
        residual = np.abs(total - (dm[chain[0]] - dm[chain[1]]))[mask]
    return float(residual.max()), list(chain)


def decompose(dm: Mapping, df: Mapping | None = None) -> dict:
    """The five gaps between consecutive response functions (``docs/conventions.md`` §6), averaged
    over pairs: :meth:`Decomposition.to_dict` of :func:`decomposition`.
    """
    return decomposition(dm, df).to_dict()


def decomposition(dm: Mapping, df: Mapping | None = None) -> Decomposition:
    """The five gaps between consecutive response functions, as a typed :class:`Decomposition`.

    For gap j between kinds a = ``KINDS[j]`` and b = ``KINDS[j + 1]``:
    ``gaps`` = mean |Δm_a − Δm_b|, ``signed`` = mean (Δm_a − Δm_b), ``output_gaps`` = mean
    ||Δf_a − Δf_b||₂ (L2 over the output dims), means over all valid (test, removal) pairs.

    Args:
        dm: ``{kind: Δm}``, each [n_test, n_removals]; missing or None kinds allowed.
        df: optional ``{kind: Δf}``, each [n_removals, n_test, *out].

    Returns:
        A :class:`~pbrf.experiment.analysis.results.Decomposition` (its fields are JSON-safe).
        ``telescoping_residual`` is max over pairs of |Σ signed differences − (Δm_first −
        Δm_last)| over the contiguous chain of present kinds (None if the present kinds are not
        contiguous); it is floating-point round-off (~1e-16 relative) by construction, and
        ``Σ signed`` equals ``total_signed`` up to the same round-off.
    """
    arrays = _present(dm, "dm")
    if not arrays:
        raise ValueError(f"dm has no arrays; pass at least two of {KINDS}.")
    mask = _valid_mask(arrays)
    absolute, signed = _gap_stats(arrays, mask)
    residual, chain = _telescoping_residual(arrays, mask)
    both = "cold" in arrays and "influence" in arrays and mask.any()
    total = arrays["cold"][mask] - arrays["influence"][mask] if both else None
    return Decomposition(
        gaps=absolute,
        signed=signed,
        output_gaps=_output_gaps(_present(df, "df")),
        total=finite_or_none(np.abs(total).mean()) if both else None,
        total_signed=finite_or_none(total.mean()) if both else None,
        telescoping_residual=residual,
        telescoping_chain=chain,
        mean_abs={k: finite_or_none(np.abs(a[mask]).mean()) if mask.any() else None for k,
                  a in arrays.items()},
        kinds=list(arrays),
        n_pairs=int(mask.size),
        n_valid=int(mask.sum()),
        nonfinite={k: int((~np.isfinite(a)).sum()) for k, a in arrays.items()},
    )


# --------------------------------------------------------------------------- summary


def _diverged_removals(diverged: Mapping | None, diagnostics: Mapping | None,
                       n_removals: int) -> dict[str, list[int]]:
    """``{kind: sorted removal indices}`` flagged as diverged (from ``diverged`` or the
    diagnostics).
    """
    if diverged is None and isinstance(diagnostics, Mapping):
        diverged = {k: v.get("diverged_removals") for k, v in diagnostics.items()
                    if isinstance(v, Mapping) and v.get("diverged_removals")}
    out = {}
    for kind, flags in (diverged or {}).items():
        if flags is None:
            continue
        arr = np.asarray(flags)
        if arr.dtype == bool:
            if arr.shape != (n_removals,):
                raise ValueError(f"diverged[{kind!r}] has {arr.shape} flags; expected one per "
                                 f"removal ({n_removals}).")
            idx = np.flatnonzero(arr)
        else:
            idx = np.unique(arr.astype(np.int64).ravel())
            if idx.size and not (0 <= idx[0] and idx[-1] < n_removals):
                raise ValueError(f"diverged[{kind!r}] names removals outside 0..{n_removals - 1}.")
        if idx.size:
            out[kind] = [int(i) for i in idx]
    return out


def exclude_removals(arrays: Mapping | None, removals: dict[str, list[int]],
                     axis: int) -> Mapping | None:
    """Copies of the arrays with the named removals of each kind set to NaN along ``axis``."""
    if not arrays or not removals:
        return arrays
    out = dict(arrays)
    for kind, idx in removals.items():
        if out.get(kind) is not None:
            a = np.array(out[kind], dtype=np.float64)  # a copy: the caller's arrays are not changed
            a[(slice(None),) * axis + (idx,)] = np.nan
            out[kind] = a
    return out


def summarise(
    dm: Mapping,
    df: Mapping | None = None,
    scores=None,
    diagnostics: Mapping | None = None,
    diverged: Mapping | None = None,
) -> dict:
    """Decomposition and correlations of one experiment, as one JSON-safe dict.

    Args:
        dm: ``{kind: Δm}``, each [n_test, n_removals].
        df: optional ``{kind: Δf}``, each [n_removals, n_test, *out].
        scores: influence estimates [n_test, n_removals]; defaults to ``dm["influence"]``.
        diagnostics: optional JSON-safe dict (solver / optimiser diagnostics), stored as is except
            for per-kind ``"diverged_removals"`` lists, which are read as ``diverged``.
        diverged: optional ``{kind: flags [n_removals] | removal indices}`` of responses that
            diverged. Their Δm / Δf are set to NaN before any statistic (a diverged optimisation
            measures nothing), so they are left out of every gap, correlation and plot; the
            summary counts and names them under ``"diverged"``.

    Returns:
        ``{"n_test", "n_removals", "kinds", "decomposition": decompose(dm, df),
        "correlations": correlations(scores, dm) | {}}`` plus ``"diagnostics"`` when given and
        ``"diverged": {"counts": {kind: n}, "removals": {kind: [indices]}}`` when any diverged.
        Correlations are empty when there are no scores and no ``dm["influence"]``.
    """
    present = _present(dm, "dm")
    if not present:
        raise ValueError(f"dm has no arrays; pass at least two of {KINDS}.")
    shape = next(iter(present.values())).shape
    n_removals = int(shape[1]) if len(shape) > 1 else 1
    excluded = _diverged_removals(diverged, diagnostics, n_removals)
    dm, df = exclude_removals(present, excluded, axis=1), exclude_removals(df, excluded, axis=0)
    dec = decompose(dm, df)
    present = _present(dm, "dm")
    if scores is None:
        scores = present.get("influence")
    corr = correlations(scores, dm) if scores is not None else {}
    summary = {
        "n_test": int(shape[0]),
        "n_removals": n_removals,
        "kinds": dec["kinds"],
        "decomposition": dec,
        "correlations": corr,
    }
    if diagnostics is not None:
        summary["diagnostics"] = {k: ({kk: vv for kk, vv in v.items() if kk != "diverged_removals"}
                                      if isinstance(v, Mapping) else v) for k,
                                          v in diagnostics.items()}
    if excluded:
        summary["diverged"] = {"counts": {k: len(v) for k, v in excluded.items()},
                               "removals": excluded}
    return summary


# --------------------------------------------------------------------------- paired chain

#: Kinds that have a paired variant (measured against a no-removal continuation).
PAIRED_KINDS = ("warm", "proximal")


def paired_chain(dm: Mapping, paired: Mapping) -> dict:
    """The decomposition with warm start and proximal measured against their no-removal
    continuations (same recipe and seed), and the drift that separates the two chains.

    Args:
        dm: ``{kind: Δm}`` of the paper-literal chain (warm and proximal measured from θ^s).
        paired: ``{"warm": Δm, "proximal": Δm}`` measured from the continuations.

    Returns:
        ``{"decomposition": decompose(paired chain), "correlations": ... for the paired kinds,
        "drift": {kind: {"mean_abs", "signed"}}, "literal_residual": float|None}``. The drift of a
        kind is ``Δm_literal − Δm_paired`` = the continuation's own change of the test loss
        (removal-independent). The literal signed gaps equal the paired ones plus drift terms
        (``cold − warm = (cold − warm_p) − drift_w``, ``warm − prox = (warm_p − prox_p) + drift_w −
        drift_p``, ``prox − pbrf = (prox_p − pbrf) + drift_p``); ``literal_residual`` is the largest
        deviation from these identities over valid pairs (round-off only).
    """
    arrays = _present(dm, "dm")
    extra = {k: _as_array(f"paired[{k!r}]",
                          paired[k]) for k in PAIRED_KINDS if paired.get(k) is not None}
    chain = {**arrays, **extra}
    mask = _valid_mask({**arrays, **{f"{k}_paired": v for k, v in extra.items()}})
    for k in list(chain):  # the same pairs in both chains
        chain[k] = np.where(mask, chain[k], np.nan)
    dec = decompose(chain)
    drift, ids = {}, []
    for k, v in extra.items():
        d = (arrays[k] - v)[mask]
        drift[k] = {"mean_abs": finite_or_none(np.abs(d).mean()) if d.size else None,
                    "signed": finite_or_none(d.mean()) if d.size else None}
    w = arrays.get("warm"), extra.get("warm")
    p = arrays.get("proximal"), extra.get("proximal")
    dw = None if any(a is None for a in w) else w[0] - w[1]
    dp = None if any(a is None for a in p) else p[0] - p[1]
    if dw is not None and "cold" in arrays:
        ids.append((arrays["cold"] - w[0]) - ((arrays["cold"] - w[1]) - dw))
    if dw is not None and dp is not None:
        ids.append((w[0] - p[0]) - ((w[1] - p[1]) + dw - dp))
    if dp is not None and "pbrf" in arrays:
        ids.append((p[0] - arrays["pbrf"]) - ((p[1] - arrays["pbrf"]) + dp))
    residual = max((float(np.abs(r[mask]).max()) for r in ids if mask.any()), default=None)
    scores = arrays.get("influence")
    corr = correlations(scores, {k: np.where(mask, v, np.nan) for k,
                                 v in extra.items()}) if scores is not None else {}
    return {"decomposition": dec, "correlations": corr, "drift": drift,
            "literal_residual": residual}
