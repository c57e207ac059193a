"""``fastvae encode``: images -> latents (.npy) with an exported encoder.onnx (no torch)."""

from __future__ import annotations

import argparse

from fastvae.commands import arg_types

HELP = "encode images into latents (.npy) with an exported encoder.onnx (no torch)"
DESCRIPTION = (
    "Encode images with the encoder of a spatial-latent run ('fastvae export RUN --encoder') into "
    "the means mu of q(z|x), written as a .npy array (n, c, H/f, W/f) that 'fastvae decode' takes "
    "back. IMAGES: an image file, a folder of images (read in name order, all of one size), or a "
    ".npy array (n, C, H, W) or (C, H, W) (or an .npz of that one array) of uint8 pixels or floats "
    "in [0, 1]. Heights and widths must be multiples of the encoder's f; colour or grayscale is "
    "converted to what it takes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="encoder .onnx written by 'fastvae export RUN --encoder'")
    parser.add_argument("images", help="an image file, a folder of images, or a .npy array (n, C, H, W)")
    parser.add_argument("--out", type=arg_types.path, required=True, help="the .npy file of latents mu to write")
    parser.add_argument("--logvar-out", type=arg_types.path,
                        help="also write logvar (q(z|x)'s log-variances, same shape) to this .npy file")
    parser.add_argument("--batch-size", type=arg_types.at_least(1),
                        help="images per onnxruntime call (default 16, fewer for large images: about 512 MiB of "
                             "working memory per call)")
    parser.add_argument("--threads", type=arg_types.onnx_threads, help="onnxruntime intra-op threads; None: one per physical core")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from fastvae.errors import FastVAEError, write_failure
    from fastvae.export.onnx_encoder import OnnxEncoder
    from fastvae.run_folder import write_failure_in, write_npys

    out = Path(args.out)
    outs = [out] + ([Path(args.logvar_out)] if args.logvar_out is not None else [])
    for path in outs:  # before the work: mu and logvar are written as a pair, or neither
        if path.suffix.lower() != ".npy":
            raise FastVAEError(f"{path}: the latents are written as a .npy file: end the name in .npy")
        if path.is_dir():
            raise FastVAEError(f"{path} is a folder: give a .npy file to write")
        failure = write_failure_in(path.parent)
        if failure is not None:
            raise FastVAEError(f"{path} cannot be written ({write_failure(failure)}): choose another folder")
    if len(outs) == 2 and outs[0].resolve() == outs[1].resolve():
        raise FastVAEError("--out and --logvar-out name the same file: give two")
    encoder = OnnxEncoder(args.model, threads=args.threads)
    images, source = _read(Path(args.images), encoder.channels, outs)
    start = time.perf_counter()
    mu, logvar = encoder.encode(images, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    write_npys(dict(zip(outs, (mu, logvar))))
    print(f"wrote {out}: {len(mu)} latent(s) of {'x'.join(map(str, mu.shape[1:]))} from {source} of "
          f"{'x'.join(map(str, images.shape[1:]))} in {seconds:.3f} s")
    return 0


def _read(path, channels: int, outs: list):
    """(images (n, C, H, W), what they are, for the summary) from an image file, a folder of
    them or a .npy array; FastVAEError for anything else."""
    import numpy as np

    from fastvae.errors import FastVAEError
    from fastvae.image_decoding import IMAGE_SUFFIXES
    from fastvae.run_folder import read_npy

    if not path.exists():
        raise FastVAEError(f"{path} does not exist: give an image file, a folder of images or a .npy array")
    if any(path.resolve() == out.resolve() for out in outs if out.exists()):
        raise FastVAEError(f"{path} is also an output (--out / --logvar-out): writing would replace it; give another")
    if path.is_dir():
        # hidden files left out, as training's image folders do (macOS's ._a.png beside a.png)
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not files:
            raise FastVAEError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        images = [_image(file, channels) for file in files]
        other = next(((f, i) for f, i in zip(files, images) if i.shape != images[0].shape), None)
        if other is not None:
            raise FastVAEError(f"{path} holds images of several sizes ({files[0].name}: {_size(images[0])}, "
                               f"{other[0].name}: {_size(other[1])}): encode each size apart, or resize them")
        return np.stack(images), f"{len(files)} image(s)"
    if path.suffix.lower() in (".npy", ".npz"):
        return read_npy(path, "images (n, C, H, W)"), "an array of images"
    return _image(path, channels)[None], "1 image"


def _image(file, channels: int):
    """One image file as uint8 (channels, H, W), read as training reads it (EXIF orientation
    applied, 16-bit grayscale scaled to 8 bits: ``fastvae.image_decoding``)."""
    from fastvae.errors import FastVAEError
    from fastvae.image_decoding import decode_image

    array = decode_image(file, channels)
    if isinstance(array, str):  # the reason it cannot be read
        raise FastVAEError(f"{file} could not be read as an image ({array})")
    return array


def _size(image) -> str:
    return f"{image.shape[1]}x{image.shape[2]}"
