"""tqdm progress bars that leave multiprocessing's start method to the program.

tqdm's default write lock holds a ``multiprocessing.RLock``, whose creation fixes the default
context: after one bar, a program's ``multiprocessing.set_start_method("spawn")`` raised
"context has already been set". fastvae's bars are drawn by one process only (rank 0, a
prepare's parent), so they take a thread lock; the multiprocessing lock that tqdm's
``process_map`` hands its workers (the lock's ``mp_lock``) is made when it asks for it, in the
start method the program has chosen by then.
"""

import threading


class _WriteLock:
    """tqdm's write lock (``acquire``/``release``, a context manager) for one process's bars,
    with tqdm's ``mp_lock`` member made on first use."""

    def __init__(self):
        self._thread = threading.RLock()
        self._process = None

    @property
    def mp_lock(self):
        if self._process is None:
            import multiprocessing

            self._process = multiprocessing.RLock()
        return self._process

    def acquire(self, *args, **kwargs):
        return self._thread.acquire(*args, **kwargs)

    def release(self):
        self._thread.release()

    def __enter__(self):
        self.acquire()

    def __exit__(self, *exc):
        self.release()


def progress_bar(*args, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)``, its class given ``_WriteLock`` if it has no lock yet."""
    from tqdm.auto import tqdm

    if not hasattr(tqdm, "_lock"):  # tqdm.get_lock() would create the multiprocessing lock now
        tqdm.set_lock(_WriteLock())
    return tqdm(*args, **kwargs)
