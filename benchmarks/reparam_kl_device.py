"""Fused reparameterize+KL vs eager torch vs torch.compile: device time apart from host time.

    python benchmarks/reparam_kl_device.py OUT.json [--budget-s 240] [--smoke] [--cpu]
           [--sizes 65536x64,4096x1024] [--dtypes fp32,bf16] [--impls fused,eager,compile]
           [--compile-dynamic batch|all|none]

Writes ``OUT.json`` (one object): ``gpu`` (or ``cpu``: the device's name),
``torch``, ``triton``, ``date``, ``commit``, ``smoke`` (tiny sizes / few calls: the figures
mean nothing, and ``report.py store`` refuses the file), ``calls``, ``rounds``, ``replays`` (how
much was timed), ``complete`` (false: the run stopped at ``--budget-s`` or was interrupted
before its last size; ``stopped_before`` names the size), ``compile_dynamic`` and ``records``,
a list of ``{B, D, dtype, impl, pass, device_us, host_us, e2e_us, bytes, kernel_bytes,
copy_gbps, frac_of_copy, kernel_frac_of_copy}``, one per implementation (``fused`` | ``eager``
| ``compile``), pass (``fwd`` | ``fwd_bwd``: forward, then ``torch.autograd.grad`` of z and kl)
and shape. It is rewritten after every record, so a run cut short keeps what it measured.
``benchmarks/report.py render`` turns it into a table and ``reparam_kl_device.png``.

On a GPU (B in {65536, 262144, 4096} x D in {64, 256, 1024, 4096} x {fp32, bf16}, the acceptance
sizes first):

* ``device_us``: median over replays of a CUDA graph holding one call, timed with CUDA events,
  with the L2 cache flushed before each replay by reading 256 MB (``common.L2Flush``: a write
  flush would leave dirty lines to be written back inside the timed replay). The fused op reads its seed
  from a device tensor made before capture (the CUDA-graph kernel variant; the ~2 us seed draw
  of a training step is not in it); eager and compile draw eps with ``randn_like``.
* ``host_us``: host (wall-clock) time per call while issuing 20 calls back to back, no graphs:
  what the Python, dispatch and launch path costs. ``e2e_us``: the same 20 calls up to the
  end of their GPU work, per call (host and device overlapping, as in a training loop). Both
  are medians over 7 rounds that alternate between the implementations on the same inputs, so
  the fused / eager ratios are measured side by side.
* ``bytes``: what the op must move at least, the count the acceptance is stated on
  (``common.reparam_kl_bytes``: each of mu, logvar, z, kl, grad_z, grad_kl, grad_mu,
  grad_logvar once: 3 B x D passes + 4B for fwd, 6 + 8B for fwd_bwd); ``copy_gbps``: a
  device-to-device copy of that many bytes (read + write) timed the same way; ``frac_of_copy`` =
  bytes / device time / copy bandwidth.
* ``kernel_bytes``: what the fused kernels themselves move (``common.reparam_kl_kernel_bytes``:
  the backward kernel reads mu and logvar again, 8 passes + 8B for fwd_bwd; = ``bytes`` for
  fwd); ``kernel_frac_of_copy`` = kernel_bytes / device time / copy bandwidth (the same copy).
* ``compile``: ``torch.compile`` (Inductor, default mode) of the eager math with the batch
  dimension dynamic (``mark_dynamic(mu, 0)``) and the latent size static, as the fused kernel is
  specialised per D: one compilation per D, dtype and pass (``--compile-dynamic all``: B and D
  symbolic, one per dtype and pass; ``none``: one per shape). Dynamo's recompile limit is
  raised to 256 for this script (16 graphs at the default sizes).

On a CPU (``--cpu``, or no CUDA) only host time means something: ``host_us`` is the thread CPU
time per call of the fused op's whole host path with the Triton launch itself stubbed out
(``reparam_kl.stubbed_launches``: seed draw, autograd.Function, output allocation, launch-plan
lookup, argument tuple; the launcher call, ~2-3 us on a GPU host, is the part left out) against
the eager torch math on the same tiny tensors (B = 8, where its CPU kernels cost little next to
their dispatch), measured in alternating rounds; device, e2e and copy fields are null. A CPU run
also writes ``host_floor``: in the same rounds, ``{B, D, dtype, pass, impl, host_us}`` for the
forward+backward pass (the forward alone skips autograd: no floor of this kind) of
``function-outputs-only`` (a ``torch.autograd.Function`` that only allocates the op's outputs:
autograd's own cost, which the fused op cannot go below) and ``fused-int-seed`` (the fused op
given an int seed: everything but the per-call seed draw).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from fastvae import run_folder  # noqa: E402

from common import (  # noqa: E402
    L2Flush, cpu_name, git_commit, reparam_kl_bytes, reparam_kl_eager, reparam_kl_kernel_bytes, smoke_mode)

# acceptance sizes first, B=4096 (the end-to-end and host claims) before the slow 262144: a
# run cut short by its budget keeps the claims' sizes
GPU_B = (65536, 4096, 262144)
GPU_D = (64, 256, 1024, 4096)
CPU_SIZES = ((8, 64), (8, 256))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("fused", "eager", "compile")
PASSES = ("fwd_bwd", "fwd")
HOST_ROUNDS = 7  # GPU host/e2e timing: rounds of 20 calls, alternating between the implementations
FLUSH_BYTES = 256 << 20  # more than any L2 (H100/H200: 50-60 MB), read before each replay
COMPILE_DYNAMIC = ("batch", "all", "none")  # --compile-dynamic: which sizes torch.compile keeps symbolic


def _versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def make_op(impl: str, dynamic: str = "batch"):
    """(mu, logvar) -> (z, kl) for one implementation. ``dynamic`` (compile only): ``batch``
    (static shapes but for the dimensions :func:`mark_batch_dynamic` marks: B symbolic, D
    specialised), ``all`` (B and D symbolic) or ``none`` (one graph per shape)."""
    if impl == "eager":
        return reparam_kl_eager
    if impl == "compile":
        if dynamic not in COMPILE_DYNAMIC:
            raise ValueError(f"dynamic must be one of {COMPILE_DYNAMIC}, got {dynamic!r}")
        # dynamic=False: no automatic dynamic shapes (a second D would turn D symbolic), while
        # the mark_dynamic'd batch dimension stays symbolic
        return torch.compile(reparam_kl_eager, dynamic=dynamic == "all")
    from fastvae.kernels import reparameterize_kl

    return reparameterize_kl


def make_inputs(B: int, D: int, dtype, device, grad: bool):
    g = torch.Generator(device=device).manual_seed(0)
    mu = torch.randn(B, D, device=device, generator=g).to(dtype).requires_grad_(grad)
    logvar = (0.5 * torch.randn(B, D, device=device, generator=g)).to(dtype).requires_grad_(grad)
    gz = torch.randn(B, D, device=device, generator=g).to(dtype)
    gkl = torch.randn(B, device=device, generator=g)
    return mu, logvar, gz, gkl


def mark_batch_dynamic(*tensors) -> None:
    """The batch dimension of the compiled op's inputs symbolic (``--compile-dynamic batch``)."""
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


