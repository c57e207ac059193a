"""Pause points for the signal tests: stop a fastvae process at a known point, say so on stdout
(a line starting with ``PAUSED``) and wait for a line on stdin before going on.

A test starts the child, reads its stdout up to the PAUSED line (an event, not a sleep), sends
the signal it wants to test, then (for a child that survives the signal) writes a line to
release it. Two ways in:

* ``fastvae train --callback pause_points:PauseAtStep`` with ``PAUSE_AT_STEP=N`` in the
  environment: a Fabric callback, the trainer's own documented hook (no patching), that pauses
  rank 0 after optimizer step N.
* ``python tests/pause_points.py WHERE -- ARGS...`` runs ``fastvae ARGS`` with a pause at WHERE:
  ``import:MODULE`` while MODULE is first imported (its parent package half initialised),
  ``call:MODULE:FUNCTION`` before FUNCTION runs, or ``rename:NAME`` when a complete temporary
  file is about to be renamed over a file called NAME (``fastvae.run_folder.move_into_place``,
  which every writer goes through), or ``exit:`` in the interpreter's teardown, after the
  command and every other exit hook (an ``atexit`` hook registered first runs last). It runs
  the command as the ``fastvae`` console script does (``fastvae.cli.run``).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.abc
import os
import sys

PAUSED = "PAUSED"


def pause(where: str) -> None:
    """Say where this process stopped, then wait for a line on stdin."""
    print(f"{PAUSED} {where}", flush=True)
    sys.stdin.readline()


class PauseAtStep:
    """Fabric callback: pause rank 0 once step ``PAUSE_AT_STEP`` is done."""

    def __init__(self, step: int | None = None):
        self.step = int(os.environ["PAUSE_AT_STEP"]) if step is None else step

    def on_train_batch_end(self, trainer, batch):
        if trainer.rank == 0 and trainer.step == self.step:
            pause(f"step {trainer.step} (epoch {trainer.epoch + 1}, batch {batch})")


class PauseRankAtStart:
    """Fabric callback: rank 0 of spawned ranks (``--strategy ddp_spawn``: their stdin is
    closed) says PAUSED as training starts, before its first step, and waits for a signal."""

    def on_train_start(self, trainer):
        if trainer.rank == 0:
            import time

            print(f"{PAUSED} rank 0 before its first step", flush=True)
            # until a signal's handler ends the rank: short waits, not signal.pause(), which a
            # signal delivered to another of the rank's threads never ends
            while True:
                time.sleep(0.05)  # not synchronisation: a poll while waiting for the signal


class SignalAtStep:
    """Fabric callback: send ``signum`` to this process on rank ``rank`` once step ``step`` is
    done (a launcher's SIGTERM that reaches one rank only). Made with no arguments (``fastvae
    train --callback``): ``SIGNAL_RANK``, ``SIGNAL_AT_STEP`` and ``SIGNAL_NUM`` from the environment."""

    def __init__(self, rank: int | None = None, step: int | None = None, signum: int | None = None):
        self.rank = int(os.environ["SIGNAL_RANK"]) if rank is None else rank
        self.step = int(os.environ["SIGNAL_AT_STEP"]) if step is None else step
        self.signum = int(os.environ.get("SIGNAL_NUM", 15)) if signum is None else signum

    def on_train_batch_end(self, trainer, batch):
        if trainer.rank == self.rank and trainer.step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalLauncherAtStep:
    """Fabric callback: rank 0 sends SIGTERM to its parent, the launcher of spawned ranks
    (``--strategy ddp_spawn``), once step ``SIGNAL_AT_STEP`` is done (``kill LAUNCHER_PID``)."""

    def __init__(self):
        self.step = int(os.environ["SIGNAL_AT_STEP"])

    def on_train_batch_end(self, trainer, batch):
        if trainer.rank == 0 and trainer.step == self.step:
            os.kill(os.getppid(), 15)


class LimitFileSizeAtStep:
    """Fabric callback: once step ``LIMIT_AT_STEP`` is done, files that rank 0 writes cannot
    grow past ``LIMIT_BYTES`` (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full
    disk), in that rank's process only."""

    def __init__(self):
        self.step = int(os.environ["LIMIT_AT_STEP"])
        self.limit = int(os.environ["LIMIT_BYTES"])

    def on_train_batch_end(self, trainer, batch):
        if trainer.rank == 0 and trainer.step == self.step:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


class ThreadPoolAtStart:
    """Starts a thread pool and keeps it, as torch inductor's compile pool does (a cold
    ``--compile``): its idle worker is not a daemon thread."""

    def on_train_start(self, trainer):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1)
        self.pool.submit(print, "pool started").result()


class _PauseOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            sys.meta_path.remove(self)
            pause(f"import {fullname}")
        return None  # the usual finders import it


def _pause_before(module_name: str, attr: str, when=lambda *args, **kwargs: True) -> None:
    module = importlib.import_module(module_name)
    original = getattr(module, attr)

    @functools.wraps(original)
    def paused(*args, **kwargs):
        if when(*args, **kwargs):
            pause(f"{module_name}.{attr}")
        return original(*args, **kwargs)

    setattr(module, attr, paused)


def install(where: str) -> None:
    kind, _, target = where.partition(":")
    if kind == "import":
        sys.meta_path.insert(0, _PauseOnImport(target))
    elif kind == "call":
        _pause_before(*target.rsplit(":", 1))
    elif kind == "exit":
        atexit.register(pause, "exit")
    elif kind == "rename":
        _pause_before("fastvae.run_folder", "move_into_place",
                      when=lambda tmp, final: os.path.basename(final) == target)
    else:
        raise SystemExit(f"unknown pause point {where!r}")


if __name__ == "__main__":
    where, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: pause_points.py WHERE -- ARGS..."
    install(where)
    from fastvae.cli import run

    sys.argv = ["fastvae", *args]
    run()
