"""A stand-in for ``triton`` where it is not installed (macOS, Windows, a slim image): the
kernels' definitions import, none runs (``reparam_kl.kernel_available`` is False), and every
call of ``fastvae.kernels.reparameterize_kl`` takes the torch reference with the same seed
contract. Only what the modules touch at import time and in their host-side helpers."""

from __future__ import annotations

def jit(fn=None, **_options):
    """``@triton.jit`` and ``@triton.jit(...)``: the function as it is (never launched)."""
    return fn if fn is not None else (lambda f: f)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class language:  # noqa: N801 - stands for the module triton.language
    class constexpr:  # noqa: N801
        def __init__(self, value=None):
            self.value = value
