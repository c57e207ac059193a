"""The trainer with the fused Triton kernel, run through Triton's interpreter on a CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastvae.checkpoint import read_checkpoint


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_with_the_fused_kernel_under_the_interpreter(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npy"
    np.save(data, rng.random((140, 8, 8), dtype=np.float32))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastvae", "train", "--data", str(data), "--reparam", "triton",
           "--epochs", "2", "--batch-size", "64", "--hidden-dim", "32", "--latent-dim", "4",
           "--out", str(out), "--quiet", "--no-pictures"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert np.isfinite(summary["train_loss"]) and summary["steps"] == 4
    state = read_checkpoint(out)
    assert state["config"]["reparam"] == "triton"
    assert all(np.isfinite(v.numpy()).all() for v in state["model"].values())
