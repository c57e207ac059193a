"""fastvae: train VAEs fast on CPUs and GPUs, ship the decoder as ONNX.

Heavy modules (torch, Fabric) load lazily on first attribute access, so
``from fastvae.export import OnnxSampler`` runs in an image without torch.
Training and evaluation live in their modules: ``from fastvae.trainer import train``,
``from fastvae.evaluation import evaluate`` (a package attribute of the same name as a submodule
would be shadowed by the submodule).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": ("fastvae.checkpoint", "load"),
    "TrainConfig": ("fastvae.config", "TrainConfig"),
    "build_model": ("fastvae.models", "build_model"),
    "VAE": ("fastvae.models", "VAE"),
    "load_dataset": ("fastvae.data", "load_dataset"),
    "FastVAEError": ("fastvae.errors", "FastVAEError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastvae' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
