"""Reconstruction quality on held-out photo crops under one wall-clock budget (CPU):
fastvae's spatial-latent VAE vs a minimal hand-written PyTorch conv VAE vs diffusers'
AutoencoderKL, all with the same f, c, data, likelihood, batch, optimizer and loop.

    python benchmarks/photo_quality.py OUT.json [--budget-s 300] [--data photos] [--smoke]

The three models train *interleaved*, one step each in turn, each until its own summed step
time reaches the budget: load on the shared machine hits all three alike. The loop is the
plain one anyone writes (shuffle, slice, forward, -ELBO = Gaussian NLL summed over pixels + KL
summed over latent dims, Adam 1e-3, fp32); fastvae's model runs its own forward (the same
-ELBO). Then each model's PSNR on the held-out test crops (reconstruction E[x|z=mu(x)], all
test pixels: ``fastvae.image_quality``) is written with the bicubic baseline by the same f.
diffusers is a benchmark-only dependency (``pip install -e '.[bench]'``); without it that
model is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, smoke_mode  # noqa: E402

from fastvae.data import load_dataset  # noqa: E402
from fastvae.image_quality import bicubic_roundtrip, psnr  # noqa: E402
from fastvae.models import build_model  # noqa: E402

# the recipe of the README (fastvae train --data photos --model convkl ...)
SETTINGS = dict(downsample=4, latent_channels=4, width=16, channel_mult="1,1,2", blocks_per_level=1,
                likelihood="gaussian", sigma=0.1, batch_size=64, lr=1e-3)


class PlainConvVAE(nn.Module):
    """The minimal hand-written conv VAE: log2(f) stride-2 convs (ReLU) to 2c channels, and
    transposed convs back; widths as the fastvae model's levels."""

    def __init__(self, channels: int, f: int, c: int, widths: list[int]):
        super().__init__()
        levels = int(math.log2(f))
        enc, prev = [], channels
        for i in range(levels):
            enc += [nn.Conv2d(prev, widths[i + 1], 4, stride=2, padding=1), nn.ReLU()]
            prev = widths[i + 1]
        self.encoder = nn.Sequential(*enc, nn.Conv2d(prev, 2 * c, 3, padding=1))
        dec, prev = [nn.Conv2d(c, widths[-1], 3, padding=1), nn.ReLU()], widths[-1]
        for i in reversed(range(levels)):
            out = widths[i] if i else widths[0]
            dec += [nn.ConvTranspose2d(prev, out, 4, stride=2, padding=1), nn.ReLU()]
            prev = out
        self.decoder = nn.Sequential(*dec, nn.Conv2d(prev, channels, 3, padding=1))

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(z)


