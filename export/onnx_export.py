"""``export_decoder``: a trained fastvae decoder as one validated ONNX file (plus fp16/int8).

The graph maps ``z`` (batch, latent_dim), float32, to two float32 outputs shaped
(batch, *data_shape): ``mean`` = E[x|z] (sigmoid already applied for Bernoulli decoders and the
stacked autoencoder) and ``params`` (the decoder's raw output: logits or means). The batch
dimension is symbolic. A spatial-latent decoder (``--model convkl``) takes ``z`` (batch, c, h, w)
with batch, h and w all symbolic (outputs (batch, C, h*f, w*f)): one file decodes any latent
size; it is validated at the training latent size and at another one, and its fp16 copy keeps
GroupNorm and Softmax in fp32 (their sums overflow fp16). Metadata (see
:mod:`fastvae.export.metadata`) says how to use it.

Every export is validated before it replaces anything: ``onnx.checker`` (full check), then
onnxruntime against torch on batch sizes the exporter never saw (rtol 1e-4, atol 1e-5). All
files are written into a temporary folder beside the target and moved into place only once
everything passed, so a failed export never leaves a half-written file nor touches an existing
good one.

This module imports torch and onnx inside its functions only; ``import fastvae.export`` stays
torch-free.
"""

from __future__ import annotations

import copy
import json
import logging
import numbers
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastvae import run_folder
from fastvae.errors import FastVAEError, one_line, write_failure
from fastvae.export import metadata as md
from fastvae.float32_default import float32_by_default

RTOL, ATOL = 1e-4, 1e-5
CHECK_BATCHES = (1, 37, 256)  # validation batch sizes; export traces with EXPORT_BATCH
EXPORT_BATCH = 2
VARIANT_EVAL_N = 1000  # z ~ N(0, I) used to measure fp16/int8 errors against fp32
VARIANT_EVAL_SPATIAL = 64  # the same for spatial latents (each decodes to a whole image)
_PROTOBUF_LIMIT = 2**31 - 1 - (64 << 20)  # beyond this, weights go to an external .data file
EXPORTERS = ("auto", "dynamo", "torchscript")

# known harmless noise from the exporters (torch 2.9-2.13); anything else lands in the report
_NOISE = (
    "isinstance(treespec, LeafSpec)",
    "legacy TorchScript-based ONNX export",
    "The feature will be removed",
    "torchvision is not installed",
    # TorchScript tracing of F.interpolate's size checks (spatial decoders); parity at two latent
    # sizes shows the traced graph is right
    "Converting a tensor to a Python boolean might cause the trace to be incorrect",
)


@dataclass
class VariantReport:
    """An fp16 or int8 file and its measured error against the fp32 torch decoder."""

    precision: str
    path: Path
    size_bytes: int
    max_abs_error: float  # on ``params`` (raw output), 1000 z ~ N(0, I)
    max_abs_error_mean: float  # on ``mean``, what the sampler returns


