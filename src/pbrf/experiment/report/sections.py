"""The markdown sections of a run's ``report.md`` (shared by the multi-seed report) and the lines
the terminal summary shares with them (θ^s quality, certificates).

Every section reads a typed :class:`~pbrf.experiment.analysis.results.Summary`; a section that
does not apply (``None`` in the summary) renders as ``""``. A number carries ``± std`` where the
summary is a multi-seed aggregate (:meth:`~pbrf.experiment.analysis.results.Record.mean_std`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pbrf.experiment.analysis import GAP_PAIRS, GAPS, KIND_LABELS, KINDS
from pbrf.experiment.analysis.results import (
    Certificates,
    Correlation,
    Decomposition,
    Diverged,
    Lds,
    Quality,
    Record,
    Summary,
)
from pbrf.experiment.report.kit import (
    NA,
    finite,
    flatten,
    fmt_corr,
    fmt_ms,
    fmt_setting,
    fmt_value,
    md_table,
    plottable,
    response_kinds,
)

__all__ = [
    "CORRELATION_HEADER",
    "GAP_HEADER",
    "ms",
    "quality_lines",
    "correlation_rows",
    "decomposition_rows",
    "telescoping_text",
    "validity_text",
    "certificate_lines",
    "lds_line",
    "lds_convergence",
    "experiment_section",
    "theta_s_section",
    "correlation_section",
    "decomposition_section",
    "certificate_section",
    "paired_section",
    "lds_section",
    "diagnostics_section",
    "figures_section",
    "config_section",
    "pbrf_agreement",
    "gap_finding",
    "how_to_read",
]

#: Columns of the correlation tables (literal and paired chain).
CORRELATION_HEADER = ("response function", "Pearson", "Spearman", "Pearson (per-test mean)",
                      "Spearman (per-test mean)")
#: Columns of the decomposition tables (literal and paired chain, first column named by caller).
GAP_HEADER = ("between (a → b)", "mean |Δm_a − Δm_b|", "signed mean Δm_a − Δm_b",
              "output-space mean ||Δf_a − Δf_b||")
#: Config entries (matched on the last dotted key) repeated in the report's "Experiment" section.
HEADLINE_KEYS = (
    "dataset", "model", "n_train", "n_test", "n_test_points", "n_removals", "group_size",
    "damping", "weight_decay", "solver", "curvature", "dtype", "device",
)  # fmt: skip
#: Config entries listed first in the "Configuration" section.
CONFIG_FIRST = (
    "name", "dataset", "task", "model", "n_train", "n_test", "n_removals", "removal_size",
    "damping", "weight_decay", "solver", "curvature", "seeds", "dtype", "device",
)  # fmt: skip
_CORRELATION_KEYS = ("pearson", "spearman", "pearson_per_test", "spearman_per_test")


def ms(record: Record | None, name: str, key: str | None = None, fmt=fmt_corr) -> str:
    """``value ± std`` of a record's field (or of entry ``key`` of a dict field), the plain value
    in a single-seed summary, ``n/a`` when missing.
    """
    return NA if record is None else fmt_ms(*record.mean_std(name, key), fmt)


# --------------------------------------------------------------------------- θ^s


def quality_lines(q: Quality | Mapping | None) -> list[str]:
    """One line on θ^s (and its warning) for the terminal and the report."""
    q = None if q is None else Quality.from_dict(q)
    if q is None or q.metric is None:
        return []
    m, std = q.metric, q.std("test_metric")
    line = (
        f"θ^s: train loss {q.train_loss:.4g}, test loss {q.test_loss:.4g}; "
        f"train {m} {q.train_metric:.3f}, "
        f"test {m} {q.test_metric:.3f}{f' ± {std:.3f}' if isinstance(std, float) else ''} "
        f"(chance {q.chance:.3f}, {q.n_test} test examples); "
        f"‖∇J(θ^s)‖ = {q.grad_norm:.3e}"
    )
    return [line] + ([f"WARNING: {q.warning}"] if q.warning else [])


def theta_s_section(summary: Summary) -> str:
    """Train and test loss and metric of θ^s, chance level, gradient norm, the warning."""
    q = summary.theta_s
    if q is None or q.metric is None:
        return ""
    m = q.metric
    rows = [["loss", fmt_value(q.train_loss), fmt_value(q.test_loss)],
            [m, ms(q, "train_metric"), ms(q, "test_metric")]]
    text = (f"## The base model θ^s\n\n{md_table(['', 'train', 'test'], rows, align='lrr')}\n\n"
            f"Chance level ({m} of always predicting the most frequent training label, or R² = 0): "
            f"{q.chance:.3f}; full-batch gradient norm ‖∇J(θ^s)‖ = {q.grad_norm:.3e}; "
            f"{q.n_test} test examples.")
    warning = quality_lines(q)[1:]
    return text + ("\n\n**" + warning[0] + "**" if warning else "")


# --------------------------------------------------------------------------- experiment, config


def config_section(config: Mapping) -> str:
    """Every configuration entry (dotted keys), the usual ones first."""
    items = flatten(config or {})
    if not items:
        return "## Configuration\n\n_No configuration recorded._"
    rank = {k: i for i, k in enumerate(CONFIG_FIRST)}
    items.sort(key=lambda kv: rank.get(kv[0], len(rank)))  # stable: the rest keep their order
    rows = [(f"`{k}`", fmt_setting(v)) for k, v in items]
    return "## Configuration\n\n" + md_table(["setting", "value"], rows, align="ll")


def _headline_config(config: Mapping) -> dict:
    """The config entries whose last key is one of :data:`HEADLINE_KEYS` (any nesting)."""
    return {k: v for k, v in flatten(config or {})
            if k.rsplit(".", 1)[-1] in HEADLINE_KEYS and v is not None}


def _cold_seeds_note(summary: Summary, config: Mapping) -> str | None:
    """Which seeds cold start retrains with, and whether one of them is θ^s's own seed (then
    that retraining repeats θ^s's initialisation and minibatch order: same-seed retraining).
    """
    seeds = list((config.get("responses") or {}).get("cold_seeds") or [])
    if "cold" not in (summary.kinds or []) or not seeds:
        return None
    own = (config.get("train") or {}).get("seed")
    if own in seeds:
        other = len(seeds) - 1
        return (f"{seeds}: includes θ^s's seed {own} (same-seed retraining)"
                + (f" and {other} other seed{'s' if other != 1 else ''}" if other else " only"))
    return f"{seeds}: all different from θ^s's seed {own}"


def experiment_section(summary: Summary, config: Mapping) -> str:
    """Key facts: the summary's ``experiment``, sizes, kinds computed, headline config values."""
    facts = dict(summary.experiment or {})
    for key in ("n_test", "n_removals"):
        if getattr(summary, key) is not None:
            facts.setdefault(key, getattr(summary, key))
    if summary.kinds:
        facts.setdefault("response functions",
                         ", ".join(KIND_LABELS.get(k, k) for k in summary.kinds))
    for key, value in _headline_config(config).items():
        if key.rsplit(".", 1)[-1] not in facts:  # e.g. data.n_train when n_train is known
            facts[key] = value
    seeds_note = _cold_seeds_note(summary, config)
    if seeds_note:
        facts["cold-start seeds"] = seeds_note
    if not facts:
        return ""
    rows = [(f"`{k}`", fmt_setting(v)) for k, v in flatten(facts)]
    return "## Experiment\n\n" + md_table(["", "value"], rows, align="ll")


