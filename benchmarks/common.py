"""Shared helpers for the fastvae benchmark suites (``benchmarks/test_bench_*.py``).

Conventions every suite follows (also in ``benchmarks/README.md``):

* One file per suite, ``benchmarks/test_bench_<suite>.py``; its results land in
  ``benchmarks/results/<device-slug>/<suite>.json`` (pytest-benchmark JSON).
* Every benchmark test takes the pytest-benchmark ``benchmark`` fixture and calls it exactly once
  (``benchmark(fn)`` or ``benchmark.pedantic(...)``). Group the implementations that are compared
  with ``@pytest.mark.benchmark(group="<suite>-<what>")``.
* Ratios are computed by ``benchmarks/report.py`` from one JSON file (one run), per
  **comparison key** = ``(group, extra_info["case"])``. Exactly one benchmark per key carries
  ``extra_info["baseline"] = True``; each other benchmark of that key gets
  ``speedup = baseline median time / its median time`` (> 1 means faster than the baseline).
  ``extra_info["impl"]`` is the short name of the implementation (``"fused"``, ``"eager"``,
  ``"compile"``, ``"onnxruntime"``, ``"torch"``, ``"fastvae"``, ``"plain"``). When one test
  function is parametrized over sizes, put the size into ``case`` (``"B=4096,D=64"``) so that
  each size is compared with the baseline of the same size. ``annotate()`` below fills all of
  this; call it *after* the ``benchmark(...)`` call.
* ``extra_info`` holds ``throughput`` (items/s: rows, samples or examples per second),
  ``device`` (where the measured work ran: ``cuda`` or ``cpu``; CPU-side suites say ``cpu`` on
  a GPU host too) and, on GPU, ``bandwidth_GBps``, ``bandwidth_fraction`` (of the device's
  peak DRAM bandwidth) and ``peak_memory_MB``. All figures use the **median** round time.
* Sizes adapt: ``pick(smoke=..., cpu=..., gpu=...)`` gives tiny sizes in smoke mode
  (``FASTVAE_BENCH_SMOKE=1``, used with ``--benchmark-disable`` by
  ``tests/test_benchmarks_smoke.py``), small ones on a CPU and realistic ones on a GPU.
* GPU work is asynchronous: wrap the timed callable with ``synced(fn)`` so each call ends with
  ``torch.cuda.synchronize()``; warm the callable up once (Triton JIT, ``torch.compile``)
  before handing it to ``benchmark``. Use ``repeat=k`` in ``synced`` for kernels shorter than
  ~50 us (and multiply ``items`` by ``k``).
* A benchmark that needs CUDA is marked ``@requires_cuda``; a variant that is too slow for the
  smoke run on a CPU (``torch.compile`` compiles for ~20 s on 2 cores) is marked
  ``@skip_in_cpu_smoke``.

Run ``python benchmarks/common.py`` to print :func:`device_info` as JSON and
``python benchmarks/common.py slug`` to print the results folder name of this machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import importlib.metadata as _md
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# benchmarks measured in child pytest processes, merged into this run's JSON by conftest.py
MERGED_BENCHMARKS: list[dict] = []

SMOKE_ENV = "FASTVAE_BENCH_SMOKE"
DEVICE_ENV = "FASTVAE_BENCH_DEVICE"  # "cpu" forces CPU even where CUDA is available
SLUG_ENV = "FASTVAE_BENCH_SLUG"  # overrides the results folder name
COMMIT_ENV = "FASTVAE_GIT_COMMIT"  # commit to record where the tree has no .git (GPU machine)
PEAK_BW_ENV = "FASTVAE_PEAK_BW_GBPS"  # overrides the peak DRAM bandwidth table
# environment variables that change GPU timing: an interpreted kernel, serialised launches,
# compile debugging, no caching allocator. device_info() records them; gpu/run.sh unsets them
# (saying so) before it measures on CUDA.
TIMING_ENV = ("TRITON_INTERPRET", "CUDA_LAUNCH_BLOCKING", "TORCH_COMPILE_DEBUG",
              "PYTORCH_NO_CUDA_MEMORY_CACHING")


# --------------------------------------------------------------------------- modes and sizes


def smoke_mode() -> bool:
    """True when ``FASTVAE_BENCH_SMOKE`` is set to a true value: tiny sizes, run once."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())


