"""``OnnxSampler``: draw samples from an exported fastvae decoder with numpy + onnxruntime.

Needs no torch: a production image holds numpy, onnxruntime and this module.

>>> sampler = OnnxSampler("decoder.onnx")                  # doctest: +SKIP
>>> images = sampler.sample(64, seed=0)                    # doctest: +SKIP
>>> images.shape                                           # doctest: +SKIP
(64, 1, 8, 8)

Reproducibility: ``sample(n, seed=s)`` draws all n latent vectors first from
``numpy.random.default_rng(s)`` (then, with ``mode="sample"``, all observation noise), and only
then decodes them in batches, so the samples do not depend on ``batch_size``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError, one_line
from fastvae.export import metadata as md

DEFAULT_BATCH_SIZE = 1000
MODES = ("mean", "sample")



def _reexport_hint(path: Path) -> str:
    return f"export it again with 'fastvae export RUN --out {path}'"


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
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise FastVAEError(f"threads must be a positive integer, got {threads!r}")
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OnnxSampler:
    """Samples (means of p(x|z), z ~ N(0, I)) from a decoder written by ``export_decoder``.

    ``path``: the .onnx file; ``threads``: onnxruntime intra-op threads (None: its default);
    ``spin``: see :func:`session_options` (default: spin only while a run is in progress).
    Raises ``FastVAEError`` with one clear line for missing, empty, truncated, corrupt or
    non-fastvae files.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, *, spin: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        _check_file(self.path)
        options = session_options(threads, spin)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types: InvalidProtobuf, Fail, ...
            raise FastVAEError(
                f"{self.path} could not be loaded by onnxruntime (truncated, corrupt or not an "
                f"ONNX model: {one_line(exc)}); {_reexport_hint(self.path)}"
            ) from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self._read_metadata()

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
                or int(np.prod(self.latent_shape)) != self.latent_dim):
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

    # -- sampling ----------------------------------------------------------------------------
    def decode(self, z, batch_size: int | None = None) -> np.ndarray:
        """Means E[x|z] for latent vectors ``z`` shaped (n, latent_dim) -> (n, *output_shape)."""
        z = np.asarray(z)
        if z.shape[1:] != self.latent_shape:
            raise FastVAEError(
                f"z must have shape (n, {', '.join(map(str, self.latent_shape))}) for {self.path.name}, got {tuple(z.shape)}"
            )
        if not np.issubdtype(z.dtype, np.number):
            raise FastVAEError(f"z must hold numbers, got dtype {z.dtype}")
        z = np.ascontiguousarray(z, dtype=np.float32)
        batch_size = _positive_int(batch_size or DEFAULT_BATCH_SIZE, "batch_size")
        out = np.empty((len(z), *self.output_shape), dtype=np.float32)
        run = self.session.run
        names, feed = [self.mean_output], self.input_name
        for start in range(0, len(z), batch_size):
            stop = min(start + batch_size, len(z))
            out[start:stop] = run(names, {feed: z[start:stop]})[0]
        return out

    def sample(
        self,
        n: int,
        seed: int | np.random.Generator | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        mode: str = "mean",
    ) -> np.ndarray:
        """``n`` samples shaped (n, *output_shape), float32.

        ``mode="mean"`` (default) returns E[x|z] for z ~ N(0, I): the images you look at.
        ``mode="sample"`` also draws x ~ p(x|z): Bernoulli pixels (0/1) or mean + sigma * noise.
        The same ``seed`` gives the same samples whatever ``batch_size`` is.
        """
        n = _positive_int(n, "n", allow_zero=True)
        batch_size = _positive_int(batch_size, "batch_size")
        if mode not in MODES:
            raise FastVAEError(f"mode must be one of {MODES}, got {mode!r}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        z = rng.standard_normal((n, *self.latent_shape), dtype=np.float32)
        x = self.decode(z, batch_size)
        if mode == "sample":
            if self.sample_kind == "bernoulli":
                x = (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)
            elif self.sample_kind == "gaussian":
                x += np.float32(self.sigma) * rng.standard_normal(x.shape, dtype=np.float32)
            elif self.sample_kind == "laplace":
                x += rng.laplace(0.0, self.sigma, x.shape).astype(np.float32)
        return x

    def __repr__(self) -> str:
        return (
            f"OnnxSampler({str(self.path)!r}, latent_dim={self.latent_dim}, "
            f"output_shape={self.output_shape}, likelihood={self.likelihood!r}, "
            f"precision={self.precision!r})"
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


def _positive_int(value, name: str, allow_zero: bool = False) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < (0 if allow_zero else 1):
        kind = "a non-negative" if allow_zero else "a positive"
        raise FastVAEError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)