# --------------------------------------------------------------------------- correlations, gaps


def correlation_rows(corr: Mapping[str, Correlation], kinds: Sequence[str] | None = None,
                     suffix: str = "") -> list[list[str]]:
    """One row per kind: label, then Pearson, Spearman and their per-test means (``n/a`` for a
    kind without correlations).
    """
    kinds = response_kinds(corr) if kinds is None else kinds
    return [[KIND_LABELS[k] + suffix] + [ms(corr.get(k), key) for key in _CORRELATION_KEYS]
            for k in kinds]


def correlation_section(summary: Summary) -> str:
    """The correlation table of the influence estimate with each response function."""
    table = md_table(CORRELATION_HEADER, correlation_rows(summary.correlations or {}))
    return (
        "## Influence estimate vs response functions\n\n"
        "Correlation between the influence estimate Δm_IF and each response function's Δm over all "
        "(test point, removal) pairs, and the mean over test points of the correlation across "
        "removals.\n\n" + table
    )


def decomposition_rows(dec: Decomposition) -> list[list[str]]:
    """One row per gap (name, a → b, mean |Δm|, signed mean, output-space mean), then the total."""
    rows = []
    for gap in GAPS:
        a, b = GAP_PAIRS[gap]
        vals = [ms(dec, key, gap, fmt_value) for key in ("gaps", "signed", "output_gaps")]
        rows.append([gap, f"{KIND_LABELS[a]} → {KIND_LABELS[b]}"] + vals)
    total = ["**total**", f"{KIND_LABELS['cold']} → influence", ms(dec, "total", fmt=fmt_value),
             ms(dec, "total_signed", fmt=fmt_value), ""]
    return rows + [total]


