"""Ctrl-C and SIGTERM on the command line: one line, exit status 130, no half-written file.

``handled(prog)`` wraps everything ``fastvae`` does: inside it both signals call ``exit_now``, which removes the temporary files registered with ``removed_on_exit``, prints
``PROG: interrupted`` and ends the process at once with status 130 (``os._exit``). The
``fastvae`` command also ``install``s them for the rest of the process: its teardown too.

Exiting at once is safe because every file fastvae writes goes through
``fastvae.run_folder.atomic_write`` (a temporary file beside the target, renamed over it only
when complete and registered here meanwhile): an interrupted write leaves the old file or none.
It is also the only clean way out of an interrupted import: a ``KeyboardInterrupt`` raised while
numpy or scikit-learn is half imported leaves broken modules behind, whose errors then replace
the one-line message with a long traceback.

Training wants more than that: its own handlers (``fastvae.stop_signals.StopRequest``) finish the
current step and write a checkpoint, and a second signal goes to the handler they replaced
(``exit_now`` on the command line). Library users who never call ``install`` keep Python's
default (``KeyboardInterrupt``). Torch-free, like the rest of what the sampler CLI imports.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

EXIT_STATUS = 130  # 128 + SIGINT, what shells report for a Ctrl-C
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_prog = "fastvae"
_temporary: list[Path] = []  # files and folders to remove if the process is stopped now
_owner: int | None = None  # the process whose handlers these are (forked children inherit them)
# the thread that exits: a signal may reach the main thread's handler and a watching thread
# (fastvae.rendezvous_watch) at once; re-entrant, as a second signal may interrupt the first exit
_exiting = threading.RLock()


@contextmanager
def handled(prog: str = "fastvae") -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM call ``exit_now``; the previous handlers come back
    after it (so a program that calls ``fastvae.cli.main`` keeps its own). Main thread only;
    elsewhere the block runs with the handlers it has."""
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        install(prog)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def install(prog: str = "fastvae") -> None:
    """From now on, for the rest of the process, SIGINT and SIGTERM call ``exit_now``: the
    ``fastvae`` command keeps them through the interpreter's teardown, where Python's own
    handler printed a KeyboardInterrupt traceback from an exit hook (loader workers, trackers)
    or ended the process by SIGINT itself. Main thread only."""
    global _prog, _owner
    _prog, _owner = prog, os.getpid()
    for sig in SIGNALS:
        signal.signal(sig, exit_now)


def name(prog: str) -> None:
    """The program name ``exit_now`` prints (e.g. ``fastvae train`` once the command is known)."""
    global _prog
    _prog = prog


def exit_now(signum=None, frame=None, *, quiet: bool = False) -> None:
    """Remove the registered temporary files, print one line (not if ``quiet``), exit with
    status 130.

    In a forked child signalled before it called ``in_worker_process`` (a pool's
    ``terminate()`` can come that early), only end that child: the temporary files and the
    message are the parent's."""
    if _owner is not None and os.getpid() != _owner:
        os._exit(EXIT_STATUS)
    if not _exiting.acquire(blocking=False):  # another thread is ending the process
        threading.Event().wait()
    for path in list(_temporary):
        _remove(path)
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a signal inside a write: the line below still goes out
        pass
    if not quiet:
        os.write(2, f"{_prog}: interrupted\n".encode())
    os._exit(EXIT_STATUS)


def exit_quietly(signum=None, frame=None) -> None:
    """``exit_now`` without the line: in a spawned rank, whose launcher says it (the ranks'
    exit status 130 becomes ``fastvae train: interrupted`` there). Call ``own`` first."""
    exit_now(signum, frame, quiet=True)


def own() -> None:
    """This process's temporary files are its own to remove on a signal (a spawned rank's;
    not the children it forks)."""
    global _owner
    _owner = os.getpid()


def in_worker_process(*, parent_stops: bool = False) -> None:
    """Call first in a forked worker process (prepare's decoders, DataLoader workers): Ctrl-C
    is the parent's to handle (a terminal sends it to the whole group), SIGTERM ends the worker
    quietly, and the parent's temporary files are not the worker's to remove. The worker ends
    with its parent: ``exit_now`` leaves at once (``os._exit``, no pool shutdown) and a parent
    may be SIGKILLed; a pool worker waiting for tasks would otherwise live on, orphaned.

    ``parent_stops`` (a training's DataLoader workers): a SIGTERM from anyone but the parent is
    the parent's to handle too (``_term_from_parent_only``). Schedulers signal a job's every
    process (torchrun's killpg, SLURM's time limit): a worker that died of it failed the
    trainer's step (torch's worker watch raised) before the checkpoint the stop request writes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _temporary.clear()
    if parent_stops:
        _term_from_parent_only()
    _end_with_parent()


def _term_from_parent_only() -> None:
    """SIGTERM ends this worker only when its parent sends it (torch's and multiprocessing's
    ``terminate()``) or has ended (the PR_SET_PDEATHSIG below): SIGTERM is blocked and one
    thread takes each, reading its sender. Where there is no sigwaitinfo (macOS), SIGTERM ends
    the worker whoever sends it, as before. A program the worker starts inherits the blocked
    SIGTERM (signal masks survive exec): unblock it there (fastvae's loaders start none)."""
    import multiprocessing

    if not hasattr(signal, "sigwaitinfo"):
        return
    ppid = os.getppid()
    # the process that started this one (a fork server is the parent of its workers otherwise)
    parent = getattr(multiprocessing.parent_process(), "pid", None) or ppid
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def watch() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == parent or os.getppid() != ppid or not _alive(parent):
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="fastvae-sigterm-watch", daemon=True).start()


def _end_with_parent() -> None:
    """SIGTERM to this process when its parent ends (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    import multiprocessing

    parent = multiprocessing.parent_process()  # None outside multiprocessing's children
    if not sys.platform.startswith("linux") or parent is None:
        return
    ppid = os.getppid()
    if ppid != parent.pid:  # started by a fork server (its child, not the parent's), or orphaned already
        if not _alive(parent.pid):
            os._exit(0)
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    # the parent ended before the call above: nothing will signal us. Compared with the real
    # parent's pid, not 1: fastvae may itself be pid 1 (a container), and a subreaper adopts
    # orphans under its own pid
    if os.getppid() != ppid:
        os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


@contextmanager
def removed_on_exit(path: str | os.PathLike) -> Iterator[Path]:
    """Register ``path`` (a file or folder) for removal by ``exit_now`` while the block runs."""
    path = Path(path)
    _temporary.append(path)
    try:
        yield path
    finally:
        _temporary.remove(path)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
