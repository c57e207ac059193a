"""Test-set bounds in nats per example: single-sample -ELBO and the IWAE bound.

Bits per dim (images): bound / (D ln 2), plus log2(L) for the continuous likelihoods (gaussian,
laplace) on data whose source stores its pixels on the grid k / L (``fastvae.data.data_grid``:
L = 255 for 8-bit images, 16 for the digits' 17 grey levels): a density on [0, 1] gives a
pixel's bin of width 1 / L the probability density / L (the usual dequantization convention,
the density read at the bin's centre). Data on no grid (continuous floats), or on one coarser
than 1 / 15 (under 16 levels), has no bits per dim for a density (None). The Bernoulli likelihood on [0, 1]
intensities is reported as its bound per dim alone.

-ELBO = E_x[ -log p(x|z) + KL(q(z|x) || p(z)) ], z ~ q(z|x) (one sample);
IWAE NLL = -E_x[ logsumexp_k log w_k - log K ], log w_k = log p(x, z_k) - log q(z_k|x).
Both use the torch reference for z (a fixed generator makes them repeatable).
"""

from __future__ import annotations

import math
import sys
import time

import torch

from fastvae.distributions import at_least_fp32
from fastvae.float32_default import float32_by_default
from fastvae.losses import iwae_bound, iwae_log_weights
from fastvae.progress_bars import progress_bar
from fastvae.reparam import reparameterize_kl_reference


@torch.no_grad()
def elbo_sums(model, data, *, batch_size: int = 256, seed: int = 0,
              rank: int = 0, world_size: int = 1, device=None) -> torch.Tensor:
    """Sums of (-ELBO, recon, KL) and the count over this rank's share of ``data`` (a tensor:
    rows rank, rank + W, ...; a prepared split, streamed: its contiguous part; see
    ``fastvae.loaders.eval_batches``).

    The noise of every row is drawn from ``seed`` by the row's index (``RowNoise``), so the sums
    of all shards equal the single-process sums exactly: evaluation does not depend on the
    world size, nor on whether the data is streamed.
    A deterministic autoencoder (no likelihood) reports its MSE as recon and -ELBO, KL 0.
    Every rank runs the same number of batches (the last may be empty): a sharded (FSDP)
    model gathers its weights in each call, collectively.
    """
    from fastvae.loaders import eval_batches

    was_training = model.training
    model.eval()
    device = data.device if isinstance(data, torch.Tensor) else torch.device(device or "cpu")
    sums = torch.zeros(4, dtype=torch.float64)
    eps = RowNoise(len(data), model.latent_shape, seed, device) if model.kind == "vae" else None
    dtype = param_dtype(model)
    for rows, x in eval_batches(data, batch_size, device, rank, world_size):
        x = x.to(dtype)
        if eps is None:
            # in fp32 at least, as the VAE's terms: bf16 sums were rounded to 3 significant digits
            recon = (at_least_fp32(model.reconstruct(x)) - at_least_fp32(x)).pow(2).flatten(1).sum(-1)
            kl = torch.zeros_like(recon)
        else:
            mu, logvar = (at_least_fp32(t).flatten(1) for t in model.encode(x))  # spatial: all c*h*w dims
            z, kl = reparameterize_kl_reference(mu, logvar, eps=eps[rows].flatten(1))
            z = z.view(len(x), *model.latent_shape).to(dtype)
            recon = -model.likelihood.log_prob(model.decode(z), x)
        sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum(),
                             torch.tensor(float(len(x)), device=x.device)]).double().cpu()
    model.train(was_training)
    return sums