def on_gpu() -> bool:
    """True where benchmarks run on CUDA (available and not forced off by FASTVAE_BENCH_DEVICE=cpu)."""
    if os.environ.get(DEVICE_ENV, "").strip().lower() == "cpu":
        return False
    return _cuda_available()


def bench_device():
    """The ``torch.device`` the suites benchmark on: ``cuda`` (current device) or ``cpu``."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def pick(*, smoke: T, cpu: T, gpu: T) -> T:
    """Choose a size: ``smoke`` in smoke mode (wins over the device), else ``gpu`` or ``cpu``."""
    if smoke_mode():
        return smoke
    return gpu if on_gpu() else cpu


requires_cuda = pytest.mark.skipif(not on_gpu(), reason="needs a CUDA device")
"""Mark for benchmarks that only make sense on CUDA."""

skip_in_cpu_smoke = pytest.mark.skipif(
    smoke_mode() and not on_gpu(), reason="too slow for the CPU smoke run (e.g. torch.compile)"
)
"""Mark for variants whose set-up alone would blow the smoke run's budget on a CPU."""


# --------------------------------------------------------------------------- timing


def cuda_sync() -> None:
    """``torch.cuda.synchronize()`` where CUDA is in use; a no-op on CPU."""
    if _cuda_available():
        import torch

        torch.cuda.synchronize()


