"""``OnnxSampler``: draw samples from an exported fastvae decoder with numpy + onnxruntime.

Needs no torch: a production image holds numpy, onnxruntime and this module.

>>> sampler = OnnxSampler("decoder.onnx")                  # doctest: +SKIP
>>> images = sampler.sample(64, seed=0)                    # doctest: +SKIP
>>> images.shape                                           # doctest: +SKIP
(64, 1, 8, 8)

Reproducibility: ``sample(n, seed=s)`` draws all n latent vectors first from
``numpy.random.default_rng(s)`` (then, with ``mode="sample"``, all observation noise), and only
then decodes them in batches, so the samples do not depend on ``batch_size`` - except with an
int8 decoder (``decoder.int8.onnx``), whose dynamic quantization scales each call's activations
by that call's range: its samples move slightly with the batching (3.5e-3 of the pixel range at
most in a digits test).

An autoencoder's decoder (``--kind ae``) has no prior to draw z from: ``sample`` refuses it;
``decode`` takes codes of your own.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError, one_line
from fastvae.export import metadata as md

SEED_BOUND = 2**128  # seeds are integers in [0, SEED_BOUND): the sampler's and the service's

DEFAULT_BATCH_SIZE = 1000
# onnxruntime's peak working memory while a spatial (convkl) decoder runs, per output pixel and
# channel of its full-resolution level: 32 bytes (8 float32 activations), measured 2026-12-02
# on the CPU provider (widths 32 and 64, outputs 512x512 to 1024x1024; 8-9 MB per 64x64 image
# at width 64). A batch of 1000 such images held ~9 GB; the default batch keeps it under:
WORK_BYTES_PER_PIXEL_CHANNEL = 32
WORK_BUDGET = 512 * 2**20
CHECK_MEMORY_FROM = 256 * 2**20  # smaller calls skip reading the free memory (a file read)
MODES = ("mean", "sample")



def _reexport_hint(path: Path) -> str:
    target = path if path.suffix.lower() == ".onnx" else "decoder.onnx"  # never a checkpoint's path
    return f"export the decoder again with 'fastvae export RUN --out {target}'"


def session_options(threads: int | None = None, spin: bool = True):
    """ONNX Runtime CPU session options used by the sampler (and the benchmark).

    ``threads``: intra-op threads (None: onnxruntime's default, one per physical core).
    ``spin``: worker threads busy-wait for the next operator *during* a run (saves a thread
    wake-up per operator) and stop spinning as soon as the run returns
    (``session.force_spinning_stop``), so idle sessions leave the cores free. ``False``: never
    spin. On the 2-core dev CPU, 10,000 digits-MLP samples took 9.0 ms spinning during runs,
    11.1 ms never spinning, and onnxruntime's default (spinning on after each run) slowed the
    torch code running next to it 3x.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; problems become FastVAEError messages
    if threads is not None:
        from fastvae.config import usable_cpus

        cpus = usable_cpus()
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
            # more threads than CPUs only slows a call down (and 10^5 of them stall the machine)
            raise FastVAEError(f"threads must be an integer from 1 to {cpus} (the CPUs this process may use), "
                               f"got {threads!r}")
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OnnxSampler:
    """Samples (means of p(x|z), z ~ N(0, I)) from a decoder written by ``export_decoder``.

    ``path``: the .onnx file; ``threads``: onnxruntime intra-op threads (None: 1 thread for
    small calls, all cores for large ones, switching at a batch size measured on this decoder,
    see :mod:`fastvae.export.thread_regimes`); ``spin``: see :func:`session_options` (default:
    spin only while a run is in progress); ``providers``: execution providers by short name
    (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``coreml``) or onnxruntime name, in order of
    preference (default: cpu). ``provider`` is the one that actually runs the graph.
    Raises ``FastVAEError`` with one clear line for missing, empty, truncated, corrupt or
    non-fastvae files and for providers this onnxruntime lacks.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, *, spin: bool = True,
                 providers=None):
        from fastvae.export import providers as eps
        from fastvae.export.thread_regimes import ThreadRegimes

        if not isinstance(path, (str, os.PathLike)):
            raise FastVAEError(f"OnnxSampler takes the path of a decoder .onnx file, got {path!r}")
        self.path = Path(path)
        _check_file(self.path)
        wanted = eps.resolve(providers)
        session_options(threads, spin)  # validates ``threads`` before any file is read
        session = self._load(self.path, wanted, threads, spin)
        self.provider = session.get_providers()[0]
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        self.session = session
        self._read_metadata()
        self._regimes = ThreadRegimes(
            lambda t: session if t == threads else self._load(self.path, wanted, t, spin),
            self.latent_shape, self.input_name, self.mean_output, threads,
            tuned=self.provider == eps.CPU,
        )
        self._device = eps.device_type(self.provider)
        self._outputs = [self.mean_output]
        self._row_bytes: dict[tuple, tuple[int, int, int]] = {}  # by latent shape: see _bytes_per_row

    @staticmethod
    def _load(path: Path, providers: list[str], threads: int | None, spin: bool):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(path), sess_options=session_options(threads, spin),
                                        providers=providers)
        except Exception as exc:  # onnxruntime raises its own types: InvalidProtobuf, Fail, ...
            raise FastVAEError(
                f"{path} could not be loaded by onnxruntime (truncated, corrupt or not an "
                f"ONNX model: {one_line(exc)}); {_reexport_hint(path)}"
            ) from None

    # -- metadata ----------------------------------------------------------------------------
    def _read_metadata(self) -> None:
        meta, path = self.metadata, self.path
        if meta.get("fastvae_format") != md.FORMAT:
            raise FastVAEError(
                f"{path} is an ONNX model but not a fastvae decoder (no '{md.FORMAT}' metadata): "
                "give a decoder written by 'fastvae export RUN --out decoder.onnx'"
            )
        try:
            version = int(meta.get("fastvae_format_version", "0"))
            self.latent_dim = int(meta["latent_dim"])
            # spatial decoders: z is (n, c, h, w); sampled at the training latent size
            shape = tuple(int(s) for s in json.loads(meta.get("latent_shape", "[]")))
            self.latent_shape = shape if len(shape) > 1 else (self.latent_dim,)
            self.output_shape = tuple(int(s) for s in json.loads(meta["output_shape"]))
            self.input_name = meta.get("input_name", md.INPUT_NAME)
            self.mean_output = meta.get("mean_output", md.MEAN_OUTPUT)
            self.likelihood = meta.get("likelihood", "none")
            self.sample_kind = meta.get("sample", "none")
            self.sigma = float(meta["sigma"]) if self.sample_kind in ("gaussian", "laplace") else None
            self.precision = meta.get("precision", "fp32")
        except (KeyError, ValueError, TypeError) as exc:
            raise FastVAEError(
                f"{path} has damaged fastvae metadata ({type(exc).__name__}: {one_line(exc)}); "
                f"{_reexport_hint(path)}"
            ) from None
        if version > md.FORMAT_VERSION:
            raise FastVAEError(
                f"{path} was written by a newer fastvae (decoder format {version}, this version "
                f"reads {md.FORMAT_VERSION}); upgrade fastvae"
            )
        if (self.latent_dim < 1 or not self.output_shape or self.sample_kind not in md.SAMPLE_KINDS
                or int(np.prod(self.latent_shape)) != self.latent_dim
                or min(self.output_shape) < 1 or min(self.latent_shape) < 1
                or (self.sigma is not None and not 0 <= self.sigma < float("inf"))):  # 0: an underflowed learned sigma
            raise FastVAEError(f"{path} has inconsistent fastvae metadata; {_reexport_hint(path)}")

        inputs = self.session.get_inputs()
        outputs = {o.name: o for o in self.session.get_outputs()}
        problem = None
        if len(inputs) != 1 or inputs[0].name != self.input_name:
            problem = f"expected one input '{self.input_name}', found {[i.name for i in inputs]}"
        elif inputs[0].type != "tensor(float)":
            problem = f"input '{self.input_name}' is {inputs[0].type}, expected tensor(float)"
        elif not _dims_match(inputs[0].shape, (None, *self.latent_shape)):
            problem = f"input shape {inputs[0].shape} does not fit latent_dim {self.latent_dim}"
        elif self.mean_output not in outputs:
            problem = f"no output '{self.mean_output}' (outputs: {sorted(outputs)})"
        elif not _dims_match(outputs[self.mean_output].shape, (None, *self.output_shape)):
            problem = (
                f"output shape {outputs[self.mean_output].shape} does not fit output_shape "
                f"{list(self.output_shape)}"
            )
        if problem:
            raise FastVAEError(
                f"{path}: graph and fastvae metadata disagree ({problem}); {_reexport_hint(path)}"
            )
        # a spatial decoder whose graph leaves the latent's height and width open takes any
        # (c, h, w) and makes (C, h * f, w * f); the metadata's are the training size
        dims = inputs[0].shape
        self.any_latent_size = len(self.latent_shape) == 3 and not any(isinstance(d, int) for d in dims[2:])
        self._full_resolution_channels = _full_resolution_channels(meta.get("model_spec"))

    # -- sampling ----------------------------------------------------------------------------
    def decode(self, z, batch_size: int | None = None) -> np.ndarray:
        """Means E[x|z] for latents ``z`` shaped (n, *latent_shape) -> (n, *output_shape); a
        spatial decoder takes any latent height and width (``any_latent_size``,
        ``output_shape_for``).

        Per call: a shape check, one onnxruntime run per ``batch_size`` rows (default
        ``batch_size_for``: 1000, fewer for a spatial decoder) on the session of its thread
        regime, and nothing else (a call needing 256 MiB or more is checked against the free
        memory first). One batch returns onnxruntime's own
        output array; several write, through IO binding, straight into slices of one output.
        """
        z = self._latents(z)
        n = len(z)
        io_row, work_row, default_batch = self._row_bytes.get(z.shape[1:]) or self._bytes_per_row(z.shape[1:])
        batch_size = default_batch if batch_size is None else _positive_int(batch_size, "batch_size")
        if n * io_row + min(n, batch_size) * work_row >= CHECK_MEMORY_FROM:  # inline: the per-call cost
            self.check_memory(n, batch_size, z.shape[1:], "z")
        if 0 < n <= batch_size:
            return self._regimes.session_for(self._work_rows(z.shape)).run(self._outputs, {self.input_name: z})[0]
        out = np.empty((n, *self.output_shape_for(z.shape[1:])), dtype=np.float32)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            self._run_into(z[start:stop], out[start:stop])
        return out

    def _run_into(self, z: np.ndarray, out: np.ndarray) -> None:
        """Decode ``z`` into the C-contiguous float32 array ``out`` (onnxruntime writes it)."""
        session = self._regimes.session_for(self._work_rows(z.shape))
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, z)
        binding.bind_output(self.mean_output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        session.run_with_iobinding(binding)

    def decode_on_device(self, z):
        """``decode`` through IO binding, the result left where the provider keeps tensors.

        ``z``: an array, by ``decode``'s rules (real numbers, converted to float32), or a float32
        ``onnxruntime.OrtValue`` (already on the device: not copied; another dtype is a
        FastVAEError).
        Returns an ``OrtValue`` on the provider's device (GPU memory with ``cuda``/``tensorrt``,
        for a consumer on the GPU through DLPack; host memory with ``cpu``), so nothing goes
        through the host per call.
        """
        import onnxruntime as ort

        if not isinstance(z, ort.OrtValue):
            z = ort.OrtValue.ortvalue_from_numpy(self._latents(z), self._device, 0)
        elif not self._fits(tuple(z.shape())):
            raise self._shape_error(z.shape())
        elif z.data_type() != "tensor(float)":  # an OrtValue is not converted: its data stays put
            raise FastVAEError(f"z must be a float32 OrtValue, got {z.data_type()}")
        session = self._regimes.session_for(self._work_rows(tuple(z.shape())))
        binding = session.io_binding()
        binding.bind_ortvalue_input(self.input_name, z)
        binding.bind_output(self.mean_output, self._device, 0)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _latents(self, z) -> np.ndarray:
        """``z`` as the C-contiguous float32 array (n, *latent_shape) the graph takes (real
        numbers of any dtype are converted; other shapes and dtypes, and values that float32
        cannot hold, get one clear error). float32 latents pass unchecked (the per-call cost):
        NaN or Inf there decode to NaN or Inf, as in the torch decoder."""
        try:
            z = np.asarray(z)
        except ValueError as exc:  # a ragged list: numpy's "inhomogeneous shape" error
            raise FastVAEError(f"z must be an array of numbers (n, {', '.join(map(str, self.latent_shape))}): "
                               f"{one_line(exc)}") from None
        if not self._fits(z.shape):
            raise self._shape_error(z.shape)
        if z.dtype != np.float32 or not z.flags.c_contiguous:
            if not np.issubdtype(z.dtype, np.number):
                raise FastVAEError(f"z must hold numbers, got dtype {z.dtype}")
            if np.issubdtype(z.dtype, np.complexfloating):  # numpy would drop the imaginary parts
                raise FastVAEError(f"z must hold real numbers, got dtype {z.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32: said below
                z32 = np.ascontiguousarray(z, dtype=np.float32)
            if z.dtype.itemsize > 4 and np.issubdtype(z.dtype, np.floating) and \
                    np.isinf(z32).any() and not np.isinf(z).any():
                raise FastVAEError("z holds values beyond float32's range (|z| > 3.4e38), which the decoder "
                                   "cannot take")
            z = z32
        return z

    def _fits(self, shape: tuple) -> bool:
        """Whether latents of ``shape`` (n, ...) fit the graph (see ``any_latent_size``)."""
        if self.any_latent_size:
            return len(shape) == 4 and shape[1] == self.latent_shape[0] and min(shape[2:]) >= 1
        return tuple(shape[1:]) == self.latent_shape

    def _work_rows(self, shape: tuple) -> int:
        """A call's rows in training-size latents (what the thread regimes were tuned on): a
        latent 4x the training size counts 4 rows."""
        n = int(shape[0])
        if not self.any_latent_size or tuple(shape[1:]) == self.latent_shape:
            return n
        return max(n, -(-n * int(np.prod(shape[1:])) // int(np.prod(self.latent_shape))))

    def output_shape_for(self, latent_shape: tuple) -> tuple[int, ...]:
        """The decoder's output shape for one latent of ``latent_shape`` (``output_shape`` at
        the training size; a spatial decoder scales height and width by its f)."""
        if not self.any_latent_size or tuple(latent_shape) == self.latent_shape:
            return self.output_shape
        (_, h, w), (_, th, tw), (channels, oh, ow) = latent_shape, self.latent_shape, self.output_shape
        return (channels, h * (oh // th), w * (ow // tw))

    def _shape_error(self, shape) -> FastVAEError:
        dims = ", ".join(map(str, self.latent_shape))
        if self.any_latent_size:
            return FastVAEError(f"z must have shape (n, {self.latent_shape[0]}, h, w) for {self.path.name} "
                                f"(any h, w >= 1; trained at {self.latent_shape[1]}x{self.latent_shape[2]}), got {tuple(shape)}")
        return FastVAEError(f"z must have shape (n, {dims}) for {self.path.name}, got {tuple(shape)}")

    def threads_for(self, rows: int) -> int | None:
        """Intra-op threads a call of ``rows`` latent vectors runs with (None: all cores)."""
        return self._regimes.threads_for(rows)

    def sample(
        self,
        n: int,
        seed: int | np.random.Generator | None = None,
        batch_size: int | None = None,
        *,
        mode: str = "mean",
    ) -> np.ndarray:
        """``n`` samples shaped (n, *output_shape), float32.

        ``mode="mean"`` (default) returns E[x|z] for z ~ N(0, I): the images you look at.
        ``mode="sample"`` also draws x ~ p(x|z): Bernoulli pixels (0/1) or mean + sigma * noise.
        The same ``seed`` gives the same samples whatever ``batch_size`` is.
        """
        n = _positive_int(n, "n", allow_zero=True)
        batch_size = self.batch_size_for(self.latent_shape) if batch_size is None else _positive_int(batch_size, "batch_size")
        if mode not in MODES:
            raise FastVAEError(f"mode must be one of {MODES}, got {mode!r}")
        self.check_can_sample()
        self.check_memory(n, batch_size, self.latent_shape, "n")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(_seed(seed))
        x = self.decode(self.draw_latents(n, rng), batch_size)
        return self.observe(x, rng) if mode == "sample" else x

    @property
    def has_prior(self) -> bool:
        """A VAE's decoder (z ~ N(0, I) makes samples); False for an autoencoder's."""
        return self.likelihood != "none"

    def _bytes_per_row(self, latent_shape: tuple) -> tuple[int, int, int]:
        """(bytes of a latent and its output, the decoder's working bytes for one row, the
        default batch size) for latents of ``latent_shape``, kept for the next call."""
        latent_shape = tuple(latent_shape)
        cached = self._row_bytes.get(latent_shape)
        if cached is None:
            output = self.output_shape_for(latent_shape)
            pixels = math.prod(output[1:]) if len(output) == 3 else 0
            work = WORK_BYTES_PER_PIXEL_CHANNEL * self._full_resolution_channels * pixels
            batch = max(1, min(DEFAULT_BATCH_SIZE, WORK_BUDGET // work)) if work else DEFAULT_BATCH_SIZE
            if len(self._row_bytes) >= 256:  # a service's clients may send latents of many sizes
                self._row_bytes.clear()
            cached = self._row_bytes[latent_shape] = (4 * (math.prod(latent_shape) + math.prod(output)), work, batch)
        return cached

    def batch_size_for(self, latent_shape: tuple) -> int:
        """The default rows per onnxruntime call for latents of ``latent_shape``: 1000, fewer for
        a spatial decoder, whose working memory for one call stays under ``WORK_BUDGET``."""
        return self._bytes_per_row(latent_shape)[2]

    def check_memory(self, rows: int, batch_size: int, latent_shape: tuple, name: str,
                     call_shape: tuple | None = None, held: int = 0) -> None:
        """One clear error where ``rows`` latents of ``latent_shape``, their outputs and the
        decoder's working memory for ``batch_size`` of them at once (of ``call_shape``: a tile's
        latents; default ``latent_shape``), plus ``held`` bytes of the caller's own buffers,
        need more than is free here (numpy's MemoryError naming an array
        shape, or the OOM killer, with no message). ``name``: what the caller gave (``n`` of
        ``sample``, ``batch size`` of bench-sampler: the advice names it)."""
        io_row = self._bytes_per_row(latent_shape)[0]
        work_row = self._bytes_per_row(latent_shape if call_shape is None else call_shape)[1]
        need = rows * io_row + min(rows, batch_size) * work_row + held
        if need < CHECK_MEMORY_FROM:
            return
        from fastvae.config import available_memory

        memory = available_memory() or 2**62
        if need <= memory:
            return
        advice = []
        if rows > 1:
            advice.append({"n": "a smaller n, in several calls", "batch size": "a smaller batch size"}.get(
                name, "fewer latents per call"))
        if min(rows, batch_size) > 1 and work_row and name != "batch size":
            advice.append(f"a smaller batch size ({self.batch_size_for(call_shape or latent_shape)} by default)")
        if self.any_latent_size:  # tiles bound the working memory at any latent size
            advice.append("smaller tiles ('fastvae decode --tile')" if call_shape else
                          "tiles for large images ('fastvae decode --tile')")
        advice = advice or ["a machine (or container) with more memory"]
        raise FastVAEError(f"{rows} latent{'s' * (rows != 1)} of shape {tuple(latent_shape)} {'needs' if rows == 1 else 'need'} about {need / 2**30:.3g} GiB "
                           f"(latents, outputs and the decoder's working memory), more than the memory free here "
                           f"({memory / 2**30:.3g} GiB): use " + ", or ".join(advice))

    def check_can_sample(self) -> None:
        if not self.has_prior:
            raise FastVAEError(
                f"{self.path.name} is the decoder of an autoencoder (--kind ae): it has no prior to draw "
                "z from (z ~ N(0, I) decodes to noise); decode codes of your own (OnnxSampler.decode, "
                "'fastvae decode', POST /decode) or sample from a VAE's decoder")

    def draw_latents(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """z ~ N(0, I), (n, *latent_shape) float32: the first draws ``sample`` takes from ``rng``."""
        return rng.standard_normal((n, *self.latent_shape), dtype=np.float32)

    def observe(self, means: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x ~ p(x|z) given the means E[x|z] (``mode="sample"``): Bernoulli pixels, or
        mean + sigma * Gaussian or Laplace noise (in place), drawn from ``rng`` after the latents."""
        if self.sample_kind == "bernoulli":
            return (rng.random(means.shape, dtype=np.float32) < means).astype(np.float32)
        if self.sample_kind == "gaussian":
            means += np.float32(self.sigma) * rng.standard_normal(means.shape, dtype=np.float32)
        elif self.sample_kind == "laplace":
            means += rng.laplace(0.0, self.sigma, means.shape).astype(np.float32)
        return means

    def __repr__(self) -> str:
        from fastvae.export.providers import short_name

        return (
            f"OnnxSampler({str(self.path)!r}, latent_dim={self.latent_dim}, "
            f"output_shape={self.output_shape}, likelihood={self.likelihood!r}, "
            f"precision={self.precision!r}, provider={short_name(self.provider)!r})"
        )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FastVAEError(f"{path} does not exist: give an .onnx file written by 'fastvae export'")
    if path.is_dir():
        raise FastVAEError(
            f"{path} is a folder, not an ONNX file; export a decoder with "
            f"'fastvae export RUN --out decoder.onnx' and pass that file"
        )
    if path.stat().st_size == 0:
        raise FastVAEError(f"{path} is empty (0 bytes): the export did not finish; {_reexport_hint(path)}")


