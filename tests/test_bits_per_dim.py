"""Bits per dim: a density's bins are the data's own pixel grid (1/255 for 8-bit images, 1/16
for the digits), checked against the exact discretised likelihood (a Normal's CDF over the bins)."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from fastvae.data import load_dataset
from fastvae.evaluation import bits_per_dim, evaluate, pixel_grid
from fastvae.models import build_model


def _gaussian_model(shape, seed=0):
    torch.manual_seed(seed)
    return build_model({"model": "mlp", "data_shape": list(shape), "hidden_dim": 16, "latent_dim": 4,
                        "likelihood": "gaussian", "sigma": 0.3})


@pytest.mark.parametrize("source", ["digits", "uint8"])
def test_density_bits_per_dim_match_the_discretised_likelihood(source):
    """-log2 of the probability of each pixel's bin, Phi((x + w/2 - m) / s) - Phi((x - w/2 - m) / s),
    per dim: the density read at the bin's centre times the bin width w = 1 / L is within the
    curvature error (~w^2 / (24 s^2) nats) of it. 8 bits were added for the digits' 17 levels
    (4 bits too many: worse than a uniform code over the 17 values)."""
    g = torch.Generator().manual_seed(0)
    if source == "digits":
        x = load_dataset("digits").test[:200]
    else:
        x = torch.randint(0, 256, (200, 3, 8, 8), generator=g).float() / 255
    grid = pixel_grid(x)
    assert grid == (16 if source == "digits" else 255)
    sigma = 0.3
    mean = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1).double()
    xd, dims = x.double(), x[0].numel()
    nats = -Independent(Normal(mean, sigma), 3).log_prob(xd).mean().item()
    normal, half = Normal(mean, sigma), 0.5 / grid
    exact = -(normal.cdf(xd + half) - normal.cdf(xd - half)).log2().flatten(1).sum(-1).mean().item() / dims
    assert bits_per_dim(nats, x.shape[1:], "gaussian", grid) == pytest.approx(exact, abs=0.01)


def test_evaluate_names_the_grid_and_has_no_density_bits_for_continuous_data():
    digits = load_dataset("digits").test[:40]
    model = _gaussian_model(digits.shape[1:])
    result = evaluate(model, digits, iwae_k=2)
    dims = digits[0].numel()
    assert result["pixel_levels"] == 17
    assert result["bits_per_dim"] == pytest.approx(result["iwae_nll"] / (dims * math.log(2)) + 4)
    pixels = torch.randint(0, 256, (40, *digits.shape[1:]), dtype=torch.uint8)
    assert evaluate(model, pixels, iwae_k=0)["pixel_levels"] == 256  # uint8 rows become k / 255
    continuous = torch.rand(40, *digits.shape[1:], generator=torch.Generator().manual_seed(3))
    result = evaluate(model, continuous, iwae_k=0)
    assert result["pixel_levels"] is None and result["bits_per_dim"] is None
    bernoulli = build_model({"model": "mlp", "data_shape": list(digits.shape[1:]), "hidden_dim": 16,
                             "latent_dim": 4, "likelihood": "bernoulli"})
    result = evaluate(bernoulli, continuous, iwae_k=0)  # a likelihood of its own: no bins to add
    assert result["bits_per_dim"] == pytest.approx(result["neg_elbo"] / (dims * math.log(2)))
    binary = (continuous > 0.5).float()
    assert pixel_grid(binary) == 1 and pixel_grid(binary * 0.5) == 2