def synced(fn: Callable[..., T], *args: Any, repeat: int = 1, **kwargs: Any) -> Callable[[], T]:
    """Return a no-argument callable that runs ``fn(*args, **kwargs)`` ``repeat`` times, then syncs.

    Hand it to ``benchmark(...)``: the timed region then covers the GPU work, not only its launch.
    With ``repeat > 1`` one benchmark call covers ``repeat`` calls of ``fn``; count ``items``
    accordingly in :func:`annotate`.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    sync = _cuda_available()

    def run() -> T:
        out = fn(*args, **kwargs)
        for _ in range(repeat - 1):
            out = fn(*args, **kwargs)
        if sync:
            import torch

            torch.cuda.synchronize()
        return out

    run.__name__ = getattr(fn, "__name__", "fn")
    return run


def warmup(fn: Callable[[], Any], n: int = 2) -> None:
    """Call ``fn`` ``n`` times (JIT/compile/allocator warm-up) and sync; once only in smoke mode."""
    for _ in range(1 if smoke_mode() else n):
        fn()
    cuda_sync()


@contextlib.contextmanager
def track_peak_memory() -> Iterator[dict[str, float | None]]:
    """Context manager: ``with track_peak_memory() as mem: ...`` then ``mem["MB"]``.

    ``MB`` is the peak CUDA memory allocated by torch inside the block (``None`` on CPU).
    """
    result: dict[str, float | None] = {"MB": None}
    if not _cuda_available():
        yield result
        return
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield result
    finally:
        torch.cuda.synchronize()
        result["MB"] = torch.cuda.max_memory_allocated() / 2**20


def peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float | None:
    """Peak CUDA memory (MB, torch allocator) of one call of ``fn``; ``None`` on CPU."""
    with track_peak_memory() as mem:
        fn(*args, **kwargs)
    return mem["MB"]


# --------------------------------------------------------------------------- extra_info


# Peak DRAM bandwidth in GB/s (vendor figures), matched as whole words of the device name ("L4"
# is not "L40", "H200" is not "GH200"), first match wins, so more specific names come first.
PEAK_BANDWIDTH_GBPS: list[tuple[str, float]] = [
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIE", 2000.0),
    ("H100", 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("H800", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIE", 1935.0),
    ("A100", 1555.0),
    ("A10G", 600.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("T4", 320.0),
    ("V100", 900.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
]


def peak_bandwidth_gbps(device_name: str | None = None) -> float | None:
    """Peak DRAM bandwidth (GB/s) of the CUDA device, or ``None`` if unknown / on CPU.

    ``FASTVAE_PEAK_BW_GBPS`` overrides; then the vendor table above; then the clock and bus width
    that newer torch builds report in the device properties.
    """
    override = os.environ.get(PEAK_BW_ENV)
    if override:
        return float(override)
    if device_name is None:
        if not on_gpu():
            return None
        import torch

        device_name = torch.cuda.get_device_name()
    upper = device_name.upper()
    for key, gbps in PEAK_BANDWIDTH_GBPS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(key.upper())}(?![A-Z0-9])", upper):
            return gbps
    if on_gpu():
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        if clock_khz and bus_bits:
            return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return None


def _median_seconds(benchmark: Any) -> float | None:
    stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
    inner = getattr(stats, "stats", None)
    try:
        median = float(inner.median) if inner is not None else None
    except (ValueError, TypeError, ZeroDivisionError):  # no rounds recorded
        return None
    return median if median and median > 0 else None


def annotate(
    benchmark: Any,
    *,
    impl: str,
    baseline: bool = False,
    items: float | None = None,
    bytes_moved: float | None = None,
    peak_memory_MB: float | None = None,
    case: str | None = None,
    device: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Fill ``benchmark.extra_info`` by the suite conventions; call it after ``benchmark(...)``.

    ``items``: items processed by one benchmarked call (rows, samples, examples) ->
    ``throughput`` (items/s). ``bytes_moved``: DRAM bytes one call must read+write at least ->
    ``bandwidth_GBps`` and, where the peak is known, ``bandwidth_fraction``.
    ``peak_memory_MB``: from :func:`peak_memory`. ``device``: the device the measured work ran
    on (default: the benchmark device, ``cuda`` where on_gpu()); CPU-side suites (sampling,
    latency, serving, the loaders) pass ``"cpu"``, also on a GPU host. Other keywords are stored
    as they are (JSON types only). Works with ``--benchmark-disable`` (then only the static
    fields are stored).
    """
    info = benchmark.extra_info
    info["impl"] = impl
    info["baseline"] = bool(baseline)
    info["device"] = device or ("cuda" if on_gpu() else "cpu")
    if case is not None:
        info["case"] = case
    if items is not None:
        info["items"] = items
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
    if peak_memory_MB is not None:
        info["peak_memory_MB"] = round(float(peak_memory_MB), 3)
    info.update(extra)
    seconds = _median_seconds(benchmark)
    if seconds is not None:
        if items is not None:
            info["throughput"] = items / seconds
        if bytes_moved is not None:
            gbps = bytes_moved / seconds / 1e9
            info["bandwidth_GBps"] = gbps
            peak = peak_bandwidth_gbps() if info["device"] == "cuda" and on_gpu() else None
            if peak:
                info["bandwidth_fraction"] = gbps / peak
    return info


# --------------------------------------------------------------------------- reparam_kl


def reparam_kl_eager(mu, logvar):
    """The eager torch reference of the fused op: z = mu + exp(logvar/2) * eps with eps drawn by
    ``randn_like`` (autograd keeps it), kl = 0.5 sum(mu^2 + e^lv - 1 - lv) per row in fp32."""
    import torch

    eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar).float().sum(-1)
    return z, kl


