"""fastvae: train VAEs fast on CPUs and GPUs, ship the decoder as ONNX.

Heavy modules (torch, Fabric) load lazily on first attribute access, so
``from fastvae.export import OnnxSampler`` runs in an image without torch.
``fastvae.train(config)`` is ``fastvae.trainer.train``; ``fastvae.evaluate(model, data)`` is
``fastvae.evaluation.evaluate``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

__version__ = "0.1.0"

# A source checkout keeps kernels/ and export/ beside fastvae/ (the repository's top-level
# layout); an install maps them to fastvae.kernels and fastvae.export (pyproject's package-dir).
# Searching the checkout's root for subpackages too makes them import the same way from a bare
# checkout (PYTHONPATH=., or the repository root as the working directory), installed or not.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "kernels" / "__init__.py").is_file():
    __path__.append(str(_checkout))

# a rank started by --strategy ddp_spawn (a new interpreter) holds Ctrl-C and its launcher's
# forwarded stop from its first import on (fastvae.stop_signals.hold_rank_signals)
if os.environ.get("FASTVAE_RANK_OF") not in (None, str(os.getpid())):
    from fastvae.stop_signals import hold_rank_signals

    hold_rank_signals()

_LAZY = {
    "train": ("fastvae.trainer", "train"),
    "evaluate": ("fastvae.evaluation", "evaluate"),
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
