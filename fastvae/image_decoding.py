"""Image files as uint8 pixels, the way training reads them (numpy + Pillow, no torch).

``decode_image`` is shared by the in-memory image folders and ``fastvae prepare`` (which need
torch elsewhere) and ``fastvae encode`` (torch-free): EXIF orientation applied, 16-bit grayscale
scaled to 8 bits (Pillow's convert("L") clipped it), float TIFFs read in [0, 1] or [0, 255],
grayscale palettes kept gray; resized and centre-cropped to a square when asked.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import numpy as np

from fastvae.errors import one_line


# the image files an image folder is read from (TIFF, JFIF: a browser's "Save image as"; the
# Netpbm formats of classic face datasets); other raster formats Pillow opens (.ico, .psd, ...)
# are left out with a note. GIF/TIFF/APNG: the first frame
IMAGE_SUFFIXES = frozenset({".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif",
                            ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"}
# 16-bit grayscale PNGs (Pillow's convert("L") would clip them to 255, not scale them)
WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L"}
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations shown rotated by 90 degrees


def _image_errors():
    """What Pillow raises for a file it cannot read, a decompression bomb included."""
    from PIL import Image, UnidentifiedImageError

    return UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError


def probe_image(file: Path) -> tuple[bool, tuple[int, int]] | str:
    """(whether the image has colour, (width, height) as shown, EXIF orientation applied) from
    its header, or the reason it cannot be read."""
    from PIL import Image

    try:
        with _quiet_pillow(), Image.open(file) as img:
            colour = img.mode not in GRAY_MODES and not (img.mode == "P" and _gray_palette(img))
            w, h = img.size
            return colour, ((h, w) if orientation(img) in _TRANSPOSED else (w, h))
    except _image_errors() as exc:
        return one_line(exc)


PILLOW_NOTES = 5  # per process: Pillow's warnings about a file it still reads, named, then no more
_pillow_notes = [0]


@contextlib.contextmanager
def _quiet_pillow(file: Path | None = None):
    """Pillow's warnings, which are unnamed and two lines each: those for images fastvae reads
    as they are - a large image (DecompressionBombWarning, up to Pillow's hard limit, which
    stays an error) and a palette's transparency given in bytes (alpha is dropped either way) -
    are dropped; its others (damaged tags, corrupt EXIF: the pixels are still read) become one
    note naming ``file`` (the first ``PILLOW_NOTES`` of a process), or are dropped without it
    (the probe: the decode of the same file says them)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        # Pillow's own UserWarnings recorded, every time; others keep the caller's filters
        warnings.filterwarnings("always", category=UserWarning, module=r"PIL(\.|$)")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
        yield

    def pillows(w) -> bool:
        return issubclass(w.category, UserWarning) and f"{os.sep}PIL{os.sep}" in w.filename

    for w in caught:  # others, recorded rather than shown inside the block: shown as they were
        if not pillows(w):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    said = dict.fromkeys(one_line(w.message) for w in caught if pillows(w))
    if said and file is not None and _pillow_notes[0] < PILLOW_NOTES:  # (Pillow repeats a tag's)
        _pillow_notes[0] += 1
        more = " (further such notes of this process are not shown)" if _pillow_notes[0] == PILLOW_NOTES else ""
        print(f"note: {file}: {'; '.join(said)} (Pillow; the image is read as decoded){more}", file=sys.stderr)


def orientation(img) -> int | None:
    """The EXIF (or XMP) orientation of an opened image, from its header alone (probe and
    decode read the same one); None where there is none or it cannot be read (a damaged EXIF
    block keeps the image as stored: Pillow's exif_transpose crashed on some, writing them back)."""
    import re

    try:
        # getexif would decode the whole image to look for an eXIf chunk after the pixels (rare;
        # viewers differ on it): the header's EXIF and XMP are what probe and decode both read
        if img.format == "PNG" and "exif" not in img.info:
            xmp = img.info.get("XML:com.adobe.xmp") or img.info.get("xmp") or ""
            xmp = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
            match = re.search(r'tiff:Orientation(="|>)([0-9])', xmp)
            return int(match[2]) if match else None
        value = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - any damage in the metadata: no orientation
        return None
    return value if isinstance(value, int) else None


def _upright(img, turn: int | None):
    """``img`` as viewers show it for EXIF orientation ``turn`` (Pillow's exif_transpose table)."""
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(turn)
    return img if method is None else img.transpose(method)


def _gray_palette(img) -> bool:
    palette = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    return bool(len(palette)) and bool((palette == palette[:, :1]).all())


def decode_image(file: Path, channels: int, size: int | None = None) -> np.ndarray | str:
    """The image as uint8 (channels, H, W), upright (EXIF orientation applied), 16-bit
    grayscale scaled to 8 bits - resized so its shorter side is ``size`` and centre-cropped to
    size x size when ``size`` is given - or the reason it cannot be decoded."""
    from PIL import Image

    try:
        with _quiet_pillow(file), Image.open(file) as img:
            turn = orientation(img)
            if size is not None and img.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with a depth map
                _draft(img, size)
            img = _upright(img, turn)
            if img.mode in WIDE_GRAY_MODES:
                wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
                img = Image.fromarray((wide >> 8).astype(np.uint8), "L")
            elif img.mode == "F":  # 32-bit float (TIFF): convert("L") clipped [0, 1] data to black
                img = _float_gray(np.asarray(img, dtype=np.float64))
                if isinstance(img, str):
                    return img
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                img = fit_image(img, size)
            array = np.asarray(img, dtype=np.uint8)
    except _image_errors() as exc:
        return one_line(exc)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _float_gray(values: np.ndarray):
    """A float grayscale image as 8 bits: values in [0, 1] scaled by 255, values in [0, 255]
    rounded; other values (or NaN/Inf) give the reason it cannot be read."""
    from PIL import Image

    if not np.isfinite(values).all():
        return "a float image holding NaN or Inf values"
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        return (f"a float image with values in [{lo:g}, {hi:g}]: fastvae reads float pixels in [0, 1] "
                "or [0, 255]; save it as an 8- or 16-bit image")
    scaled = values * 255.0 if hi <= 1 else values
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


JPEG_DRAFT_GAP = 3  # a JPEG is decoded at a DCT scale that keeps its shorter side >= 3 x --size


def _draft(img, size: int) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale, keeping its shorter side at
    least JPEG_DRAFT_GAP x ``size`` (Pillow's thumbnail does this with 2): the resize to ``size``
    then differs from a full decode's by ~1 grey level on average (40-45 dB), and a 12 MP photo
    decodes in ~18 ms instead of ~175 ms (--size 64)."""
    w, h = img.size
    shorter, want = min(w, h), JPEG_DRAFT_GAP * size
    if shorter >= 2 * want:  # else no DCT scale fits
        img.draft(None, (math.ceil(w * want / shorter), math.ceil(h * want / shorter)))


def fit_image(img, size: int):
    """Resize a PIL image so its shorter side is ``size`` (bicubic, antialiased), then crop
    the centre size x size."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


