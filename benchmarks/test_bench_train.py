"""One training epoch: the fastvae trainer (Fabric) vs a minimal hand-written PyTorch loop.

Both train the same model (same encoder/decoder modules, Adam, batch, data on the device,
shuffled by index slicing, one ``.item()`` per step). The trainer uses fused Adam where torch has
it; the plain loop uses torch's default Adam, as a hand-written loop would (the interleaved test
also times the plain loop with fused Adam, to show the trainer's own overhead). The trainer's timed part is
``Trainer.train_pass``: exactly what ``epoch_time_s`` in metrics.csv measures (test metrics and
the checkpoint are per-epoch I/O, outside it). Goal: trainer <= 1.10x the plain loop's time.

CPU: the digits protocol (MLP 64-512-8, batch 64, fp32). GPU: MNIST-sized random data
(60,000 x 1 x 28 x 28), MLP and conv VAEs, bf16; the trainer with the fused kernel and
torch.compile (CUDA graphs: ``--compile-mode reduce-overhead``; and the default mode) vs a
plain AMP loop (the GPU throughput comparison). The interleaved GPU comparison also times the
fair baselines: the plain loop reading the loss every ``check_every`` (32) steps as the trainer
does, and that loop with its step under ``torch.compile(mode="reduce-overhead")`` and fused Adam
(what a user gets in three lines); it runs tiny in CPU smoke mode too (nothing compiled there).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

from common import annotate, bench_device, on_gpu, pick, skip_in_cpu_smoke, smoke_mode, synced

from fastvae.config import TrainConfig
from fastvae.data import Splits, load_dataset
from fastvae.guard import CUDA_CHECK_INTERVAL
from fastvae.models import build_model
from fastvae.fabric_setup import make_fabric
from fastvae.trainer import Trainer

# (model, batch, precision, compile mode or None); "reduce-overhead" replays CUDA graphs
CASES = pick(
    smoke=[("mlp", 64, "32-true", None)],
    cpu=[("mlp", 64, "32-true", None)],
    gpu=[("mlp", 1024, "bf16-mixed", "reduce-overhead"), ("conv", 512, "bf16-mixed", "reduce-overhead"),
         ("mlp", 1024, "bf16-mixed", "default"), ("mlp", 1024, "32-true", None)],
)
MODE_IDS = {"default": "-compile", "reduce-overhead": "-cudagraphs"}


def make_splits() -> Splits:
    if not on_gpu():
        splits = load_dataset("digits")
        if pick(smoke=True, cpu=False, gpu=False):
            return Splits("digits", splits.train[:256], splits.test[:64])
        return splits
    g = torch.Generator().manual_seed(0)
    images = torch.rand(60_000, 1, 28, 28, generator=g)
    return Splits("random-mnist", images, images[:1000])


def case_id(case) -> str:
    model, batch, precision, mode = case
    return f"{model}-b{batch}-{precision}" + (MODE_IDS.get(mode, f"-{mode}") if mode else "")


def bce_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def plain_loss(model, x: torch.Tensor, amp_dtype, nll=bce_nll) -> torch.Tensor:
    """reparameterize, -log p(x|z) (BCE) + KL (over every latent dim, spatial ones too)."""
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        mu, logvar = model.encoder(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        params = model.decoder(z)
    recon = nll(params.float(), x)
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    return (recon + kl).mean()


class _LossReader:
    """Sums the step losses, reading them to the host every ``read_every`` steps (1: each
    step, a sync per step as ``loss.item()`` does; 32: as the trainer reads its records)."""

    def __init__(self, read_every: int):
        self.read_every, self.steps, self.total, self.pending = read_every, 0, 0.0, None

    def add(self, loss: torch.Tensor) -> None:
        self.steps += 1
        if self.read_every == 1:
            self.total += loss.item()
            return
        loss = loss.detach()  # a CUDA-graph output is overwritten by the next replay: copied
        self.pending = loss.clone() if self.pending is None else self.pending + loss
        if self.steps % self.read_every == 0:
            self.flush()

    def flush(self) -> float:
        if self.pending is not None:
            self.total += self.pending.item()
            self.pending = None
        return self.total


def plain_epoch(model, optimizer, data: torch.Tensor, batch: int, amp_dtype, nll=bce_nll,
                read_every: int = 1) -> float:
    """The loop anyone would write: shuffle, slice, :func:`plain_loss`, Adam; the loss read
    every ``read_every`` steps (default 1: ``loss.item()`` each step)."""
    perm = torch.randperm(len(data), device=data.device)
    reader = _LossReader(read_every)
    for start in range(0, len(data), batch):
        x = data[perm[start : start + batch]]
        loss = plain_loss(model, x, amp_dtype, nll)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        reader.add(loss)
    return reader.flush()


def compiled_plain_epoch(step_loss, optimizer, data: torch.Tensor, batch: int, *, compile_step: bool,
                         read_every: int | None = None, drop_last: bool = False):
    """A no-argument callable (not synced): one epoch of a plain loop whose step -
    ``step_loss(x)`` and its backward - runs under ``torch.compile(mode="reduce-overhead")``
    (CUDA graphs) when ``compile_step``, then ``optimizer.step()``; the loss read every
    ``read_every`` steps (None: never); ``drop_last``: no partial last batch."""

    def step(x):
        loss = step_loss(x)
        loss.backward()
        return loss.detach()

    step_fn = torch.compile(step, mode="reduce-overhead") if compile_step else step
    stop = len(data) - batch + 1 if drop_last else len(data)

    def epoch():
        perm = torch.randperm(len(data), device=data.device)
        reader = _LossReader(read_every) if read_every else None
        for start in range(0, stop, batch):
            optimizer.zero_grad(set_to_none=True)
            if compile_step:
                torch.compiler.cudagraph_mark_step_begin()
            loss = step_fn(data[perm[start : start + batch]])
            if reader is not None:
                reader.add(loss)
            optimizer.step()
        return reader.flush() if reader is not None else None

    return epoch


def plain_compiled_epoch_runner(case, splits: Splits, *, read_every: int):
    """A no-argument callable: one epoch of the plain loop with its step (forward, loss,
    backward) under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) and fused Adam,
    the loss read every ``read_every`` steps: the fair compiled baseline
    (:func:`compiled_plain_epoch`, as ``test_bench_convkl``'s ``plain_compile_fused_adam``). In
    CPU smoke mode nothing is compiled (the code path is checked, not the speed)."""
    model_name, batch, precision, _ = case
    torch.manual_seed(0)
    model = build_model({"model": model_name, "data_shape": list(splits.data_shape)}).to(bench_device())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    amp = torch.bfloat16 if precision.startswith("bf16") else None
    return synced(compiled_plain_epoch(lambda x: plain_loss(model, x, amp), optimizer,
                                       splits.train.to(bench_device()), batch, compile_step=on_gpu(),
                                       read_every=read_every))


def plain_runner(case, splits: Splits, *, fused_adam: bool = False, read_every: int = 1):
    """A no-argument callable running one plain-loop epoch on a fresh model (synced on GPU)."""
    model_name, batch, precision, _ = case
    device = bench_device()
    torch.manual_seed(0)
    model = build_model({"model": model_name, "data_shape": list(splits.data_shape)}).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None)
    amp = torch.bfloat16 if precision.startswith("bf16") else None
    return synced(plain_epoch, model, optimizer, splits.train.to(device), batch, amp, read_every=read_every)


def make_trainer(case, splits: Splits, out: str) -> Trainer:
    model_name, batch, precision, mode = case
    config = TrainConfig(model=model_name, batch_size=batch, precision=precision,
                         compile=mode is not None, compile_mode=mode or "default",
                         accelerator="cuda" if on_gpu() else "cpu", out=out, progress=False,
                         pictures=False, epochs=10_000)
    return Trainer(make_fabric(config), config, splits)


def trainer_runner(case, splits: Splits, out: str):
    """A no-argument callable running ``Trainer.train_pass`` (one epoch) of a fresh trainer."""
    return synced(make_trainer(case, splits, out).train_pass)


def interleaved_medians(benchmark, runners: dict, rounds: int) -> dict[str, float]:
    """Warm each runner up, then time them one after another, round after round (so machine
    drift hits all alike), as one benchmark; the median seconds of each."""
    times = {name: [] for name in runners}
    for run in runners.values():
        run()  # warm-up (and compilation)

    def one_round():
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    medians = {name: statistics.median(t) for name, t in times.items()}
    # report.py compare compares these, arm by arm: a round's time is the sum of its arms, and
    # an arm added (or a 20 % slower one among five) would read as a change of the whole
    benchmark.extra_info["arm_medians_s"] = medians
    return medians


# the GPU headline's cases; in CPU smoke mode the first case, tiny and uncompiled (the code path)
GPU_HEADLINE_CASES = ([c for c in CASES if c[3] == "reduce-overhead"] if on_gpu()
                      else CASES[:1] if smoke_mode() else [])


@pytest.mark.skipif(not GPU_HEADLINE_CASES, reason="needs a CUDA device (runs tiny on a CPU in smoke mode)")
@pytest.mark.timeout(240)  # five arms, two compiled, ~50-60 s a case: gpu/run.sh's --timeout=90 is tight
@pytest.mark.benchmark(group="train-epoch-interleaved-gpu")
@pytest.mark.parametrize("case", GPU_HEADLINE_CASES, ids=case_id)
def test_gpu_trainer_vs_plain_amp_interleaved(benchmark, case):
    """The headline figure, epochs alternating: the trainer (fused kernel, compiled step
    replayed as CUDA graphs, fused Adam, step records read every ``check_every`` steps) vs

    * ``plain``: the plain AMP loop calling ``loss.item()`` every step (``speedup``, the
      figure recorded since 2026-11-27; goal >= 1.5);
    * ``plain_deferred_read``: the same loop reading the loss every ``check_every`` (32)
      steps, as the trainer does (``speedup_vs_plain_deferred_read``);
    * ``plain_compile_fused_adam``: that loop with its step under
      ``torch.compile(mode="reduce-overhead")`` and fused Adam
      (``speedup_vs_plain_compile_fused_adam``): the fair baselines;
    * ``fastvae_read_each_step``: the trainer reading its records after every step
      (``per_step_read_cost``).

    First in the file, so a time cap cannot cut it."""
    splits = make_splits()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(case, splits, out)
        deferred = trainer.check_every
        read_every = CUDA_CHECK_INTERVAL  # the trainer's on CUDA (1 on a CPU, where reading is free)

        def each_step():
            trainer.check_every = 1
            try:
                trainer.train_pass()
            finally:
                trainer.check_every = deferred

        medians = interleaved_medians(benchmark, {
            "plain": plain_runner(case, splits),
            "plain_deferred_read": plain_runner(case, splits, read_every=read_every),
            "plain_compile_fused_adam": plain_compiled_epoch_runner(case, splits, read_every=read_every),
            "fastvae": synced(trainer.train_pass),
            "fastvae_read_each_step": synced(each_step)}, rounds=pick(smoke=1, cpu=10, gpu=10))
    n = len(splits.train)
    annotate(benchmark, impl="fastvae+plain", items=len(medians) * n, case=case_id(case),
             plain_epoch_s=medians["plain"], fastvae_epoch_s=medians["fastvae"],
             plain_deferred_read_epoch_s=medians["plain_deferred_read"],
             plain_compile_fused_adam_epoch_s=medians["plain_compile_fused_adam"],
             fastvae_read_each_step_epoch_s=medians["fastvae_read_each_step"],
             check_every=deferred, plain_read_every=read_every,
             speedup=medians["plain"] / medians["fastvae"],
             speedup_vs_plain_deferred_read=medians["plain_deferred_read"] / medians["fastvae"],
             speedup_vs_plain_compile_fused_adam=medians["plain_compile_fused_adam"] / medians["fastvae"],
             per_step_read_cost=medians["fastvae_read_each_step"] / medians["fastvae"],
             plain_examples_per_s=n / medians["plain"],
             plain_deferred_read_examples_per_s=n / medians["plain_deferred_read"],
             plain_compile_fused_adam_examples_per_s=n / medians["plain_compile_fused_adam"],
             fastvae_examples_per_s=n / medians["fastvae"])


@pytest.mark.benchmark(group="train-epoch")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_plain_loop_epoch(benchmark, case):
    splits = make_splits()
    run = plain_runner(case, splits)
    run()  # warm-up: allocator, kernels
    benchmark.pedantic(run, rounds=pick(smoke=1, cpu=40, gpu=5), iterations=1)
    annotate(benchmark, impl="plain", baseline=True, items=len(splits.train), case=case_id(case))


@pytest.mark.benchmark(group="train-epoch")
@pytest.mark.parametrize("case", [c if not c[3] else pytest.param(c, marks=skip_in_cpu_smoke) for c in CASES],
                         ids=case_id)
def test_fastvae_trainer_epoch(benchmark, case):
    splits = make_splits()
    with tempfile.TemporaryDirectory() as out:
        run = trainer_runner(case, splits, out)
        run()  # warm-up (and compilation)
        benchmark.pedantic(run, rounds=pick(smoke=1, cpu=40, gpu=5), iterations=1)
    annotate(benchmark, impl="fastvae", items=len(splits.train), case=case_id(case),
             reparam="fused" if on_gpu() else "torch")


@pytest.mark.benchmark(group="train-epoch-interleaved")
@pytest.mark.parametrize("case", [c for c in CASES if not c[3]], ids=case_id)
def test_trainer_vs_plain_interleaved(benchmark, case):
    """The loops alternate epoch by epoch, so machine drift hits all alike. ``time_ratio``
    (trainer / plain loop with default Adam, median epochs) is the figure quoted in the README
    (goal <= 1.10); ``time_ratio_vs_fused_adam`` compares with the plain loop given the same
    fused Adam as the trainer, i.e. the trainer's own overhead."""
    splits = make_splits()
    with tempfile.TemporaryDirectory() as out:
        medians = interleaved_medians(benchmark, {
            "plain": plain_runner(case, splits),
            "plain_fused_adam": plain_runner(case, splits, fused_adam=True),
            "fastvae": trainer_runner(case, splits, out)}, rounds=pick(smoke=1, cpu=40, gpu=10))
    annotate(benchmark, impl="fastvae+plain", items=3 * len(splits.train), case=case_id(case),
             plain_epoch_s=medians["plain"], plain_fused_adam_epoch_s=medians["plain_fused_adam"],
             fastvae_epoch_s=medians["fastvae"], time_ratio=medians["fastvae"] / medians["plain"],
             time_ratio_vs_fused_adam=medians["fastvae"] / medians["plain_fused_adam"])
