"""The VAE module and the deterministic stacked autoencoder baseline (MSE cost)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from fastvae.distributions import at_least_fp32, kl_standard_normal_per_dim
from fastvae.losses import ElboTerms, Likelihood, elbo_terms
from fastvae.models.convkl import flatten_latent, latent_channels_last, unflatten_latent
from fastvae.reparam import Backend, reparameterize_kl


@dataclass
class VAEOutput:
    params: torch.Tensor  # decoder output: logits (bernoulli) or means (gaussian), data-shaped
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)) per example


class VAE(nn.Module):
    """Encoder q(z|x) = N(mu(x), diag exp(logvar(x))), prior N(0, I), decoder p(x|z).

    ``spec`` is the plain dict the model was built from (see ``fastvae.models.build_model``),
    stored in checkpoints so a run folder rebuilds its model without any other information.
    ``latent_shape`` is one example's latent: (latent_dim,), or (c, h, w) for a spatial
    encoder (one with a ``latent_shape``); ``latent_dim`` is its size. The KL and the noise are
    over the flattened latent.
    """

    kind = "vae"

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood, spec: dict):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.spec = dict(spec)
        self.latent_shape = latent_shape_of(encoder, spec)
        self.latent_dim = math.prod(self.latent_shape)
        self.data_shape = tuple(spec["data_shape"])
        self.reparam_backend: Backend = "auto"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def posterior(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        """Encode, draw z ~ q(z|x) with its KL, decode: everything the bounds need."""
        mu, logvar = self.encode(x)
        order = latent_channels_last(mu, logvar)  # one order for both: the op pairs them by element
        z, kl = reparameterize_kl(flatten_latent(mu, order), flatten_latent(logvar, order), generator,
                                  backend=self.reparam_backend)
        z = unflatten_latent(z, mu, order)
        return VAEOutput(self.decode(z), mu, logvar, z, kl)

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        beta: float = 1.0,
        free_bits: float = 0.0,
    ) -> ElboTerms:
        """The training objective and -ELBO terms for one batch (nats per example).

        ``forward`` is the loss so that strategy wrappers (DDP, FSDP) and ``torch.compile``
        see the whole step; use ``encode``/``decode``/``posterior`` for inference.
        """
        out = self.posterior(x, generator)
        recon_nll = self.likelihood.nll(out.params, x)
        kl_per_dim = None
        if free_bits > 0:
            kl_per_dim = kl_standard_normal_per_dim(at_least_fp32(out.mu), at_least_fp32(out.logvar))
        return elbo_terms(recon_nll, out.kl, beta=beta, kl_per_dim=kl_per_dim, free_bits=free_bits)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Means of p(x|z) for n draws z ~ N(0, I), shaped (n, *data_shape)."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise ValueError(f"sample(n): n must be a non-negative integer, got {n!r}")
        n = int(n)
        weight = next(self.parameters())
        z = torch.randn(n, *self.latent_shape, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Means of p(x|z = mu(x)): the deterministic reconstruction."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))


def latent_shape_of(encoder: nn.Module, spec: dict) -> tuple[int, ...]:
    """One example's latent shape: the encoder's ``latent_shape``, else (spec latent_dim,)."""
    return tuple(int(s) for s in getattr(encoder, "latent_shape", (spec["latent_dim"],)))


class StackedAutoencoder(nn.Module):
    """The baseline a VAE improves on: a deterministic encoder/decoder trained with MSE.

    loss = mean over the batch of sum over pixels of (sigmoid(decoder(encoder(x))) - x)^2.
    The encoder's mu head is the code; its logvar half is ignored.
    """

    kind = "ae"

    def __init__(self, encoder: nn.Module, decoder: nn.Module, spec: dict):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.spec = dict(spec)
        self.latent_shape = latent_shape_of(encoder, spec)
        self.latent_dim = math.prod(self.latent_shape)
        self.data_shape = tuple(spec["data_shape"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor, generator=None, **_) -> ElboTerms:
        """MSE objective: mean over the batch of the per-example sum of squared errors."""
        # in fp32 at least (as the VAE's likelihoods): a bf16-true run's loss was a bf16-rounded sum
        mse = (at_least_fp32(self.reconstruct(x)) - at_least_fp32(x)).pow(2).flatten(1).sum(-1).mean()
        zero = torch.zeros((), device=x.device)
        return ElboTerms(loss=mse, recon=mse.detach(), kl=zero)
