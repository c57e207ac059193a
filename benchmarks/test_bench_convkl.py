"""The spatial-latent conv VAE (``--model convkl``): training speed, ONNX decoding, tiled memory.

CPU (``make bench``):
* ``test_cpu_trainer_vs_plain_interleaved``: an epoch of the fastvae trainer vs the minimal
  hand-written loop of the same model (photo crops), epochs interleaved; goal <= 1.10x the time.
* ``test_decode_latency``: one 4x16x16 latent (a 64x64 image) through the exported decoder in
  ONNX Runtime vs the torch decoder under ``inference_mode``; goal >= 1.3x faster.
* ``test_tiled_decode_peak_memory``: peak memory of decoding a 4x128x128 latent whole vs in
  tiles, each in a fresh process (growth of the peak resident set, Linux VmHWM reset just
  before decoding, over the resident set then); goal >= 4x less; records max |tiled -
  untiled| for this random decoder (GroupNorm's per-tile statistics make it large here).

GPU (``benchmarks/gpu/run.sh``, ``FASTVAE_GPU_SUITES=convkl``), images/s at batch ``B``, bf16
(in CPU smoke mode these run too, tiny, without torch.compile, to keep the code honest):
* ``test_gpu_trainer_vs_plain_loops``: the trainer (fused kernel, ``--compile-mode
  reduce-overhead``: CUDA graphs, fused Adam) vs a plain AMP loop (goal >= 1.5x) and vs that loop
  with torch.compile(mode="reduce-overhead") + fused Adam (goal >= 1.2x), for convkl at 64x64
  and 256x256 and the MLP/conv digits-style cases, epochs interleaved;
* ``test_gpu_diffusers_autoencoderkl``: diffusers' AutoencoderKL of matching widths by the same
  plain AMP loop (skipped with a note when diffusers is not installed);
* ``test_gpu_reparam_kl_share``: the reparameterize+KL op's share of a training step's GPU time,
  fused kernel vs eager torch, on the convkl step's flattened latent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import annotate, bench_device, on_gpu, pick, requires_cuda, synced
from test_bench_train import bce_nll, compiled_plain_epoch, interleaved_medians, plain_epoch, plain_loss

from fastvae.config import TrainConfig
from fastvae.data import Splits
from fastvae.models import build_model
from fastvae.fabric_setup import make_fabric
from fastvae.trainer import Trainer

# the README recipe's architecture (benchmarks/photo_quality.py); tiny in smoke mode
ARCH = pick(smoke=dict(width=4, channel_mult="1,1,2"), cpu=dict(width=16, channel_mult="1,1,2"),
            gpu=dict(width=64, channel_mult="1,2,2"))
SPEC = dict(model="convkl", downsample=4, latent_channels=4, blocks_per_level=1, likelihood="gaussian",
            sigma=0.1, **ARCH)
SIGMA = 0.1


def photo_splits(size: int, n: int) -> Splits:
    """``n`` crops of the bundled photos (``photos:64`` cut down when smaller), or random
    smooth images of ``size`` pixels on a GPU (bigger than the photos allow)."""
    if size in (32, 64) and not on_gpu():
        from fastvae.data import load_dataset

        full = load_dataset("photos" if size == 32 else "photos:64")
        return Splits("photos", full.train[:n].contiguous(), full.test[:16].contiguous())
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bicubic",
                           align_corners=False).clamp(0, 1)
    return Splits("smooth", images, images[:16].clone())


def gaussian_nll(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, SIGMA^2) summed over pixels, without its constant."""
    return (0.5 * ((x - mean) / SIGMA) ** 2).flatten(1).sum(1)


def plain_convkl_epoch(model, optimizer, data: torch.Tensor, batch: int, amp_dtype=None) -> float:
    """The minimal hand-written loop (``test_bench_train.plain_epoch``) with the Gaussian NLL."""
    return plain_epoch(model, optimizer, data, batch, amp_dtype, nll=gaussian_nll)


def fastvae_trainer(splits: Splits, out: str, batch: int, spec: dict, **settings) -> Trainer:
    config = TrainConfig(**{k: v for k, v in spec.items() if k != "data_shape"}, batch_size=batch, out=out,
                         progress=False, pictures=False, epochs=10_000,
                         accelerator="cuda" if on_gpu() else "cpu",
                         reparam="auto" if on_gpu() else "torch", **settings)
    return Trainer(make_fabric(config), config, splits)


cpu_only = pytest.mark.skipif(on_gpu(), reason="a CPU figure (the GPU run measures the GPU items)")