class RowNoise:
    """N(0, I) noise of ``latent_shape`` for each of ``n`` rows, picked by row index: rows in
    blocks of ``EPS_BLOCK_VALUES`` values, block k drawn from a generator seeded with ``seed``
    (k = 0) or a 32-bit seed derived from (seed, k), only when a batch needs it. A test split
    within one block draws what one call for all its rows drew; memory no longer grows with the
    split (it held noise for every test row at once: 1.6 GB on the device for 100,000 256x256
    images of a spatial VAE)."""

    def __init__(self, n: int, latent_shape, seed: int, device):
        self.n, self.shape, self.seed, self.device = n, tuple(latent_shape), seed, device
        self.per_block = max(1, EPS_BLOCK_VALUES // max(1, math.prod(self.shape)))
        self.blocks: dict[int, torch.Tensor] = {}

    def _block(self, k: int) -> torch.Tensor:
        if k not in self.blocks:
            for old in [b for b in self.blocks if b < k]:  # batches move forward through the rows
                del self.blocks[old]
            g = torch.Generator(device=self.device).manual_seed(_block_seed(self.seed, k))
            rows = min(self.per_block, self.n - k * self.per_block)
            self.blocks[k] = torch.randn(rows, *self.shape, generator=g, device=self.device)
        return self.blocks[k]

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        block = rows // self.per_block
        first, last = (int(b) for b in (block.min(), block.max())) if len(rows) else (0, -1)
        if first == last:
            return self._block(first)[rows - first * self.per_block]
        out = torch.empty(len(rows), *self.shape, device=self.device)
        for k in range(first, last + 1):
            mask = block == k
            out[mask] = self._block(k)[rows[mask] - k * self.per_block]
        return out


def _block_seed(seed: int, k: int) -> int:
    """Block k's seed: ``seed`` itself for block 0, else 32 bits from numpy's SeedSequence of
    (seed, k) (torch's CPU generator keeps only a seed's low 32 bits: seed + k * 2**32 gave
    every block the same noise)."""
    if k == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint32)[0])


# noise values per RowNoise block: 64 MB of float32
EPS_BLOCK_VALUES = 1 << 24


