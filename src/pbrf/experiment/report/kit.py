"""The formatting kit of every report: number formats, the markdown table, the fixed-width text
table, atomic writes of text and figures.

Missing or non-finite numbers (``None`` / NaN / inf) render as :data:`NA`. Files are written
atomically (a temporary file in the same folder, then ``os.replace``), so an interrupted write
leaves the previous file intact and no partial file behind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pbrf import kinds as _kinds
from pbrf.experiment.analysis import RESPONSE_KINDS
from pbrf.fileio import atomic_write

__all__ = [
    "NA",
    "DPI",
    "PLOT_LIMIT",
    "finite",
    "plottable",
    "fmt_corr",
    "fmt_value",
    "fmt_ms",
    "mean_std",
    "fmt_mean_std",
    "fmt_setting",
    "nested_get",
    "flatten",
    "response_kinds",
    "md_table",
    "text_table",
    "write_text",
    "save_figure",
]

#: The rendering of a missing or non-finite number.
NA = "n/a"
#: Resolution of every PNG figure.
DPI = 120
#: Magnitudes beyond this are not drawn (matplotlib's axis limits overflow near 1e308); they are
#: counted.
PLOT_LIMIT = 1e100


# --------------------------------------------------------------------------- numbers


def finite(x) -> float | None:
    """``float(x)`` when it is a finite number, else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def plottable(x) -> float | None:
    """``finite(x)`` when its magnitude can be drawn (at most :data:`PLOT_LIMIT`), else None."""
    x = finite(x)
    return x if x is not None and abs(x) <= PLOT_LIMIT else None


def fmt_corr(x) -> str:
    """A correlation with 3 decimals (``0.934``), or ``n/a`` for None/NaN."""
    x = finite(x)
    return NA if x is None else f"{x:.3f}"


def fmt_value(x) -> str:
    """A magnitude in scientific notation (``1.234e-03``), or ``n/a`` for None/NaN/inf."""
    x = finite(x)
    return NA if x is None else f"{x:.3e}"


def fmt_ms(value, std, fmt=fmt_corr) -> str:
    """``fmt(value)``, followed by ``± fmt(std)`` when ``std`` is a finite number (a mean over the
    seeds of a multi-seed run, see :mod:`pbrf.experiment.run.seeds`).
    """
    text = fmt(value)
    return text + f" ± {fmt(std)}" if text != NA and finite(std) is not None else text


def nested_get(d: Mapping | None, *keys):
    """``d[k1][k2]...``, or None where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def mean_std(mapping: Mapping | None, key: str) -> tuple[float | None, float | None]:
    """The value at the dotted ``key`` of a summary dict and its standard deviation over seeds.

    A summary aggregated over seeds (``run.seeds > 1``) gives every mean a sibling ``<key>_std``
    (``correlations.pbrf.pearson_std``) or, for a block of means, a sibling block ``<block>_std``
    (``decomposition.gaps_std.<gap>``); a single-seed summary has neither, and the std is None.
    Non-finite or missing numbers are None. (The typed form of the same lookup is
    :meth:`pbrf.experiment.analysis.results.Record.mean_std`.)
    """
    *path, last = key.split(".")
    parent = nested_get(mapping, *path) if path else mapping
    mean = finite(nested_get(parent, last))
    std = finite(nested_get(parent, f"{last}_std"))
    if std is None and path:
        grand = nested_get(mapping, *path[:-1]) if path[:-1] else mapping
        std = finite(nested_get(grand, f"{path[-1]}_std", last))
    return mean, std


def fmt_mean_std(mapping: Mapping | None, key: str, fmt=None) -> str:
    """``mean ± std`` of the dotted ``key`` (see :func:`mean_std`), or the plain value when the
    summary has no ``_std`` for it, or ``n/a``; numbers formatted by ``fmt`` (default
    :func:`fmt_corr`).
    """
    return fmt_ms(*mean_std(mapping, key), fmt or fmt_corr)


def fmt_setting(v) -> str:
    """A configuration value on one line: floats with 6 significant digits, long lists cut."""
    if isinstance(v, float):
        return NA if finite(v) is None else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        text = ", ".join(fmt_setting(x) for x in v[:8])
        return f"[{text}, … ({len(v)} items)]" if len(v) > 8 else f"[{text}]"
    return str(v).replace("\n", " ")


def flatten(d: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf of nested mappings (an empty mapping is a leaf)."""
    items = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        items += flatten(v, key + ".") if isinstance(v, Mapping) and v else [(key, v)]
    return items


def response_kinds(present: Mapping) -> list[str]:
    """The chain's response kinds, then any other registered response kind in ``present``."""
    extra = [k for k in _kinds.response_names() if k in present and k not in RESPONSE_KINDS]
    return list(RESPONSE_KINDS) + extra


# --------------------------------------------------------------------------- tables


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A markdown table; ``align`` has one letter per column, "l" or "r" (default: l, then r).
    Pipes in cells are escaped and line breaks folded, so every row has the header's columns.
    """
    align = align or "l" + "r" * (len(header) - 1)
    sep = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width text table for the terminal: the first column left-aligned, the others
    right-aligned, two spaces apart, a dashed rule under the header.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


# --------------------------------------------------------------------------- atomic writes


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write(path, text)


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG (:data:`DPI`) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
