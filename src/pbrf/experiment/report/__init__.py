"""Reports of one experiment (``summary.json``, ``report.md``, figures) and of several runs.

Everything here reads the JSON-safe summary of :func:`pbrf.experiment.analysis.summarise` and,
for the scatter plots, the raw ``dm`` arrays ``{kind: Δm [n_test, n_removals]}``. Missing or
non-finite numbers (``None`` / NaN) are rendered as ``n/a``. Files are written atomically (a
temporary file in the same folder, then ``os.replace``), so an interrupted write leaves the
previous file intact and no partial file behind.

Figures use matplotlib's object API (:class:`matplotlib.figure.Figure` with the Agg canvas), so
this module never changes the global pyplot backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from pbrf import kinds as _kinds
from pbrf.experiment.analysis import GAP_PAIRS, GAPS, KIND_LABELS, KINDS, RESPONSE_KINDS
from pbrf.experiment.run.quality import quality_lines
from pbrf.fileio import atomic_write, jsonable

__all__ = [
    "KIND_COLORS",
    "GAP_COLORS",
    "TABLE_KINDS",
    "fmt_corr",
    "fmt_value",
    "fmt_mean_std",
    "mean_std",
    "write_report",
    "render_markdown",
    "plot_decomposition",
    "plot_scatter",
    "plot_correlations",
    "format_table",
    "format_table_text",
    "plot_sweep",
    "print_summary",
    "fmt_ms",
    "write_seeds_report",
]

DPI = 120
#: Columns of the correlation tables (literal and paired chain).
CORRELATION_HEADER = ("response function", "Pearson", "Spearman", "Pearson (per-test mean)",
                      "Spearman (per-test mean)")
NA = "n/a"
#: One colour per kind, shared by every figure (a live view of the registry, :mod:`pbrf.kinds`).
KIND_COLORS = _kinds.view("colour")
#: One colour per gap, shared by the decomposition and sweep figures.
GAP_COLORS = {g: colormaps["viridis"](x) for g, x in zip(GAPS, np.linspace(0.0, 0.85, len(GAPS)))}
#: Columns of the paper's Table 1: influence vs these response functions.
TABLE_KINDS = tuple(k for k in _kinds.names() if _kinds.get(k).table)
TABLE_SHORT = _kinds.view("short")
#: Config entries (matched on the last dotted key) repeated in the report's "Experiment" section.
HEADLINE_KEYS = (
    "dataset", "model", "n_train", "n_test", "n_test_points", "n_removals", "group_size",
    "damping", "weight_decay", "solver", "curvature", "dtype", "device",
)  # fmt: skip
CONFIG_FIRST = (
    "name", "dataset", "task", "model", "n_train", "n_test", "n_removals", "removal_size",
    "damping", "weight_decay", "solver", "curvature", "seeds", "dtype", "device",
)  # fmt: skip


# --------------------------------------------------------------------------- formatting


def _finite(x) -> float | None:
    """``float(x)`` when it is a finite number, else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


#: Magnitudes beyond this are not drawn (matplotlib's axis limits overflow near 1e308); they are
#: counted.
PLOT_LIMIT = 1e100


def _plottable(x) -> float | None:
    """``_finite(x)`` when its magnitude can be drawn, else None."""
    x = _finite(x)
    return x if x is not None and abs(x) <= PLOT_LIMIT else None


def fmt_corr(x) -> str:
    """A correlation with 3 decimals (``0.934``), or ``n/a`` for None/NaN."""
    x = _finite(x)
    return NA if x is None else f"{x:.3f}"


def fmt_value(x) -> str:
    """A magnitude in scientific notation (``1.234e-03``), or ``n/a`` for None/NaN/inf."""
    x = _finite(x)
    return NA if x is None else f"{x:.3e}"


def fmt_ms(value, std, fmt=fmt_corr) -> str:
    """``fmt(value)``, followed by ``± fmt(std)`` when ``std`` is a finite number (a mean over the
    seeds of a multi-seed run, see :mod:`pbrf.experiment.run.seeds`).
    """
    text = fmt(value)
    return text + f" ± {fmt(std)}" if text != NA and _finite(std) is not None else text


def mean_std(mapping: Mapping | None, key: str) -> tuple[float | None, float | None]:
    """The value at the dotted ``key`` of a summary and its standard deviation over seeds.

    A summary aggregated over seeds (``run.seeds > 1``) gives every mean a sibling ``<key>_std``
    (``correlations.pbrf.pearson_std``) or, for a block of means, a sibling block ``<block>_std``
    (``decomposition.gaps_std.<gap>``); a single-seed summary has neither, and the std is None.
    Non-finite or missing numbers are None.
    """
    *path, last = key.split(".")
    parent = _get(mapping, *path) if path else mapping
    mean = _finite(_get(parent, last))
    std = _finite(_get(parent, f"{last}_std"))
    if std is None and path:
        std = _finite(_get(_get(mapping, *path[:-1]) if path[:-1] else mapping,
                           f"{path[-1]}_std", last))
    return mean, std


def fmt_mean_std(mapping: Mapping | None, key: str, fmt=None) -> str:
    """``mean ± std`` of the dotted ``key`` (see :func:`mean_std`), or the plain value when the
    summary has no ``_std`` for it, or ``n/a``; numbers formatted by ``fmt`` (default
    :func:`fmt_corr`).
    """
    return fmt_ms(*mean_std(mapping, key), fmt or fmt_corr)