def one_call(op, mode: str, mu, logvar, gz, gkl, **op_kwargs):
    """A no-argument callable: the op, and for ``fwd_bwd`` the gradients of z and kl."""
    if mode == "fwd":
        return lambda: op(mu, logvar, **op_kwargs)

    def fwd_bwd():
        z, kl = op(mu, logvar, **op_kwargs)
        return torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))

    return fwd_bwd


# --------------------------------------------------------------------------- GPU timing


def graph_device_us(fn, flush, replays: int) -> float:
    """Median microseconds of one CUDA-graph replay of ``fn``; ``flush()`` (a
    ``common.L2Flush``: it reads, so no dirty lines are left) runs before each, untimed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    graph.replay()  # first replay uploads the graph
    for start, end in events:
        flush()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3


def host_e2e_us(fns: dict, calls: int = 20, rounds: int = 7, sync=None) -> dict:
    """{name: (host, end-to-end)} microseconds per call of ``calls`` back-to-back calls of each
    callable: host = until the last call returned, e2e = until their GPU work finished
    (``sync``: ``torch.cuda.synchronize``); medians over ``rounds`` rounds that alternate
    between the callables, so that each ratio is measured side by side (the 2026-11-30 H200 run
    timed each implementation in rounds of its own: fused host time swung 170-460 us with no
    relation to size)."""
    sync = sync or torch.cuda.synchronize
    host = {k: [] for k in fns}
    e2e = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            host[key].append((t1 - t0) / calls * 1e6)
            e2e[key].append((t2 - t0) / calls * 1e6)
    return {k: (statistics.median(host[k]), statistics.median(e2e[k])) for k in fns}


_copy_cache: dict[int, float] = {}


COPY_CHUNK = 256 * 2**20  # bytes per side of one copy kernel in the chunked copy


def copy_gbps(nbytes: int, flush, replays: int) -> float:
    """Bandwidth (GB/s, read + write) of a device-to-device copy moving ``nbytes``: the better
    of one ``copy_`` of the whole buffer and the same bytes copied in ``COPY_CHUNK`` pieces
    (one graph). The reference must be the copy the device can do: on the H200 (2026-11-30)
    one uint8 copy_ of >= 3.2 GB ran at ~2.75 TB/s against ~4.27 TB/s at 1.6 GB, so the fused
    op, whose kernels moved their bytes at ~4.2 TB/s there, showed 104-158% "of copy"."""
    if nbytes not in _copy_cache:
        src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        whole = graph_device_us(lambda: dst.copy_(src), flush, replays)
        pieces = list(zip(dst.split(COPY_CHUNK), src.split(COPY_CHUNK)))

        def chunked():
            for d, s in pieces:
                d.copy_(s)

        us = min(whole, graph_device_us(chunked, flush, replays)) if len(pieces) > 1 else whole
        _copy_cache[nbytes] = 2 * src.numel() / (us * 1e-6) / 1e9
        del src, dst, pieces
    return _copy_cache[nbytes]


def gpu_shape(B, D, name, mode, impls, ops, flush, replays, compile_dynamic="batch") -> list[dict]:
    """The records of every implementation at one shape, dtype and pass, on the same inputs:
    device time per implementation, then host and e2e time of all of them in alternating
    rounds. Empty where the GPU lacks the memory."""
    dtype = DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    # eager fwd_bwd keeps ~16 tensors of B x D alive (inputs, eps, temporaries, grads)
    need = 18 * B * D * max(itemsize, 4)
    if need > 0.85 * torch.cuda.mem_get_info()[0]:
        print(f"  skip B={B} D={D} {name} {mode}: needs ~{need / 2**30:.0f} GiB", flush=True)
        return []
    mu, logvar, gz, gkl = make_inputs(B, D, dtype, "cuda", mode == "fwd_bwd")
    if "compile" in impls and compile_dynamic == "batch":
        mark_batch_dynamic(mu, logvar)  # the eager and fused ops ignore the mark
    device_us = {}
    for impl in impls:
        graph_kwargs = {"seed": torch.tensor(12345, device="cuda")} if impl == "fused" else {}
        device_us[impl] = graph_device_us(one_call(ops[impl], mode, mu, logvar, gz, gkl, **graph_kwargs),
                                          flush, replays)
        # the graph's private pool back to the device: a capture cannot free cached blocks, and
        # at B=262144 D=4096 eager's pool alone is ~40 GiB
        torch.cuda.empty_cache()
    host = host_e2e_us({impl: one_call(ops[impl], mode, mu, logvar, gz, gkl) for impl in impls},
                       rounds=HOST_ROUNDS)
    nbytes = reparam_kl_bytes(B, D, itemsize, mode)
    copy = copy_gbps(nbytes, flush, replays)
    del mu, logvar, gz, gkl
    torch.cuda.empty_cache()
    return [record(B, D, name, impl, mode, device_us=device_us[impl], host_us=host[impl][0],
                   e2e_us=host[impl][1], nbytes=nbytes,
                   kernel_nbytes=reparam_kl_kernel_bytes(B, D, itemsize, mode), copy=copy)
            for impl in impls]


# --------------------------------------------------------------------------- CPU timing


def cpu_host_us(fns: dict, calls: int, rounds: int) -> dict:
    """Thread CPU microseconds per call of each callable, rounds alternating between them."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            times[key].append((time.thread_time() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