def reparam_kl_bytes(B: int, D: int, itemsize: int, mode: str) -> int:
    """The op's **required** DRAM bytes, each tensor counted once (the count the acceptance is
    stated on, and the device benchmark's ``bytes`` / ``frac_of_copy``; the same for every
    implementation): ``fwd`` reads mu, logvar and writes z, kl (fp32): 3 B x D elements + 4B;
    ``fwd_bwd`` also reads grad_z, grad_kl and writes grad_mu, grad_logvar: 6 B x D + 8B.
    What the fused kernels themselves move is :func:`reparam_kl_kernel_bytes`."""
    if mode == "fwd":
        return 3 * B * D * itemsize + 4 * B
    return 6 * B * D * itemsize + 8 * B


def reparam_kl_kernel_bytes(B: int, D: int, itemsize: int, mode: str) -> int:
    """The fused kernels' **own** DRAM traffic (``kernel_bytes`` / ``kernel_frac_of_copy`` of the
    device benchmark; ``GBps`` of ``gpu/tile_sweep.py``, per kernel): the forward kernel moves
    what :func:`reparam_kl_bytes` counts (3 B x D + 4B); its backward kernel reads mu, logvar,
    grad_z, grad_kl again and writes grad_mu, grad_logvar (5 B x D + 4B), so ``fwd_bwd`` is
    8 B x D + 8B, and ``bwd`` (the backward kernel alone) 5 B x D + 4B."""
    if mode == "fwd":
        return 3 * B * D * itemsize + 4 * B
    if mode == "bwd":
        return 5 * B * D * itemsize + 4 * B
    if mode == "fwd_bwd":
        return 8 * B * D * itemsize + 8 * B
    raise ValueError(f"mode must be fwd, bwd or fwd_bwd, got {mode!r}")


# --------------------------------------------------------------------------- L2 flush


class L2Flush:
    """Evicts the GPU's L2 cache between timed calls by **reading** a buffer larger than any L2
    (a sum into a preallocated one-element output): L2 then holds clean lines only. A write
    flush (``buf.zero_()``, triton's ``do_bench``) leaves up to an L2 of dirty lines that are
    written back inside the next timed call. Call it outside the timed region."""

    def __init__(self, nbytes: int = 256 << 20, device: Any = "cuda"):
        import torch

        self.buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.int32, device=device)
        self.sink = torch.empty((), dtype=torch.int64, device=device)

    def __call__(self) -> None:
        import torch

        torch.sum(self.buf, dim=0, out=self.sink)


# --------------------------------------------------------------------------- device info


