"""fastvae's models, data and exported graphs are float32, whatever default dtype a program
gave torch: ``torch.set_default_dtype(torch.float64)`` made ``train``, ``sample`` and
``export_decoder`` fail inside ``F.linear`` ("mat1 and mat2 must have the same dtype"), after
``overwrite=True`` had cleared the run folder. The public entry points run under float32 and
give the program its default back."""

from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def float32_default():
    """Inside the block torch's default dtype is float32; the caller's comes back after."""
    import torch  # here: the torch-free export modules import this one

    previous = torch.get_default_dtype()
    if previous == torch.float32:
        yield
        return
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def float32_by_default(function):
    """``function`` run under ``float32_default``."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with float32_default():
            return function(*args, **kwargs)
    return wrapped
