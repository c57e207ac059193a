"""Tile sizes and warps of the fused reparameterize+KL kernels, measured: data for tuning.

    python benchmarks/gpu/tile_sweep.py OUT.json [--budget-s 90] [--smoke]

For each shape (B, D, dtype) and kernel (forward, backward), times the launch at tiles of
BLOCK_B x BLOCK_D = 1024, 2048 and 4096 elements and 4 or 8 warps with ``triton.testing.do_bench``
(``return_mode="median"``; its L2 flush made a read, a sum as ``common.L2Flush`` does, where triton lets it be
replaced: its own writes 256 MB, leaving dirty lines to be written back inside the timed call;
``l2_flush`` in the JSON says which) and converts to GB/s of **each kernel's own traffic**
(``common.reparam_kl_kernel_bytes``; ``bytes`` in each row: fwd reads mu, logvar and writes z,
kl: 3 B x D + 4B; bwd reads mu, logvar, grad_z, grad_kl and writes grad_mu, grad_logvar:
5 B x D + 4B; the two together are the device benchmark's ``kernel_bytes``, not its ``bytes``,
the op's required 6 B x D + 8B). Writes every measurement, the best
configuration per shape and kernel, and its gain over the shipped default (the launcher's
tile for that row width, 4 warps). Stops starting new shapes when the budget is spent and still
writes the JSON (``complete``: false, ``stopped_before``: the shape); the widest rows come first (the 2026-11-27 H200 run never reached them; since
the 2026-11-30 rewrite they take two rows of 1024 per program, the sweep says whether that beats one).

``--smoke`` (no GPU; run under TRITON_INTERPRET=1): one tiny shape and two configurations,
timed with the wall clock, to check that the script works. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import device_info, reparam_kl_kernel_bytes  # noqa: E402

SHAPES = [(65536, 4096), (65536, 1024), (65536, 64), (65536, 256)]
DTYPES = ["bf16", "fp32"]
TILES = [1024, 2048, 4096]  # larger tiles lost everywhere in the 2026-11-27 H200 sweep
WARPS = [4, 8]
DEFAULT_WARPS = 4


def traffic_bytes(kernel: str, B: int, D: int, itemsize: int) -> int:
    """The kernel's own DRAM traffic (``fwd`` | ``bwd``): ``common.reparam_kl_kernel_bytes``."""
    return reparam_kl_kernel_bytes(B, D, itemsize, kernel)


@contextlib.contextmanager
def reading_l2_flush():
    """While inside, ``triton.testing.do_bench`` flushes L2 by reading its 256 MB buffer (a sum
    into a preallocated output) instead of zeroing it; yields ``"read"``, or ``"write (triton's
    own)"`` where this triton has no ``clear_cache`` hook to replace."""
    try:
        from triton import runtime

        active = runtime.driver.active
    except Exception:  # noqa: BLE001 - no driver: nothing to patch
        yield "write (triton's own)"
        return
    if not callable(getattr(active, "clear_cache", None)):
        yield "write (triton's own)"
        return
    sinks: dict = {}

    def clear_cache(cache):
        import torch

        sink = sinks.get(cache.device)
        if sink is None:
            sink = sinks[cache.device] = torch.empty((), dtype=torch.int64, device=cache.device)
        torch.sum(cache.view(-1), dim=0, out=sink)

    had_own = "clear_cache" in vars(active)
    previous = vars(active).get("clear_cache")
    active.clear_cache = clear_cache
    try:
        yield "read"
    finally:
        if had_own:
            active.clear_cache = previous
        else:
            del active.clear_cache


class _BudgetSpent(Exception):
    """The sweep's --budget-s is spent: no new shape is started."""


def configs(D: int, smoke: bool):
    """Tiles x warps for rows of D; ``default`` marks what the launcher picks itself."""
    from fastvae.kernels.reparam_kl import _block_sizes, gpu_tile

    _, block_d = _block_sizes(1, D)  # the launcher's own rule for BLOCK_D; only the tile varies
    tiles, warps = ([TILES[0], TILES[2]], [DEFAULT_WARPS]) if smoke else (TILES, WARPS)
    for tile in tiles:
        if tile < block_d:
            continue
        for num_warps in warps:
            yield {"tile": tile, "block_b": tile // block_d, "block_d": block_d, "num_warps": num_warps,
                   "default": tile == gpu_tile(block_d) and num_warps == DEFAULT_WARPS}


