"""What the decoder service reads and writes: request bodies checked into typed requests, arrays
encoded as ``npy``, ``png`` or ``json`` responses.

Torch-free and free of any HTTP stack: every problem with a request raises :class:`BadRequest`
(an HTTP status and one line saying what was wrong and what to do), which the service turns
into a 4xx response.

``POST /sample`` body (JSON): ``{"n": 16, "seed": 0, "mode": "mean", "format": "npy"}``; only
``n`` is required (``seed`` null or absent: fresh entropy; ``mode`` ``mean`` | ``sample``;
``format`` ``npy`` | ``png`` | ``json``).
``POST /decode`` body: JSON ``{"z": [[...], ...], "format": "npy"}``, or the latents as a
``.npy`` file with ``Content-Type: application/x-npy`` (format then from ``?format=``).

``json`` and ``png`` responses cost ~0.1-2 us of CPU per output value (``npy``: a copy), so their
size is bounded separately (:func:`check_output_size`, ``Limits.max_values``); a JSON response
never holds NaN or Infinity (not JSON: RFC 8259 parsers refuse them).
"""

from __future__ import annotations

import functools
import io
import json
import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fastvae.export.sampler import SEED_BOUND

FORMATS = ("npy", "png", "json")
MODES = ("mean", "sample")
CONTENT_TYPES = {"npy": "application/x-npy", "png": "image/png", "json": "application/json"}
NPY_CONTENT_TYPE = CONTENT_TYPES["npy"]
_SAMPLE_FIELDS = frozenset(("n", "seed", "mode", "format"))
_DECODE_FIELDS = frozenset(("z", "format"))


