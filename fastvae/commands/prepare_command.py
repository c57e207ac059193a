"""``fastvae prepare``: convert a data source into a sharded uint8 dataset to stream."""

from __future__ import annotations

import argparse
import sys

from fastvae.commands import arg_types

HELP = "convert images or arrays into a sharded uint8 dataset that 'fastvae train --data' streams"
DESCRIPTION = (
    "Convert SRC - a folder of PNG/JPEG/BMP/GIF/WebP/TIFF/Netpbm images (subfolders name the labels; alpha is "
    "dropped, not composited), an MNIST "
    "IDX file or folder, a .npy/.npz file, 'digits' or 'photos' / 'photos:64' - into litdata shards of uint8 images in --out: a "
    "train split and a held-out test split beside it. Train on it with 'fastvae train --data OUT' "
    "(a local folder, or a copy at an s3:// or gs:// URL): it is streamed, never loaded whole. "
    "Written to a temporary folder and renamed into place when complete."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="image folder, IDX file/folder, .npy/.npz, 'digits' or 'photos[:64]'")
    parser.add_argument("--out", type=arg_types.path, required=True, metavar="SHARDS", help="folder to write the prepared dataset to")
    parser.add_argument("--size", type=int, help="resize (shorter side) and centre-crop every image to "
                        "N x N; without it all images must have one size")
    parser.add_argument("--grayscale", action="store_true", help="convert images to one channel "
                        "(default: colour is kept when any image has colour)")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="held-out share for sources without a split of their own (seeded, "
                        "stratified by label)")
    parser.add_argument("--split-seed", type=arg_types.seed, default=0, help="seed of the held-out split and "
                        "of the order the train examples are written in")
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images (0: none)")
    parser.add_argument("--skip-bad", action="store_true", help="skip images that cannot be decoded "
                        "(and report how many) instead of stopping at the first; one whose header "
                        "reads but whose pixels do not is found after the split is drawn, so it "
                        "is missing from its split")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --out")
    parser.add_argument("--quiet", dest="progress", action="store_false",
                        help="no progress bar (it shows only on a terminal anyway)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastvae.data import note_shadowed_folder
    from fastvae.shards import prepare, summary_line

    note_shadowed_folder(args.source)
    meta, seconds = prepare(
        args.source, args.out, size=args.size, grayscale=args.grayscale,
        test_fraction=args.test_fraction, split_seed=args.split_seed, workers=args.workers,
        skip_bad=args.skip_bad, overwrite=args.overwrite, progress=args.progress)
    print(summary_line(args.source, Path(args.out), meta, seconds))
    from fastvae.run_folder import note_staged_leftovers, replaced_leftovers

    note_staged_leftovers(Path(args.out), "prepare")
    for left in replaced_leftovers(Path(args.out)):
        print(f"note: {left} is an earlier version of {args.out}, put aside by a replace that was "
              "killed: remove it to free its space (or move it back)", file=sys.stderr)
    return 0
