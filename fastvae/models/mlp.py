"""MLP encoder and decoder: x -> hidden -> (mu, logvar) and z -> hidden -> output params."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLPEncoder(nn.Module):
    """q(z|x): flatten, one hidden ReLU layer, then a linear head for (mu, logvar)."""

    def __init__(self, data_shape: tuple[int, ...], hidden_dim: int, latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(data_shape), hidden_dim), nn.ReLU()
        )
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """p(x|z): z -> hidden ReLU -> one output parameter per pixel, shaped like the data."""

    def __init__(self, data_shape: tuple[int, ...], hidden_dim: int, latent_dim: int):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, math.prod(data_shape))
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.data_shape)
