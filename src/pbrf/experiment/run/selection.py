"""Stage 2 of a run: the test points and the removal sets, and the seeds of every random choice.

Every random choice is seeded from the config (removal seed, train seed) and the chunk index
through :func:`chunk_seed`, never from global RNG state, so a resumed run and an uninterrupted one
end with the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

import pbrf
from pbrf.experiment.config import ConfigError, ExperimentConfig


# ---------------------------------------------------------------------------- seeds
def chunk_seed(base: int, chunk: int, stream: int = 0) -> int:
    """A 31-bit seed derived from ``(base, chunk, stream)`` only (no global RNG state)."""
    return int(np.random.SeedSequence([int(base) & 0xFFFFFFFF, int(chunk),
                                       int(stream)]).generate_state(1)[0] >> 1)


def choose_test_points(config: ExperimentConfig, n_available: int) -> np.ndarray:
    """Sorted indices of ``n_test_points`` test examples, seeded by ``removals.seed``."""
    n = config.removals.n_test_points
    if n > n_available:
        raise ConfigError(f"removals.n_test_points={n} exceeds the {n_available} test examples; "
                          "lower it.")
    rng = np.random.default_rng([config.removals.seed, 1])
    return np.sort(rng.choice(n_available, size=n, replace=False))


def random_groups(config: ExperimentConfig, n_train: int) -> list[list[int]]:
    """``n_removals`` random removal sets of the configured size, seeded by ``removals.seed``."""
    rc = config.removals
    k = rc.resolved_group_size(n_train)
    rng = np.random.default_rng([rc.seed, 2])
    if k == 1:
        _check_single_removals(rc.n_removals, n_train)
        return [[int(i)] for i in rng.choice(n_train, size=rc.n_removals, replace=False)]
    return [sorted(int(i) for i in rng.choice(n_train, size=k,
                                              replace=False)) for _ in range(rc.n_removals)]


def _check_single_removals(n_removals: int, n_train: int) -> None:
    """Single-point removal sets are distinct points: at most one per training point."""
    if n_removals > n_train:
        raise ConfigError(f"removals.n_removals={n_removals} exceeds the {n_train} training "
                          "points; lower it.")


def top_influence_groups(config: ExperimentConfig, scores: np.ndarray) -> list[list[int]]:
    """Removal sets with the largest influence (``scores`` ``[n_test, N]`` over all training
    points).

    Single points: the ``n_removals`` points of largest mean |score| over the test points.
    Groups of ``k``: removal ``r`` takes test point ``j = r mod n_test`` and, alternately, the
    ``k`` most positive or most negative scores on it (later rounds take the next ``k``).
    """
    rc = config.removals
    n_test, n_train = scores.shape
    k = rc.resolved_group_size(n_train)
    if k == 1:
        _check_single_removals(rc.n_removals, n_train)
        order = np.argsort(-np.abs(scores).mean(axis=0), kind="stable")
        return [[int(i)] for i in order[: rc.n_removals]]
    groups = []
    for r in range(rc.n_removals):
        j, rnd = r % n_test, r // n_test
        sign = 1.0 if rnd % 2 == 0 else -1.0
        block = rnd // 2
        order = np.argsort(-sign * scores[j], kind="stable")
        start = (block * k) % max(1, n_train - k + 1)
        groups.append(sorted(int(i) for i in order[start : start + k]))
    return groups


def all_train_scores(problem, config: ExperimentConfig, test: tuple) -> np.ndarray:
    """Influence of every single training point on every test point ``[n_test, N]`` (practical
    solver).

    ``scores[t, i] = (1/N) ∇m_tᵀ C⁻¹ ∇L_i``; positive means removing point ``i`` increases test loss
    ``t``.
    """
    inf = config.influence
    options = solver_options_for(inf.solver, inf.solver_options, config.removals.seed)
    scores = pbrf.influence(problem, test=test, removals=torch.arange(problem.n_train),
                            damping=inf.damping,
                            solver=inf.solver, curvature=inf.curvature, solver_options=options)
    return scores.detach().cpu().double().numpy()


def solver_options_for(solver: str, options: dict, seed: int) -> dict:
    """A solver's options; LiSSA's sampling seed defaults to ``seed``."""
    out = dict(options)
    if solver == "lissa":
        out.setdefault("seed", int(seed))
    return out


def groups_to_array(groups: list[list[int]]) -> np.ndarray:
    """Removal sets as one int array ``[n_removals, max size]``, padded with ``-1`` (stored)."""
    width = max(len(g) for g in groups)
    arr = np.full((len(groups), width), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        arr[i, : len(g)] = g
    return arr


def groups_from_array(arr: np.ndarray) -> list[list[int]]:
    """The removal sets of :func:`groups_to_array`'s array."""
    return [[int(i) for i in row if i >= 0] for row in arr]


def response_seed(config: ExperimentConfig) -> int:
    """The one seed of every response optimisation in a run (minibatch order, LiSSA sampling):
    identical for every removal whatever the chunk, so results do not depend on ``run.chunk_size``.
    ``responses.seed`` (default 0) selects its stream.
    """
    return chunk_seed(config.train.seed, 0, config.responses.seed)
