"""Probes of a run's heavy operations at small sizes, extrapolated to the run's sizes (the
measurements of ``pbrf run --dry-run``, :mod:`pbrf.experiment.run.dryrun`).

An operation's size is ``(rows, examples)``: stacked models or directions (rows), each over a
number of training examples. Its wall time and its peak memory grow linearly in
``rows · examples`` (plus, for the time, a part per call). :func:`probe` measures the operation
at growing sizes — the examples doubled from :data:`START_EXAMPLES` up to the run's, then the
rows doubled from :data:`START_ROWS` up to the run's — and stops as soon as two sizes are
measured and the last one took :data:`ENOUGH_SECONDS` (its time grown with the size) or
:data:`ENOUGH_BYTES`, well above the measurements' noise (a probe costs at most about twice
that), or at the run's own size, or after :data:`BUDGET_SECONDS` (a busy machine).
:class:`Probe` reads the measurements at the run's size.

The first size is called once to warm up (tracing, lazy initialisation: what a run pays once);
each size is then called :data:`REPEATS` times (up to :data:`MAX_REPEATS` if cheap): the best
wall time of its calls, and the largest peak resident memory above the call's start of those
after the warm-up (sampled every :data:`SAMPLE_INTERVAL` seconds, as
:class:`pbrf.estimators.MemoryMeter` does; CUDA's peak allocation on a GPU).
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from pbrf.estimators import MemoryMeter, proc_bytes

__all__ = ["Point", "Probe", "probe", "resident_bytes", "process_peak_bytes", "START_ROWS",
           "START_EXAMPLES", "ENOUGH_SECONDS", "ENOUGH_BYTES", "REPEATS"]

#: The first size probed: this many rows (or the run's, if fewer) ...
START_ROWS = 2
#: ... over this many examples (or the run's, if fewer).
START_EXAMPLES = 8
#: A probe stops growing once a call takes this long ...
ENOUGH_SECONDS = 0.2
#: ... (and GROWTH times as long as the previous size's call), or this much memory above its
#: start (and two sizes are measured).
ENOUGH_BYTES = 256 * 2**20
GROWTH = 1.5
#: A probe stops growing, whatever it measured, once it has taken this long (with two sizes).
BUDGET_SECONDS = 3.0
#: Measured calls per size (the first size's after one warm-up call, which is timed too) ...
REPEATS = 1
#: ... and up to this many while a call takes under CHEAP_SECONDS (the best time is kept: on a
#: busy machine, a short call's time varies several-fold).
MAX_REPEATS = 3
CHEAP_SECONDS = 0.05
#: Seconds between two samples of the resident memory.
SAMPLE_INTERVAL = 0.002


@dataclass(frozen=True)
class Point:
    """One measured size: best wall time and largest peak memory of a call."""

    rows: int
    examples: int
    seconds: float
    peak_bytes: int

    @property
    def units(self) -> int:
        """``rows · examples``."""
        return self.rows * self.examples


@dataclass(frozen=True)
class Probe:
    """An operation measured at growing sizes (``points``), read at any size.

    Time: a line through the last two points, ``a + b · rows · examples`` per call (``a ≥ 0``,
    the part of a call that does not grow, e.g. Python's): through the last point, no steeper than
    proportional to it, and proportional when there is one point or the times do not grow (a
    noisy machine). Memory: the last (largest) point's, in
    proportion to ``rows · examples``. That is an upper estimate where the probe's tensors were
    small: the allocator keeps some freed blocks of moderate size (resident memory 1.5–2 times the
    live tensors' at a few tens of MB per tensor, closer at hundreds), and a line through two such
    points swings with which blocks it kept.
    """

    points: tuple[Point, ...]
    #: the operation loops over its rows: its memory is that of one row at a time
    looped: bool = False

    def seconds(self, rows: int, examples: int) -> float:
        """Wall time of one call at ``(rows, examples)``."""
        last, units = self.points[-1], rows * examples
        slope = last.seconds / last.units  # proportional: the steepest a line through 0 allows
        if len(self.points) > 1:
            first = self.points[-2]
            rise = (last.seconds - first.seconds) / max(last.units - first.units, 1)
            slope = min(rise, slope) if rise > 0 else slope
        return last.seconds + slope * (units - last.units)

    def pass_seconds(self, rows: int, examples: int, chunk: int) -> float:
        """Wall time of a pass over ``examples`` in calls of at most ``chunk`` examples."""
        full, rest = divmod(examples, chunk)
        return full * self.seconds(rows, chunk) + (self.seconds(rows, rest) if rest else 0.0)

    def peak_bytes(self, rows: int, examples: int) -> int:
        """Peak memory above the call's start at ``(rows, examples)``."""
        last = self.points[-1]
        if self.looped:  # one row at a time, whatever the rows
            return int(last.peak_bytes * examples / last.examples)
        return int(last.peak_bytes * rows * examples / last.units)

    def to_dict(self) -> dict:
        """The measured points, as stored in the dry run's dict."""
        return {"points": [asdict(p) for p in self.points], "looped": self.looped}


def probe(op: Callable[[int, int], object], rows: int, examples: int,
          device: torch.device | str = "cpu") -> Probe:
    """``op(r, e)`` measured at growing sizes up to ``(rows, examples)`` (module docstring)."""
    r, e = min(rows, START_ROWS), min(examples, START_EXAMPLES)
    started = time.perf_counter()
    points = [_measure(op, r, e, device, warm_up=True)]
    while (r, e) != (rows, examples) and not _enough(points):
        if len(points) >= 2 and time.perf_counter() - started >= BUDGET_SECONDS:
            break  # a busy machine: calls that should be short are not
        if e < examples:
            e = min(2 * e, examples)
        else:
            r = min(2 * r, rows)
        points.append(_measure(op, r, e, device))
    return Probe(tuple(points))


def _enough(points: list[Point]) -> bool:
    """Whether the last size's cost is well above the noise: :data:`ENOUGH_BYTES`, or
    :data:`ENOUGH_SECONDS` in a call that took :data:`GROWTH` times the previous size's (so the
    work that grows with the size shows, not a fixed cost or a busy machine's stall).
    """
    if len(points) < 2:
        return False
    last, before = points[-1], points[-2]
    return last.peak_bytes >= ENOUGH_BYTES or (last.seconds >= ENOUGH_SECONDS
                                               and last.seconds >= GROWTH * before.seconds)


def _measure(op: Callable[[int, int], object], rows: int, examples: int, device,
             warm_up: bool = False) -> Point:
    """``op(rows, examples)`` called :data:`REPEATS` times, more (up to :data:`MAX_REPEATS`) while
    its calls take under :data:`CHEAP_SECONDS`, after a warm-up call if ``warm_up``: the best wall
    time of all the calls and the largest peak memory of the measured ones.
    """
    times, peak = [], 0
    while len(times) < int(warm_up) + REPEATS or (
            len(times) < int(warm_up) + MAX_REPEATS and min(times) < CHEAP_SECONDS):
        with _PeakMeter(torch.device(device)) as meter:
            start = time.perf_counter()
            op(rows, examples)
            meter.synchronize()
            times.append(time.perf_counter() - start)
        peak = max(peak, meter.peak) if len(times) > int(warm_up) else peak
    return Point(rows, examples, min(times), peak)


class _PeakMeter:
    """Peak memory of a block above its start, as :class:`pbrf.estimators.MemoryMeter` measures
    it (CUDA's peak allocation, else the resident set sampled by a thread), without its garbage
    collection on entry (tens of milliseconds, paid on every measured call of a probe; the
    operations free their tensors by reference counting).
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self._stop = threading.Event()
        self._cuda = MemoryMeter(device) if device.type == "cuda" else None

    def synchronize(self) -> None:
        """Wait for the device (a CUDA call returns before its kernels end)."""
        if self._cuda is not None:
            torch.cuda.synchronize(self.device)

    def _sample(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, (MemoryMeter.rss() or base) - base)
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> _PeakMeter:
        if self._cuda is not None:
            self._cuda.__enter__()
            return self
        _trim()
        self._thread = threading.Thread(target=self._sample, args=(MemoryMeter.rss() or 0,),
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda is not None:
            self._cuda.__exit__(*exc)
            self.peak = int(self._cuda.peak or 0)
            return
        self._stop.set()
        self._thread.join()


def _trim() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``), so that growth shows."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """This process's resident memory once freed memory is returned to the system (0 if
    unreadable).
    """
    gc.collect()
    _trim()
    return MemoryMeter.rss() or 0


def process_peak_bytes() -> int:
    """The largest resident memory this process has had so far: ``VmHWM`` (Linux ``/proc``), else
    ``ru_maxrss`` (which Linux carries over an ``exec``: a process started from a large one
    reports the parent's size).
    """
    hwm = proc_bytes("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
