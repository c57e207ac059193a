"""ONNX export of fastvae decoders, validation, fp16/int8 variants and a torch-free CPU sampler.

Installed as ``fastvae.export``.

* ``export_decoder(run_or_model, path, *, opset=None, fp16=False, int8=False) -> ExportReport``
  writes one self-contained ONNX file (input ``z``: (batch, latent_dim), or (batch, c, h, w)
  for a spatial decoder with h and w symbolic; outputs ``mean`` and ``params``), checks it with
  ``onnx.checker`` and compares onnxruntime with torch. Needs torch,
  which it imports only when called.
* ``OnnxSampler(path, providers=["cpu"]).sample(n, seed=None, batch_size=1000) -> numpy array``
  (``seed=None``: fresh samples each call; an int: reproducible) needs only numpy and
  onnxruntime: importing this package or the sampler never imports torch.
* ``OnnxEncoder(path).encode(images) -> (mu, logvar)``: a spatial run's exported encoder, as
  torch-free as the sampler.
* ``write_triton_repository(decoder.onnx, DIR)``: a Triton Inference Server model repository.
* ``fastvae serve`` (``http_service``): the decoder over HTTP with dynamic batching, torch-free.

The file format (metadata keys) is described in :mod:`fastvae.export.metadata`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "OnnxSampler": "fastvae.export.sampler",
    "OnnxEncoder": "fastvae.export.onnx_encoder",
    "export_decoder": "fastvae.export.onnx_export",
    "ExportReport": "fastvae.export.onnx_export",
    "VariantReport": "fastvae.export.onnx_export",
    "variant_path": "fastvae.export.onnx_export",
    "write_triton_repository": "fastvae.export.triton_repo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastvae.export' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
