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
# set (to the launcher's pid) while ``--strategy ddp_spawn`` starts its ranks: each rank's first
# import of fastvae then calls ``hold_rank_signals`` (see fastvae/__init__.py)
RANK_OF_ENV = "FASTVAE_RANK_OF"


def hold_rank_signals() -> None:
    """In a spawned rank, from its first import of fastvae: outside training (set-up, imports,
    pictures, teardown) Ctrl-C and the launcher's forwarded stop end the rank at once, quietly,
    with status 130, which its launcher reports as ``interrupted`` (they were Python's traceback
    and SIGUSR1's default: a rank "ended by SIGUSR1", advice to --resume a run that had none).
    Inside training ``StopRequest`` holds them; SIGTERM keeps its default (torch's launcher
    ends the other ranks with it when one fails). Main thread only."""
    from fastvae.interrupts import exit_quietly, own

    own()
    try:
        for sig in (signal.SIGINT, FORWARDED_STOP):
            signal.signal(sig, exit_quietly)
    except ValueError:  # not the main thread
        pass


class _SignalHandlers:
    """``self._handle`` for ``SIGNALS`` inside a with-block, the replaced handlers after it
    (main thread only: elsewhere signals are left alone)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        global _deferred
        _deferred = None  # a run that failed before delivering its own: not this run's signal
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


# a signal whose replaced handler was the default action (a program's SIGTERM: end the
# process), delivered again once training has written its checkpoint and returned
_deferred: int | None = None


def _defer_if_default(signum: int, previous) -> None:
    global _deferred
    if previous == signal.SIG_DFL and signum != FORWARDED_STOP:
        _deferred = signum


def _escalate(signum: int, frame, previous) -> None:
    """A second signal: the handler it replaced runs now (the default action too)."""
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise KeyboardInterrupt


def deliver_deferred() -> None:
    """Deliver the stop signal whose default action training held back (a program that never
    handled SIGTERM ends by it, as it would have, after the checkpoint); nothing otherwise."""
    global _deferred
    signum, _deferred = _deferred, None
    if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


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
            _defer_if_default(signum, self._previous.get(signum))
            return
        _escalate(signum, frame, self._previous.get(signum))


class SignalsToRanks(_SignalHandlers):
    """In a launcher that only waits for spawned ranks: Ctrl-C and SIGTERM are passed on to the
    ranks as ``FORWARDED_STOP`` (they stop together and write the checkpoint, see
    ``StopRequest``) and the launcher waits for them, instead of exiting while they write."""

    def _handle(self, signum, frame):
        _defer_if_default(signum, self._previous.get(signum))
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, FORWARDED_STOP)
            except ProcessLookupError:
                pass
