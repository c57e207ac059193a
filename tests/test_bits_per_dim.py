"""Bits per dim: a density's bins are the source's own pixel grid (1/255 for 8-bit images, 1/16
for the digits), checked against the exact discretised likelihood (a Normal's CDF over the bins)."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from fastvae.data import data_grid, load_dataset, source_grid
from fastvae.evaluation import bits_per_dim, evaluate
from fastvae.models import build_model


def _model(shape, likelihood="gaussian", seed=0):
    torch.manual_seed(seed)
    return build_model({"model": "mlp", "data_shape": list(shape), "hidden_dim": 16, "latent_dim": 4,
                        "likelihood": likelihood, "sigma": 0.3})


@pytest.mark.parametrize("source", ["digits", "uint8"])
def test_density_bits_per_dim_match_the_discretised_likelihood(source):
    """-log2 of the probability of each pixel's bin, Phi((x + w/2 - m) / s) - Phi((x - w/2 - m) / s),
    per dim: the density read at the bin's centre times the bin width w = 1 / L is within the
    curvature error (~w^2 / (24 s^2) nats) of it. 8 bits were added whatever the data: 4 too
    many for the digits' 17 levels, 0.0056 too many for 8-bit pixels k / 255."""
    g = torch.Generator().manual_seed(0)
    if source == "digits":
        splits = load_dataset("digits")
        x = splits.test[:200]
    else:
        raw = torch.randint(0, 256, (200, 3, 8, 8), generator=g, dtype=torch.uint8)
        splits, x = raw, raw.float() / 255
    grid = data_grid(splits)
    assert grid == (16 if source == "digits" else 255)
    sigma = 0.3
    mean = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1).double()
    xd, dims = x.double(), x[0].numel()
    nats = -Independent(Normal(mean, sigma), 3).log_prob(xd).mean().item()
    normal, half = Normal(mean, sigma), 0.5 / grid
    exact = -(normal.cdf(xd + half) - normal.cdf(xd - half)).log2().flatten(1).sum(-1).mean().item() / dims
    curvature = (1 / grid) ** 2 / (24 * sigma**2 * math.log(2))  # bits: 2.6e-3 for the digits, 1e-5 for 8-bit
    assert bits_per_dim(nats, x.shape[1:], "gaussian", grid) == pytest.approx(exact, abs=2 * curvature + 1e-4)
    assert abs(nats / (dims * math.log(2)) + 8 - exact) > 2 * curvature + 1e-4  # the old rule


def test_the_grid_is_the_sources_not_the_values_of_its_test_split():
    """Black-and-white scans stored as uint8 are 8-bit data (the same as prepared); colour
    data converted to luma keeps its source's bins; floats are looked at; 8-bit data stored as
    float16 lies on no grid float32 can tell; a coarse grid gives a density no bits."""
    scans = torch.randint(0, 2, (20, 1, 4, 4), dtype=torch.uint8) * 255
    assert source_grid(scans) == 255 and source_grid(scans.float() / 255) == 1
    assert data_grid(load_dataset("photos", grayscale=True)) == 255
    assert source_grid(np.arange(256, dtype=np.float32) / 255) == 255
    assert source_grid((np.arange(256) / 255).astype(np.float16)) is None
    assert source_grid(np.random.default_rng(0).random(1000)) is None
    assert source_grid(np.zeros(4, bool)) == 1 and source_grid(np.array([0, 0.5, 1.0])) == 2
    assert bits_per_dim(100.0, (1, 4, 4), "gaussian", 7) is None  # 3-bit pixels: too coarse
    assert bits_per_dim(100.0, (1, 4, 4), "gaussian", 15) == pytest.approx(100 / (16 * math.log(2)) + math.log2(15))
    assert bits_per_dim(100.0, (1, 4, 4), "bernoulli", None) == pytest.approx(100 / (16 * math.log(2)))


def test_evaluate_names_the_grid_and_has_no_density_bits_for_continuous_data():
    digits = load_dataset("digits")
    model = _model(digits.data_shape)
    result = evaluate(model, digits, iwae_k=2)  # Splits: their test split and their grid
    dims = math.prod(digits.data_shape)
    assert result["pixel_levels"] == 17
    assert result["bits_per_dim"] == pytest.approx(result["iwae_nll"] / (dims * math.log(2)) + 4)
    pixels = torch.randint(0, 256, (40, *digits.data_shape), dtype=torch.uint8)
    assert evaluate(model, pixels, iwae_k=0)["pixel_levels"] == 256  # uint8 rows become k / 255
    continuous = torch.rand(40, *digits.data_shape, generator=torch.Generator().manual_seed(3))
    result = evaluate(model, continuous, iwae_k=0)
    assert result["pixel_levels"] is None and result["bits_per_dim"] is None
    assert evaluate(model, continuous, iwae_k=0, pixel_grid=255)["pixel_levels"] == 256  # the caller's
    result = evaluate(_model(digits.data_shape, "bernoulli"), continuous, iwae_k=0)  # a pmf: no bins added
    assert result["bits_per_dim"] == pytest.approx(result["neg_elbo"] / (dims * math.log(2)))
