"""``fastvae decode``: latents (.npy) -> images with an exported decoder (no torch): spatial
latents, whole or in tiles, or the flat codes of an MLP/conv decoder (an autoencoder's too)."""

from __future__ import annotations

import argparse

from fastvae.commands import arg_types

HELP = "decode latents (.npy) with an exported decoder.onnx, spatial ones whole or in tiles (no torch)"
DESCRIPTION = (
    "Decode latents z (n, c, h, w) (any h, w) with the decoder of a spatial-latent run "
    "('fastvae export' of a --model convkl run) into the means of p(x|z), written as a .npy "
    "array (n, C, h*f, w*f) or a folder of PNG files. --tile N --overlap K decode large latents "
    "in overlapping tiles of N x N output pixels (blended; memory bounded by the tile); "
    "--check-untiled also decodes them whole and prints the largest difference. The decoder of "
    "an MLP or conv run takes flat codes (n, latent_dim) instead (an autoencoder's, which "
    "'fastvae sample' refuses: it has no prior), decoded whole."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="spatial decoder .onnx written by 'fastvae export'")
    parser.add_argument("latents", help=".npy file of latents (n, c, h, w) or one (c, h, w) (flat decoders: "
                        "(n, latent_dim) or one); or an .npz holding one such array")
    parser.add_argument("--out", type=arg_types.path, required=True, help="a .npy file, or a folder for one PNG per image")
    parser.add_argument("--tile", type=int, help="tile size in output pixels (a multiple of f); None: decode whole")
    parser.add_argument("--overlap", type=int, default=None,
                        help="overlap of neighbouring tiles in output pixels (a multiple of f; default tile/4 rounded "
                             "down to f, at least f)")
    parser.add_argument("--batch-size", type=int, help="latents (or tiles of them) per onnxruntime call (default: as "
                                                      "many as keep the decoder's working memory under 512 MiB, "
                                                      "at most 1000)")
    parser.add_argument("--threads", type=arg_types.onnx_threads, help="onnxruntime intra-op threads; None: one per physical core")
    parser.add_argument("--check-untiled", action="store_true",
                        help="with --tile: also decode whole and print max |tiled - untiled|")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the numbered PNGs an earlier decode left in the --out folder")


