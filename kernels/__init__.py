"""Triton kernels for fastvae, installed as ``fastvae.kernels``.

``reparameterize_kl(mu, logvar, *, seed=None, reduction="none") -> (z, kl)``: fused
reparameterization + KL(q || N(0, I)), see :mod:`fastvae.kernels.reparam_kl`.
"""

from fastvae.kernels.reparam_kl import kernel_available, philox_eps, reparameterize_kl

__all__ = ["kernel_available", "philox_eps", "reparameterize_kl"]
