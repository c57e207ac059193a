"""CPU sampling throughput: the exported decoder in ONNX Runtime vs the same decoder in torch.

Each model draws 10,000 samples (means of p(x|z), z ~ N(0, I) from a seeded numpy generator) in
batches of 1,000, three ways, side by side in one run (one pytest-benchmark group per model):

* ``torch``: the fp32 decoder + sigmoid under ``torch.inference_mode`` (torch's default threads);
* ``onnxruntime``: ``fastvae.export.OnnxSampler`` on the fp32 file (the sampler's defaults);
* ``onnxruntime-int8``: the same sampler on the dynamically quantized file.

Models (random weights: speed does not depend on their values): the digits MLP decoder
8-512-64, the digits conv decoder (8 -> 512 -> 64x2x2 -> deconvs -> 1x8x8; exported with its
deconvolutions as dense Gemms) and the same conv decoder for 28x28 MNIST-sized images
(``conv28``: 8 -> 512 -> 64x7x7 -> deconvs -> 1x28x28; exported as Conv + DepthToSpace).

``extra_info`` holds ``samples_per_s`` (from the median time of a round, the suites'
convention) and, for the onnxruntime rows, ``speedup_vs_torch`` (torch median time / this median
time, same run), and ``device``: ``cpu`` (the work runs on the CPU, also on a GPU host). Speed is
reported here only, never asserted; the tests check that the outputs agree.

    pytest benchmarks/test_bench_sampling.py                       # measure
    pytest benchmarks/test_bench_sampling.py --benchmark-disable   # smoke: each path once
    FASTVAE_BENCH_SMOKE=1 pytest benchmarks/test_bench_sampling.py # tiny sizes
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from common import exported_decoders, smoke_mode

SMOKE = smoke_mode()
N_SAMPLES = 1_000 if SMOKE else 10_000
BATCH = 250 if SMOKE else 1_000
ROUNDS = 2 if SMOKE else 7
LATENT = 8
MODELS = {
    "mlp": {"model": "mlp", "data_shape": [1, 8, 8], "latent_dim": LATENT, "hidden_dim": 512},
    "conv": {"model": "conv", "data_shape": [1, 8, 8], "latent_dim": LATENT, "hidden_dim": 512},
    "conv28": {"model": "conv", "data_shape": [1, 28, 28], "latent_dim": LATENT, "hidden_dim": 512},
}
ENGINES = ("torch", "onnxruntime", "onnxruntime-int8")  # torch first: the others compare to it
CASES = [(model, engine) for model in MODELS for engine in ENGINES]

_median_seconds: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """{name: (torch model, fp32 .onnx path, int8 .onnx path)}, exported once per run."""
    exported = exported_decoders(tmp_path_factory.mktemp("bench_sampling"), MODELS, int8=True)
    return {name: (model, report.path, report.variants[0].path) for name, (model, report) in exported.items()}


def _torch_sampler(model):
    import torch

    shape = tuple(model.data_shape)

    def sample(n: int, seed: int, batch_size: int) -> np.ndarray:
        z = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, LATENT), dtype=np.float32))
        out = torch.empty((n, *shape))
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                out[start : start + batch_size] = model.likelihood.mean(model.decoder(z[start : start + batch_size]))
        return out.numpy()

    return sample


@pytest.mark.parametrize("name,engine", CASES, ids=[f"{m}-{e}" for m, e in CASES])
def test_sampling_throughput(benchmark, decoders, name, engine):
    import torch

    from fastvae.export import OnnxSampler

    model, fp32_path, int8_path = decoders[name]
    if engine == "torch":
        sample = _torch_sampler(model)
    else:
        sample = OnnxSampler(int8_path if engine.endswith("int8") else fp32_path).sample

    benchmark.group = f"sampling-{name}"
    benchmark.extra_info.update(
        model=name, engine=engine, impl=engine, baseline=engine == "torch", case=name, device="cpu",
        n_samples=N_SAMPLES, batch_size=BATCH,
        torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
    )
    samples = benchmark.pedantic(
        sample, args=(N_SAMPLES,), kwargs={"seed": 0, "batch_size": BATCH}, rounds=ROUNDS, warmup_rounds=1
    )

    # correctness, not speed: every engine returns the same samples for the same seed
    assert samples.shape == (N_SAMPLES, *model.data_shape) and samples.dtype == np.float32
    reference = _torch_sampler(model)(N_SAMPLES, 0, BATCH)
    atol = 0.1 if engine.endswith("int8") else 1e-5  # int8: dynamic quantization error on means
    np.testing.assert_allclose(samples, reference, rtol=1e-4, atol=atol)

    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None with --benchmark-disable
        median = stats.stats.median  # the suites' convention: medians, not means
        _median_seconds[(name, engine)] = median
        benchmark.extra_info["samples_per_s"] = round(N_SAMPLES / median, 1)
        benchmark.extra_info["throughput"] = N_SAMPLES / median
        torch_median = _median_seconds.get((name, "torch"))
        if engine != "torch" and torch_median:
            benchmark.extra_info["speedup_vs_torch"] = round(torch_median / median, 3)
