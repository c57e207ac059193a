"""``fastvae sample``: samples from an exported decoder with onnxruntime (no torch import)."""

from __future__ import annotations

import argparse

from fastvae.commands import arg_types
from fastvae.commands.onnx_runtime_flags import PROVIDER_HELP

HELP = "draw samples from an exported decoder.onnx on the CPU (numpy + onnxruntime, no torch)"
DESCRIPTION = (
    "Draw n latent vectors z ~ N(0, I) with a seeded numpy generator, decode them with "
    "onnxruntime and write the means of p(x|z) as a PNG grid (image data) or a .npy array "
    "(n, C, H, W). The same seed gives the same samples whatever the batch size (an int8 "
    "decoder's move slightly with it: its activations are quantized per call)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="decoder .onnx file written by 'fastvae export'")
    parser.add_argument("-n", "--num-samples", type=arg_types.at_least(0), default=64, help="number of samples")
    parser.add_argument("--seed", type=arg_types.sampler_seed, default=0,
                        help="seed of the latent draws (0 to 2**128 - 1, as the service's /sample takes)")
    parser.add_argument("--out", type=arg_types.path, default="samples.png", help="output file: .png (image grid) or .npy (raw array)")
    parser.add_argument("--batch-size", type=arg_types.at_least(1),
                        help="latent vectors per onnxruntime call (default 1000; fewer for a spatial decoder, "
                             "whose working memory per call stays under 512 MiB)")
    parser.add_argument("--threads", type=arg_types.onnx_threads, help="onnxruntime intra-op threads; None: by batch size (measured rule)")
    parser.add_argument("--provider", default="cpu", help=PROVIDER_HELP)
    parser.add_argument(
        "--mode", choices=("mean", "sample"), default="mean",
        help="mean: E[x|z]; sample: also draw x ~ p(x|z) (Bernoulli pixels, Gaussian or Laplace noise)",
    )
    parser.add_argument("--nrow", type=int, help="images per row of the PNG grid; None: a square grid")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import numpy as np

    from fastvae.errors import FastVAEError
    from fastvae.export import OnnxSampler
    from fastvae.export.providers import short_name
    from fastvae.run_folder import write_npy

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".npy"):
        raise FastVAEError(f"--out must end in .png (image grid) or .npy (raw array), got {out.name!r}")
    if out.is_dir():
        raise FastVAEError(f"--out {out} is a folder: give a file name such as {out / 'samples.png'}")
    if args.nrow is not None and args.nrow < 1:
        raise FastVAEError(f"--nrow must be a positive integer, got {args.nrow}")
    if args.nrow is not None:  # more than -n: one row (a huge value overflowed numpy)
        args.nrow = min(args.nrow, max(1, args.num_samples))
    if args.nrow is not None and suffix != ".png":
        raise FastVAEError("--nrow lays out a PNG grid; a .npy file holds the array (n, C, H, W): drop --nrow")
    sampler = OnnxSampler(args.model, threads=args.threads, providers=[args.provider])
    shape = sampler.output_shape
    if suffix == ".png" and not (len(shape) == 3 and shape[0] in (1, 3) or len(shape) == 2):
        raise FastVAEError(
            f"{args.model} outputs shape {list(shape)}, not images (C=1 or 3, H, W): use --out with .npy"
        )
    if suffix == ".png" and args.num_samples < 1:
        raise FastVAEError(f"-n must be at least 1 for a PNG grid, got {args.num_samples}")

    start = time.perf_counter()
    samples = sampler.sample(args.num_samples, seed=args.seed, batch_size=args.batch_size, mode=args.mode)
    seconds = time.perf_counter() - start

    if suffix == ".npy":
        write_npy(out, samples)
    else:
        from fastvae.viz import save_image_grid  # atomic too

        save_image_grid(np.clip(samples, 0.0, 1.0), out, nrow=args.nrow)
    print(
        f"wrote {out}: {args.num_samples} samples of shape {list(shape)} ({args.mode}, seed {args.seed}) "
        f"from {args.model} in {seconds:.3f} s ({short_name(sampler.provider)} provider)"
    )
    return 0