class _OutputsOnly(torch.autograd.Function):
    """The host-time floor: an autograd.Function that allocates the fused op's outputs (z, kl;
    dmu, dlogvar) and does nothing else."""

    @staticmethod
    def forward(ctx, mu, logvar):
        ctx.save_for_backward(mu, logvar)
        return torch.empty_like(mu), mu.new_empty(mu.shape[0], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar = ctx.saved_tensors
        return torch.empty_like(mu), torch.empty_like(logvar)


FLOORS = {"function-outputs-only": lambda mu, logvar: _OutputsOnly.apply(mu, logvar),
          "fused-int-seed": lambda mu, logvar: make_op("fused")(mu, logvar, seed=12345)}


def cpu_cases(sizes, dtypes, impls, calls: int, rounds: int) -> tuple[list[dict], list[dict]]:
    """(records, host_floor) on the CPU; see the module docstring."""
    from fastvae.kernels import reparam_kl

    out, floor = [], []
    with reparam_kl.stubbed_launches():
        for B, D in sizes:
            for name in dtypes:
                for mode in PASSES:
                    mu, logvar, gz, gkl = make_inputs(B, D, DTYPES[name], "cpu", mode == "fwd_bwd")
                    fns = {impl: one_call(make_op(impl), mode, mu, logvar, gz, gkl) for impl in impls}
                    floors = FLOORS if "fused" in impls and mode == "fwd_bwd" else {}
                    if floors:
                        fns.update({k: one_call(op, mode, mu, logvar, gz, gkl) for k, op in floors.items()})
                    host = cpu_host_us(fns, calls, rounds)
                    itemsize = mu.element_size()
                    for impl in impls:
                        out.append(record(B, D, name, impl, mode, host_us=host[impl],
                                          nbytes=reparam_kl_bytes(B, D, itemsize, mode),
                                          kernel_nbytes=reparam_kl_kernel_bytes(B, D, itemsize, mode)))
                        print(_line(out[-1]), flush=True)
                    for impl in floors:
                        floor.append({"B": B, "D": D, "dtype": name, "pass": mode, "impl": impl,
                                      "host_us": _round(host[impl])})
                        print(f"B={B:>6} D={D:>4} {name} {mode:7} floor {impl}: host {host[impl]:7.1f} us", flush=True)
    return out, floor


# --------------------------------------------------------------------------- records


def record(B, D, dtype, impl, mode, *, host_us, nbytes, kernel_nbytes=None, device_us=None, e2e_us=None,
           copy=None):
    """One record; ``nbytes``: the op's required bytes (the acceptance count), ``kernel_nbytes``:
    the fused kernels' own traffic (default: ``nbytes``)."""
    kernel_nbytes = nbytes if kernel_nbytes is None else kernel_nbytes
    frac = kernel_frac = None
    if device_us is not None and copy is not None:
        frac = nbytes / (device_us * 1e-6) / 1e9 / copy
        kernel_frac = kernel_nbytes / (device_us * 1e-6) / 1e9 / copy
    return {"B": B, "D": D, "dtype": dtype, "impl": impl, "pass": mode,
            "device_us": _round(device_us), "host_us": _round(host_us), "e2e_us": _round(e2e_us),
            "bytes": nbytes, "kernel_bytes": kernel_nbytes, "copy_gbps": _round(copy),
            "frac_of_copy": _round(frac, 4), "kernel_frac_of_copy": _round(kernel_frac, 4)}


def _round(x, digits=2):
    return None if x is None else round(float(x), digits)


def _line(r: dict) -> str:
    dev = f"device {r['device_us']:9.1f} us  " if r["device_us"] is not None else ""
    frac = f"  {100 * r['frac_of_copy']:5.1f}% of copy" if r["frac_of_copy"] is not None else ""
    e2e = f"  e2e {r['e2e_us']:9.1f} us" if r["e2e_us"] is not None else ""
    return (f"B={r['B']:>6} D={r['D']:>4} {r['dtype']} {r['pass']:7} {r['impl']:7} "
            f"{dev}host {r['host_us']:7.1f} us{e2e}{frac}")


def write(path: Path, device_key: str, device_name: str, records: list[dict], *, smoke: bool,
          complete: bool, **extra) -> None:
    """The result object, written atomically; ``smoke``: a smoke run (report.py store refuses
    it); ``complete``: every size was measured; ``extra``: more top-level fields (``calls``,
    ``rounds``, ``replays``, ``stopped_before``, ``host_floor``)."""
    from datetime import datetime, timezone

    from common import device_info

    data = {device_key: device_name, **_versions(),
            "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "commit": git_commit()["id"], "smoke": bool(smoke), "complete": bool(complete),
            **{k: v for k, v in extra.items() if k != "host_floor"}, "records": records,
            **({"host_floor": extra["host_floor"]} if "host_floor" in extra else {}),
            # what the suites' files record too: CUDA, driver, git_dirty, the timing variables
            "machine": device_info()}
    run_folder.write_text(path, json.dumps(data, indent=1) + "\n")


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="start no new shape after this many seconds (GPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--cpu", action="store_true", help="host time on the CPU even with CUDA")
    parser.add_argument("--sizes", type=_parse_sizes, help="BxD,BxD,... (default: all)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--compile-dynamic", choices=COMPILE_DYNAMIC, default="batch",
                        help="torch.compile's symbolic sizes: batch (default: B symbolic, D specialised, "
                             "one graph per D, dtype and pass), all (B and D), none (one graph per shape)")
    parser.add_argument("--compile-static", action="store_true", help="the same as --compile-dynamic none")
    args = parser.parse_args(argv)
    smoke = args.smoke or smoke_mode()
    dtypes = [d for d in args.dtypes.split(",") if d]
    impls = [i for i in args.impls.split(",") if i]
    compile_dynamic = "none" if args.compile_static else args.compile_dynamic
    started = time.perf_counter()

    if args.cpu or not torch.cuda.is_available():
        torch.set_num_threads(1)
        impls = [i for i in impls if i != "compile"]  # Inductor's C++ path: not the GPU's
        sizes = args.sizes or (CPU_SIZES[:1] if smoke else CPU_SIZES)
        calls, rounds = (20, 2) if smoke else (2000, 9)
        records, floor = cpu_cases(sizes, dtypes[:1] if smoke else dtypes, impls, calls=calls, rounds=rounds)
        write(args.out, "cpu", cpu_name(), records, smoke=smoke, complete=True, calls=calls, rounds=rounds,
              replays=None, host_floor=floor)
        print(f"reparam_kl_device: {len(records)} CPU records -> {args.out}")
        return 0

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, 256)
    sizes = args.sizes or ([(4096, 64)] if smoke else [(B, D) for B in GPU_B for D in GPU_D])
    ops = {impl: make_op(impl, dynamic=compile_dynamic) for impl in impls}
    flush = L2Flush(FLUSH_BYTES, "cuda")
    replays = 3 if smoke else args.replays
    records: list[dict] = []
    name = torch.cuda.get_device_name()
    state = {"smoke": smoke, "calls": 20, "rounds": HOST_ROUNDS, "replays": replays, "compile_dynamic": compile_dynamic}
    stopped = None
    try:
        for B, D in sizes:
            if time.perf_counter() - started > args.budget_s:
                print(f"reparam_kl_device: budget of {args.budget_s:.0f} s spent; stopping before B={B} D={D}")
                stopped = f"B={B} D={D}"
                break
            stopped = f"B={B} D={D}"  # until this size is done: what an interruption cuts
            for dtype in dtypes:
                for mode in PASSES:
                    for r in gpu_shape(B, D, dtype, mode, impls, ops, flush, replays, compile_dynamic):
                        records.append(r)
                        print(_line(r), flush=True)
                    write(args.out, "gpu", name, records, complete=False, stopped_before=stopped, **state)
            stopped = None
    except KeyboardInterrupt:  # gpu/run.sh's cap (timeout -s INT): keep what was measured, marked partial
        print(f"reparam_kl_device: interrupted at {stopped}; keeping the {len(records)} records so far")
    write(args.out, "gpu", name, records, complete=stopped is None, stopped_before=stopped, **state)
    print(f"reparam_kl_device: {len(records)} records in {time.perf_counter() - started:.0f} s -> {args.out}"
          + ("" if stopped is None else f" (partial: stopped before {stopped})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
