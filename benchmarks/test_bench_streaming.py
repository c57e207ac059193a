"""Streamed (prepared, sharded) datasets vs in-memory data: epoch time, loader throughput, memory.

- ``test_streamed_vs_in_memory_epoch_interleaved``: the same model trained on the same generated
  28x28 images, from a tensor on the device (``TensorSource``) and streamed from litdata shards
  (``StreamSource``, ``--workers`` processes), blocks of ``BLOCK`` consecutive epochs
  alternating; ``time_ratio`` = streamed / in-memory median epoch (goal <= 1.10 on a CPU;
  ``throughput_ratio`` = its inverse, goal >= 0.95 on a GPU, where the step is fast and the
  loader must keep up). The first epoch of each block is not timed: the persistent workers read
  ahead while the other side's epochs run (up to 8 of a GPU epoch's ~15 items), which
  flattered the streamed side's first epoch; the epochs timed are steady-state ones.
- ``test_loader_*``: the loaders alone, images/s decoded and batched: fastvae's shards vs an
  ImageFolder-style reader (PIL + ``DataLoader`` over the PNG files, as torchvision's
  ImageFolder does it) with the same workers and batch size (goal >= 3x). Both read the same
  ``N_PNG`` images: the PNG folder has a ``train``/``test`` split of its own, the shards'
  train split is its ``train`` folder, and the ImageFolder reader reads that folder. Both run
  on the CPU (``device: cpu``, also on a GPU host).
- ``test_peak_rss_streaming_1gb_vs_4gb``: ``fastvae train`` streaming a generated 1 GB and a
  4 GB uint8 dataset (64x64 RGB) for one epoch with ``--workers 0``, so that one process holds
  everything; its peak RSS (``getrusage``) stays under 1.5 GB and does not grow with the size.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common import REPO_ROOT, annotate, on_gpu, pick, smoke_mode, synced
from test_bench_train import interleaved_medians

from fastvae.config import TrainConfig
from fastvae.data import Splits
from fastvae.loaders import StreamSource
from fastvae.shards import FORMAT, block_size, open_dataset, write_dataset
from fastvae.fabric_setup import make_fabric
from fastvae.trainer import Trainer

N_TRAIN = pick(smoke=512, cpu=60_000, gpu=60_000)
N_TEST = pick(smoke=64, cpu=1_000, gpu=1_000)
BATCH = pick(smoke=64, cpu=64, gpu=1024)
WORKERS = pick(smoke=1, cpu=1, gpu=4)
N_PNG = pick(smoke=256, cpu=20_000, gpu=20_000)  # images both loaders read
N_PNG_TEST = pick(smoke=32, cpu=256, gpu=256)  # the prepared dataset's test split (not read)
LOADER_WORKERS = pick(smoke=1, cpu=2, gpu=4)
HIDDEN = pick(smoke=32, cpu=512, gpu=512)  # the digits protocol's MLP width (tiny in smoke mode)
# consecutive epochs per side and round, the first untimed (more on a GPU, where an epoch is
# ~0.2 s and the workers' read-ahead is a larger share of it)
BLOCK = pick(smoke=2, cpu=2, gpu=4)


def smooth_images(n: int, shape=(1, 28, 28), seed: int = 0) -> np.ndarray:
    """uint8 images that are not pure noise (blurred blobs), as a VAE would see."""
    g = np.random.default_rng(seed)
    low = g.random((n, shape[0], shape[1] // 4 + 1, shape[2] // 4 + 1), dtype=np.float32)
    up = low.repeat(4, axis=2).repeat(4, axis=3)[:, :, :shape[1], :shape[2]]
    return (up * 255).astype(np.uint8)


def write_shards(out: Path, train: np.ndarray, test: np.ndarray) -> Path:
    """A prepared dataset of these uint8 arrays (the writer ``fastvae prepare`` uses)."""
    pieces = {name: [(a, np.full(len(a), -1, np.int64))] for name, a in (("train", train), ("test", test))}
    meta = {"format": FORMAT, "version": 1, "source": "benchmark", "shape": list(train.shape[1:]),
            "block": block_size(train.shape[1:]), "labels": False, "split": "own"}
    write_dataset(out, pieces, meta)
    return out


@pytest.fixture(scope="module")
def mnist_sized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    train, test = smooth_images(N_TRAIN), smooth_images(N_TEST, seed=1)
    shards = write_shards(folder / "shards", train, test)
    memory = Splits("generated", torch.from_numpy(train).float() / 255, torch.from_numpy(test).float() / 255)
    return memory, open_dataset(str(shards))


def trainer_for(splits, out: str) -> Trainer:
    config = TrainConfig(batch_size=BATCH, hidden_dim=HIDDEN, out=out, progress=False, pictures=False, epochs=10_000,
                         workers=WORKERS, accelerator="cuda" if on_gpu() else "cpu",
                         precision="bf16-mixed" if on_gpu() else "32-true")
    return Trainer(make_fabric(config), config, splits)


@pytest.mark.timeout(1800)  # 60,000 images x 22 epochs (2.5 min alone) on a busy 2-core machine
@pytest.mark.benchmark(group="streaming-epoch-interleaved")
def test_streamed_vs_in_memory_epoch_interleaved(benchmark, mnist_sized):
    memory, streamed = mnist_sized
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        in_memory, shards = trainer_for(memory, a), trainer_for(streamed, b)

        times = {"in_memory": [], "streamed": []}

        def block(name, trainer):
            def epoch():
                trainer.train_pass()
                trainer.epoch += 1  # a new shuffle each time, as in training

            def run():
                synced(epoch)()  # untimed: it starts from what the workers read ahead meanwhile
                for _ in range(BLOCK - 1):
                    start = time.perf_counter()
                    synced(epoch)()
                    times[name].append(time.perf_counter() - start)
            return run

        interleaved_medians(benchmark, {"in_memory": block("in_memory", in_memory),
                                        "streamed": block("streamed", shards)},
                            rounds=pick(smoke=1, cpu=5, gpu=5))
        medians = {name: statistics.median(t[BLOCK - 1:]) for name, t in times.items()}  # after the warm-up's
        benchmark.extra_info["arm_medians_s"] = medians  # seconds per epoch (not per block)
    annotate(benchmark, impl="streamed+in_memory", items=2 * BLOCK * N_TRAIN, case=f"N={N_TRAIN},B={BATCH}",
             in_memory_epoch_s=medians["in_memory"], streamed_epoch_s=medians["streamed"],
             time_ratio=medians["streamed"] / medians["in_memory"],
             throughput_ratio=medians["in_memory"] / medians["streamed"], workers=WORKERS,
             epochs_per_block=BLOCK, timed_epochs_per_side=len(times["streamed"]) - (BLOCK - 1))


# ----------------------------------------------------------------------------- loaders alone


class PngFolder(torch.utils.data.Dataset):
    """What torchvision's ImageFolder + ToTensor does per item: open, decode, convert."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            array = np.asarray(img.convert("L"), dtype=np.uint8)
        return torch.from_numpy(array).unsqueeze(0).float().div_(255.0), 0


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    from PIL import Image

    from fastvae.shards import prepare

    root = tmp_path_factory.mktemp("png")
    # a split of its own (images/train, images/test): the shards' train split holds exactly the
    # N_PNG train images, which the ImageFolder reader reads too
    for split, images in (("train", smooth_images(N_PNG, seed=2)), ("test", smooth_images(N_PNG_TEST, seed=3))):
        for i, image in enumerate(images):
            folder = root / "images" / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(folder / f"{i:06d}.png")
    prepare(str(root / "images"), root / "shards", workers=LOADER_WORKERS, progress=False)
    return sorted((root / "images" / "train").rglob("*.png")), open_dataset(str(root / "shards"))


