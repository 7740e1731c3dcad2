"""Reports over several runs: the multi-seed run's report, tables of runs in the layout of the
paper's Table 1, and the trends of a sweep (how each gap moves with a factor's value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pbrf import kinds as _kinds
from pbrf.experiment.analysis import GAPS
from pbrf.experiment.analysis.results import Correlation, Record, Summary
from pbrf.experiment.report.figures import (
    as_seeds,
    gap_of,
    pearson_of,
    plot_decomposition,
    seed_stats,
)
from pbrf.experiment.report.kit import NA, fmt_corr, fmt_value, md_table, text_table, write_text
from pbrf.experiment.report.run import summary_json
from pbrf.experiment.report.sections import (
    certificate_section,
    config_section,
    correlation_section,
    decomposition_section,
    experiment_section,
    figures_section,
    how_to_read,
    ms,
    paired_section,
    theta_s_section,
)

__all__ = ["TABLE_KINDS", "write_seeds_report", "format_table", "format_table_text",
           "sweep_trends"]

#: Columns of the paper's Table 1: influence vs these response functions.
TABLE_KINDS = tuple(k for k in _kinds.names() if _kinds.get(k).table)
TABLE_SHORT = _kinds.view("short")


# --------------------------------------------------------------------------- multi-seed run


def _seed_row(seed, folder: str, s: Summary) -> list[str]:
    q = s.theta_s
    test = NA if q is None or q.test_metric is None else f"{q.metric} {q.test_metric:.3f}"
    return [str(seed), f"[{folder}]({folder}/report.md)", test,
            fmt_value(q.grad_norm if q is not None else None),
            fmt_corr(pearson_of(s, "pbrf")), fmt_corr(pearson_of(s, "cold"))]


def _seeds_section(summary: Summary, per_seed: Sequence[Summary]) -> str:
    """Which θ^s seeds the run aggregates, each one's quality and a link to its own report."""
    info = summary.seeds or {}
    rows = [_seed_row(seed, folder, s) for seed, folder, s
            in zip(info.get("train_seeds", []), info.get("runs", []), per_seed)]
    table = md_table(["train.seed", "run", "θ^s test", "‖∇J(θ^s)‖", "PBRF Pearson",
                      "cold LOO Pearson"], rows, align="llrrrr")
    return (f"## Seeds\n\nEvery number below is the mean ± sample standard deviation over "
            f"{info.get('n')} base models θ^s trained with `train.seed` = "
            f"{info.get('train_seeds')}; each is a complete run of its own (linked). Counts "
            "(certified, diverged, pairs used) add up over the seeds.\n\n" + table)


def write_seeds_report(run_dir, summary: Summary | Mapping, per_seed: Sequence[Summary | Mapping],
                       config: Mapping) -> Path:
    """``report.md``, ``figures/decomposition.png`` and ``summary.json`` of a multi-seed run.

    Args:
        run_dir: the multi-seed run directory (its seeds' runs are in ``seed=K`` folders).
        summary: :func:`pbrf.experiment.analysis.aggregate.aggregate` of the seeds' summaries.
        per_seed: the seeds' summaries, in the order of ``summary["seeds"]``.
        config: the run's configuration.

    Returns:
        The path of ``report.md`` (``summary.json`` is written last).
    """
    run_dir = Path(run_dir)
    clean, summary_text = summary_json(summary)
    typed, seeds = Summary.from_dict(clean), [Summary.from_dict(s) for s in per_seed]
    figures = {"decomposition (means over seeds)":
               plot_decomposition(typed, run_dir / "figures" / "decomposition.png")}
    rows = [(f"train.seed {seed}", s) for seed, s in zip(typed.seeds["train_seeds"], seeds)]
    rows.append(("mean ± std", typed))
    parts = [f"# pbrf run: {config.get('name', 'experiment')} ({len(per_seed)} seeds)",
             _seeds_section(typed, seeds), experiment_section(typed, config),
             theta_s_section(typed), correlation_section(typed), "### Per seed\n\n"
             + format_table(rows), decomposition_section(typed), certificate_section(typed),
             paired_section(typed), figures_section(figures, run_dir), how_to_read(typed),
             config_section(config)]
    report = write_text(run_dir / "report.md", "\n\n".join(p for p in parts if p) + "\n")
    write_text(run_dir / "summary.json", summary_text)
    return report


