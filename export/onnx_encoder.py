"""``OnnxEncoder``: images -> q(z|x) with an exported fastvae encoder (numpy + onnxruntime).

Needs no torch, as the sampler: ``fastvae export RUN --encoder`` writes ``encoder.onnx`` for a
spatial-latent (convkl) run; this runs it.

>>> encoder = OnnxEncoder("encoder.onnx")                  # doctest: +SKIP
>>> mu, logvar = encoder.encode(images)                    # doctest: +SKIP

``images``: (n, C, H, W) or one (C, H, W), float in [0, 1] or uint8 (read as value / 255), H and
W multiples of the encoder's f (any size, not only the training one). Returns ``mu`` and
``logvar``, each (n, c, H/f, W/f) float32: q(z|x) = N(mu, diag exp(logvar)). ``mu`` is what
``fastvae decode`` and ``OnnxSampler.decode`` take back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError, one_line

FORMAT = "fastvae-encoder"  # encoder_export.FORMAT (that module needs torch to import)
DEFAULT_BATCH_SIZE = 16
# onnxruntime's working memory per input pixel, measured 2026-12-02 on a width-8 encoder (CPU
# provider): 16 1024x1024 photos held 4.5 GB at once, one of them 0.85 GB: ~250 bytes per pixel
WORK_BYTES_PER_PIXEL = 256


class OnnxEncoder:
    """An exported fastvae encoder in onnxruntime; ``threads`` and ``providers`` as the sampler's."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, *, providers=None):
        from fastvae.export import providers as eps
        from fastvae.export.sampler import OnnxSampler, _check_file, session_options

        if not isinstance(path, (str, os.PathLike)):
            raise FastVAEError(f"OnnxEncoder takes the path of an encoder .onnx file, got {path!r}")
        self.path = Path(path)
        _check_file(self.path)
        session_options(threads)  # validates ``threads`` before the file is read
        self.session = OnnxSampler._load(self.path, eps.resolve(providers), threads, True)
        self.provider = self.session.get_providers()[0]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        kind = self.metadata.get("fastvae_format")
        if kind != FORMAT:
            what = ("a fastvae decoder: give its encoder (encoder.onnx, from 'fastvae export RUN --encoder')"
                    if kind == "fastvae-decoder" else
                    "not a fastvae encoder: write one with 'fastvae export RUN --encoder' (spatial-latent runs)")
            raise FastVAEError(f"{self.path} is {what}")
        try:
            self.f = int(self.metadata["downsample"])
            self.input_shape = tuple(int(s) for s in json.loads(self.metadata["input_shape"]))
            self.latent_shape = tuple(int(s) for s in json.loads(self.metadata["latent_shape"]))
            self.input_name = self.metadata.get("input_name", "image")
            self.outputs = [self.metadata.get("mu_output", "mu"), self.metadata.get("logvar_output", "logvar")]
        except (KeyError, ValueError, TypeError) as exc:
            raise FastVAEError(f"{self.path} has damaged fastvae metadata ({type(exc).__name__}: {one_line(exc)}); "
                               "export it again with 'fastvae export RUN --encoder'") from None
        if self.f < 1 or len(self.input_shape) != 3 or len(self.latent_shape) != 3:
            raise FastVAEError(f"{self.path} has inconsistent fastvae metadata; export it again")

    @property
    def channels(self) -> int:
        """The image channels the encoder takes (1: grayscale, 3: RGB)."""
        return self.input_shape[0]

    def batch_size_for(self, height: int, width: int) -> int:
        """The default images per call: 16, fewer for large images (the working memory of one
        call kept under the sampler's ``WORK_BUDGET``)."""
        from fastvae.export.sampler import WORK_BUDGET

        return max(1, min(DEFAULT_BATCH_SIZE, WORK_BUDGET // (WORK_BYTES_PER_PIXEL * height * width)))

    def encode(self, images, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu, logvar) of q(z|x) for ``images`` (see the module docstring), ``batch_size``
        images per onnxruntime call (default ``batch_size_for`` their size). Images, latents
        and one call's working memory that exceed the free memory are refused in one line."""
        from fastvae.config import available_memory
        from fastvae.export.sampler import _positive_int

        x = self._images(images)
        n, _, h, w = x.shape
        batch_size = self.batch_size_for(h, w) if batch_size is None else _positive_int(batch_size, "batch_size")
        latents = 2 * 4 * self.latent_shape[0] * (h // self.f) * (w // self.f)  # mu and logvar, float32
        need = n * latents + min(n, batch_size) * WORK_BYTES_PER_PIXEL * h * w
        memory = available_memory() or 2**62
        if need > memory:
            raise FastVAEError(f"encoding {n} image(s) of {h}x{w} pixels, {min(n, batch_size)} per call, needs about "
                               f"{need / 2**30:.3g} GiB, more than the memory free here ({memory / 2**30:.3g} GiB): "
                               "encode fewer or smaller images per call (a smaller batch size)")
        parts = [self.session.run(self.outputs, {self.input_name: x[start:start + batch_size]})
                 for start in range(0, len(x), batch_size)]
        return tuple(np.concatenate([part[k] for part in parts]) for k in (0, 1))

    def _images(self, images) -> np.ndarray:
        """``images`` as the float32 (n, C, H, W) array the graph takes, or one clear error."""
        try:
            x = np.asarray(images)
        except (ValueError, TypeError, RuntimeError) as exc:  # a ragged list, a tensor that needs grad
            raise FastVAEError(f"images must be an array (n, C, H, W): {one_line(exc)}") from None
        if x.ndim == 3:
            x = x[None]
        c, f = self.channels, self.f
        if x.ndim != 4 or x.shape[1] != c:
            raise FastVAEError(f"images have shape {tuple(np.shape(images))}: {self.path.name} takes ({c}, H, W) "
                               f"images ({'grayscale' if c == 1 else 'RGB'}), n of them as (n, {c}, H, W)")
        if min(x.shape) == 0:
            raise FastVAEError(f"images are empty (shape {x.shape})")
        h, w = x.shape[2:]
        if h % f or w % f:
            raise FastVAEError(f"images of {h}x{w} pixels: {self.path.name} takes heights and widths that are "
                               f"multiples of {f} (its latent has one position per {f}x{f} pixels): crop or "
                               f"resize them, e.g. to {max(f, h // f * f)}x{max(f, w // f * f)}")
        # uint8 pixels, or 0-255 ints (a list of them reads as int64)
        if x.dtype == np.uint8 or (np.issubdtype(x.dtype, np.integer) and x.min() >= 0 and x.max() <= 255):
            return (x.astype(np.float32) / np.float32(255.0)).copy(order="C")
        if not np.issubdtype(x.dtype, np.floating):
            raise FastVAEError(f"images must be uint8 (0-255) or floats in [0, 1], got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise FastVAEError("images hold NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:  # 0-255 floats encoded as if in [0, 1]: latents far off, silently
            raise FastVAEError(f"images hold floats in [{lo:g}, {hi:g}]: the encoder takes floats in [0, 1] "
                               "(divide 0-255 pixels by 255) or uint8 pixels")
        return x
