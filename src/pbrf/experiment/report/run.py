"""The report of one run: ``report.md``, ``summary.json`` and the figures
(:func:`write_report`), and the compact terminal summary (:func:`print_summary`).

Both read a typed :class:`~pbrf.experiment.analysis.results.Summary` (a summary dict is read into
one first); ``summary.json`` is the summary's ``to_dict()`` with NaN/inf written as ``null``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pbrf.experiment.analysis import GAPS
from pbrf.experiment.analysis.results import Decomposition, Record, Summary
from pbrf.experiment.report.figures import (
    plot_correlations,
    plot_decomposition,
    plot_scatter,
)
from pbrf.experiment.report.kit import fmt_value, response_kinds, text_table, write_text
from pbrf.experiment.report.sections import (
    certificate_lines,
    certificate_section,
    config_section,
    correlation_rows,
    correlation_section,
    decomposition_section,
    diagnostics_section,
    experiment_section,
    figures_section,
    how_to_read,
    lds_line,
    lds_section,
    ms,
    paired_section,
    quality_lines,
    theta_s_section,
    validity_text,
)
from pbrf.fileio import jsonable

__all__ = ["summary_json", "render_markdown", "write_report", "print_summary"]

#: Header of the terminal's correlation tables.
_TEXT_CORRELATION_HEADER = ("influence vs", "Pearson", "Spearman", "P/test", "S/test")


def summary_json(summary: Summary | Mapping) -> tuple[dict, str]:
    """The JSON-safe dict of a summary (NaN/inf as ``None``) and its ``summary.json`` text."""
    data = summary.to_dict() if isinstance(summary, Record) else summary
    clean = jsonable(data, nonfinite="null")
    return clean, json.dumps(clean, indent=2, allow_nan=False) + "\n"


def render_markdown(summary: Summary | Mapping, config: Mapping, title: str, figures: Mapping,
                    run_dir: Path) -> str:
    """The text of ``report.md`` (see :func:`write_report`)."""
    summary = Summary.from_dict(summary)
    parts = [f"# {title}", experiment_section(summary, config), theta_s_section(summary),
             correlation_section(summary), decomposition_section(summary),
             certificate_section(summary), paired_section(summary), lds_section(summary),
             figures_section(figures, run_dir)]
    if summary.diagnostics is not None:
        parts.append(diagnostics_section(summary.diagnostics))
    parts += [how_to_read(summary), config_section(config)]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(
    run_dir,
    summary: Summary | Mapping,
    dm: Mapping,
    config: Mapping,
    title: str = "Influence functions vs. response functions",
) -> Path:
    """Write ``summary.json``, ``report.md`` and ``figures/*.png`` into ``run_dir``, atomically.

    Written: ``figures/decomposition.png`` (log-scale gaps, output-space panel when present),
    ``figures/scatter.png`` (influence vs each response function, when ``dm`` holds
    ``"influence"``), ``figures/correlations.png``, then ``report.md``, then ``summary.json``
    (last, so its presence means the report is complete). ``summary.json`` holds ``summary``
    with NaN/inf replaced by ``null``.

    Args:
        run_dir: output folder (created if needed).
        summary: a :class:`~pbrf.experiment.analysis.results.Summary`, or a dict such as
            :func:`pbrf.experiment.analysis.summarise`'s, optionally with ``"diagnostics"``.
        dm: ``{kind: Δm [n_test, n_removals]}`` for the scatter plots.
        config: the run's configuration (any JSON-like dict; nested dicts are flattened).
        title: report title.

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    clean, summary_text = summary_json(summary)
    typed = Summary.from_dict(clean)
    fig_dir = run_dir / "figures"
    figures = {
        "decomposition": plot_decomposition(typed, fig_dir / "decomposition.png"),
        "scatter": plot_scatter(typed, dm or {}, fig_dir / "scatter.png"),
        "correlations": plot_correlations(typed, fig_dir / "correlations.png"),
    }
    report = write_text(run_dir / "report.md",
                        render_markdown(typed, config, title, figures, run_dir))
    write_text(run_dir / "summary.json", summary_text)
    return report


def _gap_text_rows(dec: Decomposition) -> list[list[str]]:
    rows = [[g] + [ms(dec, key, g, fmt_value) for key in ("gaps", "signed")] for g in GAPS]
    rows.append(["total (LOO − influence)", ms(dec, "total", fmt=fmt_value),
                 ms(dec, "total_signed", fmt=fmt_value)])
    return rows


def print_summary(summary: Summary | Mapping) -> str:
    """The compact terminal summary of one run: θ^s, correlations, gaps, certificates, LDS.
    Returns the text; the caller prints it (``print(print_summary(s))``).
    """
    summary = Summary.from_dict(summary)
    corr = summary.correlations or {}
    corr_rows = correlation_rows(corr, [k for k in response_kinds(corr) if k in corr])
    dec = summary.decomposition or Decomposition()
    parts = ["\n".join(quality_lines(summary.theta_s))]
    if corr_rows:
        parts.append(text_table(_TEXT_CORRELATION_HEADER, corr_rows))
    parts.append(text_table(["gap", "mean |Δm|", "signed"], _gap_text_rows(dec)))
    parts.append(validity_text(dec, summary.diverged, summary.certificates))
    pcorr = (summary.paired.correlations if summary.paired is not None else None) or {}
    if pcorr:
        parts.append(text_table(_TEXT_CORRELATION_HEADER,
                                correlation_rows(pcorr, list(pcorr), " (paired)")))
    parts.append("\n".join(certificate_lines(summary)))
    if summary.lds is not None:
        parts.append(lds_line(summary.lds))
    return "\n\n".join(p for p in parts if p)
