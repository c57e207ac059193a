"""Pictures of spatial-latent models (latent c x H/f x W/f), beside ``fastvae.viz``'s own:

- ``reconstructions_side_by_side.png``: rows of (test image, its reconstruction E[x|z=mu(x)],
  the bicubic down-then-up codec by the same f), every image at full resolution;
- ``latent_channels.png``: rows of (test image, then each latent channel of mu(x) as a grey
  image, nearest-upsampled by f so it lines up with the pixels it encodes; values -3..3 map to
  black..white, the prior's +-3 sigma).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastvae.image_quality import bicubic_roundtrip, downsample_factor, reconstructions
from fastvae.viz import LATENT_CHANNELS_PNG, SIDE_BY_SIDE_PNG, save_image_grid

N_ROWS = 8
LATENT_RANGE = 3.0  # latent value shown as white; -LATENT_RANGE as black


def write_spatial_pictures(run_dir: str | Path, model, x: torch.Tensor) -> list[Path]:
    """Both pictures for the first ``N_ROWS`` images of ``x``; returns their paths."""
    run_dir = Path(run_dir)
    x = x[:N_ROWS].float().cpu()
    return [save_side_by_side(model, x, run_dir / SIDE_BY_SIDE_PNG),
            save_latent_channels(model, x, run_dir / LATENT_CHANNELS_PNG)]


def save_side_by_side(model, x: torch.Tensor, path: Path) -> Path:
    columns = [x, reconstructions(model, x), bicubic_roundtrip(x, downsample_factor(model))]
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # row i: x_i, recon_i, bicubic_i
    return save_image_grid(grid.numpy(), path, nrow=len(columns))


@torch.no_grad()
def save_latent_channels(model, x: torch.Tensor, path: Path) -> Path:
    param = next(model.parameters())
    mu = model.encode(x.to(param.device, param.dtype))
    mu = (mu[0] if isinstance(mu, (tuple, list)) else mu).float().cpu()  # (n, c, h, w)
    f = downsample_factor(model)
    grey = ((mu / LATENT_RANGE + 1.0) / 2.0).clamp(0.0, 1.0).repeat_interleave(f, -1).repeat_interleave(f, -2)
    channels = grey.unsqueeze(2).expand(-1, -1, x.shape[1], -1, -1)  # each channel as a C-channel image
    grid = torch.cat([x.unsqueeze(1), channels], dim=1)  # (n, 1 + c, C, H, W)
    return save_image_grid(grid.flatten(0, 1).numpy(), path, nrow=grid.shape[1])