def exported_decoders(folder: Path, specs: dict[str, dict], **export_kwargs: Any) -> dict[str, tuple]:
    """{name: (model, ExportReport)}: for each spec a model built with ``torch.manual_seed(0)``
    (eval mode) and its decoder exported to ``folder/NAME.onnx`` (``export_kwargs``: those of
    ``fastvae.export.export_decoder``). Random weights: speed does not depend on their values."""
    import torch

    from fastvae.export import export_decoder
    from fastvae.models import build_model

    out = {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        model = build_model(spec).eval()
        out[name] = (model, export_decoder(model, Path(folder) / f"{name}.onnx", **export_kwargs))
    return out


def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """``{"id": sha or "unknown", "dirty": bool | None}``; ``FASTVAE_GIT_COMMIT`` wins (a copy
    without .git: ``git describe --always --dirty --abbrev=40``'s output, its "-dirty" read)."""
    env = os.environ.get(COMMIT_ENV)
    if env:
        dirty = env.endswith("-dirty")
        return {"id": env.removesuffix("-dirty"), "dirty": True if dirty else None}
    sha = _run(["git", "rev-parse", "HEAD"])
    if not sha:
        return {"id": "unknown", "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"id": sha, "dirty": bool(status) if status is not None else None}


def cpu_name() -> str:
    """The CPU's brand string (``/proc/cpuinfo`` model name) or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slugify(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    text = re.sub(r"\((r|tm|c)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"@.*$", "", text)  # "CPU @ 2.20GHz"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug() -> str:
    """Folder name under ``benchmarks/results/``: the GPU's name, or ``cpu-<brand>``.

    ``FASTVAE_BENCH_SLUG`` overrides.
    """
    override = os.environ.get(SLUG_ENV)
    if override:
        return slugify(override)
    if on_gpu():
        import torch

        return slugify(torch.cuda.get_device_name())
    brand = re.sub(r"\b(cpu|processor)\b", "", cpu_name(), flags=re.IGNORECASE)
    return "cpu-" + slugify(brand)


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` (``None`` where there is none)."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _onnxruntime_providers() -> list[str] | None:
    """The execution providers the installed onnxruntime offers (None: it does not import)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def device_info() -> dict[str, Any]:
    """Where and with what a benchmark ran: device, versions, date, git commit.

    Keys: ``device`` (GPU or CPU name), ``device_type``, ``slug``, ``gpu_count``,
    ``gpu_memory_GB``, ``peak_bandwidth_GBps``, ``cuda``, ``cudnn``, ``driver``, ``cpu``,
    ``cpu_count``, ``torch``, ``triton``, ``onnxruntime``, ``onnxruntime_providers``, ``onnx``, ``numpy``,
    ``lightning_fabric``, ``pytest_benchmark``, ``fastvae``, ``python``, ``platform``,
    ``date`` (UTC, ISO 8601), ``git_commit``, ``git_dirty``, ``smoke``, ``env`` (the values of
    the ``TIMING_ENV`` variables, None where unset), ``loadavg``.
    """
    import torch

    info: dict[str, Any] = {}
    gpu = on_gpu()
    if gpu:
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["device"] = torch.cuda.get_device_name(idx)
        info["device_type"] = "cuda"
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_GB"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["peak_bandwidth_GBps"] = peak_bandwidth_gbps(info["device"])
    else:
        info["device"] = cpu_name()
        info["device_type"] = "cpu"
        info["gpu_count"] = 0
    info["slug"] = device_slug()
    info["cuda"] = torch.version.cuda
    try:
        info["cudnn"] = torch.backends.cudnn.version() if gpu else None
    except Exception:  # noqa: BLE001 - informational only
        info["cudnn"] = None
    info["driver"] = nvidia_driver_version() if gpu else None
    info["cpu"] = cpu_name()
    info["cpu_count"] = os.cpu_count()
    info["torch"] = torch.__version__
    for key, dist in [
        ("triton", "triton"),
        ("onnxruntime", "onnxruntime"),
        ("onnx", "onnx"),
        ("numpy", "numpy"),
        ("lightning_fabric", "lightning-fabric"),
        ("pytest_benchmark", "pytest-benchmark"),
        ("fastvae", "fastvae"),
    ]:
        info[key] = _version(dist)
    info["onnxruntime_providers"] = _onnxruntime_providers()
    if info["lightning_fabric"] is None and _version("lightning"):
        info["lightning_fabric"] = "lightning " + str(_version("lightning"))
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    info["date"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    commit = git_commit()
    info["git_commit"] = commit["id"]
    info["git_dirty"] = commit["dirty"]
    info["smoke"] = smoke_mode()
    # settings that change GPU timing (gpu/run.sh unsets them on CUDA): None where unset
    info["env"] = {k: os.environ.get(k) for k in TIMING_ENV}
    # other work on the machine when the run started (1, 5, 15 min): shared CPUs make noisy figures
    info["loadavg"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return info


def _main(argv: list[str]) -> int:
    if argv[:1] == ["slug"]:
        print(device_slug())
        return 0
    if argv[:1] == ["timing-env"]:  # the variables gpu/run.sh unsets on CUDA
        print(" ".join(TIMING_ENV))
        return 0
    if argv[:1] == ["cuda-slug"]:  # one torch import for benchmarks/gpu/run.sh
        print(int(on_gpu()), device_slug())
        return 0
    if argv[:1] in ([], ["info"]):
        print(json.dumps(device_info(), indent=2))
        return 0
    print("usage: python benchmarks/common.py [info|slug|cuda-slug|timing-env]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