@cpu_only
@pytest.mark.timeout(1200)  # 3 runners x 6 epochs of a conv VAE on a shared 2-core CPU
@pytest.mark.benchmark(group="convkl-train-cpu")
def test_cpu_trainer_vs_plain_interleaved(benchmark):
    """``time_ratio`` = trainer epoch / plain-loop epoch (median of interleaved epochs; goal
    <= 1.10); ``time_ratio_vs_fused_adam``: against the plain loop with the trainer's fused Adam."""
    splits = photo_splits(pick(smoke=16, cpu=32, gpu=32), pick(smoke=16, cpu=192, gpu=192))
    batch = pick(smoke=8, cpu=64, gpu=64)
    spec = {**SPEC, "data_shape": list(splits.data_shape)}
    runners = {}
    for name, fused in (("plain", False), ("plain_fused_adam", True)):
        torch.manual_seed(0)
        model = build_model(spec)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
        runners[name] = synced(plain_convkl_epoch, model, optimizer, splits.train, batch)
    with tempfile.TemporaryDirectory() as out:
        runners["fastvae"] = synced(fastvae_trainer(splits, out, batch, spec).train_pass)
        medians = interleaved_medians(benchmark, runners, rounds=pick(smoke=1, cpu=5, gpu=5))
    annotate(benchmark, impl="fastvae+plain", items=3 * len(splits.train), case="convkl-cpu",
             plain_epoch_s=medians["plain"], plain_fused_adam_epoch_s=medians["plain_fused_adam"],
             fastvae_epoch_s=medians["fastvae"], time_ratio=medians["fastvae"] / medians["plain"],
             time_ratio_vs_fused_adam=medians["fastvae"] / medians["plain_fused_adam"])


@pytest.fixture(scope="module")
def decoder64(tmp_path_factory):
    """A 64x64 decoder (latent 4x16x16) with every path active (zero-initialised output convs
    randomised), exported once."""
    from fastvae.export import export_decoder

    torch.manual_seed(0)
    model = build_model({**SPEC, "data_shape": [3, 64, 64]}).eval()
    with torch.no_grad():
        model.decoder.conv_out.weight.normal_(0.0, 0.02)
    report = export_decoder(model, tmp_path_factory.mktemp("convkl") / "decoder.onnx")
    return model, report.path


@cpu_only
@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_decode_latency(benchmark, decoder64, engine):
    from fastvae.export import OnnxSampler

    model, path = decoder64
    z = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    if engine == "torch":
        zt = torch.from_numpy(z)

        def decode():
            with torch.inference_mode():
                return model.likelihood.mean(model.decoder(zt)).numpy()
    else:
        sampler = OnnxSampler(path)

        def decode():
            return sampler.decode(z)
    benchmark.group = "convkl-decode-latency"
    out = benchmark.pedantic(decode, rounds=pick(smoke=1, cpu=50, gpu=50), warmup_rounds=pick(smoke=0, cpu=5, gpu=5))
    assert out.shape == (1, 3, 64, 64)
    annotate(benchmark, impl=engine, baseline=engine == "torch", case="4x16x16", items=1)