def run(args: argparse.Namespace) -> int:
    import math
    import os
    import time
    from pathlib import Path

    import numpy as np

    from fastvae.errors import FastVAEError
    from fastvae.export import OnnxSampler
    from fastvae.export.tiled_decode import check_latents, check_tiling, decode_latents
    from fastvae.run_folder import read_npy

    out = Path(args.out)
    # PNGs into a folder: an existing one (its name may have a dot: imgs.v2), one named with a
    # trailing slash, or a new name without a suffix; else a .npy file
    to_folder = out.is_dir() or args.out.endswith(("/", os.sep)) or not out.suffix
    if not to_folder and out.suffix.lower() != ".npy":  # before decoding, which may take long
        raise FastVAEError(f"--out {out}: give a .npy file or a folder for PNG images (a new one without a "
                           f"suffix, or end it with /: --out {out}/)")
    if to_folder and out.exists() and not out.is_dir():
        raise FastVAEError(f"--out {out} is a file: give a folder for the PNG images (or a .npy file)")
    earlier = _numbered_pngs(out) if to_folder and out.is_dir() else []
    if earlier and not args.overwrite:  # fewer new images would leave old ones among them
        raise FastVAEError(f"--out {out} already holds {len(earlier)} decoded image(s) ({earlier[0].name}, ...): "
                           "pass --overwrite to replace them, or choose another folder")
    if args.batch_size is not None and args.batch_size < 1:
        raise FastVAEError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if not to_folder and out.exists() and Path(args.latents).exists() and out.samefile(args.latents):
        raise FastVAEError(f"--out {out} is the latents file itself: writing the images would replace "
                           "the latents; give another --out")
    decoder = OnnxSampler(args.model, threads=args.threads)
    spatial = len(decoder.latent_shape) == 3 and "downsample" in decoder.metadata
    if spatial:
        f, c = _downsample(decoder.metadata["downsample"], args.model), decoder.latent_shape[0]
        z = check_latents(read_npy(Path(args.latents), "latents (n, c, h, w)"), (c, None, None), args.latents)
    else:  # codes (n, latent_dim) of an MLP/conv decoder
        z = check_latents(read_npy(Path(args.latents), "latents (n, c, h, w)"), decoder.latent_shape, args.latents)
    shape = decoder.output_shape
    if to_folder and (len(shape) != 3 or shape[0] not in (1, 3)):  # before decoding
        raise FastVAEError(f"--out {out}: {args.model} makes outputs of shape {tuple(shape)}, not images: "
                           "give a .npy file")
    tile = overlap = None
    if args.tile is not None and not spatial:
        raise FastVAEError(f"--tile: {args.model} decodes flat codes ({decoder.latent_dim} values), which "
                           "are not tiled; leave out --tile, --overlap and --check-untiled")
    if args.tile is not None:
        # a quarter of the tile in whole latent positions, and at least one where the tile has
        # room (rounding down left tiles under 4f without any blending: 4x the seams)
        default = max(f, args.tile // 4 // f * f) if args.tile >= 2 * f else 0
        tile, overlap = check_tiling(args.tile, default if args.overlap is None else args.overlap, f)
    elif args.overlap is not None or args.check_untiled:
        raise FastVAEError("--overlap and --check-untiled go with --tile N")
    names, feed = [decoder.mean_output], decoder.input_name
    # the latents of one call: whole ones, or a tile's (a spatial decoder's working memory grows with them)
    call = (z.shape[1], min(tile, z.shape[2]), min(tile, z.shape[3])) if tile else z.shape[1:]
    batch_size = decoder.batch_size_for(call) if args.batch_size is None else args.batch_size
    # tiles: each call's rows also hold their accumulated image and its normalized copy
    out_row = 4 * math.prod(decoder.output_shape_for(z.shape[1:]))
    decoder.check_memory(len(z), batch_size, z.shape[1:], "latents", call_shape=call if tile else None,
                         held=2 * out_row * min(len(z), batch_size) if tile else 0)
    whole_batch = decoder.batch_size_for(z.shape[1:]) if args.batch_size is None else args.batch_size
    if args.check_untiled:  # checked now, before the tiled decode: a whole one beside its images
        try:
            decoder.check_memory(len(z), whole_batch, z.shape[1:], "latents", held=len(z) * out_row)
        except FastVAEError as exc:  # its advice is for a whole decode, which only the check makes
            why = str(exc).split(": use ")[0]
            raise FastVAEError(f"--check-untiled decodes the latents whole too, and {why}: leave out "
                               "--check-untiled") from None

    def decode(chunk):
        return decoder.session.run(names, {feed: chunk})[0]

    start = time.perf_counter()
    if spatial:
        images = decode_latents(decode, z, f, decoder.output_shape[0], tile=tile, overlap=overlap or 0,
                                batch_size=batch_size)
    else:
        images = decoder.decode(z, batch_size=batch_size)
    seconds = time.perf_counter() - start
    written = _write(images, out, to_folder)
    for png in set(earlier) - set(written):  # --overwrite: none of the earlier images stays
        png.unlink(missing_ok=True)
    if to_folder:
        _report_leftovers(out.resolve())
    how = "whole"
    if tile:
        from fastvae.export.tiled_decode import tile_starts

        count = len(tile_starts(z.shape[2], tile, overlap)) * len(tile_starts(z.shape[3], tile, overlap))
        how = (f"in {count} tiles of {args.tile} px (overlap {overlap * f} px)" if count > 1
               else f"whole (one --tile {args.tile} covers it)")
    print(f"wrote {out}: {len(images)} {'image' if images.ndim == 4 else 'output'}(s) of "
          f"{'x'.join(map(str, images.shape[1:]))} from latents {'x'.join(map(str, z.shape[1:]))}, decoded {how} in {seconds:.3f} s")
    if args.check_untiled:
        whole = decode_latents(decode, z, f, decoder.output_shape[0], batch_size=whole_batch)
        print(f"max |tiled - untiled| = {float(np.max(np.abs(images - whole))):.3e} "
              f"(mean {float(np.mean(np.abs(images - whole))):.3e})")
    return 0


def _downsample(value, model) -> int:
    """The decoder's f (pixels per latent position) from its metadata, or FastVAEError."""
    from fastvae.config import DOWNSAMPLES
    from fastvae.errors import FastVAEError

    if str(value) not in map(str, DOWNSAMPLES):
        raise FastVAEError(f"{model} is damaged or not from 'fastvae export': its metadata says downsample "
                           f"{value!r}, not one of {', '.join(map(str, DOWNSAMPLES))}: export it again")
    return int(value)


def _report_leftovers(folder) -> None:
    """Notes on stderr for what killed decodes left beside ``folder``: staging folders, and
    earlier image folders put aside by a swap (reported, never removed: another decode may be
    running, and an old set may be all there is)."""
    import sys

    from fastvae.run_folder import note_staged_leftovers, replaced_leftovers

    note_staged_leftovers(folder, "decode")
    for left in replaced_leftovers(folder):
        print(f"note: {left} holds earlier images of {folder.name}, put aside by a decode that was "
              "killed: remove it to free its space (or move it back)", file=sys.stderr)


def _swappable(folder) -> bool:
    """Whether ``folder`` can be replaced by a staged one with renames: new, or holding nothing
    but decoded images, on its parent's disk (not a mount point: a volume cannot be renamed),
    owned by this user (a new folder would not keep another owner or group), not the current
    folder (a shell would be left in a deleted one), in a parent this process can write."""
    import os
    from pathlib import Path

    if not os.access(folder.parent, os.W_OK):
        return False
    if not folder.exists():
        return True
    try:
        info, parent = folder.stat(), folder.parent.stat()
        return (info.st_dev == parent.st_dev and not os.path.ismount(folder)
                and info.st_uid == getattr(os, "getuid", lambda: info.st_uid)()
                and folder != Path.cwd().resolve() and set(folder.iterdir()) <= set(_numbered_pngs(folder)))
    except OSError:
        return False


def _numbered_pngs(folder) -> list:
    """The PNGs named like decode's outputs (0000.png, 0001.png, ...) in ``folder``."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".png" and p.stem.isdigit())


def _write(images, out, to_folder: bool | None = None) -> list:
    """A .npy file, or one PNG per image in the folder ``out`` (``to_folder``; None: unless ``out`` ends
    in .npy); returns the paths written.
    The PNGs are all written (and fsynced) in a staging folder first: a full disk leaves the
    earlier set whole (the new set needs room beside the old one). Where ``out`` is new or holds
    nothing but decoded images (and can be renamed: ``_swappable``), the staging folder then
    replaces it in one rename, so even a
    SIGKILL leaves the old set or the new one (or the old one aside as ``.NAME.old-PID``);
    in a folder with other files the PNGs are renamed in one by one."""
    import os

    import numpy as np

    from fastvae.errors import FastVAEError
    from fastvae.run_folder import move_all_into_place, move_folder_into_place, temporary_folder, write_npy

    if to_folder is None:  # by the name alone
        to_folder = out.suffix.lower() != ".npy"
    if not to_folder:
        return [write_npy(out, images)]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        what = f"{images.shape[1]}-channel outputs" if images.ndim == 4 else f"vectors of {images.shape[1]} values"
        raise FastVAEError(f"the decoder makes {what}, not images: use --out with .npy")
    from PIL import Image

    pixels = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    width = max(4, len(str(len(images) - 1)))
    names = [f"{i:0{width}d}.png" for i in range(len(pixels))]

    def save_all(folder):
        for name, image in zip(names, pixels):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / name)

    folder = out.resolve()  # --out may be a link to a folder elsewhere: that folder is replaced
    if _swappable(folder):
        with temporary_folder(folder) as staging:
            if folder.exists():
                os.chmod(staging, folder.stat().st_mode & 0o7777)
            save_all(staging)
            if _swappable(folder):  # again: a file may have arrived during a long decode
                move_folder_into_place(staging, folder)
            else:
                folder.mkdir(exist_ok=True)
                move_all_into_place([(staging / name, folder / name) for name in names])
    else:  # staged inside the folder (a hidden one), on its disk
        with temporary_folder(folder / "decoded") as staging:
            save_all(staging)
            move_all_into_place([(staging / name, folder / name) for name in names])
    return [out / name for name in names]
