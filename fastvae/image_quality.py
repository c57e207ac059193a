"""Reconstruction quality of image models: PSNR, and the bicubic codec it is compared with.

PSNR = 10 log10(1 / MSE) in dB for pixels in [0, 1], the MSE over every pixel of every test
image (one figure for the split, so flat crops cannot inflate it as a mean of per-image PSNRs
would). A prepared (streamed) split is read in batches, so its size is not bounded by memory.
A model's reconstruction is E[x | z = mu(x)] clipped to [0, 1].

The bicubic baseline by a factor f is the trivial codec with a similar number of values as a
spatial latent (C x H/f x W/f against c x H/f x W/f): the image bicubic-downsampled by f
(antialiased) and bicubic-upsampled back (torch's kernel, a = -0.75, without antialiasing),
clipped to [0, 1]. Other bicubic variants score a little lower (PIL's both ways: 0.1 dB on the
photos test crops at f=4, see the README).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """10 log10(1 / MSE) over all pixels of ``x`` and ``y`` (values in [0, 1])."""
    return _psnr(_squared_error(x, y), x.numel())


def _squared_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.double() - y.double()).pow(2).sum().item()


def _psnr(squared_error: float, count: int) -> float:
    return math.inf if squared_error == 0 else 10.0 * math.log10(count / squared_error)


def bicubic_roundtrip(x: torch.Tensor, f: int) -> torch.Tensor:
    """``x`` (N, C, H, W) bicubic-downsampled by ``f`` (antialiased) and upsampled back, clipped."""
    h, w = x.shape[-2:]
    small = F.interpolate(x.float(), size=(h // f, w // f), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


@torch.no_grad()
def reconstructions(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """E[x | z = mu(x)] clipped to [0, 1] (the autoencoder: its output), float32 on the CPU."""
    param = next(model.parameters())
    out = []
    for chunk in x.split(batch_size):
        recon = model.reconstruct(chunk.to(param.device, param.dtype))
        out.append(recon.float().clamp(0.0, 1.0).cpu())
    return torch.cat(out)


def reconstruction_psnr(model, x, batch_size: int = 256) -> dict:
    """``{"psnr"}`` of the model's reconstructions of the images ``x`` (a tensor or a prepared
    split), plus ``{"bicubic_psnr"}`` for a spatial model (a ``downsample`` factor f)."""
    from fastvae.loaders import image_batches

    f = downsample_factor(model)
    model_error = bicubic_error = 0.0
    count = 0
    was_training = model.training
    model.eval()
    try:
        for chunk in image_batches(x, batch_size):
            model_error += _squared_error(reconstructions(model, chunk, batch_size), chunk.cpu())
            if f:
                bicubic_error += _squared_error(bicubic_roundtrip(chunk, f), chunk)
            count += chunk.numel()
    finally:
        model.train(was_training)
    result = {"psnr": _psnr(model_error, count)}
    if f:
        result["bicubic_psnr"] = _psnr(bicubic_error, count)
    return result


def downsample_factor(model) -> int | None:
    """f of a spatial-latent model (latent c x H/f x W/f), else None."""
    if len(getattr(model, "latent_shape", ())) != 3:
        return None
    return int(model.data_shape[-1]) // int(model.latent_shape[-1])
