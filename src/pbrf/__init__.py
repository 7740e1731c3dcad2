"""pbrf: influence functions for PyTorch and the proximal Bregman response function they answer.

Bae, Ng, Lo, Ghassemi, Grosse, "If Influence Functions are the Answer, Then What is the
Question?" (NeurIPS 2022). See the README for the sign and scaling conventions.
"""

from . import curvature, kinds, tasks
from .curvature import Curvature, CurvatureOperator
from .influence import (
    InfluenceResult,
    delta_theta,
    influence,
    influence_with_info,
    per_example_grads,
)
from .problem import Problem
from .solvers import SolveInfo, SolverDivergedError, solve

__version__ = "0.1.0"

__all__ = [
    "tasks",
    "curvature",
    "kinds",
    "Problem",
    "Curvature",
    "CurvatureOperator",
    "influence",
    "influence_with_info",
    "InfluenceResult",
    "delta_theta",
    "per_example_grads",
    "solve",
    "SolveInfo",
    "SolverDivergedError",
]

from .experiment.run.load import Run, load_run  # noqa: E402
from .newton import NewtonRecipe  # noqa: E402
from .optim import Recipe  # noqa: E402
from .respond import KINDS, Response, respond  # noqa: E402
from .training import TrainResult, load_checkpoint, save_checkpoint, train  # noqa: E402

__all__ += ["Recipe", "NewtonRecipe", "respond", "Response", "KINDS", "train", "TrainResult",
            "save_checkpoint", "load_checkpoint", "Run", "load_run"]
