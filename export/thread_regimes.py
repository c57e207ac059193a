"""One onnxruntime session per latency regime: 1 intra-op thread for small calls, all cores for
large ones, and the batch size where the sampler switches, measured on the decoder itself.

Why: splitting a small call over worker threads costs more (waking them, handing them work,
waiting for the slowest) than it saves. Measured on the 2-core dev CPU (p50 per call,
1 thread vs 2): the digits MLP decoder (~2 us per row on one thread) 44 vs 52-67 us at batch 8
and 166 vs 128-158 us at batch 64; the digits conv decoder (~16 us per row) 98 vs 86-114 us at
batch 4 and 171 vs 125-167 us at batch 8. Both cross where one thread needs about
``PARALLEL_ABOVE_US`` for the call, so the switch is placed there: ``parallel_from`` rows =
``PARALLEL_ABOVE_US`` / (measured single-thread time per row).

Torch-free.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

PARALLEL_ABOVE_US = 100.0
_CALIBRATION_ROWS = (1, 33)  # far apart: the slope stands well above timing noise
_CALIBRATION_RUNS = 9


class ThreadRegimes:
    """``session_for(rows)``: the session to run a call of ``rows`` latent vectors on.

    ``make_session(threads)`` builds a session (``threads`` None: onnxruntime's default, one per
    physical core). With ``threads`` given, or ``tuned`` False (non-CPU providers), there is one
    session for every batch size. Otherwise a 1-thread session and a default-threads session,
    and ``parallel_from`` (rows) measured with the 1-thread one on zeros shaped (rows,
    ``*latent_shape``) when the sampler is built (a few milliseconds; the weights are held twice).
    """

    def __init__(self, make_session, latent_shape: tuple[int, ...], input_name: str, output_name: str,
                 threads: int | None = None, tuned: bool = True):
        self.small = make_session(threads if threads is not None or not tuned else 1)
        self.large = self.small
        self.parallel_from = math.inf  # rows; inf: never switch
        self.per_row_us: float | None = None
        if threads is None and tuned:
            from fastvae.config import usable_cpus

            usable = usable_cpus()  # under taskset, a cpuset or a CPU quota: fewer than the machine's
            if usable > 1:
                # onnxruntime's own choice (None) counts the machine's cores
                self.large = make_session(None if usable >= (os.cpu_count() or 1) else usable)
                self._calibrate(latent_shape, input_name, output_name)

    def _calibrate(self, latent_shape: tuple[int, ...], input_name: str, output_name: str) -> None:
        """Single-thread time per row: the slope between calls of 1 and 33 rows, timed in
        alternation (a disturbance from other processes hits both alike), the least disturbed
        (min) of 9 runs each. Where noise still hides the slope, the 33-row call's time per row
        (overhead included: an upper bound)."""
        small, big = _CALIBRATION_ROWS
        zs = {rows: np.zeros((rows, *latent_shape), dtype=np.float32) for rows in _CALIBRATION_ROWS}
        runs: dict[int, list[float]] = {small: [], big: []}

        def timed(rows):
            start = time.perf_counter()
            self.small.run([output_name], {input_name: zs[rows]})
            runs[rows].append((time.perf_counter() - start) * 1e6)

        self.small.run([output_name], {input_name: zs[small]})  # warm-up: first-run allocations
        for _ in range(2):
            timed(small)
        if min(runs[small]) >= PARALLEL_ABOVE_US:  # one row is heavy enough (a spatial decoder)
            self.per_row_us, self.parallel_from = min(runs[small]), 1
            return
        self.small.run([output_name], {input_name: zs[big]})
        for _ in range(_CALIBRATION_RUNS):
            timed(small)
            timed(big)
        t0, t1 = min(runs[small]), min(runs[big])
        slope = (t1 - t0) / (big - small)
        self.per_row_us = slope if slope > 0 else t1 / big
        self.parallel_from = 1 if t0 >= PARALLEL_ABOVE_US else max(2, round(PARALLEL_ABOVE_US / self.per_row_us))

    def session_for(self, rows: int):
        return self.large if rows >= self.parallel_from else self.small

    def threads_for(self, rows: int) -> int | None:
        """Intra-op threads a call of ``rows`` runs with (None: onnxruntime's default)."""
        threads = self.session_for(rows).get_session_options().intra_op_num_threads
        return threads or None

    @property
    def sessions(self) -> tuple:
        return (self.small,) if self.large is self.small else (self.small, self.large)
