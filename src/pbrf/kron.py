"""Influence scores from kronfluence (EK-FAC, K-FAC, diagonal), in pbrf's conventions.

`kronfluence <https://github.com/pomonam/kronfluence>`_ (Grosse et al. 2023) approximates the
curvature by Kronecker-factored blocks, one per ``nn.Linear`` / ``nn.Conv2d`` module, fitted to
the true Fisher. :func:`kronfluence_scores` runs it on a :class:`~pbrf.Problem` and converts its
pairwise scores to the scores of :func:`pbrf.influence`, so the two can be compared directly:
``scores[t, k] = (1/N) ∇m_tᵀ C⁻¹ Σ_{m∈r_k} ∇L(z_m, θ^s)``, where the measurement ``m_t`` is the
test loss, a positive score means that removing set ``k`` increases test loss ``t``, and
``C = G + (wd + λ) I`` is approximated by kronfluence's factors fitted on the whole training set
at θ^s:

* ``"ekfac"`` / ``"kfac"``: per-module (E)K-FAC blocks of the true Fisher (block-diagonal
  across modules); ``"diagonal"``: the diagonal of the Fisher;
* ``"identity"``: ``C = I`` (no curvature and no damping), i.e. the gradient dot product
  ``(1/N) ∇m_tᵀ Σ_{m∈r_k} ∇L_m``.

Conversions from kronfluence's pairwise scores ``S[t, i] = ∇m_tᵀ (F̂ + δ I)⁻¹ ∇L_i``:

* kronfluence's ``F̂`` is the mean over the N training points (the scale of pbrf's ``G``), but
  its scores carry no ``1/N``: they are divided by ``N = problem.n_train``;
* kronfluence has no weight-decay term, so ``δ = problem.weight_decay + damping``;
* the signs agree (checked against ``strategy="identity"`` and an exact K-FAC case in the
  tests);
* train gradients are of the plain summed task loss (no regulariser), the measurement is the
  summed test loss, so each test point's gradient is its own loss gradient;
* group scores are the sums of the member points' scores.

Only the parameters of ``nn.Linear`` and ``nn.Conv2d`` modules are tracked by kronfluence: the
others (embeddings, normalisation layers, …) are left out of both the gradients and ``C``.

The true Fisher is estimated with one target sample per training point per pass, drawn from
the model's predictive distribution (see :func:`_sampler`) with a generator seeded by
``seed``, so the scores are deterministic for a given seed; ``empirical_fisher=True`` uses
the observed targets instead (then ``F̂`` estimates the empirical Fisher, not ``G``).

kronfluence is optional and its package metadata asks for torchvision, which pbrf never installs
(it would pull a CUDA build of torch). Install it without dependencies::

    pip install -c constraints.txt --no-deps kronfluence==1.0.1 &&
    pip install -c constraints.txt accelerate einops einconv opt-einsum
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from . import tasks as T
from .influence import normalize_removals, removal_matrix
from .problem import Problem

__all__ = ["kronfluence_scores", "INSTALL", "STRATEGIES"]

INSTALL = (
    "pip install -c constraints.txt --no-deps kronfluence==1.0.1 && "
    "pip install -c constraints.txt accelerate einops einconv opt-einsum"
)
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def _import_kronfluence() -> SimpleNamespace:
    """The parts of kronfluence pbrf uses (``Analyzer``, ``prepare_model``, ``FactorArguments``,
    ``ScoreArguments``, ``Task``, ``State``), imported on first use: the package is optional.
    """
    try:
        import kronfluence  # noqa: F401, PLC0415 - optional
        from kronfluence.analyzer import Analyzer, prepare_model  # noqa: PLC0415
        from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: PLC0415
        from kronfluence.task import Task  # noqa: PLC0415
        from kronfluence.utils.state import State  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            f"pbrf.kron needs kronfluence, which is not installed; install it with: {INSTALL}"
        ) from err
    return SimpleNamespace(Analyzer=Analyzer, prepare_model=prepare_model,
                           FactorArguments=FactorArguments, ScoreArguments=ScoreArguments,
                           Task=Task, State=State)


def _sampler(task: T.Task):
    """``(sample(f, gen) -> targets, scale)`` for the true Fisher of ``task``; ``None`` if unknown.

    The sampled loss ``scale · L(f, ŷ)`` with ``ŷ ~ p(· | f)`` has ``E[∇_f ∇_fᵀ] = ∂²L/∂f²``, so the
    true Fisher it estimates is pbrf's Gauss–Newton matrix ``G``:

    * regression / reconstruction, ``L = ½||f − y||²``: ``ŷ = f + ε``, ``ε ~ N(0, I)``
      (``∇_f = −ε``);
    * classification (softmax cross-entropy): ``ŷ ~ Categorical(softmax f)``;
    * binary (logistic): ``ŷ ~ Bernoulli(σ(f))``;
    * language model, ``L = (1/T) Σ_t CE_t``: ``ŷ_t ~ Categorical(softmax f_t)`` independently and
      ``scale = √T``: the Fisher of the mean is ``(1/T²) Σ_t J_tᵀ H_t J_t`` while ``G`` has ``1/T``.
    """

    def gaussian(f, g):
        return f + torch.randn(f.shape, generator=g, device=f.device, dtype=f.dtype)

    def categorical(f, g):
        p = torch.softmax(f.reshape(-1, f.shape[-1]), dim=-1)
        return torch.multinomial(p, 1, generator=g).reshape(f.shape[:-1])

    def bernoulli(f, g):
        return torch.bernoulli(torch.sigmoid(f.reshape(f.shape[0])), generator=g)

    if isinstance(task, T.Regression):  # includes Reconstruction
        return gaussian, lambda f: 1.0
    if isinstance(task, T.LanguageModel):
        return categorical, lambda f: math.sqrt(f.shape[1])
    if isinstance(task, T.Classification):
        return categorical, lambda f: 1.0
    if isinstance(task, T.BinaryClassification):
        return bernoulli, lambda f: 1.0
    return None


def _model_at_theta(problem: Problem, dtype: torch.dtype) -> nn.Module:
    """A deep copy of the problem's model with θ^s and its buffers loaded, cast to ``dtype``."""
    model = copy.deepcopy(problem.model).to(dtype).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(problem.params[n])
        for n, b in model.named_buffers():
            if n in problem.buffers:
                b.copy_(problem.buffers[n])
    return model


