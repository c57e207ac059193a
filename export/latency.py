"""Latency of repeated calls: p50/p99 per call and items per second, with the standard library.

Torch-free; used by ``fastvae bench-sampler`` and the benchmark suites' own-process workers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Latency:
    """Per-call latency of ``calls`` timed calls of ``items`` items each (seconds)."""

    items: int
    calls: int
    p50: float
    p99: float
    mean: float

    @property
    def items_per_s(self) -> float:
        """Items per second at the mean call time (what back-to-back calls deliver)."""
        return self.items / self.mean if self.mean > 0 else float("inf")

    @property
    def tail_ratio(self) -> float:
        return self.p99 / self.p50 if self.p50 > 0 else float("inf")


def percentile(sorted_values, q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values``, nearest rank."""
    if not sorted_values:
        raise ValueError("no values")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def measure(fn, items: int, *, seconds: float = 1.0, min_calls: int = 20, max_calls: int = 100_000,
            warmup: int = 10) -> Latency:
    """Call ``fn()`` ``warmup`` times, then time calls for about ``seconds`` (at least
    ``min_calls``, at most ``max_calls``) and return their :class:`Latency`."""
    for _ in range(warmup):
        fn()
    times = []
    clock = time.perf_counter
    deadline = clock() + seconds
    while len(times) < max_calls and (len(times) < min_calls or clock() < deadline):
        start = clock()
        fn()
        times.append(clock() - start)
    total = sum(times)
    times.sort()
    return Latency(items, len(times), percentile(times, 0.50), percentile(times, 0.99), total / len(times))
