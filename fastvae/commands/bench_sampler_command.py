"""``fastvae bench-sampler``: p50/p99 latency per batch size and samples/s of a decoder here."""

from __future__ import annotations

import argparse

from fastvae.commands.onnx_runtime_flags import add_decoder_arguments

HELP = "measure an exported decoder's latency (p50/p99 per call) and samples/s on this machine"
DESCRIPTION = (
    "Time OnnxSampler.decode on z ~ N(0, I) at each batch size for about --seconds each (after a "
    "warm-up) and print one line per batch size: the intra-op threads it ran with, p50 and p99 "
    "latency per call, p99/p50 and samples per second. Torch-free."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_decoder_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,64,1000", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per batch size")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object (last line)")


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,64"`` -> [1, 8, 64]; FastVAEError for anything but positive integers."""
    from fastvae.errors import FastVAEError

    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise FastVAEError(f"--batch-sizes must be positive integers separated by commas, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    import json
    import math

    import numpy as np
    import onnxruntime as ort

    from fastvae.errors import FastVAEError
    from fastvae.export import OnnxSampler
    from fastvae.export.latency import measure
    from fastvae.export.providers import short_name

    sizes = parse_batch_sizes(args.batch_sizes)
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= 600):
        raise FastVAEError(f"--seconds must be more than 0 and at most 600, got {args.seconds}")
    sampler = OnnxSampler(args.model, threads=args.threads, providers=[args.provider])
    for batch in sizes:
        sampler.check_memory(batch, batch, sampler.latent_shape, "batch size")
    print(f"{sampler!r}\nonnxruntime {ort.__version__}, provider {short_name(sampler.provider)}")
    print(f"{'batch':>7} {'threads':>7} {'p50 us':>10} {'p99 us':>10} {'p99/p50':>7} {'samples/s':>12}")
    rows = []
    for batch in sizes:
        z = np.random.default_rng(batch).standard_normal((batch, *sampler.latent_shape), dtype=np.float32)
        stats = measure(lambda: sampler.decode(z, batch_size=batch), batch, seconds=args.seconds)
        threads = sampler.threads_for(batch)
        print(f"{batch:>7} {threads or 'all':>7} {stats.p50 * 1e6:>10.1f} {stats.p99 * 1e6:>10.1f} "
              f"{stats.tail_ratio:>7.2f} {stats.items_per_s:>12,.0f}")
        rows.append({"batch": batch, "threads": threads, "calls": stats.calls, "p50_us": stats.p50 * 1e6,
                     "p99_us": stats.p99 * 1e6, "samples_per_s": stats.items_per_s})
    if args.json:
        print(json.dumps({"model": str(args.model), "provider": short_name(sampler.provider), "results": rows}))
    return 0
