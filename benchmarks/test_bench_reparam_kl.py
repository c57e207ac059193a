"""Benchmark: fused Triton reparameterize + KL vs eager torch vs torch.compile of the same math.

Modes: ``fwd`` (z, kl) and ``fwd_bwd`` (plus dmu, dlogvar via ``torch.autograd.grad``, so no
``.grad`` accumulation traffic). Eager and compiled variants draw ``eps = randn_like(mu)`` and
let autograd keep it, the usual way; the fused op is called with ``seed=None``, drawing its seed
per call as a training step does, and regenerates eps in its backward.

GPU: B in {4096, 65536} x D in {64, 256, 1024} x {fp32, bf16} (marked ``gpu``). Each timed call
runs the op ``repeat`` times and then synchronizes: wall-clock time, host and device together
(``benchmarks/reparam_kl_device.py`` measures device time apart, from CUDA-graph replays with
the L2 flushed, and host time apart: device-time bandwidth figures come from there).
``extra_info`` holds ``bandwidth_GBps`` (the bytes one call must move, ``common.reparam_kl_bytes``,
the acceptance count, over the median time), ``kernel_bytes`` and ``kernel_bandwidth_GBps`` (the
fused kernels' own traffic, ``common.reparam_kl_kernel_bytes``: the backward re-reads mu and
logvar), ``copy_bandwidth_GBps`` (a torch copy of the same bytes timed the same way: wall clock
over ``repeat`` back-to-back copies and a sync, median of rounds; ``copy_clock``: ``"wall"``),
``bandwidth_fraction_of_copy`` (both wall clock) and ``peak_memory_MB``
(``torch.cuda.max_memory_allocated`` of one call, inputs included). ``host_bound``: true where
the time per call does not grow with the bytes (under 1.5x the same implementation's, pass's,
D's and dtype's time at the smallest B, for 16x the bytes): the wall clock measures the host
path there, so such records carry no bandwidth fractions.

CPU: tiny sizes, eager vs compile only (the kernel under Triton's interpreter says nothing
about speed). With ``--benchmark-disable`` or ``FASTVAE_BENCH_SMOKE=1`` on a CPU this is a smoke
test: compile uses the ``aot_eager`` backend (Inductor's C++ build takes ~25 s on 2 cores) and
the fused op runs once only if the interpreter is on (TRITON_INTERPRET=1 before import).
"""

import functools
import statistics
import time

import pytest
import torch
from common import (bench_device, on_gpu, peak_bandwidth_gbps, reparam_kl_bytes, reparam_kl_eager,
                    reparam_kl_kernel_bytes, smoke_mode)

import fastvae.kernels as fk
from fastvae.kernels import reparameterize_kl

SMOKE = smoke_mode()
ON_GPU = on_gpu()
DEVICE = bench_device()
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

if ON_GPU:
    _sizes = [(4096, 64)] if SMOKE else [(b, d) for b in (4096, 65536) for d in (64, 256, 1024)]
    _dtypes = [torch.float32] if SMOKE else [torch.float32, torch.bfloat16]
    CASES = [pytest.param(b, d, t, marks=pytest.mark.gpu, id=f"B{b}-D{d}-{DTYPE_NAMES[t]}")
             for (b, d) in _sizes for t in _dtypes]
else:
    _sizes = [(64, 16)] if SMOKE else [(4096, 64)]
    CASES = [pytest.param(b, d, torch.float32, id=f"B{b}-D{d}-fp32") for (b, d) in _sizes]


def _many_graphs():
    """One compiled function serves every case: let Dynamo keep a graph per (D, dtype, mode)
    (the default limit is 8 per function), for this suite only."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: 64})


torch_math = reparam_kl_eager  # eps = randn_like(mu), kept by autograd


def fused(mu, logvar):
    return reparameterize_kl(mu, logvar, seed=None)  # a seed drawn per call, as in training


_compiled = {}


def compiled(backend):
    if backend not in _compiled:
        # dynamic=False: a kernel specialised to each (B, D), as reparam_kl_device.py compiles
        # it (the default recompiled the second shape with symbolic sizes: every case after the
        # first timed a generic kernel, a weaker baseline)
        _compiled[backend] = torch.compile(torch_math, backend=backend, dynamic=False)
    return _compiled[backend]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(nbytes, repeat=1, rounds=20):
    """Bandwidth of a plain device copy moving ``nbytes`` (read + write), timed as the op is:
    wall clock over ``repeat`` back-to-back copies and a sync, median over rounds (after 3
    warm-up rounds). The op's wall-clock time over this: one clock for both."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for i in range(rounds + 3):
        _sync()
        start = time.perf_counter()
        for _ in range(repeat):
            dst.copy_(src)
        _sync()
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - start) / repeat)
    return 2 * src.numel() / statistics.median(times) / 1e9


# per-call seconds of finished records, and their extra_info, by (impl, mode, D, dtype): B
_per_call: dict = {}
HOST_BOUND_GROWTH = 1.5  # 16x the bytes in under 1.5x the time: the host path, not the bytes