def count_images(batches) -> int:
    return sum(len(x) for x in batches)


@pytest.mark.benchmark(group="streaming-loader")
def test_loader_imagefolder_pil(benchmark, png_folder):
    files, _ = png_folder
    loader = torch.utils.data.DataLoader(PngFolder(files), batch_size=64, shuffle=True,
                                         num_workers=LOADER_WORKERS, generator=torch.Generator().manual_seed(0))
    n = benchmark.pedantic(lambda: count_images(x for x, _ in loader), rounds=pick(smoke=1, cpu=3, gpu=3),
                           iterations=1)
    assert n == len(files) == N_PNG
    annotate(benchmark, impl="imagefolder", baseline=True, items=len(files), case=f"N={len(files)}",
             workers=LOADER_WORKERS, device="cpu")


@pytest.mark.benchmark(group="streaming-loader")
def test_loader_shards(benchmark, png_folder):
    files, shards = png_folder
    source = StreamSource(shards.train, "cpu", LOADER_WORKERS)
    epochs = iter(range(10**6))

    def one_epoch():
        return count_images(source.epoch_batches(epoch=next(epochs), seed=0, rank=0, world=1, batch_size=64))

    n = benchmark.pedantic(one_epoch, rounds=pick(smoke=1, cpu=5, gpu=5), iterations=1)
    # the same images per round as the baseline: the train folder it reads, all of them
    assert n == len(shards.train) == len(files)
    annotate(benchmark, impl="shards", items=len(shards.train), case=f"N={len(files)}",
             workers=LOADER_WORKERS, device="cpu")


