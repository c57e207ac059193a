"""The exported decoder on a GPU: onnxruntime's CUDA provider with and without IO binding, vs the
torch decoder on the same GPU.

Per-call latency (each round one call; ``extra_info`` p50/p99 in microseconds) of the digits MLP
decoder (8 -> 512 -> 64) and the spatial convkl decoder at 64x64 (latent 4x16x16), batches 1
and 64, one group per model and batch (``onnx-cuda-<model>-b<batch>``):

* ``torch-cuda`` (baseline): the torch decoder and likelihood mean, fp32, eager, under
  ``inference_mode``, latents already on the GPU, images left there (synchronised);
* ``ort-cuda-iobinding``: ``OnnxSampler.decode_on_device`` with the latents in an ``OrtValue``
  already in GPU memory and the images left in GPU memory (no host copy per call);
* ``ort-cuda-host``: ``OnnxSampler.decode`` on the CUDA provider, numpy in and out (a
  host-to-device and a device-to-host copy per call);
* ``ort-cpu``: the same sampler on the CPU provider.

Needs CUDA and an onnxruntime with the CUDA provider (``onnxruntime-gpu``); otherwise skipped,
except in smoke mode (``FASTVAE_BENCH_SMOKE=1``), where every path runs once on the CPU provider
and torch's CPU to check the suite. Reported, not asserted; the outputs are checked against torch.
"""

from __future__ import annotations

import numpy as np
import pytest

from common import annotate, exported_decoders, on_gpu, smoke_mode
from fastvae.export.latency import percentile

SMOKE = smoke_mode()
CUDA_EP = "CUDAExecutionProvider"
MODELS = {
    "mlp": {"model": "mlp", "data_shape": [1, 8, 8], "latent_dim": 8, "hidden_dim": 512},
    "convkl64": {"model": "convkl", "downsample": 4, "latent_channels": 4, "blocks_per_level": 1,
                 "likelihood": "gaussian", "sigma": 0.1, "data_shape": [3, 64, 64]},
}
if SMOKE:
    MODELS["convkl64"] = {**MODELS["convkl64"], "width": 8, "channel_mult": "", "data_shape": [3, 16, 16]}
BATCHES = (1, 64)
IMPLS = ("torch-cuda", "ort-cuda-iobinding", "ort-cuda-host", "ort-cpu")
ROUNDS = 3 if SMOKE else 300


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return on_gpu() and CUDA_EP in ort.get_available_providers()


USE_CUDA = _cuda_ep()
pytestmark = pytest.mark.skipif(
    not (USE_CUDA or SMOKE), reason="needs CUDA and onnxruntime's CUDA provider (onnxruntime-gpu)")
DEVICE = "cuda" if USE_CUDA else "cpu"  # smoke runs put the "cuda" paths on the CPU


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """{name: (torch model on DEVICE, decoder.onnx)}."""
    exported = exported_decoders(tmp_path_factory.mktemp("bench_onnx_cuda"), MODELS, exporter="torchscript")
    return {name: (model.to(DEVICE), report.path) for name, (model, report) in exported.items()}


def _call(impl: str, model, path, z: np.ndarray):
    """(no-argument callable, what it returns as numpy) for one implementation."""
    import onnxruntime as ort
    import torch

    from fastvae.export import OnnxSampler

    if impl == "torch-cuda":
        zt = torch.from_numpy(z).to(DEVICE)

        def run():
            with torch.inference_mode():
                x = model.likelihood.mean(model.decoder(zt))
            if USE_CUDA:
                torch.cuda.synchronize()
            return x

        return run, lambda: run().cpu().numpy()
    if impl == "ort-cpu":
        sampler = OnnxSampler(path)
        return (lambda: sampler.decode(z)), (lambda: sampler.decode(z))
    sampler = OnnxSampler(path, providers=["cuda" if USE_CUDA else "cpu"])
    if impl == "ort-cuda-host":
        return (lambda: sampler.decode(z)), (lambda: sampler.decode(z))
    on_device = ort.OrtValue.ortvalue_from_numpy(z, DEVICE, 0)
    return (lambda: sampler.decode_on_device(on_device)), (lambda: sampler.decode_on_device(on_device).numpy())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_latency(benchmark, decoders, name, batch, impl):
    import torch

    model, path = decoders[name]
    z = np.random.default_rng(batch).standard_normal((batch, *model.latent_shape), dtype=np.float32)
    run, result = _call(impl, model, path, z)

    benchmark.group = f"onnx-cuda-{name}-b{batch}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if SMOKE else 30)
    extra = {}
    stats = getattr(benchmark, "stats", None)
    data = sorted(stats.stats.data) if stats is not None else []
    if data:
        extra = dict(p50_us=percentile(data, 0.5) * 1e6, p99_us=percentile(data, 0.99) * 1e6)
    annotate(benchmark, impl=impl, baseline=impl == "torch-cuda", items=batch, case=f"{name}-b{batch}",
             batch=batch, model=name, provider_device=DEVICE, **extra)

    # correctness, not speed: every path gives torch's images (TF32 GEMMs/convolutions on a GPU)
    with torch.inference_mode():
        want = model.likelihood.mean(model.decoder(torch.from_numpy(z).to(DEVICE))).cpu().numpy()
    np.testing.assert_allclose(result(), want, rtol=1e-2, atol=1e-2)