def _fmt_config_value(v) -> str:
    if isinstance(v, float):
        return NA if _finite(v) is None else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        text = ", ".join(_fmt_config_value(x) for x in v[:8])
        return f"[{text}, … ({len(v)} items)]" if len(v) > 8 else f"[{text}]"
    return str(v).replace("\n", " ")


def _corr(summary: Mapping) -> Mapping:
    """The correlations block of a summary (or the block itself when given directly)."""
    return summary.get("correlations", summary) or {}


def _decomp(summary: Mapping) -> Mapping:
    return summary.get("decomposition") or {}


def _get(d: Mapping | None, *keys):
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


# --------------------------------------------------------------------------- atomic writes


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, text)


def _save_figure(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


# --------------------------------------------------------------------------- figures


def _log_bars(ax, labels: Sequence[str], values: Sequence, colors: Sequence, ylabel: str) -> None:
    """Bars on a log axis; zeros drawn at a floor and labelled "0", missing values "n/a"."""
    raw = [_finite(v) for v in values]
    # off-scale values: drawn like missing ones, labelled with their value
    vals = [_plottable(v) for v in raw]
    positive = [v for v in vals if v is not None and v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    heights = [max(v, floor) if v is not None else floor for v in vals]
    x = np.arange(len(labels))
    bars = ax.bar(x, heights, color=colors, edgecolor="black", linewidth=0.6)
    for bar, v, r in zip(bars, vals, raw):
        if v is None or v <= 0:
            bar.set_alpha(0.25)
            bar.set_hatch("//")
        off = NA if r is None else f"{r:.2e} (off scale)"
        text = off if v is None else ("0" if v <= 0 else f"{v:.2e}")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(x, [label.replace(" ", "\n") for label in labels], fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.margins(y=0.15)


def _any_gap(summary: Mapping) -> bool:
    """Whether any gap was measured (else the decomposition figure would be empty)."""
    gaps = _decomp(summary).get("gaps") or {}
    return any(_plottable(v) is not None for v in gaps.values())


def plot_decomposition(summary: Mapping, path) -> Path:
    """The five gaps as bars on a log scale (and the output-space variant when present)."""
    dec = _decomp(summary)
    output = dec.get("output_gaps")
    fig = Figure(figsize=(13 if output else 7, 4.4), layout="constrained")
    axes = fig.subplots(1, 2 if output else 1, squeeze=False)[0]
    colors = [GAP_COLORS[g] for g in GAPS]
    gaps = dec.get("gaps") or {}
    ylabel = r"mean $|\Delta m_a - \Delta m_b|$"
    _log_bars(axes[0], GAPS, [gaps.get(g) for g in GAPS], colors, ylabel)
    axes[0].set_title("Gaps in the measured test-loss change")
    if not _any_gap(summary):  # say why instead of drawing empty axes
        axes[0].text(0.5, 0.5, "no gap measured: the computed (and certified, non-diverged)\n"
                     "response functions form no link of the chain", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=10, color="0.3")
    scale = _plottable(_get(dec, "mean_abs", "pbrf"))
    if scale:
        label = r"mean $|\Delta m|$ (PBRF), for scale"
        axes[0].axhline(scale, color=KIND_COLORS["pbrf"], ls="--", lw=1, label=label)
        axes[0].legend(fontsize=8, loc="upper right")
    if output:
        ylabel = r"mean $\|\Delta f_a - \Delta f_b\|_2$"
        _log_bars(axes[1], GAPS, [output.get(g) for g in GAPS], colors, ylabel)
        axes[1].set_title("Gaps in the test outputs")
    return _save_figure(fig, path)


def _scatter_panel(ax, x: np.ndarray, y: np.ndarray, kind: str, corr: Mapping) -> None:
    finite = np.isfinite(x) & np.isfinite(y)
    keep = finite & (np.abs(x) <= PLOT_LIMIT) & (np.abs(y) <= PLOT_LIMIT)
    off_scale = int(finite.sum() - keep.sum())
    x, y = x[keep], y[keep]
    alpha = float(np.clip(30 / math.sqrt(max(x.size, 1)), 0.15, 0.8))
    ax.scatter(x, y, s=8, alpha=alpha, color=KIND_COLORS[kind], edgecolors="none", rasterized=True)
    if x.size:
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="0.3", ls="--", lw=0.8)  # y = x
    p, s = fmt_corr(_get(corr, kind, "pearson")), fmt_corr(_get(corr, kind, "spearman"))
    note = f" ({off_scale} off scale)" if off_scale else ""
    ax.set_title(f"{KIND_LABELS[kind]}\nP = {p}, S = {s}{note}", fontsize=10)
    ax.set_xlabel(r"influence estimate $\Delta m_{\mathrm{IF}}$", fontsize=9)
    ax.set_ylabel(rf"$\Delta m$ ({KIND_LABELS[kind]})", fontsize=9)
    ax.axhline(0, color="0.8", lw=0.5, zorder=0)
    ax.axvline(0, color="0.8", lw=0.5, zorder=0)
    ax.tick_params(labelsize=8)


def plot_scatter(summary: Mapping, dm: Mapping, path) -> Path | None:
    """Grid of influence estimate (x) vs each response function's Δm (y); None without data."""
    x = dm.get("influence")
    kinds = [k for k in _response_kinds(dm) if dm.get(k) is not None]
    if x is None or not kinds:
        return None
    x = np.asarray(x, dtype=np.float64).ravel()
    ncols = min(3, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig = Figure(figsize=(3.7 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, kind in zip(axes, kinds):
        _scatter_panel(ax, x, np.asarray(dm[kind], dtype=np.float64).ravel(), kind, _corr(summary))
    for ax in axes[len(kinds) :]:
        ax.set_visible(False)
    return _save_figure(fig, path)


def plot_correlations(summary: Mapping, path) -> Path | None:
    """Grouped bars: Pearson / Spearman (all pairs and per-test mean) per response function."""
    corr = _corr(summary)
    kinds = [k for k in _response_kinds(corr) if k in corr]
    if not kinds:
        return None
    metrics = [("pearson", "Pearson", "#3b6ea8"), ("spearman", "Spearman", "#e08a3c"),
               ("pearson_per_test", "Pearson (per-test mean)", "#9cc0e6"),
               ("spearman_per_test", "Spearman (per-test mean)", "#f5c99b")]  # fmt: skip
    fig = Figure(figsize=(1.6 * len(kinds) + 3, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    x = np.arange(len(kinds))
    for j, (key, label, color) in enumerate(metrics):
        vals = [_finite(corr[k].get(key)) for k in kinds]
        heights = [np.nan if v is None else v for v in vals]
        ax.bar(
            x + (j - 1.5) * width,
            heights,
            width,
            label=label,
            color=color,
            edgecolor="black",
            lw=0.4,
        )
    ax.set_xticks(x, [KIND_LABELS[k] for k in kinds], fontsize=9)
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("correlation with the influence estimate")
    ax.set_title("Influence estimate vs response functions")
    fig.legend(loc="outside lower center", ncols=len(metrics), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


#: Factors whose effect is read on a log scale (training time, regularisation strengths).
LOG_FACTORS = ("epochs", "damping", "weight_decay")


def _sweep_x(values: Sequence, factor: str = "") -> tuple[np.ndarray, list[str] | None, bool]:
    """x positions, tick labels for categorical values (else None), and whether to use log x
    (always for :data:`LOG_FACTORS` with positive values, else when they span 20× or more).
    """
    numeric = [_finite(v) for v in values]
    if any(v is None for v in numeric) or any(isinstance(v, (bool, str)) for v in values):
        return np.arange(len(values), dtype=float), [str(v) for v in values], False
    arr = np.array(numeric)
    positive = bool(arr.size > 1 and (arr > 0).all())
    log = positive and (factor in LOG_FACTORS or bool(arr.max() / arr.min() >= 20))
    return arr, None, log


def _seed_stats(groups: Sequence, get) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over the seeds of each value (NaN where none is finite)."""
    means, stds = [], []
    for group in groups:
        vals = [v for v in (_plottable(get(s)) for s in _as_seeds(group)) if v is not None]
        means.append(float(np.mean(vals)) if vals else np.nan)
        stds.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
    return np.array(means), np.array(stds)


def _as_seeds(group) -> list:
    """One value's summaries: a single summary or a sequence of summaries (one per seed)."""
    return [group] if isinstance(group, Mapping) else list(group)


def _sweep_gap_panel(ax, x: np.ndarray, summaries: Sequence, factor: str) -> None:
    series = [(gap, "o-", GAP_COLORS[gap], lambda s, g=gap: _get(s, "decomposition", "gaps", g))
              for gap in GAPS]
    series += [(f"paired-chain drift ({kind})", "x" + style, "0.45",
                lambda s, k=kind: _get(s, "paired", "drift", k, "mean_abs"))
               for kind, style in (("warm", ":"), ("proximal", "-."))]
    drawn = 0
    for label, fmt, color, get in series:
        mean, std = _seed_stats(summaries, get)
        mean = np.where(mean > 0, mean, np.nan)
        if not np.isfinite(mean).any():  # not measured (the kinds do not form that link)
            continue
        ax.errorbar(x, mean, yerr=np.minimum(std, 0.999 * np.nan_to_num(mean)), fmt=fmt,
                    capsize=3, color=color, label=label)
        drawn += 1
    ax.set_ylabel(r"mean $|\Delta m_a - \Delta m_b|$")
    ax.set_title(f"Gaps vs {factor}")
    if not drawn:
        ax.text(0.5, 0.5, "no gap measured", ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def _sweep_corr_panel(ax, x: np.ndarray, summaries: Sequence, factor: str) -> None:
    for kind, style in (("pbrf", "o-"), ("cold", "s--")):
        mean, std = _seed_stats(summaries, lambda s, k=kind: _get(s, "correlations", k, "pearson"))
        if not np.isfinite(mean).any():  # that response was not computed
            continue
        ax.errorbar(x, mean, yerr=std, fmt=style, capsize=3, color=KIND_COLORS[kind],
                    label=f"influence vs {KIND_LABELS[kind]}")
    if not ax.has_data():
        ax.text(0.5, 0.5, "PBRF and cold start not computed", ha="center", va="center",
                transform=ax.transAxes)
        return
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
    ax.set_ylabel("Pearson correlation")
    ax.set_title(f"Correlation vs {factor}")
    ax.legend(fontsize=8)


def sweep_trends(values: Sequence, summaries: Sequence) -> dict[str, dict]:
    """Per gap: how its mean over seeds moved with the factor, and whether the error bars (mean
    ± std over seeds) of the smallest and largest value separate.

    Returns ``{gap: {"direction": "increases" | "decreases" | "non-monotone" | "n/a",
    "separated": bool | None, "means": [...], "stds": [...]}}`` (``separated`` is ``None`` with
    one seed per value: no error bars).
    """
    out = {}
    n_seeds = min(len(_as_seeds(g)) for g in summaries) if summaries else 0
    for gap in GAPS:
        mean, std = _seed_stats(summaries, lambda s, g=gap: _get(s, "decomposition", "gaps", g))
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


def plot_sweep(factor: str, values: Sequence, summaries: Sequence, path) -> Path:
    """Gaps (log y) and influence-vs-PBRF / vs-LOO Pearson correlation against a factor's value.

    Args:
        factor: name of the varied factor (x-axis label), e.g. ``"damping"`` or ``"width"``.
        values: the factor's values, one per summary: numbers (log x-axis for epochs, damping
            and weight decay, or when positive and spanning at least a factor 20) or labels.
        summaries: per value, one :func:`pbrf.experiment.analysis.summarise` result or a
            sequence of them (one per seed: mean ± standard deviation as error bars).
        path: where to write the PNG (written atomically; parent folders created).

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: ``values`` and ``summaries`` differ in length.
    """
    if len(values) != len(summaries):
        raise ValueError(
            f"plot_sweep needs one summary per value; got {len(values)} values and "
            f"{len(summaries)} summaries."
        )
    x, labels, logx = _sweep_x(values, factor)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_gap, ax_corr = fig.subplots(1, 2)
    _sweep_gap_panel(ax_gap, x, summaries, factor)
    _sweep_corr_panel(ax_corr, x, summaries, factor)
    for ax in (ax_gap, ax_corr):
        ax.set_xlabel(factor)
        ax.grid(alpha=0.3)
        if logx and ax.has_data():  # a log axis without data has no limits to take
            ax.set_xscale("log")
        if labels is not None:
            ax.set_xticks(x, labels)
    return _save_figure(fig, Path(path))


# --------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """A markdown table; ``align`` has one letter per column, "l" or "r" (default: l, then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        items += _flatten(v, key + ".") if isinstance(v, Mapping) and v else [(key, v)]
    return items


def _config_section(config: Mapping) -> str:
    items = _flatten(config or {})
    if not items:
        return "## Configuration\n\n_No configuration recorded._"
    rank = {k: i for i, k in enumerate(CONFIG_FIRST)}
    items.sort(key=lambda kv: rank.get(kv[0], len(rank)))  # stable: the rest keep their order
    rows = [(f"`{k}`", _fmt_config_value(v)) for k, v in items]
    return "## Configuration\n\n" + _md_table(["setting", "value"], rows, align="ll")


def _response_kinds(present: Mapping) -> list[str]:
    """The chain's response kinds, then any other registered response kind in ``present``."""
    extra = [k for k in _kinds.response_names() if k in present and k not in RESPONSE_KINDS]
    return list(RESPONSE_KINDS) + extra


def _corr_rows(
    corr: Mapping, kinds: Sequence[str] | None = None, suffix: str = ""
) -> list[list[str]]:
    kinds = _response_kinds(corr) if kinds is None else kinds
    keys = ("pearson", "spearman", "pearson_per_test", "spearman_per_test")
    return [
        [KIND_LABELS[k] + suffix] + [fmt_mean_std(_get(corr, k), key) for key in keys]
        for k in kinds
    ]


def _headline_config(config: Mapping) -> dict:
    """The config entries whose last key is one of :data:`HEADLINE_KEYS` (any nesting)."""
    return {
        k: v
        for k, v in _flatten(config or {})
        if k.rsplit(".", 1)[-1] in HEADLINE_KEYS and v is not None
    }


def _cold_seeds_note(summary: Mapping, config: Mapping) -> str | None:
    """Which seeds cold start retrains with, and whether one of them is θ^s's own seed (then
    that retraining repeats θ^s's initialisation and minibatch order: same-seed retraining).
    """
    seeds = list((config.get("responses") or {}).get("cold_seeds") or [])
    if "cold" not in (summary.get("kinds") or []) or not seeds:
        return None
    own = (config.get("train") or {}).get("seed")
    if own in seeds:
        other = len(seeds) - 1
        return (f"{seeds}: includes θ^s's seed {own} (same-seed retraining)"
                + (f" and {other} other seed{'s' if other != 1 else ''}" if other else " only"))
    return f"{seeds}: all different from θ^s's seed {own}"


def _experiment_section(summary: Mapping, config: Mapping) -> str:
    """Key facts: ``summary["experiment"]``, sizes, kinds computed, headline config values."""
    facts = dict(summary.get("experiment") or {})
    for key in ("n_test", "n_removals"):
        if key in summary:
            facts.setdefault(key, summary[key])
    if summary.get("kinds"):
        facts.setdefault(
            "response functions", ", ".join(KIND_LABELS.get(k, k) for k in summary["kinds"])
        )
    for key, value in _headline_config(config).items():
        if key.rsplit(".", 1)[-1] not in facts:  # e.g. data.n_train when n_train is known
            facts[key] = value
    seeds_note = _cold_seeds_note(summary, config)
    if seeds_note:
        facts["cold-start seeds"] = seeds_note
    if not facts:
        return ""
    rows = [(f"`{k}`", _fmt_config_value(v)) for k, v in _flatten(facts)]
    return "## Experiment\n\n" + _md_table(["", "value"], rows, align="ll")


def _correlation_section(summary: Mapping) -> str:
    header = list(CORRELATION_HEADER)
    table = _md_table(header, _corr_rows(_corr(summary)))
    return (
        "## Influence estimate vs response functions\n\n"
        "Correlation between the influence estimate Δm_IF and each response function's Δm over all "
        "(test point, removal) pairs, and the mean over test points of the correlation across "
        "removals.\n\n" + table
    )


def _decomposition_rows(dec: Mapping) -> list[list[str]]:
    rows = []
    for gap in GAPS:
        a, b = GAP_PAIRS[gap]
        between = f"{KIND_LABELS[a]} → {KIND_LABELS[b]}"
        vals = [fmt_mean_std(dec, f"{key}.{gap}", fmt_value)
                for key in ("gaps", "signed", "output_gaps")]
        rows.append([gap, between] + vals)
    total = ["**total**", f"{KIND_LABELS['cold']} → influence",
             fmt_mean_std(dec, "total", fmt_value), fmt_mean_std(dec, "total_signed", fmt_value),
             ""]  # fmt: skip
    return rows + [total]


def _gaps_within(first: str, last: str) -> list[str]:
    lo, hi = KINDS.index(first), KINDS.index(last)
    return [g for g, (a, b) in GAP_PAIRS.items() if lo <= KINDS.index(a) and KINDS.index(b) <= hi]


def _telescoping_text(dec: Mapping) -> str:
    chain, residual = dec.get("telescoping_chain"), _finite(dec.get("telescoping_residual"))
    if not chain or residual is None:
        return ("Telescoping check: n/a (the response functions computed do not form a contiguous "
                "chain).")
    a, b = chain
    signed = [_finite(_get(dec, "signed", g)) for g in _gaps_within(a, b)]
    text = f"Telescoping check ({KIND_LABELS[a]} → {KIND_LABELS[b]}): Σ signed gaps = "
    text += NA if None in signed else fmt_value(sum(signed))
    if chain == ["cold", "influence"]:
        text += f"; mean(Δm_cold − Δm_influence) = {fmt_value(dec.get('total_signed'))}"
    return text + (
        f"; max over pairs of |Σ_j (Δm_j − Δm_j+1) − (Δm_{a} − Δm_{b})| = {fmt_value(residual)}"
        " (floating-point round-off only)."
    )


def _validity_text(dec: Mapping, diverged: Mapping | None = None) -> str:
    n_pairs, n_valid = dec.get("n_pairs"), dec.get("n_valid")
    text = f"Pairs used: {n_valid} of {n_pairs} (test point, removal) pairs."
    removals = (diverged or {}).get("removals") or {}
    if removals:
        named = "; ".join(
            f"{KIND_LABELS.get(k, k)} {len(v)} ({_removal_list(v)})" for k, v in removals.items()
        )
        text += (
            " Diverged responses, excluded from every statistic and plot (removal sets, as "
            "numbered in "
            f"removals.json): {named}."
        )
    bad = {k: v for k, v in (dec.get("nonfinite") or {}).items() if v}
    if bad:
        counts = ", ".join(f"{KIND_LABELS.get(k, k)} {v}" for k, v in bad.items())
        text += f" Non-finite Δm (pairs excluded from every gap): {counts}."
    return text


def _removal_list(idx: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(f"#{i}" for i in idx[:limit])
    return shown + (f", … {len(idx) - limit} more" if len(idx) > limit else "")


def _decomposition_section(summary: Mapping) -> str:
    dec = _decomp(summary)
    header = ["gap", "between (a → b)", "mean |Δm_a − Δm_b|", "signed mean Δm_a − Δm_b",
              "output-space mean ||Δf_a − Δf_b||"]  # fmt: skip
    table = _md_table(header, _decomposition_rows(dec), align="llrrr")
    return "\n\n".join(
        [
            "## Decomposition of the mismatch",
            table,
            _telescoping_text(dec),
            _validity_text(dec, summary.get("diverged")),
        ]
    )


def _diagnostics_section(diagnostics) -> str:
    """Per-kind diagnostics as a table (kinds as rows); anything else as a list."""
    nested = isinstance(diagnostics, Mapping) and all(
        isinstance(v, Mapping) for v in diagnostics.values()
    )
    if nested and diagnostics:
        cols = list(dict.fromkeys(c for v in diagnostics.values() for c in v))
        rows = [
            [KIND_LABELS.get(k, str(k))] + [_fmt_diag(v.get(c)) for c in cols]
            for k, v in diagnostics.items()
        ]
        body = _md_table([""] + cols, rows)
    elif isinstance(diagnostics, Mapping):
        body = "\n".join(f"- `{k}`: {_fmt_diag(v)}" for k, v in diagnostics.items()) or "_none_"
    else:
        body = _fmt_diag(diagnostics)
    return "## Diagnostics\n\n" + body


def _fmt_diag(v) -> str:
    if isinstance(v, bool) or v is None:
        return NA if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return NA if _finite(v) is None else f"{float(v):.4g}"
    return _fmt_config_value(v)


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


def _measured_reading(summary: Mapping) -> str:
    """What this run's numbers say, in words that follow them (not a fixed story)."""
    gaps = {g: _plottable(v) for g, v in ((_decomp(summary).get("gaps") or {}).items())}
    corr = _corr(summary)
    lines = []
    pbrf = _plottable(_get(corr, "pbrf", "pearson"))
    rank = _plottable(_get(corr, "pbrf", "spearman"))
    cold = _plottable(_get(corr, "cold", "pearson"))
    if pbrf is not None:
        both = f"Pearson {pbrf:.3f}" + (f", Spearman {rank:.3f}" if rank is not None else "")
        if pbrf >= 0.9:
            text = f"Here influence tracks the PBRF closely ({both})"
        elif rank is not None and rank >= 0.9:
            text = (f"Here influence ranks the removals as the PBRF does ({both}); the lower "
                    "Pearson comes from a few large responses (see the scatter plot)")
        elif pbrf >= 0.7:
            text = f"Here influence tracks the PBRF only moderately ({both})"
        else:
            text = (f"Here influence does not track the PBRF well ({both}): look at the solver "
                    "residuals, the linearisation error and the certificates above")
        if cold is not None:
            text += f"; its Pearson correlation with cold-start LOO is {cold:.3f}"
        lines.append(text + ".")
    first = [gaps.get(g) for g in GAPS[:3]]
    last = [gaps.get(g) for g in GAPS[3:]]
    if all(v is not None for v in first + last):
        big, small = max(first), max(last)
        name = GAPS[first.index(big)]
        if small > 0 and big >= 10 * small:
            lines.append(f"The {name} is the largest gap ({fmt_value(big)}); the warm-start, "
                         "proximity and non-convergence gaps exceed the linearisation and solver "
                         f"errors by a factor {big / small:.0f} or more, the paper's finding.")
        else:
            lines.append(f"Unlike the paper's finding, the linearisation and solver errors are not "
                         f"small here: the largest of them is {fmt_value(small)}, against "
                         f"{fmt_value(big)} for the {name}.")
        lin, solver = gaps.get(GAPS[3]), gaps.get(GAPS[4])
        if solver > 0.5 * lin and solver > 0.1 * big:
            lines.append("The solver error is comparable to the linearisation error: the practical "
                         "solver ([influence] solver) is not converged enough for this comparison.")
    elif gaps:
        lines.append("The computed response functions do not form the whole chain, so only some "
                     "gaps are measured.")
    return " ".join(lines)


def how_to_read(summary: Mapping) -> str:
    """The "How to read this" section: conventions, then what this run's numbers say."""
    measured = _measured_reading(summary)
    return HOW_TO_READ + (f"\n\n**This run.** {measured}" if measured else "")


def _figures_section(figures: Mapping[str, Path | None], run_dir: Path) -> str:
    lines = ["## Figures"]
    for name, path in figures.items():
        if path is not None:
            lines.append(f"![{name}]({Path(path).relative_to(run_dir).as_posix()})")
    if len(lines) == 1:
        lines.append("_No figures (not enough data)._")
    return "\n\n".join(lines)


def certificate_lines(summary: Mapping) -> list[str]:
    """One line per optimised kind ("PBRF: certified 48 of 48, max ρ 3e-9"), the exclusions, and
    the solver residuals (flagged at ≥ 1).
    """
    cert = summary.get("certificates") or {}
    lines = []
    for kind, e in (cert.get("by_kind") or {}).items():
        if "certified" not in e:
            continue
        text = (
            f"{KIND_LABELS.get(kind, kind)}: certified {e['certified']} of "
            f"{cert.get('n_removals')}"
            f" (ρ ≤ {fmt_value(cert.get('threshold'))}), max ρ {fmt_value(e.get('max_rho'))},"
            f" median ρ {fmt_value(e.get('median_rho'))}"
        )
        if e.get("diverged"):
            text += f", diverged {e['diverged']}"
        text += "" if e.get("excludes_uncertified") else " (defined by its recipe: not excluded)"
        lines.append(text)
    if cert:
        left = cert.get("n_removals", 0) - cert.get("n_kept", 0)
        lines.append(
            f"Removals used in the statistics: {cert.get('n_kept')} of "
            f"{cert.get('n_removals')}"
            + (
                f" (left out: {left}, uncertified or diverged; indices "
                f"{cert.get('excluded_removals')})"
                if left
                else ""
            )
        )
    for label, e in (summary.get("solvers") or {}).items():
        text = (
            f"{label} solve ({e.get('solver')}, "
            f"{KIND_LABELS.get(e.get('kind'), e.get('kind'))}): "
            f"max relative residual {fmt_value(e.get('max_residual'))}"
        )
        if e.get("flagged"):
            text = (
                "WARNING: "
                + text
                + " ≥ 1 — the solve did not reduce the residual; its numbers are unreliable"
            )
        lines.append(text)
    return lines


def _certificate_section(summary: Mapping) -> str:
    lines = certificate_lines(summary)
    if not lines:
        return ""
    intro = (
        "Every optimised response carries a certificate ρ = ||∇F(θ_r)|| / signal: the final "
        "full-batch gradient norm of its objective relative to the removal's own signal "
        "(1/N)||Σ_{m∈r} ∇L_m(θ^s)||. PBRF, proximal and full-batch warm-start pairs that are "
        "not certified (or diverged) are left out of every statistic above."
    )
    return (
        "## Certificates and solver residuals\n\n"
        + intro
        + "\n\n"
        + "\n".join(f"- {ln}" for ln in lines)
    )


def _paired_section(summary: Mapping) -> str:
    paired = summary.get("paired")
    if not paired:
        return ""
    corr = paired.get("correlations") or {}
    rows = _corr_rows(corr, list(corr), " (paired)")
    header = list(CORRELATION_HEADER)
    dec = paired.get("decomposition") or {}
    drift = paired.get("drift") or {}
    gap_rows = _decomposition_rows(dec)
    for k, d in drift.items():
        gap_rows.insert(
            -1,
            [
                f"drift ({KIND_LABELS.get(k, k)})",
                "literal − paired",
                fmt_mean_std(d, "mean_abs", fmt_value),
                fmt_mean_std(d, "signed", fmt_value),
                "",
            ],
        )
    gh = ["gap (paired chain)", "between (a → b)", "mean |Δm_a − Δm_b|", "signed mean Δm_a − Δm_b",
          "output-space mean ||Δf_a − Δf_b||"]  # fmt: skip
    text = (
        "## Paired chain (warm start and proximal against a no-removal continuation)\n\n"
        "The paper measures warm-start and proximal responses from θ^s, so when θ^s is not a "
        "minimum they include the drift of continued training, the same for every removal. "
        "Here "
        "each is also measured against a no-removal continuation with the same recipe and seed "
        "(as cold start already is); the drift rows are the difference between the two chains. "
        "The paired gaps telescope to cold − influence; the literal gaps equal the paired ones "
        f"plus drift terms (largest deviation {fmt_value(paired.get('literal_residual'))})."
    )
    return "\n\n".join(
        [
            text,
            _md_table(header, rows) if rows else "",
            _md_table(gh, gap_rows, align="llrrr"),
            _telescoping_text(dec),
            _validity_text(dec),
        ]
    )


def _lds_section(summary: Mapping) -> str:
    lds = summary.get("lds")
    if not lds:
        return ""
    own = lds.get("influence") or {}
    return (f"## Linear datamodeling score (LDS)\n\n{lds['subsets']} subsets, each keeping "
            f"{100 * lds['alpha']:.0f}% of the training set ({lds['removed_per_subset']} points "
            f"removed), retrained from scratch with seeds {lds['seeds']}. LDS of the run's "
            "influence "
            f"estimate: **{fmt_corr(own.get('lds'))}** ± {fmt_value(own.get('stderr'))} (standard "
            f"error over {own.get('n_test')} test points).{_lds_convergence(lds)} Score other "
            "estimators with `pbrf estimators RUN_DIR`.")


def _lds_convergence(lds: Mapping) -> str:
    conv = lds.get("convergence") or {}
    if not conv:
        return ""
    return (f" Retraining is defined by the base recipe: ρ = ‖∇J‖ / signal after it is "
            f"{fmt_value(conv.get('median_rho'))} (median), {fmt_value(conv.get('max_rho'))} "
            f"(max); {conv.get('diverged', 0)} diverged.")


def _theta_s_section(summary: Mapping) -> str:
    q = summary.get("theta_s")
    if not q:
        return ""
    m = q["metric"]
    rows = [["loss", fmt_value(q["train_loss"]), fmt_value(q["test_loss"])],
            [m, fmt_mean_std(q, "train_metric"), fmt_mean_std(q, "test_metric")]]
    text = (f"## The base model θ^s\n\n{_md_table(['', 'train', 'test'], rows, align='lrr')}\n\n"
            f"Chance level ({m} of always predicting the most frequent training label, or R² = 0): "
            f"{q['chance']:.3f}; full-batch gradient norm ‖∇J(θ^s)‖ = {q['grad_norm']:.3e}; "
            f"{q['n_test']} test examples.")
    warning = quality_lines(q)[1:]
    return text + ("\n\n**" + warning[0] + "**" if warning else "")


def render_markdown(
    summary: Mapping, config: Mapping, title: str, figures: Mapping, run_dir: Path
) -> str:
    """The text of ``report.md`` (see :func:`write_report`)."""
    parts = [f"# {title}", _experiment_section(summary, config), _theta_s_section(summary),
             _correlation_section(summary), _decomposition_section(summary),
             _certificate_section(summary), _paired_section(summary), _lds_section(summary),
             _figures_section(figures, run_dir)]
    if "diagnostics" in summary:
        parts.append(_diagnostics_section(summary["diagnostics"]))
    parts += [how_to_read(summary), _config_section(config)]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(
    run_dir,
    summary: Mapping,
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
        summary: result of :func:`pbrf.experiment.analysis.summarise`, optionally with a
            ``"diagnostics"`` entry.
        dm: ``{kind: Δm [n_test, n_removals]}`` for the scatter plots.
        config: the run's configuration (any JSON-like dict; nested dicts are flattened).
        title: report title.

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    clean = jsonable(summary, nonfinite="null")
    summary_text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    fig_dir = run_dir / "figures"
    figures = {
        "decomposition": plot_decomposition(clean, fig_dir / "decomposition.png"),
        "scatter": plot_scatter(clean, dm or {}, fig_dir / "scatter.png"),
        "correlations": plot_correlations(clean, fig_dir / "correlations.png"),
    }
    report = _write_text(
        run_dir / "report.md", render_markdown(clean, config, title, figures, run_dir)
    )
    _write_text(run_dir / "summary.json", summary_text)
    return report


def _seeds_section(summary: Mapping, per_seed: Sequence[Mapping]) -> str:
    """Which θ^s seeds the run aggregates, each one's quality and a link to its own report."""
    info = summary.get("seeds") or {}
    rows = []
    for seed, folder, s in zip(info.get("train_seeds", []), info.get("runs", []), per_seed):
        q = s.get("theta_s") or {}
        m = q.get("metric", "metric")
        rows.append([str(seed), f"[{folder}]({folder}/report.md)",
                     f"{m} {q['test_metric']:.3f}" if "test_metric" in q else NA,
                     fmt_value(q.get("grad_norm")), fmt_corr(_get(s, "correlations", "pbrf",
                                                                   "pearson")),
                     fmt_corr(_get(s, "correlations", "cold", "pearson"))])
    table = _md_table(["train.seed", "run", "θ^s test", "‖∇J(θ^s)‖", "PBRF Pearson",
                       "cold LOO Pearson"], rows, align="llrrrr")
    return (f"## Seeds\n\nEvery number below is the mean ± sample standard deviation over "
            f"{info.get('n')} base models θ^s trained with `train.seed` = "
            f"{info.get('train_seeds')}; each is a complete run of its own (linked). Counts "
            "(certified, diverged, pairs used) add up over the seeds.\n\n" + table)


def write_seeds_report(run_dir, summary: Mapping, per_seed: Sequence[Mapping],
                       config: Mapping) -> Path:
    """``report.md``, ``figures/decomposition.png`` and ``summary.json`` of a multi-seed run.

    Args:
        run_dir: the multi-seed run directory (its seeds' runs are in ``seed=K`` folders).
        summary: :func:`pbrf.experiment.run.seeds.aggregate` of the seeds' summaries.
        per_seed: the seeds' summaries, in the order of ``summary["seeds"]``.
        config: the run's configuration.

    Returns:
        The path of ``report.md`` (``summary.json`` is written last).
    """
    run_dir = Path(run_dir)
    clean = jsonable(summary, nonfinite="null")
    figures = {"decomposition (means over seeds)":
               plot_decomposition(clean, run_dir / "figures" / "decomposition.png")}
    rows = [(f"train.seed {seed}", s) for seed, s in zip(clean["seeds"]["train_seeds"], per_seed)]
    rows.append(("mean ± std", clean))
    parts = [f"# pbrf run: {config.get('name', 'experiment')} ({len(per_seed)} seeds)",
             _seeds_section(clean, per_seed), _experiment_section(clean, config),
             _theta_s_section(clean), _correlation_section(clean), "### Per seed\n\n"
             + format_table(rows), _decomposition_section(clean), _certificate_section(clean),
             _paired_section(clean), _figures_section(figures, run_dir), how_to_read(clean),
             _config_section(config)]
    report = _write_text(run_dir / "report.md", "\n\n".join(p for p in parts if p) + "\n")
    _write_text(run_dir / "summary.json", json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return report


# --------------------------------------------------------------------------- tables across runs


def _table_cells(summary: Mapping, kinds: Sequence[str]) -> list[str]:
    corr = _corr(summary)
    return [fmt_mean_std(_get(corr, k), key) for k in kinds for key in ("pearson", "spearman")]


def _table_header(kinds: Sequence[str]) -> list[str]:
    return ["run"] + [f"{TABLE_SHORT.get(k, k)} {m}" for k in kinds for m in ("P", "S")]


def format_table(rows: Sequence[tuple[str, Mapping]], kinds: Sequence[str] = TABLE_KINDS) -> str:
    """Several runs as a markdown table in the layout of the paper's Table 1.

    Args:
        rows: ``(run name, summary)`` pairs; a summary is a
            :func:`~pbrf.experiment.analysis.summarise` result (or just its ``correlations``).
        kinds: the response functions compared with influence, one P/S column pair each.

    Returns:
        Markdown: one row per run, columns Pearson (P) and Spearman (S) of the influence estimate
        vs LOO (cold start), warm-start LOO, proximal and PBRF; missing values are ``n/a``.
    """
    body = [[str(name)] + _table_cells(s, kinds) for name, s in rows]
    note = ("P = Pearson, S = Spearman correlation of the influence estimate with each response "
            "function.")
    return _md_table(_table_header(kinds), body) + "\n\n" + note + "\n"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_table_text(
    rows: Sequence[tuple[str, Mapping]], kinds: Sequence[str] = TABLE_KINDS
) -> str:
    """Plain-text, column-aligned variant of :func:`format_table` for terminal output."""
    body = [[str(name)] + _table_cells(s, kinds) for name, s in rows]
    return _text_table(_table_header(kinds), body)


def print_summary(summary: Mapping) -> str:
    """The compact terminal summary of one run: correlations, then gaps. Returns the text.

    The caller prints it (``print(print_summary(s))``); nothing is printed here.
    """
    corr = _corr(summary)
    kinds = [k for k in _response_kinds(corr) if k in corr]
    corr_rows = _corr_rows(corr, kinds)
    dec = _decomp(summary)
    gap_rows = [
        [g] + [fmt_mean_std(dec, f"{key}.{g}", fmt_value) for key in ("gaps", "signed")]
        for g in GAPS
    ]
    gap_rows.append(["total (LOO − influence)", fmt_mean_std(dec, "total", fmt_value),
                     fmt_mean_std(dec, "total_signed", fmt_value)])
    parts = []
    if corr_rows:
        parts.append(
            _text_table(["influence vs", "Pearson", "Spearman", "P/test", "S/test"], corr_rows)
        )
    parts.append(_text_table(["gap", "mean |Δm|", "signed"], gap_rows))
    parts.append(_validity_text(dec, summary.get("diverged")))
    paired = summary.get("paired") or {}
    pcorr = paired.get("correlations") or {}
    if pcorr:
        prow = _corr_rows(pcorr, list(pcorr), " (paired)")
        parts.append(_text_table(["influence vs", "Pearson", "Spearman", "P/test", "S/test"], prow))
    lines = certificate_lines(summary)
    if lines:
        parts.append("\n".join(lines))

    if summary.get("theta_s"):
        parts.insert(0, "\n".join(quality_lines(summary["theta_s"])))
    lds = summary.get("lds")
    if lds:
        own = lds.get("influence") or {}
        parts.append(f"LDS of the influence estimate: {fmt_corr(own.get('lds'))} ± "
                     f"{fmt_value(own.get('stderr'))} "
                     f"({lds['subsets']} subsets keeping {100 * lds['alpha']:.0f}% of the data); "
                     "rank other estimators with `pbrf estimators RUN_DIR`."
                     f"{_lds_convergence(lds)}")
    return "\n\n".join(parts)
