"""Decode spatial latents with an exported decoder, whole or in overlapping tiles (numpy +
onnxruntime, no torch).

A spatial decoder file (``fastvae export`` of a ``--model convkl`` run) maps z (n, c, h, w) to
images (n, C, h*f, w*f) for any h and w. ``decode_latents(decoder, z)`` runs it on whole
latents. With ``tile=T, overlap=K`` (both in output pixels, multiples of f) the latent is cut
into tiles of T/f x T/f positions whose neighbours overlap by K/f; each tile is decoded alone
and added into the output with a weight that ramps linearly across the middle of each overlap
(``ramp``; a pixel's weights are normalized to sum to 1), so seams blend. The decoder's activations then scale with
the tile, not the image: peak memory is bounded by the tile size.

Tiled output differs from untiled output: pixels near a tile's edge see less context, and
GroupNorm normalizes each tile by that tile's own statistics. ``max |tiled - untiled|`` is
measured by the tests and the benchmark and printed by ``fastvae decode --check-untiled``.
"""

from __future__ import annotations

import numpy as np

from fastvae.errors import FastVAEError

EDGE_WEIGHT = 1e-3  # weight of a tile's outermost pixels (not 0: see ramp)


def check_latents(z, latent_shape: tuple, source: str = "latents") -> np.ndarray:
    """``z`` as float32 (n, *latent_shape); a single latent (no n) becomes n = 1. None in
    ``latent_shape`` is any size: (c, None, None) for spatial latents, (d,) for flat codes.
    FastVAEError for a dtype or a shape that does not fit the decoder, or non-finite values."""
    z = np.asarray(z)
    if z.dtype.kind != "f":
        raise FastVAEError(f"{source} has dtype {z.dtype}: the decoder takes floating-point latents "
                           "(float32; float16 and float64 are converted)")
    if z.ndim == len(latent_shape):
        z = z[None]
    if z.ndim != len(latent_shape) + 1 or any(s is not None and s != d for s, d in zip(latent_shape, z.shape[1:])):
        one = ", ".join(str(s) if s is not None else "hw"[i - 1] for i, s in enumerate(latent_shape))
        raise FastVAEError(f"{source} has shape {tuple(z.shape)}: the decoder takes latents (n, {one}) or one ({one})")
    if min(z.shape) == 0:
        raise FastVAEError(f"{source} is empty (shape {tuple(z.shape)})")
    if not np.isfinite(z).all():
        raise FastVAEError(f"{source} contains NaN or Inf values")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: checked just below
        z32 = np.ascontiguousarray(z, dtype=np.float32)
    if not np.isfinite(z32).all():
        raise FastVAEError(f"{source} holds values beyond float32's range (|z| > 3.4e38), which the "
                           "decoder cannot take")
    return z32


def check_tiling(tile: int, overlap: int, f: int) -> tuple[int, int]:
    """(tile, overlap) in latent positions; FastVAEError unless both are multiples of f (the
    decoder makes f x f pixels of each latent position) and 0 <= overlap < tile."""
    for name, value in (("--tile", tile), ("--overlap", overlap)):
        if value < 0:
            raise FastVAEError(f"{name} {value} is negative: give a size in pixels, a multiple of {f}")
        if value % f:
            raise FastVAEError(f"{name} {value} is not a multiple of {f}: this decoder makes {f}x{f} "
                               f"pixels per latent position, so give {name} in multiples of {f} pixels")
    if tile == 0 or overlap >= tile:
        raise FastVAEError(f"--tile {tile} must be positive and larger than --overlap {overlap}")
    return tile // f, overlap // f


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` positions covering ``size`` with at least ``overlap`` shared
    between neighbours (the last tile ends at the edge)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def ramp(length: int, overlap: int) -> np.ndarray:
    """Blend weights along one axis of a tile. A tile's edge pixels are its worst (their
    convolutions and upsampling saw padding, not the neighbours), so across an overlap of
    ``overlap`` pixels the weight stays near 0 for the outer quarter, rises linearly over the
    middle half and is 1 beyond; never exactly 0, so pixels at the image's own edge, which one
    tile alone covers, keep their value after normalization."""
    if overlap <= 0:
        return np.ones(length, dtype=np.float32)
    margin = overlap // 4
    i = np.arange(length, dtype=np.float32) + 0.5
    edge = np.minimum(i, length - i) - margin  # distance from the tile's edge, minus the margin
    return np.clip(edge / max(overlap - 2 * margin, 1), EDGE_WEIGHT, 1.0).astype(np.float32)


def decode_latents(run, z: np.ndarray, f: int, out_channels: int, *, tile: int | None = None,
                   overlap: int = 0, batch_size: int = 16) -> np.ndarray:
    """Means E[x|z] (n, C, h*f, w*f) for latents ``z`` (n, c, h, w), whole or tiled.

    ``run(z_chunk) -> mean``: the decoder (e.g. an onnxruntime session's ``run`` for the
    ``mean`` output). ``tile``/``overlap``: in latent positions (``check_tiling``); None decodes
    each latent whole. ``batch_size`` latents (or tiles of them) go through one call.
    """
    n, _, h, w = z.shape
    out = np.empty((n, out_channels, h * f, w * f), dtype=np.float32)
    for start in range(0, n, batch_size):
        chunk = z[start : start + batch_size]
        out[start : start + len(chunk)] = run(chunk) if tile is None else _tiled(run, chunk, f, tile, overlap)
    return out


def _tiled(run, z: np.ndarray, f: int, tile: int, overlap: int) -> np.ndarray:
    n, _, h, w = z.shape
    acc, weight = None, np.zeros((h * f, w * f), dtype=np.float32)
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            piece = run(np.ascontiguousarray(z[:, :, top : top + tile, left : left + tile]))
            th, tw = piece.shape[-2:]
            wt = np.outer(ramp(th, overlap * f), ramp(tw, overlap * f))
            if acc is None:
                acc = np.zeros((n, piece.shape[1], h * f, w * f), dtype=np.float32)
            rows, cols = slice(top * f, top * f + th), slice(left * f, left * f + tw)
            acc[:, :, rows, cols] += piece * wt
            weight[rows, cols] += wt
    return acc / weight
