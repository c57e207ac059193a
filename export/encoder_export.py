"""``export_encoder``: a spatial-latent model's encoder as one validated ONNX file.

The graph maps ``image`` (batch, C, H, W), float32 in [0, 1], to ``mu`` and ``logvar``, each
(batch, c, H/f, W/f) float32: q(z|x) = N(mu, diag exp(logvar)), logvar already clamped to
[-30, 20]. Batch, H and W are symbolic (H and W multiples of f), so a production pipeline
encodes images of any size and decodes the latents with the decoder file, without torch.

Validated as the decoder is (``fastvae.export.onnx_export``): ``onnx.checker``, then onnxruntime
against the untouched torch encoder at two image sizes (rtol 1e-4, atol 1e-5), everything
written to a temporary folder and moved into place only once it passed. Metadata: the decoder
file's keys where they apply (``fastvae_format`` ``"fastvae-encoder"``, ``latent_shape``,
``downsample``, ``input_shape`` (C, H, W at training size), ``max_abs_error_vs_torch``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastvae import run_folder
from fastvae.errors import FastVAEError, one_line, write_failure
from fastvae.export import onnx_export as ox
from fastvae.float32_default import float32_by_default

FORMAT = "fastvae-encoder"
INPUT_NAME, MU_OUTPUT, LOGVAR_OUTPUT = "image", "mu", "logvar"
ENCODER_IO = ox.GraphIO(INPUT_NAME, (MU_OUTPUT, LOGVAR_OUTPUT), {0: "batch", 2: "height", 3: "width"}, "encoder",
                        output_dynamic={0: "batch", 2: "latent_height", 3: "latent_width"})


@dataclass
class EncoderExportReport:
    """What ``export_encoder`` wrote and how validation went."""

    path: Path
    size_bytes: int
    opset: int
    exporter: str
    input_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    parity: dict[str, float]  # image shape "BxCxHxW" -> max |onnxruntime - torch| (mu and logvar)
    rtol: float = ox.RTOL
    atol: float = ox.ATOL

    def summary(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        latent = "x".join(map(str, self.latent_shape))
        return "\n".join([
            f"wrote {self.path} ({ox._size(self.size_bytes)}, ONNX opset {self.opset}, {self.exporter})",
            f"  encoder: image {shape} -> mu, logvar {latent} at training size (batch, height and width symbolic)",
            "  parity onnxruntime vs torch (rtol %.0e, atol %.0e): ok, max |err| %s"
            % (self.rtol, self.atol, ", ".join(f"image {k}: {e:.2e}" for k, e in self.parity.items())),
        ])


def encoder_path(decoder_path: str | os.PathLike) -> Path:
    """Where the encoder goes beside a decoder file: ``decoder.onnx`` -> ``encoder.onnx``,
    ``run.onnx`` -> ``run.encoder.onnx``."""
    path = Path(decoder_path)
    if path.stem == "decoder":
        return path.with_name("encoder" + (path.suffix or ".onnx"))
    return path.with_name(f"{path.stem}.encoder{path.suffix or '.onnx'}")


@float32_by_default
def export_encoder(run_or_model, path: str | os.PathLike, *, opset: int | None = None,
                   exporter: str = "auto", rtol: float = ox.RTOL, atol: float = ox.ATOL) -> EncoderExportReport:
    """Export the encoder of a spatial-latent run folder, checkpoint or model and validate it.
    Raises ``FastVAEError`` (and writes nothing) when the model has no spatial encoder or the
    export or its validation fails."""
    import onnx
    import torch

    path = Path(path)
    if exporter not in ox.EXPORTERS:
        raise FastVAEError(f"exporter must be one of {ox.EXPORTERS}, got {exporter!r}")
    opset = ox._check_opset(opset)
    if path.is_dir():
        raise FastVAEError(f"{path} is a folder: give a file name such as {path / 'encoder.onnx'}")
    model, source = ox._resolve(run_or_model)
    latent_shape = tuple(getattr(model, "latent_shape", ()))
    name = getattr(model, "spec", {}).get("model", type(model).__name__)
    if len(latent_shape) != 3:
        raise FastVAEError(f"--encoder exports the encoder of a spatial-latent VAE (--model convkl); "
                           f"{source} is a {name} model")
    if getattr(model, "kind", None) != "vae":
        raise FastVAEError(f"--encoder exports a VAE's encoder (images -> mu, logvar); {source} is a "
                           f"deterministic {name} autoencoder (--kind ae): train with --kind vae")
    ox.check_spatial_opset(opset, "encoder")
    input_shape = tuple(int(s) for s in model.data_shape)
    f = input_shape[-1] // latent_shape[-1]
    encoder = ox.fp32_copy(model.encoder)
    example = torch.rand(ox.EXPORT_BATCH, *input_shape)
    try:
        with run_folder.temporary_folder(path) as staging:
            file = staging / path.name
            proto, exporter_name, _ = ox._to_onnx(encoder, example, opset, exporter, io=ENCODER_IO)
            ox._drop_initializer_value_info(proto)
            meta = _metadata(source, exporter_name, input_shape, latent_shape, f)
            ox._set_metadata(proto, meta)
            proto.doc_string = "fastvae encoder: image (batch, C, H, W) in [0, 1] -> mu, logvar (batch, c, H/f, W/f)"
            ox._save(proto, file)
            ox._check(file)
            parity = _parity(encoder, file, input_shape, f, rtol, atol)
            ox._update_metadata(file, {"max_abs_error_vs_torch": f"{max(parity.values()):.3e}"})
            ox._move_into_place(file, path)
    except OSError as exc:
        raise FastVAEError(f"could not write {path} ({write_failure(exc)}); nothing was written") from None
    except onnx.checker.ValidationError as exc:
        raise FastVAEError(f"the exported encoder failed onnx.checker ({one_line(exc)}); nothing was "
                           f"written to {path}; try another --opset or --exporter") from None
    return EncoderExportReport(path, ox._total_size(path), ox._opset_of(path), exporter_name,
                               input_shape, latent_shape, parity, rtol, atol)


def _metadata(source: str, exporter_name: str, input_shape, latent_shape, f: int) -> dict[str, str]:
    from fastvae import __version__
    from fastvae.export import metadata as md

    return {
        "fastvae_format": FORMAT, "fastvae_format_version": str(md.FORMAT_VERSION),
        "fastvae_version": __version__, "input_name": INPUT_NAME,
        "mu_output": MU_OUTPUT, "logvar_output": LOGVAR_OUTPUT,
        "input_shape": json.dumps(list(input_shape)), "latent_shape": json.dumps(list(latent_shape)),
        "downsample": str(f), "source": source, "exporter": exporter_name, "precision": "fp32",
    }


def _parity(encoder, file: Path, input_shape, f: int, rtol: float, atol: float) -> dict[str, float]:
    """max |onnxruntime - torch| at batch 1 of the training size and batch 3 of another size
    (multiples of f); FastVAEError outside rtol/atol."""
    import torch

    c, h, w = input_shape
    shapes = [(1, c, h, w), (3, c, h + f * (h // f // 2 + 1), max(f, w // 2 // f * f + f))]
    session = ox._session(file)
    rng = np.random.default_rng(12345)
    errors = {}
    for shape in shapes:
        x = rng.random(shape, dtype=np.float32)
        with torch.inference_mode():
            expected = [t.numpy() for t in encoder(torch.from_numpy(x))]
        got = session.run([MU_OUTPUT, LOGVAR_OUTPUT], {INPUT_NAME: x})
        key = "x".join(map(str, shape))
        err = 0.0
        for name, e, g in zip((MU_OUTPUT, LOGVAR_OUTPUT), expected, got):
            if g.shape != e.shape or not np.allclose(g, e, rtol=rtol, atol=atol):
                diff = float(np.max(np.abs(g - e))) if g.shape == e.shape else float("inf")
                raise FastVAEError(f"onnxruntime and torch disagree on the encoder's '{name}' for images {key} "
                                   f"(max |err| {diff:.2e}); nothing was written; try another --opset or --exporter")
            err = max(err, float(np.max(np.abs(g.astype(np.float64) - e))))
        errors[key] = err
    return errors