# --------------------------------------------------------------------------- tables across runs


def _correlations(summary: Summary | Mapping) -> Mapping[str, Correlation]:
    """The correlations of a summary, or a bare correlations block ``{kind: {...}}``."""
    if isinstance(summary, Record) or "correlations" in summary:
        return Summary.from_dict(summary).correlations or {}
    return Summary(correlations=summary).correlations


def _table_body(rows: Sequence[tuple[str, Summary | Mapping]], kinds: Sequence[str]):
    body = []
    for name, summary in rows:
        corr = _correlations(summary)
        body.append([str(name)] + [ms(corr.get(k), key) for k in kinds
                                   for key in ("pearson", "spearman")])
    return body


def _table_header(kinds: Sequence[str]) -> list[str]:
    return ["run"] + [f"{TABLE_SHORT.get(k, k)} {m}" for k in kinds for m in ("P", "S")]


def format_table(rows: Sequence[tuple[str, Summary | Mapping]],
                 kinds: Sequence[str] = TABLE_KINDS) -> str:
    """Several runs as a markdown table in the layout of the paper's Table 1.

    Args:
        rows: ``(run name, summary)`` pairs; a summary is a typed
            :class:`~pbrf.experiment.analysis.results.Summary`, a summary dict (a
            :func:`~pbrf.experiment.analysis.summarise` result, a multi-seed aggregate: mean ±
            std) or just its ``correlations``.
        kinds: the response functions compared with influence, one P/S column pair each.

    Returns:
        Markdown: one row per run, columns Pearson (P) and Spearman (S) of the influence estimate
        vs LOO (cold start), warm-start LOO, proximal and PBRF; missing values are ``n/a``.
    """
    note = ("P = Pearson, S = Spearman correlation of the influence estimate with each response "
            "function.")
    return md_table(_table_header(kinds), _table_body(rows, kinds)) + "\n\n" + note + "\n"


def format_table_text(rows: Sequence[tuple[str, Summary | Mapping]],
                      kinds: Sequence[str] = TABLE_KINDS) -> str:
    """Plain-text, column-aligned variant of :func:`format_table` for terminal output."""
    return text_table(_table_header(kinds), _table_body(rows, kinds))


# --------------------------------------------------------------------------- sweeps


def sweep_trends(values: Sequence, summaries: Sequence) -> dict[str, dict]:
    """Per gap: how its mean over seeds moved with the factor, and whether the error bars (mean
    ± std over seeds) of the smallest and largest value separate.

    Returns ``{gap: {"direction": "increases" | "decreases" | "non-monotone" | "n/a",
    "separated": bool | None, "means": [...], "stds": [...]}}`` (``separated`` is ``None`` with
    one seed per value: no error bars).
    """
    out = {}
    n_seeds = min(len(as_seeds(g)) for g in summaries) if summaries else 0
    for gap in GAPS:
        mean, std = seed_stats(summaries, lambda s, g=gap: gap_of(s, g))
        ok = np.isfinite(mean)
        m = mean[ok]
        if m.size < 2:
            direction, separated = "n/a", None
        else:
            steps = np.diff(m)
            direction = ("increases" if (steps > 0).all() else "decreases" if (steps < 0).all()
                         else "non-monotone")
            lo, hi = int(np.argmin(m)), int(np.argmax(m))
            s_ok = std[ok]
            separated = None if n_seeds < 2 else bool(m[hi] - s_ok[hi] > m[lo] + s_ok[lo])
        out[gap] = {"direction": direction, "separated": separated,
                    "means": [None if not np.isfinite(v) else float(v) for v in mean],
                    "stds": [float(v) for v in std]}
    return out