def kronfluence_scores(
    problem: Problem, test: tuple[Tensor, Tensor | None], removals, *, strategy: str = "ekfac",
    damping: float = 1e-2, dtype: torch.dtype = torch.float64, batch_size: int = 64,
    workdir: str | None = None, progress: bool = False, seed: int = 0,
    empirical_fisher: bool = False,
) -> Tensor:
    """Influence scores ``[n_test, n_removals]`` computed by kronfluence, in pbrf's conventions.

    ``scores[t, k] = (1/N) ∇m_tᵀ C⁻¹ Σ_{m∈r_k} ∇L(z_m, θ^s)`` as in :func:`pbrf.influence`, with
    ``C = G + (wd + λ) I`` approximated by kronfluence's factors fitted on the whole training set
    at θ^s (the module docstring says how the strategies, the conversions from kronfluence's
    pairwise scores, the tracked modules and the Fisher sampling work).

    Args:
        problem: the :class:`~pbrf.Problem`.
        test: ``(x_test, y_test)``.
        removals: 1-D LongTensor / list of ints (single points) or list of index lists (groups).
        strategy: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        damping: λ ≥ 0 in ``C = G + (wd + λ) I``.
        dtype: precision of the model copy, the factors and the scores.
        batch_size: examples per batch in kronfluence's data passes.
        workdir: parent directory of kronfluence's temporary output (default: the system's temp
            directory); the output is always deleted.
        progress: show kronfluence's progress bars and info logs.
        seed: seed of the Fisher sampling.
        empirical_fisher: fit the factors on the observed targets instead of sampled ones.

    Raises:
        ImportError: kronfluence is not installed (the message names the install line).
        ValueError: bad ``strategy``/``damping``, a model without ``nn.Linear``/``nn.Conv2d``
            modules, or a task whose predictive distribution pbrf cannot sample.
    """
    kron = _import_kronfluence()
    sampler = _check_arguments(problem, strategy, damping, batch_size, empirical_fisher)
    groups = normalize_removals(removals, problem.n_train)
    xt, tt = problem.prepare(test, "test")
    unique, R = removal_matrix(groups, problem.device, dtype)
    settings = _Settings(strategy, problem.weight_decay + float(damping), dtype, batch_size,
                         progress, empirical_fisher)
    ktask = _make_task(kron.Task, problem.task, sampler, seed)
    _reset_device_state(kron.State, problem.device)
    pairwise = _pairwise_scores(kron, problem, ktask, (xt, tt), unique, settings, workdir)
    return pairwise.to(device=problem.device, dtype=dtype) @ R / problem.n_train


@dataclass(frozen=True)
class _Settings:
    """The numerical settings of one kronfluence run (``damping``: kronfluence's δ = wd + λ)."""

    strategy: str
    damping: float
    dtype: torch.dtype
    batch_size: int
    progress: bool
    empirical_fisher: bool

    def cast(self, x: Tensor) -> Tensor:
        """``x`` in the run's dtype when floating point."""
        return x.to(self.dtype) if x.is_floating_point() else x