# ----------------------------------------------------------------------------- memory

GB = pick(smoke=(2 * 2**20, 8 * 2**20), cpu=(2**30, 4 * 2**30), gpu=(2**30, 4 * 2**30))


def write_generated(out: Path, total_bytes: int) -> Path:
    """A prepared dataset of ``total_bytes`` of 64x64 RGB uint8 images, generated block by
    block (never whole in memory)."""
    shape = (3, 64, 64)
    per = int(np.prod(shape))
    n = total_bytes // per
    g = np.random.default_rng(0)

    def pieces(count):
        for start in range(0, count, 4096):
            k = min(4096, count - start)
            yield g.integers(0, 256, (k, *shape), dtype=np.uint8), np.full(k, -1, np.int64)

    meta = {"format": FORMAT, "version": 1, "source": "generated", "shape": list(shape),
            "block": block_size(shape), "labels": False, "split": "own"}
    write_dataset(out, {"train": pieces(n), "test": pieces(256)}, meta)
    return out


MEASURED_TRAIN = ("import resource, sys\nfrom fastvae.cli import main\nrc = main(sys.argv[1:])\n"
                  "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
                  "sys.exit(rc)")


def peak_rss_of_training(shards: Path, out: Path) -> float:
    """Peak RSS (MB) of ``fastvae train`` streaming ``shards`` for one epoch in one process
    (``--workers 0``: the reading happens in it too), as the process itself reports it."""
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED_TRAIN, "train", "--data", str(shards), "--epochs", "1",
         "--batch-size", "512", "--hidden-dim", "16", "--latent-dim", "2", "--workers", "0",
         "--no-pictures", "--quiet", "--reparam", "torch", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")][-1]
    return int(line.split()[1]) / 1024  # KiB on Linux


@pytest.mark.timeout(2400)  # writes and streams 5 GB
@pytest.mark.skipif(on_gpu(), reason="a CPU memory check (minutes of data generation)")
@pytest.mark.benchmark(group="streaming-memory")
def test_peak_rss_streaming_1gb_vs_4gb(benchmark, tmp_path):
    """Each size is generated, trained on in a fresh process and deleted before the next."""
    small, large = GB
    results = {}

    sizes = (("small", small),) if smoke_mode() else (("small", small), ("large", large))

    def measure():
        for name, size in sizes:
            shards = write_generated(tmp_path / f"shards-{name}", size)
            results[name] = peak_rss_of_training(shards, tmp_path / f"run-{name}")
            import shutil

            shutil.rmtree(shards)  # gigabytes: gone before the next one is written

    benchmark.pedantic(measure, rounds=1, iterations=1)
    results.setdefault("large", results["small"])  # smoke mode: one tiny size only
    annotate(benchmark, impl="streamed", items=(small + large) // (64 * 64 * 3),
             case=f"{small / 2**30:g}GB vs {large / 2**30:g}GB",
             peak_rss_small_MB=results["small"], peak_rss_large_MB=results["large"],
             rss_growth=results["large"] / results["small"], dataset_bytes=[small, large],
             goal_MB=1536, device="cpu")
