"""Per-call latency of ONE runtime, in a pytest process of its own (thread pools never contend).

Not a suite: ``test_bench_latency.py`` runs this file in a fresh pytest process per runtime,
``FASTVAE_LATENCY_RUNTIME`` = ``torch`` (the decoder under ``inference_mode``, eager),
``onnxruntime`` (``OnnxSampler.decode``) or ``gemm`` (the decoder's two GEMMs alone, torch's and
numpy's: the CPU's fp32 GEMM ceiling for these shapes), with the decoder files in
``FASTVAE_LATENCY_DIR``, and merges the benchmarks into its own results. Each round is one call,
so the rounds are per-call latencies: ``extra_info`` holds p50/p99 in microseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from common import annotate, smoke_mode
from fastvae.export.latency import percentile

# one runtime per process when timing; the smoke run (nothing timed) takes all three in one
RUNTIMES = os.environ.get("FASTVAE_LATENCY_RUNTIME", "onnxruntime").split(",")
FOLDER = Path(os.environ.get("FASTVAE_LATENCY_DIR", "."))
BATCHES = (1, 8, 64, 1000)
ROUNDS = {1: 3000, 8: 2000, 64: 1000, 1000: 300}


def _rounds(batch: int) -> int:
    return 3 if smoke_mode() else ROUNDS[batch]


def _z(batch: int, latent: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, latent), dtype=np.float32)


def _decode_fn(runtime: str, batch: int, threads: int | None):
    """(call, extra_info) for one decode of ``batch`` rows; ``threads`` None: the runtime's default."""
    spec = json.loads((FOLDER / "spec.json").read_text())
    z = _z(batch, spec["latent_dim"])
    if runtime == "onnxruntime":
        from fastvae.export import OnnxSampler

        sampler = OnnxSampler(FOLDER / "decoder.onnx", threads=threads)
        return lambda: sampler.decode(z, batch_size=batch), {"threads": sampler.threads_for(batch) or "all"}
    import torch

    from fastvae.models import build_model

    torch.set_num_threads(threads or _TORCH_DEFAULT_THREADS)
    model = build_model(spec).eval()
    model.load_state_dict(torch.load(FOLDER / "model.pt", weights_only=True))
    zt = torch.from_numpy(z)

    def run():
        with torch.inference_mode():
            return model.likelihood.mean(model.decoder(zt)).numpy()

    return run, {"threads": torch.get_num_threads()}


def _torch_default_threads() -> int | None:
    if "torch" not in RUNTIMES and "gemm" not in RUNTIMES:
        return None
    import torch

    return torch.get_num_threads()


_TORCH_DEFAULT_THREADS = _torch_default_threads()
# default threads, and one thread: on a CPU shared with other work, a second thread mostly waits
# for a core (figures of both are recorded, the one-thread ones as cases "b<batch>-1thread")
THREADS = (None, 1)


def _record(benchmark, impl: str, batch: int, setting: int | None, baseline: bool, **extra):
    """Per-call p50/p99 from the rounds; ``setting``: the threads asked for (None: default)."""
    stats = getattr(benchmark, "stats", None)
    data = sorted(stats.stats.data) if stats is not None else []
    if data:
        extra["p50_us"], extra["p99_us"] = percentile(data, 0.50) * 1e6, percentile(data, 0.99) * 1e6
        extra["p99_over_p50"] = extra["p99_us"] / extra["p50_us"]
    case = f"b{batch}" if setting is None else f"b{batch}-{setting}thread"
    annotate(benchmark, impl=impl, baseline=baseline, items=batch, case=case, batch=batch,
             loadavg_1m=os.getloadavg()[0], process="own", device="cpu", **extra)


@pytest.mark.parametrize("threads", THREADS, ids=["default-threads", "1thread"])
@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r != "gemm"])
@pytest.mark.parametrize("batch", BATCHES)
def test_latency(benchmark, runtime, batch, threads):
    fn, info = _decode_fn(runtime, batch, threads)
    benchmark.group = f"latency-b{batch}"
    benchmark.pedantic(fn, rounds=_rounds(batch), iterations=1, warmup_rounds=1 if smoke_mode() else 50)
    _record(benchmark, runtime, batch, threads, baseline=runtime == "torch", **info)


@pytest.mark.skipif("gemm" not in RUNTIMES, reason="runs in the gemm process")
@pytest.mark.parametrize("library,threads", [("torch", None), ("torch", 1), ("numpy", None)],
                         ids=["torch", "torch-1thread", "numpy"])
def test_gemm_ceiling(benchmark, library, threads):
    """The decoder's two fp32 GEMMs at batch 1000 (no bias, activation or sigmoid), outputs
    preallocated: what the CPU's GEMM kernels give for these shapes."""
    spec = json.loads((FOLDER / "spec.json").read_text())
    batch, latent, hidden = 1000, spec["latent_dim"], spec["hidden_dim"]
    out_dim = int(np.prod(spec["data_shape"]))
    rng = np.random.default_rng(0)
    z = _z(batch, latent)
    w1 = rng.standard_normal((latent, hidden), dtype=np.float32)
    w2 = rng.standard_normal((hidden, out_dim), dtype=np.float32)
    h, o = np.empty((batch, hidden), np.float32), np.empty((batch, out_dim), np.float32)
    if library == "torch":
        import torch

        torch.set_num_threads(threads or _TORCH_DEFAULT_THREADS)
        tz, tw1, tw2, th, to = map(torch.from_numpy, (z, w1, w2, h, o))

        def fn():
            torch.mm(tz, tw1, out=th)
            torch.mm(th, tw2, out=to)
    else:
        def fn():
            np.matmul(z, w1, out=h)
            np.matmul(h, w2, out=o)

    benchmark.group = "latency-b1000"
    benchmark.pedantic(fn, rounds=_rounds(batch), iterations=1, warmup_rounds=1 if smoke_mode() else 50)
    flops = 2 * batch * (latent * hidden + hidden * out_dim)
    _record(benchmark, f"gemm-{library}", batch, threads, baseline=False, flops_per_call=flops)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["gflops"] = flops / stats.stats.median / 1e9