def _check_arguments(problem: Problem, strategy, damping, batch_size, empirical_fisher):
    """The checks of :func:`kronfluence_scores`; returns the task's Fisher sampler."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0 (e.g. 1e-2), got {damping!r}.")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in problem.model.modules()):
        raise ValueError(
            "kronfluence only tracks nn.Linear and nn.Conv2d modules; "
            f"{type(problem.model).__name__} has none."
        )
    sampler = _sampler(problem.task)
    if sampler is None and strategy != "identity" and not empirical_fisher:
        raise ValueError(
            f"kronfluence_scores cannot sample targets for {problem.task!r} (true Fisher); "
            "pass empirical_fisher=True or use a pbrf.tasks task."
        )
    return sampler


def _make_task(KTask, task: T.Task, sampler, seed: int):
    """The kronfluence ``Task``: summed task losses; sampled targets for the true Fisher (one
    generator per device, seeded by ``seed``).
    """
    gen: dict[torch.device, torch.Generator] = {}

    class _Task(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            f = model(x)
            if not sample:
                return task.loss(f, t).sum()
            draw, scale = sampler
            if f.device not in gen:
                gen[f.device] = torch.Generator(device=f.device).manual_seed(seed)
            with torch.no_grad():
                t_hat = draw(f.detach(), gen[f.device])
            return scale(f) * task.loss(f, t_hat).sum()

        def compute_measurement(self, batch, model):
            x, t = batch
            return task.loss(model(x), t).sum()

    return _Task()


def _reset_device_state(State, device: torch.device) -> None:
    """kronfluence keeps its device in a process-wide singleton: re-create it if the problem's
    device kind differs from the one it was created for.
    """
    want_cpu = device.type != "cuda"
    shared = State._shared_state
    if shared and (shared.get("cpu") != want_cpu or shared.get("num_processes", 1) != 1):
        State._reset_state()


def _pairwise_scores(kron, problem: Problem, ktask, query, unique: Tensor, s: _Settings,
                     workdir) -> Tensor:
    """kronfluence's pairwise scores ``[n_test, len(unique)]`` of the query points against the
    training points ``unique`` (factors fitted on the whole training set), in a temporary
    directory that is always deleted.
    """
    # kronfluence swaps tracked modules on their parent, so a bare nn.Linear needs a container.
    model = kron.prepare_model(nn.Sequential(_model_at_theta(problem, s.dtype)), ktask)
    outdir = tempfile.mkdtemp(prefix="pbrf-kron-", dir=workdir)
    xt, tt = query
    try:
        with warnings.catch_warnings():
            # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler (disabled) on every pass; torch
            # deprecates it.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning
            )
            analyzer = kron.Analyzer(
                analysis_name="pbrf", model=model, task=ktask,
                cpu=problem.device.type != "cuda",
                log_level=logging.INFO if s.progress else logging.WARNING,
                disable_tqdm=not s.progress, output_dir=outdir, disable_model_save=True,
            )
            analyzer.fit_all_factors(
                factors_name="factors", dataset=TensorDataset(s.cast(problem.x), problem.t),
                per_device_batch_size=s.batch_size, factor_args=_factor_args(kron, s),
            )
            analyzer.compute_pairwise_scores(
                scores_name="scores", factors_name="factors",
                query_dataset=TensorDataset(s.cast(xt), tt),
                train_dataset=TensorDataset(s.cast(problem.x[unique]), problem.t[unique]),
                per_device_query_batch_size=min(s.batch_size, xt.shape[0]),
                per_device_train_batch_size=s.batch_size, score_args=_score_args(kron, s),
            )
            return analyzer.load_pairwise_scores("scores")["all_modules"]
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def _factor_args(kron, s: _Settings):
    """kronfluence's ``FactorArguments``: every statistic in the run's dtype, no example cap."""
    return kron.FactorArguments(
        strategy=s.strategy,
        use_empirical_fisher=s.empirical_fisher,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=s.dtype,
        gradient_covariance_dtype=s.dtype,
        per_sample_gradient_dtype=s.dtype,
        lambda_dtype=s.dtype,
        eigendecomposition_dtype=torch.float64,
    )


def _score_args(kron, s: _Settings):
    """kronfluence's ``ScoreArguments``: damping δ = wd + λ, everything in the run's dtype."""
    return kron.ScoreArguments(
        damping_factor=s.damping,
        query_gradient_svd_dtype=s.dtype,
        per_sample_gradient_dtype=s.dtype,
        precondition_dtype=s.dtype,
        score_dtype=s.dtype,
    )
