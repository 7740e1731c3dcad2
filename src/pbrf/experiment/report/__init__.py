"""Reports of one experiment (``summary.json``, ``report.md``, figures) and of several runs.

The report kit sits below the run: it formats typed records
(:class:`~pbrf.experiment.analysis.results.Summary`, or the dicts they read from) and the raw
``dm`` arrays ``{kind: Δm [n_test, n_removals]}`` of the scatter plots, and never reads a run
directory. Modules, by role:

* :mod:`~pbrf.experiment.report.kit` -- number formats (``n/a`` for missing or non-finite
  numbers), the markdown and fixed-width text tables, atomic writes of text and figures;
* :mod:`~pbrf.experiment.report.figures` -- the plots (matplotlib's object API, never pyplot);
* :mod:`~pbrf.experiment.report.sections` -- the markdown sections of a run's report;
* :mod:`~pbrf.experiment.report.run` -- one run's report and terminal summary;
* :mod:`~pbrf.experiment.report.seeds` -- the multi-seed report, tables of runs, sweep trends.
"""

from pbrf.experiment.report.figures import (
    GAP_COLORS,
    KIND_COLORS,
    plot_correlations,
    plot_decomposition,
    plot_scatter,
    plot_sweep,
)
from pbrf.experiment.report.kit import (
    NA,
    fmt_corr,
    fmt_mean_std,
    fmt_ms,
    fmt_setting,
    fmt_value,
    md_table,
    mean_std,
    nested_get,
    plottable,
    save_figure,
    text_table,
)
from pbrf.experiment.report.run import print_summary, render_markdown, write_report
from pbrf.experiment.report.sections import certificate_lines, how_to_read, quality_lines
from pbrf.experiment.report.seeds import (
    TABLE_KINDS,
    format_table,
    format_table_text,
    sweep_trends,
    write_seeds_report,
)

__all__ = [
    "KIND_COLORS",
    "GAP_COLORS",
    "TABLE_KINDS",
    "NA",
    "fmt_corr",
    "fmt_value",
    "fmt_ms",
    "fmt_mean_std",
    "fmt_setting",
    "mean_std",
    "nested_get",
    "plottable",
    "md_table",
    "text_table",
    "save_figure",
    "write_report",
    "render_markdown",
    "print_summary",
    "certificate_lines",
    "quality_lines",
    "how_to_read",
    "plot_decomposition",
    "plot_scatter",
    "plot_correlations",
    "plot_sweep",
    "sweep_trends",
    "format_table",
    "format_table_text",
    "write_seeds_report",
]
