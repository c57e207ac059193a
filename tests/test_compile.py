"""torch.compile of the training step (compiled before Fabric's setup) on a CPU."""

import math

import pytest
import torch

from fastvae.checkpoint import load, read_checkpoint
from fastvae.config import TrainConfig
from fastvae.data import Splits, load_dataset
from fastvae.train import train


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
