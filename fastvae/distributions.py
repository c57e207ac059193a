"""Closed-form KL divergences and Gaussian log-densities.

All KLs are per batch element: summed over the latent (event) dimension, any leading batch
shape kept. They match ``torch.distributions.kl_divergence`` for the same distributions.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 where it is (half precision is too coarse for sums over
    pixels; a 64-true run keeps its precision)."""
    return t if t.dtype == torch.float64 else t.float()


def kl_standard_normal_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Each latent dimension's term of KL(N(mu, diag s2) || N(0, I)): 0.5 (mu^2 + s2 - 1 - log s2),
    with s2 - 1 as expm1(log s2): near the prior (log s2 ~ 0) s2 - 1 - log s2 ~ (log s2)^2 / 2 is
    otherwise lost to cancellation (1% relative error at log s2 ~ 1e-3 in float32)."""
    return 0.5 * (mu.pow(2) + torch.expm1(logvar) - logvar)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) = 0.5 * sum(mu^2 + s2 - 1 - log s2)."""
    return kl_standard_normal_per_dim(mu, logvar).sum(dim=-1)


def kl_diag_normals(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, diag s2_q) || N(mu_p, diag s2_p)).

    = 0.5 * sum(logvar_p - logvar_q + (s2_q + (mu_q - mu_p)^2) / s2_p - 1)
    """
    log_ratio = logvar_q - logvar_p
    mahalanobis = (mu_q - mu_p).pow(2) * (-logvar_p).exp()
    # ratio - 1 as expm1: see kl_standard_normal_per_dim
    return 0.5 * (torch.expm1(log_ratio) - log_ratio + mahalanobis).sum(dim=-1)


def kl_mvn(
    mu_q: torch.Tensor, cov_q: torch.Tensor, mu_p: torch.Tensor, cov_p: torch.Tensor
) -> torch.Tensor:
    """KL between full-covariance normals, batched, via Cholesky factors (no explicit inverse).

    KL(N1||N2) = 0.5 [ log(|S2|/|S1|) - d + tr(S2^-1 S1) + (mu2-mu1)^T S2^-1 (mu2-mu1) ]

    ``mu_*`` have shape (..., d) and ``cov_*`` (..., d, d); leading shapes broadcast.
    """
    for name, value in (("mu_q", mu_q), ("cov_q", cov_q), ("mu_p", mu_p), ("cov_p", cov_p)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"kl_mvn: {name} must be a torch.Tensor, got {type(value).__name__}")
    d = mu_q.shape[-1]
    if mu_p.shape[-1] != d or cov_q.shape[-2:] != (d, d) or cov_p.shape[-2:] != (d, d):
        raise ValueError(f"kl_mvn: means (..., d) and covariances (..., d, d) of one d, got mu_q "
                         f"{tuple(mu_q.shape)}, cov_q {tuple(cov_q.shape)}, mu_p {tuple(mu_p.shape)}, "
                         f"cov_p {tuple(cov_p.shape)}")
    l_q, l_p = _cholesky(cov_q, "cov_q"), _cholesky(cov_p, "cov_p")
    batch = torch.broadcast_shapes(l_q.shape[:-2], l_p.shape[:-2], mu_q.shape[:-1], mu_p.shape[:-1])
    l_q = l_q.expand(*batch, d, d)
    l_p = l_p.expand(*batch, d, d)
    diff = (mu_p - mu_q).expand(*batch, d).unsqueeze(-1)
    # tr(S2^-1 S1) = ||L2^-1 L1||_F^2 ; Mahalanobis = ||L2^-1 (mu2 - mu1)||^2
    m = torch.linalg.solve_triangular(l_p, l_q, upper=False)
    y = torch.linalg.solve_triangular(l_p, diff, upper=False)
    trace = m.pow(2).sum(dim=(-2, -1))
    mahalanobis = y.pow(2).sum(dim=(-2, -1))
    half_logdet_p = l_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    half_logdet_q = l_q.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - d) + half_logdet_p - half_logdet_q


def _cholesky(cov: torch.Tensor, name: str) -> torch.Tensor:
    """The lower Cholesky factor of ``cov``; ValueError unless it is symmetric positive-definite
    (cholesky reads the lower triangle only: an asymmetric matrix gave a KL of another one)."""
    c = cov.detach()
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"kl_mvn: {name} holds NaN or Inf values")
    scale = float(c.abs().amax()) if c.numel() else 1.0
    if not torch.allclose(c, c.mT, rtol=1e-5, atol=1e-6 * scale):
        raise ValueError(f"kl_mvn: {name} is not symmetric: give a covariance matrix")
    factor, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(f"kl_mvn: {name} is not positive-definite: give a covariance matrix")
    return factor


def diag_normal_log_prob(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (x - mu).pow(2) * (-logvar).exp()).sum(dim=-1)


def diag_normal_log_prob_of_noise(eps: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)) for z = mu + exp(logvar / 2) * eps, from eps: exact where
    ``diag_normal_log_prob(z, ...)`` loses z - mu to rounding (a std far below mu's float spacing:
    at mu = 3, logvar = -30 over 64 dims, ~1 nat in float32)."""
    return -0.5 * (LOG_2PI + logvar + eps.pow(2)).sum(dim=-1)


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + x.pow(2)).sum(dim=-1)
