"""The wait for the other ranks to join, watched: a note when it is long, and Ctrl-C/SIGTERM
end it at once.

A rank joins its process group inside torch (``init_process_group``), which waits up to 30
minutes for ranks that never come - a node whose command failed before joining - and holds the
main thread meanwhile: Python runs no signal handler there, so the command said nothing and a
SIGTERM (a scheduler's, a user's ``kill``) did nothing until a SIGKILL. A thread watches the
wait: the signals reach it through ``signal.set_wakeup_fd`` (written by the C-level handler,
whatever the main thread is doing), and it prints one note after ``JOIN_NOTE_S``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time

JOIN_NOTE_S = 60.0  # seconds of waiting before the note (FASTVAE_JOIN_NOTE_S overrides it)


_active: dict = {}  # the watch of this process's join, while it runs


@contextlib.contextmanager
def watched_join(world_size: int, what: str = "fastvae train"):
    """Around the call that joins this process to ``world_size`` ranks (Fabric's launch; its
    function calls ``joined()`` first). Acts only in the command line's main thread, whose
    Ctrl-C/SIGTERM end the command (``fastvae.interrupts.exit_now``), on POSIX (Windows needs
    sockets for the wakeup fd), and only until the process group exists."""
    from fastvae import interrupts

    if (world_size < 2 or sys.platform == "win32" or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not interrupts.exit_now):
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)  # set_wakeup_fd's rule: a full pipe drops bytes, never blocks
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(read, done, world_size, what), daemon=True,
                               name="fastvae-rendezvous-watch")
    _active.update(previous=signal.set_wakeup_fd(write, warn_on_full_buffer=False), done=done, watcher=watcher,
                   fds=(read, write))
    watcher.start()
    try:
        yield
    finally:
        joined()


def joined() -> None:
    """End the watch (main thread): the process group exists, or the launch is over. Called
    first thing in the launched function, so training runs with the program's own wakeup fd
    and its loader workers inherit no pipe of the watch's."""
    if not _active:
        return
    _active["done"].set()
    _active["watcher"].join()
    signal.set_wakeup_fd(_active["previous"])
    for fd in _active["fds"]:
        os.close(fd)
    _active.clear()


def _watch(read: int, done: threading.Event, world_size: int, what: str) -> None:
    import torch.distributed as dist

    def joining() -> bool:
        return not done.is_set() and not (dist.is_available() and dist.is_initialized())

    note_at = time.monotonic() + float(os.environ.get("FASTVAE_JOIN_NOTE_S", JOIN_NOTE_S))
    noted = False
    while joining():
        if select.select([read], [], [], 0.25)[0]:
            signum = os.read(read, 1)
            # joined meanwhile: the main thread's handler has the signal (a stop request in training)
            if signum and signum[0] in (signal.SIGINT, signal.SIGTERM) and joining():
                from fastvae.interrupts import exit_now

                exit_now(signum[0])  # the main thread cannot: it is inside torch
        if not noted and time.monotonic() >= note_at:
            noted = True
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            print(f"{what}: waiting for the other ranks to join ({world_size} in all, rendezvous at {address}): "
                  "is every node's command running? (Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)
