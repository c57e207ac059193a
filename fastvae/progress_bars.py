"""tqdm progress bars that leave multiprocessing's start method to the program.

tqdm's default write lock holds a ``multiprocessing.RLock``, whose creation fixes the default
context: after one bar, a program's ``multiprocessing.set_start_method("spawn")`` raised
"context has already been set". fastvae's bars are drawn by one process only (rank 0, a
prepare's parent), so a thread lock is all they need.
"""

import threading


def progress_bar(*args, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)``, its class given a thread lock if it has none yet."""
    from tqdm.auto import tqdm

    if not hasattr(tqdm, "_lock"):  # tqdm.get_lock() would create the multiprocessing lock
        tqdm.set_lock(threading.RLock())
    return tqdm(*args, **kwargs)