@torch.no_grad()
def iwae_nll_sum(model, data, k: int, *, batch_size: int = 64, seed: int = 0,
                 progress: bool = False) -> float:
    """Sum over ``data`` (a tensor or a prepared split, read in order) of the IWAE negative
    log-likelihood bound with ``k`` samples each.

    The decoder sees at most ``decode_rows(model)`` latents per call (about 64k for the digits,
    fewer for larger images), so k samples of a large image are decoded in chunks of k.
    """
    from fastvae.loaders import eval_batches

    device = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    rows = decode_rows(model)
    # k samples per example: keep k * batch rows per decoder call within ``rows``
    batch_size = max(1, min(batch_size, rows // max(k, 1)))
    chunk = min(k, rows)
    count = math.ceil(len(data) / batch_size)
    batches = progress_bar(eval_batches(data, batch_size, device), total=count, desc=f"IWAE k={k}",
                           disable=None if progress else True, leave=False)
    dtype = param_dtype(model)
    started = time.perf_counter()
    for i, (_, x) in enumerate(batches):
        if i == 1 and progress:  # one batch timed: a bound of many minutes says so (a bar shows only on a terminal)
            note_long_iwae(k, (time.perf_counter() - started) * count)
        x = x.to(dtype)
        mu, logvar = (at_least_fp32(t).flatten(1) for t in model.encode(x))  # (B, D), D = c*h*w
        log_w = []
        for done in range(0, k, chunk):
            kc = min(chunk, k - done)
            eps = torch.randn((kc, *mu.shape), generator=g, device=mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
            params = model.decode(z.view(kc * len(x), *model.latent_shape).to(dtype))
            xk = x.unsqueeze(0).expand(kc, *x.shape).flatten(0, 1)
            recon_ll = model.likelihood.log_prob(params, xk).view(kc, len(x))
            log_w.append(iwae_log_weights(recon_ll, z, mu, logvar, eps=eps))
        total -= iwae_bound(torch.cat(log_w)).double().sum().item()
    return total


LONG_IWAE_S = 120  # an IWAE bound expected to take longer gets a note with its estimate


def note_long_iwae(k: int, seconds: float) -> None:
    if seconds > LONG_IWAE_S:
        print(f"note: the IWAE bound with {k} samples per example will take about {seconds / 60:.0f} min "
              "here (--iwae-k 10 gives a quicker, looser bound; 0 skips it)", file=sys.stderr)


def param_dtype(model) -> torch.dtype:
    """The dtype of the model's weights (float64 under ``--precision 64-true``, bf16 under
    ``bf16-true``): what its inputs must have outside the Fabric-wrapped forward, which would
    convert them."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def decode_rows(model) -> int:
    """Latents per decoder call in the IWAE bound: 65536 for images of up to 64 values, then
    fewer, so one call's output stays near 4M values (the activations scale with it)."""
    return max(1, min(65536, (1 << 22) // max(1, math.prod(model.data_shape))))


@float32_by_default
def evaluate(model, data, *, iwae_k: int = 1000, seed: int = 0,
             progress: bool = False, pixel_grid: int | None | str = "auto") -> dict:
    """``{"neg_elbo", "recon", "kl", "iwae_nll", "bits_per_dim", "pixel_levels", "n", "iwae_k"}``
    on ``data`` ("iwae_nll" only for ``iwae_k`` > 0; nats per example; bits per dim of the
    tightest bound computed, None for a density on data without a pixel grid; ``pixel_levels``:
    L + 1 for the grid k / L, else None; see the module doc).

    ``data``: rows (n, *model.data_shape) as a tensor or numpy array, floats in [0, 1] or uint8
    pixels; ``Splits`` (their test split) or a prepared split. ``model``: a VAE or a run folder.
    ``pixel_grid``: L of the data's grid k / L (``fastvae.data.data_grid``: "auto" takes it from
    ``data``; a caller holding the source's ``Splits`` passes theirs)."""
    from fastvae.config import check_iwae_k
    from fastvae.data import data_grid

    iwae_k = check_iwae_k(iwae_k, "evaluate: iwae_k")
    model, checked, seed = _checked(model, data, seed)
    grid = data_grid(data) if pixel_grid == "auto" else pixel_grid  # as stored, before unit_pixels
    data = checked
    sums = elbo_sums(model, data, seed=seed)
    n = float(sums[3])
    result = {"neg_elbo": float(sums[0]) / n, "recon": float(sums[1]) / n,
              "kl": float(sums[2]) / n, "n": int(n), "iwae_k": iwae_k}
    if iwae_k > 0:
        result["iwae_nll"] = iwae_nll_sum(model, data, iwae_k, seed=seed, progress=progress) / n
    bound = result.get("iwae_nll", result["neg_elbo"])
    result["bits_per_dim"] = bits_per_dim(bound, model.data_shape, model.likelihood.kind, grid)
    result["pixel_levels"] = None if grid is None else grid + 1
    return result


def _checked(model, data, seed):
    """(model, data, seed) for ``evaluate``, or one clear error: a run folder or checkpoint is
    loaded, ``Splits`` give their test split, numpy arrays become tensors."""
    import os

    import numpy as np

    from fastvae.config import check_seed
    from fastvae.data import Splits, unit_pixels
    from fastvae.errors import FastVAEError

    if isinstance(model, (str, os.PathLike)):
        from fastvae.checkpoint import load

        model = load(model)
    if not hasattr(model, "data_shape") or not hasattr(model, "likelihood"):
        raise FastVAEError(f"evaluate takes a fastvae VAE (fastvae.load(RUN)) or a run folder, got "
                           f"{type(model).__name__}")
    if isinstance(data, Splits):
        data = data.test
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim < 1 or len(data) == 0 or tuple(data.shape[1:]) != tuple(model.data_shape):
            raise FastVAEError(f"evaluate: data of shape {tuple(data.shape)}, the model takes rows "
                               f"{tuple(model.data_shape)} (at least one)")
        data = unit_pixels(data, "evaluate: data")
    elif not hasattr(data, "read_block"):  # a prepared split, streamed
        raise FastVAEError(f"evaluate: data must be a tensor (n, {', '.join(map(str, model.data_shape))}), "
                           f"Splits or a prepared split, got {type(data).__name__}")
    return model, data, check_seed(seed, "evaluate: seed")


# a density's bits per dim need bins this fine at least (4-bit pixels, 16 levels): reading the
# density at a bin's centre as its average over the bin breaks down for coarser ones (binary
# pixels gave -3 bits per dim)
MIN_DENSITY_GRID = 15


def bits_per_dim(nats: float, data_shape, likelihood: str, grid: int | None = 255) -> float | None:
    """A bound in nats per example as bits per data dim; a density's pixels in bins of width
    1 / ``grid`` (None: no grid, or one coarser than 1 / MIN_DENSITY_GRID: no bits per dim for a
    density)."""
    dims = math.prod(data_shape)
    per_dim = nats / (dims * math.log(2.0))
    if likelihood not in ("gaussian", "laplace"):
        return per_dim
    return None if grid is None or grid < MIN_DENSITY_GRID else per_dim + math.log2(grid)