@dataclass
class ExportReport:
    """What ``export_decoder`` wrote and how validation went."""

    path: Path
    size_bytes: int
    opset: int
    exporter: str
    source: str
    latent_dim: int
    output_shape: tuple[int, ...]
    likelihood: str
    output_transform: str
    parity: dict  # validation batch size (spatial: z shape "BxCxHxW") -> max |onnxruntime - torch|
    rtol: float = RTOL
    atol: float = ATOL
    checker: str = "onnx.checker.check_model(full_check=True): ok"
    rewrites: str = ""  # e.g. "2 convolution(s) as one dense Gemm each": same function, faster graph
    variants: list[VariantReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    latent_shape: tuple[int, ...] = ()  # one example's z: (latent_dim,) or (c, h, w) at training size

    @property
    def max_abs_error(self) -> float:
        return max(self.parity.values())

    @property
    def paths(self) -> list[Path]:
        return [self.path, *(v.path for v in self.variants)]

    def summary(self) -> str:
        """The report as a few human-readable lines (printed by ``fastvae export``)."""
        shape = "x".join(str(s) for s in self.output_shape)
        latent = "x".join(str(s) for s in self.latent_shape) if len(self.latent_shape) > 1 else self.latent_dim
        spatial = " at training size (latent height and width symbolic)" if len(self.latent_shape) > 1 else ""
        lines = [
            f"wrote {self.path} ({_size(self.size_bytes)}, ONNX opset {self.opset}, {self.exporter})",
            f"  decoder: z ({latent}) -> {shape}{spatial}, likelihood {self.likelihood}, "
            f"outputs 'mean' = {self.output_transform}('params') and 'params'; source {self.source}",
            *([f"  graph: {self.rewrites} (the same function; faster in onnxruntime)"] if self.rewrites else []),
            f"  checker: {self.checker}",
            "  parity onnxruntime vs torch (rtol %.0e, atol %.0e): ok, max |err| %s"
            % (self.rtol, self.atol, ", ".join(f"{'batch ' if isinstance(b, int) else 'z '}{b}: {e:.2e}"
                                               for b, e in self.parity.items())),
        ]
        for v in self.variants:
            lines.append(
                f"  {v.precision}: wrote {v.path} ({_size(v.size_bytes)}), max |err| vs fp32 "
                f"{v.max_abs_error:.2e} (params), {v.max_abs_error_mean:.2e} (mean)"
            )
        lines += [f"  note: {w}" for w in self.warnings]
        return "\n".join(lines)


def variant_path(path: str | os.PathLike, precision: str) -> Path:
    """Where the fp16/int8 variant of ``path`` goes: ``decoder.onnx`` -> ``decoder.int8.onnx``."""
    path = Path(path)
    suffix = path.suffix or ".onnx"
    return path.with_name(f"{path.stem if path.suffix else path.name}.{precision}{suffix}")


@float32_by_default
def export_decoder(
    run_or_model,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    fp16: bool = False,
    int8: bool = False,
    exporter: str = "auto",
    check_batches: tuple[int, ...] = CHECK_BATCHES,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> ExportReport:
    """Export the decoder of a run folder, checkpoint file or model to ONNX, and validate it.

    ``run_or_model``: a run folder or ``.ckpt`` path (loaded with ``fastvae.load``), or a
    ``VAE`` / ``StackedAutoencoder`` (possibly wrapped by Lightning Fabric, DDP or
    ``torch.compile``; any precision, any device: an fp32 CPU copy of its decoder is exported).
    ``path``: the .onnx file to write; ``fp16``/``int8`` also write ``<stem>.fp16.onnx`` /
    ``<stem>.int8.onnx`` beside it. ``exporter``: ``"auto"`` (torch.export-based "dynamo"
    exporter, falling back to the TorchScript one), ``"dynamo"`` or ``"torchscript"``.
    Raises ``FastVAEError`` (and writes nothing) when the export or its validation fails.
    """
    import onnx

    if not isinstance(path, (str, os.PathLike)):
        raise FastVAEError(f"path must be the .onnx file to write (a str or path), got {path!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):  # a negative tolerance blamed the export
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise FastVAEError(f"{name} must be a finite number >= 0, got {value!r}")
    path = Path(path)
    opset, check_batches = _check_arguments(path, opset, exporter, check_batches, fp16, int8)
    model, source = _resolve(run_or_model)
    try:
        with run_folder.temporary_folder(path) as staging:
            built = _build(model, source, staging / path.name, opset, exporter)
            parity = _validate(built, check_batches, rtol, atol)
            variants = _write_variants(built, path, staging, fp16=fp16, int8=int8)
            for v in variants:  # variants first, the main file last
                _move_into_place(staging / v.path.name, v.path)
                v.size_bytes = _total_size(v.path)
            _move_into_place(built.file, path)
    except OSError as exc:  # disk full, permissions, ...: the user can fix these
        raise FastVAEError(
            f"could not write {path} ({write_failure(exc)}); nothing was written"
        ) from None
    except onnx.checker.ValidationError as exc:
        raise FastVAEError(
            f"the exported ONNX graph failed onnx.checker ({one_line(exc)}); nothing was written to "
            f"{path}; try another --opset or --exporter"
        ) from None
    info = built.info
    return ExportReport(
        path=path, size_bytes=_total_size(path), opset=built.opset, exporter=built.exporter,
        source=source, latent_dim=info["latent_dim"], output_shape=info["output_shape"],
        likelihood=info["likelihood"], output_transform=info["output_transform"], parity=parity,
        rtol=rtol, atol=atol, rewrites=built.rewrites, variants=variants, warnings=built.notes,
        latent_shape=info["latent_shape"],
    )


def _check_arguments(path: Path, opset, exporter: str, check_batches, fp16: bool, int8: bool):
    """The checked (opset, check_batches); FastVAEError for bad values or folder targets."""
    if exporter not in EXPORTERS:
        raise FastVAEError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    for name, value in (("fp16", fp16), ("int8", int8)):
        if not isinstance(value, bool):  # fp16="no" would read as True
            raise FastVAEError(f"{name} must be True or False, got {value!r}")
    opset = _check_opset(opset)
    if isinstance(check_batches, (str, bytes)) or not isinstance(check_batches, Iterable) or not all(
            isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in check_batches):
        raise FastVAEError(f"check_batches must be a tuple of batch sizes (integers), got {check_batches!r}")
    check_batches = tuple(int(b) for b in check_batches)
    if not check_batches or min(check_batches) < 1 or EXPORT_BATCH in check_batches:
        raise FastVAEError(
            f"check_batches must be positive batch sizes other than {EXPORT_BATCH} (the export batch)"
        )
    targets = [path] + [variant_path(path, p) for p, on in (("fp16", fp16), ("int8", int8)) if on]
    for target in targets:
        if target.is_dir():
            raise FastVAEError(f"{target} is a folder: give a file name such as {target / 'decoder.onnx'}")
    if path.suffix.lower() != ".onnx":  # never over a checkpoint, an image or another run file
        raise FastVAEError(f"{path} is not an .onnx file name: give one such as "
                           f"{path.with_suffix('.onnx') if path.name else 'decoder.onnx'}")
    return opset, check_batches


@dataclass
class _Built:
    """An exported, checked fp32 graph in the staging folder, and what validating it needs."""

    file: Path
    info: dict  # _describe(model)
    reference: object  # the untouched fp32 decoder as (mean, params): parity is checked against it
    meta: dict[str, str]
    exporter: str
    opset: int
    rewrites: str
    notes: list[str]


def _build(model, source: str, file: Path, opset, exporter: str) -> _Built:
    """Export the decoder into ``file`` (metadata set, onnx.checker passed)."""
    import torch

    info = _describe(model)
    # the exported graph runs faster in onnxruntime: small convolutions as one Gemm, other
    # transposed convolutions as Conv + DepthToSpace; parity is checked against the untouched decoder
    reference = _MeanAndParams(_fp32_decoder(model), info["output_transform"])
    decoder = _fp32_decoder(model)
    spatial = len(info["latent_shape"]) > 1
    if spatial:
        check_spatial_opset(opset, "decoder")
    elif opset is not None and opset < FLAT_MIN_OPSET:
        raise FastVAEError(f"opset {opset} is too old for this decoder: give --opset {FLAT_MIN_OPSET} or "
                           "newer, or leave it out")
    # the rewrites fix the input's shape: a spatial decoder keeps its symbolic height and width
    rewrites = "" if spatial else _rewrite_for_onnxruntime(decoder, info["latent_dim"])
    wrapper = _MeanAndParams(decoder, info["output_transform"])
    example = torch.randn(EXPORT_BATCH, *info["latent_shape"])
    proto, exporter_name, notes = _to_onnx(wrapper, example, opset, exporter,
                                           io=SPATIAL_DECODER_IO if spatial else DECODER_IO)
    _drop_initializer_value_info(proto)
    meta = _metadata(info, source, exporter_name)
    _set_metadata(proto, {**meta, "precision": "fp32"})
    _save(proto, file)
    del proto
    _check(file)
    return _Built(file, info, reference, meta, exporter_name, _opset_of(file), rewrites, notes)


def _validate(built: _Built, check_batches, rtol: float, atol: float) -> dict[int, float]:
    """onnxruntime vs torch at ``check_batches`` (FastVAEError outside rtol/atol); the largest
    error goes into the file's metadata."""
    parity = _parity(built.reference, built.file, built.info, check_batches, rtol, atol)
    _update_metadata(built.file, {"max_abs_error_vs_torch": f"{max(parity.values()):.3e}"})
    return parity


def _write_variants(built: _Built, path: Path, staging: Path, *, fp16: bool, int8: bool) -> list[VariantReport]:
    """The fp16/int8 files in ``staging``, checked, with their error vs the fp32 torch decoder
    on VARIANT_EVAL_N draws z ~ N(0, I) (in their metadata too)."""
    wanted = [p for p, on in (("fp16", fp16), ("int8", int8)) if on]
    if not wanted:
        return []
    if int8:
        import onnx

        from fastvae.export import quantize

        if not quantize.weight_products(onnx.load(str(built.file), load_external_data=False).graph):
            raise FastVAEError(
                f"--int8 quantizes matrix products with weights ({'/'.join(quantize.INT8_OPS)}) and this "
                "decoder has none (its convolutions stay fp32: quantized, they ran slower; attention "
                "multiplies activations): the file would be the fp32 decoder again; export without "
                "--int8 (--fp16 halves its size)")
    n = VARIANT_EVAL_N if len(built.info["latent_shape"]) == 1 else VARIANT_EVAL_SPATIAL
    z_eval = np.random.default_rng(0).standard_normal((n, *built.info["latent_shape"]), dtype=np.float32)
    reference = _torch_outputs(built.reference, z_eval)
    variants = []
    for precision in wanted:
        final = variant_path(path, precision)
        tmp = staging / final.name
        _make_variant(precision, built.file, tmp, {**built.meta, "precision": precision},
                      spatial=len(built.info["latent_shape"]) > 1)
        _check(tmp)
        err, err_mean = _variant_errors(tmp, z_eval, reference)
        _update_metadata(
            # vs_torch: this file's own error (it carried the fp32 file's, 1e-6 beside 3e-2 for int8)
            tmp, {"max_abs_error_vs_torch": f"{err:.3e}", "max_abs_error_vs_fp32": f"{err:.3e}",
                  "max_abs_error_mean_vs_fp32": f"{err_mean:.3e}"}
        )
        if not (np.isfinite(err) and np.isfinite(err_mean)):
            built.notes.append(f"{precision} variant gives non-finite outputs: do not use {final.name}")
        variants.append(VariantReport(precision, final, 0, err, err_mean))
    return variants


# -- the model ---------------------------------------------------------------------------------
def _resolve(run_or_model):
    """(model, source description) from a module or a run folder / checkpoint path."""
    import torch

    from fastvae.models import unwrap

    if isinstance(run_or_model, torch.nn.Module):
        return unwrap(run_or_model), "<in-memory module>"
    if isinstance(run_or_model, (str, os.PathLike)):
        source = Path(run_or_model)
        if not source.exists():
            raise FastVAEError(f"{source} does not exist: give a run folder or a .ckpt file")
        import fastvae

        # absolute: the metadata's "source" (shown by /metadata and Triton) must not depend on
        # the folder export ran in ("." inside the run folder)
        return unwrap(fastvae.load(source)), os.path.abspath(source)
    raise FastVAEError(
        f"export_decoder needs a fastvae model, a run folder or a .ckpt file, got {type(run_or_model).__name__}"
    )


def _describe(model) -> dict:
    """Latent size, output shape and likelihood of a fastvae VAE or stacked autoencoder."""
    decoder = getattr(model, "decoder", None)
    latent_dim = getattr(model, "latent_dim", None)
    data_shape = getattr(model, "data_shape", None)
    kind = getattr(model, "kind", None)
    if decoder is None or latent_dim is None or data_shape is None or kind not in ("vae", "ae"):
        raise FastVAEError(
            f"{type(model).__name__} is not a fastvae model (needs .decoder, .latent_dim, "
            ".data_shape and .kind): pass a VAE or StackedAutoencoder, a run folder or a .ckpt file"
        )
    spec = dict(getattr(model, "spec", {}) or {})
    sigma = None
    if kind == "ae":
        likelihood = "none"
    else:
        likelihood = model.likelihood.kind
        if likelihood in ("gaussian", "laplace"):
            sigma = float(model.likelihood.log_scale.detach().float().exp().cpu())
    transform, sample = md.LIKELIHOOD_RULES[likelihood]
    latent_shape = tuple(int(s) for s in getattr(model, "latent_shape", (latent_dim,)))
    return {
        "latent_dim": int(latent_dim),
        "latent_shape": latent_shape,
        # spatial latents: output pixels per latent position along each axis
        "downsample": int(data_shape[-1]) // latent_shape[-1] if len(latent_shape) == 3 else None,
        "output_shape": tuple(int(s) for s in data_shape),
        "likelihood": likelihood,
        "output_transform": transform,
        "sample": sample,
        "sigma": sigma,
        "spec": spec,
    }


def _fp32_decoder(model):
    """An fp32, CPU, eval-mode, grad-free deep copy of the decoder (the model is untouched)."""
    return fp32_copy(model.decoder)


def fp32_copy(module):
    """An fp32, CPU, eval-mode, grad-free deep copy of ``module`` (unwrapped; untouched)."""
    import torch

    from fastvae.models import unwrap

    module = copy.deepcopy(unwrap(module))
    module = module.to(device="cpu", dtype=torch.float32).eval()
    module.requires_grad_(False)
    return module


def _rewrite_for_onnxruntime(decoder, latent_dim: int) -> str:
    """Rewrite ``decoder`` in place into the same function in a form onnxruntime runs faster:
    convolutions on small inputs as one dense matrix product (``dense.py``), the remaining
    transposed convolutions as Conv + PixelShuffle (``subpixel.py``). Returns what was done
    ("" when nothing was)."""
    import torch

    from fastvae.export.dense import lower_small_convolutions
    from fastvae.export.subpixel import rewrite_transposed_convs

    dense = lower_small_convolutions(decoder, torch.zeros(1, latent_dim))
    subpixel = rewrite_transposed_convs(decoder)
    decoder.requires_grad_(False)
    done = [f"{dense} convolution(s) as one dense Gemm each" if dense else "",
            f"{subpixel} transposed convolution(s) as Conv + DepthToSpace" if subpixel else ""]
    return ", ".join(d for d in done if d)


def _mean_and_params_class():
    import torch

    class MeanAndParams(torch.nn.Module):
        """z -> (mean, params): the exported graph."""

        def __init__(self, decoder, transform: str):
            super().__init__()
            self.decoder = decoder
            self.transform = transform

        def forward(self, z):
            params = self.decoder(z)
            mean = torch.sigmoid(params) if self.transform == "sigmoid" else params.clone()
            return mean, params

    return MeanAndParams


def _MeanAndParams(decoder, transform):  # noqa: N802 - builds the nn.Module lazily (no torch at import)
    return _mean_and_params_class()(decoder, transform).eval()


# -- export ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphIO:
    """A graph's input and output names, which dims of the input are symbolic, and which of
    every output (by default the input's names: the batch); the outputs' other dims are
    declared with their sizes."""

    input_name: str
    output_names: tuple[str, ...]
    dynamic: dict  # input dim -> symbolic name
    what: str = "decoder"
    output_dynamic: dict | None = None  # output dim -> symbolic name (None: as ``dynamic``)


DECODER_IO = GraphIO(md.INPUT_NAME, (md.MEAN_OUTPUT, md.PARAMS_OUTPUT), {0: "batch"})
# a spatial decoder makes f times larger images: its outputs' height and width are other names
SPATIAL_DECODER_IO = GraphIO(md.INPUT_NAME, (md.MEAN_OUTPUT, md.PARAMS_OUTPUT),
                             {0: "batch", 2: "height", 3: "width"},
                             output_dynamic={0: "batch", 2: "image_height", 3: "image_width"})


def _to_onnx(wrapper, z, opset: int | None, exporter: str, io: GraphIO = DECODER_IO):
    """(onnx.ModelProto, exporter description, notes) for the wrapper on the example input
    ``z``, the dims ``io.dynamic`` names symbolic."""
    import torch

    notes: list[str] = []
    use_dynamo = exporter in ("auto", "dynamo") and (opset is None or opset >= 18)
    if exporter == "auto" and len(io.dynamic) > 1:
        # symbolic height and width (spatial graphs): the dynamo exporter spent 60-75 s on a
        # tiny convkl decoder or encoder on the 2-core dev CPU, TorchScript 2-3 s for the same graph
        use_dynamo = False
    if exporter == "dynamo" and not use_dynamo:
        raise FastVAEError(f"the dynamo exporter writes opset 18 or newer, not {opset}; use --exporter torchscript")
    if use_dynamo:
        try:
            proto = _export_dynamo(wrapper, z, opset, notes, io)
            return proto, f"torch.onnx dynamo exporter (torch {torch.__version__})", notes
        except FastVAEError:
            raise
        except Exception as exc:
            if exporter == "dynamo":
                raise FastVAEError(f"torch.onnx (dynamo) could not export the {io.what}: {one_line(exc)}") from None
            notes.append(f"dynamo exporter failed ({one_line(exc, 120)}); used the TorchScript exporter")
    try:
        proto = _export_torchscript(wrapper, z, opset, notes, io)
    except Exception as exc:
        raise FastVAEError(f"torch.onnx could not export the {io.what}: {one_line(exc)}") from None
    return proto, f"torch.onnx TorchScript exporter (torch {torch.__version__})", notes


def _export_dynamo(wrapper, z, opset, notes, io: GraphIO = DECODER_IO):
    import inspect

    import torch

    dims = {axis: torch.export.Dim(name, min=1) for axis, name in io.dynamic.items()}
    argument = next(iter(inspect.signature(wrapper.forward).parameters))  # forward's input name
    with _capture(notes):
        program = torch.onnx.export(
            wrapper, (z,), None, dynamo=True, external_data=False, verbose=False, report=False,
            input_names=[io.input_name], output_names=list(io.output_names),
            dynamic_shapes={argument: dims}, opset_version=opset, optimize=True,
        )
    return program.model_proto


def _export_torchscript(wrapper, z, opset, notes, io: GraphIO = DECODER_IO):
    import io as _io

    import onnx
    import torch

    buffer = _io.BytesIO()
    outputs = io.output_dynamic or io.dynamic
    with _capture(notes):
        torch.onnx.export(
            wrapper, (z,), buffer, dynamo=False, verbose=False,
            input_names=[io.input_name], output_names=list(io.output_names),
            dynamic_axes={io.input_name: dict(io.dynamic), **{name: dict(outputs) for name in io.output_names}},
            opset_version=opset, do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    # TorchScript's shape inference may leave a fixed dim symbolic (an encoder's c latent
    # channels came out as "Addmu_dim_1"): declare every output dim, sized from a run on z
    with torch.inference_mode():
        examples = wrapper(z)
    for value, example in zip(proto.graph.output, examples):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != example.dim():
            del dims[:]
            dims.extend(onnx.TensorShapeProto.Dimension() for _ in range(example.dim()))
        for axis, size in enumerate(example.shape):
            if axis in outputs:
                dims[axis].dim_param = outputs[axis]
            else:
                dims[axis].dim_value = int(size)
    return proto


class _capture:
    """Collect warnings and torch.onnx log records raised during an export into ``notes``,
    minus the known harmless ones."""

    def __init__(self, notes: list[str]):
        self.notes = notes

    def __enter__(self):
        import contextlib
        import io

        self._warnings = warnings.catch_warnings(record=True)
        self._records = self._warnings.__enter__()
        warnings.simplefilter("always")
        self._loggers = []
        for name in ("torch.onnx", "onnxscript", "torch.export", "torch._export"):
            logger = logging.getLogger(name)
            self._loggers.append((logger, logger.level))
            logger.setLevel(logging.ERROR)
        self._stdout = contextlib.redirect_stdout(io.StringIO())  # exporter progress lines
        self._stdout.__enter__()
        return self

    def __exit__(self, *exc):
        self._stdout.__exit__(*exc)
        for logger, level in self._loggers:
            logger.setLevel(level)
        self._warnings.__exit__(*exc)
        for record in self._records:
            text = one_line(record.message, 160)
            if not any(n in text for n in _NOISE) and text not in self.notes:
                self.notes.append(text)
        return False


def _drop_initializer_value_info(proto) -> int:
    """Remove the ``graph.value_info`` entries that describe initializers; return how many.

    torch's dynamo exporter writes one per weight. They add nothing (an initializer carries its
    own type and shape) and go stale when a tool rewrites a weight under the same name:
    onnxruntime's dynamic quantizer (before 1.32) turns Gemm(transB=1) into MatMul by transposing
    the weight in place, and its shape inference then fails on every decoder ("Inferred shape and
    existing shape differ"). Our graphs have no subgraphs, so the top-level graph is enough.
    """
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    stale = [i for i, v in enumerate(graph.value_info) if v.name in weights]
    for i in reversed(stale):  # from the end, so the remaining indices stay valid
        del graph.value_info[i]
    return len(stale)


def _metadata(info: dict, source: str, exporter_name: str) -> dict[str, str]:
    from fastvae import __version__

    meta = {
        "fastvae_format": md.FORMAT,
        "fastvae_format_version": str(md.FORMAT_VERSION),
        "fastvae_version": __version__,
        "latent_dim": str(info["latent_dim"]),
        "latent_shape": json.dumps(list(info["latent_shape"])),
        "output_shape": json.dumps(list(info["output_shape"])),
        "input_name": md.INPUT_NAME,
        "mean_output": md.MEAN_OUTPUT,
        "params_output": md.PARAMS_OUTPUT,
        "output_transform": info["output_transform"],
        "likelihood": info["likelihood"],
        "sample": info["sample"],
        "model_spec": json.dumps(_read_settings(info["spec"]), sort_keys=True, default=str),
        "source": source,
        "exporter": exporter_name,
    }
    if info["sigma"] is not None:
        meta["sigma"] = repr(info["sigma"])
    if info["downsample"]:
        meta["downsample"] = str(info["downsample"])
    return meta


def _set_metadata(proto, values: dict[str, str]) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.doc_string = "fastvae decoder: z ~ N(0, I) (batch, latent_dim) -> mean, params"


def _update_metadata(path: Path, values: dict[str, str]) -> None:
    """Add metadata to a saved model without touching its weights (external data or not)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    current = {p.key: p.value for p in proto.metadata_props}
    _set_metadata(proto, {**current, **values})
    path.write_bytes(proto.SerializeToString())


def _save(proto, path: Path) -> None:
    """One self-contained file; weights go to ``<name>.data`` only beyond protobuf's 2 GB."""
    import onnx

    try:
        size = proto.ByteSize()
    except Exception:  # noqa: BLE001 - some protobuf builds refuse > 2 GB messages
        size = _PROTOBUF_LIMIT + 1
    if size <= _PROTOBUF_LIMIT:
        path.write_bytes(proto.SerializeToString())
    else:
        onnx.save_model(
            proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=f"{path.name}.data", size_threshold=1024,
        )


def _is_large(path: Path) -> bool:
    return path.stat().st_size > _PROTOBUF_LIMIT or len(_files_of(path)) > 1


def _files_of(path: Path) -> list[Path]:
    """The model file and the external data files it refers to (data first)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    tensors = list(proto.graph.initializer) + [
        a.t for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    extra = []
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and (path.parent / entry.value) not in extra:
                    extra.append(path.parent / entry.value)
    return [*extra, path]


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_opset(opset) -> int | None:
    if opset is None:
        return None
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= newest:
        raise FastVAEError(f"opset must be an integer from 9 to {newest}, got {opset!r}")
    return opset


SPATIAL_MIN_OPSET = 11  # bicubic Resize with scales and symbolic sizes, Split of channels
FLAT_MIN_OPSET = 13  # the mlp/conv decoders' rewritten graphs (9-12 failed inside torch.onnx)


def check_spatial_opset(opset, what: str) -> None:
    """A spatial-latent graph's operators need opset 11 (9 and 10 failed inside torch.onnx)."""
    if opset is not None and opset < SPATIAL_MIN_OPSET:
        raise FastVAEError(f"opset {opset} is too old for a spatial-latent {what} (--model convkl): "
                           f"give --opset {SPATIAL_MIN_OPSET} or newer, or leave it out")


# -- validation --------------------------------------------------------------------------------
def _torch_outputs(wrapper, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.inference_mode():
        mean, params = wrapper(torch.from_numpy(z))
    return mean.numpy(), params.numpy()


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise FastVAEError(f"onnxruntime cannot load the exported graph ({one_line(exc)}); try another --opset") from None


def _run(session, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, params = session.run([md.MEAN_OUTPUT, md.PARAMS_OUTPUT], {md.INPUT_NAME: z})
    return mean, params


def check_shapes(info: dict, batches) -> dict:
    """The z shapes parity is checked at, keyed as the report shows them: one per batch size
    for a flat latent; for a spatial one, batch 1 at the training latent size and batch 3 at
    another height and width (the symbolic dims)."""
    shape = info["latent_shape"]
    if len(shape) == 1:
        return {batch: (batch, *shape) for batch in batches}
    c, h, w = shape
    sizes = [(1, c, h, w), (3, c, h + h // 2 + 1, max(1, w // 2 + 3))]
    return {"x".join(map(str, s)): s for s in sizes}


def _parity(wrapper, path: Path, info: dict, batches, rtol, atol) -> dict:
    """max |onnxruntime - torch| per checked z shape (``check_shapes``); FastVAEError when
    outside rtol/atol."""
    session = _session(path)
    rng = np.random.default_rng(12345)
    errors = {}
    for batch, shape in check_shapes(info, batches).items():
        z = rng.standard_normal(shape, dtype=np.float32)
        expected = _torch_outputs(wrapper, z)
        got = _run(session, z)
        err = 0.0
        for name, e, g in zip((md.MEAN_OUTPUT, md.PARAMS_OUTPUT), expected, got):
            if g.shape != e.shape:
                raise FastVAEError(
                    f"onnxruntime output '{name}' has shape {g.shape} at batch {batch}, torch gives "
                    f"{e.shape}; nothing was written; try another --opset or --exporter"
                )
            diff = float(np.max(np.abs(g.astype(np.float64) - e))) if e.size else 0.0
            if not np.allclose(g, e, rtol=rtol, atol=atol):
                raise FastVAEError(
                    f"onnxruntime and torch disagree on '{name}' at batch {batch} (max |err| "
                    f"{diff:.2e} > rtol {rtol:g}, atol {atol:g}); nothing was written; try another "
                    "--opset or --exporter"
                )
            err = max(err, diff)
        errors[batch] = err
    return errors


def _make_variant(precision: str, fp32_path: Path, out: Path, meta: dict[str, str], *,
                  spatial: bool = False) -> None:
    import onnx

    from fastvae.export import quantize

    if precision == "fp16":
        half = quantize.to_fp16(onnx.load(str(fp32_path)), fp32_ops=quantize.FP32_OPS if spatial else ())
        _set_metadata(half, meta)
        _save(half, out)
    else:
        quantize.to_int8(fp32_path, out, large=_is_large(fp32_path))
        _update_metadata(out, meta)


def _variant_errors(path: Path, z: np.ndarray, reference) -> tuple[float, float]:
    mean, params = _run(_session(path), z)
    with np.errstate(invalid="ignore", over="ignore"):
        err = float(np.max(np.abs(params.astype(np.float64) - reference[1])))
        err_mean = float(np.max(np.abs(mean.astype(np.float64) - reference[0])))
    return (err if np.isfinite(err) else float("inf")), (err_mean if np.isfinite(err_mean) else float("inf"))


# -- files -------------------------------------------------------------------------------------
def _move_into_place(tmp: Path, final: Path) -> None:
    """fsync and rename ``tmp`` (and its external data files, first) over ``final``."""
    for src in _files_of(tmp):
        run_folder.move_into_place(src, final.parent / (final.name if src == tmp else src.name))


def _total_size(path: Path) -> int:
    return sum(p.stat().st_size for p in _files_of(path))


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _read_settings(spec: dict) -> dict:
    """The spec without the settings its model family does not read (a convkl spec's
    latent_dim 8 beside the metadata's latent_dim, its c*h*w, read as a contradiction)."""
    from fastvae.config import unused_settings

    unused = unused_settings(spec.get("model", ""))
    return {k: v for k, v in spec.items() if k not in unused}
