"""The figures of the reports: the decomposition bars, the influence-vs-response scatter grid,
the correlation bars, and the sweep figure (gaps and correlations against a factor's value).

Every ``*_figure`` function builds a :class:`matplotlib.figure.Figure` from typed summaries
(:class:`~pbrf.experiment.analysis.results.Summary`, or their dicts); every ``plot_*`` function
writes it as a PNG, atomically (:func:`pbrf.experiment.report.kit.save_figure`). Figures use
matplotlib's object API with the Agg canvas, so this module never changes the global pyplot
backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pbrf import kinds as _kinds
from pbrf.experiment.analysis import GAPS, KIND_LABELS
from pbrf.experiment.analysis.aggregate import SeedStats
from pbrf.experiment.analysis.results import Decomposition, Record, Summary
from pbrf.experiment.report.kit import (
    NA,
    PLOT_LIMIT,
    finite,
    fmt_corr,
    plottable,
    response_kinds,
    save_figure,
)

__all__ = [
    "KIND_COLORS",
    "GAP_COLORS",
    "LOG_FACTORS",
    "decomposition_figure",
    "plot_decomposition",
    "scatter_figure",
    "plot_scatter",
    "correlations_figure",
    "plot_correlations",
    "sweep_axis",
    "seed_stats",
    "as_seeds",
    "sweep_figure",
    "plot_sweep",
    "gap_of",
    "pearson_of",
]

#: One colour per kind, shared by every figure (a live view of the registry, :mod:`pbrf.kinds`).
KIND_COLORS = _kinds.view("colour")
#: One colour per gap, shared by the decomposition and sweep figures.
GAP_COLORS = {g: colormaps["viridis"](x) for g, x in zip(GAPS, np.linspace(0.0, 0.85, len(GAPS)))}
#: Factors whose effect is read on a log scale (training time, regularisation strengths).
LOG_FACTORS = ("epochs", "damping", "weight_decay")


def _figure(**kwargs) -> Figure:
    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def gap_of(summary: Summary, gap: str):
    """The mean |Δm| of ``gap`` in a summary, or None."""
    dec = summary.decomposition
    return (dec.gaps or {}).get(gap) if dec is not None else None


def pearson_of(summary: Summary, kind: str):
    """The Pearson correlation of ``kind`` with the influence estimate in a summary, or None."""
    corr = (summary.correlations or {}).get(kind)
    return corr.pearson if isinstance(corr, Record) else None


# --------------------------------------------------------------------------- one run


def _log_bars(ax, labels: Sequence[str], values: Sequence, colors: Sequence, ylabel: str) -> None:
    """Bars on a log axis; zeros drawn at a floor and labelled "0", missing values "n/a"."""
    raw = [finite(v) for v in values]
    vals = [plottable(v) for v in raw]  # off-scale values: drawn like missing ones, labelled
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


def decomposition_figure(summary: Summary | Mapping) -> Figure:
    """The five gaps as bars on a log scale (and the output-space panel when present)."""
    summary = Summary.from_dict(summary)
    dec = summary.decomposition or Decomposition()
    output = dec.output_gaps
    fig = _figure(figsize=(13 if output else 7, 4.4))
    axes = fig.subplots(1, 2 if output else 1, squeeze=False)[0]
    colors = [GAP_COLORS[g] for g in GAPS]
    gaps = dec.gaps or {}
    ylabel = r"mean $|\Delta m_a - \Delta m_b|$"
    _log_bars(axes[0], GAPS, [gaps.get(g) for g in GAPS], colors, ylabel)
    axes[0].set_title("Gaps in the measured test-loss change")
    if not any(plottable(v) is not None for v in gaps.values()):  # say why, not empty axes
        axes[0].text(0.5, 0.5, "no gap measured: the computed (and certified, non-diverged)\n"
                     "response functions form no link of the chain", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=10, color="0.3")
    scale = plottable((dec.mean_abs or {}).get("pbrf"))
    if scale:
        label = r"mean $|\Delta m|$ (PBRF), for scale"
        axes[0].axhline(scale, color=KIND_COLORS["pbrf"], ls="--", lw=1, label=label)
        axes[0].legend(fontsize=8, loc="upper right")
    if output:
        ylabel = r"mean $\|\Delta f_a - \Delta f_b\|_2$"
        _log_bars(axes[1], GAPS, [output.get(g) for g in GAPS], colors, ylabel)
        axes[1].set_title("Gaps in the test outputs")
    return fig


def plot_decomposition(summary: Summary | Mapping, path) -> Path:
    """Write :func:`decomposition_figure` to ``path``."""
    return save_figure(decomposition_figure(summary), path)


def _scatter_panel(ax, x: np.ndarray, y: np.ndarray, kind: str, summary: Summary) -> None:
    finite_ = np.isfinite(x) & np.isfinite(y)
    keep = finite_ & (np.abs(x) <= PLOT_LIMIT) & (np.abs(y) <= PLOT_LIMIT)
    off_scale = int(finite_.sum() - keep.sum())
    x, y = x[keep], y[keep]
    alpha = float(np.clip(30 / math.sqrt(max(x.size, 1)), 0.15, 0.8))
    ax.scatter(x, y, s=8, alpha=alpha, color=KIND_COLORS[kind], edgecolors="none", rasterized=True)
    if x.size:
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="0.3", ls="--", lw=0.8)  # y = x
    corr = (summary.correlations or {}).get(kind)
    p = fmt_corr(corr.pearson if corr else None)
    s = fmt_corr(corr.spearman if corr else None)
    note = f" ({off_scale} off scale)" if off_scale else ""
    ax.set_title(f"{KIND_LABELS[kind]}\nP = {p}, S = {s}{note}", fontsize=10)
    ax.set_xlabel(r"influence estimate $\Delta m_{\mathrm{IF}}$", fontsize=9)
    ax.set_ylabel(rf"$\Delta m$ ({KIND_LABELS[kind]})", fontsize=9)
    ax.axhline(0, color="0.8", lw=0.5, zorder=0)
    ax.axvline(0, color="0.8", lw=0.5, zorder=0)
    ax.tick_params(labelsize=8)


def scatter_figure(summary: Summary | Mapping, dm: Mapping) -> Figure | None:
    """Grid of influence estimate (x) vs each response function's Δm (y); None without data."""
    x = dm.get("influence")
    kinds = [k for k in response_kinds(dm) if dm.get(k) is not None]
    if x is None or not kinds:
        return None
    summary = Summary.from_dict(summary)
    x = np.asarray(x, dtype=np.float64).ravel()
    ncols = min(3, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig = _figure(figsize=(3.7 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, kind in zip(axes, kinds):
        _scatter_panel(ax, x, np.asarray(dm[kind], dtype=np.float64).ravel(), kind, summary)
    for ax in axes[len(kinds) :]:
        ax.set_visible(False)
    return fig


def plot_scatter(summary: Summary | Mapping, dm: Mapping, path) -> Path | None:
    """Write :func:`scatter_figure` to ``path``; None (nothing written) without data."""
    fig = scatter_figure(summary, dm)
    return None if fig is None else save_figure(fig, path)


#: The bars of the correlation figure: (field, label, colour).
_CORRELATION_BARS = (("pearson", "Pearson", "#3b6ea8"), ("spearman", "Spearman", "#e08a3c"),
                     ("pearson_per_test", "Pearson (per-test mean)", "#9cc0e6"),
                     ("spearman_per_test", "Spearman (per-test mean)", "#f5c99b"))  # fmt: skip


def correlations_figure(summary: Summary | Mapping) -> Figure | None:
    """Grouped bars: Pearson / Spearman (all pairs and per-test mean) per response function;
    None when no response function has correlations.
    """
    corr = Summary.from_dict(summary).correlations or {}
    kinds = [k for k in response_kinds(corr) if k in corr]
    if not kinds:
        return None
    fig = _figure(figsize=(1.6 * len(kinds) + 3, 4))
    ax = fig.subplots()
    width = 0.8 / len(_CORRELATION_BARS)
    x = np.arange(len(kinds))
    for j, (key, label, color) in enumerate(_CORRELATION_BARS):
        vals = [finite(getattr(corr[k], key)) for k in kinds]
        heights = [np.nan if v is None else v for v in vals]
        ax.bar(x + (j - 1.5) * width, heights, width, label=label, color=color,
               edgecolor="black", lw=0.4)
    ax.set_xticks(x, [KIND_LABELS[k] for k in kinds], fontsize=9)
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("correlation with the influence estimate")
    ax.set_title("Influence estimate vs response functions")
    fig.legend(loc="outside lower center", ncols=len(_CORRELATION_BARS), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_correlations(summary: Summary | Mapping, path) -> Path | None:
    """Write :func:`correlations_figure` to ``path``; None (nothing written) without data."""
    fig = correlations_figure(summary)
    return None if fig is None else save_figure(fig, path)


# --------------------------------------------------------------------------- sweeps


def sweep_axis(values: Sequence, factor: str = "") -> tuple[np.ndarray, list[str] | None, bool]:
    """x positions, tick labels for categorical values (else None), and whether to use log x
    (always for :data:`LOG_FACTORS` with positive values, else when they span 20× or more).
    """
    numeric = [finite(v) for v in values]
    if any(v is None for v in numeric) or any(isinstance(v, (bool, str)) for v in values):
        return np.arange(len(values), dtype=float), [str(v) for v in values], False
    arr = np.array(numeric)
    positive = bool(arr.size > 1 and (arr > 0).all())
    log = positive and (factor in LOG_FACTORS or bool(arr.max() / arr.min() >= 20))
    return arr, None, log


def as_seeds(group) -> list[Summary]:
    """One value's summaries: a single summary or a sequence of summaries (one per seed)."""
    group = [group] if isinstance(group, (Mapping, Record)) else list(group)
    return [Summary.from_dict(s) for s in group]


def seed_stats(groups: Sequence, get) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over the seeds of each value of ``get(summary)`` (NaN where
    none is plottable; std 0 with one seed).
    """
    means, stds = [], []
    for group in groups:
        stats = SeedStats([plottable(get(s)) for s in as_seeds(group)])  # the aggregate's mean
        means.append(np.nan if stats.mean is None else stats.mean)
        stds.append(0.0 if stats.std is None else stats.std)
    return np.array(means), np.array(stds)


def _drift_of(summary: Summary, kind: str):
    drift = (summary.paired.drift or {}).get(kind) if summary.paired is not None else None
    return drift.mean_abs if drift is not None else None


def _sweep_gap_panel(ax, x: np.ndarray, summaries: Sequence, factor: str) -> None:
    series = [(gap, "o-", GAP_COLORS[gap], lambda s, g=gap: gap_of(s, g)) for gap in GAPS]
    series += [(f"paired-chain drift ({kind})", "x" + style, "0.45",
                lambda s, k=kind: _drift_of(s, k))
               for kind, style in (("warm", ":"), ("proximal", "-."))]
    drawn = 0
    for label, fmt, color, get in series:
        mean, std = seed_stats(summaries, get)
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
        mean, std = seed_stats(summaries, lambda s, k=kind: pearson_of(s, k))
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


def sweep_figure(factor: str, values: Sequence, summaries: Sequence) -> Figure:
    """Gaps (log y) and influence-vs-PBRF / vs-LOO Pearson correlation against a factor's value
    (arguments as :func:`plot_sweep`): two axes, gaps first.
    """
    if len(values) != len(summaries):
        raise ValueError(
            f"plot_sweep needs one summary per value; got {len(values)} values and "
            f"{len(summaries)} summaries."
        )
    x, labels, logx = sweep_axis(values, factor)
    fig = _figure(figsize=(11, 4.2))
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
    return fig


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
    return save_figure(sweep_figure(factor, values, summaries), Path(path))