class BadRequest(Exception):
    """A request the service refuses: ``status`` (4xx) and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """``max_n``: samples (or latent rows) per request; ``max_body``: request body bytes;
    ``max_values``: output numbers per ``json`` or ``png`` response (n x values per sample);
    ``body_timeout``: seconds a request may go without sending body bytes (then 408);
    ``max_pending``: requests queued for the decoder or being decoded (more: 503, Retry-After);
    ``max_connections``: open connections and requests in progress (uvicorn's
    ``limit_concurrency``; more: 503), which bounds the memory of responses not yet read."""

    max_n: int = 4096
    max_body: int = 1 << 20
    # ~1-2 s of JSON encoding (~15 MB) on the dev CPU; every digits sample up to max_n fits
    max_values: int = 1 << 20
    body_timeout: float = 30.0
    max_pending: int = 1024
    max_connections: int = 2048


class SampleRequest(NamedTuple):  # a tuple: built on every request, ~5x cheaper than a frozen dataclass
    n: int
    seed: int | None
    mode: str
    format: str


def parse_sample(body: bytes, limits: Limits) -> SampleRequest:
    """A ``/sample`` body -> :class:`SampleRequest`; ``BadRequest`` for anything else."""
    fields = _json_object(body, _SAMPLE_FIELDS, "a JSON object such as {\"n\": 16, \"seed\": 0}")
    n = fields.get("n")
    if n.__class__ is not int:  # the common case skips the checks of bools, floats, missing n
        if "n" not in fields:
            raise BadRequest(400, "missing 'n': give the number of samples, e.g. {\"n\": 16}")
        n = _integer(n, "n")
    if not 1 <= n <= limits.max_n:
        # 400, not 413: the body is small; a parameter is out of the server's range (RFC 9110's
        # 413 is for request content too large, and some clients retry it with less content)
        raise BadRequest(400, f"'n' must be from 1 to {limits.max_n} (the server's --max-n), got {_short(n)}")
    seed = fields.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
        if not 0 <= seed < SEED_BOUND:  # OnnxSampler.sample's range: the same samples as it gives
            raise BadRequest(400, f"'seed' must be an integer from 0 to 2**128 - 1 or null, got {_short(seed)}")
    mode = fields.get("mode", "mean")
    if mode not in MODES:
        raise BadRequest(400, f"'mode' must be one of {', '.join(MODES)}, got {_show(mode)}")
    fmt = fields.get("format", "npy")
    return SampleRequest(n, seed, mode, fmt if fmt == "npy" else check_format(fmt))


def parse_decode(body: bytes, content_type: str | None, query_format: str | None,
                 latent_shape: tuple[int, ...], limits: Limits) -> tuple[np.ndarray, str]:
    """A ``/decode`` body -> (latents as C-contiguous float32 (n, *latent_shape), format); None
    in ``latent_shape``: any size >= 1 there (a spatial decoder's height and width)."""
    # a free size is named by its place: (c, h, w) latents are (4, h, w)
    names = [str(s) if s is not None else ("c", "h", "w")[i] for i, s in enumerate(latent_shape)]
    row = (f"rows of {latent_shape[0]} numbers" if len(latent_shape) == 1  # one latent, for messages
           else f"{'x'.join(names)} arrays of numbers")
    if (content_type or "").split(";")[0].strip().lower() == NPY_CONTENT_TYPE:
        try:
            z = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, EOFError, ...
            raise BadRequest(400, f"the body is not a readable .npy array ({type(exc).__name__}); "
                                  "send np.save output or a JSON body") from None
        if not isinstance(z, np.ndarray):  # an .npz archive: several arrays
            raise BadRequest(400, "the body is an .npz archive, not one .npy array; send np.save output "
                                  "or a JSON body")
        fmt = check_format(query_format or "npy")
    else:
        if body.startswith((b"\x93NUMPY", b"PK\x03\x04")):  # np.save / np.savez output, sent as JSON
            raise BadRequest(400, f"the body is a numpy file but its Content-Type is {content_type or 'missing'}: "
                                  f"send it with Content-Type: {NPY_CONTENT_TYPE}")
        fields = _json_object(body, _DECODE_FIELDS, "a JSON object such as {\"z\": [[0.1, ...]]}")
        if "z" not in fields:
            raise BadRequest(400, f"missing 'z': give the latents as a list of {row}")
        z = fields["z"]
        if z.__class__ is not list:  # an object, a string, a number: not latents
            raise BadRequest(400, f"'z' must be a list of {row}, got a JSON {_json_type(z)}")
        try:  # no dtype: strings and booleans stay what they are and are refused below
            listed, z = z, np.asarray(z)
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(400, f"'z' must be a list of {row} (ragged or not numbers)") from None
        # numbers mixed with booleans become numbers ([1, true]: integers): looked for only
        # when the body spells one
        if z.dtype.kind in "fiu" and (b"true" in body or b"false" in body) and any(
                value.__class__ is bool for value in np.asarray(listed, dtype=object).flat):
            raise BadRequest(400, "'z' must hold numbers (float or int), got booleans among them")
        fmt = check_format(fields.get("format", query_format or "npy"))
    if z.dtype.kind not in "fiu":  # strings, booleans, integers beyond 64 bits (object), ...
        raise BadRequest(400, f"'z' must hold numbers (float or int), got {_dtype_name(z)}")
    fits = z.ndim == len(latent_shape) + 1 and all(
        d >= 1 if s is None else d == s for s, d in zip(latent_shape, z.shape[1:]))
    if not fits or len(z) == 0:
        free = "".join(f", {n}" for n, s in zip(names, latent_shape) if s is None)
        raise BadRequest(400, f"'z' must have shape (n, {', '.join(names)}) with n{free} >= 1, got {tuple(z.shape)}")
    if len(z) > limits.max_n:
        raise BadRequest(413, f"'z' has {len(z)} rows, more than the server's --max-n {limits.max_n}")
    if z.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 -> inf, refused below (no warning)
            z = np.ascontiguousarray(z, dtype=np.float32)
    else:
        z = np.ascontiguousarray(z)
    if not np.isfinite(z).all():
        raise BadRequest(400, "'z' holds NaN or infinite values (or values beyond float32): send finite numbers")
    return z, fmt


def check_output_size(n: int, output_shape: tuple[int, ...], fmt: str, limits: Limits) -> None:
    """BadRequest (400) for a ``json`` or ``png`` response of more than ``limits.max_values``
    numbers: checked before decoding (``npy`` is bounded by ``max_n`` alone)."""
    if fmt == "npy":
        return
    per_sample = math.prod(output_shape)
    if n * per_sample > limits.max_values:
        most = limits.max_values // per_sample
        smaller = f"n <= {most}" if most else "format npy only (one sample is too large)"
        raise BadRequest(400, f"format {fmt} of {n} outputs of shape {list(output_shape)} is {n * per_sample} numbers, "
                              f"more than the server's --max-values {limits.max_values}: ask for format npy, or {smaller}")


def check_format(fmt) -> str:
    if fmt not in FORMATS:
        raise BadRequest(400, f"'format' must be one of {', '.join(FORMATS)}, got {_show(fmt)}")
    return fmt


def encode(array: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """(body, content type) of ``array`` (float32, (n, *shape)) in format ``fmt``.

    ``npy``: ``np.save`` bytes; ``json``: ``{"shape": [...], "data": nested lists}``; ``png``:
    an image grid of the samples (values clipped to [0, 1]; image outputs only).
    """
    if fmt == "npy":
        # one copy of the values (header + tobytes() held two at once)
        return b"".join((_npy_header(array.dtype.str, array.shape), np.ascontiguousarray(array))), CONTENT_TYPES["npy"]
    if fmt == "json":
        return _json_bytes(array), CONTENT_TYPES["json"]
    from PIL import Image

    from fastvae.viz import grid_scale, image_grid

    if not np.isfinite(array).all():  # drawn black, as if it were a picture
        raise BadRequest(422, "the decoder's output holds NaN or infinite values, which a PNG cannot show "
                              "(latents too large for the model?): ask for format npy, or send smaller latents")
    grid = image_grid(array, scale=grid_scale(array))
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), CONTENT_TYPES["png"]


# rows are converted this many values at a time: each piece holds the GIL ~5 ms (tolist and
# json.dumps are C calls that never release it), so the event loop, waiting for the GIL while a
# worker thread encodes, gets it back between pieces instead of after the whole response
_JSON_PIECE_VALUES = 4096


def _json_bytes(array: np.ndarray) -> bytes:
    """``{"shape": [...], "data": nested lists}`` as compact JSON, built a few rows at a time
    (same bytes as one ``json.dumps``); BadRequest (422) for NaN or infinite values."""
    if not np.isfinite(array).all():
        raise BadRequest(422, "the decoder's output holds NaN or infinite values, which JSON cannot carry "
                              "(latents too large for the model?): ask for format npy, or send smaller latents")
    head = '{"shape":' + json.dumps(list(array.shape), separators=(",", ":")) + ',"data":'
    if array.ndim == 0 or array.size <= _JSON_PIECE_VALUES:
        return (head + json.dumps(array.tolist(), separators=(",", ":"), allow_nan=False) + "}").encode()
    rows = max(1, _JSON_PIECE_VALUES // max(1, array[0].size))
    pieces = (json.dumps(array[i:i + rows].tolist(), separators=(",", ":"), allow_nan=False)[1:-1]
              for i in range(0, len(array), rows))
    return (head + "[" + ",".join(pieces) + "]}").encode()


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header ``np.save`` writes for a C-ordered array (cached: a few per service)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def png_possible(output_shape: tuple[int, ...]) -> bool:
    """Whether outputs of this shape are images a PNG grid can show (C = 1 or 3, H, W)."""
    return len(output_shape) == 2 or (len(output_shape) == 3 and output_shape[0] in (1, 3))


def error_body(reason: str) -> bytes:
    return json.dumps({"error": reason}).encode()


# -- helpers -------------------------------------------------------------------------------------
_SCAN_JSON = json.JSONDecoder().scan_once  # json.loads' own C scanner
_SPACE = json.decoder.WHITESPACE.match  # what json.loads skips around the value


def _loads(body: bytes):
    """``json.loads(body)``, ~1 us instead of ~5 for a small UTF-8 body: the C scanner called
    directly, whitespace around the value skipped as ``json.loads`` does. Anything else (other
    encodings, a BOM), and every error, takes ``json.loads`` itself, for its exact messages."""
    try:
        text = body.decode()
        value, end = _SCAN_JSON(text, _SPACE(text, 0).end())
        if _SPACE(text, end).end() == len(text):
            return value
    except (UnicodeDecodeError, StopIteration, ValueError):
        pass
    return json.loads(body)


def _json_object(body: bytes, allowed: frozenset, example: str) -> dict:
    try:
        fields = _loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the body is not valid JSON ({one_line_json_error(exc)}); send {example}") from None
    except ValueError:  # valid JSON, but Python refuses to read an integer this long
        raise BadRequest(400, f"the body holds an integer of more than {sys.get_int_max_str_digits()} digits; "
                              f"send {example}") from None
    except RecursionError:
        raise BadRequest(400, f"the body's JSON is nested too deeply; send {example}") from None
    if fields.__class__ is not dict:
        raise BadRequest(400, f"the body must be {example}, got a JSON {_json_type(fields)}")
    if not fields.keys() <= allowed:
        unknown = sorted(set(fields) - allowed)
        raise BadRequest(400, f"unknown field(s) {', '.join(map(repr, unknown))}: allowed are {', '.join(sorted(allowed))}")
    return fields


def one_line_json_error(exc: Exception) -> str:
    return " ".join(str(exc).split())[:120]


def _integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadRequest(400, f"'{name}' must be an integer, got {_show(value)}")
    return value


def _short(n: int) -> str:
    """An integer for a message: a 400-digit one as its first digits and its length."""
    text = str(n)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(value.__class__, "null")


def _show(value) -> str:
    return json.dumps(value)[:60] if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__


def _dtype_name(z: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes",
            "O": "objects, nulls, mixed values or integers beyond 64 bits"}.get(z.dtype.kind, f"dtype {z.dtype}")