class DiffusersKL(nn.Module):
    """diffusers' AutoencoderKL with the fastvae model's levels, widths, blocks and c."""

    def __init__(self, channels: int, c: int, widths: list[int], blocks: int):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL(
            in_channels=channels, out_channels=channels, latent_channels=c,
            down_block_types=("DownEncoderBlock2D",) * len(widths),
            up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=tuple(widths), layers_per_block=blocks,
            norm_num_groups=math.gcd(32, *[w // 2 for w in widths]), sample_size=32,  # as fastvae's GroupNorm
        )

    def encode(self, x):
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar  # diffusers clamps logvar to [-30, 20] too

    def decode(self, z):
        return self.vae.decode(z).sample


def gaussian_elbo_loss(model, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """-ELBO per example averaged: Gaussian NLL summed over pixels + KL over latent dims."""
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    mean = model.decode(z)
    nll = (0.5 * ((x - mean) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    return (nll + kl).mean()


class FastvaeAdapter(nn.Module):
    """fastvae's VAE behind the loop's interface; its loss is its own forward (the same -ELBO)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.model = build_model(spec)

    def loss(self, x):
        return self.model(x).loss

    @torch.no_grad()
    def reconstruct(self, x):
        return self.model.reconstruct(x)


def make_models(shape, settings) -> tuple[dict, list[str]]:
    from fastvae.config import parse_channel_mult

    c_img = shape[0]
    f, c = settings["downsample"], settings["latent_channels"]
    widths = [settings["width"] * m for m in parse_channel_mult(settings["channel_mult"], f)]
    spec = {"model": "convkl", "data_shape": list(shape), **{k: settings[k] for k in (
        "downsample", "latent_channels", "width", "channel_mult", "blocks_per_level", "likelihood", "sigma")}}
    models, notes = {}, []
    torch.manual_seed(0)
    models["fastvae convkl"] = FastvaeAdapter(spec)
    torch.manual_seed(0)
    models["hand-written conv VAE"] = PlainConvVAE(c_img, f, c, widths)
    try:
        torch.manual_seed(0)
        models["diffusers AutoencoderKL"] = DiffusersKL(c_img, c, widths, settings["blocks_per_level"])
    except ImportError as exc:
        notes.append(f"diffusers AutoencoderKL skipped: {exc} (pip install -e '.[bench]')")
    return models, notes


def loss_of(name, model, x, sigma):
    return model.loss(x) if isinstance(model, FastvaeAdapter) else gaussian_elbo_loss(model, x, sigma)


@torch.no_grad()
def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = []
    for chunk in x.split(128):
        if isinstance(model, FastvaeAdapter):
            out.append(model.reconstruct(chunk))
        else:
            out.append(model.decode(model.encode(chunk)[0]))
    model.train()
    return torch.cat(out).clamp(0.0, 1.0)


def run(data: str, budget_s: float, settings: dict, max_steps: int | None = None) -> dict:
    splits = load_dataset(data)
    train, test = splits.train, splits.test
    models, notes = make_models(splits.data_shape, settings)
    optimizers = {n: torch.optim.Adam(m.parameters(), lr=settings["lr"]) for n, m in models.items()}
    spent = {n: 0.0 for n in models}
    steps = {n: 0 for n in models}
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g)
    positions = {n: 0 for n in models}
    batch = settings["batch_size"]
    active = list(models)
    while active:
        for name in list(active):
            if positions[name] + batch > len(order):  # a new epoch: same permutation for all
                positions[name] = 0
            x = train[order[positions[name] : positions[name] + batch]]
            positions[name] += batch
            start = time.perf_counter()
            loss = loss_of(name, models[name], x, settings["sigma"])
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            spent[name] += time.perf_counter() - start
            steps[name] += 1
            if not math.isfinite(loss.item()):
                notes.append(f"{name}: non-finite loss at step {steps[name]}")
                active.remove(name)
            elif spent[name] >= budget_s or (max_steps and steps[name] >= max_steps):
                active.remove(name)
    results = {}
    for name, model in models.items():
        results[name] = {"psnr_db": psnr(reconstruct(model, test), test), "steps": steps[name],
                         "train_seconds": spent[name], "examples": steps[name] * batch,
                         "parameters": sum(p.numel() for p in model.parameters())}
    f = settings["downsample"]
    baseline = psnr(bicubic_roundtrip(test, f), test)
    fastvae_psnr = results["fastvae convkl"]["psnr_db"]
    others = [r["psnr_db"] for n, r in results.items() if n != "fastvae convkl"]
    return {
        "what": "PSNR (dB) of reconstructions of held-out photo crops after the same wall-clock training budget",
        "data": data, "n_train": len(train), "n_test": len(test), "budget_s_per_model": budget_s,
        "settings": settings, "models": results, "bicubic_psnr_db": baseline,
        "fastvae_minus_bicubic_db": fastvae_psnr - baseline,
        "goal_fastvae_at_least_both": bool(others) and all(fastvae_psnr >= o for o in others),
        "notes": notes, "machine": device_info(), "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per model")
    parser.add_argument("--data", default="photos")
    parser.add_argument("--smoke", action="store_true", help="2 steps each on a tiny model: checks the script")
    args = parser.parse_args(argv)
    settings = dict(SETTINGS)
    if args.smoke:
        settings.update(width=8, batch_size=8)
    result = run(args.data, args.budget_s, settings, max_steps=2 if args.smoke else None)
    # report.py store refuses a smoke file (2 steps each: the PSNRs mean nothing)
    result["smoke"] = bool(args.smoke or smoke_mode())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["models"].items():
        print(f"{name:>26}: {r['psnr_db']:.2f} dB after {r['steps']} steps ({r['train_seconds']:.0f} s)")
    print(f"{'bicubic down-then-up':>26}: {result['bicubic_psnr_db']:.2f} dB (f={settings['downsample']})")
    print(f"goal fastvae >= both: {result['goal_fastvae_at_least_both']}", *result["notes"], sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