def _gaps_within(first: str, last: str) -> list[str]:
    lo, hi = KINDS.index(first), KINDS.index(last)
    return [g for g, (a, b) in GAP_PAIRS.items() if lo <= KINDS.index(a) and KINDS.index(b) <= hi]


def telescoping_text(dec: Decomposition) -> str:
    """The telescoping check: Σ signed gaps over the contiguous chain and its round-off."""
    chain, residual = dec.telescoping_chain, finite(dec.telescoping_residual)
    if not chain or residual is None:
        return ("Telescoping check: n/a (the response functions computed do not form a contiguous "
                "chain).")
    a, b = chain
    signed = [finite((dec.signed or {}).get(g)) for g in _gaps_within(a, b)]
    text = f"Telescoping check ({KIND_LABELS[a]} → {KIND_LABELS[b]}): Σ signed gaps = "
    text += NA if None in signed else fmt_value(sum(signed))
    if list(chain) == ["cold", "influence"]:
        text += f"; mean(Δm_cold − Δm_influence) = {fmt_value(dec.total_signed)}"
    return text + (
        f"; max over pairs of |Σ_j (Δm_j − Δm_j+1) − (Δm_{a} − Δm_{b})| = {fmt_value(residual)}"
        " (floating-point round-off only)."
    )