def _dims_match(actual, expected) -> bool:
    """Compare an onnxruntime shape (ints, or str/None for symbolic dims) with ``expected``
    (None = any)."""
    if actual is None or len(actual) != len(expected):
        return False
    return all(e is None or not isinstance(a, int) or a == e for a, e in zip(actual, expected))


def _seed(seed):
    """None or a seed in [0, 2**128) for numpy's generator, else FastVAEError (numpy's own
    errors for "1", -1 or 1.5 said "not 1" or "expected non-negative integer")."""
    if seed is None:
        return None
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < SEED_BOUND:
        raise FastVAEError(f"seed must be None, a numpy Generator or an integer from 0 to 2**128 - 1, got {seed!r}")
    return int(seed)


def _positive_int(value, name: str, allow_zero: bool = False) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < (0 if allow_zero else 1):
        kind = "a non-negative" if allow_zero else "a positive"
        raise FastVAEError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)


def _full_resolution_channels(model_spec: str | None) -> int:
    """The channels of a convkl decoder's full-resolution level (its working memory scales
    with them), from the metadata's ``model_spec``; 0 for other decoders or an unreadable spec."""
    try:
        spec = json.loads(model_spec or "{}")
        if spec.get("model") != "convkl":
            return 0
        from fastvae.config import parse_channel_mult

        return int(spec["width"]) * parse_channel_mult(spec.get("channel_mult", ""), int(spec["downsample"]))[0]
    except (ValueError, TypeError, KeyError, AttributeError, FastVAEError):
        return 0
