"""Analysis of measured responses: the decomposition into five gaps, typed results, and the
aggregate over θ^s seeds. Pure numpy; it reads arrays and summaries, never a run directory.
"""

from pbrf.experiment.analysis import decomposition as decomposition_module
from pbrf.experiment.analysis.decomposition import *  # noqa: F403 - re-exported
from pbrf.experiment.analysis.decomposition import paired_chain
from pbrf.experiment.analysis.results import Decomposition, Summary

__all__ = [*decomposition_module.__all__, "paired_chain", "Decomposition", "Summary"]