_PEAK_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
from fastvae.export.tiled_decode import decode_latents
path, tile, overlap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
options = ort.SessionOptions()
options.enable_cpu_mem_arena = False  # memory goes back as tensors die: the peak is the working set
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
z = np.random.default_rng(0).standard_normal((1, 4, SIZE, SIZE), dtype=np.float32)
session.run(["mean"], {"z": z[:, :, :8, :8]})  # warm: kernels and weights loaded
def status(key):  # kB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident set (Linux)
base = status("VmRSS")
run = lambda chunk: session.run(["mean"], {"z": chunk})[0]
out = decode_latents(run, z, 4, 3, tile=tile or None, overlap=overlap)
peak = status("VmHWM")
np.save(sys.argv[4], out)
print(json.dumps({"base_MB": base / 1024, "peak_MB": peak / 1024, "growth_MB": (peak - base) / 1024}))
"""


def _decode_in_process(path, size: int, tile: int, overlap: int, out: str) -> dict:
    code = _PEAK_SCRIPT.replace("SIZE", str(size))
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tile), str(overlap), out],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@cpu_only
def test_tiled_decode_peak_memory(benchmark, decoder64, tmp_path):
    """``memory_ratio`` = untiled / tiled peak RSS growth (goal >= 4); ``max_abs_diff``:
    tiled vs untiled output (GroupNorm statistics are per tile)."""
    _, path = decoder64
    size = pick(smoke=32, cpu=128, gpu=128)
    tile, overlap = pick(smoke=(64, 16), cpu=(128, 32), gpu=(128, 32))  # output pixels
    tile_lat, overlap_lat = tile // 4, overlap // 4
    results = {}

    def measure():
        results["untiled"] = _decode_in_process(path, size, 0, 0, str(tmp_path / "whole.npy"))
        results["tiled"] = _decode_in_process(path, size, tile_lat, overlap_lat, str(tmp_path / "tiled.npy"))

    benchmark.group = "convkl-tiled-memory"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    diff = np.abs(np.load(tmp_path / "tiled.npy") - np.load(tmp_path / "whole.npy"))
    annotate(benchmark, impl="tiled", case=f"4x{size}x{size}", items=1,
             untiled_growth_MB=results["untiled"]["growth_MB"], tiled_growth_MB=results["tiled"]["growth_MB"],
             memory_ratio=results["untiled"]["growth_MB"] / max(results["tiled"]["growth_MB"], 1e-3),
             tile_px=tile, overlap_px=overlap, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))


# ------------------------------------------------------------------------------------- GPU

GPU_CASES = pick(  # (name, spec, image size, batch)
    smoke=[("convkl16", {**SPEC}, 16, 4), ("mlp8", {"model": "mlp", "hidden_dim": 16}, 8, 8)],
    cpu=[], gpu=[("convkl64", {**SPEC}, 64, 256), ("convkl256", {**SPEC}, 256, 32),
                 ("mlp28", {"model": "mlp"}, 28, 1024), ("conv28", {"model": "conv"}, 28, 512)],
)
GPU_SIZES = pick(smoke=[(16, 4)], cpu=[], gpu=[(64, 256), (256, 32)])
SMOKE_ON_CPU = not on_gpu()  # only smoke mode reaches the GPU tests without CUDA (tiny, no compile)
gpu_or_cpu_smoke = pytest.mark.skipif(not on_gpu() and not pick(smoke=True, cpu=False, gpu=False),
                                      reason="needs a CUDA device (runs tiny on a CPU in smoke mode)")


def _plain_gpu_runner(spec, data, batch, *, compiled: bool):
    """An epoch of the plain AMP loop (``test_bench_train.plain_loss``: Bernoulli for mlp/conv,
    Gaussian for convkl); ``compiled``: the step under torch.compile(mode="reduce-overhead")
    and fused Adam (a user's three lines; ``test_bench_train.compiled_plain_epoch``)."""
    device = data.device
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    if spec["model"] == "convkl" and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=compiled or None)
    nll = gaussian_nll if spec["model"] == "convkl" else bce_nll
    amp = None if SMOKE_ON_CPU else torch.bfloat16
    epoch = compiled_plain_epoch(lambda x: plain_loss(model, x, amp, nll), optimizer, data, batch,
                                 compile_step=compiled and not SMOKE_ON_CPU, drop_last=True)

    def run():
        epoch()
        _sync()

    return run


def _sync():
    if on_gpu():
        torch.cuda.synchronize()


def _trainer_settings() -> dict:
    """bf16 with the step replayed as CUDA graphs on a GPU; plain fp32 in CPU smoke mode (bf16
    convolutions crawl on a CPU without native bf16)."""
    return {} if SMOKE_ON_CPU else {"precision": "bf16-mixed", "compile_mode": "reduce-overhead"}


@gpu_or_cpu_smoke
@pytest.mark.timeout(420)  # three arms, two of them compiled (CUDA graphs), 5 interleaved rounds
@pytest.mark.benchmark(group="convkl-train-gpu")
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_trainer_vs_plain_loops(benchmark, case):
    name, spec, size, batch = case
    channels = 3 if spec["model"] == "convkl" else 1
    n = batch * pick(smoke=2, cpu=2, gpu=20)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, channels, size, size, generator=g)
    splits = Splits("random", images, images[:batch].clone())
    spec = {**spec, "data_shape": [channels, size, size]}
    data = images.to(bench_device())
    with tempfile.TemporaryDirectory() as out:
        trainer = fastvae_trainer(splits, out, batch, spec, **_trainer_settings())
        medians = interleaved_medians(benchmark, {
            "plain_amp": _plain_gpu_runner(spec, data, batch, compiled=False),
            "plain_compile_fused_adam": _plain_gpu_runner(spec, data, batch, compiled=True),
            "fastvae": synced(trainer.train_pass)}, rounds=pick(smoke=1, cpu=1, gpu=5))
    annotate(benchmark, impl="fastvae+plain", items=3 * n, case=name,
             **{f"{k}_images_per_s": n / v for k, v in medians.items()},
             speedup_vs_plain_amp=medians["plain_amp"] / medians["fastvae"],
             speedup_vs_plain_compile_fused_adam=medians["plain_compile_fused_adam"] / medians["fastvae"])


