"""Analysis of measured responses: the decomposition into five gaps, typed results, and the
aggregate over θ^s seeds. Pure numpy; it reads arrays and summaries, never a run directory.
"""

from pbrf.experiment.analysis.decomposition import (
    GAP_PAIRS,
    GAPS,
    KIND_LABELS,
    KINDS,
    RESPONSE_KINDS,
    correlation_entry,
    correlations,
    decompose,
    decomposition,
    exclude_removals,
    finite_or_none,
    paired_chain,
    summarise,
)
from pbrf.experiment.analysis.results import Decomposition, Summary
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
    "paired_chain",
    "Decomposition",
    "Summary",
]
