"""Convolutional encoder and decoder for image data of any (C, H, W).

Two stride-2 convolutions halve H and W twice (ceil); the decoder mirrors them with transposed
convolutions and crops to the data size, so odd sizes such as 8x8 or 28x28 both work.
"""

from __future__ import annotations

import torch
from torch import nn


def _down(size: int) -> int:
    return (size + 1) // 2


class ConvEncoder(nn.Module):
    """q(z|x): conv(32, s2) -> conv(64, s2) -> flatten -> hidden -> (mu, logvar)."""

    def __init__(self, data_shape: tuple[int, int, int], hidden_dim: int, latent_dim: int):
        super().__init__()
        c, h, w = data_shape
        h4, w4 = _down(_down(h)), _down(_down(w))
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * h4 * w4, hidden_dim), nn.ReLU(),
        )
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """p(x|z): z -> hidden -> 64 x H/4 x W/4 -> deconv(32, s2) -> deconv(C, s2) -> crop."""

    def __init__(self, data_shape: tuple[int, int, int], hidden_dim: int, latent_dim: int):
        super().__init__()
        c, h, w = data_shape
        self.data_shape = tuple(data_shape)
        self.h4, self.w4 = _down(_down(h)), _down(_down(w))
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, 64 * self.h4 * self.w4), nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).unflatten(-1, (64, self.h4, self.w4))
        _, h, w = self.data_shape
        return self.deconv(x)[..., :h, :w]