def timer(smoke: bool):
    if not smoke:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=100, return_mode="median")

    def wall_ms(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall_ms


def sweep_shape(K, measure, device, B, D, name, dtype, smoke, results, best) -> None:
    """Time every configuration of both kernels at one (B, D, dtype) into ``results``/``best``;
    a configuration that fails (e.g. out of resources) is recorded with its error."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    mu = torch.randn(B, D, device=device, generator=g).to(dtype)
    logvar = (0.1 * torch.randn(B, D, device=device, generator=g)).to(dtype)
    gz = torch.randn(B, D, device=device, generator=g).to(dtype)
    gkl = torch.randn(B, device=device, generator=g)
    for kernel in ("fwd", "bwd"):
        moved = traffic_bytes(kernel, B, D, mu.element_size())
        for cfg in configs(D, smoke):
            blocks = {"block_b": cfg["block_b"], "block_d": cfg["block_d"], "num_warps": cfg["num_warps"]}
            if kernel == "fwd":
                fn = lambda: K._forward_triton(mu, logvar, 1234, **blocks)  # noqa: E731
            else:
                fn = lambda: K._backward_triton(mu, logvar, 1234, gz, gkl, **blocks)  # noqa: E731
            key = f"{kernel} B={B} D={D} {name}"
            try:
                ms = float(measure(fn))
            except Exception as exc:  # noqa: BLE001 - one configuration, not the sweep
                results.append({"B": B, "D": D, "dtype": name, "kernel": kernel, **cfg,
                                "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"{key:28s} tile {cfg['tile']:>5} warps {cfg['num_warps']}: failed ({type(exc).__name__})")
                continue
            row = {"B": B, "D": D, "dtype": name, "kernel": kernel, **cfg, "ms": ms, "bytes": moved,
                   "GBps": moved / ms / 1e6}
            results.append(row)
            if key not in best or ms < best[key]["ms"]:
                best[key] = row
            print(f"{key:28s} tile {cfg['tile']:>5} warps {cfg['num_warps']}: "
                  f"{ms * 1e3:9.1f} us  {row['GBps']:8.1f} GB/s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=90.0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from fastvae.kernels import reparam_kl as K

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("tile_sweep: no CUDA device; use --smoke (with TRITON_INTERPRET=1) to test the script")
        return 2
    shapes = [(64, 8)] if args.smoke else SHAPES
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    measure = timer(args.smoke)
    started, results, best = time.perf_counter(), [], {}
    from fastvae.kernels.reparam_kl import TILE_GPU, TILE_GPU_WIDE

    default = {"tile": TILE_GPU, "tile_rows_over_256": TILE_GPU_WIDE, "num_warps": DEFAULT_WARPS}
    info = device_info()
    state = {"complete": False, "stopped_before": None, "l2_flush": "none (smoke: wall clock)" if args.smoke else None}

    def write() -> None:  # after every shape: a cut at the step's cap keeps what was measured
        for key, row in best.items():
            base = next((r for r in results if f"{r['kernel']} B={r['B']} D={r['D']} {r['dtype']}" == key
                         and r["default"] and "ms" in r), None)
            row["gain_over_default"] = base["ms"] / row["ms"] if base else None
        report = {"info": info, "smoke": args.smoke, "complete": state["complete"],
                  "stopped_before": state["stopped_before"], "timing": "median" if not args.smoke else "wall clock",
                  "l2_flush": state["l2_flush"],
                  "bytes_count": "each kernel's own traffic (common.reparam_kl_kernel_bytes: fwd 3 B x D + 4B, "
                                 "bwd 5 B x D + 4B)",
                  "default": default, "results": results, "best": best}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)

    flush = contextlib.nullcontext(state["l2_flush"]) if args.smoke else reading_l2_flush()
    try:
        with flush as how:
            state["l2_flush"] = how
            for B, D in shapes:
                for name in (["fp32"] if args.smoke else DTYPES):
                    state["stopped_before"] = f"B={B} D={D} {name}"
                    if time.perf_counter() - started > args.budget_s:
                        print(f"tile_sweep: budget of {args.budget_s:.0f} s spent; stopping before B={B} D={D} {name}")
                        raise _BudgetSpent
                    sweep_shape(K, measure, device, B, D, name, dtypes[name], args.smoke, results, best)
                    write()
            state["complete"], state["stopped_before"] = True, None
    except _BudgetSpent:  # the budget: what was measured is written, marked partial
        pass
    except KeyboardInterrupt:  # the step's cap: what was measured is written, marked partial
        print("tile_sweep: interrupted; keeping the measurements so far")
    write()
    print(f"tile_sweep: {len(results)} measurements -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
