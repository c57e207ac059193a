"""Exported decoders on onnxruntime's CUDA execution provider (``pytest -m gpu``; run by
benchmarks/gpu/run.sh, ``FASTVAE_GPU_TESTS_SET=onnx`` for these alone).

Skipped without a GPU or where the installed onnxruntime has no CUDA provider (the
``onnxruntime`` wheel is CPU-only, ``onnxruntime-gpu`` has it):

* the sampler runs on the provider asked for, says so, and gives the CPU provider's numbers;
* ``decode_on_device`` keeps inputs and outputs in GPU memory: onnxruntime's own profile of the
  run shows the compute nodes on the CUDA provider and no Memcpy node (host <-> device copies);
* a spatial (convkl) decoder with symbolic latent height and width decodes two sizes on CUDA
  as on the CPU.

The profile reader is checked on the CPU provider here too, so the GPU assertions rest on a
parser that runs in every ``make test``.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from fastvae.export import OnnxSampler
from fastvae.export import sampler as sampler_module
from testkit import exported_mlp_decoder

CUDA_EP = "CUDAExecutionProvider"
LATENT = 8
# onnxruntime's CUDA provider may run fp32 GEMMs and convolutions in TF32 (10-bit mantissa): on
# sigmoid means that is ~1e-3; a wrong graph or a stale buffer is off by far more
CUDA_TOL = dict(rtol=1e-3, atol=2e-3)


def _cuda_reason() -> str | None:
    """Why the CUDA tests cannot run here (None: they can)."""
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA"
    if CUDA_EP not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} here has no CUDA provider (available: "
                f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu")
    return None


needs_cuda_ep = pytest.mark.skipif(_cuda_reason() is not None, reason=_cuda_reason() or "")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return exported_mlp_decoder(tmp_path_factory.mktemp("onnx-cuda"), hidden_dim=256, latent_dim=LATENT)


def _z(n: int, shape=(LATENT,), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


def profiled_sampler(monkeypatch, tmp_path, path, **kwargs) -> OnnxSampler:
    """An ``OnnxSampler`` whose sessions write onnxruntime's JSON profile under ``tmp_path``."""
    plain = sampler_module.session_options

    def profiling(threads=None, spin=True):
        options = plain(threads, spin)
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / "profile")
        return options

    monkeypatch.setattr(sampler_module, "session_options", profiling)
    return OnnxSampler(path, **kwargs)


def node_runs(session) -> list[tuple[str, str]]:
    """(operator, provider) of every node run the session's profile recorded (ends profiling)."""
    events = json.loads(open(session.end_profiling()).read())
    return [(e["args"]["op_name"], e["args"].get("provider", "?"))
            for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})]


def test_profile_reader_sees_the_cpu_provider_run(monkeypatch, tmp_path, mlp):
    """The parser the CUDA test relies on: on the CPU provider, the decoder's GEMMs are there,
    each node names its provider, and there is nothing to copy."""
    _, path = mlp
    sampler = profiled_sampler(monkeypatch, tmp_path, path, threads=1)
    out = sampler.decode_on_device(_z(5))
    assert out.device_name() == "cpu" and out.shape() == [5, 1, 8, 8]
    runs = node_runs(sampler.session)
    ops = {op for op, _ in runs}
    assert any("Gemm" in op for op in ops), runs
    assert {provider for _, provider in runs} == {"CPUExecutionProvider"}
    assert not any(op.startswith("Memcpy") for op in ops)


@pytest.mark.gpu
@needs_cuda_ep
def test_cuda_provider_runs_and_matches_cpu(mlp):
    _, path = mlp
    cuda, cpu = OnnxSampler(path, providers=["cuda"]), OnnxSampler(path)
    assert cuda.provider == CUDA_EP and "provider='cuda'" in repr(cuda)
    z = _z(300, seed=1)
    np.testing.assert_allclose(cuda.decode(z), cpu.decode(z), **CUDA_TOL)
    np.testing.assert_allclose(cuda.decode(z, batch_size=64), cpu.decode(z), **CUDA_TOL)
    np.testing.assert_allclose(cuda.sample(50, seed=3), cpu.sample(50, seed=3), **CUDA_TOL)


@pytest.mark.gpu
@needs_cuda_ep
def test_io_binding_keeps_tensors_on_the_gpu(monkeypatch, tmp_path, mlp):
    """Latents already in GPU memory go in and the images stay there: no Memcpy node runs, and
    the GEMMs run on the CUDA provider."""
    _, path = mlp
    sampler = profiled_sampler(monkeypatch, tmp_path, path, providers=["cuda"])
    z = _z(64, seed=2)
    on_gpu = ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0)
    out = sampler.decode_on_device(on_gpu)
    assert out.device_name() == "cuda" and out.shape() == [64, 1, 8, 8]
    runs = node_runs(sampler.session)
    gemms = [provider for op, provider in runs if "Gemm" in op or op == "MatMul"]
    assert gemms and set(gemms) == {CUDA_EP}, runs
    assert not [op for op, _ in runs if op.startswith("Memcpy")], runs
    np.testing.assert_allclose(out.numpy(), OnnxSampler(path).decode(z), **CUDA_TOL)


@pytest.mark.gpu
@needs_cuda_ep
def test_spatial_decoder_two_latent_sizes_on_cuda(tmp_path):
    import torch

    from fastvae.export import export_decoder
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"model": "convkl", "width": 8, "channel_mult": "", "blocks_per_level": 1,
                         "likelihood": "gaussian", "sigma": 0.1, "data_shape": [3, 16, 16]}).eval()
    path = export_decoder(model, tmp_path / "decoder.onnx").path
    cuda, cpu = OnnxSampler(path, providers=["cuda"]), OnnxSampler(path)
    session = cuda.session
    for shape in ((4, 4, 4), (4, 10, 6)):  # the trained latent size and another one
        z = _z(3, shape, seed=sum(shape))
        got = session.run([cuda.mean_output], {cuda.input_name: z})[0]
        want = cpu.session.run([cpu.mean_output], {cpu.input_name: z})[0]
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # TF32 convolutions
