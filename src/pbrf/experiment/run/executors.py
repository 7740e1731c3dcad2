"""Executors: who computes the (chunk, kind) tasks of a run.

An executor has one method, ``run(ctx, tasks)``, yielding
:class:`~pbrf.experiment.run.store.ChunkResult`
objects as they finish (in any order); the driver writes each to the store in its own transaction.

* :class:`LocalExecutor` (default) computes in this process and never imports ray.
* :class:`RayExecutor` runs the tasks on Ray actors, one per CPU. Each actor rebuilds the context
  from the run directory once (``config.json`` + θ^s checkpoint + stored removal sets, see
  :func:`pbrf.experiment.run.context.load_context`) and returns the arrays; only the driver writes.
  With ``--ray-address`` the workers must see the run directory at the same path (a shared
  filesystem) and have pbrf installed; workers inherit ``PBRF_DATA`` on a local Ray instance.

The numbers do not depend on the executor beyond floating-point round-off (Ray workers run
torch with one thread each): every seed is derived from the config and the chunk index.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

from pbrf.experiment.run.chunks import compute_chunk
from pbrf.experiment.run.context import load_context
from pbrf.experiment.run.store import ChunkResult

__all__ = ["LocalExecutor", "RayExecutor", "get_executor", "check_reachable"]

#: Seconds to wait for a TCP connection to ``--ray-address`` before giving up.
CONNECT_TIMEOUT = 10.0

log = logging.getLogger(__name__)


class LocalExecutor:
    """Compute every task in this process, in order."""

    name = "local"

    def run(self, ctx, tasks: list[tuple[int, str]]) -> Iterator[ChunkResult]:
        """Yield the result of each ``(chunk, kind)`` task."""
        for chunk, kind in tasks:
            yield compute_chunk(ctx, chunk, kind)

    def close(self) -> None:
        """Nothing to release."""


class _Worker:
    """Ray actor: the context of one run directory, built once, and the tasks computed on it."""

    def __init__(self, run_dir: str) -> None:
        self.ctx = load_context(run_dir)

    def compute(self, chunk: int, kind: str) -> ChunkResult:
        return compute_chunk(self.ctx, chunk, kind)


class RayExecutor:
    """Run tasks on Ray actors (one CPU each), at most ``max_in_flight`` actors at a time.

    Args:
        address: a Ray cluster address (``ray.init(address=...)``); ``None`` starts a local
            instance with ``num_cpus`` CPUs and no dashboard.
        num_cpus: CPUs of the local instance.
        max_in_flight: actors, hence tasks in flight (bounds driver memory); at most ``num_cpus``
            for a local instance.

    Raises:
        ImportError: ray is not installed (``pip install 'pbrf[ray]'``).
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int = 2,
                 max_in_flight: int = 8) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray  # noqa: PLC0415 - optional (pbrf[ray])

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            if address:
                check_reachable(address)
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            self.started = True
        self.worker = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)(_Worker)
        self.max_in_flight = max_in_flight if address else min(max_in_flight, num_cpus)

    def run(self, ctx, tasks: list[tuple[int, str]]) -> Iterator[ChunkResult]:
        """Submit the tasks and yield results as they complete."""
        run_dir = str(ctx.run_dir.resolve())
        queue = list(tasks)
        n_workers = max(1, min(self.max_in_flight, len(queue)))
        idle = [self.worker.remote(run_dir) for _ in range(n_workers)]
        pending: dict = {}
        try:
            while queue or pending:
                while queue and idle:
                    actor, (chunk, kind) = idle.pop(), queue.pop(0)
                    pending[actor.compute.remote(chunk, kind)] = actor
                ready, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    idle.append(pending.pop(ref))
                    yield self.ray.get(ref)
        finally:
            for actor in idle + list(pending.values()):
                self.ray.kill(actor)

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self.started:
            self.ray.shutdown()
            self.started = False


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast when nothing listens at a ``HOST:PORT`` / ``ray://HOST:PORT`` Ray address.

    ``ray.init`` retries a dead address for minutes without a word; a TCP connection attempt
    answers in at most ``timeout`` seconds. Other forms (``auto``, ``local``) are left to Ray.

    Raises:
        ConnectionError: one line naming the address, the cause and the fix.
    """
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    host = host.strip("[]") or "127.0.0.1"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConnectionError(
            f"cannot reach a Ray cluster at {address!r} ({reason}); start one there (`ray start "
            "--head`) "
            "or drop --ray-address to start a local Ray."
        ) from None


def get_executor(name: str, address: str | None = None):
    """``"local"`` or ``"ray"`` executor."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address)
    raise ValueError(f"unknown executor {name!r}; choose local or ray.")
