"""Ctrl-C and SIGTERM during training: a stop request the loop checks after each step (the
run then writes its checkpoint), and a launcher that passes them on to its spawned ranks.
(``fastvae.interrupts`` handles them everywhere else: exit at once, nothing half-written.)"""

from __future__ import annotations

import multiprocessing
import os
import signal


# What a launcher waiting for spawned ranks passes a Ctrl-C or SIGTERM on as: a stop request
# that never escalates, as a rank may get the user's signal too (Ctrl-C reaches the whole group)
FORWARDED_STOP = signal.SIGUSR1


class _SignalHandlers:
    """``self._handle`` for ``SIGNALS`` inside a with-block, the replaced handlers after it
    (main thread only: elsewhere signals are left alone)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopRequest(_SignalHandlers):
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag the loop checks after each step; a second
    signal goes to the handler this one replaced (on the command line: exit at once, see
    ``fastvae.interrupts``; in a program: ``KeyboardInterrupt``). ``FORWARDED_STOP`` (from a
    ``SignalsToRanks`` launcher) sets the flag only."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, FORWARDED_STOP)

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if not self.requested or signum == FORWARDED_STOP:
            self.requested = True
            return
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt


class SignalsToRanks(_SignalHandlers):
    """In a launcher that only waits for spawned ranks: Ctrl-C and SIGTERM are passed on to the
    ranks as ``FORWARDED_STOP`` (they stop together and write the checkpoint, see
    ``StopRequest``) and the launcher waits for them, instead of exiting while they write."""

    def _handle(self, signum, frame):
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, FORWARDED_STOP)
            except ProcessLookupError:
                pass
