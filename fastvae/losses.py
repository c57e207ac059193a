"""Likelihoods p(x|z), the ELBO and its training variants (beta, KL annealing, free bits), IWAE.

Conventions: every log-likelihood is summed over pixels (nats per example); batch averaging is
left to the caller. loss = -ELBO = recon + kl, with recon = -log p(x|z).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastvae.distributions import (LOG_2PI, at_least_fp32, diag_normal_log_prob, diag_normal_log_prob_of_noise,
                                   standard_normal_log_prob)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) = BCE(sigmoid(logits), x) summed over pixels; x may be continuous in [0, 1]."""
    logits = at_least_fp32(logits)
    bce = F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none")
    return bce.flatten(1).sum(-1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) = -BCE(sigmoid(logits), x) summed over pixels."""
    return -bernoulli_nll(logits, x)


def gaussian_log_likelihood(mean: torch.Tensor, x: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, sigma^2) summed over pixels, sigma = exp(log_scale) (broadcast)."""
    mean, x, log_scale = at_least_fp32(mean), at_least_fp32(x), at_least_fp32(log_scale)
    ll = -0.5 * LOG_2PI - log_scale - 0.5 * ((x - mean) * torch.exp(-log_scale)).pow(2)
    return ll.flatten(1).sum(-1)


def laplace_log_likelihood(mean: torch.Tensor, x: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log Laplace(x; mean, b) = -log(2b) - |x - mean| / b summed over pixels, b = exp(log_scale):
    the L1 reconstruction loss as a likelihood."""
    mean, x, log_scale = at_least_fp32(mean), at_least_fp32(x), at_least_fp32(log_scale)
    ll = -math.log(2.0) - log_scale - (x - mean).abs() * torch.exp(-log_scale)
    return ll.flatten(1).sum(-1)


class Likelihood(nn.Module):
    """p(x|z) given the decoder's output parameters.

    ``bernoulli``: the decoder outputs logits; mean = sigmoid(logits).
    ``gaussian``: the decoder outputs means; sigma is fixed (``sigma``) or, with
    ``learn_sigma=True``, one learned log-scale shared by all pixels.
    ``laplace``: as gaussian, with ``sigma`` the Laplace scale b (the L1 loss; std = sqrt(2) b).
    """

    def __init__(self, kind: str = "bernoulli", sigma: float = 0.1, learn_sigma: bool = False):
        super().__init__()
        if kind not in ("bernoulli", "gaussian", "laplace"):
            raise ValueError(f"unknown likelihood {kind!r}: use 'bernoulli', 'gaussian' or 'laplace'")
        self.kind = kind
        # shape (1,), not a scalar: FSDP shards parameters along a first dimension
        log_scale = torch.full((1,), math.log(sigma))
        if kind != "bernoulli" and learn_sigma:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # checkpoints from before (1,)
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per example."""
        if self.kind == "bernoulli":
            return bernoulli_log_likelihood(params, x)
        if self.kind == "laplace":
            return laplace_log_likelihood(params, x, self.log_scale)
        return gaussian_log_likelihood(params, x, self.log_scale)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per example (the training loss's reconstruction term, one op shorter)."""
        if self.kind == "bernoulli":
            return bernoulli_nll(params, x)
        return -self.log_prob(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params) if self.kind == "bernoulli" else params


class ElboTerms(NamedTuple):
    """Batch-averaged terms in nats per example. ``loss`` is what the optimizer minimizes.

    A named tuple, not a dataclass: strategy wrappers walk a model's outputs every step, and
    tuples are their cheap case.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor

    @property
    def neg_elbo(self) -> torch.Tensor:
        return self.recon + self.kl


def kl_weight(step: int, beta: float = 1.0, warmup_steps: int = 0) -> float:
    """Linear KL annealing: beta * min(1, step / warmup_steps); plain beta without warm-up."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Free bits (Kingma et al. 2016): sum_d max(lambda, E_batch[KL_d]), a scalar.

    ``kl_per_dim`` has shape (batch, latent_dim); ``free_bits`` = lambda in nats per dim.
    """
    return torch.clamp(kl_per_dim.mean(0), min=free_bits).sum()


def elbo_terms(
    recon_nll: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float | torch.Tensor = 1.0,
    kl_per_dim: torch.Tensor | None = None,
    free_bits: float = 0.0,
) -> ElboTerms:
    """Combine per-example -log p(x|z) and KL into the training loss and the -ELBO terms.

    loss = mean(recon_nll) + beta * mean(KL), where KL becomes the free-bits KL when
    ``free_bits > 0``. The reported recon and KL are batch means, detached.
    """
    if free_bits > 0:
        if kl_per_dim is None:
            raise ValueError("free bits need the per-dimension KL")
        loss = recon_nll.mean() + beta * free_bits_kl(kl_per_dim, free_bits)
    elif isinstance(beta, (int, float)) and beta == 1.0:  # beta may be a tensor (CUDA graphs)
        loss = (recon_nll + kl).mean()  # the fewest autograd nodes for the common case
    else:
        loss = (recon_nll + beta * kl).mean()
    return ElboTerms(loss=loss, recon=recon_nll.detach().mean(), kl=kl.detach().mean())


def iwae_log_weights(
    recon_ll: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), for samples z of shape (K, B, D);
    given the noise ``eps`` that made z (z = mu + exp(logvar / 2) * eps), log q is computed from
    it (exact for any logvar, see ``diag_normal_log_prob_of_noise``)."""
    log_q = diag_normal_log_prob(z, mu, logvar) if eps is None else diag_normal_log_prob_of_noise(eps, logvar)
    return recon_ll + standard_normal_log_prob(z) - log_q


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log p(x) >= logsumexp_k(log w_k) - log K over the first dimension (K samples)."""
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights, dim=0) - math.log(k)