def _removal_list(idx: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(f"#{i}" for i in idx[:limit])
    return shown + (f", … {len(idx) - limit} more" if len(idx) > limit else "")


def _count(x) -> str:
    return str(int(x)) if float(x).is_integer() else fmt_value(x)


def validity_text(dec: Decomposition, diverged: Diverged | None = None,
                  certificates: Certificates | None = None) -> str:
    """Pairs used, the removals left out (uncertified or diverged), the non-finite Δm."""
    text = f"Pairs used: {dec.n_valid} of {dec.n_pairs} (test point, removal) pairs."
    total, kept = ((certificates.n_removals, certificates.n_kept) if certificates is not None
                   else (None, None))
    if total is not None and kept is not None and kept < total:
        text += (f" Removals left out of every statistic as uncertified or diverged: "
                 f"{_count(total - kept)} of {_count(total)} (see the certificates).")
    removals = (diverged.removals if diverged is not None else None) or {}
    if removals:
        named = "; ".join(
            f"{KIND_LABELS.get(k, k)} {len(v)} ({_removal_list(v)})" for k, v in removals.items()
        )
        text += (" Diverged responses, excluded from every statistic and plot (removal sets, as "
                 f"numbered in removals.json): {named}.")
    bad = {k: v for k, v in (dec.nonfinite or {}).items() if v}
    if bad:
        counts = ", ".join(f"{KIND_LABELS.get(k, k)} {v}" for k, v in bad.items())
        text += f" Non-finite Δm (pairs excluded from every gap): {counts}."
    return text


def decomposition_section(summary: Summary) -> str:
    """The gap table, the telescoping check and the pairs used."""
    dec = summary.decomposition or Decomposition()
    table = md_table(("gap",) + GAP_HEADER, decomposition_rows(dec), align="llrrr")
    return "\n\n".join(["## Decomposition of the mismatch", table, telescoping_text(dec),
                        validity_text(dec, summary.diverged, summary.certificates)])


# --------------------------------------------------------------------------- certificates


def certificate_lines(summary: Summary | Mapping) -> list[str]:
    """One line per optimised kind ("PBRF: certified 48 of 48, max ρ 3e-9"), the exclusions, and
    the solver residuals (flagged at ≥ 1).
    """
    summary = Summary.from_dict(summary)
    cert, lines = summary.certificates, []
    for kind, e in ((cert.by_kind if cert is not None else None) or {}).items():
        if e.certified is None:
            continue
        text = (f"{KIND_LABELS.get(kind, kind)}: certified {e.certified} of {cert.n_removals}"
                f" (ρ ≤ {fmt_value(cert.threshold)}), max ρ {fmt_value(e.max_rho)},"
                f" median ρ {fmt_value(e.median_rho)}")
        if e.diverged:
            text += f", diverged {e.diverged}"
        text += "" if e.excludes_uncertified else " (defined by its recipe: not excluded)"
        lines.append(text)
    if cert is not None and cert.keys != ():
        left = (cert.n_removals or 0) - (cert.n_kept or 0)
        lines.append(f"Removals used in the statistics: {cert.n_kept} of {cert.n_removals}"
                     + (f" (left out: {left}, uncertified or diverged; indices "
                        f"{cert.excluded_removals})" if left else ""))
    for label, e in (summary.solvers or {}).items():
        text = (f"{label} solve ({e.solver}, {KIND_LABELS.get(e.kind, e.kind)}): "
                f"max relative residual {fmt_value(e.max_residual)}")
        if e.flagged:
            text = ("WARNING: " + text
                    + " ≥ 1 — the solve did not reduce the residual; its numbers are unreliable")
        lines.append(text)
    return lines


def certificate_section(summary: Summary) -> str:
    """:func:`certificate_lines` as a list, after what a certificate is."""
    lines = certificate_lines(summary)
    if not lines:
        return ""
    intro = (
        "Every optimised response carries a certificate ρ = ||∇F(θ_r)|| / signal: the final "
        "full-batch gradient norm of its objective relative to the removal's own signal "
        "(1/N)||Σ_{m∈r} ∇L_m(θ^s)||. PBRF, proximal and full-batch warm-start pairs that are "
        "not certified (or diverged) are left out of every statistic above."
    )
    return ("## Certificates and solver residuals\n\n" + intro + "\n\n"
            + "\n".join(f"- {ln}" for ln in lines))


# --------------------------------------------------------------------------- paired chain, LDS


_PAIRED_INTRO = (
    "## Paired chain (warm start and proximal against a no-removal continuation)\n\n"
    "The paper measures warm-start and proximal responses from θ^s, so when θ^s is not a "
    "minimum they include the drift of continued training, the same for every removal. Here "
    "each is also measured against a no-removal continuation with the same recipe and seed "
    "(as cold start already is); the drift rows are the difference between the two chains. "
    "The paired gaps telescope to cold − influence; the literal gaps equal the paired ones "
    "plus drift terms (largest deviation {residual})."
)


def paired_section(summary: Summary) -> str:
    """The paired chain's correlations, gaps (with the drift rows) and checks."""
    paired = summary.paired
    if paired is None:
        return ""
    corr = paired.correlations or {}
    rows = correlation_rows(corr, list(corr), " (paired)")
    dec = paired.decomposition or Decomposition()
    gap_rows = decomposition_rows(dec)
    for k, d in (paired.drift or {}).items():
        gap_rows.insert(-1, [f"drift ({KIND_LABELS.get(k, k)})", "literal − paired",
                             ms(d, "mean_abs", fmt=fmt_value), ms(d, "signed", fmt=fmt_value), ""])
    return "\n\n".join([
        _PAIRED_INTRO.format(residual=fmt_value(paired.literal_residual)),
        md_table(CORRELATION_HEADER, rows) if rows else "",
        md_table(("gap (paired chain)",) + GAP_HEADER, gap_rows, align="llrrr"),
        telescoping_text(dec),
        validity_text(dec),
    ])


def lds_convergence(lds: Lds) -> str:
    """How far the LDS retrainings are from a stationary point (a sentence), or ``""``."""
    conv = lds.convergence
    if conv is None or conv.keys == ():
        return ""
    return (f" Retraining is defined by the base recipe: ρ = ‖∇J‖ / signal after it is "
            f"{fmt_value(conv.median_rho)} (median), {fmt_value(conv.max_rho)} "
            f"(max); {conv.diverged or 0} diverged.")


def lds_section(summary: Summary) -> str:
    """The LDS of the run's influence estimate and how it was measured."""
    lds = summary.lds
    if lds is None:
        return ""
    own = lds.influence
    return (f"## Linear datamodeling score (LDS)\n\n{lds.subsets} subsets, each keeping "
            f"{100 * lds.alpha:.0f}% of the training set ({lds.removed_per_subset} points "
            f"removed), retrained from scratch with seeds {lds.seeds}. LDS of the run's "
            "influence "
            f"estimate: **{fmt_corr(own and own.lds)}** ± {fmt_value(own and own.stderr)} "
            f"(standard error over {own and own.n_test} test points).{lds_convergence(lds)} "
            "Score other estimators with `pbrf estimators RUN_DIR`.")


def lds_line(lds: Lds) -> str:
    """The LDS of the influence estimate in one line (the terminal summary)."""
    own = lds.influence
    return (f"LDS of the influence estimate: {fmt_corr(own and own.lds)} ± "
            f"{fmt_value(own and own.stderr)} "
            f"({lds.subsets} subsets keeping {100 * lds.alpha:.0f}% of the data); "
            f"rank other estimators with `pbrf estimators RUN_DIR`.{lds_convergence(lds)}")


# --------------------------------------------------------------------------- diagnostics, figures


def _fmt_diag(v) -> str:
    if isinstance(v, bool) or v is None:
        return NA if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return NA if finite(v) is None else f"{float(v):.4g}"
    return fmt_setting(v)


def diagnostics_section(diagnostics) -> str:
    """Per-kind diagnostics as a table (kinds as rows); anything else as a list."""
    nested = isinstance(diagnostics, Mapping) and all(
        isinstance(v, Mapping) for v in diagnostics.values()
    )
    if nested and diagnostics:
        cols = list(dict.fromkeys(c for v in diagnostics.values() for c in v))
        rows = [[KIND_LABELS.get(k, str(k))] + [_fmt_diag(v.get(c)) for c in cols]
                for k, v in diagnostics.items()]
        body = md_table([""] + cols, rows)
    elif isinstance(diagnostics, Mapping):
        body = "\n".join(f"- `{k}`: {_fmt_diag(v)}" for k, v in diagnostics.items()) or "_none_"
    else:
        body = _fmt_diag(diagnostics)
    return "## Diagnostics\n\n" + body


def figures_section(figures: Mapping[str, Path | None], run_dir: Path) -> str:
    """Links to the figures written (paths relative to ``run_dir``)."""
    lines = ["## Figures"]
    for name, path in figures.items():
        if path is not None:
            lines.append(f"![{name}]({Path(path).relative_to(run_dir).as_posix()})")
    if len(lines) == 1:
        lines.append("_No figures (not enough data)._")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- how to read


HOW_TO_READ = """## How to read this

Sign convention: Δm = m(θ_r) − m(θ^s) is the change of a test loss when a removal set r is taken
out of the training data; positive Δm means that removing the set increases the test loss. The
influence estimate predicts the same quantity to first order.

The response functions form a chain from cold-start leave-one-out retraining to the influence
estimate; each gap isolates one approximation (warm start instead of retraining from scratch, a
proximity term, an optimisation not run to convergence, linearisation, an inexact linear solver).
The signed gaps add up exactly to the total difference between cold-start LOO and influence.

The PBRF (proximal Bregman response function) is the quantity that influence functions actually
approximate. A high correlation of influence with the PBRF together with a low correlation with
LOO means the estimator is accurate for what it answers, and the mismatch with LOO comes from the
warm-start, proximity and non-convergence gaps, not from the influence computation (linearisation
error and solver error)."""


def pbrf_agreement(summary: Summary) -> str | None:
    """How closely influence tracks the PBRF: ``"close"`` (Pearson ≥ 0.9), ``"ranks"`` (else
    Spearman ≥ 0.9), ``"moderate"`` (else Pearson ≥ 0.7), ``"poor"``; None without a PBRF
    correlation.
    """
    corr = (summary.correlations or {}).get("pbrf")
    pbrf = plottable(corr and corr.pearson)
    if pbrf is None:
        return None
    rank = plottable(corr.spearman)
    if pbrf >= 0.9:
        return "close"
    if rank is not None and rank >= 0.9:
        return "ranks"
    return "moderate" if pbrf >= 0.7 else "poor"


def gap_finding(summary: Summary) -> tuple[str | None, bool]:
    """Which gaps dominate: ``"paper"`` (the largest of the warm-start, proximity and
    non-convergence gaps is at least 10× the larger of the linearisation and solver errors, the
    paper's finding), ``"unlike"`` (it is not), ``"partial"`` (some gaps not measured), None (no
    gap); and whether the solver error is comparable to the linearisation error (more than half
    of it, and more than a tenth of the largest gap).
    """
    dec = summary.decomposition
    gaps = {g: plottable(v) for g, v in ((dec.gaps if dec else None) or {}).items()}
    values = [gaps.get(g) for g in GAPS]
    if any(v is None for v in values):
        return ("partial" if gaps else None), False
    big, small = max(values[:3]), max(values[3:])
    lin, solver = values[3], values[4]
    finding = "paper" if small > 0 and big >= 10 * small else "unlike"
    return finding, bool(solver > 0.5 * lin and solver > 0.1 * big)


_AGREEMENT = {
    "close": "Here influence tracks the PBRF closely ({both})",
    "ranks": ("Here influence ranks the removals as the PBRF does ({both}); the lower Pearson "
              "comes from a few large responses (see the scatter plot)"),
    "moderate": "Here influence tracks the PBRF only moderately ({both})",
    "poor": ("Here influence does not track the PBRF well ({both}): look at the solver "
             "residuals, the linearisation error and the certificates above"),
}


def _pbrf_reading(summary: Summary) -> str | None:
    """How closely influence tracks the PBRF (and LOO), in words that follow the numbers."""
    agreement = pbrf_agreement(summary)
    if agreement is None:
        return None
    corr = summary.correlations
    pbrf, rank = plottable(corr["pbrf"].pearson), plottable(corr["pbrf"].spearman)
    both = f"Pearson {pbrf:.3f}" + (f", Spearman {rank:.3f}" if rank is not None else "")
    text = _AGREEMENT[agreement].format(both=both)
    cold = plottable(corr["cold"].pearson) if isinstance(corr.get("cold"), Record) else None
    if cold is not None:
        text += f"; its Pearson correlation with cold-start LOO is {cold:.3f}"
    return text + "."


def _gap_reading(summary: Summary) -> list[str]:
    """Which gaps dominate, in words that follow the numbers (see :func:`gap_finding`)."""
    finding, solver_comparable = gap_finding(summary)
    if finding in (None, "partial"):
        return (["The computed response functions do not form the whole chain, so only some "
                 "gaps are measured."] if finding else [])
    gaps = {g: plottable(v) for g, v in summary.decomposition.gaps.items()}
    first, small = [gaps[g] for g in GAPS[:3]], max(gaps[g] for g in GAPS[3:])
    big = max(first)
    name = GAPS[first.index(big)]
    if finding == "paper":
        lines = [f"The {name} is the largest gap ({fmt_value(big)}); the warm-start, "
                 "proximity and non-convergence gaps exceed the linearisation and solver "
                 f"errors by a factor {big / small:.0f} or more, the paper's finding."]
    else:
        lines = [f"Unlike the paper's finding, the linearisation and solver errors are not "
                 f"small here: the largest of them is {fmt_value(small)}, against "
                 f"{fmt_value(big)} for the {name}."]
    if solver_comparable:
        lines.append("The solver error is comparable to the linearisation error: the practical "
                     "solver ([influence] solver) is not converged enough for this comparison.")
    return lines


def how_to_read(summary: Summary | Mapping) -> str:
    """The "How to read this" section: conventions, then what this run's numbers say."""
    summary = Summary.from_dict(summary)
    pbrf = _pbrf_reading(summary)
    measured = " ".join(([pbrf] if pbrf else []) + _gap_reading(summary))
    return HOW_TO_READ + (f"\n\n**This run.** {measured}" if measured else "")
