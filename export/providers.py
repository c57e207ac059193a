"""onnxruntime execution providers by short name: ``cpu``, ``cuda``, ``tensorrt``, ``openvino``,
``coreml``.

Torch-free. :func:`resolve` turns what a user asks for into the provider list onnxruntime takes
(a GPU or NPU provider gets the CPU provider behind it, for the operators it lacks) and refuses,
in one line naming the available ones, a provider the installed onnxruntime does not have.
"""

from __future__ import annotations

from fastvae.errors import FastVAEError

NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
CPU = NAMES["cpu"]
# where each provider keeps its tensors, for IO binding (onnxruntime's device names)
DEVICE_OF = {NAMES["cuda"]: "cuda", NAMES["tensorrt"]: "cuda"}
_INSTALL_HINT = {
    "cuda": "install onnxruntime-gpu instead of onnxruntime",
    "tensorrt": "install onnxruntime-gpu and the TensorRT libraries",
    "openvino": "install onnxruntime-openvino instead of onnxruntime",
    "coreml": "use the onnxruntime wheel for macOS",
}


def short_name(provider: str) -> str:
    """``"CUDAExecutionProvider"`` -> ``"cuda"``, ``"AzureExecutionProvider"`` -> ``"azure"``."""
    return next((s for s, full in NAMES.items() if full == provider),
                provider.removesuffix("ExecutionProvider").lower())


def available() -> list[str]:
    """Short names of the providers the installed onnxruntime offers."""
    import onnxruntime as ort

    return [short_name(p) for p in ort.get_available_providers()]


def resolve(requested) -> list[str]:
    """onnxruntime provider names for ``requested``: None or ``"cpu"`` -> the CPU provider; a
    short or full name, or a list of them, in order of preference, with the CPU provider last.

    Raises ``FastVAEError`` (one line, naming the available providers) for an unknown name or
    one this onnxruntime lacks.
    """
    import onnxruntime as ort

    if requested is None:
        requested = ["cpu"]
    elif isinstance(requested, str):
        requested = [requested]
    have = ort.get_available_providers()
    resolved = []
    for name in requested:
        key = str(name).strip()
        full = NAMES.get(key.lower(), key)
        if full not in NAMES.values():
            raise FastVAEError(
                f"unknown execution provider {name!r}: use one of {', '.join(NAMES)} "
                f"(available here: {', '.join(available())})"
            )
        if full not in have:
            short = short_name(full)
            raise FastVAEError(
                f"execution provider {short!r} is not available in this onnxruntime "
                f"{ort.__version__} (available: {', '.join(available())}): "
                f"{_INSTALL_HINT.get(short, 'install an onnxruntime build with it')}, or use cpu"
            )
        if full not in resolved:
            resolved.append(full)
    if CPU in resolved:
        resolved.remove(CPU)
    return [*resolved, CPU]


def device_type(provider: str) -> str:
    """onnxruntime's device name (``"cuda"`` or ``"cpu"``) for tensors of ``provider``."""
    return DEVICE_OF.get(provider, "cpu")