@requires_cuda
@pytest.mark.timeout(300)  # the trainer's compilation comes first
@pytest.mark.benchmark(group="convkl-diffusers-gpu")
@pytest.mark.parametrize("size,batch", GPU_SIZES, ids=[str(s) for s, _ in GPU_SIZES])
def test_gpu_diffusers_autoencoderkl(benchmark, size, batch):
    """diffusers' AutoencoderKL (same widths, blocks, c) by the plain AMP loop vs the fastvae
    trainer: ``speedup`` = diffusers epoch / fastvae epoch."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[bench]')")
    from fastvae.config import parse_channel_mult

    widths = [SPEC["width"] * m for m in parse_channel_mult(SPEC["channel_mult"], SPEC["downsample"])]
    n = batch * 20
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=SPEC["latent_channels"],
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=tuple(widths), layers_per_block=SPEC["blocks_per_level"],
        norm_num_groups=math.gcd(32, *[w // 2 for w in widths])).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    data = images.cuda()

    def diffusers_epoch():
        for start in range(0, n, batch):
            x = data[start : start + batch]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                dist = vae.encode(x).latent_dist
                mean = vae.decode(dist.sample()).sample
            loss = (gaussian_nll(mean.float(), x) + dist.kl().float()).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize()

    splits = Splits("random", images, images[:batch].clone())
    with tempfile.TemporaryDirectory() as out:
        trainer = fastvae_trainer(splits, out, batch, {**SPEC, "data_shape": [3, size, size]},
                                  precision="bf16-mixed", compile_mode="reduce-overhead")
        medians = interleaved_medians(benchmark, {"diffusers": diffusers_epoch, "fastvae": synced(trainer.train_pass)},
                                      rounds=5)
    annotate(benchmark, impl="fastvae+diffusers", items=2 * n, case=f"{size}x{size}",
             diffusers_images_per_s=n / medians["diffusers"], fastvae_images_per_s=n / medians["fastvae"],
             speedup=medians["diffusers"] / medians["fastvae"])


@gpu_or_cpu_smoke
@pytest.mark.timeout(300)  # a plain step at 256x256 and both ops, above run.sh's 90 s default
@pytest.mark.benchmark(group="convkl-reparam-share-gpu")
@pytest.mark.parametrize("size,batch", GPU_SIZES, ids=[str(s) for s, _ in GPU_SIZES])
def test_gpu_reparam_kl_share(benchmark, size, batch):
    """Milliseconds of reparameterize+KL forward+backward on the step's flattened latent
    (B, c*h*w), fused vs eager, and their share of one plain AMP training step."""
    from fastvae.reparam import reparameterize_kl

    spec = {**SPEC, "data_shape": [3, size, size]}
    device = bench_device()
    data = torch.rand(batch * 4, 3, size, size, device=device)
    step = _plain_gpu_runner(spec, data, batch, compiled=False)
    d = SPEC["latent_channels"] * (size // 4) ** 2
    dtype = torch.float32 if SMOKE_ON_CPU else torch.bfloat16
    mu = torch.randn(batch, d, device=device, dtype=dtype, requires_grad=True)
    logvar = torch.randn_like(mu).mul_(0.1).requires_grad_(True)

    def op(backend):
        def run():
            z, kl = reparameterize_kl(mu, logvar, backend=backend)
            (z.float().sum() + kl.sum()).backward()
        return run

    timings = {}

    def measure():
        # device time = the sum of the kernels' own durations (profiler), not events around the
        # calls: the op is a few µs of GPU work, so events would time its launches
        timings["step_ms"] = device_ms(step) / 4  # an epoch of 4 steps
        timings["fused_ms"] = device_ms(op("triton"))
        timings["eager_ms"] = device_ms(op("torch"))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    annotate(benchmark, impl="fused+eager", case=f"{size}x{size},B={batch},D={d}", items=batch,
             **timings, fused_share=timings["fused_ms"] / timings["step_ms"],
             eager_share=timings["eager_ms"] / timings["step_ms"],
             time_kind="kernel time summed by torch.profiler" if on_gpu() else "CPU op time summed by torch.profiler")


def device_ms(fn, iters: int = pick(smoke=1, cpu=10, gpu=10)) -> float:
    """Milliseconds of device work per call of ``fn``: the summed durations of the GPU kernels
    and copies it runs, by torch.profiler (its own events, not the time between launches), over
    ``iters`` calls after 2 warm-up calls. On a CPU (smoke mode) the ops' own CPU times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = on_gpu()
    for _ in range(2):
        fn()
    _sync()
    # CPU activity too on a GPU: torch's usual set (its kernels are matched to their launches)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(iters):
            fn()
        _sync()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    # the sum torch's own table prints as "Self CUDA time total" (user annotations excluded)
    events = [e for e in prof.events() if e.device_type == kind and not getattr(e, "is_user_annotation", False)]
    if not events:
        raise RuntimeError("the profiler recorded no device events: is CUPTI available?")
    total_us = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events)
    return total_us / iters / 1e3
