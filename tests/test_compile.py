"""torch.compile of the training step (compiled before Fabric's setup) on a CPU."""

import math

import pytest
import torch

from fastvae.checkpoint import load, read_checkpoint
from fastvae.config import TrainConfig
from fastvae.data import Splits, load_dataset
from fastvae.trainer import train


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path):
    digits = load_dataset("digits")
    splits = Splits("digits", digits.train[:512], digits.test[:64])
    common = dict(hidden_dim=64, epochs=2, accelerator="cpu", progress=False, pictures=False)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), **common), splits=splits)
    compiled = train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **common), splits=splits)
    losses = [row["train_loss"] for row in compiled.metrics]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    # Inductor draws its own noise, so the runs differ a little, not in their course
    assert losses[1] == pytest.approx(eager.metrics[1]["train_loss"], rel=0.03)
    weights = read_checkpoint(tmp_path / "compiled")["model"]
    assert not any("_orig_mod" in key for key in weights)  # loads into a plain module
    model = load(tmp_path / "compiled")
    assert torch.isfinite(model.sample(4)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(600)
def test_cuda_graph_training_trains_like_the_eager_run(tmp_path, perf_hints):
    """--compile-mode reduce-overhead on a GPU: forward and backward replay as CUDA graphs
    (nothing skipped) around the fused kernel, with a KL warm-up whose weight changes every
    step, and the run ends where the eager run ends (its noise differs). The eager baseline
    keeps the test short: each compilation costs tens of seconds on a GPU host."""
    from torch._dynamo.utils import counters

    from testkit import cuda_graphs_recorded

    splits = load_dataset("digits")
    common = dict(epochs=5, accelerator="cuda", progress=False, pictures=False,
                  precision="bf16-mixed", kl_warmup_steps=100)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), **common), splits=splits)
    torch._dynamo.reset()
    counters.clear()
    graphed = train(TrainConfig(out=str(tmp_path / "graphed"), compile_mode="reduce-overhead", **common),
                    splits=splits)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert cuda_graphs_recorded() > 0
    losses = [row["train_loss"] for row in graphed.metrics]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[1]
    assert graphed.metrics[-1]["test_neg_elbo"] == pytest.approx(eager.metrics[-1]["test_neg_elbo"],
                                                               rel=0.03)
    model = load(tmp_path / "graphed")
    assert torch.isfinite(model.sample(4)).all()