def mark_host_bound(key, B, per_call, info) -> None:
    """Compare with the records of the same key at other batch sizes: the larger of two whose
    time per call grew less than HOST_BOUND_GROWTH is host-bound (and so is the smaller one
    then); such records lose their bandwidth fractions (they would describe the host path)."""
    seen = _per_call.setdefault(key, {})
    seen[B] = (per_call, info)
    smallest = min(seen)
    if smallest == B:  # the reference came now: decide every larger one already measured
        targets = [b for b in seen if b != B]
    else:
        targets = [B]
    for b in targets:
        large_time, large_info = seen[b]
        small_time, small_info = seen[smallest]
        bound = large_time < HOST_BOUND_GROWTH * small_time
        large_info["host_bound"] = bound
        if bound:
            small_info["host_bound"] = True
            for i in (large_info, small_info):
                for field in ("bandwidth_fraction", "bandwidth_fraction_of_copy"):
                    i.pop(field, None)


def peak_memory_mb(fn):
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("B,D,dtype", CASES)
# fwd_bwd runs first: if gpu/run.sh's time cap cuts the suite short, it is the case that matters
@pytest.mark.parametrize("mode", ["fwd_bwd", "fwd"])
def test_reparam_kl(benchmark, mode, B, D, dtype, impl):
    smoke = SMOKE or benchmark.disabled
    backend = "inductor"
    if DEVICE.type == "cpu":
        if impl == "fused" and not (smoke and fk.kernel_available(DEVICE, dtype)):
            pytest.skip("fused kernel on CPU: interpreter timings mean nothing (smoke-run only)")
        if impl == "compile" and smoke:
            backend = "aot_eager"  # exercise Dynamo + AOTAutograd without a C++ build
    op = {"fused": fused, "eager": torch_math, "compile": compiled(backend)}[impl]

    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, D, generator=g).to(DEVICE, dtype).requires_grad_(mode == "fwd_bwd")
    logvar = 0.5 * torch.randn(B, D, generator=g)
    logvar = logvar.to(DEVICE, dtype).requires_grad_(mode == "fwd_bwd")
    if impl == "compile" and DEVICE.type == "cuda":
        torch._dynamo.mark_dynamic(mu, 0)  # one graph per (D, dtype, mode), any batch size
        torch._dynamo.mark_dynamic(logvar, 0)
    gz = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    gkl = torch.randn(B, generator=g).to(DEVICE)

    def once():
        z, kl = op(mu, logvar)
        if mode == "fwd_bwd":
            return torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
        return z, kl

    nbytes = reparam_kl_bytes(B, D, mu.element_size(), mode)
    kernel_nbytes = reparam_kl_kernel_bytes(B, D, mu.element_size(), mode)
    # Kernels shorter than ~50 us: time several calls per sync so launch/sync cost fades.
    repeat = 1 if DEVICE.type == "cpu" or nbytes > 2**28 else 10

    def run():
        for _ in range(repeat):
            out = once()
        _sync()
        return out

    benchmark.group = f"reparam_kl-{mode}"
    with _many_graphs():
        if not benchmark.disabled:
            run()  # Triton JIT / torch.compile warm-up
        benchmark(run)
        peak = peak_memory_mb(once) if DEVICE.type == "cuda" else None

    info = benchmark.extra_info
    info.update(impl=impl, baseline=impl == "eager", case=f"B={B},D={D},{DTYPE_NAMES[dtype]}",
                device=DEVICE.type, B=B, D=D, dtype=DTYPE_NAMES[dtype], mode=mode, repeat=repeat,
                items=B * repeat, bytes=nbytes * repeat, kernel_bytes=kernel_nbytes * repeat)
    if impl == "fused":
        info["seed"] = "per call"  # seed=None: drawn per call, as eager's randn_like draws eps
    if impl == "compile":
        info["compile_backend"] = backend
    if peak is not None:
        info["peak_memory_MB"], info["peak_extra_MB"] = (round(x, 3) for x in peak)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        per_call = median / repeat
        info["time_per_call_us"] = per_call * 1e6
        info["throughput"] = B / per_call
        info["bandwidth_GBps"] = nbytes / per_call / 1e9
        info["kernel_bandwidth_GBps"] = kernel_nbytes / per_call / 1e9
        if DEVICE.type == "cuda":
            copy = copy_bandwidth_gbps(nbytes, repeat)
            info["copy_bandwidth_GBps"] = copy
            info["copy_clock"] = "wall"
            info["bandwidth_fraction_of_copy"] = info["bandwidth_GBps"] / copy
            vendor_peak = peak_bandwidth_gbps()
            if vendor_peak:
                info["bandwidth_fraction"] = info["bandwidth_GBps"] / vendor_peak
        mark_host_bound((impl, mode, D, DTYPE_NAMES[dtype]), B, per_call, info)
