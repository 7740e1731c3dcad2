"""Analysis of measured responses: the decomposition into five gaps, typed results, and the
aggregate over θ^s seeds. Pure numpy; it reads arrays and summaries, never a run directory.
"""

from pbrf.experiment.analysis.decomposition import (
    GAP_PAIRS,
    GAPS,
    KIND_LABELS,
    KINDS,
    RESPONSE_KINDS,
    correlations,
    decompose,
    decomposition,
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
    "summarise",
    "paired_chain",
    "Decomposition",
    "Summary",
]
