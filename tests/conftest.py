"""Shared fixtures; the helpers tests import live in ``testkit.py``."""

from __future__ import annotations

import pytest
import torch

from testkit import tiny_config


def pytest_configure(config):
    # The models under test are tiny: a second intra-op thread only adds hand-off costs, and on
    # a shared 2-core machine it makes every small matmul wait for a busy core.
    torch.set_num_threads(1)


@pytest.fixture
def make_config(tmp_path):
    """``make_config(**overrides)``: a tiny config writing into ``tmp_path / "run"`` by default."""

    def make(**overrides):
        overrides.setdefault("out", tmp_path / "run")
        return tiny_config(**overrides)

    return make


@pytest.fixture(scope="session")
def digits():
    from fastvae.data import load_dataset

    return load_dataset("digits")


@pytest.fixture
def perf_hints():
    """torch.compile's performance hints (such as why CUDA graphs were skipped) in the output."""
    torch._logging.set_logs(perf_hints=True)
    yield
    torch._logging.set_logs()
