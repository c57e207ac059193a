"""Cached launches of compiled Triton kernels: Triton's generic JIT path once per key, then direct.

``kernel[grid](*args)`` goes through ``JITFunction.run`` on every call: it binds the arguments,
computes their specialization (which ints are 1 or multiples of 16, which pointers are 16-byte
aligned, which ints need 64 bits), hashes that into a cache key, looks the compiled kernel up,
builds launch metadata and only then calls the compiled kernel's launcher. With a dozen
arguments that is ~10 us of host time per launch on a GPU host, more than the kernel itself
takes at small sizes.

``LaunchCache.launch(kernel, key, args, plan, device)`` does that work once per ``key``: the
first launch works out grid and constexprs (``plan()``), goes through ``kernel[grid](...)``
(compiling if needed) and keeps the ``CompiledKernel`` it returns with them; later launches with
the same key call its launcher directly, exactly as ``JITFunction.run`` does:

    compiled.run(grid0, grid1, grid2, stream, compiled.function, compiled.packed_metadata,
                 launch_metadata, enter_hook, exit_hook, *all_arguments_in_signature_order)

The caller's ``key`` must determine Triton's specialization of ``args``: it holds every int
argument's value (or at least whether it is 1, a multiple of 16 and fits 32 bits), each tensor
argument's dtype and 16-byte alignment, the constexprs and the device. Shapes held in the key
also make the grid a constant of the entry ("precomputed grid").

The direct call is used only where this triton's own ``JITFunction.run`` launches with that same
call (``direct_launch_supported()`` reads its source once: triton 3.6 .. 3.9 do) and no launch
hook is set (profilers add one; then every launch takes the generic path, which calls it): with
none, passing None for the hooks and the launch metadata does what triton's empty hook chains do. In
the interpreter, or where the check fails, every launch is ``kernel[grid](...)``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Hashable

import torch

try:
    import triton
except ImportError:  # no kernel runs (fastvae.kernels._no_triton): nothing is launched here
    from fastvae.kernels import _no_triton as triton

# JITFunction.run's launch call, as written in triton 3.6 .. 3.9 (python/triton/runtime/jit.py).
_TRITON_LAUNCH = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,"
                  " launch_metadata,")


@functools.lru_cache(maxsize=1)
def direct_launch_supported() -> bool:
    """True where this triton's ``JITFunction.run`` launches with the call replayed here."""
    try:
        from triton.runtime.jit import JITFunction

        source = " ".join(inspect.getsource(JITFunction.run).split())
    except (ImportError, OSError, TypeError, AttributeError):
        return False
    return _TRITON_LAUNCH in source and _runtime_knobs() is not None


_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def _runtime_knobs():
    knobs = getattr(triton, "knobs", None)
    return getattr(knobs, "runtime", None)


def _hooked(hook) -> bool:
    """Whether a launch hook would do anything: triton 3.6+ keeps a ``HookChain`` (empty unless
    a profiler added a hook) where older versions keep None or a function."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return not isinstance(calls, list) or bool(calls)


def _direct_launcher(compiled, grid: tuple, constexprs: dict) -> "tuple | None":
    """(run, grid0, grid1, grid2, function, packed_metadata, constexpr values) for a direct
    launch of ``compiled`` (what ``kernel[grid](...)`` returned), or None where that does not
    look like triton's CompiledKernel (the interpreter returns None)."""
    if compiled is None or not direct_launch_supported():
        return None
    try:
        run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None
    if function is None or packed is None or not callable(run):
        return None
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    return run, g0, g1, g2, function, packed, tuple(constexprs.values())


class _Entry:
    """What a key's first launch worked out: grid, constexprs, warps, and the direct launcher
    (None where launches take the generic path)."""

    __slots__ = ("grid", "constexprs", "num_warps", "direct")

    def __init__(self, grid, constexprs, num_warps, direct):
        self.grid, self.constexprs, self.num_warps, self.direct = grid, constexprs, num_warps, direct


class LaunchCache:
    """Per-process launch plans, one per caller key (see the module docstring).

    ``stream_of(device_index)`` gives the current raw CUDA stream (triton's own getter, looked
    up at the first direct launch). Host-time benchmarks on a CPU put entries with a stub
    launcher in ``entries`` to time everything but the launch itself.
    """

    max_entries = 4096  # shapes x dtypes x flags; a process that sees more starts over

    def __init__(self) -> None:
        self.entries: dict[Hashable, _Entry] = {}
        self.stream_of: "Callable[[int], int] | None" = None

    def launch(self, kernel, key: Hashable, args: tuple, plan: Callable[[], tuple],
               device_index: int) -> None:
        """``kernel[grid](*args, **constexprs, num_warps=num_warps)`` with ``(grid, constexprs,
        num_warps) = plan()`` worked out the first time ``key`` is seen; after that a direct
        launch where possible. ``args``: the kernel's non-constexpr parameters in signature
        order; ``constexprs``: the rest, in signature order (constexpr parameters come last).
        ``device_index``: the tensors' CUDA device (-1: CPU, the interpreter); no device guard
        when it is the current device."""
        entry = self.entries.get(key)
        if entry is not None and entry.direct is not None and device_index == _current_device():
            knobs = _runtime_knobs()
            if not (_hooked(knobs.launch_enter_hook) or _hooked(knobs.launch_exit_hook)):
                run, g0, g1, g2, function, packed, constexprs = entry.direct
                stream = self.stream_of(device_index)
                # launch metadata and hooks None: what JITFunction.run passes without hooks
                run(g0, g1, g2, stream, function, packed, None, None, None, *args, *constexprs)
                return
        if device_index >= 0 and device_index != _current_device():
            with torch.cuda.device(device_index):  # Triton launches on the current device
                return self._generic(kernel, key, entry, args, plan)
        return self._generic(kernel, key, entry, args, plan)

    def _generic(self, kernel, key, entry, args, plan) -> None:
        if entry is not None:
            kernel[entry.grid](*args, **entry.constexprs, num_warps=entry.num_warps)
            return
        grid, constexprs, num_warps = plan()
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
        direct = _direct_launcher(compiled, grid, constexprs)
        if direct is not None and self.stream_of is None:
            from triton.runtime import driver

            self.stream_of = driver.active.get_current_stream
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key] = _Entry(grid, constexprs, num_warps, direct)

    def clear(self) -> None:
        self.entries.clear()
